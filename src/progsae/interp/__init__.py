"""Auto-interpretation: an explainer writes what a latent does, a simulator predicts its activations from that
explanation (the paper's score), a judge detects which contexts activate it.

`autointerp.py` holds the judge interface and `score_latent`; `llm.py` talks to any OpenAI-compatible chat
endpoint with an on-disk cache; `local.py` is the offline LLM judge; `lexical.py` a judge without an LLM (token
lookup: a weaker, lexical notion of interpretability); `scoring.py` turns predictions into scores;
`study.py` samples latents by rank band, builds their contexts from the latent records and checks the judge.
The data they read: `records.py` (each latent's top, sampled and non-firing contexts in one pass over held-out
tokens) and `proxies.py` (LLM-free measures of every latent); `bands.py` averages scores and proxies by band of
importance ranks.
"""
