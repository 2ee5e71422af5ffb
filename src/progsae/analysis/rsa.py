"""Representational similarity analysis between activations and their reconstructions.

On a fixed sample of n tokens: the n x n dissimilarity matrices of the original activations and of the
reconstructions (cosine dissimilarity 1 - cos(a, b), and euclidean distance ||a - b||), compared by the
Pearson and the Spearman correlation of their upper triangles (i < j). 1 means the reconstruction
preserves the geometry of the sample exactly.
"""

from __future__ import annotations

import torch


def dissimilarities(x: torch.Tensor, metric: str) -> torch.Tensor:
    """Upper triangle (i < j, row-major) of the pairwise dissimilarity matrix of the rows of x, float64.

    Computed once per distinct row and gathered, so identical rows (at small G many tokens decode to b_dec
    alone) are exactly 0 apart and exactly as far from any third row: a product over all rows leaves those
    ties ±1e-16 apart, and Spearman would rank them arbitrarily."""
    uniq, same = torch.unique(x.double(), dim=0, return_inverse=True)  # same[i]: which distinct row x[i] is
    if metric == "cosine":
        u = uniq / uniq.norm(dim=1, keepdim=True).clamp_min(1e-12)
        d = 1 - u @ u.t()
    elif metric == "euclidean":
        d = torch.cdist(uniq, uniq)
    else:
        raise ValueError(f"unknown metric {metric!r}")
    d.fill_diagonal_(0)
    i, j = torch.triu_indices(len(x), len(x), offset=1)
    a, b = same[i], same[j]
    return d[torch.minimum(a, b), torch.maximum(a, b)]  # one value per pair of distinct rows (d is not symmetric)


def _rank(v: torch.Tensor) -> torch.Tensor:
    """0-based ranks with ties averaged (as Spearman's correlation needs)."""
    order = v.argsort()
    _, inverse, counts = torch.unique_consecutive(v[order], return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = torch.empty_like(v)
    ranks[order] = (ends - (counts.double() + 1) / 2)[inverse]  # mean position of each tie group
    return ranks


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-300))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return pearson(_rank(a), _rank(b))


def rsa(x: torch.Tensor, x_hat: torch.Tensor) -> dict:
    """{"cosine": {"pearson", "spearman"}, "euclidean": {...}} between rows of x [n, d] and x_hat [n, d]."""
    out = {}
    for metric in ("cosine", "euclidean"):
        a, b = dissimilarities(x, metric), dissimilarities(x_hat, metric)
        out[metric] = {"pearson": pearson(a, b), "spearman": spearman(a, b)}
    return out


def _rank_matrix(x: torch.Tensor) -> torch.Tensor:
    """Symmetric [n, n] matrix of the cosine dissimilarities' Spearman ranks (diagonal 0)."""
    n = len(x)
    i, j = torch.triu_indices(n, n, offset=1)
    r = _rank(dissimilarities(x, "cosine"))
    m = torch.zeros(n, n, dtype=torch.float64)
    m[i, j] = r
    return m + m.t()


def spearman_replicates(x: torch.Tensor, x_hat: torch.Tensor, W: torch.Tensor, ranks_x=None) -> torch.Tensor:
    """Bootstrap replicates [n_boot] of the cosine-Spearman RSA: the tokens of replicate b drawn W[b] times
    each, so pair (i, j) weighs W[b, i] W[b, j]; the ranks are those of the full sample (not re-ranked per
    replicate, so each replicate is five quadratic forms). With all weights 1 it is `rsa`'s value exactly."""
    A = _rank_matrix(x) if ranks_x is None else ranks_x
    B = _rank_matrix(x_hat)
    W = W.double()

    def q(M):  # sum over pairs i < j of w_i w_j M_ij, per replicate (M symmetric with zero diagonal)
        return ((W @ M) * W).sum(1) / 2

    s0 = (W.sum(1) ** 2 - (W**2).sum(1)) / 2
    sa, sb, saa, sbb, sab = q(A), q(B), q(A * A), q(B * B), q(A * B)
    return (s0 * sab - sa * sb) / ((s0 * saa - sa**2) * (s0 * sbb - sb**2)).sqrt().clamp_min(1e-300)
