"""The prompts of auto-interpretation, versioned: the version is part of every cached request, so changing a
prompt never serves an old answer.

Two sets: JSON prompts for chat endpoints (`explain`, `simulate`, `detect`), and plain-text ones for the local
judge, which reads its answers from next-token probabilities (`local_explain`, `local_simulate`,
`local_detect`): the simulator sees each token followed by a tab and a placeholder, and its prediction is the
expected digit after the tab (all tokens in one forward pass, as in Bills et al. 2023's "all at once" method);
the detector's belief is P(Yes) / (P(Yes) + P(No)).
"""

from __future__ import annotations

import json
from collections import Counter

VERSION = 2

SYSTEM = (
    f"[progsae auto-interp prompts v{VERSION}] You study one latent of a sparse autoencoder trained on a "
    "language model's activations. Answer with JSON only."
)
LOCAL_SYSTEM = f"[progsae auto-interp prompts v{VERSION}] You study where a feature of a text model fires."


def _marked(examples: list[tuple[list[str], list[float]]]) -> list[str]:
    """Each context as text with every firing token followed by its activation on a 0-10 scale, [n]."""
    lines = []
    for tokens, acts in examples:
        top = max(acts) or 1.0
        lines.append("".join(f"{t}[{round(10 * a / top)}]" if a > 0 else t for t, a in zip(tokens, acts, strict=True)))
    return lines


def explain(examples: list[tuple[list[str], list[float]]]) -> list[dict]:
    """Top and sampled contexts, each firing token marked with the latent's activation (0-10), to one explanation."""
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Contexts where the latent fires; [n] after a token is its activation (0-10):\n"
         + "\n".join(_marked(examples)) + '\nWhat does the latent detect? Reply {"explanation": "<one short sentence>"}.'},
    ]  # fmt: skip


def simulate(explanation: str, tokens: list[str]) -> list[dict]:
    """One context's tokens to a predicted activation (0-10) per token, from the explanation alone."""
    return _about(explanation, 'Predict its activation (0-10) on each token. Reply {"activations": [one number '
                  'per token]}.', "TOKENS", tokens)  # fmt: skip


def detect(explanation: str, tokens: list[str]) -> list[dict]:
    """Does the latent fire anywhere in this context? A yes/no with a confidence."""
    return _about(explanation, 'Does it fire anywhere in this context? Reply {"fires": true or false, '
                  '"confidence": 0 to 1}.', "CONTEXT", tokens)  # fmt: skip


def _about(explanation: str, question: str, label: str, tokens: list[str]) -> list[dict]:
    """A question about one context, asked from the explanation alone; the tokens last, as JSON."""
    user = f"Explanation of the latent: {explanation}\n{question}\n{label}: {json.dumps(tokens)}"
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


# -- the local judge's prompts: (messages, the start of the assistant's answer) ------------------------------

LOCAL_EXPLAIN_PREFIX = "It fires on"


def local_explain(examples: list[tuple[list[str], list[float]]]) -> list[dict]:
    """The contexts, and the tokens where the feature peaks in them (a small model needs the hint)."""
    peaks = Counter(t.strip() for toks, acts in examples for t, a in zip(toks, acts, strict=True) if a > 0 and a == max(acts))
    user = ("Texts where the feature fires; [n] after a token is how strongly (0-10):\n" + "\n".join(_marked(examples))
            + f"\nThe tokens where it fires most: {', '.join(w for w, _ in peaks.most_common(5))}."
            + "\nWhat does the feature detect? Answer in a few words.")  # fmt: skip
    return [{"role": "system", "content": LOCAL_SYSTEM}, {"role": "user", "content": user}]


def local_simulate(explanation: str) -> list[dict]:
    user = (f"The feature fires on {explanation}\nFor each token of a text, rate from 0 to 9 how strongly it fires; "
            "one token per line, the token, a tab, the rating.")  # fmt: skip
    return [{"role": "system", "content": LOCAL_SYSTEM}, {"role": "user", "content": user}]


def local_detect(explanation: str, tokens: list[str]) -> list[dict]:
    user = (f"The feature fires on {explanation}\nText: {''.join(tokens)}\n"
            "Does the feature fire anywhere in this text? Answer Yes or No.")  # fmt: skip
    return [{"role": "system", "content": LOCAL_SYSTEM}, {"role": "user", "content": user}]
