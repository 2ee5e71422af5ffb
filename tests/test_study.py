"""The statistics behind the report's verdicts, each against an independent computation."""

import json

import numpy as np
import pytest
import torch

from progsae.analysis import latent_stats, progressive_eval
from progsae.analysis.compare import fvu_at_l0
from progsae.analysis.intervals import block_weights, interval, over_seeds, ratio
from progsae.analysis.outliers import flagged_latents, norm_profile, robust_window
from progsae.analysis.progressive import ProgressiveEval
from progsae.analysis.scaling import fit_scaling, predict
from progsae.data import ActivationDir, write_activations
from reference import dense_code, make_sae


def heavy_acts(tmp_path, n=6000, d=16, seed=0):
    """Gaussian rows with 1% of them scaled up 12x: a heavy tail like an LM's first-position tokens."""
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, d)) + 0.5
    x[g.random(n) < 0.01] *= 12
    x = x.astype(np.float32)
    path = write_activations(tmp_path / "acts", [torch.from_numpy(x[i : i + 1000]) for i in range(0, n, 1000)], d, {})
    return ActivationDir(path), x.astype(np.float64)


def test_norm_profile_matches_numpy(tmp_path):
    acts, x = heavy_acts(tmp_path)
    p = norm_profile(acts, quantile=0.99)
    norm = np.linalg.norm(x, axis=1)
    dev = ((x - x.mean(0)) ** 2).sum(1)
    top = np.sort(dev)[::-1]
    assert p["threshold"] == pytest.approx(np.quantile(norm, 0.99), rel=1e-6)
    assert p["norm_quantiles"]["0.5"] == pytest.approx(np.median(norm), rel=1e-6)
    assert p["norm_quantiles"]["max"] == pytest.approx(norm.max(), rel=1e-6)
    assert p["variance_share"]["top_1%"] == pytest.approx(top[:60].sum() / top.sum(), rel=1e-6)
    assert p["variance_share"]["top_5%"] == pytest.approx(top[:300].sum() / top.sum(), rel=1e-6)
    out = norm > np.quantile(norm, 0.99)
    assert p["n_outliers"] == out.sum() and p["outlier_variance_share"] == pytest.approx(dev[out].sum() / dev.sum())
    assert sum(p["histogram"]["counts"]) == len(x)


def test_outlier_share_of_each_latent_and_the_robust_window(tmp_path):
    sae = make_sae(d=16)
    acts, x = heavy_acts(tmp_path)
    thr = float(np.quantile(np.linalg.norm(x, axis=1), 0.99))
    s = latent_stats(sae, acts.iter_rows(1000), outlier_norm=thr)
    xt = torch.from_numpy(x).float()
    z = dense_code(xt, sae.W_enc, sae.b_enc, sae.b_dec, sae.k).detach().double().numpy()
    out = np.linalg.norm(x, axis=1) > thr
    np.testing.assert_allclose(s["e_z2_outlier"].numpy(), (z[out] ** 2).sum(0) / len(x), rtol=1e-5, atol=1e-12)
    # flagging and the window's first rank on a hand-made case: latents 3 and 7 live on outliers
    e = np.array([9.0, 1, 2, 50, 3, 4, 5, 40, 0.5] + [0.1] * 23)
    e_out = np.zeros_like(e)
    e_out[[3, 7]] = [45, 30]
    e_out[0] = 1.0  # a little, not most
    flagged = flagged_latents(e, e_out)
    assert flagged.tolist() == [3, 7]  # by decreasing E[z^2]
    assert robust_window(e, flagged, hi=16) == 3  # ranks 1 and 2 are the flagged ones: start at 3
    assert robust_window(e, np.array([], int), hi=16) == 1


def test_block_bootstrap_interval_has_the_textbook_width():
    """For a mean of iid blocks the 95% interval is +-1.96 sigma / sqrt(n)."""
    g = np.random.default_rng(3)
    n, sigma = 400, 2.0
    v = g.normal(5.0, sigma, size=n)
    W = block_weights(n, 4000, seed=1)
    assert (W.sum(1) == n).all()
    lo, hi = interval(ratio(v, np.ones(n), W))
    half = 1.96 * v.std(ddof=1) / np.sqrt(n)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.08)
    assert lo < v.mean() < hi
    # one seed: unchanged; two seeds with far-apart values: the interval spans both
    r = ratio(v, np.ones(n), W)
    np.testing.assert_array_equal(over_seeds([v.mean()], [r])[1], r)
    m, reps = over_seeds([1.0, 3.0], [np.full(4000, 1.0), np.full(4000, 3.0)])
    assert m == 2.0 and interval(reps) == [1.0, 3.0]


