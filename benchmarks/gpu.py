"""The GPU checks of issue 22 that compare.py does not make, and the one table of benchmarks/gpu.sh.

    python benchmarks/gpu.py curve [--d 2304 --N 65536 --k 256 --rows 262144]   one-pass curve vs one FVU pass
    python benchmarks/gpu.py recaptured [--N 65536 --k 256]   recaptured LM loss at five G on the embedded model
    python benchmarks/gpu.py compile [--d 576 --N 16384 --k 64 --batch 4096]   torch.compile against eager
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


def compile_check(a) -> dict:
    """torch.compile where a step could use it, against the eager code it would replace, interleaved: the loss's
    forward and backward (`losses.sae_loss`: its sparse autograd functions are graph breaks, the rest is fused), and
    the decoder's update after the backward (`project_decoder_grad` then `normalize_decoder`, in place; compiled as
    the functional twin, since Inductor is asked to fuse it)."""
    from progsae.losses import sae_loss

    sae, x = random_sae(a.d, a.N, a.k, a.device, "csr"), torch.randn(a.batch, a.d, device=a.device)

    def step(loss_fn):
        loss_fn(sae, x, kernel="csr").loss.backward()
        sae.zero_grad(set_to_none=True)

    def update(g, W):  # what `SAE.project_decoder_grad` and `SAE.normalize_decoder` compute
        return g - W * (g * W).sum(1, keepdim=True), W / W.norm(dim=1, keepdim=True).clamp_min(1e-8)

    W, g = sae.W_dec.detach().clone(), torch.randn_like(sae.W_dec)

    def in_place():  # the trainer's own update
        sae.W_dec.grad = g
        sae.project_decoder_grad()
        sae.normalize_decoder()

    out = {"check": "compile", "d": a.d, "N": a.N, "k": a.k, "batch": a.batch}
    compiled_loss, compiled_update = torch.compile(sae_loss), torch.compile(update)
    t = time.perf_counter()
    step(compiled_loss)
    compiled_update(g, W)
    out["compile_s"] = time.perf_counter() - t
    runs = {"loss_eager_s": lambda: step(sae_loss), "loss_compiled_s": lambda: step(compiled_loss),
            "update_in_place_s": in_place, "update_compiled_s": lambda: compiled_update(g, W)}  # fmt: skip
    times = {key: [] for key in runs}
    for _ in range(a.rounds):  # interleaved: A, B, C, D, A, B, ...
        for key, fn in runs.items():
            times[key].append(timed(fn, a.device, repeats=1))
    return out | {key: sorted(v)[len(v) // 2] for key, v in times.items()}  # medians


def table(out: Path) -> None:
    rows = []
    compare = (out / "compare.log").read_text() if (out / "compare.log").is_file() else ""
    rows += [line for line in compare.splitlines() if re.match(r"(progsae|sparsify|sae-lens|d=|the four|step )", line)]
    for name in ("curve.log", "recaptured.log", "compile.log"):
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
    p.add_argument("check", choices=("curve", "recaptured", "compile", "table"))
    p.add_argument("out", nargs="?", default=".")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--d", type=int, default=2304)
    p.add_argument("--N", type=int, default=65536)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--rows", type=int, default=262_144)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--contexts", type=int, default=64)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args()
    if a.check == "table":
        return table(Path(a.out))
    check = {"curve": curve, "recaptured": recaptured, "compile": compile_check}[a.check]
    print("GPU " + json.dumps(check(a)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
