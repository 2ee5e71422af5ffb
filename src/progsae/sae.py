"""The TopK sparse autoencoder, with the paper's progressive operations: truncate and permute.

    encode   z = TopK_k(ReLU((x - b_dec) W_enc + b_enc))      kept sparse: (values [B, k], indices [B, k])
    decode   x_hat = z W_dec + b_dec                           over the k active rows only

A Matryoshka SAE is the same model trained with nested losses (train.py); what differs is the order
its latents carry meaning in, recorded in `cfg.progsae`. Parameter names and shapes are SAELens':
W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]; the directory layout is
SAELens' too (cfg.json + sae_weights.safetensors), so `sae_lens.SAE.load_from_disk` reads it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .files import ProgsaeError, load_json, load_tensors, save_json, save_tensors
from .kernels import decode_nested, topk_encode

MODES = ("prefix", "rescaled")


@dataclass
class SAEConfig:
    d_in: int
    d_sae: int
    k: int
    metadata: dict = field(default_factory=dict)  # SAELens metadata: model_name, hook_name, ...
    progsae: dict = field(default_factory=dict)  # ours, saved as metadata.progsae: granularities, permutation, ...

    def __post_init__(self):
        for name in ("d_in", "d_sae", "k"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ProgsaeError(f"SAE config: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.k > self.d_sae:
            raise ProgsaeError(f"SAE config: k={self.k} exceeds d_sae={self.d_sae}; choose k <= d_sae")


def check_device(name: str) -> torch.device:
    """torch.device(name), or a ProgsaeError if it is malformed or not on this machine."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ProgsaeError(f"device {name!r} is not a device; use cpu or cuda (cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ProgsaeError(f"device {name!r}: this torch has no CUDA device available; use the cpu device")
    return device


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

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def k(self) -> int:
        return self.cfg.k

    @torch.no_grad()
    def init_tied(self, generator: torch.Generator | None = None, b_dec: torch.Tensor | None = None) -> SAE:
        """Random unit-norm decoder rows, W_enc = W_dec^T, b_enc = 0, b_dec as given (else 0)."""
        W = torch.randn(self.d_sae, self.cfg.d_in, generator=generator).to(self.W_dec.device)
        self.W_dec.copy_(W / W.norm(dim=1, keepdim=True))
        self.W_enc.copy_(self.W_dec.t())
        self.b_enc.zero_()
        self.b_dec.copy_(b_dec if b_dec is not None else torch.zeros(self.cfg.d_in))  # copy_ crosses devices
        return self

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.cfg.d_in:
            raise ProgsaeError(
                f"activations have shape {tuple(x.shape)} but the SAE expects [n, {self.cfg.d_in}]; "
                "use activations from the layer the SAE was trained on"
            )

    def check_G(self, G: int) -> None:
        if not 1 <= G <= self.d_sae:
            raise ProgsaeError(f"granularity G={G} is outside 1..{self.d_sae} (the SAE's d_sae); pick G in that range")

    def encode(self, x: torch.Tensor, G: int | None = None, mode: str = "prefix"):
        """Sparse code of x [B, d_in] at granularity G (default: all N latents).

        prefix:   TopK over all N latents, then latents >= G dropped (their values set to 0).
        rescaled: TopK restricted to the first G latents with k_G = max(1, round(k G / N)).
        Returns (values [B, k'], indices [B, k']), indices ascending per row.
        """
        self._check_input(x)
        G = self.d_sae if G is None else G
        self.check_G(G)
        if mode == "prefix":
            values, indices, _, _ = topk_encode(x, self.W_enc, self.b_enc, self.b_dec, self.k)
            if G < self.d_sae:
                values = values * (indices < G)
            return values, indices
        if mode == "rescaled":
            k = rescaled_k(self.k, G, self.d_sae)
            values, indices, _, _ = topk_encode(x, self.W_enc[:, :G], self.b_enc[:G], self.b_dec, k)
            return values, indices
        raise ProgsaeError(f"unknown truncation mode {mode!r}; use one of {', '.join(MODES)}")

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x_hat [B, d_in] = sum of values * W_dec[indices] + b_dec."""
        return decode_nested(values, indices, self.W_dec)[:, 0] + self.b_dec

    def forward(self, x: torch.Tensor, G: int | None = None, mode: str = "prefix") -> torch.Tensor:
        """Reconstruction of x at granularity G: encode once, keep the first G latents, decode."""
        return self.decode(*self.encode(x, G, mode))

    @torch.no_grad()
    def truncate(self, G: int, k: int | None = None) -> SAE:
        """A standalone SAE of the first G latents; k defaults to the rescaled max(1, round(k G / N))."""
        self.check_G(G)
        k = rescaled_k(self.k, G, self.d_sae) if k is None else k
        progsae = dict(self.cfg.progsae, truncated_from=self.d_sae)
        if "granularities" in progsae:
            progsae["granularities"] = [m for m in progsae["granularities"] if m < G] + [G]
        small = SAE(SAEConfig(self.cfg.d_in, G, k, dict(self.cfg.metadata), progsae)).to(self.W_dec.device)
        small.W_enc.copy_(self.W_enc[:, :G])
        small.b_enc.copy_(self.b_enc[:G])
        small.W_dec.copy_(self.W_dec[:G])
        small.b_dec.copy_(self.b_dec)
        return small

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
        out = SAE(SAEConfig(self.cfg.d_in, self.d_sae, self.k, dict(self.cfg.metadata), progsae)).to(self.W_dec.device)
        order = order.to(self.W_dec.device)
        out.W_enc.copy_(self.W_enc[:, order])
        out.b_enc.copy_(self.b_enc[order])
        out.W_dec.copy_(self.W_dec[order])
        out.b_dec.copy_(self.b_dec)
        return out

    # -- files: SAELens layout ------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write `path/sae_weights.safetensors` (float32), then `path/cfg.json`, each atomically.

        Other files in `path` (a training run's checkpoint/, history.json) are left alone.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_tensors(path / "sae_weights.safetensors", {n: p.float() for n, p in self.named_parameters()})
        save_json(path / "cfg.json", self.cfg_json())
        return path

    def cfg_json(self) -> dict:
        c = asdict(self.cfg)
        return {
            "architecture": "topk",
            "d_in": c["d_in"],
            "d_sae": c["d_sae"],
            "k": c["k"],
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            # SAELens 6 keeps metadata only when it names a 6.x version; else it silently drops it
            "metadata": {"sae_lens_version": "6.0.0", **c["metadata"], "progsae": c["progsae"]},
        }

    @classmethod
    def load(cls, path: str | Path) -> SAE:
        path = Path(path)
        if not path.is_dir():
            raise ProgsaeError(f"{path}: no SAE directory here; pass a directory written by `progsae train`")
        cfg = load_json(path / "cfg.json")
        arch = cfg.get("architecture", "topk")
        if arch != "topk":
            raise ProgsaeError(f"{path}/cfg.json: architecture {arch!r} is not supported; progsae loads TopK SAEs")
        try:
            metadata = dict(cfg.get("metadata", {}))
            progsae = metadata.pop("progsae", {})
            metadata.pop("sae_lens_version", None)
            sae = cls(SAEConfig(cfg["d_in"], cfg["d_sae"], cfg["k"], metadata, progsae))
        except KeyError as e:
            raise ProgsaeError(f"{path}/cfg.json: missing field {e}; it needs d_in, d_sae and k") from None
        weights = load_tensors(path / "sae_weights.safetensors")
        with torch.no_grad():
            for name, p in sae.named_parameters():
                if name not in weights:
                    raise ProgsaeError(f"{path}/sae_weights.safetensors: tensor {name} is missing; re-save the SAE")
                if weights[name].shape != p.shape:
                    raise ProgsaeError(
                        f"{path}/sae_weights.safetensors: {name} has shape {tuple(weights[name].shape)}, "
                        f"cfg.json implies {tuple(p.shape)}; the two files do not belong together"
                    )
                p.copy_(weights[name])
        return sae
