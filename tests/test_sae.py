import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from progsae import ProgsaeError, SAEConfig, load_sae, save_sae
from reference import dense_code, make_sae


def test_permuted_sae_reconstructs_identically_at_full_size():
    sae = make_sae()
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(96, generator=g)
    x = torch.randn(100, 16, generator=g)
    perm = sae.permute(order, "test")
    torch.testing.assert_close(perm(x), sae(x), rtol=0, atol=1e-6)
    # latent j of the permuted SAE is latent order[j] of the original
    z, zp = (dense_code(x, s.W_enc, s.b_enc, s.b_dec, s.k) for s in (sae, perm))
    torch.testing.assert_close(zp, z[:, order])
    assert perm.cfg.progsae["permutation"] == {"metric": "test", "order": order.tolist()}


def test_permutations_compose_relative_to_the_original():
    sae = make_sae()
    g = torch.Generator().manual_seed(1)
    p1, p2 = torch.randperm(96, generator=g), torch.randperm(96, generator=g)
    twice = sae.permute(p1).permute(p2)
    assert twice.cfg.progsae["permutation"]["order"] == p1[p2].tolist()
    torch.testing.assert_close(twice.W_dec, sae.W_dec[p1[p2]])


def test_permute_rejects_a_non_permutation():
    with pytest.raises(ProgsaeError, match="exactly once"):
        make_sae().permute(torch.zeros(96, dtype=torch.long))


@pytest.mark.parametrize("G", [1, 7, 48, 96])
def test_prefix_mode_is_full_topk_then_drop_latents_at_or_above_G(G):
    sae = make_sae()
    x = torch.randn(30, 16, generator=torch.Generator().manual_seed(2))
    z = dense_code(x, sae.W_enc, sae.b_enc, sae.b_dec, sae.k)
    expected = z[:, :G] @ sae.W_dec[:G] + sae.b_dec
    torch.testing.assert_close(sae(x, G, "prefix"), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("G", [1, 7, 48, 96])
def test_rescaled_mode_is_topk_over_first_G_with_k_scaled(G):
    sae = make_sae()  # N=96, k=5
    x = torch.randn(30, 16, generator=torch.Generator().manual_seed(3))
    kG = max(1, round(5 * G / 96))
    z = dense_code(x, sae.W_enc[:, :G], sae.b_enc[:G], sae.b_dec, kG)
    expected = z @ sae.W_dec[:G] + sae.b_dec
    torch.testing.assert_close(sae(x, G, "rescaled"), expected, rtol=1e-5, atol=1e-6)
    code = sae.encode(x, G, "rescaled")  # a SparseCode: named fields, or unpacked as (values, indices)
    torch.testing.assert_close(sae.decode(code.values, code.indices), expected, rtol=1e-5, atol=1e-6)
    small = sae.truncate(G)
    assert (small.d_sae, small.k) == (G, kG)
    torch.testing.assert_close(small(x), expected, rtol=1e-5, atol=1e-6)


def test_bad_granularity_and_mode_and_shape_raise_clear_errors():
    sae = make_sae()
    with pytest.raises(ProgsaeError, match="G=97 is outside 1..96"):
        sae(torch.zeros(2, 16), 97)
    with pytest.raises(ProgsaeError, match="unknown truncation mode"):
        sae(torch.zeros(2, 16), 5, "sideways")
    with pytest.raises(ProgsaeError, match=r"expects \[n, 16\]"):
        sae(torch.zeros(2, 15))
    with pytest.raises(ProgsaeError, match="exceeds d_sae"):
        SAEConfig(4, 8, 9)


def test_save_writes_saelens_layout_and_loads_back(tmp_path):
    sae = make_sae()
    sae.cfg.metadata["hook_name"] = "blocks.2.hook_resid_post"
    save_sae(sae, tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert {cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["k"], cfg["dtype"]} == {"topk", 16, 96, 5, "float32"}
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post" and "sae_lens_version" in cfg["metadata"]
    w = load_file(str(tmp_path / "s" / "sae_weights.safetensors"))  # read back without torch: layout on disk
    assert w["W_enc"].shape == (16, 96) and w["W_dec"].shape == (96, 16)
    np.testing.assert_array_equal(w["W_enc"], sae.W_enc.detach().numpy())
    back = load_sae(tmp_path / "s")
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(back(x), sae(x), rtol=0, atol=0)
    assert back.cfg.metadata == {"hook_name": "blocks.2.hook_resid_post"}


def test_loading_missing_corrupt_or_mismatched_sae_fails_clearly(tmp_path):
    with pytest.raises(ProgsaeError, match="no SAE directory"):
        load_sae(tmp_path / "nope")
    save_sae(make_sae(), tmp_path / "s")
    (tmp_path / "s" / "sae_weights.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ProgsaeError, match="not a readable safetensors"):
        load_sae(tmp_path / "s")
    save_sae(make_sae(), tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "cfg.json").read_text())
    cfg["d_sae"] = 95
    (tmp_path / "t" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ProgsaeError, match="do not belong together"):
        load_sae(tmp_path / "t")


def test_saved_sae_loads_in_saelens_with_identical_outputs(tmp_path):
    """Opt-in: runs only where sae_lens is installed (a ~1 GB dependency tree, so not in CI)."""
    sae_lens = pytest.importorskip("sae_lens")
    sae = make_sae()
    sae.cfg.metadata.update(model_name="tiny", hook_name="blocks.0.hook_resid_post")
    save_sae(sae, tmp_path / "s")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "s"), device="cpu")
    assert theirs.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(theirs.decode(theirs.encode(x)), sae(x).detach(), rtol=1e-5, atol=1e-6)
