"""The prompts of auto-interpretation, versioned: the version is part of every cached request, so changing a
prompt never serves an old answer."""

from __future__ import annotations

import json

VERSION = 1

SYSTEM = (
    f"[progsae auto-interp prompts v{VERSION}] You study one latent of a sparse autoencoder trained on a "
    "language model's activations. Answer with JSON only."
)


def explain(examples: list[tuple[list[str], list[float]]]) -> list[dict]:
    """Top and sampled contexts, each token marked with the latent's activation (0-10), to one explanation."""
    lines = []
    for tokens, acts in examples:
        top = max(acts) or 1.0
        lines.append(" ".join(f"{t}[{round(10 * a / top)}]" if a > 0 else t for t, a in zip(tokens, acts, strict=True)))
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Contexts where the latent fires; [n] after a token is its activation (0-10):\n"
         + "\n".join(lines) + '\nWhat does the latent detect? Reply {"explanation": "<one short sentence>"}.'},
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
