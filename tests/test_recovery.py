"""Known answers: the hierarchical synthetic generator against its definition, the truth file, and the recovery
metrics at every G against brute force (itertools, plain numpy loops) and planted SAEs."""

import itertools
import json

import numpy as np
import pytest
import torch

from progsae import ProgsaeError
from progsae.analysis.recovery import TruthEval, first_match, linear_sum_assignment, mcc, uniqueness
from progsae.analysis.recovery import abs_cosines as abs_cos
from progsae.data import ActivationDir
from progsae.data.synthetic import SyntheticConfig, SyntheticSource, write_synthetic
from progsae.data.truth import TRUTH_FILE, load_truth
from progsae.files import load_tensors, save_tensors
from progsae.sae import SAE, SAEConfig

TREES = dict(trees=3, depth=2, branching=3)  # 3 * (1 + 3 + 9) = 39 features in trees


def brute_force_assignment_cost(cost):
    n, m = cost.shape
    if n > m:
        cost, (n, m) = cost.T, (m, n)
    return min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))


@pytest.mark.parametrize("shape", [(4, 4), (3, 6), (6, 3), (5, 5), (2, 7)])
def test_assignment_is_minimal_against_every_permutation(shape):
    rng = np.random.default_rng(sum(shape))
    for trial in range(20):
        cost = rng.random(shape)
        if trial % 4 == 0:
            cost = np.round(cost * 3) / 3  # ties
        rows, cols = linear_sum_assignment(cost)
        assert len(rows) == min(shape) and len(set(rows)) == len(rows) and len(set(cols)) == len(cols)
        assert (np.diff(rows) > 0).all()
        assert cost[rows, cols].sum() == pytest.approx(brute_force_assignment_cost(cost), abs=1e-12)


def test_mcc_and_uniqueness_against_their_definitions_by_brute_force():
    rng = np.random.default_rng(0)
    C = np.abs(rng.standard_normal((6, 4)))
    C /= C.max()
    best = max(
        np.mean([C[r, c] for r, c in zip(rows, p, strict=True)])
        for rows in itertools.combinations(range(6), 4)
        for p in itertools.permutations(range(4))
    )
    assert mcc(C) == pytest.approx(best, abs=1e-12)
    assert uniqueness(C) == len({int(np.argmax(r)) for r in C}) / 6


def planted(V: torch.Tensor, order: list[int], extra: torch.Tensor, k: int) -> SAE:
    """A TopK SAE whose latent j is the true feature order[j] (or, past the features, a row of `extra`),
    encoder tied to the decoder."""
    W = torch.cat([V[order], extra])
    sae = SAE(SAEConfig(d_in=V.shape[1], d_sae=len(W), k=k))
    with torch.no_grad():
        sae.W_dec.copy_(W)
        sae.W_enc.copy_(W.t())
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_planted_decoder_recovers_every_feature_exactly_when_the_last_one_enters():
    F, d = 12, 32
    basis = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)).double()).Q.t().float()
    V, extra = basis[:F], basis[F : F + 6]  # extra latents orthogonal to every feature
    order = torch.randperm(F, generator=torch.Generator().manual_seed(1)).tolist()
    # interleave: features at latent positions `where`, the extras elsewhere
    where = sorted(torch.randperm(F + 6, generator=torch.Generator().manual_seed(2))[:F].tolist())
    W = torch.zeros(F + 6, d)
    W[where] = V[order]
    W[[i for i in range(F + 6) if i not in where]] = extra
    sae = planted(W, list(range(F + 6)), torch.zeros(0, d), k=4)
    from progsae.data.truth import Truth

    res = TruthEval(sae, Truth(V), list(range(1, F + 7))).result()
    last = where[-1] + 1
    for row in res["table"]:
        G = row["G"]
        held = sum(1 for w in where if w < G)
        assert row["recovered"] == pytest.approx(held / F, abs=1e-12)
        assert (row["recovered"] == 1) == (G >= last)
        # Hungarian over min(G, F) pairs: the G latents hold `held` exact features and G - held orthogonal ones
        assert row["mcc"] == pytest.approx(held / min(G, F), abs=1e-6)  # float32 basis
    assert res["curve"]["recovered"][last - 1] == 1 and res["curve"]["recovered"][last - 2] < 1
    # a pure permutation of the truth: MCC 1 at every G
    res = TruthEval(planted(V, order, torch.zeros(0, d), 4), Truth(V), [1, 5, F]).result()
    assert [r["mcc"] for r in res["table"]] == pytest.approx([1, 1, 1], abs=1e-6)


