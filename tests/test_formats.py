"""Foreign SAE files, written by hand as each library writes them, read by progsae and checked against an
independent numpy computation of that library's documented definition (shared/FORMATS.md)."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from progsae import SAE, ProgsaeError
from progsae.analysis import fvu_at, latent_stats, progressive_eval
from progsae.cli import main
from progsae.formats import detect, load_sae, save_sae

D, N, K = 12, 40, 5


def weights(seed: int = 0, dec_norm: float = 1.0) -> dict[str, np.ndarray]:
    """SAELens-named float32 weights; decoder rows of norm ~dec_norm (not 1, so a missed fold shows)."""
    r = np.random.default_rng(seed)
    W_dec = r.normal(size=(N, D))
    W_dec *= (dec_norm * r.uniform(0.5, 2.0, size=(N, 1))) / np.linalg.norm(W_dec, axis=1, keepdims=True)
    return {
        "W_enc": r.normal(size=(D, N)).astype(np.float32),
        "b_enc": r.normal(scale=0.3, size=N).astype(np.float32),
        "W_dec": W_dec.astype(np.float32),
        "b_dec": r.normal(scale=0.5, size=D).astype(np.float32),
        "threshold": r.uniform(0.2, 1.5, size=N).astype(np.float32),
    }


X = np.random.default_rng(0).normal(size=(64, D)).astype(np.float32) * 2


# -- the libraries' definitions, in numpy float64 ----------------------------------------------------------


def topk_rows(a: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros_like(a)
    idx = np.argsort(-a, axis=1)[:, :k]
    np.put_along_axis(out, idx, np.take_along_axis(a, idx, 1), 1)
    return out


def act(arch: str, pre: np.ndarray, k=None, threshold=None) -> np.ndarray:
    relu = np.maximum(pre, 0)
    if arch == "topk":
        return topk_rows(relu, k)
    if arch == "relu":
        return relu
    return relu * (pre > threshold)  # jumprelu; batchtopk at inference with a broadcast threshold


def ref_saelens(cfg: dict, w: dict, x: np.ndarray, scale: float | None = None) -> np.ndarray:
    w = {n: v.astype(np.float64) for n, v in w.items()}
    x = x.astype(np.float64) * (scale or 1.0)
    sae_in = x - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    norms = np.linalg.norm(w["W_dec"], axis=1)
    if cfg.get("rescale_acts_by_decoder_norm"):
        pre = pre * norms
    arch = {"standard": "relu", "matryoshka_batchtopk": "batchtopk"}.get(cfg["architecture"], cfg["architecture"])
    thr = w.get("threshold", np.exp(w["log_threshold"]) if "log_threshold" in w else w.get("topk_threshold"))
    z = act(arch, pre, cfg.get("k"), thr)
    if cfg.get("rescale_acts_by_decoder_norm"):
        z = z / norms
    return (z @ w["W_dec"] + w["b_dec"]) / (scale or 1.0)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)))


def recon(sae: SAE, x: np.ndarray = X) -> np.ndarray:
    with torch.no_grad():
        return sae(torch.from_numpy(x)).numpy()


def dense_recon(sae: SAE, x: np.ndarray, G: int | None = None, mode: str = "prefix") -> np.ndarray:
    """An SAE's reconstruction at granularity G from its weights, in numpy float64: the code of all latents
    with those from G on dropped (prefix), or TopK over the first G alone with k_G = max(1, round(k G / N))."""
    G = sae.d_sae if G is None else G
    w = {n: getattr(sae, n).detach().double().numpy() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    pre = (x.astype(np.float64) - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if mode == "rescaled":
        z = topk_rows(np.maximum(pre[:, :G], 0), max(1, round(sae.k * G / sae.d_sae)))
    else:
        thr = sae.threshold.detach().double().numpy() if hasattr(sae, "threshold") else None
        z = act({"topk": "topk", "relu": "relu"}.get(sae.architecture, "jumprelu"), pre, sae.k, thr)[:, :G]
    return z @ w["W_dec"][:G] + w["b_dec"]


# -- writers of the foreign layouts (as the libraries lay them out) ----------------------------------------


def write_saelens(path, cfg: dict, w: dict, sparsity: np.ndarray | None = None):
    path.mkdir(parents=True)
    dtype = {"float32": np.float32, "float16": np.float16}.get(cfg.get("dtype", "float32"), np.float32)
    save_file({n: np.ascontiguousarray(v.astype(dtype)) for n, v in w.items()}, str(path / "sae_weights.safetensors"))
    if sparsity is not None:
        save_file({"sparsity": sparsity}, str(path / "sparsity.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def saelens_cfg(architecture: str, **kw) -> dict:
    cfg = {
        "architecture": architecture,
        "d_in": D,
        "d_sae": N,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.54.12", "model_name": "gpt2", "hook_name": "blocks.3.hook_resid_post"},
    }
    return {**cfg, **kw}


def pick(w: dict, *names) -> dict:
    return {n: w[n] for n in names}


BASE = ("W_enc", "b_enc", "W_dec", "b_dec")
SAELENS_CASES = {
    "standard": (saelens_cfg("standard"), BASE),
    "topk": (saelens_cfg("topk", k=K, rescale_acts_by_decoder_norm=False), BASE),
    "topk-rescaled": (saelens_cfg("topk", k=K, rescale_acts_by_decoder_norm=True), BASE),
    "topk-no-b_dec-in": (saelens_cfg("topk", k=K, apply_b_dec_to_input=False), BASE),
    "topk-rescaled-no-b_dec-in": (
        saelens_cfg("topk", k=K, rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=False),
        BASE,
    ),
    "jumprelu": (saelens_cfg("jumprelu"), (*BASE, "threshold")),
    "jumprelu-no-b_dec-in": (saelens_cfg("jumprelu", apply_b_dec_to_input=False), (*BASE, "threshold")),
    "jumprelu-log-threshold": (saelens_cfg("jumprelu"), (*BASE, "log_threshold")),
    "batchtopk-checkpoint": (
        saelens_cfg("batchtopk", k=7.5, rescale_acts_by_decoder_norm=True),
        (*BASE, "topk_threshold"),
    ),
    "matryoshka-batchtopk-checkpoint": (
        saelens_cfg("matryoshka_batchtopk", k=6, rescale_acts_by_decoder_norm=True, matryoshka_widths=[10, 25]),
        (*BASE, "topk_threshold"),
    ),
    "pre6-topk": (
        {
            "architecture": "standard",
            "d_in": D,
            "d_sae": N,
            "dtype": "float32",
            "activation_fn_str": "topk",
            "activation_fn_kwargs": {"k": K},
            "hook_point": "blocks.3.hook_resid_post",
            "model_name": "gpt2",
            "sae_lens_training_version": "3.13.0",
        },
        BASE,
    ),
    "pre6-relu-fp16": (
        {"d_in": D, "d_sae": N, "dtype": "float16", "hook_point": "blocks.3.hook_resid_post", "model_name": "gpt2"},
        BASE,
    ),
}


def saelens_weights(names, seed=0) -> dict:
    w = weights(seed, dec_norm=1.7)
    w["log_threshold"] = np.log(w["threshold"])
    w["topk_threshold"] = np.array(0.9, dtype=np.float64)
    return pick(w, *names)


@pytest.mark.parametrize("case", list(SAELENS_CASES))
def test_saelens_files_compute_what_saelens_defines(tmp_path, case):
    cfg, names = SAELENS_CASES[case]
    w = saelens_weights(names)
    write_saelens(tmp_path / "s", cfg, w)
    sae = load_sae(tmp_path / "s")
    if cfg.get("dtype") == "float16":  # computed in float32 from the stored half-precision values
        w = {n: v.astype(np.float16) for n, v in w.items()}
    if case.startswith("pre6"):
        cfg = {**cfg, "architecture": "topk", "k": K} if case == "pre6-topk" else {**cfg, "architecture": "standard"}
    assert rel_err(recon(sae), ref_saelens(cfg, w, X)) < 1e-5
    assert sae.cfg.metadata["hook_name"] == "blocks.3.hook_resid_post"
    if "matryoshka" in case:
        assert sae.cfg.progsae["granularities"] == [10, 25, N] and sae.architecture == "batchtopk"


def test_expected_average_scaling_is_folded_from_the_checkpoint_scaler(tmp_path):
    cfg = saelens_cfg("topk", k=K, rescale_acts_by_decoder_norm=True, normalize_activations="expected_average_only_in")
    w = saelens_weights(BASE)
    write_saelens(tmp_path / "s", cfg, w)
    (tmp_path / "s" / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 0.37, "has_whitening": False}))
    sae = load_sae(tmp_path / "s")
    assert rel_err(recon(sae), ref_saelens(cfg, w, X, scale=0.37)) < 1e-5


@pytest.mark.parametrize(
    "cfg, field",
    [
        (saelens_cfg("topk", k=K, normalize_activations="layer_norm"), "normalize_activations = 'layer_norm'"),
        (saelens_cfg("topk", k=K, normalize_activations="constant_norm_rescale"), "constant_norm_rescale"),
        (saelens_cfg("topk", k=K, normalize_activations="expected_average_only_in"), "activation_scaler.json"),
        (saelens_cfg("gated"), "architecture = 'gated'"),
        (saelens_cfg("topk", k=K, reshape_activations="hook_z"), "reshape_activations"),
        (saelens_cfg("jumprelu", rescale_acts_by_decoder_norm=True), "rescale_acts_by_decoder_norm"),
        ({"d_in": D, "d_sae": N, "activation_fn_str": "tanh-relu", "hook_point": "h"}, "activation_fn"),
    ],
)
def test_saelens_fields_progsae_cannot_compute_are_refused_in_one_line(tmp_path, cfg, field):
    write_saelens(tmp_path / "s", cfg, saelens_weights((*BASE, "threshold")))
    with pytest.raises(ProgsaeError) as e:
        load_sae(tmp_path / "s")
    assert field in str(e.value) and "\n" not in str(e.value)


def test_saelens_round_trip_keeps_unknown_fields_sparsity_and_is_exact(tmp_path):
    cfg = saelens_cfg("topk", k=K, rescale_acts_by_decoder_norm=True, neuronpedia_id="gpt2/3-res")
    cfg["metadata"]["context_size"] = 128
    sparsity = np.random.default_rng(1).normal(size=N).astype(np.float32)
    w = saelens_weights(BASE)
    write_saelens(tmp_path / "s", cfg, w, sparsity)
    sae = load_sae(tmp_path / "s")
    order = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    perm = sae.permute(order, "e_z2")
    save_sae(perm, tmp_path / "p")
    back = load_sae(tmp_path / "p")
    np.testing.assert_array_equal(recon(back), recon(perm))
    assert rel_err(recon(back), ref_saelens(cfg, w, X)) < 1e-5  # what SAELens computes from the original
    out = json.loads((tmp_path / "p" / "cfg.json").read_text())
    assert out["neuronpedia_id"] == "gpt2/3-res" and out["metadata"]["context_size"] == 128
    assert out["rescale_acts_by_decoder_norm"] is False and out["metadata"]["progsae"]["permutation"]["metric"] == "e_z2"
    np.testing.assert_array_equal(back.latent_data["sparsity"].numpy(), sparsity[order.numpy()])


# -- sparsify ----------------------------------------------------------------------------------------------


def write_sparsify(path, cfg_extra: dict | None = None, seed=0, extra_tensors=None):
    w = weights(seed)
    path.mkdir(parents=True)
    t = {"encoder.weight": np.ascontiguousarray(w["W_enc"].T), "encoder.bias": w["b_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]}
    save_file({**t, **(extra_tensors or {})}, str(path / "sae.safetensors"))
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": N, "k": K,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D, **(cfg_extra or {})}  # fmt: skip
    (path / "cfg.json").write_text(json.dumps(cfg))
    return t


def ref_sparsify(t: dict, x: np.ndarray) -> np.ndarray:
    t = {n: v.astype(np.float64) for n, v in t.items()}
    pre = (x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"]
    return topk_rows(np.maximum(pre, 0), K) @ t["W_dec"] + t["b_dec"]


def test_sparsify_single_and_run_directories(tmp_path):
    t = write_sparsify(tmp_path / "single")
    assert rel_err(recon(load_sae(tmp_path / "single")), ref_sparsify(t, X)) < 1e-5
    # N from expansion_factor when num_latents is 0 (d_in 12 x 4 = 48 would not match; use 40 / 12? no: set d so)
    run = tmp_path / "run"
    t = write_sparsify(run / "layers.6", seed=3)
    (run / "config.json").write_text(json.dumps({"model": "HuggingFaceTB/SmolLM2-135M", "batch_size": 8}))
    sae = load_sae(run)
    assert detect(run) == ("sparsify", run / "layers.6")
    assert rel_err(recon(sae), ref_sparsify(t, X)) < 1e-5
    assert sae.cfg.metadata["hook_name"] == "blocks.6.hook_resid_post"
    assert sae.cfg.metadata["model_name"] == "HuggingFaceTB/SmolLM2-135M"
    write_sparsify(run / "layers.7")
    with pytest.raises(ProgsaeError, match="holds 2 SAEs"):
        load_sae(run)


def test_sparsify_num_latents_zero_means_d_in_times_expansion_factor(tmp_path):
    t = write_sparsify(tmp_path / "s", {"num_latents": 0, "expansion_factor": 1})
    with pytest.raises(ProgsaeError, match="do not belong together"):  # 12 x 1 != 40 latents
        load_sae(tmp_path / "s")
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({"num_latents": 0, "expansion_factor": 1, "k": K, "d_in": N}))
    with pytest.raises(ProgsaeError, match="do not belong together"):
        load_sae(tmp_path / "s")
    # a consistent one: d_in = 8, expansion factor 5 -> 40 latents
    r = np.random.default_rng(5)
    t = {
        "encoder.weight": r.normal(size=(N, 8)).astype(np.float32),
        "encoder.bias": r.normal(size=N).astype(np.float32),
        "W_dec": r.normal(size=(N, 8)).astype(np.float32),
        "b_dec": r.normal(size=8).astype(np.float32),
    }
    save_file(t, str(tmp_path / "s" / "sae.safetensors"))
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({"num_latents": 0, "expansion_factor": 5, "k": K, "d_in": 8}))
    sae = load_sae(tmp_path / "s")
    x = r.normal(size=(30, 8)).astype(np.float32)
    assert sae.d_sae == N and rel_err(recon(sae, x), ref_sparsify(t, x)) < 1e-5


@pytest.mark.parametrize(
    "extra, tensors, field",
    [
        ({"transcode": True}, None, "transcode"),
        ({"skip_connection": True}, {"W_skip": np.zeros((D, D), np.float32)}, "skip_connection"),
        ({"activation": "groupmax"}, None, "activation = 'groupmax'"),
    ],
)
def test_sparsify_variants_progsae_cannot_compute_are_refused(tmp_path, extra, tensors, field):
    write_sparsify(tmp_path / "s", extra, extra_tensors=tensors)
    with pytest.raises(ProgsaeError) as e:
        load_sae(tmp_path / "s")
    assert field in str(e.value) and "\n" not in str(e.value)


def test_sparsify_round_trip_in_its_own_format(tmp_path):
    t = write_sparsify(tmp_path / "s", {"custom_field": 7})
    sae = load_sae(tmp_path / "s")
    perm = sae.permute(torch.randperm(N, generator=torch.Generator().manual_seed(0)))
    save_sae(perm, tmp_path / "p")  # the format it was read in
    assert detect(tmp_path / "p")[0] == "sparsify"
    back = load_sae(tmp_path / "p")
    np.testing.assert_array_equal(recon(back), recon(perm))
    np.testing.assert_allclose(recon(back), recon(sae), rtol=1e-5, atol=1e-5)
    assert rel_err(recon(back), ref_sparsify(t, X)) < 1e-5  # what sparsify computes from the original
    cfg = json.loads((tmp_path / "p" / "cfg.json").read_text())
    assert cfg["custom_field"] == 7 and cfg["num_latents"] == N and cfg["d_in"] == D
    assert back.cfg.progsae["permutation"]["order"] == perm.cfg.progsae["permutation"]["order"]


def test_sparsify_cfg_json_holds_only_sparsify_fields_and_progsae_reads_its_own_back(tmp_path):
    """sparsify builds its config from every key of cfg.json and prints the unknown ones (a whole
    permutation): progsae's fields go to progsae.json beside it, and an older directory with them under
    cfg.json's `progsae` key still reads."""
    write_sparsify(tmp_path / "s", {"custom_field": 7})
    sae = load_sae(tmp_path / "s")
    order = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    perm = sae.permute(order)
    perm.cfg.metadata["hook_name"] = "blocks.3.hook_resid_post"
    save_sae(perm, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "cfg.json").read_text())
    sparsify_fields = {"activation", "expansion_factor", "normalize_decoder", "num_latents", "k", "multi_topk",
                       "skip_connection", "transcode", "d_in"}  # fmt: skip
    assert set(cfg) == sparsify_fields | {"custom_field"}  # the source's unknown field kept, nothing of ours
    back = load_sae(tmp_path / "p")
    assert back.cfg.progsae["permutation"]["order"] == order.tolist()
    assert back.cfg.metadata["hook_name"] == "blocks.3.hook_resid_post"
    # written again from what it read: still nothing of ours in cfg.json
    save_sae(back, tmp_path / "q")
    assert set(json.loads((tmp_path / "q" / "cfg.json").read_text())) == set(cfg)
    # an older directory: ours under cfg.json's "progsae" key
    ours = json.loads((tmp_path / "p" / "progsae.json").read_text())
    (tmp_path / "p" / "progsae.json").unlink()
    (tmp_path / "p" / "cfg.json").write_text(json.dumps({**cfg, "progsae": ours}))
    old = load_sae(tmp_path / "p")
    assert old.cfg.progsae["permutation"]["order"] == order.tolist()
    assert old.cfg.metadata["hook_name"] == "blocks.3.hook_resid_post"
    save_sae(old, tmp_path / "r")
    assert "progsae" not in json.loads((tmp_path / "r" / "cfg.json").read_text())


