"""Real-activation pipeline, side by side in one run:

1. extraction speed: the model run up to layer L (stopped there) against a full forward, same batch;
2. training memory: peak RSS of the same short training run reading an activation directory of S shards
   and of 4 S shards (each run in its own process) — flat if reading is lazy.

    python benchmarks/bench_data.py [--model smollm2-135m] [--layer 2] [--batch 32] [--ctx 128]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from timing import timeit

from progsae.data import SyntheticConfig, SyntheticSource, write_activations
from progsae.data.lm import load_lm, residual_stream

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (large) parent process
TRAIN_CHILD = """
import sys
from progsae import TrainConfig, train
from progsae.data import ActivationDir
train(ActivationDir(sys.argv[1]), TrainConfig(d_sae=4096, k=32, tokens=40 * 4096, batch_size=4096), progress=False)
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024)
"""


def peak_rss_mb(acts: Path) -> float:
    out = subprocess.run([sys.executable, "-c", TRAIN_CHILD, str(acts)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--batch", type=int, default=32, help="contexts per forward")
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--shards", type=int, default=4, help="S: shards of 65,536 tokens in the small directory")
    a = p.parse_args()

    model, tok, name = load_lm(a.model)
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.ctx))
    n = ids.numel()
    with torch.no_grad():
        full = timeit(lambda: model(input_ids=ids, use_cache=False))
    part = timeit(lambda: residual_stream(model, ids, a.layer))
    print(f"{name}, batch {a.batch} x {a.ctx} tokens, {torch.get_num_threads()} threads")
    print(f"{'forward':<44}{'ms':>8}{'tokens/s':>10}{'speed-up':>10}")
    print(f"{'full model':<44}{full * 1e3:>8.0f}{n / full:>10.0f}{1:>9.1f}x")
    print(f"{f'up to layer {a.layer} (extraction)':<44}{part * 1e3:>8.0f}{n / part:>10.0f}{full / part:>9.1f}x")

    d = model.config.hidden_size
    src = SyntheticSource(SyntheticConfig(d_in=d, n_features=2048, mean_active=16))
    with tempfile.TemporaryDirectory() as tmp:
        rss = {}
        for shards in (a.shards, 4 * a.shards):
            path = Path(tmp) / f"acts-{shards}"
            write_activations(path, (src.sample(65536, j) for j in range(shards)), d, src.describe(), 65536)
            rss[shards] = peak_rss_mb(path)
        print(f"\ntraining peak RSS (d_in={d}, N=4096, 40 steps of 4096 tokens, shards of 65,536 tokens)")
        for shards, mb in rss.items():
            gb = shards * 65536 * d * 4 / 2**30
            print(f"  {shards:>3} shards ({gb:.2f} GiB on disk): {mb:>7.0f} MiB   ratio {mb / rss[a.shards]:.2f}x")


if __name__ == "__main__":
    main()
