"""Known answers at every granularity: how well an SAE's first G latents recover the true features.

For an SAE in its stored order (so a permuted SAE and a Matryoshka SAE are compared as progressive codes)
and a `Truth` (data/truth.py), with C = |cos| between decoder rows and true features [N, F]:

    mcc(G)         Hungarian matching of the first G latents to the true features on C (cost 1 - C), mean
                   of the matched similarities (SAELens' `mean_correlation_coefficient` at G = N)
    uniqueness(G)  distinct best-matching true features among the first G latents, over G (SAELens'
                   `feature_uniqueness` at G = N)
    recovered(G)   share of true features whose best match among the first G latents has C >= 0.9 (and 0.8),
                   overall, by depth in the hierarchy, of the parents (features with children) and by decile
                   of true firing frequency (most frequent first)
and, where the held-out rows carry their true codes, per truncation mode:
    precision, recall, f1(G)  each of the first G latents as a detector of its best-matching true feature
                   (argmax of C over all F), on the held-out rows; means over the G latents, a latent's score 0
                   where undefined (SAELens' `ClassificationMetricsCalculator` at G = N)
    absorption(G)  for each parent recovered at G (C >= 0.9) by its best latent l among the first G: the share
                   of the rows where the parent and one of its children fire on which l does not fire; the mean
                   over those parents
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.truth import Truth
from ..sae import SAE

THRESHOLDS = (0.9, 0.8)  # recovered at C >= threshold; the first is the headline
CHUNK = 2**24  # at most this many rows x width numbers held at once


def linear_sum_assignment(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of a minimum-cost matching of min(n, m) pairs (scipy's `linear_sum_assignment`):
    the shortest augmenting path method with potentials (Jonker-Volgenant), one row at a time."""
    cost = np.asarray(cost, dtype=np.float64)
    flip = cost.shape[0] > cost.shape[1]
    if flip:
        cost = cost.T
    n, m = cost.shape
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    owner = np.zeros(m + 1, dtype=np.int64)  # owner[j]: the row (1-based) matched to column j, 0 if none
    for i in range(1, n + 1):
        owner[0], j0 = i, 0
        minv, way, used = np.full(m + 1, np.inf), np.zeros(m + 1, dtype=np.int64), np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            cur = cost[owner[j0] - 1] - u[owner[j0]] - v[1:]
            better = ~used[1:] & (cur < minv[1:])
            minv[1:][better], way[1:][better] = cur[better], j0
            free = np.where(used[1:], np.inf, minv[1:])
            j1 = int(free.argmin()) + 1
            delta = free[j1 - 1]
            done = used.nonzero()[0]
            u[owner[done]] += delta
            v[done] -= delta
            minv[1:][~used[1:]] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:  # augment along the path
            owner[j0] = owner[way[j0]]
            j0 = way[j0]
    cols = owner[1:].nonzero()[0]
    rows = owner[1:][cols] - 1
    if flip:
        rows, cols = cols, rows
    order = rows.argsort()
    return rows[order], cols[order]


def abs_cosines(W_dec: torch.Tensor, features: torch.Tensor) -> np.ndarray:
    """C [N, F] = |cos| between decoder rows and true features, in float64."""
    a, b = W_dec.detach().double().cpu(), features.double().cpu()
    a = a / a.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return (a @ (b / b.norm(dim=1, keepdim=True)).t()).abs().numpy()


def mcc(C: np.ndarray) -> float:
    rows, cols = linear_sum_assignment(1 - C)
    return float(C[rows, cols].mean())


def uniqueness(C: np.ndarray) -> float:
    return len(np.unique(C.argmax(1))) / C.shape[0]


def first_match(C: np.ndarray, threshold: float) -> np.ndarray:
    """[F]: the smallest G whose first G latents hold a match with C >= threshold (N + 1: none)."""
    hit = C >= threshold
    return np.where(hit.any(0), hit.argmax(0) + 1, C.shape[0] + 1)


