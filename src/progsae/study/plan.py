"""The SAEs of a run as typed specs: every name a run uses is made here, and nowhere else.

A family is one SAE trained once per seed (NAME, NAME-seed1, ...) or one pretrained SAE; vanilla and
pretrained SAEs also get copies with their latents sorted by importance (NAME-by-e_z2, NAME-by-freq),
which are families of their own. The report and the findings read roles and granularities from the
plan (saved in results.json), never from the shape of a name.

    role        trained  what it is
    vanilla     yes      TopK at N latents, k (the SAE the paper permutes)
    native      yes      TopK at N/2, N/4, N/8 latents, k·G/N (the baselines a truncated SAE is held against)
    matryoshka  yes      TopK at N trained with nested losses: fixed granularities or sampled ones
    pretrained  no       a user's SAE in any format progsae reads, copied in exactly
    shrunk      no       a G-latent SAE made from a seed's vanilla SAE sorted by E[z²] (NAME-by-e_z2-METHOD-G) by
                         each method of `analysis.shrink` at G = N/8, N/4, N/2 (with shrink_tokens > 0)
A sorted copy keeps its base's role and names its `metric` (E[z²] or frequency): no retraining.

Adding a trained family is one `Family` in `FAMILIES`: its name, role, size, and the `TrainConfig`
options that make it (see `progsae.train.TrainConfig`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from ..analysis.shrink import METHODS as SHRINK_METHODS
from ..errors import ProgsaeError
from ..sae import rescaled_k

METRICS = ("e_z2", "freq")  # the importance orders every vanilla and pretrained SAE is permuted by


@dataclass(frozen=True)
class Family:
    """A trained family: name(N), role, size(N) and its training options(run config)."""

    name: Callable[[int], str]
    role: str
    size: Callable[[int], int]
    options: Callable[[object], dict] = lambda cfg: {}


FAMILIES = (
    Family(lambda N: f"topk-{N}", "vanilla", lambda N: N),
    Family(lambda N: f"topk-{N // 2}", "native", lambda N: N // 2),
    Family(lambda N: f"topk-{N // 4}", "native", lambda N: N // 4),
    Family(lambda N: f"topk-{N // 8}", "native", lambda N: N // 8),
    Family(lambda N: "matryoshka", "matryoshka", lambda N: N,
           lambda cfg: {"matryoshka": [cfg.d_sae // 4, cfg.d_sae // 2, cfg.d_sae]}),
    Family(lambda N: "matryoshka-sampled", "matryoshka", lambda N: N,
           lambda cfg: {"matryoshka_sampled": cfg.matryoshka_sampled}),
)  # fmt: skip


@dataclass(frozen=True)
class SAESpec:
    name: str  # saes/NAME, eval/NAME.json, stats/NAME.safetensors, ...
    family: str  # the name without its seed: what a table row and a figure line stand for
    role: str  # vanilla, native, matryoshka or pretrained (see the module docstring); a sorted copy: its base's
    seed: int = 0  # index among the family's seeds (the training seed is the run's seed + this)
    d_sae: int | None = None  # None for a pretrained SAE until it is read
    k: int | None = None
    train: dict = field(default_factory=dict)  # TrainConfig options beyond the run's shared ones
    base: str | None = None  # a sorted copy: the SAE it was sorted from
    metric: str | None = None  # a sorted copy: e_z2 or freq
    path: str | None = None  # pretrained: where it is read from
    method: str | None = None  # shrunk: how it was made from `base` (analysis.shrink.METHODS)

    @property
    def trained(self) -> bool:
        return self.role in ("vanilla", "native", "matryoshka") and self.metric is None

    @property
    def granularities(self) -> list[int] | None:
        """The prefixes a Matryoshka SAE was trained for: fixed ones, or None where it was trained at every G."""
        return self.train.get("matryoshka")


def seed_name(family: str, s: int) -> str:
    return family if s == 0 else f"{family}-seed{s}"


class Plan:
    """Every SAE of a run, in the order the run makes them: trained (every family once per seed), then
    pretrained, then the permuted copies of the vanilla and pretrained ones."""

    def __init__(self, cfg):
        N = cfg.d_sae
        self.N, self.text = N, cfg.source != "synthetic"  # synthetic rows have no tokens to interpret
        self.specs: list[SAESpec] = []
        if cfg.train:
            for s in range(cfg.seeds):
                for f in FAMILIES:
                    n = f.size(N)
                    self.specs.append(SAESpec(seed_name(f.name(N), s), f.name(N), f.role, s, n,
                                              rescaled_k(cfg.k, n, N), f.options(cfg)))  # fmt: skip
        for name, path in pretrained_paths(cfg.saes, {sp.name for sp in self.specs}).items():
            self.specs.append(SAESpec(name, name, "pretrained", path=path))
        for sp in list(self.specs):
            if sp.role in ("vanilla", "pretrained"):
                for m in METRICS:
                    self.specs.append(
                        SAESpec(self.sorted_copy(sp.name, m), self.sorted_copy(sp.family, m), sp.role, sp.seed, sp.d_sae, sp.k, base=sp.name, metric=m)
                    )
        for sp in list(self.specs) if cfg.shrink_tokens else []:
            if sp.trained and sp.role == "vanilla":
                base = self.sorted_copy(sp.name, "e_z2")
                for G in (N // 8, N // 4, N // 2):
                    for m in SHRINK_METHODS:
                        self.specs.append(SAESpec(self.shrunk(base, m, G), self.shrunk(self.sorted_copy(sp.family, "e_z2"), m, G),
                                                  "shrunk", sp.seed, G, rescaled_k(cfg.k, G, N), base=base, method=m))  # fmt: skip
        self._by_name = {sp.name: sp for sp in self.specs}

    def __getitem__(self, name: str) -> SAESpec:
        return self._by_name[name]

    def names(self, *roles: str) -> list[str]:
        """Every SAE of the run; with roles, the SAEs of those roles as trained or read (no sorted copies)."""
        return [sp.name for sp in self.specs if not roles or sp.role in roles and sp.metric is None]

    def sorted_copy(self, name: str, metric: str) -> str:
        return f"{name}-by-{metric}"

    def shrunk(self, base: str, method: str, G: int) -> str:
        return f"{base}-{method}-{G}"

    def families(self) -> dict[str, list[str]]:
        """family -> its SAEs, one per seed, in seed order."""
        out: dict[str, list[str]] = {}
        for sp in self.specs:
            out.setdefault(sp.family, []).append(sp.name)
        return out

    def vanilla(self, metric: str | None = None) -> str | None:
        """The first seed's vanilla SAE (sorted by `metric`), the SAE the paper's comparisons are about."""
        v = next((sp.name for sp in self.specs if sp.trained and sp.role == "vanilla" and sp.seed == 0), None)
        return v if v is None or metric is None else self.sorted_copy(v, metric)

    def interp(self) -> list[str]:
        """The SAEs whose latents are recorded, browsed and auto-interpreted (first seed, latents in rank
        order): the vanilla SAE sorted by E[z²], every Matryoshka family, each pretrained SAE sorted by E[z²];
        none where the activations carry no text."""
        if not self.text:
            return []
        trained = [self.vanilla("e_z2")] if self.vanilla() else []
        trained += [sp.name for sp in self.specs if sp.role == "matryoshka" and sp.seed == 0]
        return trained + [self.sorted_copy(n, "e_z2") for n in self.names("pretrained")]

    def describe(self) -> dict:
        """What results.json records of each family: role, size, k, how it was made."""
        out = {}
        for sp in self.specs:
            if sp.seed == 0:
                out[sp.family] = {"role": sp.role, "base": sp.base and self[sp.base].family, "metric": sp.metric,
                                  "granularities": sp.granularities, "train": sp.train, "method": sp.method}  # fmt: skip
        return out


def pretrained_paths(entries: list[str], taken: set[str]) -> dict[str, str]:
    """The run's pretrained SAEs: name -> path (NAME=PATH, else the path's last parts made a name)."""
    out: dict[str, str] = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep:
            path = entry
            parts = [p for p in re.split(r"[/\\]", entry.removesuffix("/params.npz")) if p not in ("", ".", "..")]
            name = re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(parts[-2:])).strip("-.") or "sae"
            base, i = name, 2
            while name in out:
                name, i = f"{base}-{i}", i + 1
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
            raise ProgsaeError(f"run config: SAE name {name!r} in saes: use letters, digits, '_', '.', '-' (NAME=PATH)")
        if name in out or name in taken or re.search(rf"-by-({'|'.join(METRICS)})$|-seed\d+$|-({'|'.join(SHRINK_METHODS)})-\d+$", name):
            raise ProgsaeError(
                f"run config: SAE name {name!r} is used twice or clashes with the run's own; use NAME=PATH"
            )
        out[name] = path
    return out
