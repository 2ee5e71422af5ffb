"""Training straight from the model: the stream's rows are the model's, it resumes mid-corpus without
rerunning the model on what it skips, and several SAEs share one pass of the model."""

import json
from itertools import islice

import pytest
import torch

from progsae.data.lm import load_lm
from progsae.data.stream import LMSource, StreamConfig
from progsae.train import TrainConfig, Trainer, train_together

B = 100


@pytest.fixture(scope="module")
def lm(tiny_lm_dir, text_corpus):
    return str(tiny_lm_dir), str(text_corpus(12))


def source(lm, **kw):
    path, corpus = lm
    model, tok, name = load_lm(path)
    cfg = StreamConfig(model=path, layer=1, corpus=corpus, ctx_len=16, buffer_tokens=450, forward_batch=7, **kw)
    return LMSource(cfg, "cpu", model, tok, name)


def test_a_buffer_holds_the_models_own_activations_of_its_contexts(lm):
    src = source(lm)
    assert src.per_buffer == 30 and src.buffers_per_epoch() >= 2  # 450 tokens: 30 contexts of 15
    rows = torch.cat(list(islice(src.batches(B, seed=3), 4)))  # 4 batches of 100 from the 450 rows
    order = torch.randperm(len(src.contexts), generator=torch.Generator().manual_seed(3 * 1_000_003))
    ids = src.contexts[order[:30]]
    hs = src.model(input_ids=ids, output_hidden_states=True).hidden_states[2][:, 1:].reshape(-1, src.d_in)
    close = torch.cdist(rows, hs.detach(), compute_mode="donot_use_mm_for_euclid_dist") < 1e-4
    used = set()  # every streamed row is one of those contexts' rows, none used twice (the text repeats)
    for i in range(len(rows)):
        j = next((j for j in close[i].nonzero().flatten().tolist() if j not in used), None)
        assert j is not None, f"row {i} is none of the buffer's contexts' rows"
        used.add(j)


