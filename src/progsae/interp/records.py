"""Latent records: what each latent fires on, gathered in one streaming pass (the basis of the feature
browser and of auto-interpretation).

Per latent: its top-n activations (value, row), a uniform random sample of its activations (a reservoir:
each activation gets a random key and the `n_sample` smallest keys are kept, so quantiles can be drawn from
it), an activation histogram over fixed log-spaced bins, firing frequency and E[z^2]; and, shared by all
latents, a random sample of rows with their codes, from which each latent's non-activating rows are drawn.
Memory is O(N (n_top + n_sample + bins)), never [n_tokens, N]: each batch's sparse entries are merged into
the kept ones by one sort. Rows are indices into the activation directory, which maps them to contexts.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from ..sae import SAE

BINS = np.geomspace(1e-3, 1e4, 57)  # histogram edges: activation values from 0.001 to 10,000


def _keep_top(latent, key, payload: list, N: int, n: int):
    """Entries sorted by (latent, key descending), at most n per latent: (latent, key, *payload)."""
    order = torch.sort(key, descending=True, stable=True).indices
    order = order[torch.sort(latent[order], stable=True).indices]
    latent, key, payload = latent[order], key[order], [p[order] for p in payload]
    counts = torch.bincount(latent, minlength=N)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(latent)) - start[latent]
    keep = rank < n
    return latent[keep], key[keep], [p[keep] for p in payload]


class RecordsPass:
    def __init__(self, sae: SAE, n_top: int = 20, n_sample: int = 40, n_random_rows: int = 512, seed: int = 0):
        self.sae, self.N = sae, sae.d_sae
        self.n_top, self.n_sample, self.n_random = n_top, n_sample, n_random_rows
        self.gen = torch.Generator().manual_seed(seed)
        empty_i, empty_f = torch.zeros(0, dtype=torch.long), torch.zeros(0)
        self.top = (empty_i, empty_f, [empty_i])  # latent, value, [row]
        self.res = (empty_i, empty_f, [empty_f, empty_i])  # latent, key, [value, row]
        self.hist = torch.zeros(self.N, len(BINS) - 1, dtype=torch.long)
        self.count = torch.zeros(self.N, dtype=torch.float64)
        self.sum_sq = torch.zeros(self.N, dtype=torch.float64)
        self.rand = (empty_f, empty_i, torch.zeros(0, 0, dtype=torch.long))  # key, row, active latents (-1 pad)
        self.n = 0
        self.edges = torch.from_numpy(BINS).float()

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        values, indices = self.sae.encode(x.to(self.sae.W_dec.device))
        values, indices = values.cpu(), indices.cpu()
        rows = torch.arange(self.n, self.n + len(x)).unsqueeze(1).expand_as(indices)
        on = values > 0
        lat, val, row = indices[on], values[on], rows[on]
        self.count += torch.bincount(lat, minlength=self.N).double()
        self.sum_sq.index_add_(0, lat, val.double().pow(2))
        b = (torch.bucketize(val, self.edges) - 1).clamp(0, len(BINS) - 2)
        self.hist.view(-1).index_add_(0, lat * (len(BINS) - 1) + b, torch.ones_like(lat))
        tl, tv, (tr,) = self.top
        self.top = _keep_top(torch.cat([tl, lat]), torch.cat([tv, val]), [torch.cat([tr, row])], self.N, self.n_top)
        rl, rk, (rv, rr) = self.res
        key = torch.rand(len(lat), generator=self.gen)
        self.res = _keep_top(
            torch.cat([rl, lat]), torch.cat([rk, key]), [torch.cat([rv, val]), torch.cat([rr, row])], self.N,
            self.n_sample,
        )  # fmt: skip
        rk, rr, ra = self.rand  # the rows with the largest random keys: a uniform sample of rows
        active = torch.where(on, indices, -1)
        w = max(ra.shape[1], active.shape[1])
        pad = lambda a: torch.nn.functional.pad(a, (0, w - a.shape[1]), value=-1)  # noqa: E731
        keys = torch.cat([rk, torch.rand(len(x), generator=self.gen)])
        rows, codes = torch.cat([rr, rows[:, 0]]), torch.cat([pad(ra), pad(active)])
        keep = torch.topk(keys, min(self.n_random, len(keys))).indices
        self.rand = (keys[keep], rows[keep], codes[keep])
        self.n += len(x)

    def result(self) -> dict[str, torch.Tensor]:
        """Dense per-latent arrays (rows padded with -1, values with 0), latents in index order."""

        def dense(latent, value, row, n):
            counts = torch.bincount(latent, minlength=self.N)
            rank = torch.arange(len(latent)) - (torch.cumsum(counts, 0) - counts)[latent]
            V, R = torch.zeros(self.N, n), torch.full((self.N, n), -1, dtype=torch.long)
            V[latent, rank], R[latent, rank] = value, row
            return V, R

        tl, tv, (tr,) = self.top
        top_v, top_r = dense(tl, tv, tr, self.n_top)
        rl, _, (rv, rr) = self.res
        order = torch.sort(rv, descending=True, stable=True).indices  # each latent's sample by value, high first
        order = order[torch.sort(rl[order], stable=True).indices]
        sample_v, sample_r = dense(rl[order], rv[order], rr[order], self.n_sample)
        _, rr, ra = self.rand
        by_row = torch.argsort(rr)
        return {
            "top_values": top_v,
            "top_rows": top_r,
            "sample_values": sample_v,
            "sample_rows": sample_r,
            "hist": self.hist,
            "hist_edges": torch.from_numpy(BINS),
            "freq": self.count / max(self.n, 1),
            "e_z2": self.sum_sq / max(self.n, 1),
            "random_rows": rr[by_row],
            "random_active": ra[by_row],  # each random row's active latents (-1 pad): its non-activating latents
            "n_tokens": torch.tensor(self.n),
        }


def latent_records(sae: SAE, batches: Iterable[torch.Tensor], **kw) -> dict[str, torch.Tensor]:
    acc = RecordsPass(sae, **kw)
    for x in batches:
        acc.update(x)
    return acc.result()


def non_activating(records: dict[str, torch.Tensor], latent: int, n: int) -> list[int]:
    """Up to n of the random rows on which `latent` did not fire."""
    active = (records["random_active"] == latent).any(1)
    return records["random_rows"][~active][:n].tolist()


def save_records(path, records: dict[str, torch.Tensor], sae: SAE, acts_path: str = "") -> None:
    """The records as safetensors, with the SAE's fingerprint and the activation directory they index."""
    from ..files import save_tensors

    meta = {"fingerprint": sae.fingerprint(), "acts": str(acts_path), "n_tokens": str(int(records["n_tokens"]))}
    save_tensors(path, {k: v for k, v in records.items() if k != "n_tokens"}, meta)


