"""Shrink (issue 21): the least-squares refit against a dense torch.linalg.lstsq, its guarantees on the rows it
was fitted on, and `progsae shrink`'s files and refusals."""

import pytest
import torch

from progsae import ProgsaeError, load_sae, save_sae
from progsae.analysis import latent_stats
from progsae.analysis.shrink import merge, shrink
from progsae.cli import main
from progsae.data import ActivationDir
from progsae.sae import SAE, SAEConfig
from progsae.train import TrainConfig, Trainer


def rows(acts: ActivationDir, n: int = 6000) -> torch.Tensor:
    return torch.cat(list(acts.iter_rows(4096, n)))


def random_sae(d: int, N: int, k: int, seed: int = 0, architecture: str = "topk") -> SAE:
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(d, N, k, architecture=architecture)).init_tied(g)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(N, generator=g))
        sae.b_dec.copy_(0.2 * torch.randn(d, generator=g))
        sae.W_dec.mul_(1 + torch.rand(N, 1, generator=g))  # decoder norms not 1
        if architecture == "jumprelu":
            sae.threshold.copy_(0.3 * torch.rand(N, generator=g))
    return sae


def dense_code(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    code = sae.encode(x)
    return torch.zeros(len(x), sae.d_sae).scatter_add_(1, code.indices, code.values)


def fvu(sae: SAE, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((sae(x) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


@pytest.mark.parametrize("architecture, k", [("topk", 3), ("jumprelu", None)])
def test_refit_equals_a_dense_least_squares_and_keeps_every_code(synth_acts, architecture, k):
    acts = ActivationDir(synth_acts)
    x = rows(acts)
    sae = random_sae(16, 48, 6 if architecture == "topk" else None, architecture=architecture)
    small = shrink(sae, 16, "refit", lambda: acts.iter_rows(1000, len(x)), k)
    base = sae.truncate(16, k)
    Z = dense_code(base, x).double()
    live = (Z != 0).any(0)
    assert live.sum() >= 10  # most latents fire: the comparison has something to compare
    design = torch.cat([Z[:, live], torch.ones(len(x), 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(design, x.double()).solution
    torch.testing.assert_close(small.W_dec[live].double(), sol[:-1], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(small.b_dec.double(), sol[-1], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(small.W_dec[~live], base.W_dec[~live])  # the rows say nothing of a silent latent
    before, after = base.encode(x), small.encode(x)
    assert torch.equal(before.indices, after.indices)
    torch.testing.assert_close(after.values, before.values, atol=1e-5, rtol=1e-5)
    assert fvu(small, x) <= fvu(base, x) + 1e-6  # the optimum over decoders for these codes
    assert fvu(small, x) < 0.9 * fvu(base, x)
    assert small.cfg.progsae["shrink"] == {"from": sae.fingerprint(), "N": 48, "method": "refit", "rows": len(x),
                                           "passes": 1, "passes_N": 0, "tuned_tokens": 0}  # fmt: skip


def test_shrink_writes_a_standalone_sae_and_refuses_bad_input_in_one_line(synth_acts, tmp_path, capsys):
    sae = random_sae(16, 48, 6)
    save_sae(sae, tmp_path / "big", "saelens")
    out = tmp_path / "small"
    assert main(["shrink", str(tmp_path / "big"), str(synth_acts), "--G", "12", "--out", str(out), "--tokens", "3000"]) == 0
    small = load_sae(out)
    assert (small.d_sae, small.k) == (12, 2) and small.cfg.progsae["shrink"]["rows"] == 3000
    x = rows(ActivationDir(synth_acts), 3000)
    expected = shrink(sae, 12, "refit", lambda: [x])
    torch.testing.assert_close(small(x), expected(x))
    assert main(["shrink", str(tmp_path / "big"), str(synth_acts), "--G", "12", "--out", str(tmp_path / "t"),
                 "--method", "truncate", "--k", "4"]) == 0  # fmt: skip
    torch.testing.assert_close(load_sae(tmp_path / "t")(x), sae.truncate(12, 4)(x))
    assert main(["shrink", str(tmp_path / "big"), str(synth_acts), "--G", "12", "--out", str(tmp_path / "m"),
                 "--method", "distil", "--tokens", "3000", "--tune-tokens", "2048", "--batch-size", "512"]) == 0  # fmt: skip
    prov = load_sae(tmp_path / "m").cfg.progsae["shrink"]
    assert (prov["method"], prov["rows"], prov["passes_N"], prov["tuned_tokens"]) == ("distil", 3000, 1, 2048)
    other = tmp_path / "wide"
    save_sae(random_sae(32, 48, 6), other, "saelens")
    capsys.readouterr()
    base = ["shrink", str(tmp_path / "big"), str(synth_acts), "--out", str(tmp_path / "bad")]
    assert main([*base, "--G", "48"]) == 2
    assert main([*base, "--G", "0"]) == 2
    assert main([*base, "--G", "12", "--k", "13"]) == 2
    with pytest.raises(SystemExit) as e:  # argparse: not a method progsae has
        main([*base, "--G", "12", "--method", "prune"])
    assert e.value.code == 2
    jump = tmp_path / "jump"
    save_sae(random_sae(16, 48, None, architecture="jumprelu"), jump, "saelens")
    assert main(["shrink", str(jump), str(synth_acts), "--G", "8", "--out", str(tmp_path / "bad"), "--method", "merge"]) == 2
    assert main(["shrink", str(other), str(synth_acts), "--G", "8", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "d_in=32" in err and "G=48" in err and "k=13" in err and "jumprelu SAE's thresholds" in err
    assert all(len(line) < 400 for line in err.strip().splitlines())
    assert not (tmp_path / "bad").exists()


def test_shrink_refuses_what_it_cannot_do():
    sae = random_sae(16, 48, None, architecture="jumprelu")
    with pytest.raises(ProgsaeError, match="fires by threshold"):
        shrink(sae, 8, "truncate", k=2)
    with pytest.raises(ProgsaeError, match="no activation rows"):
        shrink(sae, 8, "refit", lambda: [])
    with pytest.raises(ProgsaeError, match="pass rows"):
        shrink(sae, 8, "refit")
    with pytest.raises(ProgsaeError, match="thresholds"):
        shrink(sae, 8, "merge", lambda: [])
    with pytest.raises(ProgsaeError, match="tune"):
        shrink(random_sae(16, 48, 6), 8, "distil", lambda: [])


def split(small: SAE, m: int, seed: int = 0) -> SAE:
    """Each latent of `small` cut into m pieces (the same decoder row, pre-activation divided by m), shuffled."""
    g, d = small.d_sae, small.cfg.d_in
    big = SAE(SAEConfig(d, g * m, small.k * m))
    order = torch.randperm(g * m, generator=torch.Generator().manual_seed(seed))
    src = torch.arange(g).repeat_interleave(m)[order]  # big latent i is a piece of small latent src[i]
    with torch.no_grad():
        big.W_enc.copy_(small.W_enc[:, src] / m)
        big.b_enc.copy_(small.b_enc[src] / m)
        big.W_dec.copy_(small.W_dec[src])
        big.b_dec.copy_(small.b_dec)
    return big


def test_a_split_sae_merges_back_to_the_sae_it_was_split_from(synth_acts):
    x = rows(ActivationDir(synth_acts))
    small = random_sae(16, 12, 3, seed=1)
    big = split(small, 4)
    assert torch.allclose(big(x), small(x), atol=1e-4)  # pieces fire together: the split changes nothing
    merged = merge(big, 12, latent_stats(big, [x])["e_z2"])
    assert merged.k == 3
    cos = torch.nn.functional.normalize(merged.W_dec, dim=1) @ torch.nn.functional.normalize(small.W_dec, dim=1).T
    match = cos.argmax(1)
    assert sorted(match.tolist()) == list(range(12))  # one merged latent per original latent
    assert cos.max(1).values.min() > 1 - 1e-6
    a, b = merged.encode(x), small.encode(x)
    assert torch.equal(match[a.indices].sort(1).values, b.indices)  # the same latents fire...
    za, zb = dense_code(merged, x)[:, match.argsort()], dense_code(small, x)
    torch.testing.assert_close(za, zb, atol=1e-4, rtol=1e-4)  # ...with the same values
    torch.testing.assert_close(merged.W_dec[match.argsort()], small.W_dec, atol=1e-5, rtol=1e-5)
    merged = shrink(big, 12, "merge", lambda: [x])  # then refit
    refit_small = shrink(small_with_extra(small), 12, "refit", lambda: [x])
    assert abs(fvu(merged, x) - fvu(refit_small, x)) < 1e-5  # both the optimum for the same codes
    assert fvu(merged, x) <= fvu(small, x) + 1e-6
    truncated = shrink(big, 12, "truncate")  # the first 12 pieces cover only some latents, at a third of k
    assert fvu(truncated, x) > fvu(merged, x) + 0.1


def small_with_extra(small: SAE) -> SAE:
    """`small` with 12 silent latents appended, so that refit (which needs G < N) shrinks back to it."""
    g, d = small.d_sae, small.cfg.d_in
    out = SAE(SAEConfig(d, 2 * g, 2 * small.k))
    with torch.no_grad():
        out.W_enc.zero_()
        out.W_enc[:, :g] = small.W_enc
        out.b_enc.fill_(-1e4)
        out.b_enc[:g] = small.b_enc
        out.W_dec.copy_(torch.cat([small.W_dec, small.W_dec]))
        out.b_dec.copy_(small.b_dec)
    return out



def test_distil_fine_tunes_the_merged_sae_from_where_it_stands(synth_acts, tmp_path):
    acts = ActivationDir(synth_acts)
    x = rows(acts, 4000)
    big = random_sae(16, 48, 6)
    start = shrink(big, 12, "merge", lambda: [x])
    trainer = Trainer(TrainConfig(d_sae=12, k=2, tokens=4096), acts, init=start)
    norm = start.W_dec.norm(dim=1, keepdim=True)
    torch.testing.assert_close(trainer.sae.W_dec * norm, start.W_dec)  # unit rows, the norm moved to the encoder
    torch.testing.assert_close(trainer.sae.W_enc / norm.T, start.W_enc)
    with pytest.raises(ProgsaeError, match="warm start"):
        Trainer(TrainConfig(d_sae=12, k=3, tokens=4096), acts, init=start)
    tune = TrainConfig(tokens=60_000, batch_size=1000, lr=1e-3)
    tuned = shrink(big, 12, "distil", lambda: [x], tune=tune, source=acts, out=tmp_path / "d", progress=False)
    prov = tuned.cfg.progsae["shrink"]
    assert (prov["method"], prov["tuned_tokens"], prov["rows"], prov["passes_N"]) == ("distil", 60_000, 4000, 1)
    assert tuned.cfg.progsae["training"]["tokens"] == 60_000
    assert load_sae(tmp_path / "d").cfg.progsae["shrink"] == prov  # written with its provenance
    assert fvu(tuned, x) < fvu(start, x) - 0.01  # the fine-tune improves on its start
