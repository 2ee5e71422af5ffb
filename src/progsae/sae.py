"""The sparse autoencoder, with the paper's progressive operations: truncate and permute.

    pre      = (x - b_dec) W_enc + b_enc
    topk     z = TopK_k(ReLU(pre))                          (the SAEs progsae trains)
    jumprelu z = ReLU(pre) * (pre > threshold)              (per-latent threshold [N]: Gemma Scope, SAELens)
    batchtopk  the same with one threshold for every latent  (BatchTopK SAEs at inference)
    relu     z = ReLU(pre)                                  (SAELens "standard")
    decode   x_hat = z W_dec + b_dec                         over the active rows only

Every architecture encodes to the same sparse code (`SparseCode(values [B, w], indices [B, w])`; indices
ascending, zero values are padding), which the statistics, the one-pass curve, RSA and the LM loss consume.
Per-latent parameters (threshold) permute and truncate with their latents.

A Matryoshka SAE is a TopK SAE trained with nested losses (train.py); what differs is the order its
latents carry meaning in, recorded in `cfg.progsae`. Parameter names and shapes are SAELens':
W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], threshold [d_sae]. Files in
every supported layout are read and written by `progsae.formats` (`load_sae`, `save_sae`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ProgsaeError
from .kernels import SparseCode, decode_nested, threshold_encode, topk_encode

ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "relu")
THRESHOLD_ARCHITECTURES = ("batchtopk", "jumprelu")  # those with a threshold parameter
MODES = ("prefix", "rescaled")


@dataclass
class SAEConfig:
    d_in: int
    d_sae: int
    k: int | float | None  # topk: latents per token; batchtopk: the mean L0 it was trained for (informative)
    metadata: dict = field(default_factory=dict)  # SAELens metadata: model_name, hook_name, ...
    progsae: dict = field(default_factory=dict)  # ours, saved as metadata.progsae: granularities, permutation, ...
    architecture: str = "topk"
    source: dict = field(default_factory=dict)  # a file read from another layout: format, its config (kept on write)

    def __post_init__(self):
        for name in ("d_in", "d_sae"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ProgsaeError(f"SAE config: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.architecture not in ARCHITECTURES:
            raise ProgsaeError(
                f"SAE config: architecture {self.architecture!r} is not one of {', '.join(ARCHITECTURES)}"
            )
        if self.architecture == "topk":
            if not isinstance(self.k, int) or self.k < 1:
                raise ProgsaeError(f"SAE config: k must be a positive integer for a TopK SAE, got {self.k!r}")
            if self.k > self.d_sae:
                raise ProgsaeError(f"SAE config: k={self.k} exceeds d_sae={self.d_sae}; choose k <= d_sae")
        elif self.k is not None and not (isinstance(self.k, int | float) and self.k > 0):
            raise ProgsaeError(f"SAE config: k must be a positive number or absent, got {self.k!r}")


@torch.no_grad()
def geometric_median(x: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm on the rows of x [n, d] (training's initial b_dec)."""
    m = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - m).norm(dim=1).clamp_min(1e-8)
        new = (w.unsqueeze(1) * x).sum(0) / w.sum()
        if (new - m).norm() <= tol * m.norm().clamp_min(1e-8):
            return new
        m = new
    return m


def rescaled_k(k: int, G: int, N: int) -> int:
    """The paper's k for granularity G keeping K/G constant: max(1, round(k G / N))."""
    return max(1, round(k * G / N))