def test_block_sums_give_the_fvu_and_its_bootstrap(tmp_path):
    sae = make_sae(d=16)
    acts, x = heavy_acts(tmp_path, n=3000)
    acc = ProgressiveEval(sae, rescaled_G=[24, 96], block_G=[24, 96], block_size=70)
    for b in acts.iter_rows(512):
        acc.update(b)
    r = acc.result()
    blocks = r.blocks
    assert len(blocks["var"]) == -(-3000 // 70)
    for G in (24, 96):  # the sums over blocks give the table's FVU
        assert sum(blocks["sse_prefix"][G]) / sum(blocks["var"]) == pytest.approx(r.fvu[G - 1], rel=1e-9)
        assert sum(blocks["sse_rescaled"][G]) / sum(blocks["var"]) == pytest.approx(r.rescaled_fvu[G], rel=1e-9)
    # block 5 by hand (rows 350..419) at G = 24, prefix mode, against a dense numpy reconstruction
    xt = torch.from_numpy(x[350:420]).float()
    z = dense_code(xt, sae.W_enc, sae.b_enc, sae.b_dec, sae.k).detach().double().numpy()
    rec = z[:, :24] @ sae.W_dec.detach().double().numpy()[:24] + sae.b_dec.detach().double().numpy()
    assert blocks["sse_prefix"][24][5] == pytest.approx(((x[350:420] - rec) ** 2).sum(), rel=1e-5)
    assert blocks["var"][5] == pytest.approx(((x[350:420] - x.mean(0)) ** 2).sum(), rel=1e-6)


def test_fvu_and_rsa_on_typical_tokens_match_numpy_on_the_tokens_at_or_below_the_outlier_norm(tmp_path):
    """The typical tokens (norm <= the 99th percentile): their squared residuals over their squared deviations
    from the mean of all tokens, by dense numpy reconstructions in both modes; RSA on the sample's typical rows
    by a numpy pairwise computation; and the table's intervals through the aggregate."""
    from progsae.analysis.aggregate import Aggregate
    from progsae.analysis.evaluate import evaluate
    from progsae.sae import rescaled_k

    sae = make_sae(d=16)
    acts, x = heavy_acts(tmp_path, n=3000)
    norm = np.linalg.norm(x, axis=1)
    thr = float(np.quantile(norm, 0.99))
    e = evaluate(sae, acts, [24, 96], rsa_tokens=150, progress=False, n_boot=200, outlier_norm=thr)
    typ = norm <= thr
    W = {n: t.detach().double().numpy() for n, t in (("W_enc", sae.W_enc), ("b_enc", sae.b_enc), ("W_dec", sae.W_dec),
                                                     ("b_dec", sae.b_dec))}  # fmt: skip
    xt, dev = torch.from_numpy(x).float(), ((x - x.mean(0)) ** 2).sum(1)

    def recon(G, mode):
        if mode == "prefix":
            z = dense_code(xt, sae.W_enc, sae.b_enc, sae.b_dec, sae.k).detach().double().numpy()[:, :G]
        else:
            z = dense_code(xt, sae.W_enc[:, :G], sae.b_enc[:G], sae.b_dec, rescaled_k(sae.k, G, 96)).detach().double().numpy()
        return z @ W["W_dec"][:G] + W["b_dec"]

    def spearman_cosine(a, b):  # pairs' cosine dissimilarities (rounded: identical rows tie), ties ranked by their mean
        def ranks(v):
            u = v / np.linalg.norm(v, axis=1, keepdims=True)
            d = np.round((1 - u @ u.T)[np.triu_indices(len(v), 1)], 10)
            vals, inv, counts = np.unique(d, return_inverse=True, return_counts=True)
            return (np.cumsum(counts) - (counts - 1) / 2)[inv]

        return np.corrcoef(ranks(a), ranks(b))[0, 1]

    sample = np.arange(0, 3000, 20)  # every 20th row: 150 of 3000
    st = sample[typ[sample]]
    assert 0 < (~typ).sum() and len(st) < len(sample)
    for row in e["table"]:
        for mode in ("prefix", "rescaled"):
            r = recon(row["G"], mode)
            sse = ((x - r) ** 2).sum(1)
            assert row[f"fvu_typical_{mode}"] == pytest.approx(sse[typ].sum() / dev[typ].sum(), rel=1e-5)
            assert row[f"fvu_{mode}"] == pytest.approx(sse.sum() / dev.sum(), rel=1e-5)
            assert row[f"fvu_typical_{mode}"] != pytest.approx(row[f"fvu_{mode}"], rel=1e-2)  # the outliers matter
            rsa_t = row[f"rsa_typical_{mode}"]["cosine"]["spearman"]
            rec = sae(xt[st], row["G"], mode).detach().double().numpy()  # as evaluated: float32
            assert np.abs(rec - r[st]).max() < 1e-4
            assert rsa_t == pytest.approx(spearman_cosine(x[st], rec), abs=1e-6)
    t = Aggregate({"a": json.loads(json.dumps(e))}, {"a": ["a"]}, 200).table("a")  # as read from eval/NAME.json
    for row, mine in zip(t, e["table"], strict=True):
        for key in ("fvu_typical_prefix", "fvu_typical_rescaled", "rsa_typical_prefix"):
            lo, hi = row[f"{key}_ci"]
            v = mine[key]["cosine"]["spearman"] if key.startswith("rsa") else mine[key]
            assert row[key] == pytest.approx(v) and lo < v < hi
    assert evaluate(sae, acts, [24], rsa_tokens=50, progress=False, n_boot=10)["table"][0]["fvu_typical_prefix"] is None


@pytest.mark.parametrize("noise", [0.0, 0.002])
def test_nonlinear_fit_recovers_known_parameters_with_the_floor_free(noise):
    G = np.arange(1, 4097)
    fvu = 0.9 * G**-0.45 + 0.06
    fvu = fvu * (1 + noise * np.random.default_rng(0).normal(size=len(G)))
    f = fit_scaling(G, fvu, lo=4)
    tol = 1e-3 if noise == 0 else 0.05
    assert f["b"] == pytest.approx(0.45, rel=tol) and f["c"] == pytest.approx(0.06, rel=tol * 3)
    assert f["a"] == pytest.approx(0.9, rel=tol * 2) and f["r2"] > 0.99 and f["G_min"] == 4
    np.testing.assert_allclose(predict(f, [4, 4096]), 0.9 * np.array([4, 4096]) ** -0.45 + 0.06, rtol=tol)
    # with no floor in the data, c is found at 0 (the bound), not forced there
    g = fit_scaling(G, 0.7 * G**-0.3, lo=1)
    assert g["c"] == pytest.approx(0, abs=1e-4) and g["b"] == pytest.approx(0.3, rel=1e-3)


def test_a_fit_through_at_most_four_points_reports_no_goodness_of_fit():
    """Three parameters through 4 points leave one degree of freedom: no R² (None), said in the method; with 5
    points R² is reported and equals 1 - SSE/SST of the fitted law, computed here in numpy."""
    N = np.array([8, 16, 32, 64])
    fvu = 0.9 * N**-0.4 + 0.05 + np.array([0.004, -0.003, 0.002, -0.001])
    f = fit_scaling(N, fvu)
    assert f["r2"] is None and "4 points for 3 parameters: no goodness of fit" in f["method"]
    assert fit_scaling(N[:2], fvu[:2]) is None  # fewer points than parameters: no fit at all
    N5 = np.array([8, 16, 32, 64, 128])
    fvu5 = 0.9 * N5**-0.4 + 0.05 + np.array([0.004, -0.003, 0.002, -0.001, 0.003])
    g = fit_scaling(N5, fvu5)
    resid = fvu5 - (g["a"] * N5 ** -g["b"] + g["c"])
    assert g["r2"] == pytest.approx(1 - (resid**2).sum() / ((fvu5 - fvu5.mean()) ** 2).sum(), rel=1e-9)
    assert "goodness" not in g["method"]


def test_the_plateau_near_fvu_1_is_left_out_of_the_fit():
    """A prefix curve whose first G explain almost nothing (FVU 0.99, then a known law): the fit starts at the
    first G below 1 - PLATEAU (found here by a plain scan) and recovers the law; fitted with the plateau
    points kept (tolerance 0), the same law is missed."""
    from progsae.analysis.scaling import PLATEAU

    G = np.arange(1, 1025)
    law = 3.0 * G**-0.5 + 0.05
    fvu = np.where(law > 0.99, 0.99 - 1e-4 * G, law)  # a flat shoulder, slightly falling, then the law
    first = next(g for g, v in zip(G, fvu, strict=True) if v < 1 - PLATEAU)
    f = fit_scaling(G, fvu)
    assert f["G_min"] == first and f["plateau_points"] == sum(v >= 1 - PLATEAU for v in fvu) == first - 1
    assert f["b"] == pytest.approx(0.5, rel=1e-3) and f["c"] == pytest.approx(0.05, rel=1e-2)
    kept = fit_scaling(G, fvu, plateau=0)
    assert kept["G_min"] == 1 and abs(kept["b"] - 0.5) > 0.05


def brute_fvu_l0(sae, x, G):
    z = dense_code(x, sae.W_enc, sae.b_enc, sae.b_dec, sae.k).detach().double().numpy()[:, :G]
    xn = x.double().numpy()
    rec = z @ sae.W_dec.detach().double().numpy()[:G] + sae.b_dec.detach().double().numpy()
    return ((xn - rec) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum(), (z > 0).sum(1).mean()


def test_matched_l0_reads_the_curve_where_l0_equals_the_target():
    """At an L0 some G reaches, the FVU there (brute force); between two, interpolated in log L0; a permuted
    SAE compared at its own L0 is compared against the unpermuted SAE's curve at that same L0."""
    sae = make_sae()
    x = torch.randn(400, 16, generator=torch.Generator().manual_seed(1)) + 0.3
    r = progressive_eval(sae, [x])
    for G in (10, 40, 96):
        fvu, l0 = brute_fvu_l0(sae, x, G)
        first = int(np.argmax(r.l0 >= r.l0[G - 1])) + 1  # the first G with this L0 gives the same reconstruction
        assert fvu_at_l0(r.l0, r.fvu, l0) == pytest.approx(brute_fvu_l0(sae, x, first)[0], rel=1e-5)
    # halfway in log L0 between the L0s of G = 20 and of the next G with a larger L0: the mean of the FVUs at
    # the first G of each of those two L0s (brute force), as the interpolation is linear in log L0
    a = int(np.argmax(r.l0 >= r.l0[19])) + 1
    b = 21
    while r.l0[b - 1] == r.l0[a - 1]:
        b += 1
    fvu_a, l0_a = brute_fvu_l0(sae, x, a)
    fvu_b, l0_b = brute_fvu_l0(sae, x, b)
    assert l0_a < l0_b and fvu_b < fvu_a
    f = fvu_at_l0(r.l0, r.fvu, np.exp((np.log(l0_a) + np.log(l0_b)) / 2))
    assert f == pytest.approx((fvu_a + fvu_b) / 2, rel=1e-5)
    assert fvu_at_l0(r.l0, r.fvu, r.l0[-1] + 1) is None


@pytest.mark.slow  # 8-30 s: 400 bootstrap replicates re-ranked one by one
def test_rsa_replicates_are_the_rsa_at_unit_weights_and_track_a_re_ranked_bootstrap():
    from progsae.analysis.rsa import _rank, dissimilarities, pearson, rsa, spearman_replicates

    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 12, generator=g) + 0.2
    x_hat = x + 0.8 * torch.randn(80, 12, generator=g)
    one = spearman_replicates(x, x_hat, torch.ones(1, 80))
    assert float(one[0]) == pytest.approx(rsa(x, x_hat)["cosine"]["spearman"], rel=1e-12)
    W = torch.from_numpy(block_weights(80, 400, seed=5))
    fast = spearman_replicates(x, x_hat, W).numpy()
    slow = []  # the textbook bootstrap: draw tokens, drop self-pairs, re-rank, correlate
    for w in W.numpy().astype(int):
        idx = torch.from_numpy(np.repeat(np.arange(80), w))
        a, b = dissimilarities(x[idx], "cosine"), dissimilarities(x_hat[idx], "cosine")
        i, j = torch.triu_indices(len(idx), len(idx), offset=1)
        keep = idx[i] != idx[j]
        slow.append(pearson(_rank(a[keep]), _rank(b[keep])))
    slow = np.array(slow)
    assert np.corrcoef(fast, slow)[0, 1] > 0.95
    assert fast.std() == pytest.approx(slow.std(), rel=0.15)


def test_verdict_rule_counts_only_comparisons_whose_interval_excludes_the_reverse():
    from progsae.study.findings import _verdict

    def c(certain, ci=(0.1, 0.2)):
        return {"certain": certain, "ci": list(ci)}

    assert _verdict([c(True), c(True)]) == "reproduced"
    assert _verdict([c(True), c(False)]) == "partly reproduced"
    assert _verdict([c(False), c(False)]) == "not reproduced"
    assert _verdict([{"certain": False, "ci": None}]) == "undecided (no interval)"


def planted_findings(fvus: dict, training: dict) -> list[dict]:
    """The findings of a run with N = 64 whose evaluations are planted: fvus[family][mode] = FVU at every G of
    the grid, the same 40 blocks of tokens for every SAE (paired), small block noise shared by all."""
    from progsae.analysis.aggregate import Aggregate
    from progsae.study.config import RunConfig
    from progsae.study.findings import findings
    from progsae.study.plan import Plan

    plan, grid = Plan(RunConfig(d_sae=64, k=8, grid=[16, 32, 64])), [16, 32, 64]
    noise = 1 + 0.02 * np.random.default_rng(0).normal(size=40)
    evals = {}
    for n in plan.names():
        f = fvus.get(plan[n].family, {"prefix": 0.5, "rescaled": 0.5})
        Gs = [G for G in grid if G <= plan[n].d_sae]
        evals[n] = {
            "table": [{"G": G, "fvu_prefix": f["prefix"], "fvu_rescaled": f["rescaled"], "l0": G / 8, "l0_rescaled": G / 8}
                      for G in Gs],
            "blocks": {"var": [10.0] * 40, **{f"sse_{m}": {str(G): (10 * f[m] * noise).tolist() for G in Gs}
                                              for m in ("prefix", "rescaled")}},
        }  # fmt: skip
    agg = Aggregate(evals, plan.families(), 400, 0)
    G = np.arange(1, 65)
    curve = {"fvu_prefix": (1 / G**0.5).tolist(), "l0": (G / 8).tolist()}
    fit = {"exponent": -0.8, "r2": 0.95, "lo": 3}
    res = {
        "grid": grid,
        "saes": {n: {"role": plan[n].role} for n in plan.names()},
        "curves": {fam: {**curve, "fvu_prefix": [v * (0.9 if "matryoshka" in fam else 1) for v in curve["fvu_prefix"]]}
                   for fam in plan.families()},
        "power_laws": {n: {"e_z2": {"full": dict(fit, r2=0.8), "robust": fit}} for n in plan.names("vanilla", "native")},
        "feature_splitting": [{"G": g, "matched_0.9": 0.5, "matched_0.9_all_N": 0.6} for g in (16, 32)],
        "training": training,
    }  # fmt: skip
    return findings(agg, res, plan)


def test_a_verdict_is_reproduced_only_when_the_rule_holds_in_both_truncation_modes():
    """Planted: the fixed Matryoshka beats the permuted SAE in rescaled mode (0.30 vs 0.40) and loses in prefix
    mode (0.50 vs 0.40): partly, naming the mode that holds; the sampled one wins in both: reproduced. The
    truncated SAE is worse than native in rescaled mode (0.40 vs 0.35) but better in prefix mode (0.40 vs 0.45):
    partly.
    The full-window power law (R² 0.80) is below the rule's 0.9; topk-32 had not converged (FVU 0.02 lower per
    doubling of tokens at a final FVU of 0.4: 5.0%), so every finding about it says so and the others do not."""
    fvus = {"matryoshka": {"prefix": 0.50, "rescaled": 0.30}, "matryoshka-sampled": {"prefix": 0.30, "rescaled": 0.30},
            "topk-64-by-e_z2": {"prefix": 0.40, "rescaled": 0.40}, **{f"topk-{g}": {"prefix": 0.45, "rescaled": 0.35}
                                                                       for g in (16, 32)}}  # fmt: skip
    training = {"topk-32": {"converged": False, "fvu_per_doubling": -0.02, "final_fvu": 0.4},
                "topk-64": {"converged": True, "fvu_per_doubling": -0.001, "final_fvu": 0.4}}  # fmt: skip
    power, fixed, sampled, split = planted_findings(fvus, training)
    assert fixed["ours"].startswith("matryoshka (fixed") and sampled["ours"].startswith("matryoshka-sampled")
    assert fixed["verdict"] == "partly reproduced (rescaled mode: reproduced; prefix mode: not reproduced)"
    assert sampled["verdict"] == "reproduced"
    late = "; not converged: topk-32 (FVU still falling 5.0% of its value per doubling of tokens)"
    assert split["verdict"] == "partly reproduced (rescaled mode: reproduced; prefix mode: not reproduced)" + late
    assert power["verdict"] == (
        "reproduced; over the full window (ranks 1..N/2) R² as low as 0.80, below 0.9" + late
    )
    # the same in both modes: that verdict alone; the reverse in both: not reproduced
    fvus["matryoshka"] = {"prefix": 0.30, "rescaled": 0.30}
    fvus.update({f"topk-{g}": {"prefix": 0.50, "rescaled": 0.50} for g in (16, 32)})  # truncated better in both
    _, fixed, _, split = planted_findings(fvus, {})
    assert fixed["verdict"] == "reproduced" and split["verdict"] == "not reproduced"


def test_latent_records_match_a_dense_brute_force():
    from progsae.interp.records import BINS, latent_records, non_activating

    sae = make_sae(d=16, N=96, k=5)
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(300, 16, generator=g) + 0.3 for _ in range(4)]
    rec = latent_records(sae, xs, n_top=6, n_sample=10, n_random_rows=50, seed=1)
    x = torch.cat(xs)
    z = dense_code(x, sae.W_enc, sae.b_enc, sae.b_dec, sae.k).detach().double().numpy()  # [1200, 96]
    np.testing.assert_allclose(rec["freq"].numpy(), (z > 0).mean(0))
    np.testing.assert_allclose(rec["e_z2"].numpy(), (z**2).mean(0), rtol=1e-5)
    for i in range(96):
        col = z[:, i]
        fired = np.flatnonzero(col > 0)
        top = fired[np.argsort(-col[fired], kind="stable")][:6]
        got = rec["top_rows"][i].numpy()
        got = got[got >= 0]
        np.testing.assert_allclose(np.sort(col[got])[::-1], col[top], rtol=1e-5)  # the same top values
        np.testing.assert_allclose(rec["top_values"][i, : len(got)].numpy(), col[got], rtol=1e-5)
        s = rec["sample_rows"][i].numpy()
        s = s[s >= 0]
        assert len(s) == min(10, len(fired)) and (col[s] > 0).all()  # a sample of its own activations
        assert rec["hist"][i].sum() == len(fired)
        h, _ = np.histogram(np.clip(col[fired], BINS[0], BINS[-1] * 0.999), BINS)
        assert (rec["hist"][i].numpy() == h).all()
        quiet = [r for r in rec["random_rows"].tolist() if col[r] == 0]  # the random rows it does not fire on
        assert quiet and non_activating(rec, i, 20) == quiet[:20]
    assert len(rec["random_rows"]) == 50 and len(set(rec["random_rows"].tolist())) == 50


