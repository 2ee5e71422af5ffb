"""Progressive evaluation: FVU, L0 and dead fraction at every granularity G = 1..N from one encode.

For a token with active latents i_1 < ... < i_k (values v_t), the prefix reconstruction at G contains
exactly the latents with i_t < G, so its squared residual ||r||^2 is a step function of G that changes
only at the k active indices. We compute e_t = ||x - b_dec - sum_{s<=t} v_s W_dec[i_s]||^2 for t = 0..k,
scatter the steps e_t - e_{t-1} onto index i_t, and one cumulative sum over indices gives
SSE(G) = sum_tokens e_0 + sum_{i < G} step_i for every G at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ProgsaeError
from ..sae import MODES, SAE

CURVE_FLOATS = 2**20  # gathered decoder rows per scan chunk (4 MB: [c, k, d] stays in cache); 1/4 and 4x measured slower
SCAN_BLOCK = 8  # latents per block of the blocked scan


@dataclass
class ProgressiveResult:
    n_tokens: int
    fvu: np.ndarray  # [N]: fvu[G-1] = prefix-mode FVU at granularity G
    l0: np.ndarray  # [N]: mean number of active latents among the first G
    dead_frac: np.ndarray  # [N]: fraction of the first G latents that never fired
    rescaled_fvu: dict[int, float]  # G -> rescaled-mode FVU (TopK over the first G, k_G = k G / N)
    rescaled_l0: dict[int, float]  # G -> rescaled-mode mean number of active latents
    blocks: dict | None = None  # per block of consecutive tokens: the sums a bootstrap resamples (see ProgressiveEval)

    def at(self, G: int) -> dict:
        """The table row at G; fvu_typical_* (None without an outlier norm): on the typical tokens alone."""
        typical = (self.blocks or {}).get("typical")
        return {
            "G": G,
            "fvu_prefix": float(self.fvu[G - 1]),
            "fvu_rescaled": self.rescaled_fvu.get(G),
            **{f"fvu_typical_{mode}": sum(sse) / sum(typical["var"])
               if typical and (sse := typical.get(f"sse_{mode}", {}).get(G)) and sum(typical["var"]) > 0 else None
               for mode in MODES},  # fmt: skip  (None too when no held-out token is typical)
            "l0": float(self.l0[G - 1]),
            "l0_rescaled": self.rescaled_l0.get(G),
            "dead_frac": float(self.dead_frac[G - 1]),
        }


def residual_norms(W_dec: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, r0: torch.Tensor) -> torch.Tensor:
    """e [B, k]: e[b, t] = ||r0[b] - sum_{s <= t} values[b, s] W_dec[indices[b, s]]||^2.

    The running sums are a scan over the k active latents. A blocked scan keeps it in fast kernels:
    prefixes within blocks of 8 latents by one batched matmul with a v-weighted lower-triangular
    matrix, then the blocks' totals carried forward by a short cumulative sum.
    """
    B, k = values.shape
    d = r0.shape[1]
    nb = -(-k // SCAN_BLOCK)
    if nb * SCAN_BLOCK != k:  # pad with zero-valued latents: they change no residual
        pad = nb * SCAN_BLOCK - k
        values = torch.cat([values, values.new_zeros(B, pad)], 1)
        indices = torch.cat([indices, indices[:, -1:].expand(B, pad)], 1)
    tril = torch.ones(SCAN_BLOCK, SCAN_BLOCK, dtype=values.dtype, device=values.device).tril()
    e = values.new_empty(B, nb * SCAN_BLOCK)
    chunk = max(1, CURVE_FLOATS // (nb * SCAN_BLOCK * d))  # tokens per scan
    rows = W_dec.new_empty(chunk * nb * SCAN_BLOCK, d)
    P = W_dec.new_empty(chunk * nb, SCAN_BLOCK, d)
    for s in range(0, B, chunk):
        c = min(chunk, B - s)
        Wg = torch.index_select(W_dec, 0, indices[s : s + c].reshape(-1), out=rows[: c * nb * SCAN_BLOCK])
        Pc = P[: c * nb]
        torch.bmm(tril * values[s : s + c].reshape(c * nb, 1, SCAN_BLOCK), Wg.view(c * nb, SCAN_BLOCK, d), out=Pc)
        totals = Pc[:, -1].reshape(c, nb, d)  # each block's sum
        start = r0[s : s + c].unsqueeze(1) - (totals.cumsum(1) - totals)  # residual entering each block
        torch.sub(start.reshape(c * nb, 1, d), Pc, out=Pc)
        e[s : s + c] = torch.linalg.vector_norm(Pc, dim=-1).square_().view(c, -1)
    return e[:, :k]


class ProgressiveEval:
    """Accumulates the one-pass prefix curve (and rescaled FVU at chosen G) over batches of activations.

    With `block_G` and `block_size`, it also keeps, per block of `block_size` consecutive rows (rows in
    stored order: a block is about one context), the squared residual at each G of `block_G` in both modes
    and the block's squared deviation from the overall mean: FVU = sum(sse) / sum(var) over any resample
    of blocks, which is what a block bootstrap of the held-out tokens needs.

    With `outlier_norm` as well, the same sums over the typical tokens alone (norm <= outlier_norm; see
    analysis/outliers.py), their deviations still from the mean of all tokens: the typical tokens' FVU, and
    FVU over all tokens is the variance-weighted mean of the typical and the outlier tokens' FVU.
    """

    def __init__(self, sae: SAE, rescaled_G: Iterable[int] = (), block_G: Iterable[int] = (), block_size: int = 128,
                 outlier_norm: float | None = None):  # fmt: skip
        self.sae = sae
        N, d = sae.d_sae, sae.cfg.d_in
        self.rescaled_G = sorted(set(rescaled_G))
        self.block_G, self.block_size = sorted(set(block_G)), block_size
        self.outlier_norm = outlier_norm if self.block_G else None
        for G in self.rescaled_G + self.block_G:
            sae.check_G(G)
        empty = torch.zeros(0, dtype=torch.float64)
        self.blk = {"sum_x2": empty, "sum_x": torch.zeros(0, d, dtype=torch.float64), "n": empty}
        for G in self.block_G:
            self.blk[f"prefix:{G}"] = empty
            if G in self.rescaled_G:
                self.blk[f"rescaled:{G}"] = empty
        if self.outlier_norm is not None:
            self.blk.update({f"typical:{key}": v for key, v in self.blk.items()})
        self.steps = torch.zeros(N, dtype=torch.float64)
        self.counts = torch.zeros(N, dtype=torch.float64)
        self.sse0 = torch.zeros((), dtype=torch.float64)
        self.sum_x = torch.zeros(d, dtype=torch.float64)
        self.sum_x2 = torch.zeros((), dtype=torch.float64)
        self.rescaled_sse = {G: torch.zeros((), dtype=torch.float64) for G in self.rescaled_G}
        self.rescaled_active = {G: 0.0 for G in self.rescaled_G}
        self.n = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        sae = self.sae
        x = x.to(sae.W_dec.device)
        values, indices = sae.encode(x)
        r0 = x - sae.b_dec
        e0 = torch.linalg.vector_norm(r0, dim=-1).square_()  # [B]: ||r||^2 with no latent
        e = residual_norms(sae.W_dec, values, indices, r0)  # [B, k]: after the first t+1 active latents
        step = e - torch.cat([e0.unsqueeze(1), e[:, :-1]], 1)
        idx = indices.reshape(-1).cpu()  # the accumulators stay on the CPU, in float64
        self.steps.index_add_(0, idx, step.reshape(-1).double().cpu())
        self.sse0 += e0.double().sum().cpu()
        self.counts.index_add_(0, idx, (values > 0).reshape(-1).double().cpu())
        xd = x.double()
        self.sum_x += xd.sum(0).cpu()
        self.sum_x2 += xd.pow(2).sum().cpu()
        per_token = {}
        for G in self.rescaled_G:
            v, i = sae.encode(x, G, "rescaled")
            r = (x - sae.decode(v, i)).double().pow(2).sum(1).cpu()
            self.rescaled_sse[G] += r.sum()
            self.rescaled_active[G] += float((v > 0).sum())
            per_token[f"rescaled:{G}"] = r
        if self.block_G:
            for G in self.block_G:
                per_token[f"prefix:{G}"] = (e0 + (step * (indices < G)).sum(1)).double().cpu()
            per_token["sum_x2"], per_token["sum_x"] = xd.pow(2).sum(1).cpu(), xd.cpu()
            per_token["n"] = torch.ones(x.shape[0], dtype=torch.float64)
            if self.outlier_norm is not None:
                typical = (xd.norm(dim=1) <= self.outlier_norm).double().cpu()
                per_token |= {f"typical:{key}": t * (typical if t.dim() == 1 else typical[:, None])
                              for key, t in per_token.items()}  # fmt: skip
            block = torch.arange(self.n, self.n + x.shape[0]) // self.block_size
            n_blocks = int(block[-1]) + 1
            for key, t in per_token.items():
                acc = self.blk.get(key)
                if acc is None:
                    continue
                if acc.shape[0] < n_blocks:  # blocks may span batches: grow, then add this batch's rows
                    acc = self.blk[key] = torch.cat([acc, acc.new_zeros(n_blocks - acc.shape[0], *acc.shape[1:])])
                acc.index_add_(0, block, t)
        self.n += x.shape[0]

    def _block_sums(self, tag: str = "") -> dict:
        """Per block: var (squared deviation from the mean of all tokens) and sse_<mode> {G: ...}, of the rows
        the `tag` names ("": all; "typical:": the typical ones)."""
        mean, b = self.sum_x / self.n, {k.removeprefix(tag): v for k, v in self.blk.items() if k.startswith(tag)}
        return {
            "var": (b["sum_x2"] - 2 * b["sum_x"] @ mean + b["n"] * mean.pow(2).sum()).tolist(),
            **{
                f"sse_{mode}": {G: b[f"{mode}:{G}"].tolist() for G in self.block_G if f"{mode}:{G}" in b}
                for mode in ("prefix", "rescaled")
                if any(f"{mode}:{G}" in b for G in self.block_G)
            },
        }

    def total_variance(self) -> float:
        return float(self.sum_x2 - self.sum_x.pow(2).sum() / self.n)

    def result(self) -> ProgressiveResult:
        if self.n == 0:
            raise ProgsaeError("no activations were evaluated; check the activation directory")
        var = self.total_variance()
        N = self.sae.d_sae
        G = torch.arange(1, N + 1, dtype=torch.float64)
        blocks = None
        if self.block_G:
            blocks = {"size": self.block_size, **self._block_sums()}
            if self.outlier_norm is not None:
                blocks["typical"] = {"outlier_norm": self.outlier_norm, "n_tokens": int(self.blk["typical:n"].sum()),
                                     **self._block_sums("typical:")}  # fmt: skip
        return ProgressiveResult(
            n_tokens=self.n,
            fvu=((self.sse0 + self.steps.cumsum(0)) / var).numpy(),
            l0=(self.counts.cumsum(0) / self.n).numpy(),
            dead_frac=((self.counts == 0).double().cumsum(0) / G).numpy(),
            rescaled_fvu={g: float(s / var) for g, s in self.rescaled_sse.items()},
            rescaled_l0={g: a / self.n for g, a in self.rescaled_active.items()},
            blocks=blocks,
        )


def progressive_eval(sae: SAE, batches: Iterable[torch.Tensor], rescaled_G: Iterable[int] = ()) -> ProgressiveResult:
    """One pass over `batches`: the prefix-mode curve at every G, and rescaled FVU at `rescaled_G`."""
    acc = ProgressiveEval(sae, rescaled_G)
    for x in batches:
        acc.update(x)
    return acc.result()


@torch.no_grad()
def fvu_at(sae: SAE, batches: Iterable[torch.Tensor], Gs: Iterable[int], mode: str = "prefix") -> dict[int, float]:
    """Brute force: FVU of the reconstruction truncated to each G, one decode per G (the reference)."""
    if mode not in MODES:
        raise ProgsaeError(f"unknown truncation mode {mode!r}; use one of {', '.join(MODES)}")
    Gs = list(Gs)
    sse = dict.fromkeys(Gs, 0.0)
    xs = []
    for x in batches:
        xs.append(x.double())
        for G in Gs:
            sse[G] += float((x - sae(x, G, mode)).double().pow(2).sum())
    allx = torch.cat(xs)
    var = float((allx - allx.mean(0)).pow(2).sum())
    return {G: s / var for G, s in sse.items()}


def default_grid(N: int) -> list[int]:
    """Powers of two from N/64 up to N (and N itself): the G at which results are tabled."""
    grid = {N}
    g = N
    while g >= max(1, N // 64):
        grid.add(g)
        g //= 2
    return sorted(grid)


__all__ = ["ProgressiveEval", "ProgressiveResult", "progressive_eval", "fvu_at", "default_grid"]
