"""Analysis of trained SAEs: importance and permutation, power laws, progressive curves."""

from .importance import (
    METRICS,
    decoder_cov_eigs,
    importance_order,
    latent_stats,
    load_stats,
    save_stats,
    sort_by_importance,
)
from .powerlaw import PowerLawFit, fit_power_law, plot_power_laws
from .progressive import ProgressiveEval, ProgressiveResult, default_grid, fvu_at, progressive_eval

__all__ = [
    "METRICS",
    "decoder_cov_eigs",
    "importance_order",
    "latent_stats",
    "load_stats",
    "save_stats",
    "sort_by_importance",
    "PowerLawFit",
    "fit_power_law",
    "plot_power_laws",
    "ProgressiveEval",
    "ProgressiveResult",
    "default_grid",
    "fvu_at",
    "progressive_eval",
]
