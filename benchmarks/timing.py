"""The one timing helper the benchmarks share."""

import statistics
import time


def timeit(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of `repeats` calls of fn, after `warmup` calls, in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
