"""A run's SAEs grouped into families (one SAE per training seed), each table number a mean over seeds with
a 95% interval: a block bootstrap over held-out tokens nested in a bootstrap over seeds (see intervals.py).

FVU, RSA (each over all tokens and over the typical ones), SAELens' ce_loss_score and kl_div_with_sae,
recaptured loss (against zero and mean ablation), delta CE and KL are bootstrapped (RSA over its token sample,
by replicates drawn at evaluation); L0 and the dead fraction get an interval across seeds only (none with one
seed). Comparisons of two families are paired: every SAE is resampled with the same blocks and contexts.
"""

from __future__ import annotations

import zlib

import numpy as np

from ..sae import MODES
from .intervals import block_weights, interval, over_seeds, ratio, seed_interval

BOOTSTRAPPED = ("fvu", "fvu_typical", "rsa", "rsa_typical", "ce_loss_score", "kl_div_with_sae", "recaptured",
                "recaptured_mean", "dce", "kl")
SEED_ONLY = ("l0", "dead_frac")


def _value(row: dict, key: str, mode: str):
    if key in ("l0", "dead_frac"):
        return row.get(key) if mode == "prefix" else row.get("l0_rescaled") if key == "l0" else None
    v = row.get(f"{key}_{mode}")
    return v["cosine"]["spearman"] if key in ("rsa", "rsa_typical") and v is not None else v


class Aggregate:
    def __init__(self, evals: dict[str, dict], families: dict[str, list[str]], n_boot: int = 1000, seed: int = 0):
        self.evals, self.families, self.n_boot = evals, families, n_boot
        first = next(iter(evals.values()))
        self.Wb = block_weights(len(first["blocks"]["var"]), n_boot, seed) if first.get("blocks") else None
        lm = first.get("lm")
        self.Wc = block_weights(len(lm["per_context"]["clean"]), n_boot, seed + 1) if lm else None

    def point(self, name: str, key: str, mode: str, G: int):
        row = next((r for r in self.evals[name]["table"] if r["G"] == G), None)
        return None if row is None else _value(row, key, mode)

    def replicates(self, name: str, key: str, mode: str, G: int) -> np.ndarray | None:
        """Bootstrap replicates [n_boot] of one SAE's metric (None where there is nothing to resample)."""
        e, typical = self.evals[name], "typical:" if key.endswith("_typical") else ""
        blocks = (e.get("blocks") or {}).get("typical") if typical else e.get("blocks")
        if key.startswith("fvu") and blocks and str(G) in blocks.get(f"sse_{mode}", {}):
            return ratio(blocks[f"sse_{mode}"][str(G)], blocks["var"], self.Wb)
        if key.startswith("rsa"):  # replicates drawn at evaluation (RSA is no ratio of sums)
            reps = (e.get("rsa_boot") or {}).get(f"{typical}{mode}:{G}")
            return np.asarray(reps) if reps is not None and len(reps) == self.n_boot else None
        lm = e.get("lm") or {}
        hit = (lm.get("per_context_sae") or {}).get(f"{mode}:{G}")
        if key.startswith("fvu") or hit is None:
            return None
        pc, sae = lm["per_context"], np.asarray(hit["ce"])
        if key == "ce_loss_score":  # SAELens' sums: special tokens' predictions left out, every position ablated
            abl, lens = np.asarray(pc["ce_loss_with_ablation"]), np.asarray(hit["ce_loss_with_sae"])
            return ratio(abl - lens, abl - np.asarray(pc["ce_loss_without_sae"]), self.Wc)
        if key == "kl_div_with_sae":
            return ratio(hit["kl_div_with_sae"], pc["n_kl_div"], self.Wc)
        clean, tpc = np.asarray(pc["clean"]), np.full(len(pc["clean"]), float(lm["tokens_per_context"]))
        if key == "recaptured":
            return ratio(np.asarray(pc["zero"]) - sae, np.asarray(pc["zero"]) - clean, self.Wc)
        if key == "recaptured_mean":
            return ratio(np.asarray(pc["mean"]) - sae, np.asarray(pc["mean"]) - clean, self.Wc)
        if key == "dce":
            return ratio(sae - clean, tpc, self.Wc)
        return ratio(np.asarray(hit["kl"]), tpc, self.Wc)

    def family(self, fam: str, key: str, mode: str, G: int) -> dict | None:
        """{"mean", "ci", "seeds": per-seed values, "reps"} of a family's metric at G (None if absent)."""
        names = self.families[fam]
        points = [self.point(n, key, mode, G) for n in names]
        if any(p is None for p in points):
            return None
        reps = [self.replicates(n, key, mode, G) for n in names]
        if key in BOOTSTRAPPED and all(r is not None for r in reps):
            mean, r = over_seeds(points, reps, seed=zlib.crc32(fam.encode()))
            return {"mean": mean, "ci": interval(r), "seeds": points, "reps": r}
        return {"mean": float(np.mean(points)), "ci": seed_interval(points), "seeds": points, "reps": None}

    def table(self, fam: str) -> list[dict]:
        """The family's table: per G, each metric and mode as mean, with `<metric>_<mode>_ci` beside it."""
        rows = []
        for r in self.evals[self.families[fam][0]]["table"]:
            G, row = r["G"], {"G": r["G"]}
            for key in BOOTSTRAPPED + SEED_ONLY:
                for mode in MODES:
                    col = key if key in ("l0", "dead_frac") and mode == "prefix" else f"{key}_{mode}"
                    if key == "dead_frac" and mode == "rescaled":
                        continue
                    f = self.family(fam, key, mode, G)
                    row[col] = f["mean"] if f else None
                    row[f"{col}_ci"] = f["ci"] if f else None
            rows.append(row)
        return rows

    def compare(self, fa: str, fb: str, key: str, mode: str, G: int, higher_better: bool) -> dict | None:
        """a against b at G: the difference a - b, its interval (paired), and whether a is better for certain."""
        a, b = self.family(fa, key, mode, G), self.family(fb, key, mode, G)
        if a is None or b is None:
            return None
        diff = a["mean"] - b["mean"]
        if a["reps"] is not None and b["reps"] is not None:
            ci = interval(a["reps"] - b["reps"])
        else:
            ci = seed_interval(list(np.add.outer(a["seeds"], -np.asarray(b["seeds"])).ravel()))
            ci = ci if len(a["seeds"]) > 1 and len(b["seeds"]) > 1 else None
        sign = 1 if higher_better else -1
        return {
            "G": G,
            "a": a["mean"],
            "b": b["mean"],
            "diff": diff,
            "ci": ci,
            "better": sign * diff > 0,
            "certain": ci is not None and (sign * ci[0] > 0 if higher_better else sign * ci[1] > 0),
            "worse_certain": ci is not None and (sign * ci[1] < 0 if higher_better else sign * ci[0] < 0),
        }
