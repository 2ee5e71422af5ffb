import numpy as np
import pytest
import torch

from progsae.kernels import decode_nested, topk_encode
from progsae.losses import sae_loss
from progsae.products import KERNELS
from reference import dense_code, dense_loss, make_sae


def fast_and_dense_grads(sae, x, bounds, weights, dead=None, k_aux=0, kernel="csr"):
    sae.zero_grad()
    loss, *_ = sae_loss(sae, x, bounds=bounds, weights=weights, dead=dead, k_aux=k_aux, kernel=kernel)
    loss.backward()
    fast = {n: p.grad.clone() for n, p in sae.named_parameters()}
    ref = {n: p.detach().clone().requires_grad_() for n, p in sae.named_parameters()}
    dense = dense_loss(x, ref["W_enc"], ref["b_enc"], ref["W_dec"], ref["b_dec"], sae.k, bounds, weights, dead, k_aux)
    dense.backward()
    return loss.detach(), dense.detach(), fast, {n: t.grad for n, t in ref.items()}


@pytest.mark.parametrize(
    "bounds,weights",
    [([96], [1.0]), ([8, 40, 96], [0.2, 0.3, 0.5]), ([1, 2, 95, 96], [0.25] * 4)],
    ids=["topk", "matryoshka", "matryoshka-edges"],
)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_loss_and_grads_match_dense_reference(bounds, weights, kernel, dtype):
    sae = make_sae().to(dtype)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    fast_loss, dense, fast, ref = fast_and_dense_grads(sae, x, bounds, torch.tensor(weights, dtype=dtype),
                                                       kernel=kernel)  # fmt: skip
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-13}
    torch.testing.assert_close(fast_loss, dense, **tol)
    for name in fast:
        torch.testing.assert_close(fast[name], ref[name], **{k: 10 * v for k, v in tol.items()}, msg=name)


