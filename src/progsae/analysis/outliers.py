"""Outlier tokens: the activation-norm distribution, the share of variance in the largest tokens, which
tokens they are, and the latents that exist to reconstruct them.

A token is an outlier when its activation norm exceeds the `quantile` of the training activations' norms
(default 0.99). A latent is flagged as an outlier latent when more than half of its E[z^2] comes from
outlier tokens. The robust power-law window starts after the last flagged latent among the top N/8 ranks
by E[z^2]: the fit then describes the bulk of the dictionary, not the handful of latents that exist for a
few huge-norm tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data import ActivationDir
from ..files import load_tensor

FLAG_SHARE = 0.5  # a latent is an outlier latent when more than this share of its E[z^2] is on outlier tokens


def token_norms(acts: ActivationDir, max_tokens: int | None = None) -> dict[str, np.ndarray]:
    """Per row in stored order: the norm, and token_ids / positions where stored; and the mean row."""
    left = acts.n_tokens if max_tokens is None else min(max_tokens, acts.n_tokens)
    norms, ids, pos, sum_x, n = [], [], [], 0, 0
    for i, shard in enumerate(acts.shards):
        if left <= 0:
            break
        x = acts.load_shard(i)[:left].double()
        f = acts.path / shard["file"]
        for name, out in (("token_ids", ids), ("positions", pos)):
            t = load_tensor(f, name)
            if t is not None:
                out.append(t[: len(x)].numpy())
        norms.append(x.norm(dim=1).numpy())
        sum_x = sum_x + x.sum(0)
        n += len(x)
        left -= len(x)
    out = {"norm": np.concatenate(norms), "mean": (sum_x / n).numpy()}
    if ids:
        out["token_ids"] = np.concatenate(ids)
    if pos:
        out["positions"] = np.concatenate(pos)
    return out


def deviations(acts: ActivationDir, mean: np.ndarray, max_tokens: int | None = None) -> np.ndarray:
    """||x - mean||^2 per row in stored order."""
    left = acts.n_tokens if max_tokens is None else min(max_tokens, acts.n_tokens)
    out, m = [], torch.from_numpy(mean)
    for i in range(len(acts.shards)):
        if left <= 0:
            break
        x = acts.load_shard(i)[:left].double()
        out.append((x - m).pow(2).sum(1).numpy())
        left -= len(x)
    return np.concatenate(out)


def norm_profile(acts: ActivationDir, quantile: float = 0.99, max_tokens: int | None = None, tokenizer=None) -> dict:
    """The norm distribution of `acts` and what its largest tokens are; `threshold` is the norm at `quantile`."""
    t = token_norms(acts, max_tokens)
    norm = t["norm"]
    dev = deviations(acts, t["mean"], max_tokens)
    order = np.sort(dev)[::-1]
    total = order.sum()
    threshold = float(np.quantile(norm, quantile))
    out_mask = norm > threshold
    qs = (0.5, 0.9, 0.99, 0.999)
    prof = {
        "n_tokens": int(len(norm)),
        "quantile": quantile,
        "threshold": threshold,
        "n_outliers": int(out_mask.sum()),
        "mean_norm": float(norm.mean()),
        "norm_quantiles": {str(q): float(np.quantile(norm, q)) for q in qs} | {"max": float(norm.max())},
        "variance_share": {
            f"top_{p}%": float(order[: max(1, int(round(len(order) * p / 100)))].sum() / total) for p in (1, 5)
        },
        "outlier_variance_share": float(dev[out_mask].sum() / total),
        "histogram": _histogram(norm),
    }
    if "positions" in t:
        prof["outlier_positions"] = _top_counts(t["positions"][out_mask], 5)
    if "token_ids" in t:
        top = _top_counts(t["token_ids"][out_mask], 10)
        for row in top:
            row["token"] = tokenizer.decode([row["value"]]) if tokenizer is not None else str(row["value"])
        prof["outlier_tokens"] = top
    return prof


def _top_counts(values: np.ndarray, n: int) -> list[dict]:
    v, c = np.unique(values, return_counts=True)
    at = np.argsort(-c, kind="stable")[:n]
    return [{"value": int(v[i]), "count": int(c[i]), "share": float(c[i] / max(1, len(values)))} for i in at]


def _histogram(norm: np.ndarray, bins: int = 60) -> dict:
    edges = np.geomspace(max(norm.min(), 1e-6), norm.max() * 1.0001, bins + 1)
    counts, _ = np.histogram(norm, edges)
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def flagged_latents(e_z2: np.ndarray, e_z2_outlier: np.ndarray, share: float = FLAG_SHARE) -> np.ndarray:
    """Indices of latents with more than `share` of their E[z^2] on outlier tokens, by decreasing E[z^2]."""
    e_z2, e_out = np.asarray(e_z2, np.float64), np.asarray(e_z2_outlier, np.float64)
    flagged = np.flatnonzero((e_z2 > 0) & (e_out > share * e_z2))
    return flagged[np.argsort(-e_z2[flagged], kind="stable")]


def robust_window(e_z2: np.ndarray, flagged: np.ndarray, hi: int) -> int:
    """First rank of the robust power-law fit: after the last flagged latent among the top N/8 ranks."""
    ranks = np.empty(len(e_z2), np.int64)
    ranks[np.argsort(-np.asarray(e_z2), kind="stable")] = np.arange(1, len(e_z2) + 1)
    head = [int(ranks[i]) for i in flagged if ranks[i] <= max(1, len(e_z2) // 8)]
    lo = max(head, default=0) + 1
    return lo if hi - lo + 1 >= 3 else 1
