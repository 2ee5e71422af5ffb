"""Choices made by measurement at start-up, on the run's real shape and device: the precision of the encoder's
GEMM and selection, and the path of the sparse products (`products.KERNELS`). Under torchrun rank 0's
measurement decides for every rank. A resumed run keeps what its checkpoint recorded (see checkpoint.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from . import dist
from .kernels import ENCODE_CHUNK
from .products import KERNELS

BF16_MIN_SPEEDUP = 1.5  # bf16 is taken where its GEMM is clearly faster (its selection differs near ties)
KERNEL_ROUNDS = 2  # timed steps of each path, interleaved, after one warm-up step each: 3 steps of each in all


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def bf16_gemm_speedup(d: int, N: int, device) -> float:
    """How many times faster the encoder's GEMM (ENCODE_CHUNK x d times d x N) runs in bfloat16 than in
    float32 on `device`: best of 3 timings of each, after a warm-up. Its operands come from torch's global RNG."""
    x, W = torch.randn(ENCODE_CHUNK, d, device=device), torch.randn(N, d, device=device).t()
    xb, Wb = x.bfloat16(), W.bfloat16()

    def best(a, b):
        times = []
        for _ in range(4):
            _sync(device)
            t = time.perf_counter()
            a @ b
            _sync(device)
            times.append(time.perf_counter() - t)
        return min(times[1:])

    return best(x, W) / best(xb, Wb)


def choose_precision(precision: str, d: int, N: int, device) -> tuple[str, float | None]:
    """("fp32" | "bf16", the measured bf16 speedup or None). auto: time a GEMM of the encoder's shape in each
    precision and take bf16 only where it is BF16_MIN_SPEEDUP times faster."""
    if precision != "auto":
        return precision, None
    speedup = bf16_gemm_speedup(d, N, device)
    return ("bf16" if dist.agree(speedup >= BF16_MIN_SPEEDUP) else "fp32"), speedup


def time_kernels(step: Callable[[str], object], device, rounds: int = KERNEL_ROUNDS) -> dict[str, float]:
    """Seconds of `step(kernel)` (one training step's forward and backward by that path) for each path: the
    best of `rounds`, the paths interleaved (A, B, C, A, B, C, ...) after a warm-up of each."""
    times: dict[str, list[float]] = {k: [] for k in KERNELS}
    for r in range(rounds + 1):
        for kernel in KERNELS:
            _sync(device)
            t = time.perf_counter()
            step(kernel)
            _sync(device)
            if r:
                times[kernel].append(time.perf_counter() - t)
    return {k: min(v) for k, v in times.items()}


def pick_kernel(timings: dict[str, float]) -> str:
    """The fastest path (the first of KERNELS on a tie)."""
    return min(KERNELS, key=lambda k: (timings[k], KERNELS.index(k)))


def choose_kernel(kernel: str, step: Callable[[str], object], device) -> tuple[str, dict[str, float] | None]:
    """(the path, its measured timings or None). auto: `time_kernels`, then the fastest (rank 0's pick)."""
    if kernel != "auto":
        return kernel, None
    timings = time_kernels(step, device)
    pick = dist.broadcast(torch.tensor([KERNELS.index(pick_kernel(timings))]))
    return KERNELS[int(pick[0])], timings
