"""Scores of an explanation, independent of where the predictions came from.

simulation: Pearson correlation between the simulator's predicted activation of every token and the true
            activations, over held-out top-activating and random contexts together (the paper's metric);
detection:  the judge's yes/no per context against whether the latent fires in it: balanced accuracy, and
            AUROC when the judge gives a graded confidence.
"""

from __future__ import annotations

import numpy as np


def simulation_score(predicted, true) -> float | None:
    """Pearson correlation over all tokens of all contexts (None if either side is constant)."""
    p = np.concatenate([np.asarray(x, np.float64).ravel() for x in predicted])
    t = np.concatenate([np.asarray(x, np.float64).ravel() for x in true])
    if len(p) != len(t):
        raise ValueError(f"{len(p)} predicted activations for {len(t)} tokens")
    if p.std() == 0 or t.std() == 0:
        return None
    return float(np.corrcoef(p, t)[0, 1])


def balanced_accuracy(said_yes, fires) -> float:
    """Mean of the hit rate on firing contexts and the correct-rejection rate on the others."""
    y, f = np.asarray(said_yes, bool), np.asarray(fires, bool)
    if f.all() or not f.any():
        raise ValueError("detection needs both firing and non-firing contexts")
    return float((y[f].mean() + (~y[~f]).mean()) / 2)


def auroc(confidence, fires) -> float:
    """Probability that a firing context gets a higher confidence than a non-firing one (ties count half)."""
    c, f = np.asarray(confidence, np.float64), np.asarray(fires, bool)
    if f.all() or not f.any():
        raise ValueError("detection needs both firing and non-firing contexts")
    pos, neg = c[f], c[~f]
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg)))