def test_generator_keeps_its_marginals_and_never_fires_a_child_without_its_parent():
    cfg = SyntheticConfig(d_in=32, n_features=120, mean_active=5, seed=3, **TREES)
    src = SyntheticSource(cfg)
    assert (src.parent >= 0).sum() == 36 and torch.bincount(src.depth)[1:].tolist() == [9, 27]
    has = (src.parent >= 0).nonzero().flatten()
    assert (src.parent[has] < has).all()  # a parent is more frequent than its children
    a, _ = src.code(40_000, 0)
    on = a > 0
    assert not (on[:, has] & ~on[:, src.parent[has]]).any()
    rate, p = on.double().mean(0), src.probs.double()
    assert ((rate - p).abs() <= 5 * (p * (1 - p) / 40_000).sqrt() + 1e-9).all()  # binomial: 5 sigma
    ex = SyntheticSource(SyntheticConfig(d_in=32, n_features=120, mean_active=5, seed=3, exclusive=True, **TREES))
    a, _ = ex.code(20_000, 0)
    for node in ex.parent[ex.parent >= 0].unique():
        assert (a[:, ex.parent == node] > 0).sum(1).max() <= 1
    corr = SyntheticSource(SyntheticConfig(d_in=32, n_features=120, mean_active=5, seed=3, correlation=0.6))
    on = corr.code(40_000, 0)[0] > 0
    rate, p = on.double().mean(0), corr.probs.double()
    assert ((rate - p).abs() <= 5 * (p * (1 - p) / 40_000).sqrt() + 1e-9).all()  # roots keep their marginals
    c = np.corrcoef(on[:, :10].double().numpy().T)
    assert np.abs(c[np.triu_indices(10, 1)]).max() > 0.1  # and co-fire


def test_held_out_directory_carries_its_true_code_which_rebuilds_every_row(tmp_path):
    cfg = SyntheticConfig(d_in=16, n_features=60, mean_active=4, noise=0, bias=2.0, orthogonal=False, seed=1, **TREES)
    out = write_synthetic(cfg, tmp_path / "acts", 3000, held_out=True, progress=False)
    acts = ActivationDir(out)
    truth = load_truth(acts)
    src = SyntheticSource(cfg)
    assert torch.equal(truth.feature_vectors, src.directions) and torch.equal(truth.parent, src.parent)
    x = torch.cat(list(acts.iter_rows(1000)))
    rebuilt = torch.zeros(len(x), 16).index_add_(0, torch.arange(len(x)).repeat_interleave(truth.feature_indices.shape[1]),
                                                  truth.feature_values.flatten()[:, None] * src.directions[truth.feature_indices.flatten()])  # fmt: skip
    torch.testing.assert_close(rebuilt + src.bias_vector, x, atol=1e-5, rtol=0)
    on = truth.feature_values > 0
    for r in range(0, 3000, 97):  # indices ascending, padding after
        row = truth.feature_indices[r][on[r]]
        assert (row[1:] > row[:-1]).all() and on[r].tolist() == sorted(on[r].tolist(), reverse=True)
    train = write_synthetic(cfg, tmp_path / "train", 100, progress=False)
    assert load_truth(ActivationDir(train)).feature_indices is None


def test_a_truth_file_that_does_not_fit_is_refused_in_one_line(tmp_path):
    cfg = SyntheticConfig(d_in=8, n_features=20, mean_active=2, seed=0, trees=1, depth=1, branching=2)
    out = write_synthetic(cfg, tmp_path / "acts", 50, held_out=True, progress=False)
    good = load_tensors(out / TRUTH_FILE)
    bad = {
        "feature_vectors": {**good, "feature_vectors": good["feature_vectors"][:, :4]},
        "cycle": {**good, "parent": torch.tensor([1, 0] + [-1] * 18)},
        "rows": {**good, "feature_indices": good["feature_indices"][:10], "feature_values": good["feature_values"][:10]},
        "unknown": {**good, "extra": torch.zeros(2)},
        "negative": {**good, "feature_values": -good["feature_values"]},
    }
    for what, tensors in bad.items():
        save_tensors(out / TRUTH_FILE, tensors)
        with pytest.raises(ProgsaeError) as e:
            load_truth(ActivationDir(out))
        assert "\n" not in str(e.value), what