def load_records(path, sae: SAE | None = None) -> dict:
    """Records written by `save_records`; with `sae`, refused unless they were gathered for exactly that SAE."""
    from ..errors import ProgsaeError
    from ..files import load_tensors, tensors_metadata

    rec, meta = load_tensors(path), tensors_metadata(path)
    if "top_rows" not in rec:
        raise ProgsaeError(f"{path}: not a latent-records file (no top_rows); write one with progsae's records pass")
    if sae is not None and meta.get("fingerprint") != sae.fingerprint():
        raise ProgsaeError(
            f"{path} holds the records of another SAE (other weights or latent order); gather them again"
        )
    rec["n_tokens"] = torch.tensor(int(meta.get("n_tokens", 0)))
    rec["acts"] = meta.get("acts", "")
    return rec


def row_contexts(acts, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(context_ids, positions) of activation rows of an extracted directory (-1 for padding rows)."""
    from ..errors import ProgsaeError
    from ..files import load_tensor

    ctx, pos = [], []
    for s in acts.shards:
        c, p = load_tensor(acts.path / s["file"], "context_ids"), load_tensor(acts.path / s["file"], "positions")
        if c is None or p is None:
            raise ProgsaeError(
                f"{acts.path} stores no context_ids/positions; records need a directory from `progsae extract`"
            )
        ctx.append(c)
        pos.append(p)
    ctx, pos = torch.cat(ctx), torch.cat(pos)
    valid = rows >= 0
    out_c, out_p = torch.full_like(rows, -1), torch.full_like(rows, -1)
    out_c[valid], out_p[valid] = ctx[rows[valid]], pos[rows[valid]]
    return out_c, out_p


def quantile_rows(records: dict, latent: int, n: int) -> list[int]:
    """n rows of the latent's reservoir sample at evenly spaced quantiles of its activations (high to low)."""
    rows = [int(r) for r in records["sample_rows"][latent] if r >= 0]
    if len(rows) <= n:
        return rows
    return [rows[round(i)] for i in np.linspace(0, len(rows) - 1, n)]


class TextRows:
    """The first n rows of an extracted activation directory in memory with the tokens they were computed at,
    and an SAE's code of every row (none without an SAE): windows of context around a row, as (tokens, the
    latent's activations)."""

    def __init__(self, acts, n: int, sae: SAE | None, tokenizer=None, chunk: int = 4096):
        from ..errors import ProgsaeError
        from ..files import load_tensor

        if acts.manifest.get("source", {}).get("kind") != "lm":
            raise ProgsaeError(f"{acts.path} holds no extracted LM activations; this needs `progsae extract` output")
        self.n = min(n, acts.n_tokens)
        self.x = torch.cat(list(acts.iter_rows(chunk, self.n)))
        self.ctx, self.pos = row_contexts(acts, torch.arange(self.n))
        self.contexts = load_tensor(acts.path / "contexts.safetensors", "contexts")
        self.token_ids = self.contexts[self.ctx, self.pos]
        self.tok, self._text = tokenizer, {}
        if sae is None:
            return
        with torch.no_grad():
            codes = [sae.encode(x.to(sae.W_dec.device)) for x in self.x.split(chunk)]
        self.values = torch.cat([v.cpu() for v, _ in codes])
        self.indices = torch.cat([i.cpu() for _, i in codes])

    def text(self, token_id: int) -> str:
        if token_id not in self._text:
            self._text[token_id] = self.tok.decode([token_id]) if self.tok is not None else f"<{token_id}>"
        return self._text[token_id]

    def window(self, row: int, before: int, after: int) -> list[int]:
        """The rows around `row` that belong to its context, in order."""
        c, p = int(self.ctx[row]), int(self.pos[row])
        lo, hi = max(0, row - before), min(self.n, row + after + 1)
        return [r for r in range(lo, hi) if int(self.ctx[r]) == c and int(self.pos[r]) - p == r - row]

    def activations(self, rows: list[int], latent: int) -> list[float]:
        v, i = self.values[rows], self.indices[rows]
        return (v * (i == latent)).sum(1).tolist()

    def example(self, row: int, latent: int, before: int, after: int) -> tuple[list[str], list[float]]:
        w = self.window(row, before, after)
        return [self.text(int(self.token_ids[r])) for r in w], self.activations(w, latent)
