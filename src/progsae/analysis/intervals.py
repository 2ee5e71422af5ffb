"""Intervals: a block bootstrap over held-out tokens, nested inside a bootstrap over training seeds.

Every metric of a table is a ratio of sums over blocks of held-out tokens (a block is about one context):
FVU = sum(sse) / sum(var), recaptured = sum(ce_zero - ce_sae) / sum(ce_zero - ce_clean), and so on. One
replicate draws the blocks with replacement (the same draw for every SAE, so differences are paired) and,
with several seeds, the seeds of each SAE family with replacement; the interval is the 2.5-97.5 percentile
range of the replicates of the mean over seeds.
"""

from __future__ import annotations

import numpy as np

LEVEL = 0.95


def block_weights(n_blocks: int, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """[n_boot, n_blocks]: how often each block is drawn in each replicate (multinomial, total n_blocks)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_blocks, np.full(n_blocks, 1 / n_blocks), size=n_boot).astype(np.float64)


def ratio(num, den, W: np.ndarray) -> np.ndarray:
    """Replicates [n_boot] of sum(num) / sum(den) with the blocks weighted by each row of W."""
    return (W @ np.asarray(num, np.float64)) / (W @ np.asarray(den, np.float64))


def over_seeds(points: list[float], replicates: list[np.ndarray], seed: int = 1) -> tuple[float, np.ndarray]:
    """The mean over seeds and its replicates: in replicate b, seeds drawn with replacement, each at its
    own replicate b (one seed: its replicates unchanged)."""
    R = np.stack(replicates)  # [n_seeds, n_boot]
    n, B = R.shape
    if n == 1:
        return float(points[0]), R[0]
    pick = np.random.default_rng(seed).integers(0, n, size=(B, n))
    return float(np.mean(points)), R[pick, np.arange(B)[:, None]].mean(1)


def interval(replicates: np.ndarray, level: float = LEVEL) -> list[float]:
    lo, hi = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def seed_interval(values: list[float], seed: int = 1, n_boot: int = 1000) -> list[float] | None:
    """Percentile interval of the mean over seeds by resampling seeds (None with one seed)."""
    if len(values) < 2:
        return None
    v = np.asarray(values, np.float64)
    pick = np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))
    return interval(v[pick].mean(1))
