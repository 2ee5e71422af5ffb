"""Known answers of a run whose held-out activations carry their truth (`truth` in eval/NAME.json, from
analysis/recovery.py): each family's metrics at every G as the mean over seeds with a 95% interval across
seeds, and three findings with the project's verdict rule.

    parents     does a Matryoshka prefix recover more parents (features with children) than the permuted
                vanilla prefix at the same G?  (Bussmann et al. 2025: nested losses keep parents in the inner
                prefix; a flat SAE absorbs them into their children)
    frequent    do the first G latents of a permuted SAE hold the most frequent true features (the top decile
                by firing frequency) more than the same SAE in its training order?
    absorption  does absorption fall with nesting (Matryoshka against the permuted vanilla SAE, both modes)?
Comparisons are paired by seed (the SAEs of one seed saw the same data): the interval is the seed bootstrap
of the per-seed differences; a G counts as won when it excludes the reverse (no interval with one seed).
"""

from __future__ import annotations

import numpy as np

from ..analysis.intervals import seed_interval
from ..sae import MODES
from .findings import _cmp, _modes, _verdict

KEYS = ("mcc", "uniqueness", "recovered", "recovered_0.8", "recovered_parents", "recovered_top_decile",
        *(f"{m}_{mode}" for m in ("precision", "recall", "f1", "absorption") for mode in MODES))  # fmt: skip
LISTS = ("recovered_depth", "recovered_decile")
# the seed bootstrap of 2-4 paired differences: its interval is their range, so "certain" means every seed agrees
FEW_SEEDS = " (with fewer than 5 seeds the interval is the per-seed differences' range: every seed must agree)"  # a share per depth / per frequency decile


def _get(row: dict, key: str):
    if key == "recovered_top_decile":  # the most frequent tenth of the true features
        return row["recovered_decile"][0] if "recovered_decile" in row else None
    return row.get(key)


def known_answers(evals: dict[str, dict], families: dict[str, list[str]], seed: int = 0) -> dict | None:
    """{"n_features", "depth_counts", "has_codes", "families": fam -> {"table", "curve"}} (None without truth).
    A table row: G, each of KEYS with `_ci` (the interval) and `_seeds` (the per-seed values), LISTS averaged."""
    truths = {n: e["truth"] for n, e in evals.items() if e.get("truth")}
    if not truths:
        return None
    first = next(iter(truths.values()))
    out = {k: first[k] for k in ("n_features", "depth_counts", "has_codes", "thresholds")}
    out["families"] = {}
    for fam, names in families.items():
        if not all(n in truths for n in names):
            continue
        tables = [truths[n]["table"] for n in names]
        rows = []
        for i, r in enumerate(tables[0]):
            row = {"G": r["G"]}
            for key in KEYS:
                vals = [_get(t[i], key) for t in tables]
                ok = all(v is not None for v in vals)
                row[key] = float(np.mean(vals)) if ok else None
                row[f"{key}_ci"] = seed_interval(vals, seed) if ok else None
                row[f"{key}_seeds"] = vals if ok else None
            for key in LISTS:
                if key in r:
                    row[key] = np.mean([t[i][key] for t in tables], 0).tolist()
            rows.append(row)
        curve = np.mean([truths[n]["curve"]["recovered"] for n in names], 0).tolist()
        out["families"][fam] = {"table": rows, "curve": {"recovered": curve}}
    return out


def _compare(ka: dict, fa: str, fb: str, key: str, G: int, higher: bool) -> dict | None:
    """Family a against b at G, paired by seed."""
    rows = [next((r for r in ka["families"][f]["table"] if r["G"] == G), None) for f in (fa, fb)]
    if rows[0] is None or rows[1] is None or rows[0][f"{key}_seeds"] is None or rows[1][f"{key}_seeds"] is None:
        return None
    a, b = np.asarray(rows[0][f"{key}_seeds"]), np.asarray(rows[1][f"{key}_seeds"])
    n = min(len(a), len(b))
    d = a[:n] - b[:n]
    ci = seed_interval(list(d)) if n > 1 else None
    s = 1 if higher else -1
    return {"G": G, "a": float(a.mean()), "b": float(b.mean()), "diff": float(d.mean()), "ci": ci,
            "better": s * d.mean() > 0, "certain": ci is not None and (ci[0] > 0 if higher else ci[1] < 0),
            "worse_certain": ci is not None and (ci[1] < 0 if higher else ci[0] > 0)}  # fmt: skip


