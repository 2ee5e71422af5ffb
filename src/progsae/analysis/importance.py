"""Latent importance: streaming statistics over activations, decoder-covariance spectrum, sort-by-importance.

Statistics file (safetensors): e_z2, e_z, freq, max  [N] float64, plus dec_cov_eigs [d_in] descending;
metadata: n_tokens, sae (the SAE's path, if known), fingerprint (`SAE.fingerprint()` of the SAE they describe).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import dist
from ..config import REQUIRED, opt
from ..errors import ProgsaeError
from ..files import load_tensors, save_tensors, tensors_metadata
from ..sae import SAE
from ..train import PRECISIONS

METRICS = ("e_z2", "freq", "e_z", "max")

SAE_HELP = (  # what `formats.load_sae` reads: the help of every command's SAE argument
    "SAE: a directory of progsae, SAELens, sparsify (or a sparsify run directory with one hookpoint) or "
    "dictionary_learning (trainer_i/), a Gemma Scope params.npz, or a hub id owner/repo[/folder] (network)"
)
PRECISION_HELP = ("encoder GEMM and top-k of a TopK SAE: fp32, bf16 (selected values recomputed in fp32, as in "
                  "training) or auto (bf16 where this machine's bf16 GEMM is 1.5x faster)")  # fmt: skip


@dataclass
class StatsArgs:
    """`progsae stats`'s arguments (see cli.py)."""

    sae: str = opt(REQUIRED, SAE_HELP, positional=True)
    acts: str = opt(REQUIRED, "activation directory", positional=True)
    out: str = opt(REQUIRED, "statistics file (.safetensors)")
    tokens: int | None = opt(None, "use at most this many tokens (default all)", min=1)
    precision: str = opt("fp32", PRECISION_HELP, choices=PRECISIONS)


@dataclass
class PermuteArgs:
    """`progsae permute`'s arguments (see cli.py)."""

    sae: str = opt(REQUIRED, SAE_HELP, positional=True)
    stats: str = opt(REQUIRED, "statistics file from `progsae stats`")
    out: str = opt(REQUIRED, "SAE directory to write")
    by: str = opt("e_z2", "importance metric", choices=METRICS)
    format: str | None = opt(None, "layout to write (default: the one read; dictionary_learning and Gemma Scope "
                             "sources as saelens)", choices=("saelens", "sparsify"))  # fmt: skip


@torch.no_grad()
def latent_stats(
    sae: SAE, batches: Iterable[torch.Tensor], outlier_norm: float | None = None, reduce: bool = False
) -> dict:
    """E[z_i^2], E[z_i], firing frequency and max of every latent over all rows of `batches`; with
    `outlier_norm`, also e_z2_outlier: the part of E[z_i^2] from rows whose norm exceeds it. `reduce`:
    under torchrun each rank read its own batches; sums, counts and maxima are reduced over the ranks."""
    N = sae.d_sae
    s2, s1, fired, s2_out = (torch.zeros(N, dtype=torch.float64) for _ in range(4))
    mx = torch.zeros(N)
    n = 0
    device = sae.W_dec.device
    for x in batches:
        values, indices = sae.encode(x.to(device))
        idx, v = indices.reshape(-1).cpu(), values.reshape(-1).cpu()  # accumulate on the CPU, in float64
        s1.index_add_(0, idx, v.double())
        s2.index_add_(0, idx, v.double().pow(2))
        fired.index_add_(0, idx, (v > 0).double())
        mx.scatter_reduce_(0, idx, v, reduce="amax")
        if outlier_norm is not None:
            out = (x.norm(dim=1) > outlier_norm).to(indices.device)
            s2_out.index_add_(0, indices[out].reshape(-1).cpu(), values[out].reshape(-1).cpu().double().pow(2))
        n += x.shape[0]
    if reduce:
        for t in (s2, s1, fired, s2_out):
            dist.all_sum(t)
        dist.all_max(mx)
        n = int(dist.all_sum(torch.tensor([n], dtype=torch.float64)).item())
    if n == 0:
        raise ProgsaeError("no activations to compute statistics on; check the activation directory")
    extra = {} if outlier_norm is None else {"e_z2_outlier": s2_out / n}
    return extra | {
        "e_z2": s2 / n,
        "e_z": s1 / n,
        "freq": fired / n,
        "max": mx.double(),
        "dec_cov_eigs": decoder_cov_eigs(sae),
        "n_tokens": torch.tensor(n),
        "fingerprint": sae.fingerprint(),
    }


@torch.no_grad()
def decoder_cov_eigs(sae: SAE) -> torch.Tensor:
    """Eigenvalues (descending, float64) of the covariance of the decoder rows, a [d_in, d_in] matrix."""
    return torch.linalg.eigvalsh(torch.cov(sae.W_dec.detach().double().cpu().t())).flip(0)


def importance_order(stats: dict[str, torch.Tensor], metric: str = "e_z2") -> torch.Tensor:
    """Latent indices, most important first (stable for ties)."""
    if metric not in METRICS:
        raise ProgsaeError(f"unknown importance metric {metric!r}; use one of {', '.join(METRICS)}")
    return torch.sort(stats[metric], descending=True, stable=True).indices


def sort_by_importance(sae: SAE, stats: dict[str, torch.Tensor], metric: str = "e_z2") -> SAE:
    """The SAE with latents reordered by decreasing `metric`; identical reconstructions at full size."""
    if stats[metric].shape != (sae.d_sae,):
        raise ProgsaeError(
            f"statistics cover {stats[metric].shape[0]} latents but the SAE has {sae.d_sae}; "
            "compute them with `progsae stats` on this SAE"
        )
    return sae.permute(importance_order(stats, metric), metric)


def save_stats(path: str | Path, stats: dict, sae_path: str = "") -> None:
    save_tensors(
        path,
        {k: v for k, v in stats.items() if k not in ("n_tokens", "fingerprint")},
        {"n_tokens": str(int(stats["n_tokens"])), "sae": str(sae_path), "fingerprint": stats["fingerprint"]},
    )


def load_stats(path: str | Path, sae: SAE | None = None) -> dict:
    """A statistics file; with `sae`, refused unless it was computed for exactly that SAE (same weights, same
    latent order)."""
    stats = load_tensors(path)
    missing = [m for m in METRICS if m not in stats]
    if missing:
        raise ProgsaeError(f"{path}: missing {', '.join(missing)}; it is not a statistics file from `progsae stats`")
    meta = tensors_metadata(path)
    stats["n_tokens"] = torch.tensor(int(meta.get("n_tokens", 0)))
    stats["fingerprint"] = meta.get("fingerprint")
    if sae is not None and stats["fingerprint"] != sae.fingerprint():
        whose = f"another SAE ({meta['sae']})" if meta.get("sae") else "another SAE"
        if stats["fingerprint"] is None:
            whose = "an unrecorded SAE (the file predates fingerprints)"
        raise ProgsaeError(
            f"{path} holds statistics of {whose}, not of this one (other weights or latent order); "
            "compute them with `progsae stats` on this SAE"
        )
    return stats
