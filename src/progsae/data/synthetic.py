"""Synthetic activations with known answers, for tests and quick demos (never a stand-in for real data).

x = sum_i a_i f_i + noise: F unit feature directions f_i in d dims, feature i active with probability
p_i proportional to i^-alpha (scaled so that on average `mean_active` features are active per token),
magnitudes |1 + magnitude_std * N(0, 1)|, Gaussian noise of std `noise`. Everything is seeded: batch j
of a stream depends only on (seed, j).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from ..errors import ProgsaeError


@dataclass
class SyntheticConfig:
    d_in: int = 64
    n_features: int = 512
    alpha: float = 1.0
    mean_active: float = 8.0
    magnitude_std: float = 0.2
    noise: float = 0.01
    seed: int = 0

    def __post_init__(self):
        if self.d_in < 1 or self.n_features < 1:
            raise ProgsaeError("synthetic: d_in and n_features must be positive")
        if not 0 < self.mean_active <= self.n_features:
            raise ProgsaeError(f"synthetic: mean_active must be in (0, n_features], got {self.mean_active}")
        if self.alpha < 0 or self.noise < 0 or self.magnitude_std < 0:
            raise ProgsaeError("synthetic: alpha, noise and magnitude_std must be >= 0")


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