def test_matryoshka_loss_equals_naive_sum_of_per_granularity_fvus():
    sae = make_sae()
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(2))
    bounds, w = [10, 30, 96], torch.tensor([0.5, 0.25, 0.25])
    loss, *_ = sae_loss(sae, x, bounds=bounds, weights=w)
    with torch.no_grad():
        z = dense_code(x, sae.W_enc, sae.b_enc, sae.b_dec, sae.k)
        var = ((x - x.mean(0)) ** 2).sum()
        naive = sum(
            c * ((x - z[:, :m] @ sae.W_dec[:m] - sae.b_dec) ** 2).sum() / var for m, c in zip(bounds, w, strict=True)
        )
    torch.testing.assert_close(loss.detach(), naive, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n_dead", [24, 3, 0], ids=["many", "fewer-than-k_aux", "none"])
def test_auxk_matches_reference_and_touches_only_dead_latents(kernel, n_dead):
    """AuxK at its full width whatever the number of dead latents (no host read): the reference takes
    min(k_aux, dead) picks; with none dead it has no aux term at all."""
    sae = make_sae()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))
    dead = torch.zeros(96, dtype=torch.bool)
    dead[torch.randperm(96, generator=torch.Generator().manual_seed(n_dead))[:n_dead]] = True
    _, _, with_aux, _ = fast_and_dense_grads(sae, x, [96], torch.ones(1), dead, k_aux=6, kernel=kernel)
    _, _, _, ref = fast_and_dense_grads(sae, x, [96], torch.ones(1), dead, k_aux=min(6, n_dead), kernel=kernel)
    for name in with_aux:
        torch.testing.assert_close(with_aux[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
    _, _, without, _ = fast_and_dense_grads(sae, x, [96], torch.ones(1), kernel=kernel)
    if n_dead == 0:
        for name in with_aux:
            torch.testing.assert_close(with_aux[name], without[name], rtol=0, atol=0, msg=name)
        return
    # the aux term's own gradient: zero on every live latent, non-zero on some dead ones
    diff_dec = (with_aux["W_dec"] - without["W_dec"]).abs().sum(1)
    diff_enc = (with_aux["W_enc"] - without["W_enc"]).abs().sum(0)
    assert diff_dec[~dead].max() < 1e-7 and diff_enc[~dead].max() < 1e-7
    assert diff_dec[dead].max() > 1e-5 and diff_enc[dead].max() > 1e-5


def test_aux_code_excludes_live_latents_and_the_main_code():
    sae = make_sae()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(32, 16, generator=g)
    dead = torch.rand(96, generator=g) < 0.5
    code = topk_encode(x, sae.W_enc, sae.b_enc, sae.b_dec, sae.k, dead, 8)
    assert dead[code.aux_indices].all()
    assert not (code.aux_indices.unsqueeze(2) == code.indices.unsqueeze(1)).any()


def test_encode_returns_sorted_indices_and_dense_topk_values():
    sae = make_sae()
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(5))
    v, i, _, _ = topk_encode(x, sae.W_enc, sae.b_enc, sae.b_dec, sae.k)
    assert (i[:, 1:] > i[:, :-1]).all()
    z = torch.zeros(40, 96).scatter(1, i, v)
    torch.testing.assert_close(z, dense_code(x, sae.W_enc, sae.b_enc, sae.b_dec, sae.k))


@pytest.mark.parametrize("kernel", KERNELS)
def test_nested_decode_bands_are_prefix_sums(kernel):
    sae = make_sae()
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(6))
    v, i, _, _ = topk_encode(x, sae.W_enc, sae.b_enc, sae.b_dec, sae.k)
    bounds = [3, 50, 96]
    out = decode_nested(v, i, sae.W_dec, bounds, kernel)
    z = torch.zeros(20, 96).scatter(1, i, v)
    for j, m in enumerate(bounds):
        torch.testing.assert_close(out[:, j], z[:, :m] @ sae.W_dec[:m], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
def test_nested_decode_gradients_match_dense_autograd(kernel):
    sae = make_sae()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(20, 16, generator=g)
    v, i, _, _ = topk_encode(x, sae.W_enc, sae.b_enc, sae.b_dec, sae.k)
    v = v.detach().requires_grad_()
    W = sae.W_dec.detach().clone().requires_grad_()
    bounds = [10, 60, 96]
    weight = torch.randn(20, 3, 16, generator=g)
    (decode_nested(v, i, W, bounds, kernel) * weight).sum().backward()
    v2, W2 = v.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    z = torch.zeros(20, 96).scatter(1, i, v2)
    dense = torch.stack([z[:, :m] @ W2[:m] for m in bounds], 1)
    (dense * weight).sum().backward()
    torch.testing.assert_close(v.grad, v2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(W.grad, W2.grad, rtol=1e-5, atol=1e-6)


def planted_sae():
    """make_sae's SAE whose main code is latents 3, 20, 50, 70, 90 (biases far above) and whose dead latents
    (every third) rank by bias 1 apart, so that bfloat16 rounding of the pre-activations cannot change a
    selection: the fp32 reference selects the same latents."""
    sae = make_sae()
    dead = torch.zeros(96, dtype=torch.bool)
    dead[::3] = True
    with torch.no_grad():
        sae.W_enc.mul_(0.1)
        sae.b_enc.fill_(-50.0)
        sae.b_enc[dead] = torch.arange(int(dead.sum()), dtype=torch.float32)
        sae.b_enc[[3, 20, 50, 70, 90]] = 100.0
    dead[[3, 90]] = False  # not dead: in the main code
    return sae, dead


@pytest.mark.parametrize("bounds,weights", [([96], [1.0]), ([8, 40, 96], [0.2, 0.3, 0.5])], ids=["topk", "matryoshka"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_bf16_selection_path_matches_the_dense_fp32_reference_in_loss_and_grads(bounds, weights, kernel):
    sae, dead = planted_sae()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    w = torch.tensor(weights)
    for aux in (0, 8):  # with and without the AuxK code
        assert all(torch.equal(a, b) for a, b in zip(  # the same selection in both precisions
            topk_encode(x, sae.W_enc, sae.b_enc, sae.b_dec, 5, dead, aux, bf16=True)[1::2],  # indices, aux_indices
            topk_encode(x, sae.W_enc, sae.b_enc, sae.b_dec, 5, dead, aux)[1::2], strict=True))  # fmt: skip
        sae.zero_grad()
        loss, *_ = sae_loss(sae, x, bounds=bounds, weights=w, dead=dead, k_aux=aux, bf16=True, kernel=kernel)
        loss.backward()
        fast = {n: p.grad.clone() for n, p in sae.named_parameters()}
        ref = {n: p.detach().clone().requires_grad_() for n, p in sae.named_parameters()}
        dense = dense_loss(x, ref["W_enc"], ref["b_enc"], ref["W_dec"], ref["b_dec"], sae.k, bounds, w, dead, aux)
        dense.backward()
        torch.testing.assert_close(loss.detach(), dense.detach(), rtol=1e-5, atol=1e-6)
        for name in fast:
            torch.testing.assert_close(fast[name], ref[name].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kernel", KERNELS)
def test_bf16_auxk_picks_past_the_dead_latents_stay_zero(kernel):
    """Dead latents 3 and 90 sit in every token's main code, so with k_aux = the number of dead latents each
    token's AuxK width holds two picks past the eligible ones (pre-activation -inf once masked): in bf16 they
    must not be recomputed to their real fp32 pre-activations. Against the fp32 selection's code."""
    sae, dead = planted_sae()
    dead[[3, 90]] = True
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    n = int(dead.sum())
    bf = topk_encode(x, sae.W_enc, sae.b_enc, sae.b_dec, 5, dead, n, bf16=True, kernel=kernel)
    fp = topk_encode(x, sae.W_enc, sae.b_enc, sae.b_dec, 5, dead, n, kernel=kernel)
    eligible = dead.clone()
    eligible[[3, 20, 50, 70, 90]] = False  # the main code
    past = ~eligible[bf.aux_indices]
    assert past.sum(1).eq(2).all()  # two picks per token past the eligible dead latents
    assert (bf.aux_values[past] == 0).all() and (bf.aux_values[~past] > 0).any()
    live_fp = torch.zeros(64, 96).scatter(1, fp.aux_indices, fp.aux_values)
    live_bf = torch.zeros(64, 96).scatter(1, bf.aux_indices, bf.aux_values)
    torch.testing.assert_close(live_bf, live_fp, rtol=1e-5, atol=1e-6)


def test_bf16_selection_keeps_fp32_values_of_the_latents_it_selects():
    g = torch.Generator().manual_seed(3)
    x, W, b, b_dec = torch.randn(200, 32, generator=g), torch.randn(512, 32, generator=g).t(), torch.randn(512, generator=g), torch.randn(32, generator=g)
    v, i, _, _ = topk_encode(x, W, b, b_dec, 16, bf16=True)
    pre = (x.double() - b_dec.double()) @ W.double() + b.double()  # independent, in float64
    torch.testing.assert_close(v.double(), pre.gather(1, i).relu(), rtol=0, atol=1e-5)
    assert (i.diff(dim=1) > 0).all()  # ascending, as every code
    v32, i32, _, _ = topk_encode(x, W, b, b_dec, 16)
    assert (i == i32).float().mean() > 0.97  # the selection differs only at near-ties of bf16 rounding


@pytest.mark.parametrize("N,k", [(16384, 32), (16384, 256), (4096, 64), (1000, 8), (1003, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_stage_topk_picks_the_k_largest_of_every_row(N, k, dtype):
    """Against a full descending sort of each row: the same k values (any order), and every index pointing
    at its value. Rows with many ties (small integers) and with most entries -inf (AuxK's dead mask)."""
    from progsae.kernels import _topk

    g = torch.Generator().manual_seed(N + k)
    rows = [torch.randn(64, N, generator=g), torch.randint(0, 5, (64, N), generator=g).float()]
    masked = torch.randn(64, N, generator=g)
    masked[torch.rand(64, N, generator=g) < 0.97] = float("-inf")
    for pre in [*rows, masked]:
        pre = pre.to(dtype)
        values, indices = torch.empty(64, k, dtype=dtype), torch.empty(64, k, dtype=torch.long)
        _topk(pre, k, values, indices)
        want = pre.sort(dim=1, descending=True).values[:, :k]
        assert torch.equal(values.sort(dim=1, descending=True).values, want)
        assert torch.equal(pre.gather(1, indices), values)
        assert all(len(set(r)) == k for r in indices.tolist())  # k distinct latents


def test_an_sae_set_to_bf16_encodes_evaluates_and_counts_as_the_fp32_one_where_no_selection_is_close():
    """sae.precision = "bf16" (what evaluation, statistics and records use for an SAE trained in bf16): on the
    planted SAE, whose selections bf16 rounding cannot move, the curve, rescaled codes and statistics equal
    the fp32 ones; a JumpReLU SAE refuses bf16 in one line."""
    from progsae import SAE, ProgsaeError, SAEConfig
    from progsae.analysis import ProgressiveEval, latent_stats

    sae, _ = planted_sae()
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(4))
    out = {}
    for precision in ("fp32", "bf16"):
        sae.precision = precision
        acc = ProgressiveEval(sae, rescaled_G=[48])
        acc.update(x)
        r = acc.result()
        out[precision] = (r.fvu, r.rescaled_fvu[48], latent_stats(sae, [x])["e_z2"], sae.encode(x, 48, "rescaled"))
    a, b = out["fp32"], out["bf16"]
    assert torch.equal(a[3][1], b[3][1])  # the same rescaled selection
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-7)
    assert a[1] == pytest.approx(b[1], rel=1e-5)
    torch.testing.assert_close(a[2], b[2], rtol=1e-5, atol=1e-7)
    rand = SAE(SAEConfig(32, 512, 16)).init_tied(torch.Generator().manual_seed(5))  # near-ties: bf16 moves some
    y = torch.randn(200, 32, generator=torch.Generator().manual_seed(6))
    rand.precision = "bf16"
    _, i = rand.encode(y)
    assert torch.equal(i, topk_encode(y, rand.W_enc, rand.b_enc, rand.b_dec, 16, bf16=True).indices)
    assert not torch.equal(i, topk_encode(y, rand.W_enc, rand.b_enc, rand.b_dec, 16).indices)
    jr = SAE(SAEConfig(16, 96, None, architecture="jumprelu"))
    jr.precision = "bf16"
    with pytest.raises(ProgsaeError, match="precision bf16 selects a TopK SAE's latents.*use precision fp32"):
        jr.encode(x)