class TruthEval:
    """Accumulates the firing counts over held-out rows (`update` with each batch and its true code), then
    `result()`: the known-answer metrics at each G of `Gs` (module doc)."""

    def __init__(self, sae: SAE, truth: Truth, Gs: list[int]):
        self.sae, self.truth, self.Gs = sae, truth, list(Gs)
        self.C = abs_cosines(sae.W_dec, truth.feature_vectors)  # [N, F]
        self.best = torch.from_numpy(self.C.argmax(1))  # [N] each latent's best true feature
        self.depth = truth.depth().numpy()
        parent = truth.parent if truth.parent is not None else torch.full((truth.n_features,), -1)
        self.child, self.child_parent = (parent >= 0).nonzero().flatten(), parent[parent >= 0]
        self.parents = self.child_parent.unique()  # [P] features with children
        self.has_codes = truth.feature_indices is not None
        self.modes = {m: ([None] if m == "prefix" else self.Gs) for m in sae.modes}  # G=None: the full code
        # the best latent among the first G of each parent recovered at G: the pairs whose co-firing we count
        self.pairs = {}  # G -> (latents [p], parent slots [p])
        for G in self.Gs:
            sub = self.C[:G, self.parents.numpy()] if len(self.parents) else np.zeros((G, 0))
            ok = (sub.max(0) >= THRESHOLDS[0]).nonzero()[0] if len(self.parents) else np.zeros(0, dtype=np.int64)
            self.pairs[G] = (torch.from_numpy(sub.argmax(0)[ok]), torch.from_numpy(ok))
        self.at = 0
        F = truth.n_features
        self.t_count = torch.zeros(F, dtype=torch.float64)  # rows on which each true feature fires
        self.e_count = torch.zeros(len(self.parents), dtype=torch.float64)  # ... a parent and one of its children
        self.counts = {}  # (mode, G) -> {"tp", "fires": [width], "co": [pairs of G]}

    def update(self, x: torch.Tensor) -> None:
        """The next rows of the held-out set, in stored order (their true code is read from the truth)."""
        if not self.has_codes:
            return
        step = max(1, CHUNK // max(self.truth.n_features, self.sae.d_sae))
        for part in x.split(step):
            self._update(part)

    def _update(self, x: torch.Tensor) -> None:
        n, t = len(x), self.truth
        idx, val = t.feature_indices[self.at : self.at + n], t.feature_values[self.at : self.at + n]
        self.at += n
        T = torch.zeros(n, t.n_features + 1, dtype=torch.bool)  # column F: the codes' padding
        T = T.scatter_(1, torch.where(val > 0, idx, t.n_features), True)[:, :-1]
        self.t_count += T.sum(0)
        kids = torch.zeros(n, t.n_features).index_add_(1, self.child_parent, T[:, self.child].float()) > 0
        E = T[:, self.parents] & kids[:, self.parents]  # [n, P]
        self.e_count += E.sum(0)
        rows = torch.arange(n).unsqueeze(1)
        with torch.no_grad():
            for mode, Gs in self.modes.items():
                for G in Gs:
                    code = self.sae.encode(x.to(self.sae.W_dec.device), G, mode)
                    i, on = code.indices.cpu(), code.values.cpu() > 0
                    width = self.sae.d_sae if G is None else G
                    c = self.counts.setdefault((mode, G), {"tp": torch.zeros(width, dtype=torch.float64),
                                                           "fires": torch.zeros(width, dtype=torch.float64), "co": {}})  # fmt: skip
                    hit = on & T[rows, self.best[i]]
                    c["fires"].index_add_(0, i[on], torch.ones(int(on.sum()), dtype=torch.float64))
                    c["tp"].index_add_(0, i[hit], torch.ones(int(hit.sum()), dtype=torch.float64))
                    A = torch.zeros(n, width + 1, dtype=torch.bool)  # which latents fire; column `width`: padding
                    A.scatter_(1, torch.where(on, i, width), True)
                    for Gp in self.Gs if G is None else [G]:
                        lat, slot = self.pairs[Gp]
                        co = (A[:, lat] & E[:, slot]).sum(0).double()
                        c["co"][Gp] = c["co"].get(Gp, 0) + co

    def result(self) -> dict:
        """{"n_features", "thresholds", "depth_counts", "curve": {"recovered", "recovered_0.8"} at every G,
        "table": per G of Gs: G, mcc, uniqueness, recovered, recovered_0.8, recovered_depth[_0.8] (a share
        per depth), recovered_parents (None without a hierarchy), and with the true codes recovered_decile and precision_/recall_/f1_/absorption_MODE}."""
        F, N = self.truth.n_features, self.sae.d_sae
        first = {th: first_match(self.C, th) for th in THRESHOLDS}
        depths = np.bincount(self.depth)
        key = {th: "recovered" if th == THRESHOLDS[0] else f"recovered_{th}" for th in THRESHOLDS}
        out = {"n_features": F, "thresholds": list(THRESHOLDS), "depth_counts": depths.tolist(), "has_codes": self.has_codes,
               "curve": {key[th]: (np.bincount(np.minimum(f, N + 1), minlength=N + 2)[1 : N + 1].cumsum() / F).tolist()
                         for th, f in first.items()}}  # fmt: skip
        decile = np.array_split(np.argsort(-self.t_count.numpy(), kind="stable"), min(10, F)) if self.has_codes else None
        table = []
        for G in self.Gs:
            row = {"G": G, "mcc": mcc(self.C[:G]), "uniqueness": uniqueness(self.C[:G])}
            for th, f in first.items():
                row[key[th]] = float((f <= G).mean())
                row[key[th].replace("recovered", "recovered_depth")] = [
                    float((f[self.depth == d] <= G).mean()) for d in range(len(depths))]  # fmt: skip
            parents = first[THRESHOLDS[0]][self.parents.numpy()]
            row["recovered_parents"] = float((parents <= G).mean()) if len(parents) else None
            if self.has_codes:
                row["recovered_decile"] = [float((first[THRESHOLDS[0]][d] <= G).mean()) for d in decile]
                for mode in self.modes:
                    row.update(self._firing(mode, G))
            table.append(row)
        out["table"] = table
        return out

    def _firing(self, mode: str, G: int) -> dict:
        c = self.counts[(mode, None if mode == "prefix" else G)]
        tp, fires = c["tp"][:G], c["fires"][:G]
        truth = self.t_count[self.best[:G]]
        precision = torch.where(fires > 0, tp / fires.clamp(min=1), 0.0)
        recall = torch.where(truth > 0, tp / truth.clamp(min=1), 0.0)
        s = precision + recall
        f1 = torch.where(s > 0, 2 * precision * recall / s.clamp(min=1e-300), 0.0)
        _, slot = self.pairs[G]
        events = self.e_count[slot]
        seen = events > 0
        absorbed = 1 - c["co"][G][seen] / events[seen] if len(slot) else torch.zeros(0)
        return {
            f"precision_{mode}": float(precision.mean()),
            f"recall_{mode}": float(recall.mean()),
            f"f1_{mode}": float(f1.mean()),
            f"absorption_{mode}": float(absorbed.mean()) if len(absorbed) else None,
            f"absorption_parents_{mode}": int(seen.sum()),
        }