def test_llm_free_proxies_against_hand_computed_values():
    import math

    from progsae.interp.proxies import lens_agreement, logit_lens, token_entropy

    ids = torch.tensor([[5, 5, 5, -1], [1, 2, 3, 4], [1, 1, 2, 2], [-1, -1, -1, -1]])
    np.testing.assert_allclose(token_entropy(ids).numpy(), [0, math.log(4), math.log(2), 0], atol=1e-12)
    lens = torch.tensor([[5, 9], [7, 8], [2, 0], [1, 1]])
    got = lens_agreement(ids, lens).numpy()
    np.testing.assert_allclose(got[:3], [1.0, 0.0, 0.5])
    assert np.isnan(got[3])  # no records: no agreement to measure
    sae = make_sae(d=16, N=24)
    U = torch.randn(50, 16, generator=torch.Generator().manual_seed(2))
    expect = np.argsort(-(sae.W_dec.detach().double().numpy() @ U.double().numpy().T), axis=1)[:, :3]
    assert (logit_lens(sae, U, k=3, chunk=7).numpy() == expect).all()


def test_simulation_and_detection_scores_on_a_latent_whose_rule_is_known():
    """A latent fires on the token 'cat' (value 5). A judge that follows that rule scores ~1; one that guesses
    scores ~0 (simulation) and ~0.5 (detection)."""
    from progsae.interp.scoring import auroc, balanced_accuracy, simulation_score

    g = np.random.default_rng(0)
    vocab = ["the", "cat", "sat", "on", "mat", "dog"]
    contexts = [list(g.choice(vocab, 12)) for _ in range(200)]
    true = [np.array([5.0 if t == "cat" else 0.0 for t in c]) for c in contexts]
    follows = [np.array([4.0 if t == "cat" else 0.1 for t in c]) for c in contexts]  # the rule, other scale
    guesses = [g.random(12) for _ in contexts]
    assert simulation_score(follows, true) == pytest.approx(1.0, abs=1e-9)
    assert abs(simulation_score(guesses, true)) < 0.1
    fires = np.array([t.max() > 0 for t in true])
    assert fires.any() and not fires.all()
    assert balanced_accuracy(["cat" in c for c in contexts], fires) == 1.0
    coin = g.random(200) < 0.5
    assert abs(balanced_accuracy(coin, fires) - 0.5) < 0.1
    assert auroc([c.count("cat") for c in contexts], fires) == 1.0
    assert abs(auroc(g.random(200), fires) - 0.5) < 0.1
    assert simulation_score([np.zeros(12)] * 200, true) is None  # a constant prediction has no correlation


