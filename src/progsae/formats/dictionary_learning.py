"""dictionary_learning (saprmarks): trainer_i/ae.pt (a torch-saved state dict) + trainer_i/config.json.

Read with torch.load(weights_only=True): tensors only, never a pickle. `config.json` names the class:
    AutoEncoderTopK        encoder.weight [N, d], encoder.bias, decoder.weight [d, N], b_dec, k
                           default encode: per-row TopK_k(ReLU((x - b_dec) Wᵀ + b))          -> topk
    BatchTopKSAE           same tensors + threshold; default encode keeps ReLU(pre) > threshold -> batchtopk
    MatryoshkaBatchTopKSAE W_enc [d, N], b_enc, W_dec [N, d], b_dec, k, threshold, group_sizes
                           (their cumulative sums become the granularities)                   -> batchtopk
    JumpReluAutoEncoder    W_enc, b_enc, W_dec, b_dec, threshold [N]; no b_dec subtracted     -> jumprelu
    AutoEncoder            encoder.weight, encoder.bias, decoder.weight, bias; ReLU            -> relu
The saved biases and thresholds are in raw units (the trainer scales them back after normalising).
Written back as SAELens directories.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ProgsaeError
from ..files import load_json
from ..sae import SAE
from .common import build, refuse

CLASSES = ("AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder", "AutoEncoder")


def _state_dict(file: Path) -> dict:
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # an unpicklable object, a corrupt zip: both mean "not a state dict of tensors"
        raise ProgsaeError(f"{file}: not a state dict of tensors ({type(e).__name__}); pass the ae.pt of a trainer") from None
    if isinstance(sd, dict) and isinstance(sd.get("ae"), dict):  # a mid-training backup {step, ae, optimizer, ...}
        sd = sd["ae"]
    if not isinstance(sd, dict):
        raise ProgsaeError(f"{file}: holds a {type(sd).__name__}, not a state dict; pass the ae.pt of a trainer")
    return sd


def read(path: Path) -> SAE:
    file = path if path.suffix == ".pt" else path / "ae.pt"
    folder = file.parent if (file.parent / "config.json").is_file() else file.parent.parent
    config = load_json(folder / "config.json")
    trainer = config.get("trainer") or {}
    cls = trainer.get("dict_class")
    where = folder / "config.json"
    if cls not in CLASSES:
        raise refuse(where, "trainer.dict_class", cls, f"progsae reads {', '.join(CLASSES)}")
    sd = _state_dict(file)

    def get(name):
        if name not in sd:
            raise ProgsaeError(f"{file}: tensor {name} is missing; it is not a {cls} state dict")
        return sd[name]

    meta = {key: trainer[key] for key in ("lm_name", "layer", "submodule_name") if key in trainer}
    if "lm_name" in trainer:
        meta["model_name"] = trainer["lm_name"]
    if "resid_post" in str(trainer.get("submodule_name", "")) and isinstance(trainer.get("layer"), int):
        meta["hook_name"] = f"blocks.{trainer['layer']}.hook_resid_post"
    source = {"format": "dictionary_learning", "config": config, "dict_class": cls}
    progsae: dict = {}
    k = int(get("k")) if "k" in sd else trainer.get("k")
    if cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        W_enc, b_enc, W_dec, b_dec = get("encoder.weight").t(), get("encoder.bias"), get("decoder.weight").t(), get("b_dec")
        arch, threshold = ("topk", None) if cls == "AutoEncoderTopK" else ("batchtopk", get("threshold").reshape(1))
        subtract = True
    elif cls == "MatryoshkaBatchTopKSAE":
        W_enc, b_enc, W_dec, b_dec = get("W_enc"), get("b_enc"), get("W_dec"), get("b_dec")
        arch, threshold, subtract = "batchtopk", get("threshold").reshape(1), True
        progsae["granularities"] = torch.cumsum(get("group_sizes").long(), 0).tolist()
        progsae["matryoshka"] = "fixed"
    elif cls == "JumpReluAutoEncoder":
        W_enc, b_enc, W_dec, b_dec = get("W_enc"), get("b_enc"), get("W_dec"), get("b_dec")
        arch, threshold, subtract, k = "jumprelu", get("threshold"), False, None
    else:
        W_enc, b_enc, W_dec, b_dec = get("encoder.weight").t(), get("encoder.bias"), get("decoder.weight").t(), get("bias")
        arch, threshold, subtract, k = "relu", None, True, None
    if arch == "batchtopk" and float(threshold) < 0:
        raise refuse(
            file, "threshold", float(threshold),
            "the BatchTopK threshold was never set in training (-1), so the library's inference keeps every "
            "positive latent; train past threshold_start_step or use another checkpoint",
        )  # fmt: skip
    if not subtract:
        source["folded"] = ["no b_dec subtracted from the input"]
    return build(file, arch, W_enc, b_enc, W_dec, b_dec, threshold, k, subtract, meta, progsae, source)
