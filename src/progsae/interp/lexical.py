"""A judge without a language model: token lookup, a lexical (weaker) notion of interpretability.

explain:  the set of words (tokens without their surrounding whitespace) and word pairs (a token and the one
          before it) whose presence best predicts the latent on the explanation contexts. Chosen greedily: each
          step adds the item that most raises the Pearson correlation, over every token of those contexts,
          between "this token is named" and the latent's activation; at most MAX_ITEMS items, each firing at
          least MIN_SUPPORT times there (or, where no item does, as often as the most frequent one: a rare
          latent gets its best lookup, scored on held-out contexts like any other, rather than none), a word
          chosen over a pair when they predict the same. Written 'the word "God"' or
          'the words "God", ["the", "LORD"]' (a pair as a JSON list).
simulate: 1 on every token the explanation names (a word, or the second word of a named pair), 0 elsewhere;
detect:   a context fires when any of its tokens is named.

It reads any explanation of that form, the judge check's 'the word "X"' too, so it passes the check by
construction: its scores say how far a latent is a lookup of a few words, and nothing more.
"""

from __future__ import annotations

import json
import re

import numpy as np

MAX_ITEMS, MIN_SUPPORT = 5, 2
_FORM = re.compile(r"the words? (.+)", re.S)


def _word(token: str) -> str:
    return token.strip() or token  # a whitespace token stays itself


def lookup(items: set, tokens: list[str]) -> list[float]:
    """1.0 where the token is a named word or ends a named pair, else 0.0; items: words (str), pairs (tuple)."""
    w = [_word(t) for t in tokens]
    return [float(w[i] in items or (i > 0 and (w[i - 1], w[i]) in items)) for i in range(len(w))]


def explain_items(examples, max_items: int = MAX_ITEMS, min_support: int = MIN_SUPPORT) -> tuple[list, str | None]:
    """examples: [(tokens, activations)] -> (the chosen words and pairs, in the order chosen; None) or ([], why)."""
    acts = np.concatenate([np.asarray(a, np.float64) for _, a in examples]) if examples else np.zeros(0)
    if not len(acts) or acts.std() == 0:
        return [], "no activation to explain"
    at = []  # per token: its word, and its pair with the word before (None at a context's start)
    for toks, _ in examples:
        w = [_word(t) for t in toks]
        at += [(w[i], (w[i - 1], w[i]) if i else None) for i in range(len(w))]
    cands = sorted(dict.fromkeys(x for pair in at for x in pair if x is not None), key=lambda x: isinstance(x, tuple))
    col = {c: j for j, c in enumerate(cands)}  # words first: on a tie the word is chosen
    named = np.zeros((len(acts), len(cands)), bool)  # [tokens, candidates]
    for i, pair in enumerate(at):
        named[i, [col[x] for x in pair if x is not None]] = True
    support = (named & (acts > 0)[:, None]).sum(0)
    usable = support >= min(min_support, support.max())
    a = acts - acts.mean()
    chosen, cur, best = [], np.zeros(len(acts), bool), 0.0
    for _ in range(max_items):
        x = (cur[:, None] | named).astype(np.float64)
        x -= x.mean(0)
        norm = np.sqrt((x * x).sum(0) * (a * a).sum())
        r = np.where(usable & (norm > 0), (x * a[:, None]).sum(0) / np.where(norm > 0, norm, 1), -np.inf)
        r[chosen] = -np.inf
        j = int(np.argmax(r))
        if not r[j] > best + 1e-12:
            break
        chosen.append(j)
        cur, best = cur | named[:, j], float(r[j])
    if not chosen:
        return [], "no word or word pair predicts the activations"
    return [cands[j] for j in chosen], None


def describe(items: list) -> str:
    """The explanation of words and pairs: 'the word "a"', 'the words "a", ["b", "c"]'."""
    parts = [json.dumps(x if isinstance(x, str) else list(x), ensure_ascii=False) for x in items]
    return ("the word " if len(items) == 1 and isinstance(items[0], str) else "the words ") + ", ".join(parts)


def parse(explanation: str) -> set | None:
    """The words (str) and pairs (tuple) an explanation of `describe`'s form names; None for any other text."""
    m = _FORM.fullmatch(explanation.strip())
    try:
        values = json.loads(f"[{m.group(1)}]") if m else None
    except json.JSONDecodeError:
        return None
    if not values:
        return None
    items = set()
    for v in values:
        if isinstance(v, str):
            items.add(v)
        elif isinstance(v, list) and len(v) == 2 and all(isinstance(s, str) for s in v):
            items.add(tuple(v))
        else:
            return None
    return items


class LexicalJudge:
    """The judge interface of autointerp.py by token lookup: no model, no calls, deterministic. A lookup that
    names no token of the held-out contexts predicts no activation, which scores 0 (constant_is_zero)."""

    name = f"token lookup of at most {MAX_ITEMS} words or word pairs (no LLM)"
    calls = 0
    constant_is_zero = True

    def explain(self, examples) -> tuple[str | None, str | None]:
        items, why = explain_items(examples)
        return (describe(items), None) if items else (None, why)

    def simulate(self, explanation: str, contexts: list[list[str]]) -> list[list[float] | None]:
        items = parse(explanation)
        return [None if items is None else lookup(items, c) for c in contexts]

    def detect(self, explanation: str, contexts: list[list[str]]) -> list[tuple[bool, float] | None]:
        return [None if p is None else (max(p, default=0.0) > 0, max(p, default=0.0))
                for p in self.simulate(explanation, contexts)]  # fmt: skip
