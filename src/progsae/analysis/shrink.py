"""Shrink: a standalone g-latent SAE from a large one, without training from scratch (the paper's first open
question: a prefix of a permuted SAE reconstructs poorly at small g/N, largely because its decoder was fitted
with all N latents beside it).

    truncate  the first g latents in the stored (importance) order, `SAE.truncate` (TopK: k_g = k g / N)
    refit     truncate, then re-solve the decoder and b_dec in closed form for the kept latents' codes:
              min over W [g, d] and b [d] of sum over rows ||x - z W - b||², z the truncated SAE's code of x
              (its encoder and selection rule unchanged). The normal equations are summed over the rows in
              float64 from the sparse codes (O(g² + g d) memory, O(n k_g (k_g + d)) time) and solved by least
              squares. The encoder reads x - b_dec, so b_enc absorbs the change of b_dec: every code stays as
              it was (up to float32 rounding of the folded bias). A latent that never fires on the rows keeps
              its decoder row: the rows say nothing about it.
    merge     G latents that cover the N decoder directions instead of the first G (TopK only): the unit
              decoder rows are grouped by a spherical k-means weighted by E[z²] (started farthest-first in
              importance order, so a split piece of a direction already taken never starts a group); latent j
              decodes along its group's mean direction c_j and its pre-activation is the sum over its members
              of cos(d_i, c_j) pre_i over the members with cosine >= MERGE_MIN_COS (the others are dropped): a
              latent split into pieces (same decoder row, pre-activation divided) merges back exactly. Then refit.
    distil    merge (DISTIL_FROM), then fine-tuned by the trainer for `tune.tokens` tokens (warm start).
The shrunk SAE's latents are in the order of the source's (truncate, refit) or of their groups (merge, distil).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..config import REQUIRED, opt
from ..errors import ProgsaeError
from ..sae import SAE
from ..train import TrainConfig, Trainer
from .importance import SAE_HELP, latent_stats

METHODS = ("truncate", "refit", "merge", "distil")
CHUNK = 2**24  # elements of the largest temporary (float64: 128 MB) of the normal equations and of merge
MERGE_ITERS = 10  # Lloyd iterations of the weighted spherical k-means
# a latent less aligned than this with its group's direction is left out of the merged latent (dropped, not merged):
# on the demo's 4096-latent SAE shrunk to 512, FVU 0.1885 at 0.3 against 0.1916 with every member merged
MERGE_MIN_COS = 0.3
DISTIL_FROM = "merge"  # the start distil fine-tunes
PROVENANCE = "shrink"  # the key of cfg.progsae where a shrunk SAE says how it was made


@dataclass
class ShrinkArgs:
    """`progsae shrink`'s arguments (see cli.py)."""

    sae: str = opt(REQUIRED, SAE_HELP + "; its latents in importance order (progsae permute)", positional=True)
    acts: str = opt(REQUIRED, "activation directory the refit is solved on (training rows, not held-out ones)",
                    positional=True)  # fmt: skip
    G: int = opt(REQUIRED, "latents of the shrunk SAE, fewer than the SAE's N", min=1)
    out: str = opt(REQUIRED, "SAE directory to write (the format read, SAELens' for formats progsae does not write)")
    method: str = opt("refit", "truncate (the first G latents as they are), refit (their decoder and b_dec "
                      "re-solved by least squares on ACTS), merge (G latents covering all N directions, then "
                      "refit; TopK) or distil (merge, then fine-tuned on ACTS)", choices=METHODS)  # fmt: skip
    k: int | None = opt(None, "k of a shrunk TopK SAE (default k G / N)", min=1)
    tokens: int | None = opt(None, "rows of ACTS the refit reads (default all)", min=1)
    tune_tokens: int = opt(1_000_000, "distil: tokens of ACTS the shrunk SAE is fine-tuned on", min=1)
    batch_size: int = opt(4096, "distil: tokens per fine-tuning step", min=1)
    device: str = opt("cpu", "where the SAE encodes (and distil trains): cpu or cuda")


