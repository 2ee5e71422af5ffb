"""Shrinking the vanilla SAE (the paper's first open question): each method of `analysis.shrink` against the native
SAE of the same size, at G = N/8, N/4, N/2, with the tokens each spent, and the finding.

    results["shrink"] = {"base", "N", "methods", "rows": [per G: {"G", "k", "native": {...}, "methods":
                         {method: {...}}}]}
Each entry: family, FVU (prefix mode at its own size; mean over seeds, 95% interval), SAELens' ce_loss_score where
the run measured LM loss, the per-seed FVUs, tokens (activation rows it read: a native SAE's training tokens; a
shrunk SAE's rows per pass times passes plus its fine-tuning tokens) and `gap_closed`: the share of truncate's
FVU gap to the native SAE this method closes, (FVU_truncate - FVU_method) / (FVU_truncate - FVU_native), per seed
(shrunk and native SAEs of one seed paired) with its mean and the interval across seeds. Every method starts from
the SAE sorted by importance, whose statistics pass (stats_tokens) is shared by all and counted in none.
"""

from __future__ import annotations

import numpy as np

from ..analysis.intervals import seed_interval
from ..analysis.shrink import tokens_spent
from .findings import _num

LM_KEY = "ce_loss_score"


def shrink_results(agg, plan, provenance: dict[str, dict], sae_tokens: int) -> dict | None:
    """results["shrink"] (module doc) from the aggregate and each shrunk SAE's provenance (name -> cfg.progsae
    ["shrink"]); None when the run shrank nothing."""
    shrunk = [plan[n] for n in plan.names("shrunk")]
    if not shrunk:
        return None
    fams = plan.families()
    methods = list(dict.fromkeys(sp.method for sp in shrunk))
    read = [p for p in provenance.values() if p["passes"]]  # rows each solve read, fine-tuning tokens: as done
    tuned = [p["tuned_tokens"] for p in provenance.values() if p["tuned_tokens"]]
    out = {"base": plan[shrunk[0].base].family, "N": plan.N, "methods": methods, "rows": [],
           "rows_read": int(np.mean([p["rows"] for p in read])) if read else 0,
           "distil_tokens": int(np.mean(tuned)) if tuned else 0}  # fmt: skip

    def entry(fam: str, G: int, tokens: list[int]) -> dict | None:
        f, lm = agg.family(fam, "fvu", "prefix", G), agg.family(fam, LM_KEY, "prefix", G)
        if f is None:  # a native SAE not tabled at its own size (a grid without it)
            return None
        return {"family": fam, "fvu": f["mean"], "fvu_ci": f["ci"], "fvu_seeds": f["seeds"],
                LM_KEY: lm and lm["mean"], f"{LM_KEY}_ci": lm and lm["ci"], "tokens": int(np.mean(tokens))}  # fmt: skip

    for G in sorted({sp.d_sae for sp in shrunk}):
        native = next((sp.family for sp in plan.specs if sp.role == "native" and sp.d_sae == G), None)
        row = {"G": G, "k": next(sp.k for sp in shrunk if sp.d_sae == G), "methods": {},
               "native": entry(native, G, [sae_tokens]) if native else None}  # fmt: skip
        for m in methods:
            fam = next(sp.family for sp in shrunk if sp.d_sae == G and sp.method == m)
            row["methods"][m] = entry(fam, G, [tokens_spent(provenance[n]) for n in fams[fam]])
        trunc, nat = row["methods"].get("truncate"), row["native"]
        for e in row["methods"].values():
            if trunc and nat:
                shares = [(t - v) / (t - n) if t != n else None
                          for t, v, n in zip(trunc["fvu_seeds"], e["fvu_seeds"], nat["fvu_seeds"], strict=True)]  # fmt: skip
                ok = [s for s in shares if s is not None]
                e["gap_closed_seeds"], e["gap_closed"] = shares, float(np.mean(ok)) if ok else None
                e["gap_closed_ci"] = seed_interval(ok) if len(ok) == len(shares) else None
        out["rows"].append(row)
    return out


def shrink_finding(sr: dict, sae_tokens: int) -> dict:
    """The answer this run gives to the paper's open question: how much of the truncate-to-native gap each method
    closes, at what share of a native SAE's tokens."""
    parts = []
    for row in sr["rows"]:
        cells = []
        for m, e in row["methods"].items():
            if m == "truncate" or e.get("gap_closed") is None:
                continue
            ci = e["gap_closed_ci"]
            cells.append(f"{m} {_num(e['fvu'])} ({e['gap_closed']:.0%} of the gap"
                         + (f", [{ci[0]:.0%}, {ci[1]:.0%}]" if ci else "") + f"; {e['tokens'] / sae_tokens:.0%} of the tokens)")  # fmt: skip
        nat = row["native"]
        head = f"G={row['G']} (k={row['k']}): truncate {_num(row['methods']['truncate']['fvu'])}, native " + (
            _num(nat["fvu"]) if nat else "–"
        )
        parts.append(head + (": " + ", ".join(cells) if cells else ""))
    best = []
    for r in sr["rows"]:
        shares = {m: e["gap_closed"] for m, e in r["methods"].items() if m != "truncate" and e.get("gap_closed") is not None}
        if shares:
            m = max(shares, key=shares.get)
            best.append(f"{m} at G={r['G']} ({shares[m]:.0%})")
    if best:
        sure = [m for m in sr["methods"] if m != "truncate" and all(
            (r["methods"][m].get("gap_closed_ci") or [0])[0] > 0 for r in sr["rows"])]  # fmt: skip
        verdict = (f"answered (largest share of the gap closed: {', '.join(best)}); above truncate for certain at every G: "
                   f"{', '.join(sure) or 'none'}")  # fmt: skip
    else:
        verdict = "undecided (no native SAE to compare with)"
    return {
        "paper": "Open question 1: efficient methods to recombine or reverse feature splitting when distilling a "
                 "large SAE into a small one (left open)",
        "ours": f"FVU of {sr['base']} shrunk to G latents by each method, against truncation and a native G-latent "
                f"SAE (tokens: activation rows read, against a native SAE's {sae_tokens:,} training tokens): "
                + ". ".join(parts),
        "verdict": verdict,
        "rule": "share of the gap = (FVU_truncate - FVU_method) / (FVU_truncate - FVU_native), paired by seed, mean "
                "over seeds with the interval across seeds; certain when that interval lies above 0",
    }  # fmt: skip