# -- dictionary_learning ------------------------------------------------------------------------------------


def write_dictlearn(path, cls: str, extra_config: dict | None = None, threshold: float = 0.8):
    w = {n: torch.from_numpy(v) for n, v in weights(7).items()}
    if cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        sd = {"encoder.weight": w["W_enc"].t().contiguous(), "encoder.bias": w["b_enc"],
              "decoder.weight": w["W_dec"].t().contiguous(), "b_dec": w["b_dec"],
              "k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(threshold)}  # fmt: skip
    elif cls == "MatryoshkaBatchTopKSAE":
        sd = {**{n: w[n] for n in BASE}, "k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(threshold),
              "group_sizes": torch.tensor([8, 12, 20])}  # fmt: skip
    elif cls == "JumpReluAutoEncoder":
        sd = {n: w[n] for n in (*BASE, "threshold")}
    else:
        sd = {"encoder.weight": w["W_enc"].t().contiguous(), "encoder.bias": w["b_enc"],
              "decoder.weight": w["W_dec"].t().contiguous(), "bias": w["b_dec"]}  # fmt: skip
    path.mkdir(parents=True)
    torch.save(sd, path / "ae.pt")
    trainer = {"trainer_class": cls.replace("AutoEncoder", "") + "Trainer", "dict_class": cls, "activation_dim": D,
               "dict_size": N, "k": K, "layer": 3, "lm_name": "EleutherAI/pythia-70m-deduped",
               "submodule_name": "resid_post_layer_3", **(extra_config or {})}  # fmt: skip
    (path / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"d_submodule": D}}))
    return {n: v.double().numpy() for n, v in w.items()}


