"""Activations straight from the model, no disk: the training source protocol over the LM run on the fly.

The train split's contexts (the same seeded split as `progsae extract`) are visited epoch by epoch in
a seeded order, `buffer_tokens` of activations at a time: a buffer's contexts are run through the model
up to layer L, their rows shuffled together and cut into whole batches (the last partial batch
dropped). The stream depends only on (seed, batch index), so a resumed run skips to its buffer without
running the model on what it skips, and RAM is bounded by the buffer (buffer_tokens x d_in x 4 bytes).

Under torchrun each rank runs the model on its own share of every buffer's contexts and yields its
share of every global batch (`sharded`), so the model's cost is split over the ranks too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .. import dist
from ..config import opt
from ..errors import ProgsaeError
from .hook import HookConfig
from .lm import check_layer, hook_name, load_lm, residual_stream


@dataclass
class StreamConfig(HookConfig):
    split_seed: int = opt(0, "seeds the train/test split of the contexts, as extraction's seed")
    buffer_tokens: int = opt(262_144, "activations shuffled together when training from the model (RAM: x d_in x 4 bytes)", min=1)
    forward_batch: int = opt(32, "contexts per forward pass of the model", min=1)  # fmt: skip

    def validate(self) -> StreamConfig:
        return super().validate("stream")


class LMSource:
    def __init__(self, cfg: StreamConfig, device: str = "cpu", model=None, tokenizer=None, model_name=None):
        self.cfg = cfg.validate()
        if model is None:
            model, tokenizer, model_name = load_lm(cfg.model, device)
        check_layer(model, cfg.layer)
        self.model, self.model_name = model, model_name or cfg.model
        packed, order = cfg.packed_split(tokenizer, "train", cfg.split_seed)
        self.corpus_index = torch.tensor(order)
        self.contexts = packed[self.corpus_index]
        self.d_in = model.config.hidden_size
        self.per_ctx = cfg.per_context
        world = dist.world()
        per_buffer = -(-cfg.buffer_tokens // self.per_ctx)
        self.per_buffer = min(-(-per_buffer // world) * world, len(self.contexts) // world * world)
        if self.per_buffer < 1:
            raise ProgsaeError(f"corpus {cfg.corpus!r}: too few training contexts for {world} ranks; use a larger corpus")
        self.sharded = world > 1
        self._last = None

    def describe(self) -> dict:
        return {"kind": "lm", "model_name": self.model_name, "hook_name": hook_name(self.cfg.layer), **asdict(self.cfg)}

    def epoch_tokens(self) -> int:
        """Activations of one pass over the training split (whole buffers; the rest waits for the next epoch)."""
        return self.buffers_per_epoch() * self.per_buffer * self.per_ctx

    def buffers_per_epoch(self) -> int:
        return len(self.contexts) // self.per_buffer

    def position(self, batch_size: int, step: int) -> dict:
        """Where batch `step` comes from: epoch, buffer and the contexts visited before that buffer."""
        buffer = step // self._batches_per_buffer(batch_size)
        epoch, b = divmod(buffer, self.buffers_per_epoch())
        return {"epoch": epoch, "buffer": b, "contexts_visited": buffer * self.per_buffer}

    def _batches_per_buffer(self, batch_size: int) -> int:
        rows = self.per_buffer // dist.world() * self.per_ctx
        n = rows // (batch_size // dist.world())
        if n < 1:
            raise ProgsaeError(
                f"buffer_tokens {self.cfg.buffer_tokens} holds less than one batch of {batch_size}; raise buffer_tokens"
            )
        return n

    def batches(self, batch_size: int, seed: int, start: int = 0):
        """Endless batches ([batch_size / ranks, d_in] on each rank); batch `start` first, without running the
        model on the buffers before it."""
        per_rank = batch_size // dist.world()
        n_batches = self._batches_per_buffer(batch_size)
        buffer, skip = divmod(start, n_batches)
        while True:
            epoch, b = divmod(buffer, self.buffers_per_epoch())
            order = torch.randperm(len(self.contexts), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            mine = order[b * self.per_buffer : (b + 1) * self.per_buffer][dist.rank() :: dist.world()]
            rows = None  # drop the previous buffer before filling the next
            rows = self._buffer(seed, buffer, mine)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 10_007 + b + 1)
            perm = torch.randperm(rows.shape[0], generator=gen).to(rows.device)
            for i in range(skip, n_batches):
                yield rows[perm[i * per_rank : (i + 1) * per_rank]]
            buffer, skip = buffer + 1, 0

    def _buffer(self, seed: int, buffer: int, which: torch.Tensor) -> torch.Tensor:
        """The newest buffer is kept: SAEs trained together initialise from batch 0 without rerunning the model."""
        if self._last is None or self._last[0] != (seed, buffer):
            self._last = None
            self._last = ((seed, buffer), self._activations(which))
        return self._last[1]

    @torch.no_grad()
    def _activations(self, which: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(which) * self.per_ctx, self.d_in, device=self.model.device)
        for s in range(0, len(which), self.cfg.forward_batch):
            ids = self.contexts[which[s : s + self.cfg.forward_batch]]
            rows = self.cfg.rows(residual_stream(self.model, ids.to(self.model.device), self.cfg.layer))
            out[s * self.per_ctx : s * self.per_ctx + len(rows)] = rows
        bad = ~torch.isfinite(out).all(1)
        if bad.any():
            ctx = int(self.corpus_index[which[int(bad.nonzero()[0]) // self.per_ctx]])
            raise ProgsaeError(
                f"{self.model_name} gave NaN or Inf activations at layer {self.cfg.layer} on context {ctx} of the "
                "packed corpus; check the model's dtype and inputs"
            )
        return out
