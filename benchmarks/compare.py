"""progsae's training step against the anchors' own, side by side in one run (issue 12).

Each contender runs in a process of its own, interleaved (A, B, C, A, B, C, ...), on the same workload: a
fixed random batch [B, d] (a step's speed does not depend on the data), Adam, TopK with k of N latents.
The anchors run from a virtualenv of their own (`--setup` makes it: torch pinned to 2.13.0 so no CUDA
build is pulled, then eai-sparsify, sae-lens, dictionary-learning; never progsae's dependencies), each
its own training step: sparsify's trainer loop body, SAELens' `training_forward_pass` with Adam,
dictionary_learning's `TopKTrainer.update`.

progsae runs in fp32 by each kernel path forced (csr, gather, dense), and with `precision: auto` and `kernel: auto`
(bf16 where this CPU's bf16 GEMM is 1.5x its fp32 one; the path timed fastest at start-up, shown in brackets).
Reported per shape: median tokens/s over the rounds, the ratio to the fastest anchor, the step as a
multiple of one fp32 encoder GEMM ([B, d] @ [d, N], timed in its own process in the same rounds; bf16 too),
and peak RSS.

    python benchmarks/compare.py --setup                 # once: benchmarks/.anchors
    python benchmarks/compare.py [--rounds 3] [--shapes 576:16384:64,2304:16384:64]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ANCHORS = HERE / ".anchors"
TORCH = "torch==2.13.0"

# every child: build the step, warm up, time `steps` steps one by one, print the median and this process's peak
# memory (RSS on the CPU; on a GPU the device's peak allocation)
COMMON = """
import json, sys, time, torch
d, N, k, B, steps, warmup = (int(v) for v in sys.argv[1:7])
dev = sys.argv[7]
cuda = dev.startswith("cuda")
torch.manual_seed(0)
x = torch.randn(B, d, device=dev)
def sync():
    if cuda:
        torch.cuda.synchronize()
def report(step, precision="fp32", kernel="-"):
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ts = []
    for _ in range(steps):
        sync(); t = time.perf_counter(); step(); sync(); ts.append(time.perf_counter() - t)
    if cuda:
        hwm = torch.cuda.max_memory_allocated() / 2**20
    else:
        hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
    print("BENCH " + json.dumps({"seconds": sorted(ts)[len(ts) // 2], "rss_mb": hwm, "precision": precision,
                                 "kernel": kernel}),
          flush=True)
"""

CHILDREN = {
    "gemm fp32": """
W = torch.randn(N, d, device=dev).t()
report(lambda: x @ W)
""",
    "gemm bf16": """
xb, W = x.bfloat16(), torch.randn(N, d, device=dev).bfloat16().t()
report(lambda: xb @ W)
""",
    # the floor under a step beyond its GEMM: the four O(B k d) products of a TopK step at a random code's
    # pattern (decode, value gradients, W_dec and W_enc gradients: k-row gathers and scatters, memory traffic)
    "gathers": """
from progsae.products import sparse
W_dec, G = torch.randn(N, d, device=dev), torch.randn(B, d, device=dev)
indices = torch.rand(B, N, device=dev).topk(k, dim=1).indices.sort(1).values
S = sparse("csr", torch.randn(B, k, device=dev), indices, N)
def step():
    S.mm(W_dec)
    S.sampled(G, W_dec)
    S.tmm(G)
    S.tmm(x)
report(step)
""",
    **{f"progsae {kind} {precision} {kernel}": f"""
from progsae import TrainConfig, Trainer
class Fixed:
    d_in = d
    def batches(self, batch_size, seed, start=0):
        while True:
            yield x
kw = dict(matryoshka=[N // 4, N // 2, N]) if "{kind}" == "matryoshka" else dict()
tr = Trainer(TrainConfig(d_sae=N, k=k, batch_size=B, tokens=B * 10**6, warmup_steps=0, precision="{precision}",
                         kernel="{kernel}", device=dev, **kw), Fixed())
report(lambda: tr.train_step(x), tr.precision, tr.kernel)
""" for kind, precision, kernel in (
        *(("topk", "fp32", kernel) for kernel in ("csr", "gather", "dense")), ("topk", "auto", "auto"),
        ("matryoshka", "fp32", "csr"), ("matryoshka", "auto", "auto"))},  # each path forced, then auto's pick
    # sparsify's trainer step (trainer.py): forward, fvu backward, the decoder-parallel gradient removed,
    # Adam, decoder rows renormalised
    "sparsify topk": """
from sparsify import SparseCoder, SparseCoderConfig
sae = SparseCoder(d, SparseCoderConfig(num_latents=N, k=k), device=dev)
opt = torch.optim.Adam(sae.parameters(), lr=2e-4)
def step():
    out = sae(x)
    out.fvu.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    opt.zero_grad()
    sae.set_decoder_norm_to_unit_norm()
report(step)
""",
    # SAELens' training SAE: its training forward pass (TopK aux loss included, no dead latents yet) and Adam
    "sae-lens topk": """
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=N, k=k, device=dev))
opt = torch.optim.Adam(sae.parameters(), lr=2e-4)
inp = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False)
def step():
    sae.training_forward_pass(inp).loss.backward()
    opt.step()
    opt.zero_grad()
report(step)
""",
    # dictionary_learning's TopKTrainer.update (step > 0: the b_dec median is step 0's)
    "dictionary_learning topk": """
