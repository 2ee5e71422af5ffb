"""Extraction: residual-stream activations of a language model over a text corpus, to an activation directory.

corpus -> documents -> packed contexts [n, ctx_len] (BOS first) -> seeded train/test split -> batches of
contexts -> the model run up to layer L (stopped there) -> rows (BOS positions dropped by default) ->
shards with activations, token_ids, context_ids, positions; contexts.safetensors keeps every context.
A killed extraction (any rank of it under torchrun) resumes from the shards in `OUT.partial/`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import dist
from ..config import REQUIRED, opt
from ..errors import ProgsaeError
from ..files import fresh_dir, load_json, save_json, save_tensors
from .activations import DTYPES, SHARD_TOKENS, finish, shard_name
from .hook import HookConfig
from .lm import check_layer, hook_name, load_lm, residual_stream


@dataclass
class ExtractConfig(HookConfig):
    tokens: int = opt(1_000_000, "activations to write, BOS positions excluded", min=1)
    split: str = opt("train", "which side of the seeded context split: train or test (held out)", choices=("train", "test"))
    seed: int = opt(0, "seeds the split and the context order")
    batch_size: int = opt(32, "contexts per forward pass", min=1)
    device: str = opt("cpu", "where the model runs: cpu or cuda")
    shard_tokens: int = opt(0, "rows per shard (0: about 150 MB shards whatever d is)", min=0)
    dtype: str = opt("float32", "activations on disk: float32, or bfloat16 (half the disk; read back as float32)", choices=DTYPES)  # fmt: skip

    def validate(self) -> ExtractConfig:
        return super().validate("extract")


@dataclass
class ExtractArgs:
    """`progsae extract`'s arguments besides ExtractConfig's (see cli.py)."""

    out: str = opt(REQUIRED, "activation directory to create (a killed run resumes)")
    force: bool = opt(False, "re-extract even if --out is complete")


def select_contexts(cfg: ExtractConfig, tokenizer) -> tuple[torch.Tensor, list[int]]:
    """(contexts [n, ctx_len], their indices in the packed corpus): enough contexts of the split for cfg.tokens."""
    packed, order = cfg.packed_split(tokenizer, cfg.split, cfg.seed)
    need = -(-cfg.tokens // cfg.per_context)
    if need > len(order):
        raise ProgsaeError(
            f"asked for {cfg.tokens} tokens but the {cfg.split} split of corpus {cfg.corpus!r} holds "
            f"{len(order) * cfg.per_context}; lower --tokens or use a larger --corpus"
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
    """Write the activation directory `out`; pass `model`/`tokenizer` to use an already loaded model.

    Shard c holds the contexts of batches c·b .. (c+1)·b - 1 (b batches fill `shard_tokens` rows), so
    shards are fixed by the config alone: under torchrun rank r writes shards r, r + world, ..., a shard
    on disk is done (a rerun after a kill of any rank writes only the missing ones), and any number of
    ranks writes the same bytes as one process. Rank 0 writes contexts and the manifest at the end."""
    cfg.validate()
    device = dist.init(cfg.device)
    if model is None:
        model, tokenizer, model_name = load_lm(cfg.model, device)
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
    start, T = cfg.first_position, cfg.per_context
    per_batch = cfg.batch_size * T  # rows of a full batch; only the last may be shorter
    per_shard = -(-(cfg.shard_tokens or max(1024, SHARD_TOKENS * 576 // d)) // per_batch)  # ~150 MB shards
    n_shards = -(-len(chosen) // (cfg.batch_size * per_shard))
    sizes = [min(per_shard * per_batch, cfg.tokens - c * per_shard * per_batch) for c in range(n_shards)]
    part, main = Path(out).with_name(Path(out).name + ".partial"), dist.is_main()
    if main:
        _prepare(part, {"source": source, "d_in": d})
    dist.barrier()
    done = {c for c in range(n_shards) if (part / shard_name(c)).is_file()}
    if done and progress and main:
        n = sum(sizes[c] for c in done)
        print(f"resuming extraction at {n} of {cfg.tokens} tokens ({len(done)} of {n_shards} shards done)", flush=True)
    mine = [c for c in range(dist.rank(), n_shards, dist.world()) if c not in done]
    bar = tqdm(
        total=sum(sizes[c] for c in mine),
        unit="tok",
        unit_scale=True,
        desc=f"extract {hook_name(cfg.layer)}" + (f" (rank 0 of {dist.world()})" if dist.world() > 1 else ""),
        disable=not (progress and main),
        dynamic_ncols=True,
    )
    t0, dtype = time.perf_counter(), getattr(torch, cfg.dtype)
    for c in mine:
        parts, got = [], 0
        for s in range(c * per_shard * cfg.batch_size, min((c + 1) * per_shard * cfg.batch_size, len(chosen)), cfg.batch_size):
            ids = contexts[s : s + cfg.batch_size]
            rows = cfg.rows(residual_stream(model, ids.to(model.device), cfg.layer)).cpu()  # [b * T, d]
            b = len(ids)
            parts.append({
                "activations": rows.to(dtype),
                "token_ids": ids[:, start:].reshape(-1),
                "context_ids": torch.arange(s, s + b).repeat_interleave(T),
                "positions": torch.arange(start, start + T).repeat(b),
            })  # fmt: skip
            bar.update(min(b * T, sizes[c] - got))
            got += b * T
        shard = {k: torch.cat([p[k] for p in parts])[: sizes[c]] for k in parts[0]}  # the last may end mid-context
        save_tensors(part / shard_name(c), shard, durable=True)
    bar.close()
    dist.barrier()  # every rank's shards are on disk
    if main:
        save_tensors(part / "contexts.safetensors", {"contexts": contexts, "corpus_index": torch.tensor(chosen)})
        shards = [{"file": shard_name(c), "n_tokens": n} for c, n in enumerate(sizes)]
        finish(part, out, d, source, shards, cfg.dtype)
    dist.barrier()
    if progress and main:
        dt = time.perf_counter() - t0
        print(
            f"extracted {cfg.tokens} activations of {source['model_name']} at {hook_name(cfg.layer)} to {out}"
            + (f" ({cfg.tokens / dt:,.0f} tokens/s)" if not done and dt > 0 else "")
        )
    return Path(out)


def _prepare(part: Path, progress: dict) -> None:
    """Keep `part` (an interrupted extraction of the same source: its shards are done) or start it afresh."""
    if (part / "progress.json").is_file() and load_json(part / "progress.json") == progress:
        for f in part.glob("*.tmp"):  # a write cut short by a kill
            f.unlink()
        return
    fresh_dir(part)
    save_json(part / "progress.json", progress)
