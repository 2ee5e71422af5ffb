"""Synthetic activations with known answers, for tests and quick demos (never a stand-in for real data).

x = sum_i a_i f_i + noise: F unit feature directions f_i in d dims, feature i active with probability
p_i proportional to i^-alpha (scaled so that on average `mean_active` features are active per token),
magnitudes |1 + magnitude_std * N(0, 1)|, Gaussian noise of std `noise`. Everything is seeded: batch j
of a stream depends only on (seed, j). `write_synthetic` writes such a stream as an activation directory
(`progsae synth`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import REQUIRED, check_fields, opt
from ..errors import ProgsaeError
from .activations import write_activations

BATCH = 8192  # rows per batch of a written stream


@dataclass
class SyntheticConfig:
    d_in: int = opt(64, "dimension of the activations", min=1)
    n_features: int = opt(512, "number of true feature directions", flag="features", min=1)
    alpha: float = opt(1.0, "feature i fires with probability ~ i^-alpha", min=0)
    mean_active: float = opt(8.0, "mean number of active features per token (at most n_features)", above=0)
    magnitude_std: float = opt(0.2, "an active feature's magnitude is |1 + magnitude_std * N(0, 1)|", min=0)
    noise: float = opt(0.01, "standard deviation of the Gaussian noise added to every activation", min=0)
    seed: int = opt(0, "seeds the features and the stream")

    def __post_init__(self):
        self.validate()

    def validate(self) -> SyntheticConfig:
        check_fields(self, "synthetic")
        if self.mean_active > self.n_features:
            raise ProgsaeError(f"synthetic: mean_active must be in (0, n_features], got {self.mean_active}")
        return self


class SyntheticSource:
    """Implements the training `Source` protocol; `directions` and `probs` are the known answers."""

    def __init__(self, cfg: SyntheticConfig | None = None):
        self.cfg = cfg = cfg or SyntheticConfig()
        self.d_in = cfg.d_in
        gen = torch.Generator().manual_seed(cfg.seed)
        D = torch.randn(cfg.n_features, cfg.d_in, generator=gen)
        self.directions = D / D.norm(dim=1, keepdim=True)  # [F, d]
        p = torch.arange(1, cfg.n_features + 1, dtype=torch.float64) ** -cfg.alpha
        for _ in range(50):  # scale to the target mean number of active features, with p <= 1
            p = (p * cfg.mean_active / p.sum()).clamp(max=1.0)
        self.probs = p.float()  # [F], descending

    def sample(self, n: int, index: int) -> torch.Tensor:
        """Batch number `index` of the stream: [n, d_in]."""
        c = self.cfg
        gen = torch.Generator().manual_seed(c.seed * 1_000_003 + 7919 * index + 1)
        active = torch.rand(n, c.n_features, generator=gen) < self.probs
        mags = (1 + c.magnitude_std * torch.randn(n, c.n_features, generator=gen)).abs()
        x = (active * mags) @ self.directions
        return x + c.noise * torch.randn(n, c.d_in, generator=gen)

    def batches(self, batch_size: int, seed: int, start: int = 0) -> Iterator[torch.Tensor]:
        j = start
        while True:
            yield self.sample(batch_size, seed * 100_003 + j)
            j += 1

    def describe(self) -> dict:
        return {"kind": "synthetic", **asdict(self.cfg)}


@dataclass
class SynthArgs:
    """`progsae synth`'s arguments besides SyntheticConfig's (see cli.py)."""

    out: str = opt(REQUIRED, "activation directory to create")
    tokens: int = opt(1_000_000, "activations to write", min=1)
    held_out: bool = opt(False, "same features, tokens disjoint from the default stream")
    force: bool = opt(False, "replace --out if it exists")


def write_synthetic(
    cfg: SyntheticConfig, out: str | Path, tokens: int, held_out: bool = False, progress: bool = True
) -> Path:
    """The activation directory `out` of the stream's first `tokens` rows, in batches of BATCH; `held_out`: the
    same features, rows from a stretch of the stream disjoint from the default one."""
    src = SyntheticSource(cfg)
    n_batches = -(-tokens // BATCH)
    first = 1_000_000_000 if held_out else 0
    rows = (src.sample(min(BATCH, tokens - j * BATCH), first + j) for j in range(n_batches))
    source = {
        **src.describe(),
        "held_out": held_out,
        "note": "synthetic activations with known features (tests and demos only)",
    }
    bar = tqdm(rows, total=n_batches, desc="synth", unit="batch", disable=not progress)
    return write_activations(out, bar, cfg.d_in, source)
