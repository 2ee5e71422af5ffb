"""Known answers beside activations: `truth.safetensors` in an activation directory.

    feature_vectors  [F, d_in] float32   the true feature directions (any norm; compared by cosine)
    parent           [F] int64           optional: the feature each one sits under, -1 for a root
                                         (a child fires only when its parent fires)
    feature_indices  [n, w] int64        optional, for held-out rows: the true code of row r in the
    feature_values   [n, w] float32      sparse layout of `SparseCode` (zero values are padding), one row
                                         per activation row in stored order, so O(n * L0) on disk

Any generator can write it (`save_truth` into the finished directory); `progsae synth` writes it for every
directory, with the codes when `--held-out`. `progsae eval` reads it through `load_truth`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ProgsaeError
from ..files import load_tensors, save_tensors

TRUTH_FILE = "truth.safetensors"


@dataclass
class Truth:
    feature_vectors: torch.Tensor  # [F, d_in]
    parent: torch.Tensor | None = None  # [F], -1 for roots
    feature_indices: torch.Tensor | None = None  # [n, w]
    feature_values: torch.Tensor | None = None  # [n, w]

    @property
    def n_features(self) -> int:
        return self.feature_vectors.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        named = {"feature_vectors": self.feature_vectors.float(), "parent": self.parent,
                 "feature_indices": self.feature_indices, "feature_values": self.feature_values}  # fmt: skip
        return {k: v for k, v in named.items() if v is not None}

    def depth(self) -> torch.Tensor:
        """[F] int64: 0 for a root (and for every feature without a hierarchy), 1 for its children, ..."""
        return depths(self.parent if self.parent is not None else torch.full((self.n_features,), -1))

    def check(self, where: str, d_in: int, n_rows: int) -> Truth:
        """Refuse a truth file that does not fit its activations, in one line naming the tensor."""
        F = self.n_features
        if self.feature_vectors.ndim != 2 or self.feature_vectors.shape[1] != d_in:
            raise ProgsaeError(f"{where}: feature_vectors has shape {tuple(self.feature_vectors.shape)}, "
                               f"expected [F, {d_in}] (d_in of the activations); re-write the truth file")  # fmt: skip
        if not torch.isfinite(self.feature_vectors).all() or (self.feature_vectors.norm(dim=1) == 0).any():
            raise ProgsaeError(f"{where}: feature_vectors holds a zero, NaN or Inf row; every true feature needs a "
                               "direction")  # fmt: skip
        if self.parent is not None:
            p = self.parent
            if p.shape != (F,) or p.dtype != torch.int64 or ((p < -1) | (p >= F)).any():
                raise ProgsaeError(f"{where}: parent must be int64 [F={F}] with values in -1..F-1; re-write it")
            depths(p, where)  # refuses a cycle
        if (self.feature_indices is None) != (self.feature_values is None):
            raise ProgsaeError(f"{where}: feature_indices and feature_values come together; write both or neither")
        if self.feature_indices is not None:
            i, v = self.feature_indices, self.feature_values
            if i.ndim != 2 or i.shape != v.shape or i.shape[0] != n_rows or i.dtype != torch.int64:
                raise ProgsaeError(f"{where}: feature_indices/feature_values must be [n={n_rows}, w] (int64, float) "
                                   f"like the activation rows, got {tuple(i.shape)} and {tuple(v.shape)}")  # fmt: skip
            if ((i < 0) | (i >= F)).any():
                raise ProgsaeError(f"{where}: feature_indices holds an index outside 0..{F - 1}")
            if (v < 0).any() or not torch.isfinite(v).all():
                raise ProgsaeError(f"{where}: feature_values holds a negative, NaN or Inf value; a true code is a "
                                   "feature's non-negative magnitude (0: padding)")  # fmt: skip
        return self


def depths(parent: torch.Tensor, where: str = "truth") -> torch.Tensor:
    """Depth of every feature under a parent array (-1: root); refuses a cycle."""
    depth = torch.zeros(len(parent), dtype=torch.int64)
    node = parent.clone()
    for _ in range(len(parent) + 1):
        up = node >= 0
        if not up.any():
            return depth
        depth += up
        node[up] = parent[node[up]]
    raise ProgsaeError(f"{where}: the parent array has a cycle; every chain of parents must end at -1")


def save_truth(acts_dir: str | Path, truth: Truth) -> None:
    save_tensors(Path(acts_dir) / TRUTH_FILE, truth.tensors())


def load_truth(acts) -> Truth | None:
    """The truth of an `ActivationDir` (checked against it), or None when it has none."""
    f = Path(acts.path) / TRUTH_FILE
    if not f.is_file():
        return None
    t = load_tensors(f)
    if "feature_vectors" not in t:
        raise ProgsaeError(f"{f}: no feature_vectors tensor; see the layout in docs/ARCHITECTURE.md")
    fields = ("feature_vectors", "parent", "feature_indices", "feature_values")
    extra = sorted(set(t) - set(fields))
    if extra:
        raise ProgsaeError(f"{f}: unknown tensors {extra}; a truth file holds only {', '.join(fields)}")
    return Truth(**{k: t.get(k) for k in fields}).check(str(f), acts.d_in, acts.n_tokens)
