"""progsae's known-answer metrics checked against SAELens' synthetic benchmark (opt-in: skips without SAELens).

SAELens' own `SyntheticModel` (a seeded forest of features, mutually exclusive siblings in some groups)
generates held-out rows; `saelens_to_progsae` (the README's recipe) turns them into an activation directory
with `truth.safetensors`. An SAE whose decoder is a noisy permutation of the true features plus random
latents is then scored by `TruthEval` at G = N and by SAELens' `mean_correlation_coefficient`,
`feature_uniqueness` and `ClassificationMetricsCalculator` on the same rows and the same latent activations.
To run it, in the venv of tests/test_foreign_libs.py:

    PYTHONPATH=src /tmp/venv-saelens/bin/python -m pytest -q -s tests/test_synthbench.py
"""

from __future__ import annotations

import pytest
import torch

synthetic = pytest.importorskip("sae_lens.synthetic")

from progsae.analysis.recovery import TruthEval  # noqa: E402
from progsae.data import ActivationDir, write_activations  # noqa: E402
from progsae.data.truth import Truth, load_truth, save_truth  # noqa: E402
from progsae.sae import SAE, SAEConfig  # noqa: E402

F, D, N, K, ROWS = 64, 32, 80, 6, 20_000  # true features, d_in, latents, k, held-out rows


# --- the README recipe (copied verbatim into the README) ---
def saelens_parent(model) -> torch.Tensor:
    """SAELens' hierarchy as progsae's parent array (-1: root). SAELens gates a feature by its nearest
    ancestor that has a feature_index (nodes without one only group their children)."""
    parent = torch.full((model.cfg.num_features,), -1, dtype=torch.int64)

    def walk(node, up):
        if node.feature_index is not None:
            parent[node.feature_index], up = up, node.feature_index
        for child in node.children:
            walk(child, up)

    for root in model.hierarchy.roots if model.hierarchy is not None else []:
        walk(root, -1)
    return parent


def saelens_to_progsae(model, x: torch.Tensor, acts: torch.Tensor, out) -> None:
    """Rows `x, acts = model.sample_with_features(n)` as an activation directory with their true codes."""
    w = max(1, int((acts > 0).sum(1).max()))
    v, i = acts.topk(w, dim=1)
    i, order = torch.where(v > 0, i, acts.shape[1]).sort(dim=1)  # active features ascending, padding last
    v = v.gather(1, order)
    write_activations(out, [x], x.shape[1], {"saelens_synthetic_model": model.cfg.to_dict()})
    vectors = model.feature_dict.feature_vectors.detach().float()
    save_truth(out, Truth(vectors, saelens_parent(model), i * (v > 0), v))


# --- end of the recipe ---


def model_with(hierarchy=None):
    cfg = synthetic.SyntheticModelConfig(
        num_features=F,
        hidden_dim=D,
        hierarchy=synthetic.HierarchyConfig(
            total_root_nodes=4,
            branching_factor=3,
            max_depth=2,
            mutually_exclusive_portion=0.5,
            compensate_probabilities=True,
        ),
        std_firing_magnitudes=0.3,
        seed=0,
    )
    return synthetic.SyntheticModel(cfg, hierarchy=hierarchy)


def noisy_sae(model, seed: int) -> SAE:
    """TopK SAE, tied encoder, b_dec = the model's bias: latent l < F is true feature perm[l] plus noise, the
    rest random directions, so the matching, the argmaxes and the firing counts are all non-trivial."""
    g = torch.Generator().manual_seed(seed)
    true = model.feature_dict.feature_vectors.detach().float()
    true = true / true.norm(dim=1, keepdim=True)
    W = torch.randn(N, D, generator=g) / D**0.5
    W[:F] = true[torch.randperm(F, generator=g)] + 0.5 * W[:F]
    sae = SAE(SAEConfig(D, N, K))
    with torch.no_grad():
        sae.W_dec.copy_(W / W.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.t())
        sae.b_dec.copy_(model.feature_dict.bias.detach())
    return sae


