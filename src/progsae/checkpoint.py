"""Training checkpoints: write, read, and the checks that one belongs to the run resuming from it.

OUT/checkpoints/step-NNNNNNNN/ holds, each file written whole and fsynced:
    sae_weights.safetensors   the SAE's parameters by name
    state.safetensors         since_fired, rng (the sampler's generator state), adam.I.{step,exp_avg,exp_avg_sq}
                              (Adam's state of parameter I, moments in that parameter's shape)
    state.json                config, step, elapsed, history, precision, bf16_speedup, kernel, source (what the
                              batches are made of) and, for a source that has one, source_position
The newest `keep_checkpoints` are kept. A run resumes from the newest only if its config differs in
nothing but RESUMABLE, its d_in is the same and its source describes the same data.

`t` below is a `train.Trainer`: these functions read and set its sae, opt, adam_params, gen,
since_fired, step, elapsed, history, precision, bf16_speedup, kernel and kernel_timings.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .errors import ProgsaeError
from .files import fresh_dir, fsync, load_json, load_tensors, replace_dir, save_json, save_tensors

# settings a run may change between a checkpoint and its resumption
RESUMABLE = ("device", "log_every", "checkpoint_every", "keep_checkpoints", "kernel")  # kernel: same numbers


def save_checkpoint(t) -> None:
    """OUT/checkpoints/step-NNNNNNNN/, written as .tmp with every file fsynced, renamed whole; the
    newest `keep_checkpoints` are kept. A failed write (a full disk) leaves the earlier ones intact."""
    root = t.out / "checkpoints"
    final = root / f"step-{t.step:08d}"
    tmp = fresh_dir(root / f"step-{t.step:08d}.tmp")
    try:
        save_tensors(tmp / "sae_weights.safetensors", dict(t.sae.named_parameters()), durable=True)
        state = {"since_fired": t.since_fired, "rng": t.gen.get_state()}
        params = list(t.sae.parameters())
        for i, st in t.opt.state_dict()["state"].items():
            for name, v in st.items():  # moments in their parameter's shape
                state[f"adam.{i}.{name}"] = v.t() if t.adam_params[i] is not params[i] and v.dim() else v
        save_tensors(tmp / "state.safetensors", state, durable=True)
        meta = {"config": t.cfg.jsonable(), "step": t.step, "elapsed": t.elapsed, "history": t.history,
                "precision": t.precision, "bf16_speedup": t.bf16_speedup,
                "kernel": t.kernel, "kernel_seconds": t.kernel_timings}  # fmt: skip
        meta["source"] = _describe(t.source)
        if hasattr(t.source, "position"):  # where in the corpus the next batch comes from
            meta["source_position"] = t.source.position(t.cfg.batch_size, t.step)
        save_json(tmp / "state.json", meta, durable=True)
        fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)
    fsync(root)
    for old in _checkpoints(t.out)[: -t.cfg.keep_checkpoints]:
        shutil.rmtree(old)


def load_checkpoint(t, ck: Path) -> None:
    """Set the trainer's state to checkpoint `ck`'s, once it is checked to be of the same run."""
    meta = load_json(ck / "state.json")
    _check_config(t, meta)
    weights = load_tensors(ck / "sae_weights.safetensors")
    _check_data(t, meta, weights)
    state = load_tensors(ck / "state.safetensors")
    with torch.no_grad():
        for name, p in t.sae.named_parameters():
            p.copy_(weights[name])
    opt_state = {}
    for i, (a, p) in enumerate(zip(t.adam_params, t.sae.parameters(), strict=True)):
        if f"adam.{i}.step" in state:  # moments take Adam's view of the parameter (W_enc's [N, d] block)
            opt_state[i] = {"step": state[f"adam.{i}.step"]} | {
                n: torch.empty_like(p).copy_(state[f"adam.{i}.{n}"]).t() if a is not p
                else torch.empty_like(p).copy_(state[f"adam.{i}.{n}"])
                for n in ("exp_avg", "exp_avg_sq")
            }
    t.opt.load_state_dict({"state": opt_state, "param_groups": t.opt.state_dict()["param_groups"]})
    t.since_fired = state["since_fired"].to(t.device)
    t.gen.set_state(state["rng"])
    t.step, t.elapsed, t.history = meta["step"], meta["elapsed"], meta["history"]
    # auto's choice as measured when the run began (checkpoints before precision existed were fp32)
    t.precision, t.bf16_speedup = meta.get("precision", "fp32"), meta.get("bf16_speedup")
    t.kernel, t.kernel_timings = meta.get("kernel", "csr"), meta.get("kernel_seconds")  # before kernels: csr


def _check_config(t, meta: dict) -> None:
    """The checkpoint's config equals the run's in every field but RESUMABLE (a field it predates: its default)."""
    ours, theirs = t.cfg.jsonable(), {**type(t.cfg)().jsonable(), **meta["config"]}
    diff = sorted(k for k in ours if k not in RESUMABLE and theirs[k] != ours[k])
    if diff:
        raise ProgsaeError(
            f"{t.out} holds a checkpoint of a different run (differs in {', '.join(diff)}); "
            "use another --out, or --force to start over"
        )


def _check_data(t, meta: dict, weights: dict) -> None:
    """The checkpoint's SAE has the run's d_in, and its source described the same data (if it said)."""
    if weights["W_dec"].shape != t.sae.W_dec.shape:
        raise ProgsaeError(
            f"{t.out} holds a checkpoint for d_in={weights['W_dec'].shape[1]}, but these activations have "
            f"d_in={t.sae.cfg.d_in}; use another --out, or --force to start over"
        )
    if meta.get("source", _describe(t.source)) != _describe(t.source):
        raise ProgsaeError(
            f"{t.out} holds a checkpoint trained on other data (its source: {json.dumps(meta['source'])[:300]}); "
            "train on the same data, or use another --out, or --force to start over"
        )


def _checkpoints(out: Path) -> list[Path]:
    """OUT's complete checkpoints, oldest first (a `.tmp` one was never finished)."""
    root = out / "checkpoints"
    return sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")) if root.is_dir() else []


def latest_checkpoint(out: Path) -> Path | None:
    found = _checkpoints(out)
    return found[-1] if found else None


def _describe(source) -> dict | None:
    """What a source's batches are made of (JSON), checked when a checkpoint resumes."""
    d = source.describe() if hasattr(source, "describe") else None
    return json.loads(json.dumps(d)) if d is not None else None
