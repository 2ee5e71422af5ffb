"""Auto-interpretation (issue 10, part 3): an explainer writes what a latent does, a simulator predicts its
activations from that explanation (the paper's score), a judge detects which contexts activate it.

`llm.py` talks to any OpenAI-compatible chat endpoint with an on-disk cache; `scoring.py` turns predictions
into scores.
"""
