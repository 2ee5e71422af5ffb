"""Synthetic activations with known answers, for tests, known-answer studies and quick demos (never a stand-in
for real data).

x = sum_i a_i f_i + bias + noise: F true features f_i of unit norm in d dims (orthonormal with `orthogonal`,
which needs F <= d), feature i active with marginal probability p_i proportional to i^-alpha (scaled so that
on average `mean_active` features are active per row), magnitude |1 + magnitude_std * N(0, 1)| when active,
Gaussian noise of std `noise`, and a fixed random `bias` of the given norm.

Hierarchy (`trees` > 0): that many trees of `depth` levels below the root and `branching` children per node
sit on a seeded sorted subset of the feature indices, in breadth-first order, so a parent always has a smaller
index (fires more often) than its children. A child c fires only when its parent fires, then with probability
p_c / p_parent, so its marginal is still p_c; with `exclusive`, at most one child of a node fires (chosen with
those probabilities, scaled down to sum 1 where they sum to more, which lowers those children's marginals).
Correlation (`correlation` rho > 0): the uniform that decides whether a feature fires is Phi(g) with
g = sqrt(1 - rho) eps + sqrt(rho) U z, U [F, r] unit rows and z ~ N(0, I_r) per row (a Gaussian copula of
rank `correlation_rank`), so roots keep their marginals p_i exactly and co-fire through z.

Everything is seeded: batch j of a stream depends only on (seed, j), and no more than `rows_per_batch` x F
numbers are drawn at once (the [n, F] code is never held whole). `write_synthetic` writes such a stream as an
activation directory with `truth.safetensors` beside it (`progsae synth`; the true codes with `--held-out`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import REQUIRED, check_fields, opt
from ..errors import ProgsaeError
from .activations import ActivationWriter
from .truth import TRUTH_FILE, Truth, depths

BATCH = 8192  # rows per batch of a written stream (fewer when F is large: see rows_per_batch)
DRAWN = 2**24  # at most this many [rows x features] numbers drawn at once
# the features' generator is seeded apart from every small seed: an SAE initialised from torch's generator
# with the same seed (SAE.init_tied: randn [N, d]) would otherwise start exactly on the true features
FEATURE_SEED = 0x5EED_FEA7_0000


@dataclass
class SyntheticConfig:
    d_in: int = opt(64, "dimension of the activations", min=1)
    n_features: int = opt(512, "number of true feature directions", flag="features", min=1)
    alpha: float = opt(1.0, "feature i fires with probability ~ i^-alpha", min=0)
    mean_active: float = opt(8.0, "mean number of active features per token (at most n_features)", above=0)
    magnitude_std: float = opt(0.2, "an active feature's magnitude is |1 + magnitude_std * N(0, 1)|", min=0)
    noise: float = opt(0.01, "standard deviation of the Gaussian noise added to every activation", min=0)
    seed: int = opt(0, "seeds the features and the stream")
    orthogonal: bool = opt(False, "orthonormal features (needs features <= d_in)")
    trees: int = opt(0, "feature trees: a child fires only when its parent fires (0: no hierarchy)", min=0)
    depth: int = opt(2, "levels below each tree's root", min=1)
    branching: int = opt(3, "children per node of a tree", min=1)
    exclusive: bool = opt(False, "at most one child of a node fires at a time")
    correlation: float = opt(0.0, "strength rho of the low-rank correlation between features' firing", min=0, below=1)
    correlation_rank: int = opt(4, "rank of that correlation", min=1)
    bias: float = opt(0.0, "norm of a fixed random offset added to every activation", min=0)

    def __post_init__(self):
        self.validate()

    def validate(self) -> SyntheticConfig:
        check_fields(self, "synthetic")
        if self.mean_active > self.n_features:
            raise ProgsaeError(f"synthetic: mean_active must be in (0, n_features], got {self.mean_active}")
        if self.orthogonal and self.n_features > self.d_in:
            raise ProgsaeError(f"synthetic: orthogonal features need features <= d_in ({self.n_features} > "
                               f"{self.d_in}); raise --d-in or drop --orthogonal")  # fmt: skip
        if self.tree_nodes > self.n_features:
            raise ProgsaeError(f"synthetic: {self.trees} trees of depth {self.depth} and branching {self.branching} "
                               f"need {self.tree_nodes} features, more than --features {self.n_features}")  # fmt: skip
        return self

    @property
    def tree_nodes(self) -> int:
        return self.trees * sum(self.branching**level for level in range(self.depth + 1))

    @property
    def rows_per_batch(self) -> int:
        return max(1, min(BATCH, DRAWN // self.n_features))


def hierarchy(cfg: SyntheticConfig, gen: torch.Generator) -> torch.Tensor:
    """parent [F] (-1 for roots): the trees on a sorted random subset of the indices, breadth-first."""
    F, parent = cfg.n_features, torch.full((cfg.n_features,), -1, dtype=torch.int64)
    if not cfg.trees:
        return parent
    slots = torch.randperm(F, generator=gen)[: cfg.tree_nodes].sort().values
    level, used = list(range(cfg.trees)), cfg.trees  # positions in breadth-first order
    for _ in range(cfg.depth):
        children = []
        for node in level:
            kids = list(range(used, used + cfg.branching))
            parent[slots[kids]] = slots[node]
            children += kids
            used += cfg.branching
        level = children
    return parent


class SyntheticSource:
    """Implements the training `Source` protocol; `directions`, `probs`, `parent` and `bias_vector` are the
    known answers."""

    def __init__(self, cfg: SyntheticConfig | None = None):
        self.cfg = cfg = cfg or SyntheticConfig()
        self.d_in = cfg.d_in
        gen = torch.Generator().manual_seed(FEATURE_SEED + cfg.seed)
        D = torch.randn(cfg.n_features, cfg.d_in, generator=gen)
        if cfg.orthogonal:
            D = torch.linalg.qr(D.t().double()).Q.t().float()  # [F, d] orthonormal rows
        self.directions = D / D.norm(dim=1, keepdim=True)  # [F, d]
        p = torch.arange(1, cfg.n_features + 1, dtype=torch.float64) ** -cfg.alpha
        for _ in range(50):  # scale to the target mean number of active features, with p <= 1
            p = (p * cfg.mean_active / p.sum()).clamp(max=1.0)
        self.probs = p.float()  # [F], descending: the marginals (see the module doc for `exclusive`)
        self.parent = hierarchy(cfg, gen)
        self.depth = depths(self.parent)
        has_parent = self.parent >= 0
        q = p.clone()
        q[has_parent] = (p[has_parent] / p[self.parent[has_parent]]).clamp(max=1.0)  # P(fire | parent fires)
        self.levels = [(self.depth == L).nonzero().flatten() for L in range(1, int(self.depth.max()) + 1)]
        if cfg.exclusive:  # children of a node share one uniform: child j takes [lo_j, hi_j) of it
            self.lo = torch.zeros(cfg.n_features, dtype=torch.float64)
            for node in self.parent[has_parent].unique():
                kids = (self.parent == node).nonzero().flatten()
                share = q[kids] / max(1.0, float(q[kids].sum()))
                hi = share.cumsum(0)
                self.lo[kids], q[kids] = hi - share, hi
            self.lo = self.lo.float()
        self.q = q.float()  # [F]: roots their p, children the chance given the parent (exclusive: the upper end)
        self.mixing = None
        if cfg.correlation:
            U = torch.randn(cfg.n_features, cfg.correlation_rank, generator=gen)
            self.mixing = U / U.norm(dim=1, keepdim=True)
        b = torch.randn(cfg.d_in, generator=gen)
        self.bias_vector = b / b.norm() * cfg.bias

    def code(self, n: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number `index`: the true code a [n, F] (dense) and the activations x [n, d_in]."""
        c = self.cfg
        gen = torch.Generator().manual_seed(c.seed * 1_000_003 + 7919 * index + 1)
        u = torch.rand(n, c.n_features, generator=gen)
        mags = (1 + c.magnitude_std * torch.randn(n, c.n_features, generator=gen)).abs()
        noise = c.noise * torch.randn(n, c.d_in, generator=gen)
        if self.mixing is not None:  # Gaussian copula: u = Phi(sqrt(1 - rho) eps + sqrt(rho) U z)
            z = torch.randn(n, c.correlation_rank, generator=gen)
            g = math.sqrt(1 - c.correlation) * torch.special.ndtri(u) + math.sqrt(c.correlation) * z @ self.mixing.t()
            u = torch.special.ndtr(g)
        active = u < self.q
        if c.exclusive and self.levels:
            v = torch.rand(n, c.n_features, generator=gen)  # one uniform per (row, parent), read by its children
        for nodes in self.levels:  # parents before children: a child fires only with its parent
            up = self.parent[nodes]
            if c.exclusive:
                share = v[:, up]
                active[:, nodes] = active[:, up] & (share >= self.lo[nodes]) & (share < self.q[nodes])
            else:
                active[:, nodes] &= active[:, up]
        a = active * mags
        return a, a @ self.directions + self.bias_vector + noise

    def sample(self, n: int, index: int) -> torch.Tensor:
        """Batch number `index` of the stream: [n, d_in]."""
        return self.code(n, index)[1]

    def batches(self, batch_size: int, seed: int, start: int = 0) -> Iterator[torch.Tensor]:
        j = start
        while True:
            yield self.sample(batch_size, seed * 100_003 + j)
            j += 1

    def describe(self) -> dict:
        return {"kind": "synthetic", **asdict(self.cfg)}

    def truth(self) -> Truth:
        return Truth(self.directions, self.parent if self.cfg.trees else None)


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
    """The activation directory `out` of the stream's first `tokens` rows, with `truth.safetensors` (the true
    codes too when `held_out`: the same features, rows from a stretch of the stream disjoint from the default
    one)."""
    src = SyntheticSource(cfg)
    rows = cfg.rows_per_batch
    n_batches = -(-tokens // rows)
    first = 1_000_000_000 if held_out else 0
    source = {
        **src.describe(),
        "held_out": held_out,
        "note": "synthetic activations with known features (tests and demos only)",
    }
    writer = ActivationWriter(out, cfg.d_in, source)
    values, indices = [], []
    for j in tqdm(range(n_batches), desc="synth", unit="batch", disable=not progress):
        a, x = src.code(min(rows, tokens - j * rows), first + j)
        writer.add(x)
        if held_out:  # the sparse code: active features ascending, zero-padded to the batch's widest row
            w = max(1, int((a > 0).sum(1).max()))
            v, i = a.topk(w, dim=1)
            key, order = torch.where(v > 0, i, cfg.n_features).sort(dim=1)  # active ascending, padding last
            values.append(v.gather(1, order))
            indices.append(key * (values[-1] > 0))
    truth = src.truth()
    if held_out:
        w = max(v.shape[1] for v in values)
        truth.feature_values = torch.cat([torch.nn.functional.pad(v, (0, w - v.shape[1])) for v in values])
        truth.feature_indices = torch.cat([torch.nn.functional.pad(i, (0, w - i.shape[1])) for i in indices])
    return writer.close({TRUTH_FILE: truth.tensors()})
