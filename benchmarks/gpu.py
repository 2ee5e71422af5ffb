"""The GPU checks of issue 22 that compare.py does not make, and the one table of benchmarks/gpu.sh.

    python benchmarks/gpu.py curve [--d 2304 --N 65536 --k 256 --rows 262144]   one-pass curve vs one FVU pass
    python benchmarks/gpu.py recaptured [--N 65536 --k 256]   recaptured LM loss at five G on the embedded model
    python benchmarks/gpu.py table OUT_DIR                    the table from OUT_DIR's logs (gpu.sh writes them)

Each check prints one `GPU {...}` JSON line; `table` gathers them with compare.py's lines and the smoke run's
timings.json. Random SAEs on random rows time the evaluation's kernels (their speed does not depend on the data).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch


def timed(fn, device, repeats=3):
    """Best of `repeats` after one warm-up, synchronised."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize(device) if str(device).startswith("cuda") else None
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize(device) if str(device).startswith("cuda") else None
        best = min(best, time.perf_counter() - t)
    return best


def random_sae(d, N, k, device, kernel):
    from progsae import SAE, SAEConfig

    g = torch.Generator().manual_seed(0)
    sae = SAE(SAEConfig(d, N, k)).init_tied(g, torch.zeros(d)).to(device)
    sae.kernel = kernel
    return sae


def curve(a) -> dict:
    from progsae.analysis import ProgressiveEval

    x = torch.randn(a.rows, a.d, device=a.device)
    out = {"check": "curve", "d": a.d, "N": a.N, "k": a.k, "rows": a.rows}
    for kernel in ("csr", "gather", "dense"):
        sae = random_sae(a.d, a.N, a.k, a.device, kernel)

        def one_pass(sae=sae):
            acc = ProgressiveEval(sae)
            for b in x.split(8192):
                acc.update(b)
            acc.result()

        def fvu_pass(sae=sae):  # the reference cost: one encode + decode at G = N
            with torch.no_grad():
                for b in x.split(8192):
                    (b - sae(b)).pow(2).sum()

        out[f"curve_s_{kernel}"], out[f"fvu_pass_s_{kernel}"] = timed(one_pass, a.device), timed(fvu_pass, a.device)
    return out


def recaptured(a) -> dict:
    from progsae.analysis.lm_eval import LMSplice, recaptured_loss, special_token_ids
    from progsae.data.corpus import load_corpus, pack_contexts
    from progsae.data.lm import load_lm

    model, tok, name = load_lm(a.model, device=a.device)
    d = model.config.hidden_size
    ids = pack_contexts(load_corpus(), tok, 128, a.contexts).to(a.device)
    sae = random_sae(d, a.N, a.k, a.device, "csr")
    splice = LMSplice(model, a.layer, ids, special_token_ids(tok))
    Gs = [a.N // 16, a.N // 8, a.N // 4, a.N // 2, a.N]
    t = time.perf_counter()
    recaptured_loss(splice, {"random": sae}, Gs, progress=False)
    torch.cuda.synchronize() if a.device.startswith("cuda") else None
    return {"check": "recaptured", "model": name, "d": d, "N": a.N, "k": a.k, "contexts": a.contexts, "G": Gs,
            "seconds": time.perf_counter() - t}  # fmt: skip


def table(out: Path) -> None:
    rows = []
    compare = (out / "compare.log").read_text() if (out / "compare.log").is_file() else ""
    rows += [line for line in compare.splitlines() if re.match(r"(progsae|sparsify|sae-lens|d=|the four|step )", line)]
    for name in ("curve.log", "recaptured.log"):
        for line in (out / name).read_text().splitlines() if (out / name).is_file() else []:
            if line.startswith("GPU "):
                got = json.loads(line[4:])
                rows.append(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in got.items()))
    timings = out / "smoke" / "timings.json"
    if timings.is_file():
        t = json.loads(timings.read_text())
        rows.append("smoke run (paper-shaped, embedded model): " + ", ".join(
            f"{k} {v:.0f} s" for k, v in t.items() if isinstance(v, (int, float))))  # fmt: skip
    print("\n".join(rows) if rows else "no results under " + str(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("check", choices=("curve", "recaptured", "table"))
    p.add_argument("out", nargs="?", default=".")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--d", type=int, default=2304)
    p.add_argument("--N", type=int, default=65536)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--rows", type=int, default=262_144)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--contexts", type=int, default=64)
    a = p.parse_args()
    if a.check == "table":
        return table(Path(a.out))
    print("GPU " + json.dumps((curve if a.check == "curve" else recaptured)(a)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