class SAE(nn.Module):
    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        N, d = cfg.d_sae, cfg.d_in
        # W_enc is [d, N] as in SAELens but stored as the transpose of an [N, d] block: the encoder GEMM
        # is as fast either way, and the sparse backward then writes whole contiguous rows.
        self.W_enc = nn.Parameter(torch.zeros(N, d).t())
        self.b_enc = nn.Parameter(torch.zeros(N))
        self.W_dec = nn.Parameter(torch.zeros(N, d))
        self.b_dec = nn.Parameter(torch.zeros(d))
        if cfg.architecture in THRESHOLD_ARCHITECTURES:
            self.threshold = nn.Parameter(torch.zeros(N), requires_grad=False)
        # per-latent data carried along (permuted and truncated with the latents), e.g. SAELens' sparsity
        self.latent_data: dict[str, torch.Tensor] = {}
        # how `encode` selects (not saved): fp32, or bf16 for a TopK SAE, whose encoder GEMM and top-k then run
        # in bfloat16 and whose selected values are recomputed in fp32 (as in training with precision bf16)
        self.precision = "fp32"
        self.kernel = "csr"  # the sparse products' path of encode and decode (products.KERNELS; not saved)

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def k(self) -> int | float | None:
        return self.cfg.k

    @property
    def architecture(self) -> str:
        return self.cfg.architecture

    @property
    def modes(self) -> tuple[str, ...]:
        """The truncation modes this SAE has: rescaled (k_G = k G / N) needs a per-token k, so TopK only."""
        return MODES if self.architecture == "topk" else ("prefix",)

    @torch.no_grad()
    def init_tied(self, generator: torch.Generator | None = None, b_dec: torch.Tensor | None = None) -> SAE:
        """Random unit-norm decoder rows, W_enc = W_dec^T, b_enc = 0, b_dec as given (else 0)."""
        W = torch.randn(self.d_sae, self.cfg.d_in, generator=generator).to(self.W_dec.device)
        self.W_dec.copy_(W / W.norm(dim=1, keepdim=True))
        self.W_enc.copy_(self.W_dec.t())
        self.b_enc.zero_()
        self.b_dec.copy_(b_dec if b_dec is not None else torch.zeros(self.cfg.d_in))  # copy_ crosses devices
        return self

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove from W_dec.grad each row's component along its decoder row (training keeps rows at unit norm)."""
        g, W = self.W_dec.grad, self.W_dec
        dots = torch.bmm(g.unsqueeze(1), W.unsqueeze(2)).view(-1, 1)  # <g_i, w_i>: one pass, no [N, d] temporary
        g.addcmul_(W, dots, value=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Decoder rows rescaled to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def fold_decoder_norm(self) -> None:
        """Decoder rows rescaled to unit norm, each row's norm moved to its encoder column and bias: the same
        reconstruction for threshold-free ReLU; TopK then ranks latent i's pre-activation times that norm."""
        norm = self.W_dec.norm(dim=1).clamp_min(1e-8)
        self.W_dec.div_(norm.unsqueeze(1))
        self.W_enc.mul_(norm)
        self.b_enc.mul_(norm)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.cfg.d_in:
            raise ProgsaeError(
                f"activations have shape {tuple(x.shape)} but the SAE expects [n, {self.cfg.d_in}]; "
                "use activations from the layer the SAE was trained on"
            )

    def check_G(self, G: int) -> None:
        if not 1 <= G <= self.d_sae:
            raise ProgsaeError(f"granularity G={G} is outside 1..{self.d_sae} (the SAE's d_sae); pick G in that range")

    def encode(self, x: torch.Tensor, G: int | None = None, mode: str = "prefix") -> SparseCode:
        """Sparse code of x [B, d_in] at granularity G (default: all N latents).

        prefix:   encode with all N latents, then latents >= G dropped (their values set to 0). For the
                  threshold architectures each latent fires on its own, so this is exactly the SAE of
                  the first G latents.
        rescaled: (TopK only) TopK restricted to the first G latents with k_G = max(1, round(k G / N)).
        Returns a `SparseCode` (values [B, w], indices [B, w]): indices ascending per row, zero values as
        padding.
        """
        self._check_input(x)
        G = self.d_sae if G is None else G
        self.check_G(G)
        if mode not in MODES:
            raise ProgsaeError(f"unknown truncation mode {mode!r}; use one of {', '.join(MODES)}")
        if mode not in self.modes:
            raise ProgsaeError(
                f"rescaled truncation (k_G = k G / N) needs a TopK SAE; this {self.architecture} SAE's latents "
                "fire independently, so its first G latents are exactly the prefix mode: use mode prefix"
            )
        bf16 = self.precision == "bf16"
        if bf16 and self.architecture != "topk":
            raise ProgsaeError(
                f"precision bf16 selects a TopK SAE's latents; this {self.architecture} SAE fires by threshold, "
                "which bf16 would move: use precision fp32"
            )
        if mode == "rescaled":
            k = rescaled_k(self.k, G, self.d_sae)
            return SparseCode(*topk_encode(x, self.W_enc[:, :G], self.b_enc[:G], self.b_dec, k, bf16=bf16,
                                           kernel=self.kernel)[:2])  # fmt: skip
        if self.architecture == "topk":
            code = SparseCode(*topk_encode(x, self.W_enc, self.b_enc, self.b_dec, self.k, bf16=bf16,
                                           kernel=self.kernel)[:2])  # fmt: skip
        else:
            threshold = self.threshold if self.architecture in THRESHOLD_ARCHITECTURES else None
            code = threshold_encode(x, self.W_enc, self.b_enc, self.b_dec, threshold)
        if G < self.d_sae:
            code = SparseCode(code.values * (code.indices < G), code.indices)
        return code

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x_hat [B, d_in] = sum of values * W_dec[indices] + b_dec."""
        return decode_nested(values, indices, self.W_dec, kernel=self.kernel)[:, 0] + self.b_dec

    def forward(self, x: torch.Tensor, G: int | None = None, mode: str = "prefix") -> torch.Tensor:
        """Reconstruction of x at granularity G: encode once, keep the first G latents, decode."""
        return self.decode(*self.encode(x, G, mode))

    def _like(self, d_sae: int, k, progsae: dict) -> SAE:
        cfg = SAEConfig(
            self.cfg.d_in, d_sae, k, dict(self.cfg.metadata), progsae, self.architecture, dict(self.cfg.source)
        )
        return SAE(cfg).to(self.W_dec.device)

    def _copy_latents(self, out: SAE, sel) -> SAE:
        """out's latents are this SAE's latents `sel` (a slice or an index tensor); b_dec is shared."""
        out.W_enc.copy_(self.W_enc[:, sel])
        out.b_enc.copy_(self.b_enc[sel])
        out.W_dec.copy_(self.W_dec[sel])
        out.b_dec.copy_(self.b_dec)
        if self.architecture in THRESHOLD_ARCHITECTURES:
            out.threshold.copy_(self.threshold[sel])
        out.latent_data = {n: t[sel.cpu() if torch.is_tensor(sel) else sel].clone() for n, t in self.latent_data.items()}
        return out

    @torch.no_grad()
    def truncate(self, G: int, k: int | None = None) -> SAE:
        """A standalone SAE of the first G latents.

        TopK: k defaults to the rescaled max(1, round(k G / N)). Threshold architectures keep their
        thresholds, so the result encodes exactly as the prefix mode at G.
        """
        self.check_G(G)
        if self.architecture == "topk":
            k = rescaled_k(self.k, G, self.d_sae) if k is None else k
        elif k is None:
            k = None if self.k is None else self.k * G / self.d_sae
        progsae = dict(self.cfg.progsae, truncated_from=self.d_sae)
        if progsae.get("granularities"):
            progsae["granularities"] = [m for m in progsae["granularities"] if m < G] + [G]
        return self._copy_latents(self._like(G, k, progsae), slice(0, G))

    @torch.no_grad()
    def permute(self, order: torch.Tensor, metric: str = "custom") -> SAE:
        """The same SAE with latent i of the result being latent order[i] of this one.

        Encoding is permutation-equivariant (TopK selects the same latents), so at full size the result
        reconstructs exactly as this SAE. The order, composed with any earlier one, is kept in the config.
        """
        order = torch.as_tensor(order, dtype=torch.long)
        if order.shape != (self.d_sae,) or not torch.equal(order.sort().values, torch.arange(self.d_sae)):
            raise ProgsaeError(f"a permutation must list each of the {self.d_sae} latents exactly once")
        earlier = self.cfg.progsae.get("permutation", {}).get("order")
        total = order if earlier is None else torch.tensor(earlier)[order]
        progsae = dict(self.cfg.progsae, permutation={"metric": metric, "order": total.tolist()})
        return self._copy_latents(self._like(self.d_sae, self.k, progsae), order.to(self.W_dec.device))

    @torch.no_grad()
    def fingerprint(self) -> str:
        """A hash of the weights in latent order: statistics files record it, so those of another SAE (or of
        this one before a permutation) are refused."""
        import hashlib

        h = hashlib.blake2b(digest_size=12)
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()
