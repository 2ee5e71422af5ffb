"""The generic stage runner: a stage is done when its output exists, finished stages are skipped, every
stage's time is kept in timings.json; under torchrun rank 0 decides what is done.

A stage is (name, the file that marks it done, a function). `stage` runs one: on every rank when its work
is split over the ranks (extraction, training, statistics), else on rank 0 while the others wait.
`spread` deals independent stages (one SAE each) over the ranks.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import dist
from ..files import load_json, save_json


class Stages:
    def __init__(self, root: Path, timings: Path, force: bool, progress: bool):
        self.root, self.path, self.force, self.progress = root, timings, force, progress
        self.timings: dict[str, float] = load_json(timings) if timings.is_file() else {}
        self.names: list[str] = []  # this invocation's stages, in order

    def say(self, msg: str) -> None:
        if self.progress and dist.is_main():
            print(msg, flush=True)

    def _save(self, timings: dict) -> None:
        if dist.is_main():
            save_json(self.path, timings)

    def _done(self, name: str, done: Path) -> None:
        self.say(f"[{name}] done already ({done.relative_to(self.root)})")

    def stage(self, name: str, done: Path, fn, everyone: bool = False) -> None:
        """Run `fn` unless `done` exists. Under torchrun rank 0 decides; a stage split over the ranks
        (`everyone`) runs on every rank, the others on rank 0 alone while the rest wait."""
        self.names.append(name)
        if dist.agree(done.exists() and not self.force):
            return self._done(name, done)
        self.say(f"[{name}] ...")
        t = time.perf_counter()
        if everyone or dist.is_main():
            fn()
        dist.barrier()
        self.timings[name] = round(time.perf_counter() - t, 1)
        self._save(self.timings)

    def spread(self, stages: list[tuple[str, Path, object]]) -> None:
        """Stages independent of each other, dealt over the ranks under torchrun: rank 0 decides which are
        done, rank r runs every world-th of the rest, and the ranks meet once at the end."""
        self.names += [name for name, _, _ in stages]
        done = dist.broadcast(torch.tensor([int(d.exists() and not self.force) for _, d, _ in stages])).tolist()
        todo = []
        for st, finished in zip(stages, done, strict=True):
            if finished:
                self._done(st[0], st[1])
            else:
                todo.append(st)
        if todo and dist.world() > 1:
            self.say(f"{len(todo)} stages dealt over {dist.world()} ranks (rank 0's shown)")
        mine: dict[str, float] = {}
        for name, _, fn in todo[dist.rank() :: dist.world()]:
            self.say(f"[{name}] ...")
            t = time.perf_counter()
            fn()
            mine[name] = round(time.perf_counter() - t, 1)
            self._save(self.timings | mine)
        for timings in dist.gather(mine):  # the times of the stages each rank ran, once all are done
            self.timings |= timings
        self._save(self.timings)

    def seconds(self) -> dict[str, float]:
        """The time of each of this configuration's stages over every invocation (not of SAEs dropped since)."""
        return {k: v for k, v in self.timings.items() if k in self.names or k == "analyse"}
