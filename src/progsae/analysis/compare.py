"""Comparisons between SAEs: feature splitting (a truncated large SAE against a native small one), and
prefix curves at matched L0."""

from __future__ import annotations

import numpy as np
import torch

from ..sae import SAE


@torch.no_grad()
def feature_splitting(big: SAE, native: SAE, row_t: dict, row_n: dict) -> dict:
    """The first G latents of `big` (sorted) against the G-latent `native` SAE: FVU, recaptured, and for each
    native decoder direction its best cosine among the big SAE's first G latents and among all N."""
    G = native.d_sae
    cos = torch.nn.functional.normalize(native.W_dec, dim=1) @ torch.nn.functional.normalize(big.W_dec, dim=1).t()
    best, best_all = cos[:, :G].max(1).values, cos.max(1).values
    return {
        "G": G,
        "fvu_truncated": row_t["fvu_rescaled"],
        "fvu_native": row_n["fvu_rescaled"],
        "recaptured_truncated": row_t.get("recaptured_rescaled"),
        "recaptured_native": row_n.get("recaptured_rescaled"),
        "matched_0.9": float((best > 0.9).float().mean()),
        "matched_0.7": float((best > 0.7).float().mean()),
        "median_max_cos": float(best.median()),
        "matched_0.9_all_N": float((best_all > 0.9).float().mean()),
        "matched_0.7_all_N": float((best_all > 0.7).float().mean()),
        "median_max_cos_all_N": float(best_all.median()),
    }


def fvu_at_l0(l0, fvu, target: float) -> float | None:
    """FVU of a prefix curve (l0[G-1], fvu[G-1] for G = 1..N) where its L0 equals `target`: linear in log L0
    between the two granularities that bracket it (None if the curve never reaches that L0)."""
    l0, fvu = np.asarray(l0, np.float64), np.asarray(fvu, np.float64)
    keep = l0 > 0
    l0, fvu = l0[keep], fvu[keep]
    if not len(l0) or not l0[0] <= target <= l0[-1]:
        return None
    first = np.r_[True, np.diff(l0) > 0]  # L0 is non-decreasing in G: the first G of each L0 value
    return float(np.interp(np.log(target), np.log(l0[first]), fvu[first]))


def matched_l0(a: dict, b: dict, G: int) -> dict:
    """Two SAEs' prefix curves compared at one L0: the lower of their L0s at G, the other's curve read there."""
    target = min(a["l0"][G - 1], b["l0"][G - 1])
    return {"G": G, "l0": target, "fvu_a": fvu_at_l0(a["l0"], a["fvu_prefix"], target),
            "fvu_b": fvu_at_l0(b["l0"], b["fvu_prefix"], target)}  # fmt: skip