from dictionary_learning.trainers.top_k import TopKTrainer
tr = TopKTrainer(steps=10**6, activation_dim=d, dict_size=N, k=k, layer=0, lm_name="bench", device=dev)
n = iter(range(1, 10**9))
report(lambda: tr.update(next(n), x))
""",
}
ANCHOR_NAMES = ("sparsify topk", "sae-lens topk", "dictionary_learning topk")


def python_for(name: str, anchors_python: str | None = None) -> str:
    if name not in ANCHOR_NAMES:
        return sys.executable
    return anchors_python or str(ANCHORS / "bin" / "python")


def setup() -> None:
    """The anchors' virtualenv, torch pinned (a constraints file) so pip never swaps in a CUDA build."""
    subprocess.run([sys.executable, "-m", "venv", str(ANCHORS)], check=True)
    pip = [str(ANCHORS / "bin" / "pip"), "install", "-q"]
    subprocess.run([*pip, TORCH], check=True)
    (ANCHORS / "constraints.txt").write_text(TORCH + "\n")
    subprocess.run([*pip, "-c", str(ANCHORS / "constraints.txt"), "eai-sparsify", "sae-lens", "dictionary-learning"],
                   check=True)  # fmt: skip
    # dictionary_learning pulls torchvision, whose `nms` op breaks its import against this torch
    subprocess.run([str(ANCHORS / "bin" / "pip"), "uninstall", "-y", "-q", "torchvision"], check=True)


def run(name: str, shape: tuple[int, int, int], a) -> dict | None:
    d, N, k = shape
    cmd = [python_for(name, a.anchors_python), "-c", COMMON + CHILDREN[name],
           *map(str, (d, N, k, a.batch, a.steps, a.warmup, a.device))]  # fmt: skip
    threads = os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    got = re.search(r"BENCH (\{.*\})", r.stdout)
    if r.returncode or not got:
        print(f"  {name} at d={d} N={N} k={k} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
        return None
    return json.loads(got[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", action="store_true", help="create benchmarks/.anchors and exit")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (fresh memory faults in)")
    p.add_argument("--only", help="comma-separated contenders (default all): " + ", ".join(CHILDREN))
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (memory is then the GPU's peak allocation)")
    p.add_argument("--anchors-python", help="the anchors' interpreter (default benchmarks/.anchors; on a GPU machine "
                   "the one where sparsify and sae-lens are installed)")  # fmt: skip
    p.add_argument("--shapes", default="576:16384:64", help="d:N:k,... (the issue's grid: d 576, 2304; N 16384, "
                   "65536; k 32, 64, 256)")  # fmt: skip
    a = p.parse_args()
    if a.setup:
        setup()
        return
    if not a.anchors_python and not (ANCHORS / "bin" / "python").is_file():
        sys.exit("progsae: error: no anchors' virtualenv; run `python benchmarks/compare.py --setup` first")
    threads = os.cpu_count() or 1
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    if a.device.startswith("cuda"):
        import torch

        cpu = f"{torch.cuda.get_device_name()} (host: {cpu})"
    names = [n for n in CHILDREN if not a.only or n in a.only.split(",") or n.startswith("gemm") or n == "gathers"]
    print(f"{cpu}, {threads} cores; batch {a.batch}; medians of {a.rounds} interleaved rounds, {a.steps} steps each "
          f"after {a.warmup} warm-up")  # fmt: skip
    for spec in a.shapes.split(","):
        shape = tuple(int(v) for v in spec.split(":"))
        got: dict[str, list[dict]] = {name: [] for name in names}
        for _ in range(a.rounds):
            for name in names:  # A, B, C, A, B, C, ...
                res = run(name, shape, a)
                if res is not None:
                    got[name].append(res)
        med = {n: statistics.median(r["seconds"] for r in rs) for n, rs in got.items() if rs}
        rss = {n: statistics.median(r["rss_mb"] for r in rs) for n, rs in got.items() if rs}
        d, N, k = shape
        flops = 2 * a.batch * d * N
        print(f"\nd={d} N={N} k={k}: fp32 GEMM {flops / med['gemm fp32'] / 1e9:.0f} GFLOP/s"
              + (f", bf16 GEMM {flops / med['gemm bf16'] / 1e9:.0f} GFLOP/s" if "gemm bf16" in med else ""))  # fmt: skip
        best = min((med[n] for n in ANCHOR_NAMES if n in med), default=None)
        print(f"the four O(B k d) products of a step (gathers, scatters): {med['gathers'] * 1e3:.0f} ms"
              f" = {med['gathers'] / med['gemm fp32']:.2f} fp32 GEMMs")  # fmt: skip
        print(f"{'step':<36}{'tokens/s':>10}{'vs best anchor':>16}{'fp32 GEMMs':>12}{'GEMMs (own)':>13}"
              f"{'gathers/rest':>14}{'peak MB':>13}")  # fmt: skip
        for name in names:
            if name.startswith("gemm") or name == "gathers" or name not in med:
                continue
            vs = f"{best / med[name]:.2f}x" if best else "-"
            own = got[name][0]["precision"]  # the precision the step ran in, against that precision's GEMM
            rest = med[name] - med["gemm " + own]  # beyond the encoder GEMM: the gathers' share of it (progsae)
            floor = f"{med['gathers'] / rest:.0%}" if name.startswith("progsae") and rest > 0 else "-"
            label = name + (f" ({got[name][0]['kernel']})" if name.endswith("auto") else "")  # auto's pick
            print(f"{label:<36}{a.batch / med[name]:>10.0f}{vs:>16}{med[name] / med['gemm fp32']:>11.2f}x"
                  f"{med[name] / med['gemm ' + own]:>8.2f}x {own:<4}{floor:>14}{rss[name]:>13.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
