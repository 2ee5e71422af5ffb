"""Activation directories: `manifest.json` + shards `shard-00000.safetensors` holding `activations [n, d_in]`.

    manifest.json  {"format": "progsae-activations", "version": 1, "d_in", "dtype", "n_tokens",
                    "source": {...free-form description...}, "shards": [{"file", "n_tokens"}, ...]}

Shards of extracted LM activations also hold, per row, `token_ids [n]`, `context_ids [n]` (row of
`contexts.safetensors`, which keeps every context's tokens `[n_contexts, ctx_len]`) and `positions [n]`.
A directory is written shard by shard into `DIR.partial/` and renamed to `DIR` only when complete.
Activations are stored as the manifest's `dtype` (float32, or bfloat16 for half the disk) and always
read back as float32. Reading is lazy: only a shard's activations are read, a buffer of shards at a time, so memory does
not grow with the directory.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from ..errors import ProgsaeError
from ..files import fresh_dir, load_json, load_tensor, replace_dir, save_json, save_tensors

FORMAT = "progsae-activations"
SHARD_TOKENS = 65536
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # on disk; always read as float32


class ActivationWriter:
    """Append activation rows (and optional per-row tensors); a shard is written whenever at least
    `shard_tokens` rows are pending, so shards end where `add` calls end. `close()` writes the manifest
    and renames `DIR.partial` to `DIR`.

    After each shard, `DIR.partial/progress.json` records the shards and `state` (the caller's own
    position, e.g. contexts done); a writer created with `resume=True` and the same `source` picks up
    from there, so a killed run loses no rows and duplicates none.
    """

    def __init__(
        self,
        out: str | Path,
        d_in: int,
        source: dict,
        shard_tokens: int = SHARD_TOKENS,
        resume: bool = False,
        dtype: str = "float32",
    ):
        self.out = Path(out)
        self.tmp = self.out.with_name(self.out.name + ".partial")
        self.d_in, self.source, self.shard_tokens, self.dtype = d_in, source, shard_tokens, dtype
        self.pending: list[dict[str, torch.Tensor]] = []
        self.n_pending = 0
        self.shards: list[dict] = []
        self.state: dict = {}
        progress = self.tmp / "progress.json"
        if resume and progress.is_file():
            p = load_json(progress)
            if p.get("source") == source and p.get("d_in") == d_in:
                self.shards, self.state = p["shards"], p["state"]
                return
        fresh_dir(self.tmp)

    def add(self, rows: torch.Tensor, **extra: torch.Tensor) -> None:
        if rows.ndim != 2 or rows.shape[1] != self.d_in:
            raise ProgsaeError(f"activation rows have shape {tuple(rows.shape)}, expected [n, {self.d_in}]")
        self.pending.append({"activations": rows.detach().to(getattr(torch, self.dtype)), **extra})
        self.n_pending += rows.shape[0]
        if self.n_pending >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        shard = {k: torch.cat([p[k] for p in self.pending]) for k in self.pending[0]}
        name = shard_name(len(self.shards))
        save_tensors(self.tmp / name, shard)
        self.shards.append({"file": name, "n_tokens": int(shard["activations"].shape[0])})
        self.pending, self.n_pending = [], 0
        save_json(
            self.tmp / "progress.json",
            {"source": self.source, "d_in": self.d_in, "shards": self.shards, "state": self.state},
        )

    @property
    def n_tokens(self) -> int:
        return sum(s["n_tokens"] for s in self.shards) + self.n_pending

    def close(self, files: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
        """Flush, write `files` (name -> tensors) and the manifest, and move the directory into place."""
        self.flush()
        for name, tensors in (files or {}).items():
            save_tensors(self.tmp / name, tensors)
        return finish(self.tmp, self.out, self.d_in, self.source, self.shards, self.dtype)


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def finish(tmp: Path, out: str | Path, d_in: int, source: dict, shards: list[dict], dtype: str = "float32") -> Path:
    """Write the manifest of the shards in `tmp` (a complete directory) and move it to `out`."""
    manifest = {
        "format": FORMAT,
        "version": 1,
        "d_in": d_in,
        "dtype": dtype,
        "n_tokens": sum(s["n_tokens"] for s in shards),
        "source": source,
        "shards": shards,
    }
    save_json(tmp / "manifest.json", manifest, durable=True)
    (tmp / "progress.json").unlink(missing_ok=True)
    replace_dir(tmp, Path(out))
    return Path(out)


def write_activations(
    out: str | Path,
    batches: Iterable[torch.Tensor],
    d_in: int,
    source: dict,
    shard_tokens: int = SHARD_TOKENS,
    dtype: str = "float32",
) -> Path:
    writer = ActivationWriter(out, d_in, source, shard_tokens, dtype=dtype)
    for rows in batches:
        writer.add(rows)
    return writer.close()


class ActivationDir:
    """A finished activation directory, read lazily. Implements the training `Source` protocol.

    Rows holding NaN or Inf stop every reader with one line naming the shard and row; with
    `skip_nonfinite` they are counted once up front (a read of every shard), left out of every
    stream, and reported in one warning line."""

    def __init__(self, path: str | Path, skip_nonfinite: bool = False):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ProgsaeError(
                f"{self.path}: no activation directory here; create one with `progsae synth` or `progsae extract`"
            )
        m = load_json(self.path / "manifest.json")
        if m.get("format") != FORMAT or "shards" not in m or "d_in" not in m:
            raise ProgsaeError(f"{self.path}/manifest.json: not a progsae activation manifest; re-create the directory")
        if m.get("dtype", "float32") not in DTYPES:
            raise ProgsaeError(f"{self.path}/manifest.json: dtype {m['dtype']!r} is not float32 or bfloat16; re-create the directory")
        self.manifest = m
        self.dtype = DTYPES[m.get("dtype", "float32")]
        self.d_in: int = m["d_in"]
        self.shards: list[dict] = m["shards"]
        self.n_tokens: int = m["n_tokens"]
        listed = sum(s.get("n_tokens", 0) for s in self.shards)
        if listed != self.n_tokens:
            raise ProgsaeError(
                f"{self.path}/manifest.json: n_tokens is {self.n_tokens} but its shards list {listed} rows; "
                "re-create the directory"
            )
        for s in self.shards:
            if not (self.path / s["file"]).is_file():
                raise ProgsaeError(
                    f"{self.path / s['file']}: shard listed in the manifest is missing; re-create the directory"
                )
        self.skip_nonfinite = False
        if skip_nonfinite:
            self._count_finite()

    def describe(self) -> dict:
        """What the batches are made of (a resumed training checks it): the manifest's source and counts."""
        return {"kind": "activations", "source": self.manifest.get("source"), "d_in": self.d_in, "n_tokens": self.n_tokens}

    def check_sae(self, sae) -> None:
        """Refuse an SAE that reads another width than these activations."""
        if sae.cfg.d_in != self.d_in:
            raise ProgsaeError(
                f"the SAE expects d_in={sae.cfg.d_in} but {self.path} holds d_in={self.d_in}; "
                "use activations from the layer the SAE was trained on"
            )

    def _count_finite(self) -> None:
        good, first = [], None
        for i, s in enumerate(self.shards):
            bad = ~torch.isfinite(self._read(i)).all(1)
            good.append(s["n_tokens"] - int(bad.sum()))
            if first is None and bad.any():
                first = f"{s['file']} row {int(bad.nonzero()[0])}"
        n_bad = self.n_tokens - sum(good)
        if n_bad:
            print(
                f"progsae: warning: {self.path}: skipping {n_bad} of {self.n_tokens} rows holding NaN or Inf "
                f"(first: {first})",
                file=sys.stderr,
            )
        self.shards = [{**s, "n_tokens": n} for s, n in zip(self.shards, good, strict=True)]
        self.n_tokens -= n_bad
        self.skip_nonfinite = True

    def _read(self, i: int) -> torch.Tensor:
        listed = self.manifest["shards"][i]
        f = self.path / listed["file"]
        t = load_tensor(f, "activations")
        if t is not None and t.dtype != self.dtype:
            raise ProgsaeError(
                f"{f}: activations are {str(t.dtype).removeprefix('torch.')} but the manifest says "
                f"{str(self.dtype).removeprefix('torch.')}; re-create the directory"
            )
        if t is None or t.ndim != 2 or t.shape[1] != self.d_in or t.shape[0] != listed["n_tokens"]:
            shape = None if t is None else tuple(t.shape)
            raise ProgsaeError(
                f"{f}: activations have shape {shape}, the manifest says [{listed['n_tokens']}, {self.d_in}]; "
                "re-create the directory"
            )
        return t

    def load_shard(self, i: int) -> torch.Tensor:
        t = self._read(i)
        bad = ~torch.isfinite(t).all(1)
        if bad.any() and self.skip_nonfinite:
            return t[~bad].float()
        if bad.any():  # never train or measure on NaN/Inf: name the first bad row
            rows = bad.nonzero().flatten()
            raise ProgsaeError(
                f"{self.path / self.shards[i]['file']}: row {int(rows[0])} holds NaN or Inf activations "
                f"({len(rows)} such rows in this shard); re-extract the directory (check the model's dtype and "
                "inputs), or pass --skip-nonfinite to leave such rows out"
            )
        return t.float()

    def iter_rows(self, batch_size: int, max_tokens: int | None = None) -> Iterator[torch.Tensor]:
        """Rows in stored order, in batches (the last may be short), up to `max_tokens`."""
        left = self.n_tokens if max_tokens is None else min(max_tokens, self.n_tokens)
        for i in range(len(self.shards)):
            if left <= 0:
                return
            rows = self.load_shard(i)[:left]
            left -= rows.shape[0]
            yield from rows.split(batch_size)

    def batches(self, batch_size: int, seed: int, start: int = 0, buffer_shards: int = 4) -> Iterator[torch.Tensor]:
        """Endless shuffled batches; `start` skips that many batches without reading them.

        Each epoch visits the shards in a seeded order, `buffer_shards` at a time; a buffer's rows are
        shuffled together and cut into whole batches (a buffer's last partial batch is dropped). The
        stream depends only on (seed, batch index), so a resumed run sees what it would have seen.
        """
        if self.n_tokens < batch_size:
            raise ProgsaeError(
                f"{self.path}: {self.n_tokens} tokens, fewer than one batch of {batch_size}; use a smaller batch size"
            )
        epoch, skip = 0, start
        while True:
            order = list(range(len(self.shards)))
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
            for g in range(0, len(order), buffer_shards):
                group = order[g : g + buffer_shards]
                n_batches = sum(self.shards[i]["n_tokens"] for i in group) // batch_size
                if skip >= n_batches:
                    skip -= n_batches
                    continue
                rows = None  # drop the previous buffer before filling the next
                n_rows = sum(self.shards[i]["n_tokens"] for i in group)
                gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 10_007 + g)
                perm = torch.randperm(n_rows, generator=gen)
                rows = torch.empty(n_rows, self.d_in)
                at = 0
                for i in group:  # scatter each shard straight to its shuffled rows: one buffer, one shard at a time
                    shard = self.load_shard(i)
                    rows[perm[at : at + len(shard)]] = shard
                    at += len(shard)
                del shard
                for b in range(skip, n_batches):
                    yield rows[b * batch_size : (b + 1) * batch_size]
                skip = 0
            epoch += 1
