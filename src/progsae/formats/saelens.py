"""SAELens directories: cfg.json + sae_weights.safetensors (+ sparsity.safetensors). progsae's own SAEs
are written in this layout, with progsae's fields under metadata.progsae.

Read: SAELens 6 configs and pre-6 ones (`activation_fn[_str]: topk` + `activation_fn_kwargs.k` is a TopK
SAE; `hook_point` is the old `hook_name`). Architectures: standard (ReLU), topk, jumprelu, and the
training checkpoints batchtopk / matryoshka_batchtopk (inference by `topk_threshold`; matryoshka_widths
become granularities). Folded into the weights, exactly:
    rescale_acts_by_decoder_norm: true   W_enc·n, b_enc·n, W_dec/n  (n = decoder row norms)
    apply_b_dec_to_input: false          b_enc + b_dec W_enc
    normalize_activations: expected_average_only_in, with the scaling factor f of activation_scaler.json
                                         beside it: W_enc·f, W_dec/f, b_dec/f (SAE(f x) / f, as trained)
    log_threshold                        threshold = exp(log_threshold)
    scaling_factor (pre-6, finetuning)   W_dec·s
Refused: other normalisations (per-token constant_norm_rescale, layer_norm; covariance_whitening),
reshape_activations, gated and other architectures.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ProgsaeError
from ..files import load_json, load_tensors, save_json, save_tensors
from ..sae import SAE
from .common import build, fold_decoder_norms, refuse

ARCH_IN = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "batchtopk",
           "matryoshka_batchtopk": "batchtopk"}  # fmt: skip
ARCH_OUT = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
META_FROM_PRE6 = ("model_name", "hook_name", "hook_layer", "hook_head_index", "context_size", "prepend_bos",
                  "dataset_path", "model_from_pretrained_kwargs", "neuronpedia_id")  # fmt: skip


def _version(cfg: dict) -> str | None:
    return cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")


def _from_pre6(cfg: dict, where: Path) -> dict:
    """A pre-6 config as a 6.x one (SAELens' own handle_pre_6_0_config, for the fields that matter here)."""
    new = {{"hook_point": "hook_name", "activation_fn_str": "activation_fn"}.get(k, k): v for k, v in cfg.items()}
    new.setdefault("apply_b_dec_to_input", True)
    new.setdefault("architecture", "standard")
    fn = new.get("activation_fn", "relu")
    if fn == "topk" and (new.get("activation_fn_kwargs") or {}).get("k") is not None:
        new["architecture"], new["k"] = "topk", new["activation_fn_kwargs"]["k"]
    elif new["architecture"] == "standard" and fn != "relu":
        raise refuse(where, "activation_fn", fn, "progsae computes relu and topk activations only")
    norm = new.get("normalize_activations")  # pre-6: a bool or null
    if norm is None or norm is False:
        new["normalize_activations"] = "none"
    elif norm is True:
        new["normalize_activations"] = "expected_average_only_in"
    new["metadata"] = {k: new[k] for k in META_FROM_PRE6 if k in new}
    return new


def read(path: Path) -> SAE:
    raw = load_json(path / "cfg.json")
    pre6 = not _version(raw) or int(str(_version(raw)).split(".")[0]) < 6
    where = path / "cfg.json"
    cfg = _from_pre6(raw, where) if pre6 else dict(raw)
    arch = cfg.get("architecture")
    if arch not in ARCH_IN:
        raise refuse(where, "architecture", arch, f"progsae reads {', '.join(ARCH_IN)} SAEs")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise refuse(where, "reshape_activations", cfg["reshape_activations"], "progsae reads SAEs on the residual stream")
    w = load_tensors(path / "sae_weights.safetensors")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        if name not in w:
            raise ProgsaeError(f"{path}/sae_weights.safetensors: tensor {name} is missing; it is not a {arch} SAE's file")
    W_enc, b_enc, W_dec, b_dec = (w[n].double() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if (cfg.get("d_sae"), cfg.get("d_in")) != (W_dec.shape[0], W_dec.shape[1]) and "d_sae" in cfg:
        raise ProgsaeError(
            f"{path}: cfg.json says d_sae={cfg.get('d_sae')}, d_in={cfg.get('d_in')} but W_dec has shape "
            f"{tuple(W_dec.shape)}; the two files do not belong together"
        )
    if "scaling_factor" in w and not torch.all(w["scaling_factor"] == 1):
        if not cfg.get("finetuning_scaling_factor"):
            raise refuse(where, "finetuning_scaling_factor", False, "the file has a scaling_factor tensor; fix the config")
        W_dec = W_dec * w["scaling_factor"].double()[:, None]

    threshold = None
    if arch == "jumprelu":
        if "threshold" in w:
            threshold = w["threshold"].double()
        elif "log_threshold" in w:
            threshold = w["log_threshold"].double().exp()
        else:
            raise ProgsaeError(f"{path}/sae_weights.safetensors: a jumprelu SAE needs a threshold tensor; none found")
    elif ARCH_IN[arch] == "batchtopk":
        if "topk_threshold" not in w:
            raise ProgsaeError(f"{path}/sae_weights.safetensors: a {arch} checkpoint needs topk_threshold; none found")
        threshold = w["topk_threshold"].double().reshape(1)

    if cfg.get("rescale_acts_by_decoder_norm"):
        if ARCH_IN[arch] not in ("topk", "batchtopk"):
            raise refuse(where, "rescale_acts_by_decoder_norm", True, "SAELens defines it for TopK SAEs only")
        W_enc, b_enc, W_dec = fold_decoder_norms(W_enc, b_enc, W_dec)

    norm = cfg.get("normalize_activations") or "none"
    scale = None
    if norm == "expected_average_only_in":
        scaler = path / "activation_scaler.json"
        scale = load_json(scaler).get("scaling_factor") if scaler.is_file() else None
        if scale is None:
            raise refuse(
                where, "normalize_activations", norm, "its scaling factor is not beside it (activation_scaler.json); "
                "fold it into the weights with SAELens (fold_activation_norm_scaling_factor) or, if it is folded "
                "already, set the field to none",
            )  # fmt: skip
    elif norm != "none":
        raise refuse(where, "normalize_activations", norm, "it rescales each token; fold it into the weights or "
                     "normalise the activations yourself and set the field to none")  # fmt: skip

    progsae = dict((cfg.get("metadata") or {}).get("progsae") or {})
    if arch == "matryoshka_batchtopk" and cfg.get("matryoshka_widths"):
        widths = [int(m) for m in cfg["matryoshka_widths"]]
        progsae.setdefault("granularities", widths if widths[-1] == W_dec.shape[0] else widths + [W_dec.shape[0]])
        progsae.setdefault("matryoshka", "fixed")
    architecture = ARCH_IN[arch]
    k = cfg.get("k") if architecture in ("topk", "batchtopk") else None
    meta_in = cfg.get("metadata") or {}
    trained_as = meta_in.get("training_architecture")
    if arch == "jumprelu" and threshold.unique().numel() == 1:
        # SAELens saves BatchTopK SAEs for inference as jumprelu with one threshold; progsae says so too
        if progsae.get("architecture") == "batchtopk":
            architecture, k = "batchtopk", progsae.get("k")
        elif trained_as in ("batchtopk", "matryoshka_batchtopk"):
            details = meta_in.get("training_architecture_details") or {}
            architecture, k = "batchtopk", details.get("k")
            widths = [int(m) for m in details.get("matryoshka_widths") or []]
            if trained_as == "matryoshka_batchtopk" and widths:
                progsae.setdefault("granularities", widths if widths[-1] == W_dec.shape[0] else widths + [W_dec.shape[0]])
                progsae.setdefault("matryoshka", "fixed")
    if architecture == "topk" and not isinstance(k, int):
        raise ProgsaeError(f"{where}: a topk SAE needs an integer k, got {k!r}")
    metadata = {key: v for key, v in (cfg.get("metadata") or {}).items() if key not in ("progsae", "sae_lens_version")}
    folds = [
        name
        for name, on in (
            ("rescale_acts_by_decoder_norm", cfg.get("rescale_acts_by_decoder_norm")),
            ("apply_b_dec_to_input: false", not cfg.get("apply_b_dec_to_input", True)),
            ("normalize_activations: expected_average_only_in", scale is not None),
        )
        if on
    ]
    sae = build(
        where, architecture, W_enc, b_enc, W_dec, b_dec, threshold, k,
        subtract_b_dec=bool(cfg.get("apply_b_dec_to_input", True)),
        metadata=metadata, progsae=progsae,
        source={"format": "saelens", "cfg": raw, "pre6": pre6, "dtype": cfg.get("dtype", "float32"), "folded": folds},
    )  # fmt: skip
    if scale is not None:  # SAE(f x) / f: W_enc·f, W_dec/f, b_dec/f
        with torch.no_grad():
            sae.W_enc.mul_(scale)
            sae.W_dec.div_(scale)
            sae.b_dec.div_(scale)
    if (path / "sparsity.safetensors").is_file():
        sp = load_tensors(path / "sparsity.safetensors").get("sparsity")
        if sp is not None and sp.shape == (sae.d_sae,):
            sae.latent_data["sparsity"] = sp.clone()
    return sae


def cfg_json(sae: SAE) -> dict:
    """SAELens 6 cfg.json: the source's own SAELens fields kept, every computed field set to what the
    weights now mean (float32, b_dec applied, no rescaling or normalisation)."""
    src = sae.cfg.source
    base = dict(src["cfg"]) if src.get("format") == "saelens" and not src.get("pre6") else {}
    for key in ("matryoshka_widths", "topk_threshold_lr", "activation_fn_kwargs"):
        base.pop(key, None)
    meta = {**(base.get("metadata") or {}), **sae.cfg.metadata}
    progsae = dict(sae.cfg.progsae)
    if sae.architecture == "batchtopk":
        progsae.update(architecture="batchtopk", k=sae.k)
    if src.get("format") and src["format"] != "saelens":
        progsae.setdefault("converted_from", src["format"])
    cfg = {
        **base,
        "architecture": ARCH_OUT[sae.architecture],
        "d_in": sae.cfg.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {**meta, "sae_lens_version": "6.0.0", "progsae": progsae},
    }
    if sae.architecture == "topk":
        cfg.update(k=sae.k, rescale_acts_by_decoder_norm=False)
    else:
        cfg.pop("k", None)
        cfg.pop("rescale_acts_by_decoder_norm", None)
    # SAELens 6 keeps metadata only when it names a 6.x version; else it silently drops it
    if _version(base) and int(str(_version(base)).split(".")[0]) >= 6:
        cfg["metadata"]["sae_lens_version"] = _version(base)
    return cfg


def write(sae: SAE, path: Path) -> None:
    """cfg.json, sae_weights.safetensors (float32) and, if the SAE carries it, sparsity.safetensors.

    Other files in `path` (a training run's checkpoint/, history.json) are left alone."""
    path.mkdir(parents=True, exist_ok=True)
    names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if hasattr(sae, "threshold") else [])
    save_tensors(path / "sae_weights.safetensors", {n: getattr(sae, n).float() for n in names})
    if "sparsity" in sae.latent_data:
        save_tensors(path / "sparsity.safetensors", {"sparsity": sae.latent_data["sparsity"]})
    save_json(path / "cfg.json", cfg_json(sae))