def brute_force_firing(sae, V, x, idx, val, parent, G, mode, threshold=0.9):
    """precision, recall, f1 (SAELens' per-latent definitions) and absorption, by plain loops."""
    n, F = len(x), len(V)
    truth = np.zeros((n, F), dtype=bool)
    for r in range(n):
        for i, v in zip(idx[r].tolist(), val[r].tolist(), strict=True):
            if v > 0:
                truth[r, i] = True
    code = sae.encode(x, G, mode)
    fires = np.zeros((n, sae.d_sae), dtype=bool)
    for r in range(n):
        for i, v in zip(code.indices[r].tolist(), code.values[r].tolist(), strict=True):
            if v > 0:
                fires[r, i] = True
    W = sae.W_dec.detach().double().numpy()
    Vn = V.double().numpy()
    C = np.abs((W / np.linalg.norm(W, axis=1, keepdims=True)) @ (Vn / np.linalg.norm(Vn, axis=1, keepdims=True)).T)
    p, rc, f = [], [], []
    for i in range(G):
        b = C[i].argmax()
        tp, fp, fn = (fires[:, i] & truth[:, b]).sum(), (fires[:, i] & ~truth[:, b]).sum(), (~fires[:, i] & truth[:, b]).sum()
        pi = tp / (tp + fp) if tp + fp else 0.0
        ri = tp / (tp + fn) if tp + fn else 0.0
        p.append(pi), rc.append(ri), f.append(2 * pi * ri / (pi + ri) if pi + ri else 0.0)
    absorbed = []
    for q in sorted(set(parent[parent >= 0].tolist())):
        if C[:G, q].max() < threshold:
            continue
        ell = C[:G, q].argmax()
        kids = parent == q
        event = truth[:, q] & truth[:, kids].any(1)
        if event.any():
            absorbed.append((event & ~fires[:, ell]).sum() / event.sum())
    return np.mean(p), np.mean(rc), np.mean(f), (np.mean(absorbed) if absorbed else None)


def test_firing_metrics_and_absorption_equal_plain_loops_in_both_modes(tmp_path):
    cfg = SyntheticConfig(d_in=48, n_features=40, mean_active=4, noise=0.02, orthogonal=True, seed=5, **TREES)
    out = write_synthetic(cfg, tmp_path / "acts", 1500, held_out=True, progress=False)
    acts = ActivationDir(out)
    truth = load_truth(acts)
    V = truth.feature_vectors
    # latents: a mix of true features (parents among them), blends of parent and child, and noise directions
    g = torch.Generator().manual_seed(0)
    W = torch.cat([V[[0, 5, 9, 13, 21]], V[[2, 7]] + 0.8 * V[[3, 8]], torch.randn(5, 48, generator=g), V[20:30]])
    sae = planted(W / W.norm(dim=1, keepdim=True), list(range(len(W))), torch.zeros(0, 48), k=5)
    Gs = [4, 7, 12, 22]
    ev = TruthEval(sae, truth, Gs)
    for x in acts.iter_rows(400):  # batch edges inside the set
        ev.update(x)
    res = ev.result()
    x = torch.cat(list(acts.iter_rows(1500)))
    for row in res["table"]:
        for mode in ("prefix", "rescaled"):
            p, r, f, a = brute_force_firing(sae, V, x, truth.feature_indices, truth.feature_values,
                                            truth.parent.numpy(), row["G"], mode)  # fmt: skip
            assert row[f"precision_{mode}"] == pytest.approx(p, abs=1e-12)
            assert row[f"recall_{mode}"] == pytest.approx(r, abs=1e-12)
            assert row[f"f1_{mode}"] == pytest.approx(f, abs=1e-12)
            if a is None:
                assert row[f"absorption_{mode}"] is None
            else:
                assert row[f"absorption_{mode}"] == pytest.approx(a, abs=1e-12)
    assert any(r["absorption_prefix"] for r in res["table"])  # the blends absorb: the check had something to see
    depth = truth.depth().numpy()
    first = first_match(ev.C, 0.9)
    for row in res["table"]:
        assert row["recovered_depth"] == [float((first[depth == d] <= row["G"]).mean()) for d in range(3)]
        parents = sorted(set(truth.parent[truth.parent >= 0].tolist()))
        assert row["recovered_parents"] == np.mean([first[q] <= row["G"] for q in parents])


