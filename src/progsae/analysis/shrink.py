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
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..config import REQUIRED, opt
from ..errors import ProgsaeError
from ..sae import SAE
from .importance import SAE_HELP

METHODS = ("truncate", "refit")


@dataclass
class ShrinkArgs:
    """`progsae shrink`'s arguments (see cli.py)."""

    sae: str = opt(REQUIRED, SAE_HELP + "; its latents in importance order (progsae permute)", positional=True)
    acts: str = opt(REQUIRED, "activation directory the refit is solved on (training rows, not held-out ones)",
                    positional=True)  # fmt: skip
    G: int = opt(REQUIRED, "latents of the shrunk SAE: the first G, fewer than the SAE's N", min=1)
    out: str = opt(REQUIRED, "SAE directory to write (the format read, SAELens' for formats progsae does not write)")
    method: str = opt("refit", "truncate (the first G latents as they are) or refit (their decoder and b_dec "
                      "re-solved by least squares on ACTS)", choices=METHODS)  # fmt: skip
    k: int | None = opt(None, "k of a shrunk TopK SAE (default k G / N)", min=1)
    tokens: int | None = opt(None, "rows of ACTS the refit reads (default all)", min=1)
    device: str = opt("cpu", "where the SAE encodes: cpu or cuda")


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
        B[:g].index_add_(0, i.flatten(), (v.unsqueeze(2) * x.unsqueeze(1)).reshape(b * w, d))
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


def shrink(sae: SAE, G: int, method: str = "refit", rows: Iterable[torch.Tensor] = (), k: int | None = None) -> SAE:
    """A standalone G-latent SAE from `sae`'s first G latents (in its stored order) by `method`; `rows`: the
    activations refit solves on. Its provenance (source fingerprint, N, method, rows read) is in cfg.progsae."""
    if method not in METHODS:
        raise ProgsaeError(f"unknown shrink method {method!r}; use one of {', '.join(METHODS)}")
    if not 1 <= G < sae.d_sae:
        raise ProgsaeError(f"G={G} must be in 1..{sae.d_sae - 1} (fewer latents than the SAE's {sae.d_sae}); pick a "
                           "smaller G")  # fmt: skip
    if k is not None and sae.architecture != "topk":
        raise ProgsaeError(f"--k sets a TopK SAE's k; this {sae.architecture} SAE fires by threshold: drop --k")
    if k is not None and k > G:
        raise ProgsaeError(f"k={k} exceeds G={G}; pick k <= G")
    small = sae.truncate(G, k)
    n = 0
    if method == "refit":
        small, n = refit(small, rows)
    small.cfg.progsae["shrink"] = {"from": sae.fingerprint(), "N": sae.d_sae, "method": method, "rows": n}
    return small