def test_truth_metrics_equal_saelens_synthetic_benchmark(tmp_path):
    model = model_with()
    torch.manual_seed(0)  # SAELens samples with the global generator
    x, acts = model.sample_with_features(ROWS)
    saelens_to_progsae(model, x, acts, tmp_path / "acts")

    acts_dir = ActivationDir(tmp_path / "acts")
    truth = load_truth(acts_dir)  # checked against the directory
    assert torch.equal(torch.cat(list(acts_dir.iter_rows(4096))), x)
    T = torch.zeros(ROWS, F + 1).scatter_(1, torch.where(truth.feature_values > 0, truth.feature_indices, F),
                                          truth.feature_values)[:, :F]  # fmt: skip
    assert torch.equal(T, acts)  # the true codes round-trip exactly

    # SAELens' hierarchy semantics: a child is zeroed wherever its (nearest featured) ancestor is zero
    parent = truth.parent
    child = (parent >= 0).nonzero().flatten()
    fires = acts > 0
    assert not (fires[:, child] & ~fires[:, parent[child]]).any()
    assert fires[:, child].sum() > 1000  # the check is not vacuous
    depth_counts = torch.bincount(truth.depth()).tolist()
    assert depth_counts == [16, 12, 36]  # 4 roots, 12 children, 36 grandchildren; 52..63 outside every tree

    sae = noisy_sae(model, seed=1)
    ev = TruthEval(sae, truth, [N])
    for batch in acts_dir.iter_rows(4096):
        ev.update(batch)
    row = ev.result()["table"][0]

    with torch.no_grad():
        code = sae.encode(x)
    latents = torch.zeros(ROWS, N).scatter_(1, code.indices, code.values)
    W_dec, vectors = sae.W_dec.detach(), model.feature_dict.feature_vectors.detach()
    mcc = synthetic.mean_correlation_coefficient(W_dec, vectors)
    uniq = synthetic.feature_uniqueness(W_dec, vectors)
    calc = synthetic.ClassificationMetricsCalculator(W_dec, vectors)
    for lat, gt in zip(latents.split(4096), acts.split(4096), strict=True):
        calc.add_batch(lat, gt)
    cls = calc.compute()

    print(f"\nsaelens synthetic: F={F} d={D} rows={ROWS} true L0={fires.sum(1).float().mean():.3f} "
          f"child firings={int(fires[:, child].sum())}; SAE N={N} k={K}")  # fmt: skip
    for name, ours, theirs in [("mcc", row["mcc"], mcc), ("uniqueness", row["uniqueness"], uniq),
                               ("precision", row["precision_prefix"], cls.precision),
                               ("recall", row["recall_prefix"], cls.recall), ("f1", row["f1_prefix"], cls.f1_score)]:  # fmt: skip
        print(f"{name:>10}: progsae {ours:.9f}  saelens {theirs:.9f}  diff {abs(ours - theirs):.1e}")
    print(f"  recovered {row['recovered']:.4f} recovered_parents {row['recovered_parents']:.4f} "
          f"absorption {row['absorption_prefix']}")  # fmt: skip
    assert 0.3 < mcc < 0.95 and 0.3 < cls.precision < 0.95 and 0.3 < cls.recall < 0.95  # non-trivial numbers
    assert row["mcc"] == pytest.approx(mcc, abs=1e-6)
    assert row["uniqueness"] == pytest.approx(uniq, abs=1e-9)
    assert row["precision_prefix"] == pytest.approx(cls.precision, abs=1e-6)
    assert row["recall_prefix"] == pytest.approx(cls.recall, abs=1e-6)
    assert row["f1_prefix"] == pytest.approx(cls.f1_score, abs=1e-6)


def test_parent_skips_nodes_without_a_feature(tmp_path):
    """A node with no feature_index only groups its children: SAELens gates them by the featured ancestor."""
    tree = {"roots": [{"feature_index": 0, "children": [
        {"feature_index": None, "mutually_exclusive_children": True,
         "children": [{"feature_index": 1, "children": [{"feature_index": 3}]}, {"feature_index": 2}]}]}]}  # fmt: skip
    model = model_with(synthetic.Hierarchy.from_dict(tree))
    torch.manual_seed(0)
    x, acts = model.sample_with_features(4096)
    saelens_to_progsae(model, x, acts, tmp_path / "acts")
    parent = load_truth(ActivationDir(tmp_path / "acts")).parent
    assert parent[:5].tolist() == [-1, 0, 0, 1, -1]
    fires = acts > 0
    for c, p in [(1, 0), (2, 0), (3, 1)]:
        assert fires[:, c].any() and not (fires[:, c] & ~fires[:, p]).any()
    assert (fires[:, 0] & ~fires[:, 1]).any()  # the gate is one way: a parent fires without its child
