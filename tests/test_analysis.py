import numpy as np
import pytest
import torch

from progsae import ProgsaeError
from progsae.analysis import (
    decoder_cov_eigs,
    fit_power_law,
    fvu_at,
    importance_order,
    latent_stats,
    plot_power_laws,
    progressive_eval,
    sort_by_importance,
)
from progsae.analysis.progressive import residual_norms
from reference import dense_code, make_sae


def batches(n_batches=3, B=70, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, d, generator=g) + 0.3 for _ in range(n_batches)]


def brute_force_fvu(sae, xs, G):
    """FVU of z[:, :G] W_dec[:G] + b_dec over all rows, in float64 numpy (independent of the library)."""
    x = torch.cat(xs)
    z = dense_code(x, sae.W_enc, sae.b_enc, sae.b_dec, sae.k).detach().double().numpy()
    W, b, xn = sae.W_dec.detach().double().numpy(), sae.b_dec.detach().double().numpy(), x.double().numpy()
    sse = ((xn - z[:, :G] @ W[:G] - b) ** 2).sum()
    return sse / ((xn - xn.mean(0)) ** 2).sum()


def brute_force_rescaled_fvu(sae, xs, G):
    """FVU of TopK over the first G latents alone with k_G = max(1, round(k G / N)), in float64 numpy."""
    xn = torch.cat(xs).double().numpy()
    W_enc, b_enc = sae.W_enc.detach().double().numpy()[:, :G], sae.b_enc.detach().double().numpy()[:G]
    W_dec, b_dec = sae.W_dec.detach().double().numpy()[:G], sae.b_dec.detach().double().numpy()
    pre = np.maximum((xn - b_dec) @ W_enc + b_enc, 0)
    k = max(1, round(sae.k * G / sae.d_sae))
    z = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1, kind="stable")[:, :k]
    np.put_along_axis(z, top, np.take_along_axis(pre, top, 1), 1)
    sse = ((xn - z @ W_dec - b_dec) ** 2).sum()
    return sse / ((xn - xn.mean(0)) ** 2).sum()


def test_one_pass_curve_equals_brute_force_truncation_at_every_G():
    sae = make_sae()
    xs = batches()
    r = progressive_eval(sae, xs, rescaled_G=[1, 10, 96])
    expected = np.array([brute_force_fvu(sae, xs, G) for G in range(1, 97)])
    np.testing.assert_allclose(r.fvu, expected, rtol=1e-5, atol=1e-6)
    # rescaled mode at chosen G against numpy, and the library's brute force against both
    brute = fvu_at(sae, xs, [1, 10, 96], "rescaled")
    for G in (1, 10, 96):
        expected = brute_force_rescaled_fvu(sae, xs, G)
        assert r.rescaled_fvu[G] == pytest.approx(expected, rel=1e-5) and brute[G] == pytest.approx(expected, rel=1e-5)
    assert r.rescaled_fvu[96] == pytest.approx(r.fvu[-1], rel=1e-5)  # the modes agree at G = N


def test_curve_l0_and_dead_fraction_count_latents_below_G():
    sae = make_sae()
    xs = batches()
    r = progressive_eval(sae, xs)
    z = dense_code(torch.cat(xs), sae.W_enc, sae.b_enc, sae.b_dec, sae.k).detach()
    for G in (1, 5, 50, 96):
        assert r.l0[G - 1] == pytest.approx(float((z[:, :G] > 0).sum(1).double().mean()))
        assert r.dead_frac[G - 1] == pytest.approx(float((z[:, :G] > 0).sum(0).eq(0).double().mean()))


def test_latent_stats_match_dense_computation():
    sae = make_sae()
    xs = batches()
    stats = latent_stats(sae, xs)
    z = dense_code(torch.cat(xs), sae.W_enc, sae.b_enc, sae.b_dec, sae.k).detach().double()
    torch.testing.assert_close(stats["e_z2"], z.pow(2).mean(0))
    torch.testing.assert_close(stats["e_z"], z.mean(0))
    torch.testing.assert_close(stats["freq"], (z > 0).double().mean(0))
    torch.testing.assert_close(stats["max"], z.max(0).values)
    assert int(stats["n_tokens"]) == 210


def test_sorting_by_importance_orders_stats_and_keeps_reconstruction():
    sae = make_sae()
    xs = batches()
    stats = latent_stats(sae, xs)
    sorted_sae = sort_by_importance(sae, stats, "e_z2")
    torch.testing.assert_close(sorted_sae(xs[0]), sae(xs[0]), rtol=0, atol=1e-6)
    again = latent_stats(sorted_sae, xs)["e_z2"]
    assert (again[1:] <= again[:-1]).all()
    assert sorted_sae.cfg.progsae["permutation"]["metric"] == "e_z2"
    with pytest.raises(ProgsaeError, match="unknown importance metric"):
        importance_order(stats, "loudness")


def test_decoder_cov_eigs_match_numpy():
    sae = make_sae()
    W = sae.W_dec.detach().double().numpy()
    expected = np.sort(np.linalg.eigvalsh(np.cov(W.T)))[::-1]
    np.testing.assert_allclose(decoder_cov_eigs(sae).numpy(), expected, rtol=1e-8, atol=1e-12)


def test_power_law_fit_recovers_exponent_and_respects_window(tmp_path):
    rank = np.arange(1, 1001)
    values = 3.0 * rank**-0.8
    values[500:] = values[500:] * 0.01  # a break the window excludes
    np.random.default_rng(0).shuffle(values)  # the fit sorts
    f = fit_power_law(values, 1, 500)
    assert f.exponent == pytest.approx(-0.8, abs=1e-9) and f.intercept == pytest.approx(np.log(3.0))
    assert f.r2 == pytest.approx(1.0) and (f.lo, f.hi) == (1, 500)
    assert fit_power_law(values).r2 < 0.99
    assert fit_power_law(np.r_[values, np.zeros(10)]).hi == 1000  # zeros (dead latents) are cut
    with pytest.raises(ProgsaeError, match="fewer than 3"):
        fit_power_law(values, 10, 11)
    png = plot_power_laws({"v": values}, {"v": f}, tmp_path / "p.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("k", [1, 5, 8, 17])
def test_blocked_scan_residual_norms_match_sequential_updates(k):
    g = torch.Generator().manual_seed(k)
    W, r0 = torch.randn(40, 6, generator=g), torch.randn(13, 6, generator=g)
    values, indices = torch.rand(13, k, generator=g), torch.randint(0, 40, (13, k), generator=g)
    expected = torch.empty(13, k, dtype=torch.float64)
    for b in range(13):
        r = r0[b].double()
        for t in range(k):
            r = r - values[b, t].double() * W[indices[b, t]].double()
            expected[b, t] = r @ r
    torch.testing.assert_close(residual_norms(W, values, indices, r0).double(), expected, rtol=1e-5, atol=1e-5)
