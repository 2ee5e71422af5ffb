"""One latent through explain -> simulate -> detect -> scores, with any judge.

A judge has `name`, `calls` and three methods, each answering for a batch of contexts:
    explain(examples)              -> (explanation, None) or (None, why)
    simulate(explanation, tokens)  -> per context: predicted activation per token, or None (malformed)
    detect(explanation, tokens)    -> per context: (says it fires, belief it fires in [0, 1]), or None
`ChatJudge` asks an OpenAI-compatible endpoint with the JSON prompts; `local.LocalJudge` reads a local
model's next-token probabilities; `lexical.LexicalJudge` looks tokens up, no model at all. A judge whose
constant prediction means "fires nowhere here" sets `constant_is_zero`: its simulation then scores 0 (no
information) where a Pearson correlation is undefined, instead of going unscored. Every reply that cannot be
used is counted in the result's `malformed`, and the latent is scored on the rest (or not at all, with the
reason).
"""

from __future__ import annotations

import numpy as np

from . import prompts
from .llm import ChatClient, parse_json
from .scoring import auroc, balanced_accuracy, simulation_score


class ChatJudge:
    def __init__(self, client: ChatClient):
        self.client, self.name = client, f"{client.model} at {client.base_url}"

    @property
    def calls(self) -> int:
        return self.client.calls

    def explain(self, examples) -> tuple[str | None, str | None]:
        reply = self.client.chat_many([prompts.explain(examples)])[0]
        value, why = parse_json(reply.text)
        if isinstance(value, dict) and isinstance(value.get("explanation"), str) and value["explanation"].strip():
            return value["explanation"].strip(), None
        return None, reply.error or why or "no explanation field"

    def simulate(self, explanation: str, contexts: list[list[str]]) -> list[list[float] | None]:
        out = []
        for toks, r in zip(contexts, self.client.chat_many([prompts.simulate(explanation, t) for t in contexts]),
                           strict=True):  # fmt: skip
            v, _ = parse_json(r.text)
            a = v.get("activations") if isinstance(v, dict) else None
            ok = isinstance(a, list) and len(a) == len(toks) and all(isinstance(x, int | float) for x in a)
            out.append([float(x) for x in a] if ok else None)
        return out

    def detect(self, explanation: str, contexts: list[list[str]]) -> list[tuple[bool, float] | None]:
        out = []
        for r in self.client.chat_many([prompts.detect(explanation, t) for t in contexts]):
            v, _ = parse_json(r.text)
            if not isinstance(v, dict) or not isinstance(v.get("fires"), bool):
                out.append(None)
                continue
            c = v.get("confidence")
            c = min(max(float(c), 0.0), 1.0) if isinstance(c, int | float) else 1.0
            out.append((v["fires"], c if v["fires"] else 1 - c))  # the judge's belief that it fires
        return out


def score_latent(judge, explain_examples: list, held_out: list, explanation: str | None = None) -> dict:
    """explain_examples, held_out: [(tokens, activations)]; held_out mixes top and random contexts. With
    `explanation` given, the explainer is not asked (the judge check: a known rule)."""
    out = {"explanation": None, "simulation": None, "detection_bacc": None, "detection_auroc": None,
           "malformed": 0, "error": None}  # fmt: skip
    why = None
    if explanation is None:
        explanation, why = judge.explain(explain_examples)
    if explanation is None:
        out["error"] = f"explainer: {why}"
        return out
    out["explanation"] = explanation
    contexts = [toks for toks, _ in held_out]
    pred, true = [], []
    for (_, acts), p in zip(held_out, judge.simulate(explanation, contexts), strict=True):
        if p is None:
            out["malformed"] += 1
        else:
            pred.append(p)
            true.append(acts)
    out["simulation"] = simulation_score(pred, true) if pred else None
    if out["simulation"] is None and pred and getattr(judge, "constant_is_zero", False):
        out["simulation"] = 0.0 if np.ptp(np.concatenate(true)) > 0 else None  # the prediction was the constant
    said, belief, fires = [], [], []
    for (_, acts), d in zip(held_out, judge.detect(explanation, contexts), strict=True):
        if d is None:
            out["malformed"] += 1
            continue
        said.append(d[0])
        belief.append(d[1])
        fires.append(max(acts) > 0)
    if any(fires) and not all(fires):
        out["detection_bacc"], out["detection_auroc"] = balanced_accuracy(said, fires), auroc(belief, fires)
    return out
