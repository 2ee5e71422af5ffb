"""Comparisons between SAEs: feature splitting (a truncated large SAE against a native small one)."""

from __future__ import annotations

import torch

from ..sae import SAE


@torch.no_grad()
def feature_splitting(big: SAE, native: SAE, row_t: dict, row_n: dict) -> dict:
    """The first G latents of `big` (sorted) against the G-latent `native` SAE: FVU, recaptured, decoder matches."""
    G = native.d_sae
    cos = torch.nn.functional.normalize(native.W_dec, dim=1) @ torch.nn.functional.normalize(big.W_dec[:G], dim=1).t()
    best = cos.max(1).values
    return {
        "G": G,
        "fvu_truncated": row_t["fvu_rescaled"],
        "fvu_native": row_n["fvu_rescaled"],
        "recaptured_truncated": row_t.get("recaptured_rescaled"),
        "recaptured_native": row_n.get("recaptured_rescaled"),
        "matched_0.9": float((best > 0.9).float().mean()),
        "matched_0.7": float((best > 0.7).float().mean()),
        "median_max_cos": float(best.median()),
    }