def ref_dictlearn(cls: str, w: dict, x: np.ndarray, threshold: float = 0.8) -> np.ndarray:
    x = x.astype(np.float64)
    if cls == "JumpReluAutoEncoder":  # relu(pre * (pre > threshold)), no b_dec subtracted
        pre = x @ w["W_enc"] + w["b_enc"]
        z = np.maximum(pre * (pre > w["threshold"]), 0)
    else:
        post = np.maximum((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0)
        if cls == "AutoEncoderTopK":  # default encode: per-row top k
            z = topk_rows(post, K)
        elif cls == "AutoEncoder":
            z = post
        else:  # BatchTopK / Matryoshka default encode: post * (post > threshold)
            z = post * (post > threshold)
    return z @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize(
    "cls", ["AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder", "AutoEncoder"]
)
def test_dictionary_learning_trainers_compute_the_library_default(tmp_path, cls):
    w = write_dictlearn(tmp_path / "run" / "trainer_0", cls)
    sae = load_sae(tmp_path / "run")  # one trainer: found inside the run directory
    assert rel_err(recon(sae), ref_dictlearn(cls, w, X)) < 1e-5
    assert sae.architecture == {"AutoEncoderTopK": "topk", "JumpReluAutoEncoder": "jumprelu", "AutoEncoder": "relu"}.get(
        cls, "batchtopk"
    )
    assert sae.cfg.metadata["hook_name"] == "blocks.3.hook_resid_post"
    if cls == "MatryoshkaBatchTopKSAE":
        assert sae.cfg.progsae["granularities"] == [8, 20, 40]
    save_sae(sae, tmp_path / "out")  # no dictionary_learning writer: SAELens layout, saying so
    out = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert out["metadata"]["progsae"]["converted_from"] == "dictionary_learning"
    np.testing.assert_array_equal(recon(load_sae(tmp_path / "out")), recon(sae))


def test_dictionary_learning_refusals(tmp_path):
    write_dictlearn(tmp_path / "g", "GatedAutoEncoder")
    with pytest.raises(ProgsaeError, match="dict_class = 'GatedAutoEncoder'"):
        load_sae(tmp_path / "g")
    write_dictlearn(tmp_path / "unset", "BatchTopKSAE", threshold=-1.0)
    with pytest.raises(ProgsaeError, match="never set"):
        load_sae(tmp_path / "unset")
    # a pickle of an arbitrary object is never unpickled
    write_dictlearn(tmp_path / "p", "AutoEncoderTopK")
    torch.save({"ae": {"encoder.weight": torch.zeros(1)}, "cfg": _Obj()}, tmp_path / "p" / "ae.pt")
    with pytest.raises(ProgsaeError, match="not a state dict of tensors"):
        load_sae(tmp_path / "p")


class _Obj:  # module-level so torch.save can pickle it; torch.load(weights_only=True) must refuse it
    pass


# -- Gemma Scope -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lower", [False, True])
def test_gemma_scope_params_npz(tmp_path, lower):
    w = weights(11)
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_5" / "width_16k" / "average_l0_71"
    folder.mkdir(parents=True)
    names = {n: (n.lower() if lower else n) for n in w}
    np.savez(folder / "params.npz", **{names[n]: v for n, v in w.items()})
    wd = {n: v.astype(np.float64) for n, v in w.items()}
    pre = X.astype(np.float64) @ wd["W_enc"] + wd["b_enc"]
    ref = np.maximum(pre, 0) * (pre > wd["threshold"]) @ wd["W_dec"] + wd["b_dec"]
    for path in (folder, folder / "params.npz"):
        sae = load_sae(path)
        assert sae.architecture == "jumprelu" and rel_err(recon(sae), ref) < 1e-5
        assert sae.cfg.metadata["hook_name"] == "blocks.5.hook_resid_post"


# -- every architecture through the rest of progsae ---------------------------------------------------------


def every_architecture(tmp_path) -> dict[str, SAE]:
    out = {}
    for name in ("standard", "topk-rescaled", "jumprelu", "batchtopk-checkpoint"):
        cfg, names = SAELENS_CASES[name]
        write_saelens(tmp_path / name, cfg, saelens_weights(names))
        out[name] = load_sae(tmp_path / name)
    return out


def test_permutation_is_exact_at_full_size_and_truncation_is_the_prefix_for_every_architecture(tmp_path):
    x = torch.from_numpy(X)
    for name, sae in every_architecture(tmp_path).items():
        order = torch.randperm(N, generator=torch.Generator().manual_seed(2))
        perm = sae.permute(order)
        torch.testing.assert_close(perm(x), sae(x), rtol=1e-5, atol=1e-5, msg=name)
        cfg, names = SAELENS_CASES[name]
        assert rel_err(recon(perm), ref_saelens(cfg, saelens_weights(names), X)) < 1e-5, name  # as SAELens defines
        for G in (1, 17, N):
            small = perm.truncate(G)
            assert small.d_sae == G
            mode = "rescaled" if sae.architecture == "topk" else "prefix"  # TopK: k scaled to k G / N
            torch.testing.assert_close(small(x), perm(x, G, mode), rtol=1e-5, atol=1e-5, msg=name)
            # against numpy from the permuted weights: the first G latents of the permuted order
            np.testing.assert_allclose(recon(small), dense_recon(perm, X, G, mode), rtol=1e-4, atol=1e-5, err_msg=name)
        if sae.architecture != "topk":
            with pytest.raises(ProgsaeError, match="use mode prefix"):
                sae(x, 10, "rescaled")


def test_truncating_a_trained_topk_sae_without_granularities(tmp_path):
    from progsae import TrainConfig, train
    from progsae.data import SyntheticConfig, SyntheticSource

    src = SyntheticSource(SyntheticConfig(d_in=16, n_features=64, seed=0))
    sae = train(src, TrainConfig(d_sae=64, k=4, tokens=8192, batch_size=1024), progress=False)
    assert sae.cfg.progsae.get("granularities") is None
    small = sae.truncate(16)
    x = src.sample(256, 99)
    assert small.d_sae == 16 and small.k == 1
    torch.testing.assert_close(small(x), sae(x, 16, "rescaled"))
    expected = dense_recon(sae, x.numpy(), 16, "rescaled")  # numpy: TopK-1 over the first 16 latents
    np.testing.assert_allclose(recon(small, x.numpy()), expected, rtol=1e-4, atol=1e-5)


def test_one_pass_curve_and_statistics_of_threshold_saes_match_brute_force(tmp_path):
    x = torch.from_numpy(np.random.default_rng(3).normal(size=(700, D)).astype(np.float32) * 2)
    for name, sae in every_architecture(tmp_path).items():
        batches = list(x.split(256))
        curve = progressive_eval(sae, batches)
        Gs = [1, 5, 20, 33, N]
        brute = fvu_at(sae, batches, Gs, "prefix")
        xn = x.double().numpy()
        var = ((xn - xn.mean(0)) ** 2).sum()
        for G in Gs:
            assert curve.fvu[G - 1] == pytest.approx(brute[G], rel=1e-6, abs=1e-9), (name, G)
            expected = ((xn - dense_recon(sae, xn, G)) ** 2).sum() / var  # numpy, from the weights
            assert curve.fvu[G - 1] == pytest.approx(expected, rel=1e-5), (name, G)
        # statistics against the dense code
        with torch.no_grad():
            pre = (x.double() - sae.b_dec.double()) @ sae.W_enc.double() + sae.b_enc.double()
            if sae.architecture == "topk":
                z = torch.from_numpy(topk_rows(np.maximum(pre.numpy(), 0), sae.k))
            else:
                thr = sae.threshold.double() if hasattr(sae, "threshold") else 0.0
                z = pre.clamp(min=0) * (pre > thr)
        stats = latent_stats(sae, batches)
        np.testing.assert_allclose(stats["e_z2"].numpy(), z.pow(2).mean(0).numpy(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(stats["freq"].numpy(), (z > 0).double().mean(0).numpy())
        np.testing.assert_allclose(curve.l0[-1], (z > 0).double().sum(1).mean().item(), rtol=1e-9)


# -- the command line ---------------------------------------------------------------------------------------


def test_inspect_and_permute_a_gemma_scope_sae_from_the_command_line(tmp_path, capsys):
    from progsae.analysis import save_stats

    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_5" / "width_16k" / "average_l0_71"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **weights(11))
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "gemmascope" in out and "jumprelu" in out and "12 x 40" in out and "blocks.5.hook_resid_post" in out
    sae = load_sae(folder)
    x = torch.from_numpy(np.random.default_rng(4).normal(size=(500, D)).astype(np.float32))
    stats = latent_stats(sae, [x])
    save_stats(tmp_path / "stats.safetensors", stats)
    assert main(["inspect", str(folder), "--stats", str(tmp_path / "stats.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["order"]["e_z2"]["sorted"] is False
    assert main(["permute", str(folder), "--stats", str(tmp_path / "stats.safetensors"), "--out", str(tmp_path / "p")]) == 0
    assert "SAELens format (progsae writes no gemmascope files)" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "p"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["permutation"] == "e_z2" and info["format"] == "saelens" and info["architecture"] == "jumprelu"
    # the permuted SAE's own statistics are in decreasing E[z^2] order, and its reconstructions are the same
    perm = load_sae(tmp_path / "p")
    assert bool((latent_stats(perm, [x])["e_z2"].diff() <= 1e-12).all())
    np.testing.assert_allclose(recon(perm, x.numpy()), recon(sae, x.numpy()), rtol=1e-5, atol=1e-5)


def test_a_hub_id_offline_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["inspect", "google/gemma-scope-2b-pt-res/layer_5/width_16k/average_l0_71"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HF_HUB_OFFLINE" in err
    assert main(["permute", str(tmp_path / "nothing"), "--stats", "s", "--out", str(tmp_path / "o")]) == 2
    assert "no SAE directory" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_saelens_inference_form_of_a_matryoshka_batchtopk_is_read_as_batchtopk(tmp_path):
    """SAELens saves BatchTopK SAEs for inference as jumprelu with one threshold; the training metadata
    names what it was, and its widths become granularities."""
    meta = {"sae_lens_version": "6.54.12", "hook_name": "blocks.3.hook_resid_post",
            "training_architecture": "matryoshka_batchtopk",
            "training_architecture_details": {"k": 6, "matryoshka_widths": [10, 25, 40]}}  # fmt: skip
    w = saelens_weights(BASE)
    w["threshold"] = np.full(N, 0.9, np.float32)
    write_saelens(tmp_path / "s", saelens_cfg("jumprelu", metadata=meta), w)
    sae = load_sae(tmp_path / "s")
    assert sae.architecture == "batchtopk" and sae.k == 6 and sae.cfg.progsae["granularities"] == [10, 25, 40]
    assert rel_err(recon(sae), ref_saelens(saelens_cfg("jumprelu"), w, X)) < 1e-5


def test_pre6_boolean_normalisation_is_not_ignored(tmp_path):
    cfg = {"d_in": D, "d_sae": N, "hook_point": "blocks.3.hook_resid_post", "normalize_activations": True}
    write_saelens(tmp_path / "s", cfg, saelens_weights(BASE))
    with pytest.raises(ProgsaeError, match="expected_average_only_in"):
        load_sae(tmp_path / "s")
    write_saelens(tmp_path / "t", {**cfg, "normalize_activations": None}, saelens_weights(BASE))
    assert load_sae(tmp_path / "t").architecture == "relu"
