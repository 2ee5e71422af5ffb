"""Power-law fits of importance against rank: log value = intercept + exponent * log rank, least squares."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..config import REQUIRED, check_fields, opt
from ..errors import ProgsaeError
from ..files import atomic
from .importance import METRICS


@dataclass
class PowerLawFit:
    exponent: float
    intercept: float  # natural log of the value at rank 1
    r2: float
    lo: int  # ranks lo..hi (1-based, inclusive) were fitted
    hi: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PowerlawArgs:
    """`progsae powerlaw`'s arguments (see cli.py)."""

    stats: str = opt(REQUIRED, "statistics file from `progsae stats`", positional=True)
    metrics: list[str] = opt(["e_z2", "freq", "dec_cov_eigs"], "comma-separated: e_z2, freq, e_z, max, dec_cov_eigs",
                             comma=True)  # fmt: skip
    window: str = opt("", "rank window LO:HI, e.g. 1:1000 or 10: (default all)")
    plot: str | None = opt(None, "write a log-log plot with the fits (PNG)")
    json: str | None = opt(None, "write the fits as JSON")

    def validate(self) -> PowerlawArgs:
        check_fields(self, "powerlaw")
        bad = [m for m in self.metrics if m not in (*METRICS, "dec_cov_eigs")]
        if bad:
            raise ProgsaeError(f"powerlaw: unknown metric {bad[0]!r}; use e_z2, freq, e_z, max or dec_cov_eigs")
        lo, hi = self.ranks
        if lo < 1 or hi is not None and hi < lo:
            raise ProgsaeError(f"powerlaw: window must be LO:HI ranks with 1 <= LO <= HI, got {self.window!r}")
        return self

    @property
    def ranks(self) -> tuple[int, int | None]:
        """The rank window (lo, hi or None: to the last rank)."""
        lo, _, hi = self.window.partition(":")
        try:
            return int(lo or 1), int(hi) if hi else None
        except ValueError:
            raise ProgsaeError(f"powerlaw: window must be LO:HI ranks (e.g. 1:1000 or 10:), got {self.window!r}") from None


def fit_power_law(values, lo: int = 1, hi: int | None = None) -> PowerLawFit:
    """Fit the values sorted descending against rank 1..n over the rank window [lo, hi].

    Non-positive values (dead latents, zero eigenvalues) have no logarithm: the window is cut where
    they begin.
    """
    v = np.sort(np.asarray(values, dtype=np.float64))[::-1]
    n_pos = int((v > 0).sum())
    hi = n_pos if hi is None else min(hi, n_pos)
    if lo < 1 or hi - lo + 1 < 3:
        raise ProgsaeError(f"rank window {lo}..{hi} has fewer than 3 positive values to fit; widen it")
    rank = np.arange(lo, hi + 1, dtype=np.float64)
    lx, ly = np.log(rank), np.log(v[lo - 1 : hi])
    slope, intercept = np.polyfit(lx, ly, 1)
    resid = ly - (intercept + slope * lx)
    ss_tot = ((ly - ly.mean()) ** 2).sum()
    r2 = 1 - (resid**2).sum() / ss_tot if ss_tot > 0 else 1.0
    return PowerLawFit(float(slope), float(intercept), float(r2), lo, hi)


def plot_power_laws(
    series: dict[str, np.ndarray], fits: dict[str, PowerLawFit], path: str | Path, title: str = ""
) -> Path:
    """Log-log plot of each series (sorted descending) against rank, with its fit line dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, values in series.items():
        v = np.sort(np.asarray(values, dtype=np.float64))[::-1]
        v = v[v > 0]
        (line,) = ax.loglog(np.arange(1, len(v) + 1), v, lw=1.5, label=name)
        f = fits[name]
        r = np.array([f.lo, f.hi], dtype=np.float64)
        ax.loglog(
            r,
            np.exp(f.intercept) * r**f.exponent,
            "--",
            color=line.get_color(),
            lw=1,
            label=f"fit: exponent {f.exponent:.2f}, R² {f.r2:.3f}",
        )
    ax.set_xlabel("rank")
    ax.set_ylabel("value")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path
