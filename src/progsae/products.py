"""The sparse products of a batch's code, by three paths with one contract (`kernel`: csr, gather, dense).

A code `values [B, k], indices [B, k]` (indices ascending per row) with band ends `bounds` (ascending, the
last = N; None: one band) is the sparse matrix S [B*g, N] whose row (b, j) holds token b's active latents
with bounds[j-1] <= index < bounds[j]. Every path computes the same three products:

    S.mm(D)          S @ D             D [N, d]        -> [B*g, d]   decode, grad of an encoder's input
    S.tmm(G)         S^T @ G           G [B*g, d]      -> [N, d]     grad of W_dec, of W_enc
    S.sampled(G, D)  <G[row], D[idx]>  at S's pattern  -> [B, k]     grad of the values, selected pre-acts

    csr     PyTorch's CSR products (`addmm` with a CSR operand, `sampled_addmm`): MKL on CPU, cuSPARSE on CUDA
    gather  the rows themselves: `embedding_bag` with per-sample weights for S @ D, `index_add_` of the
            weighted rows of G for S^T @ G, gathered rows and a batched dot for the sampled product
            (sparsify's and Flash-SAE's choice); temporaries bounded to GATHER_FLOATS per chunk
    dense   S as a dense [B, N] code, one GEMM per band (SAELens' computation: the reference twin)

Each is O(B k d) but the dense one (O(B N d)). Which is fastest depends on the device and the shape; training
times them on its real shape (`autotune.choose_kernel`).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

KERNELS = ("csr", "gather", "dense")
# elements of a chunk's gathered rows [c*k, d]: 16 MB in fp32 on a CPU (cache-sized); 512 MB on a GPU, where a
# chunk of a few tokens would be a kernel launch per few tokens
GATHER_FLOATS = {"cpu": 2**22, "cuda": 2**27}


def host_to(data, device, dtype=torch.long) -> torch.Tensor:
    """A small host list or tensor on `device`, without making the host wait for it (pinned and non-blocking on
    CUDA; a plain copy from pageable memory would wait for the device's queue)."""
    t = torch.as_tensor(data, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def band_crow(indices: torch.Tensor, bounds: torch.Tensor | None) -> torch.Tensor:
    """CSR row pointers [B*g + 1] splitting each token's sorted active latents at `bounds` (ascending, last = N)."""
    B, k = indices.shape
    if bounds is None:
        return torch.arange(0, B * k + 1, k, dtype=torch.long, device=indices.device)
    ends = torch.searchsorted(indices, bounds.expand(B, -1).contiguous())  # [B, g]: # < bound
    ends = ends + torch.arange(0, B * k, k, device=indices.device).unsqueeze(1)
    return torch.cat([ends.new_zeros(1), ends.reshape(-1)])


def spmm(S: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """S @ dense for a sparse CSR/CSC S, written into fresh memory that is never zero-filled (beta = 0)."""
    out = dense.new_empty(S.shape[0], dense.shape[1])
    return torch.addmm(out, S, dense, beta=0.0, out=out)


def sparse(kernel: str, values: torch.Tensor, indices: torch.Tensor, N: int, bounds: list[int] | None = None):
    """The code as S by the named path (see the module's docstring)."""
    try:
        path = {"csr": CSR, "gather": Gather, "dense": Dense}[kernel]
    except KeyError:
        raise ValueError(f"unknown kernel {kernel!r}; use one of {', '.join(KERNELS)}") from None
    return path(values, indices, N, None if bounds is None or list(bounds) == [N] else list(bounds))


class _Banded:
    def __init__(self, values, indices, N, bounds):
        self.values, self.indices, self.N, self.bounds = values, indices, N, bounds
        self.B, self.k = indices.shape
        self.g = 1 if bounds is None else len(bounds)
        self._crow = self._bounds = None

    @property
    def bounds_t(self) -> torch.Tensor:
        if self._bounds is None:
            self._bounds = host_to(self.bounds, self.indices.device)
        return self._bounds

    @property
    def crow(self) -> torch.Tensor:
        if self._crow is None:
            self._crow = band_crow(self.indices, None if self.bounds is None else self.bounds_t)
        return self._crow


class CSR(_Banded):
    def _S(self):
        return torch.sparse_csr_tensor(self.crow, self.indices.reshape(-1), self.values.reshape(-1),
                                       (self.B * self.g, self.N), check_invariants=False)  # fmt: skip

    def mm(self, D):
        return spmm(self._S(), D)

    def tmm(self, G):
        return spmm(self._S().t(), G)

    def sampled(self, G, D):
        S = torch.sparse_csr_tensor(self.crow, self.indices.reshape(-1), G.new_zeros(self.B * self.k),
                                    (self.B * self.g, self.N), check_invariants=False)  # fmt: skip
        return torch.sparse.sampled_addmm(S, G, D.t(), beta=0.0).values().view(self.B, self.k)


class Gather(_Banded):
    def _rows(self, s: int, e: int) -> torch.Tensor:
        """The row of S holding each entry of tokens s..e: b*g + band."""
        idx = self.indices[s:e]
        b = torch.arange(s, e, device=idx.device).unsqueeze(1) * self.g
        if self.bounds is None:
            return b.expand_as(idx)
        return b + torch.bucketize(idx, self.bounds_t, right=True)

    def _chunks(self, d: int):
        c = max(1, GATHER_FLOATS["cuda" if self.indices.is_cuda else "cpu"] // max(1, self.k * d))
        return [(s, min(self.B, s + c)) for s in range(0, self.B, c)]

    def mm(self, D):
        if self.bounds is None:
            return F.embedding_bag(self.indices, D, per_sample_weights=self.values, mode="sum")
        return F.embedding_bag(self.indices.reshape(-1), D, self.crow[:-1], mode="sum",
                               per_sample_weights=self.values.reshape(-1))  # fmt: skip

    def tmm(self, G):
        out = G.new_zeros(self.N, G.shape[1])
        for s, e in self._chunks(G.shape[1]):
            rows = G[self._rows(s, e).reshape(-1)] * self.values[s:e].reshape(-1, 1)
            out.index_add_(0, self.indices[s:e].reshape(-1), rows)
        return out

    def sampled(self, G, D):
        out = G.new_empty(self.B, self.k)
        for s, e in self._chunks(G.shape[1]):
            Dg = D[self.indices[s:e]]  # [c, k, d]
            if self.bounds is None:
                out[s:e] = torch.bmm(Dg, G[s:e].unsqueeze(2)).squeeze(2)
            else:
                out[s:e] = torch.linalg.vecdot(Dg, G[self._rows(s, e)])
        return out


class Dense(_Banded):
    def _ends(self):
        ends = [self.N] if self.bounds is None else self.bounds
        return list(zip([0, *ends[:-1]], ends, strict=True))

    def _z(self, values):
        return values.new_zeros(self.B, self.N).scatter_add_(1, self.indices, values)

    def mm(self, D):
        z = self._z(self.values)
        if self.g == 1:
            return z @ D
        out = D.new_empty(self.B, self.g, D.shape[1])
        for j, (a, b) in enumerate(self._ends()):
            out[:, j] = z[:, a:b] @ D[a:b]
        return out.view(self.B * self.g, -1)

    def tmm(self, G):
        z, G = self._z(self.values), G.view(self.B, self.g, -1)
        out = G.new_empty(self.N, G.shape[2])
        for j, (a, b) in enumerate(self._ends()):
            torch.mm(z[:, a:b].t(), G[:, j], out=out[a:b])
        return out

    def sampled(self, G, D):
        G = G.view(self.B, self.g, -1)
        P = G.new_empty(self.B, self.N)
        for j, (a, b) in enumerate(self._ends()):
            P[:, a:b] = G[:, j] @ D[a:b].t()
        return P.gather(1, self.indices)
