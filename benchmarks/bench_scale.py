"""Past one process, side by side in one run (interleaved rounds, each contender in its own process):

1. data-parallel: the same training on cached activations, 1 process against torchrun with 2 gloo ranks;
2. training straight from the model (SmolLM2-135M layer L on the fly) against training from an
   extraction of the same model and layer on disk;
3. extraction itself, 1 process against torchrun with 2 gloo ranks writing disjoint shards.

Reported: training tokens/s (the SAE's own clock: steps plus, for the stream, the model's forward
passes; process start-up excluded), extraction tokens/s (extract's own clock, from its first forward
to the manifest: model loading excluded) and peak RSS of each process (VmHWM of every rank; the largest).

    python benchmarks/bench_scale.py [--rounds 3] [--steps 12] [--d-sae 4096] [--k 32] [--batch 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# the SAE's own clock and this process's peak RSS, printed by every rank after `progsae train`
CHILD = """
import json, sys
from progsae import dist
from progsae.cli import main
code = main(sys.argv[1:])
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print("BENCH " + json.dumps({"rank": dist.rank(), "rss_mb": hwm, "code": code}), flush=True)
"""


def run(cmd: list[str], out: Path, threads: int) -> dict:
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    ranks = [json.loads(m) for m in re.findall(r"BENCH (\{.*?\})", r.stdout)]  # the ranks' lines may interleave
    if r.returncode or not ranks or any(x["code"] for x in ranks):
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    rss = max(x["rss_mb"] for x in ranks)
    if cmd[cmd.index("-c") + 2] == "extract":
        return {"tokens_s": float(re.search(r"\(([\d,]+) tokens/s\)", r.stdout)[1].replace(",", "")), "rss_mb": rss}
    training = json.loads((out / "cfg.json").read_text())["metadata"]["progsae"]["training"]
    return {"tokens_s": training["tokens"] / training["seconds"], "rss_mb": rss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--buffer", type=int, default=32768, help="buffer_tokens of the stream")
    p.add_argument("--extract-tokens", type=int, default=65536, help="tokens of the extraction contenders")
    a = p.parse_args()

    tokens = a.steps * a.batch
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    acts = work / "acts"
    lm = ["--model", a.model, "--layer", str(a.layer)]
    subprocess.run([sys.executable, "-m", "progsae", "extract", *lm, "--tokens", str(tokens), "--out", str(acts)],
                   check=True, capture_output=True)  # fmt: skip
    sae = ["--d-sae", str(a.d_sae), "--k", str(a.k), "--batch-size", str(a.batch), "--tokens", str(tokens)]
    one = [sys.executable, "-c", CHILD]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python",
           sys.executable, "-c", CHILD]  # fmt: skip
    # shards are the unit dealt over the ranks: 16 of them, so 2 ranks get equal work
    ex = ["extract", *lm, "--tokens", str(a.extract_tokens), "--shard-tokens", str(a.extract_tokens // 16), "--out"]
    contenders = {
        "cached, 1 process": lambda o: [*one, "train", str(acts), *sae, "--out", str(o)],
        "cached, torchrun 2 gloo ranks": lambda o: [*two, "train", str(acts), *sae, "--out", str(o)],
        "from the model (stream), 1 process": lambda o: [*one, "train", *lm, "--buffer-tokens", str(a.buffer), *sae, "--out", str(o)],
        "extract, 1 process": lambda o: [*one, *ex, str(o)],
        "extract, torchrun 2 gloo ranks": lambda o: [*two, *ex, str(o)],
    }
    got: dict[str, list[dict]] = {name: [] for name in contenders}
    for r in range(a.rounds):
        for i, (name, cmd) in enumerate(contenders.items()):  # A, B, C, A, B, C, ...
            out = work / f"r{r}-{i}"
            threads = max(1, (os.cpu_count() or 2) // (2 if "torchrun" in name else 1))  # the cores, shared by the ranks
            got[name].append(run(cmd(out), out, threads))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{cpu}, {os.cpu_count()} cores; SAE N={a.d_sae} k={a.k} batch {a.batch}, {a.steps} steps; "
          f"{a.model} layer {a.layer}; medians of {a.rounds} interleaved rounds")  # fmt: skip
    print(f"{'contender':<38}{'tokens/s':>10}{'vs 1 process':>14}{'peak RSS MB':>13}")
    for name, xs in got.items():
        group = "extract" if name.startswith("extract") else "cached"  # each against its own 1-process run
        base = statistics.median(x["tokens_s"] for x in got[f"{group}, 1 process"])
        t = statistics.median(x["tokens_s"] for x in xs)
        rss = statistics.median(x["rss_mb"] for x in xs)
        print(f"{name:<38}{t:>10.0f}{t / base:>13.2f}x{rss:>13.0f}")


if __name__ == "__main__":
    main()
