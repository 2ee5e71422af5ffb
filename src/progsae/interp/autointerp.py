"""One latent through explain -> simulate -> detect -> scores, with any chat backend (`chat_many`).

Every reply that cannot be used (no answer, bad JSON, a wrong number of activations) is counted in the
result's `malformed`, and the latent is scored on the rest (or not at all, with the reason).
"""

from __future__ import annotations

from . import prompts
from .llm import parse_json
from .scoring import auroc, balanced_accuracy, simulation_score


def score_latent(chat, explain_examples: list, held_out: list) -> dict:
    """explain_examples, held_out: [(tokens, activations)]; held_out mixes top and random contexts."""
    out = {"explanation": None, "simulation": None, "detection_bacc": None, "detection_auroc": None,
           "malformed": 0, "error": None}  # fmt: skip
    reply = chat.chat_many([prompts.explain(explain_examples)])[0]
    value, why = parse_json(reply.text)
    if not isinstance(value, dict) or not isinstance(value.get("explanation"), str):
        out["error"] = f"explainer: {reply.error or why or 'no explanation field'}"
        return out
    explanation = out["explanation"] = value["explanation"]
    sims = chat.chat_many([prompts.simulate(explanation, toks) for toks, _ in held_out])
    pred, true = [], []
    for (toks, acts), r in zip(held_out, sims, strict=True):
        v, _ = parse_json(r.text)
        a = v.get("activations") if isinstance(v, dict) else None
        if not isinstance(a, list) or len(a) != len(toks) or not all(isinstance(x, int | float) for x in a):
            out["malformed"] += 1
            continue
        pred.append(a)
        true.append(acts)
    out["simulation"] = simulation_score(pred, true) if pred else None
    dets = chat.chat_many([prompts.detect(explanation, toks) for toks, _ in held_out])
    said, conf, fires = [], [], []
    for (_, acts), r in zip(held_out, dets, strict=True):
        v, _ = parse_json(r.text)
        if not isinstance(v, dict) or not isinstance(v.get("fires"), bool):
            out["malformed"] += 1
            continue
        said.append(v["fires"])
        c = v.get("confidence")
        c = min(max(float(c), 0.0), 1.0) if isinstance(c, int | float) else 1.0
        conf.append(c if v["fires"] else 1 - c)  # the judge's belief that it fires
        fires.append(max(acts) > 0)
    if any(fires) and not all(fires):
        out["detection_bacc"], out["detection_auroc"] = balanced_accuracy(said, fires), auroc(conf, fires)
    return out
