"""Interpretability against importance rank and granularity band.

Input per SAE: the auto-interp scores of its sampled latents (interp/study.py) and the LLM-free proxies of
every latent (proxies.py). The studied SAEs hold their latents in rank order (a vanilla SAE permuted by
E[z²], a Matryoshka SAE by construction), so latent i has rank i + 1 and its band is the granularity band
[G_{j-1}, G_j) it falls in. Means carry a 95% bootstrap interval over the sampled latents.

`difference` compares two sets of scores with an interval; the study's findings (study/findings.py) use it
for the paper's two interpretability findings, decided only by a judge that passes its own check
(simulation at least JUDGE_MIN on latents that fire on one known word, explanation given): the run's judge,
else the lexical one (interp/lexical.py), else "undecided" whatever the intervals.
"""

from __future__ import annotations

import numpy as np

from ..analysis.intervals import interval

JUDGE_MIN = 0.5  # a judge that cannot simulate a one-word rule this well cannot rank explanations


def _mean_ci(values, n_boot: int, seed: int) -> dict:
    v = np.asarray([x for x in values if x is not None], np.float64)
    if not len(v):
        return {"mean": None, "ci": None, "n": 0}
    ci = interval(v[np.random.default_rng(seed).integers(0, len(v), (n_boot, len(v)))].mean(1)) if len(v) > 1 else None
    return {"mean": float(v.mean()), "ci": ci, "n": int(len(v))}


def bands(scores: list[dict], proxies: dict, edges: list[int], n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Per band of ranks [lo, hi): mean simulation and detection AUROC of the sampled latents, mean proxies of
    every live latent."""
    out, lo = [], 0
    live = np.asarray(proxies["live"], bool)
    for hi in edges:
        inside = [s for s in scores if lo <= s["latent"] < hi]
        sl = slice(lo, hi)
        ent, agr = np.asarray(proxies["token_entropy"][sl], float), np.asarray(proxies["lens_agreement"][sl], float)
        m = live[sl]
        out.append(
            {
                "band": f"{lo + 1}-{hi}",
                "lo": lo,
                "hi": hi,
                "simulation": _mean_ci([s["simulation"] for s in inside], n_boot, seed),
                "detection_auroc": _mean_ci([s["detection_auroc"] for s in inside], n_boot, seed),
                "malformed": int(sum(s["malformed"] for s in inside)),
                "errors": int(sum(s["error"] is not None for s in inside)),
                "live": int(m.sum()),
                "token_entropy": float(ent[m].mean()) if m.any() else None,
                "lens_agreement": float(np.nanmean(agr[m])) if m.any() and not np.isnan(agr[m]).all() else None,
            }
        )
        lo = hi
    return out


def difference(a: list, b: list, higher_better: bool = True, n_boot: int = 1000, seed: int = 0) -> dict | None:
    """Mean of a minus mean of b (independent samples of latents, each resampled), its interval, and whether
    a is better for certain (the interval excludes the reverse)."""
    a = np.asarray([x for x in a if x is not None], np.float64)
    b = np.asarray([x for x in b if x is not None], np.float64)
    if len(a) < 2 or len(b) < 2:
        return None
    rng = np.random.default_rng(seed)
    reps = a[rng.integers(0, len(a), (n_boot, len(a)))].mean(1) - b[rng.integers(0, len(b), (n_boot, len(b)))].mean(1)
    ci = interval(reps)
    return {
        "a": float(a.mean()),
        "b": float(b.mean()),
        "diff": float(a.mean() - b.mean()),
        "ci": ci,
        "n": [int(len(a)), int(len(b))],
        "certain": ci[0] > 0 if higher_better else ci[1] < 0,
        "worse_certain": ci[1] < 0 if higher_better else ci[0] > 0,
    }
