"""A judge that runs offline: a local transformers chat model (the embedded `smollm2-135m` serves, as a weak
judge), answering from its next-token probabilities, so every answer is well formed:

- explain: greedy continuation of "It fires on", cut at the first line end;
- simulate: each token on its own line followed by a tab and the placeholder "unknown"; the prediction for a
  token is the expected digit (0-9) after its tab, all tokens of a context in one forward pass;
- detect: the belief that the latent fires is P(Yes) / (P(Yes) + P(No)) for the first answer token.

Answers are cached on disk by their full request, like the endpoint client's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import ProgsaeError
from ..files import save_json
from . import prompts
from .llm import _cache_path


def _shown(token: str) -> str:
    return token.replace("\n", "\\n").replace("\t", " ").strip() or "_"


class LocalJudge:
    def __init__(self, model: str = "smollm2-135m", cache_dir: str | Path = ".progsae-llm-cache",
                 batch_size: int = 8):  # fmt: skip
        from ..data.lm import load_lm

        self.lm, self.tok, model_name = load_lm(model)
        self.name = f"{model_name} (local, weak)" if model == "smollm2-135m" else f"{model_name} (local)"
        self.model, self.cache, self.batch_size, self.calls = model, Path(cache_dir), batch_size, 0
        self.digits = [self._ids(str(i)) for i in range(10)]
        self.yes_no = [self._ids("Yes"), self._ids("No")]
        if any(len(d) != 1 for d in self.digits + self.yes_no):
            raise ProgsaeError(f"local judge {model}: its tokenizer splits a digit or Yes/No; use another model")
        self.digits, self.yes_no = [d[0] for d in self.digits], [d[0] for d in self.yes_no]

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _prompt(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _cached(self, requests: list[dict], compute) -> list:
        """Each request's answer from the cache, the missing ones computed together by `compute`."""
        paths = [_cache_path(self.cache, {"local": self.model, **r}) for r in requests]
        missing = [i for i, p in enumerate(paths) if not p.is_file()]
        out = [json.loads(p.read_text())["answer"] if p.is_file() else None for p in paths]
        for s in range(0, len(missing), self.batch_size):
            todo = missing[s : s + self.batch_size]
            self.calls += len(todo)
            for i, answer in zip(todo, compute([requests[i] for i in todo]), strict=True):
                save_json(paths[i], {"request": requests[i], "answer": answer})
                out[i] = answer
        return out

    @torch.no_grad()
    def _logits(self, seqs: list[list[int]]) -> torch.Tensor:
        """Next-token logits at every position of right-padded sequences: [n, max_len, vocab]."""
        L = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (L - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs])
        return self.lm(input_ids=ids, attention_mask=mask).logits.float()

    def explain(self, examples) -> tuple[str | None, str | None]:
        def compute(reqs):
            answers = []
            for r in reqs:
                ids = torch.tensor([self._ids(self._prompt(r["messages"]) + prompts.LOCAL_EXPLAIN_PREFIX)])
                with torch.no_grad():
                    out = self.lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20,
                                           do_sample=False, pad_token_id=self.tok.eos_token_id)  # fmt: skip
                answers.append(self.tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
            return answers

        text = self._cached([{"method": "explain", "messages": prompts.local_explain(examples)}], compute)[0]
        text = re.sub(r"\[\d+\]", "", text.split("\n")[0]).strip().rstrip(".").strip()  # no copied [n] marks
        return (text, None) if text else (None, "empty explanation")

    def simulate(self, explanation: str, contexts: list[list[str]]) -> list[list[float] | None]:
        def compute(reqs):
            seqs, slots = [], []
            for r in reqs:
                seq, slot = self._ids(self._prompt(r["messages"])), []
                for t in r["tokens"]:
                    seq += self._ids(f"{_shown(t)}\t")
                    slot.append(len(seq) - 1)
                    seq += self._ids("unknown\n")
                seqs.append(seq)
                slots.append(slot)
            logits = self._logits(seqs)
            scale = torch.arange(10, dtype=torch.float32)
            return [(logits[i, s][:, self.digits].softmax(-1) @ scale).tolist() for i, s in enumerate(slots)]

        messages = prompts.local_simulate(explanation)
        return self._cached([{"method": "simulate", "messages": messages, "tokens": t} for t in contexts], compute)

    def detect(self, explanation: str, contexts: list[list[str]]) -> list[tuple[bool, float] | None]:
        def compute(reqs):
            seqs = [self._ids(self._prompt(r["messages"])) for r in reqs]
            logits = self._logits(seqs)
            last = torch.tensor([len(s) - 1 for s in seqs])
            return logits[torch.arange(len(seqs)), last][:, self.yes_no].softmax(-1)[:, 0].tolist()

        beliefs = self._cached([{"method": "detect", "messages": prompts.local_detect(explanation, t)} for t in contexts],
                               compute)  # fmt: skip
        return [(b > 0.5, b) for b in beliefs]
