"""EleutherAI sparsify: cfg.json + sae.safetensors, alone or as RUN/<hookpoint>/ in a training run.

    encoder.weight [N, d_in], encoder.bias [N], W_dec [N, d_in], b_dec [d_in]
    z = TopK_k(ReLU((x - b_dec) encoder.weightᵀ + encoder.bias)),  x̂ = z W_dec + b_dec

N is `num_latents`, or d_in · expansion_factor when that is 0. `multi_topk` and `normalize_decoder` only
shape training. Refused: groupmax activations, transcoders (no b_dec subtracted and another target),
skip connections (x W_skipᵀ added to x̂). For a language model `layers.L` is the output of block L:
progsae's `blocks.L.hook_resid_post`.

progsae's own fields (a permutation, granularities, the hook, training metadata) go into `progsae.json`
beside cfg.json, not into cfg.json: sparsify's loader builds its config from every key of cfg.json and
prints the ones it does not know ("Dropping extra args ..." with a whole permutation). It reads only
cfg.json and sae.safetensors, so the extra file is invisible to it. Directories written before this
(progsae's fields under cfg.json's `progsae` key) are still read.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ProgsaeError
from ..files import load_json, load_tensors, save_json, save_tensors
from ..sae import SAE
from .common import build, refuse

OURS = "progsae.json"  # progsae's fields, beside cfg.json (which sparsify reads whole)


def _hook(path: Path) -> dict:
    """model_name / hook_name from the run directory around a hookpoint folder, where it tells."""
    folder = path.parent.name if re.fullmatch(r"seed\d+", path.name) else path.name
    run = path.parent.parent if folder != path.name else path.parent
    meta = {"hookpoint": folder}
    m = re.fullmatch(r"(?:model\.)?layers\.(\d+)", folder)
    if m:
        meta["hook_name"] = f"blocks.{m.group(1)}.hook_resid_post"
    run_cfg = run / "config.json"
    if run_cfg.is_file():
        model = load_json(run_cfg).get("model")
        if isinstance(model, str):
            meta["model_name"] = model
    return meta


def read(path: Path) -> SAE:
    where = path / "cfg.json"
    cfg = load_json(where)
    if cfg.get("activation", "topk") != "topk":
        raise refuse(where, "activation", cfg["activation"], "progsae computes sparsify's topk activation only")
    if cfg.get("transcode"):
        raise refuse(where, "transcode", True, "a transcoder predicts another module's output; progsae reads SAEs")
    w = load_tensors(path / "sae.safetensors")
    if cfg.get("skip_connection") or "W_skip" in w:
        raise refuse(where, "skip_connection", True, "x W_skip is added to every reconstruction; progsae reads plain SAEs")
    for name in ("encoder.weight", "encoder.bias", "W_dec", "b_dec"):
        if name not in w:
            raise ProgsaeError(f"{path}/sae.safetensors: tensor {name} is missing; it is not a sparsify SAE file")
    try:
        d_in, k = int(cfg["d_in"]), int(cfg["k"])
        N = int(cfg.get("num_latents") or 0) or d_in * int(cfg["expansion_factor"])
    except (KeyError, TypeError, ValueError) as e:
        raise ProgsaeError(f"{where}: field {e} is missing or not a number; it needs d_in, k and num_latents") from None
    if tuple(w["W_dec"].shape) != (N, d_in):
        raise ProgsaeError(
            f"{path}: cfg.json implies {N} latents of width {d_in} but W_dec has shape {tuple(w['W_dec'].shape)}; "
            "the two files do not belong together"
        )
    progsae = dict(load_json(path / OURS) if (path / OURS).is_file() else cfg.get("progsae") or {})
    meta = {**_hook(path), **progsae.pop("metadata", {})}
    return build(
        where, "topk", w["encoder.weight"].t(), w["encoder.bias"], w["W_dec"], w["b_dec"], k=k,
        metadata=meta, progsae=progsae, source={"format": "sparsify", "cfg": cfg},
    )  # fmt: skip


def write(sae: SAE, path: Path) -> None:
    """cfg.json (sparsify's fields only: the source's kept, ours dropped), progsae.json (ours) and
    sae.safetensors in float32."""
    if sae.architecture != "topk":
        raise ProgsaeError(f"sparsify stores TopK SAEs and this one is {sae.architecture}; write it as saelens")
    src = sae.cfg.source
    base = dict(src["cfg"]) if src.get("format") == "sparsify" else {}
    base.pop("progsae", None)  # read from an older progsae directory: ours now live in progsae.json
    progsae = dict(sae.cfg.progsae, metadata=sae.cfg.metadata)
    if src.get("format") and src["format"] != "sparsify":
        progsae.setdefault("converted_from", src["format"])
    cfg = {
        "activation": "topk",
        "expansion_factor": base.get("expansion_factor", 32),
        "normalize_decoder": base.get("normalize_decoder", True),
        "multi_topk": base.get("multi_topk", False),
        **base,
        "num_latents": sae.d_sae,
        "k": sae.k,
        "skip_connection": False,
        "transcode": False,
        "d_in": sae.cfg.d_in,
    }
    path.mkdir(parents=True, exist_ok=True)
    tensors = {"encoder.weight": sae.W_enc.t(), "encoder.bias": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    save_tensors(path / "sae.safetensors", {n: t.float() for n, t in tensors.items()})
    save_json(path / OURS, progsae)
    save_json(path / "cfg.json", cfg)  # last: it marks the SAE whole