def _decide(cmps: list[dict]) -> str:
    return _verdict(cmps) if cmps else "undecided (nothing compared)"


def known_findings(ka: dict, plan, grid: list[int]) -> list[dict]:
    """The three known-answer findings (module doc), each with its verdict and rule."""
    N, out = plan.N, []
    perm, vanilla = plan.vanilla("e_z2"), plan.vanilla()
    fam = {n: plan[n].family for n in (perm, vanilla)}
    variants = {
        plan[n].family: [g for g in (plan[n].granularities or grid) if g < N and g in grid]
        for n in plan.names("matryoshka") if plan[n].seed == 0
    }  # fmt: skip
    fams = ka["families"]
    if ka["depth_counts"][1:] and fam[perm] in fams:
        parts, cmps = [], []
        for m, Gs in variants.items():
            cs = [c for G in Gs if m in fams and (c := _compare(ka, m, fam[perm], "recovered_parents", G, True))]
            cmps += cs
            parts.append(f"{m} vs {fam[perm]}: " + "; ".join(_cmp(c) for c in cs))
        out.append({
            "paper": "Matryoshka SAEs keep parent features in their inner latents; flat SAEs absorb parents into "
                     "children (Bussmann et al. 2025)",
            "ours": "share of parent features (those with children) recovered at cos ≥ 0.9 by the first G latents: "
                    + ". ".join(parts),
            "verdict": _decide(cmps),
            "rule": "every Matryoshka family above the permuted vanilla SAE at every G < N it was trained for, the "
                    "seed-paired interval excluding the reverse" + FEW_SEEDS,
        })  # fmt: skip
    if ka["has_codes"] and fam[vanilla] in fams:
        parts, cmps = [], []
        for metric in ("e_z2", "freq"):
            f = plan.sorted_copy(fam[vanilla], metric)
            cs = [c for G in grid if G < N and f in fams and (c := _compare(ka, f, fam[vanilla], "recovered_top_decile", G, True))]
            cmps += cs
            parts.append(f"{f} vs {fam[vanilla]} (training order): " + "; ".join(_cmp(c) for c in cs))
        out.append({
            "paper": "Sorting by importance puts the features that matter first: the first G latents of a permuted "
                     "SAE are a good G-latent dictionary (the paper's mechanism)",
            "ours": "share of the most frequent decile of true features recovered at cos ≥ 0.9 by the first G "
                    "latents: " + ". ".join(parts),
            "verdict": _decide(cmps),
            "rule": "both sorted copies above the unsorted SAE at every G < N, the seed-paired interval excluding "
                    "the reverse" + FEW_SEEDS,
        })  # fmt: skip
    if ka["has_codes"] and ka["depth_counts"][1:] and fam[perm] in fams:
        by_mode, parts = {}, []
        for mode in MODES:
            by_mode[mode] = []
            for m, Gs in variants.items():
                cs = [c for G in Gs if m in fams and (c := _compare(ka, m, fam[perm], f"absorption_{mode}", G, False))]
                by_mode[mode] += cs
                parts.append(f"{mode}, {m} vs {fam[perm]}: " + ("; ".join(_cmp(c) for c in cs) or "no parent recovered"))
        verdict = _modes(by_mode)
        out.append({
            "paper": "Absorption falls with nesting: a parent's latent stays on when a child fires (Bussmann et al. 2025)",
            "ours": "share of the rows where a recovered parent and one of its children fire on which the parent's "
                    "latent is off: " + ". ".join(parts),
            "verdict": verdict,
            "rule": "lower absorption for every Matryoshka family at every G < N it was trained for, the "
                    "seed-paired interval excluding the reverse, in both truncation modes (a mode with nothing "
                    "compared: undecided); each SAE's absorption is over the parents it recovers" + FEW_SEEDS,
        })  # fmt: skip
    return out