def test_stratified_latents_take_live_latents_evenly_from_each_rank_band():
    from progsae.interp.study import stratified_latents

    order = list(range(40))[::-1]  # latent 39 has rank 1
    alive = [i % 3 != 0 for i in range(40)]
    picks = stratified_latents(order, alive, [10, 40], 3)
    band1 = [x for x in order[:10] if alive[x]]  # ranks 1-10: latents 39..30, the live ones
    band2 = [x for x in order[10:] if alive[x]]
    assert band1 == [38, 37, 35, 34, 32, 31] and len(band2) == 20
    assert picks == [38, 35, 31, 29, 14, 1]  # first, middle (index 2 of 0..5; 10 of 0..19) and last of each band
    assert all(alive[p] for p in picks)


def test_interpretability_findings_follow_the_rule_and_a_weak_judge_decides_nothing():
    from progsae.interp.bands import bands
    from progsae.study.findings import interpretability_findings as findings

    N, rng = 64, np.random.default_rng(0)

    def scores(level, slope):  # simulation falls with rank by `slope`
        return [{"latent": i, "simulation": level - slope * i / N + rng.normal(0, 0.02), "detection_auroc": 0.8,
                 "malformed": 0, "error": None} for i in range(0, N, 2)]  # fmt: skip

    study = {"van": {"scores": scores(0.8, 0.0)}, "mat": {"scores": scores(0.6, 0.4)}}
    good, weak = {"judge": "j", "simulation": 0.9}, {"judge": "j", "simulation": 0.1}
    f = findings(study, "van", ["mat"], N, good, 500)
    assert [x["verdict"] for x in f] == ["reproduced", "reproduced"]  # vanilla higher; inner above outer
    assert all(x["verdict"].startswith("undecided (judge too weak") for x in findings(study, "van", ["mat"], N, weak, 500))
    flat = {"van": {"scores": scores(0.6, 0.0)}, "mat": {"scores": scores(0.8, 0.0)}}  # the reverse, and no slope
    assert [x["verdict"] for x in findings(flat, "van", ["mat"], N, good, 500)] == ["not reproduced", "not reproduced"]
    proxies = {"live": [True] * N, "token_entropy": np.arange(N, dtype=float), "lens_agreement": np.full(N, 0.5)}
    b = bands(study["mat"]["scores"], proxies, [16, 32, 64], 500)
    inside = [s["simulation"] for s in study["mat"]["scores"] if 16 <= s["latent"] < 32]
    assert b[1]["simulation"]["mean"] == pytest.approx(np.mean(inside)) and b[1]["simulation"]["n"] == 8
    assert b[1]["token_entropy"] == pytest.approx(np.arange(16, 32).mean()) and b[2]["band"] == "33-64"
    lo, hi = b[1]["simulation"]["ci"]
    assert lo < np.mean(inside) < hi
