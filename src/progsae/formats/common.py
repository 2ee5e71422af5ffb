"""What every reader shares: weights to float64 for the folds, shape checks, one float32 SAE out."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ProgsaeError
from ..sae import SAE, SAEConfig


def refuse(where: Path | str, field: str, value, fix: str) -> ProgsaeError:
    return ProgsaeError(f"{where}: {field} = {value!r} is not computed by progsae; {fix}")


def build(
    where: Path | str,
    architecture: str,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    threshold: torch.Tensor | None = None,
    k=None,
    subtract_b_dec: bool = True,
    metadata: dict | None = None,
    progsae: dict | None = None,
    source: dict | None = None,
) -> SAE:
    """A float32 SAE from tensors named as in SAELens (W_enc [d, N], W_dec [N, d]); with subtract_b_dec
    False (pre = x W_enc + b_enc) the bias is folded: b_enc + b_dec W_enc, computed in float64."""
    if W_dec.ndim != 2:
        raise ProgsaeError(f"{where}: the decoder has shape {tuple(W_dec.shape)}, expected [d_sae, d_in]")
    N, d = W_dec.shape
    t = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if threshold is not None:
        t["threshold"] = threshold.expand(N) if threshold.numel() == 1 else threshold
    want = {"W_enc": (d, N), "b_enc": (N,), "W_dec": (N, d), "b_dec": (d,), "threshold": (N,)}
    for name, v in t.items():
        if tuple(v.shape) != want[name]:
            raise ProgsaeError(
                f"{where}: {name} has shape {tuple(v.shape)}, expected {want[name]} from the decoder's [{N}, {d}]; "
                "the file is damaged or not of this kind"
            )
    t = {n: v.detach().to(torch.float64) for n, v in t.items()}
    if not subtract_b_dec:
        t["b_enc"] = t["b_enc"] + t["b_dec"] @ t["W_enc"]
    cfg = SAEConfig(d, N, k, dict(metadata or {}), dict(progsae or {}), architecture, dict(source or {}))
    sae = SAE(cfg)
    with torch.no_grad():
        for name, v in t.items():
            getattr(sae, name).copy_(v)
    return sae


def fold_decoder_norms(W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor):
    """Codes computed as pre·n with decoder rows divided by n (n = row norms, clamped at 1e-8 as SAELens
    does), as unit-norm weights: W_enc·n, b_enc·n, W_dec/n. A threshold needs no change: it already
    compares the rescaled pre-activation."""
    n = W_dec.double().norm(dim=1).clamp(min=1e-8)
    return W_enc.double() * n, b_enc.double() * n, W_dec.double() / n[:, None]
