"""Scaling of reconstruction error with granularity: FVU(G) = a G^-b + c, fitted by nonlinear least squares.

The model is linear in (a, c) for a fixed exponent b, so the fit profiles b: for each b, (a, c) is the
least-squares solution with 0 <= c <= min FVU (c is an error floor), and b minimises the residual (a grid,
then golden-section refinement). The points are spread evenly in log G over the fitted range, so the
thousands of large-G points of a one-pass curve do not outweigh the small G. If the profiled fit is not
finite, the stated fallback is the log-log line with c = 0.

Two rules, stated here once and recorded in every fit:
- the plateau: points with FVU >= 1 - PLATEAU (within PLATEAU of 1, or above it: the first latents of a
  prefix curve explain almost nothing) are no power law and are left out of every fit;
- goodness of fit: with at most PARAMS + 1 points, 3 parameters leave at most one residual degree of freedom
  and any smooth curve passes (almost) through them, so R² says nothing and is not reported (None).
"""

from __future__ import annotations

import numpy as np

N_POINTS = 64
PARAMS = 3  # a, b, c
PLATEAU = 0.05  # FVU >= 1 - PLATEAU: the plateau, excluded from every fit


def _solve(x: np.ndarray, y: np.ndarray, b: float, c_max: float) -> tuple[float, float, float]:
    """(a, c, sse) for fixed b with c clipped to [0, c_max]."""
    f = x**-b
    A = np.stack([f, np.ones_like(f)], 1)
    (a, c), *_ = np.linalg.lstsq(A, y, rcond=None)
    if not 0 <= c <= c_max:
        c = float(np.clip(c, 0, c_max))
        a = float(f @ (y - c) / (f @ f))
    r = y - a * f - c
    return float(a), float(c), float(r @ r)


def fit_scaling(
    G, fvu, lo: int = 1, hi: int | None = None, n_points: int = N_POINTS, plateau: float = PLATEAU
) -> dict | None:
    """FVU(G) ~ a G^-b + c over lo <= G <= hi, the plateau left out: {"a", "b", "c", "r2" (None with at most
    PARAMS + 1 points), "G_min", "G_max", "n_points", "plateau" (the tolerance), "plateau_points" (how many
    G it left out), "method"}; None where fewer than PARAMS points remain."""
    G, fvu = np.asarray(G, np.float64), np.asarray(fvu, np.float64)
    window = (G >= lo) & (G <= (hi or G.max())) & np.isfinite(fvu)
    keep = window & (fvu < 1 - plateau)
    if keep.sum() < PARAMS:
        return None
    G, fvu, on_plateau = G[keep], fvu[keep], int((window & ~keep).sum())
    if len(G) > n_points:  # evenly in log G
        at = np.unique(np.searchsorted(G, np.geomspace(G.min(), G.max(), n_points)).clip(0, len(G) - 1))
        G, fvu = G[at], fvu[at]
    x, y = G / G.min(), fvu  # G scaled to start at 1: a is the fitted excess at the smallest G
    c_max = float(y.min())
    sse = lambda b: _solve(x, y, b, c_max)[2]  # noqa: E731
    grid = np.linspace(0.01, 4, 200)
    i = int(np.argmin([sse(b) for b in grid]))
    lo_b, hi_b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    g = (np.sqrt(5) - 1) / 2
    for _ in range(60):  # golden section on [lo_b, hi_b]
        m1, m2 = hi_b - g * (hi_b - lo_b), lo_b + g * (hi_b - lo_b)
        if sse(m1) < sse(m2):
            hi_b = m2
        else:
            lo_b = m1
    b = (lo_b + hi_b) / 2
    a, c, s = _solve(x, y, b, c_max)
    method = "nonlinear least squares, c free in [0, min FVU]"
    if not np.isfinite(s):
        slope, icpt = np.polyfit(np.log(x), np.log(np.clip(y, 1e-12, None)), 1)
        a, b, c, method = float(np.exp(icpt)), float(-slope), 0.0, "log-log line, c = 0 (fallback)"
        s = float(((y - a * x**-b) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - s / ss_tot if ss_tot > 0 and len(G) > PARAMS + 1 else None
    if len(G) <= PARAMS + 1:
        method += f"; {len(G)} points for {PARAMS} parameters: no goodness of fit"
    return {
        "a": a * G.min() ** b,  # in terms of G itself: FVU = a G^-b + c
        "b": float(b),
        "c": float(c),
        "r2": r2,
        "G_min": int(G.min()),
        "G_max": int(G.max()),
        "n_points": int(len(G)),
        "plateau": plateau,
        "plateau_points": on_plateau,
        "method": method,
    }


def predict(fit: dict, G) -> np.ndarray:
    return fit["a"] * np.asarray(G, np.float64) ** -fit["b"] + fit["c"]
