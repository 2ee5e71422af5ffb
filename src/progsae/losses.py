"""The training loss of one batch (`sae_loss`), on the fast paths of kernels.py.

    TopK          FVU(x, x_hat)
    Matryoshka    sum_m c_m FVU(x, x_hat_m),  x_hat_m decoded from the latents with index < m
    AuxK          + aux_coef * FVU(e, e_hat),  e = x - x_hat (detached), e_hat decoded without b_dec from
                  the top k_aux pre-activations among dead latents
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import dist
from .kernels import nested_sse, topk_encode
from .products import host_to
from .sae import SAE


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained over the batch: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


class Loss(NamedTuple):
    """What `sae_loss` returns; every number is this rank's share under torchrun."""

    loss: torch.Tensor  # the training loss, to backpropagate
    fvu: torch.Tensor  # the FVU at full size (detached)
    aux: torch.Tensor | None  # the AuxK FVU (None without dead latents or k_aux)
    values: torch.Tensor  # the batch's code [B, k] (detached)
    indices: torch.Tensor  # [B, k], ascending per row


def sae_loss(
    sae: SAE,
    x: torch.Tensor,
    *,
    bounds: list[int] | None = None,
    weights: torch.Tensor | None = None,
    dead: torch.Tensor | None = None,
    k_aux: int = 0,
    aux_coef: float = 1 / 32,
    total_var: torch.Tensor | None = None,
    bf16: bool = False,
    kernel: str = "csr",
) -> Loss:
    """Training loss for one batch x [B, d_in], with the batch's code (a `Loss`).

    bounds/weights: the Matryoshka granularities and their c_m (None: plain TopK).
    Data-parallel: x is this rank's share of the global batch and total_var the global batch's
    sum ||x - mean||^2; every returned number is this rank's share, summing over the ranks to the
    global one (so do the gradients).
    AuxK runs when `dead` is given, at width min(k_aux, number of dead latents): the one number a step reads
    back from the device, as sparsify and SAELens do (a fixed width k_aux, padded with zeros, needs no read but
    costs B·k_aux·d products per step when few or none are dead: 3-9x slower steps measured on a CPU, see
    docs/ARCHITECTURE.md's fast paths). The trainer passes `dead` only once a latent can be dead.
    """
    k_aux = min(k_aux, int(dead.sum())) if dead is not None else 0
    code = topk_encode(x, sae.W_enc, sae.b_enc, sae.b_dec, sae.k, dead if k_aux else None, k_aux, bf16, kernel)
    sse, residual = nested_sse(code.values, code.indices, sae.W_dec, x - sae.b_dec, bounds, kernel)  # [g], [B, d]
    if total_var is None:
        total_var = (x - x.mean(0)).pow(2).sum()
    w = torch.ones(1, device=x.device) if weights is None else host_to(weights, x.device, weights.dtype)
    loss = (w * sse).sum() / total_var
    full_fvu = sse[-1].detach() / total_var
    aux = None
    if k_aux:  # AuxK: dead latents reconstruct the (detached) residual, without b_dec
        aux_sse, _ = nested_sse(code.aux_values, code.aux_indices, sae.W_dec, residual, None, kernel)
        mean = dist.all_sum(residual.sum(0)) / (residual.shape[0] * dist.world())  # every rank holds an equal share
        aux = aux_sse[0] / dist.all_sum((residual - mean).pow(2).sum())
        loss = loss + aux_coef * aux
    return Loss(loss, full_fvu, aux, code.values.detach(), code.indices)
