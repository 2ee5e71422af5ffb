"""Plain dense implementations of the SAE math: the twins the fast sparse paths are checked against."""

import torch

from progsae import SAE, SAEConfig


def make_sae(d=16, N=96, k=5, seed=0):
    """A small untied SAE with random weights (test fixture)."""
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(d, N, k)).init_tied(g, 0.1 * torch.randn(d, generator=g))
    with torch.no_grad():  # untie, so that encoder and decoder gradients differ
        sae.W_enc.add_(0.2 * torch.randn(d, N, generator=g))
        sae.b_enc.copy_(0.1 * torch.randn(N, generator=g))
    return sae


def dense_code(x, W_enc, b_enc, b_dec, k, allowed=None):
    """z [B, N]: TopK_k(ReLU((x - b_dec) W_enc + b_enc)) as a dense matrix, by masking (differentiable)."""
    pre = (x - b_dec) @ W_enc + b_enc
    if allowed is not None:
        pre = pre.masked_fill(~allowed, float("-inf"))
    idx = pre.topk(k, dim=1).indices
    mask = torch.zeros_like(pre, dtype=torch.bool).scatter(1, idx, True)
    return torch.where(mask, pre.clamp_min(0), torch.zeros_like(pre))


def dense_loss(x, W_enc, b_enc, W_dec, b_dec, k, bounds, weights, dead=None, k_aux=0, aux_coef=1 / 32):
    """sum_m c_m FVU(x, z[:, :m] W_dec[:m] + b_dec) (+ AuxK), with one decode per granularity."""
    z = dense_code(x, W_enc, b_enc, b_dec, k)
    var = (x - x.mean(0)).pow(2).sum()
    loss = 0
    for m, c in zip(bounds, weights, strict=True):
        x_hat = z[:, :m] @ W_dec[:m] + b_dec
        loss = loss + c * (x - x_hat).pow(2).sum() / var
    if k_aux:
        e = (x - (z @ W_dec + b_dec)).detach()
        allowed = dead.unsqueeze(0) & ~_in_main_code(x, W_enc, b_enc, b_dec, k)
        z_aux = dense_code(x, W_enc, b_enc, b_dec, k_aux, allowed)
        e_hat = z_aux @ W_dec
        loss = loss + aux_coef * (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    return loss


def _in_main_code(x, W_enc, b_enc, b_dec, k):
    pre = (x - b_dec) @ W_enc + b_enc
    idx = pre.topk(k, dim=1).indices
    return torch.zeros_like(pre, dtype=torch.bool).scatter(1, idx, True)