@torch.no_grad()
def normal_equations(sae: SAE, rows: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A = [Z 1]^T [Z 1] [g+1, g+1] and B = [Z 1]^T X [g+1, d] in float64 over the rows, Z the SAE's codes."""
    g, d = sae.d_sae, sae.cfg.d_in
    A = torch.zeros(g + 1, g + 1, dtype=torch.float64)
    B = torch.zeros(g + 1, d, dtype=torch.float64)
    n = 0
    for x in rows:
        code = sae.encode(x.to(sae.W_dec.device))
        i, v, x = code.indices.cpu(), code.values.cpu().double(), x.cpu().double()
        b, w = i.shape  # zero values (padding) add nothing
        pairs = (i.unsqueeze(2) * (g + 1) + i.unsqueeze(1)).flatten()
        A.view(-1).index_add_(0, pairs, (v.unsqueeze(2) * v.unsqueeze(1)).flatten())
        A[g, :g].index_add_(0, i.flatten(), v.flatten())
        step = max(1, CHUNK // max(1, w * d))  # rows per [rows, w, d] float64 temporary
        for r in range(0, b, step):
            iv, vv, xv = i[r : r + step], v[r : r + step], x[r : r + step]
            B[:g].index_add_(0, iv.flatten(), (vv.unsqueeze(2) * xv.unsqueeze(1)).reshape(-1, d))
        B[g] += x.sum(0)
        n += b
    A[:g, g] = A[g, :g]
    A[g, g] = n
    return A, B, n


@torch.no_grad()
def refit(sae: SAE, rows: Iterable[torch.Tensor]) -> tuple[SAE, int]:
    """The SAE with its decoder and b_dec re-solved on `rows` (module doc), and the number of rows read."""
    A, B, n = normal_equations(sae, rows)
    if n == 0:
        raise ProgsaeError("refit read no activation rows; pass a directory with rows (and --tokens > 0)")
    g = sae.d_sae
    keep = torch.cat([A.diagonal()[:g] > 0, torch.tensor([True])])  # latents that fired, and the bias
    A, B = A[keep][:, keep], B[keep]
    L, info = torch.linalg.cholesky_ex(A)  # A is positive definite unless two live latents always co-fire alike
    sol = torch.cholesky_solve(B, L) if info == 0 else torch.linalg.lstsq(A, B, driver="gelsd").solution
    out = copy.deepcopy(sae)
    live = keep[:g].to(out.W_dec.device)
    out.W_dec[live] = sol[:-1].to(out.W_dec)
    b_new = sol[-1].to(out.b_dec)
    out.b_enc += (b_new - sae.b_dec) @ sae.W_enc  # (x - b_new) W_enc + b_enc' = (x - b_old) W_enc + b_enc
    out.b_dec.copy_(b_new)
    return out, n


def farthest_first(U: torch.Tensor, w: torch.Tensor, G: int) -> torch.Tensor:
    """G row indices of the unit rows U [N, d]: each next one maximises w_i (1 - its largest cosine, clamped at 0,
    to those taken); the first is the heaviest. A duplicate of a taken row scores 0 and is never taken first."""
    best = torch.zeros(U.shape[0], dtype=U.dtype)
    taken = torch.zeros(U.shape[0], dtype=torch.bool)
    out = []
    for _ in range(G):
        i = int(torch.where(taken, -1.0, w * (1 - best.clamp_min(0))).argmax())
        out.append(i)
        taken[i] = True
        best = torch.maximum(best, U @ U[i])
    return torch.tensor(out)


def check_mergeable(sae: SAE) -> None:
    if sae.architecture != "topk":
        raise ProgsaeError(f"merge adds encoder rows, which keeps a TopK SAE's splits exact but not a "
                           f"{sae.architecture} SAE's thresholds; use --method refit")  # fmt: skip


@torch.no_grad()
def merge(sae: SAE, G: int, weights: torch.Tensor, k: int | None = None) -> SAE:
    """G latents covering the N decoder directions (module doc): groups by spherical k-means weighted by `weights`
    (E[z²]), started farthest-first; latent j decodes along its group's mean direction c_j (scaled to its members'
    mean decoder norm) and its pre-activation is the sum of cos(d_i, c_j) pre_i over its members i with cosine at
    least MERGE_MIN_COS. Latents in the order their groups were started."""
    check_mergeable(sae)
    D = sae.W_dec.detach().cpu().double()
    U = D / D.norm(dim=1, keepdim=True).clamp_min(1e-30)
    w = weights.detach().cpu().double().clamp_min(0)
    U32 = U.float()  # cosines to compare in float32 (the [N, G] products), sums in float64
    seeds = farthest_first(U32, w.float(), G)
    C = U[seeds].clone()

    def nearest(C: torch.Tensor) -> torch.Tensor:  # each direction's group, [rows, G] cosines at a time
        C32, step = C.float().T, max(1, CHUNK // G)
        return torch.cat([(U32[r : r + step] @ C32).argmax(1) for r in range(0, len(U32), step)])

    for _ in range(MERGE_ITERS):
        group = nearest(C)
        S = torch.zeros_like(C).index_add_(0, group, w.unsqueeze(1) * U)
        norm = S.norm(dim=1, keepdim=True)
        C = torch.where(norm > 0, S / norm.clamp_min(1e-30), C)  # an empty group keeps its direction
    group = nearest(C)
    cos = (U * C[group]).sum(1)  # each latent's cosine to its group's direction
    cos = torch.where(cos >= MERGE_MIN_COS, cos, torch.zeros_like(cos))  # the seed of an empty group: 1 below
    empty = torch.bincount(group, minlength=G) == 0
    group[seeds[empty]], cos[seeds[empty]] = torch.nonzero(empty).flatten(), 1.0  # its seed alone
    We = torch.zeros(G, D.shape[1], dtype=torch.float64)
    We.index_add_(0, group, cos.unsqueeze(1) * sae.W_enc.detach().t().cpu().double())
    be = torch.zeros(G, dtype=torch.float64).index_add_(0, group, cos * sae.b_enc.detach().cpu().double())
    total = torch.zeros(G, dtype=torch.float64).index_add_(0, group, w + 1e-30)
    mean_norm = torch.zeros(G, dtype=torch.float64).index_add_(0, group, (w + 1e-30) * D.norm(dim=1)) / total
    out = sae.truncate(G, k)
    out.cfg.progsae.pop("permutation", None)  # its latents are no prefix of the large SAE's
    out.W_enc.copy_(We.t().to(out.W_enc))
    out.b_enc.copy_(be.to(out.b_enc))
    out.W_dec.copy_((C * mean_norm.unsqueeze(1)).to(out.W_dec))  # the members' mean decoder norm (weights w)
    return out


def shrink(sae: SAE, G: int, method: str = "refit", rows: Callable[[], Iterable[torch.Tensor]] | None = None,
           k: int | None = None, *, weights: torch.Tensor | None = None, tune: TrainConfig | None = None,
           source=None, out: str | Path | None = None, progress: bool = False) -> SAE:  # fmt: skip
    """A standalone G-latent SAE from `sae` (its latents in importance order) by `method` (module doc).

    rows     a fresh iterator of activation rows per call, what refit solves on (and merge weighs by, without
             `weights`: each latent's E[z²] in `sae`'s order)
    tune     distil: the fine-tune's TrainConfig (its tokens, batch size, ...; d_sae and k are the shrunk
             SAE's), on `source` (a training source), checkpointed in `out` (resumable)
    Provenance in cfg.progsae["shrink"]: the source's fingerprint and N, the method, the rows read per pass,
    the passes over them (`passes_N` of them with the N-latent encoder) and the fine-tune's tokens."""
    if method not in METHODS:
        raise ProgsaeError(f"unknown shrink method {method!r}; use one of {', '.join(METHODS)}")
    if not 1 <= G < sae.d_sae:
        raise ProgsaeError(f"G={G} must be in 1..{sae.d_sae - 1} (fewer latents than the SAE's {sae.d_sae}); pick a "
                           "smaller G")  # fmt: skip
    if k is not None and sae.architecture != "topk":
        raise ProgsaeError(f"--k sets a TopK SAE's k; this {sae.architecture} SAE fires by threshold: drop --k")
    if k is not None and k > G:
        raise ProgsaeError(f"k={k} exceeds G={G}; pick k <= G")
    if method == "distil" and (tune is None or source is None):
        raise ProgsaeError("distil fine-tunes on a training source: pass tune (a TrainConfig) and source")
    if method != "truncate" and rows is None:
        raise ProgsaeError(f"{method} solves on activation rows: pass rows")
    base = DISTIL_FROM if method == "distil" else method
    n = passes = passes_N = 0
    if base == "merge":
        check_mergeable(sae)  # before the weights' pass
        if weights is None:
            weights, passes_N = latent_stats(sae, rows())["e_z2"], 1
        small = merge(sae, G, weights, k)
    else:
        small = sae.truncate(G, k)
    small.precision = sae.precision  # refit solves for the codes the SAE will give (bf16 selection or not)
    if base != "truncate":
        small, n = refit(small, rows())
        passes = 1
    small.cfg.progsae[PROVENANCE] = {"from": sae.fingerprint(), "N": sae.d_sae, "method": base, "rows": n,
                                   "passes": passes, "passes_N": passes_N, "tuned_tokens": 0}  # fmt: skip
    return distil(small, tune, source, out, progress) if method == "distil" else small


def provenance(sae: SAE) -> dict:
    """How a shrunk SAE was made (`shrink`'s docstring)."""
    return sae.cfg.progsae[PROVENANCE]


def tokens_spent(prov: dict) -> int:
    """Activation rows a shrunk SAE read (its provenance): passes over the rows, then fine-tuning."""
    return prov["rows"] * (prov["passes"] + prov["passes_N"]) + prov["tuned_tokens"]


def distil(small: SAE, tune: TrainConfig, source, out: str | Path | None = None, progress: bool = False) -> SAE:
    """A shrunk TopK SAE (its `shrink` provenance kept) fine-tuned for `tune.tokens` on `source`, warm-started;
    checkpointed in `out` (resumable) and written there."""
    small = copy.deepcopy(small)
    cfg = replace(tune, d_sae=small.d_sae, k=small.k, metadata={})
    trained = cfg.steps * cfg.batch_size  # whole steps: the tokens the fine-tune reads
    small.cfg.progsae[PROVENANCE] = {**small.cfg.progsae[PROVENANCE], "method": "distil", "tuned_tokens": trained}
    return Trainer(cfg, source, out, init=small.to(cfg.device)).run(progress)