def test_the_stream_resumes_at_any_batch_without_running_the_model_on_what_it_skips(lm):
    src = source(lm)
    straight = list(islice(src.batches(B, seed=0), 14))  # 4 batches a buffer: crosses 3 buffers and an epoch
    calls = []
    run = src._activations
    src._activations = lambda which: calls.append(len(which)) or run(which)
    for start in (0, 3, 4, 9):
        for a, b in zip(islice(src.batches(B, seed=0, start=start), 14 - start), straight[start:], strict=False):
            assert torch.equal(a, b)
    assert calls == [30] * (4 + 4 + 3 + 2)  # the buffers each start reads from (batch 0-3, 4-7, ...), no others
    n = src.buffers_per_epoch()
    assert src.position(B, 9) == {"epoch": 2 // n, "buffer": 2 % n, "contexts_visited": 60}  # batch 9: buffer 2


def test_training_from_the_model_resumes_from_a_checkpoint_with_its_corpus_position(lm, tmp_path):
    cfg = TrainConfig(d_sae=64, k=4, tokens=20 * B, batch_size=B, checkpoint_every=5, dead_tokens=400)
    straight = Trainer(cfg, source(lm)).run(progress=False)

    cut = Trainer(cfg, source(lm), tmp_path / "s")
    batches = cut.source.batches(B, cfg.seed)
    for _ in range(9):
        cut.train_step(next(batches))
    cut.save_checkpoint()
    state = json.loads((tmp_path / "s" / "checkpoints" / "step-00000009" / "state.json").read_text())
    assert state["source_position"] == cut.source.position(B, 9) and state["source_position"]["contexts_visited"] == 60
    assert state["source"]["kind"] == "lm" and state["source"]["hook_name"] == "blocks.1.hook_resid_post"

    resumed = Trainer(cfg, source(lm), tmp_path / "s")
    assert resumed.step == 9  # resumed, not started over
    final = resumed.run(progress=False)
    for name, p in straight.named_parameters():
        assert torch.equal(dict(final.named_parameters())[name], p), name
    with pytest.raises(Exception, match="trained on other data"):
        Trainer(cfg, source(lm, split_seed=1), tmp_path / "s")


def test_several_saes_train_from_one_pass_of_the_model_as_each_would_alone(lm, tmp_path):
    cfgs = [
        TrainConfig(d_sae=64, k=4, tokens=12 * B, batch_size=B, dead_tokens=400),
        TrainConfig(d_sae=64, k=4, tokens=12 * B, batch_size=B, dead_tokens=400, matryoshka=[16, 64]),
        TrainConfig(d_sae=32, k=2, tokens=8 * B, batch_size=B, dead_tokens=400, matryoshka_sampled=3),
    ]
    alone = [Trainer(c, source(lm)).run(progress=False) for c in cfgs]
    src = source(lm)
    calls = []
    run = src._activations
    src._activations = lambda which: calls.append(len(which)) or run(which)
    together = train_together([Trainer(c, src, tmp_path / f"s{i}") for i, c in enumerate(cfgs)], progress=False)
    assert len(calls) == 3  # 12 batches at 4 a buffer; the initialisations read the first buffer without a rerun
    for a, b in zip(alone, together, strict=True):
        for name, p in a.named_parameters():
            assert torch.equal(dict(b.named_parameters())[name], p), name
    assert [json.loads((tmp_path / f"s{i}" / "cfg.json").read_text())["d_sae"] for i in range(3)] == [64, 64, 32]


def test_progsae_train_from_the_model_on_the_command_line(lm, tmp_path, capsys):
    from progsae.cli import main

    path, corpus = lm
    args = ["train", "--model", path, "--layer", "1", "--corpus", corpus, "--ctx-len", "16", "--buffer-tokens", "450",
            "--d-sae", "64", "--k", "4", "--tokens", str(6 * B), "--batch-size", str(B), "--out", str(tmp_path / "s")]  # fmt: skip
    assert main(args) == 0
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post" and cfg["d_in"] == 32
    capsys.readouterr()
    assert main(["train", str(tmp_path / "acts"), *args[1:]]) == 2
    assert "give ACTS or --model" in capsys.readouterr().err
    assert main([*args[:-1], str(tmp_path / "t"), "--layer", "9"]) == 2
    assert "layer 9 does not exist" in capsys.readouterr().err


def test_the_stream_reads_the_train_contexts_extraction_reads_in_the_same_order(lm):
    """One place packs and splits the corpus (HookConfig.packed_split) for extraction and the stream."""
    from progsae.data.extract import ExtractConfig, select_contexts

    path, corpus = lm
    model, tok, _ = load_lm(path)
    for seed in (0, 5):
        src = source(lm, split_seed=seed)
        ex = ExtractConfig(model=path, layer=1, corpus=corpus, ctx_len=16, tokens=15 * 20, seed=seed)
        contexts, chosen = select_contexts(ex, tok)
        assert torch.equal(contexts, src.contexts[:20]) and chosen == src.corpus_index[:20].tolist()
        test = ExtractConfig(model=path, layer=1, corpus=corpus, ctx_len=16, tokens=15, seed=seed, split="test")
        assert not set(select_contexts(test, tok)[1]) & set(src.corpus_index.tolist())  # never trained on


def test_rows_are_the_hook_outputs_from_the_first_kept_position(lm):
    from progsae.data.hook import HookConfig

    path, _ = lm
    model, _, _ = load_lm(path)
    ids = torch.randint(3, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    h = model(input_ids=ids, output_hidden_states=True).hidden_states[2].detach()  # the output of layer 1
    rows = HookConfig(ctx_len=16).rows(h)
    assert rows.shape == (3 * 15, h.shape[-1]) and torch.equal(rows, h[:, 1:].reshape(-1, h.shape[-1]))
    assert torch.equal(HookConfig(ctx_len=16, keep_bos=True).rows(h), h.reshape(-1, h.shape[-1]))
    src = source(lm, keep_bos=True)  # the stream keeps BOS too when asked: 16 rows a context
    assert src.per_ctx == 16 and src._activations(torch.arange(2)).shape == (32, src.d_in)


@pytest.mark.parametrize(
    "kw, match",
    [({"test_frac": 1.0}, r"stream: test_frac must be in \(0, 1\)"), ({"ctx_len": 1}, "ctx_len must be at least 2"),
     ({"buffer_tokens": 0}, "stream: buffer_tokens must be a positive integer")],
)  # fmt: skip
def test_a_bad_stream_setting_is_refused_before_the_model_runs(lm, kw, match):
    from progsae import ProgsaeError

    path, corpus = lm
    cfg = StreamConfig(**{"model": path, "layer": 1, "corpus": corpus, "ctx_len": 16, "buffer_tokens": 450, **kw})
    with pytest.raises(ProgsaeError, match=match):
        LMSource(cfg, "cpu", model="never loaded")
