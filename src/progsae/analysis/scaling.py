"""Scaling of reconstruction error with granularity: FVU(G) ~ a G^-b + c."""

from __future__ import annotations

import numpy as np


def fit_scaling(G: np.ndarray, fvu: np.ndarray, lo: int = 16) -> dict:
    """FVU(G) ~ a G^-b + c by least squares in log space over G >= lo, for c on a grid below min FVU."""
    keep = G >= lo
    G, fvu = G[keep].astype(np.float64), fvu[keep]
    best = None
    for c in np.linspace(0, fvu.min() * 0.999, 50):
        y = np.log(np.clip(fvu - c, 1e-12, None))
        slope, icpt = np.polyfit(np.log(G), y, 1)
        pred = np.exp(icpt) * G**slope + c
        r2 = 1 - ((fvu - pred) ** 2).sum() / ((fvu - fvu.mean()) ** 2).sum()
        if best is None or r2 > best["r2"]:
            best = {"a": float(np.exp(icpt)), "b": float(-slope), "c": float(c), "r2": float(r2), "G_min": int(lo)}
    return best
