"""Auto-interp over a sample of an SAE's latents, stratified by importance rank, with contexts built from its
latent records (records.py), and a check of the judge itself on latents whose rule is known.

Per latent: the explainer sees its even-ranked top contexts and contexts at evenly spaced quantiles of its
activations; simulation and detection are scored on held-out contexts: its odd-ranked top contexts and random
contexts where it does not fire (the paper's "held-out top and random contexts"). A context is a window of
WINDOW tokens before and after the record's token, within its own context.

The judge check: for a few words of the held-out text, a latent that fires exactly on that word, with the
explanation given ("the word X"): a judge that can read an explanation scores near 1; one that cannot, near 0.
It is reported beside every score, so a weak judge is seen as weak. The lexical judge (lexical.py) reads that
explanation as a lookup of the word, so it passes by construction: for it the check only confirms the lookup.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from tqdm import tqdm

from .autointerp import score_latent
from .records import TextRows, non_activating, quantile_rows

WINDOW = (12, 3)


def stratified_latents(order: list[int], alive, edges: list[int], per_band: int) -> list[int]:
    """per_band live latents from each band of ranks [edges[i-1], edges[i]) (edges[0] from rank 0), evenly
    spaced over the band's live latents; `order` lists the latents in rank order."""
    out, lo = [], 0
    for hi in edges:
        band = [latent for latent in order[lo:hi] if alive[latent]]
        if band:
            picks = np.unique(np.linspace(0, len(band) - 1, min(per_band, len(band))).round().astype(int))
            out += [band[i] for i in picks]
        lo = hi
    return out


def contexts_of(rows: TextRows, records: dict, latent: int, n_explain: int = 6, n_quantile: int = 3,
                n_held_top: int = 5, n_random: int = 5) -> tuple[list, list]:  # fmt: skip
    """(explain examples, held-out examples) of one latent, each [(tokens, activations)]."""
    top = [int(r) for r in records["top_rows"][latent] if r >= 0]
    explain_rows = top[0::2][:n_explain]
    explain_rows += [r for r in quantile_rows(records, latent, n_quantile + len(explain_rows)) if r not in top][
        :n_quantile
    ]
    held_rows = top[1::2][:n_held_top] + non_activating(records, latent, n_random)
    ex = [rows.example(r, latent, *WINDOW) for r in explain_rows]
    return ex, [rows.example(r, latent, *WINDOW) for r in held_rows]


def score_latents(judge, rows: TextRows, records: dict, latents: list[int], progress: bool = True) -> list[dict]:
    out = []
    for latent in tqdm(latents, desc="auto-interp", disable=not progress, leave=False):
        ex, held = contexts_of(rows, records, latent)
        out.append({"latent": latent, **score_latent(judge, ex, held)})
    return out


def judge_check(judge, rows: TextRows, n_words: int = 3, n: int = 5, seed: int = 0) -> dict:
    """The judge on latents that fire exactly on one word of the held-out text, explanation given."""
    counts = Counter(int(t) for t in rows.token_ids)
    words = [t for t, _ in counts.most_common() if rows.text(t).strip().isalpha() and len(rows.text(t).strip()) > 2]
    chosen = words[4 : 4 + 4 * n_words : 4][:n_words]  # frequent words, past the very commonest
    g = torch.Generator().manual_seed(seed)
    results = []
    for t in chosen:
        where = (rows.token_ids == t).nonzero().flatten()
        hits = where[torch.randperm(len(where), generator=g)[:n]].tolist()
        others = (rows.token_ids != t).nonzero().flatten()
        misses = others[torch.randperm(len(others), generator=g)[:n]].tolist()
        held = []
        for r in hits + misses:
            w = rows.window(r, *WINDOW)
            held.append(([rows.text(int(rows.token_ids[i])) for i in w], [float(rows.token_ids[i] == t) for i in w]))
        word = rows.text(t).strip()
        results.append({"word": word, **score_latent(judge, [], held, explanation=f'the word "{word}"')})
    sims = [r["simulation"] for r in results if r["simulation"] is not None]
    aurocs = [r["detection_auroc"] for r in results if r["detection_auroc"] is not None]
    return {
        "judge": judge.name,
        "simulation": float(np.mean(sims)) if sims else None,
        "detection_auroc": float(np.mean(aurocs)) if aurocs else None,
        "latents": results,
    }