def test_eval_adds_the_known_answers_whenever_the_directory_has_truth(tmp_path):
    from progsae import save_sae
    from progsae.cli import main

    cfg = SyntheticConfig(d_in=16, n_features=40, mean_active=3, seed=2, **TREES)
    write_synthetic(cfg, tmp_path / "acts", 2000, held_out=True, progress=False)
    sae = SAE(SAEConfig(d_in=16, d_sae=32, k=4))
    save_sae(sae, tmp_path / "sae", "saelens")
    assert main(["eval", str(tmp_path / "sae"), str(tmp_path / "acts"), "--out", str(tmp_path / "r.json"),
                 "--G", "8,32"]) == 0  # fmt: skip
    res = json.loads((tmp_path / "r.json").read_text())
    assert [r["G"] for r in res["truth"]["table"]] == [8, 32]
    row = res["truth"]["table"][1]
    for key in ("mcc", "uniqueness", "recovered", "recovered_depth", "f1_prefix", "f1_rescaled", "absorption_prefix"):
        assert key in row
    C = np.abs(torch.nn.functional.normalize(sae.W_dec.detach().double(), dim=1).numpy()
               @ torch.nn.functional.normalize(load_truth(ActivationDir(tmp_path / "acts")).feature_vectors.double(), dim=1).numpy().T)  # fmt: skip
    assert row["mcc"] == pytest.approx(mcc(C), abs=1e-12)


def test_no_small_training_seed_starts_an_sae_on_the_true_features():
    """SAE.init_tied draws randn [N, d] from torch's generator seeded with the training seed; the generator's
    features must not be that draw (they once were, for seed 0: the SAE started on the answer)."""
    for seed in range(3):
        V = SyntheticSource(SyntheticConfig(d_in=32, n_features=64, mean_active=3, seed=seed)).directions
        for train_seed in range(10):
            sae = SAE(SAEConfig(d_in=32, d_sae=128, k=4)).init_tied(torch.Generator().manual_seed(train_seed))
            C = first_match(abs_cos(sae.W_dec, V), 0.9)
            assert (C > 128).all(), (seed, train_seed)


def test_eval_on_fewer_rows_than_the_directory_reads_the_true_codes_of_those_rows(tmp_path):
    from progsae.analysis.evaluate import evaluate

    cfg = SyntheticConfig(d_in=48, n_features=40, mean_active=4, noise=0.02, orthogonal=True, seed=5, **TREES)
    acts = ActivationDir(write_synthetic(cfg, tmp_path / "acts", 1500, held_out=True, progress=False))
    truth = load_truth(acts)
    V = truth.feature_vectors
    W = torch.cat([V[[0, 5, 9, 13, 21]], V[[2, 7]] + 0.8 * V[[3, 8]], V[20:30]])
    sae = planted(W / W.norm(dim=1, keepdim=True), list(range(len(W))), torch.zeros(0, 48), k=5)
    res = evaluate(sae, acts, [8, 17], max_tokens=700, rsa_tokens=50, progress=False, n_boot=10)
    x = torch.cat(list(acts.iter_rows(700, 700)))
    for row in res["truth"]["table"]:
        p, r, f, a = brute_force_firing(sae, V, x, truth.feature_indices[:700], truth.feature_values[:700],
                                        truth.parent.numpy(), row["G"], "prefix")  # fmt: skip
        assert row["f1_prefix"] == pytest.approx(f, abs=1e-12) and row["recall_prefix"] == pytest.approx(r, abs=1e-12)
