"""The paper's study as one command: `progsae run`.

Stages (each saves its output under RUN_DIR; a rerun skips finished stages, `force` redoes them):
    extract   acts/ and acts-test/                 LM activations (train split, held-out split)
    train     saes/topk-N, topk-N_2, topk-N_4      vanilla TopK SAEs (k scaled to keep K/G constant)
              saes/matryoshka, matryoshka-sampled  Matryoshka, fixed M = {N/4, N/2, N} and sampled
    permute   stats/*.safetensors, saes/topk-*-by-{e_z2,freq}   vanilla SAEs sorted by importance
    evaluate  eval/*.json                          every SAE at the G grid, both modes: FVU curve, L0,
                                                   dead fraction, RSA, recaptured LM loss and KL
    analyse   results.json                         power laws, feature splitting, scaling fits
then report.py writes tables/, figures/ and report.html.

Pretrained SAEs (`saes`: paths or hub ids in any format progsae reads, `NAME=PATH` to name one) join
beside the trained ones, or instead of them with `train: false`: checked against the run's hook and
d_in before anything is written, copied as saes/NAME (SAELens layout, exact), then permuted by E[z²]
and by frequency and evaluated at their own granularities like the vanilla SAEs.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from .analysis import fit_power_law, latent_stats, load_stats, save_stats, sort_by_importance
from .analysis.compare import feature_splitting
from .analysis.evaluate import evaluate
from .analysis.findings import findings
from .analysis.lm_eval import directory_contexts
from .analysis.scaling import fit_scaling
from .data import ActivationDir
from .data.extract import ExtractConfig, extract
from .data.lm import load_lm
from .files import ProgsaeError, fresh_dir, load_json, replace_dir, save_json
from .formats import load as load_sae
from .sae import SAE, check_device, rescaled_k
from .train import TrainConfig, Trainer


@dataclass
class RunConfig:
    model: str = "smollm2-135m"
    layer: int = 6
    corpus: str = "kjv"
    ctx_len: int = 128
    train_tokens: int = 800_000  # activations extracted for training
    test_tokens: int = 40_000  # held-out activations for evaluation
    d_sae: int = 4096  # N, the largest dictionary
    k: int = 32  # k of the N-latent SAEs; smaller native SAEs use k G / N
    sae_tokens: int = 2_000_000  # training tokens per SAE
    batch_size: int = 4096
    matryoshka_sampled: int = 8
    grid: list[int] = field(default_factory=list)  # G values; default N/16, N/8, N/4, N/2, N
    stats_tokens: int = 200_000
    rsa_tokens: int = 1000
    lm_tokens: int = 2048
    seed: int = 0
    device: str = "cpu"  # "cuda" puts the model, SAE training and evaluation on the GPU
    minutes_estimate: float | None = None  # printed up front
    saes: list[str] = field(default_factory=list)  # pretrained SAEs: PATH or NAME=PATH (any format progsae reads)
    train: bool = True  # train the study's own SAEs; false: study only the pretrained `saes`

    def validate(self) -> RunConfig:
        for f in (
            "train_tokens",
            "test_tokens",
            "d_sae",
            "k",
            "sae_tokens",
            "batch_size",
            "stats_tokens",
            "rsa_tokens",
        ):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ProgsaeError(f"run config: {f} must be a positive integer, got {getattr(self, f)!r}")
        if self.d_sae % 4:
            raise ProgsaeError(
                f"run config: d_sae must be divisible by 4 (SAEs of N/4 and N/2 are trained), got {self.d_sae}"
            )
        if any(not 1 <= g <= self.d_sae for g in self.grid):
            raise ProgsaeError(f"run config: every G in grid must be in 1..{self.d_sae}, got {self.grid}")
        if not isinstance(self.saes, list) or not all(isinstance(p, str) and p for p in self.saes):
            raise ProgsaeError(f"run config: saes must be a list of SAE paths (PATH or NAME=PATH), got {self.saes!r}")
        if not self.train and not self.saes:
            raise ProgsaeError("run config: train is false and no saes are given; there is nothing to study")
        pretrained_names(self)  # names must be unique and not clash with the trained SAEs
        return self

    @property
    def G(self) -> list[int]:
        N = self.d_sae
        return sorted(set(self.grid or [N // 16, N // 8, N // 4, N // 2, N]) | {N // 4, N // 2, N})

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ProgsaeError(f"run config: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d).validate()


PRESETS = {
    # 2 CPU cores, ~16-20 minutes: the embedded SmolLM2-135M and the KJV corpus
    "demo": RunConfig(minutes_estimate=20),
    # the paper's setting: Gemma-2-2b layer 2, N up to 65,536; a GPU and tens of millions of tokens
    "paper": RunConfig(
        model="google/gemma-2-2b",
        layer=2,
        corpus="hf:monology/pile-uncopyrighted:train",
        ctx_len=1024,
        train_tokens=50_000_000,
        test_tokens=500_000,
        d_sae=65536,
        k=256,
        sae_tokens=50_000_000,
        lm_tokens=100_000,
        stats_tokens=2_000_000,
        device="cuda",
        minutes_estimate=None,
    ),
}


def pretrained_names(cfg: RunConfig) -> dict[str, str]:
    """The run's pretrained SAEs: name -> path (NAME=PATH, else the path's last parts made a name)."""
    out: dict[str, str] = {}
    for entry in cfg.saes:
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
        if name in out or name in trained_names(cfg) or re.search(r"-by-(e_z2|freq)$", name):
            raise ProgsaeError(
                f"run config: SAE name {name!r} is used twice or clashes with the run's own; use NAME=PATH"
            )
        out[name] = path
    return out


def base_name(name: str) -> str:
    """The SAE a permuted copy (NAME-by-e_z2, NAME-by-freq) was made from."""
    return name.removesuffix("-by-e_z2").removesuffix("-by-freq")


def sae_names(cfg: RunConfig) -> dict[str, str]:
    """The SAEs of a run: name -> role (vanilla and matryoshka are trained; pretrained are given)."""
    return {**trained_names(cfg), **dict.fromkeys(pretrained_names(cfg), "pretrained")}


def trained_names(cfg: RunConfig) -> dict[str, str]:
    if not cfg.train:
        return {}
    N = cfg.d_sae
    return {
        f"topk-{N}": "vanilla",
        f"topk-{N // 2}": "vanilla",
        f"topk-{N // 4}": "vanilla",
        "matryoshka": "matryoshka",
        "matryoshka-sampled": "matryoshka",
    }


class Run:
    def __init__(self, cfg: RunConfig, out: str | Path, force: bool = False, progress: bool = True):
        self.cfg, self.out, self.force, self.progress = cfg.validate(), Path(out), force, progress
        saved = self.out / "config.json"
        resolved = json.loads(json.dumps(asdict(cfg)))
        started = (self.out / "timings.json").is_file()  # a stage has finished: the settings are binding
        if saved.is_file() and started and not force:
            old = load_json(saved)
            defaults = json.loads(json.dumps(asdict(RunConfig())))  # fields added since: their defaults
            additive = ("minutes_estimate", "saes", "train")  # SAEs added or dropped: their own stages only
            diff = sorted(k for k in resolved if k not in additive and old.get(k, defaults[k]) != resolved[k])
            if diff:
                raise ProgsaeError(
                    f"{self.out} holds a run with other settings ({', '.join(diff)}); "
                    "use another --out, or --force to redo it"
                )
        self.resolved = resolved
        self.timings: dict[str, float] = (
            load_json(self.out / "timings.json") if (self.out / "timings.json").is_file() else {}
        )
        self._lm = None
        self.stages: list[str] = []  # this config's stages, in order

    def say(self, msg: str) -> None:
        if self.progress:
            print(msg, flush=True)

    def stage(self, name: str, done: Path, fn) -> None:
        self.stages.append(name)
        if done.exists() and not self.force:
            self.say(f"[{name}] done already ({done.relative_to(self.out)})")
            return
        self.say(f"[{name}] ...")
        t = time.perf_counter()
        fn()
        self.timings[name] = round(time.perf_counter() - t, 1)
        save_json(self.out / "timings.json", self.timings)

    def lm(self):
        if self._lm is None:
            self._lm = load_lm(self.cfg.model, self.cfg.device)
        return self._lm

    # -- stages ------------------------------------------------------------------------------------------

    def run(self) -> dict:
        c = self.cfg
        t0 = time.perf_counter()
        est = f", about {c.minutes_estimate:.0f} minutes on 2 CPU cores" if c.minutes_estimate else ""
        if self.timings and not self.force:
            est = f"; resuming ({len(self.timings)} stages already done)"
        self.say(
            f"progsae run: {c.model} layer {c.layer}, {c.train_tokens:,} training activations, "
            f"N = {c.d_sae}, k = {c.k}, {len(self.all_saes())} SAEs -> {self.out}{est}"
        )
        check_device(c.device)
        pretrained = self._check_pretrained()  # before anything is written
        save_json(self.out / "config.json", self.resolved)
        for split, tokens, name in (("train", c.train_tokens, "acts"), ("test", c.test_tokens, "acts-test")):
            self.stage(
                f"extract {split}",
                self.out / name / "manifest.json",
                lambda s=split, t=tokens, n=name: self._extract(s, t, n),
            )
        for name, role in sae_names(c).items():
            if role == "pretrained":
                self.stage(
                    f"import {name}", self.out / "saes" / name / "cfg.json", lambda n=name: self._import(n, pretrained)
                )
            else:
                self.stage(f"train {name}", self.out / "saes" / name / "cfg.json", lambda n=name: self._train(n))
        for name, role in sae_names(c).items():
            if role in ("vanilla", "pretrained"):
                self.stage(
                    f"permute {name}",
                    self.out / "saes" / f"{name}-by-freq" / "cfg.json",
                    lambda n=name: self._permute(n),
                )
        for name in self.all_saes():
            self.stage(f"evaluate {name}", self.out / "eval" / f"{name}.json", lambda n=name: self._evaluate(n))
        t_analyse = time.perf_counter()
        results = self.analyse()
        self.timings["analyse"] = round(time.perf_counter() - t_analyse, 1)
        # this config's stages over every invocation (not those of SAEs dropped since)
        results["stage_seconds"] = {k: v for k, v in self.timings.items() if k in self.stages or k == "analyse"}
        results["seconds"] = round(sum(results["stage_seconds"].values()), 1)
        results["seconds_this_invocation"] = round(time.perf_counter() - t0, 1)
        save_json(self.out / "results.json", results)
        return results

    def all_saes(self) -> list[str]:
        names = list(sae_names(self.cfg))
        return names + [
            f"{n}-by-{m}"
            for n, r in sae_names(self.cfg).items()
            if r in ("vanilla", "pretrained")
            for m in ("e_z2", "freq")
        ]

    def _check_pretrained(self) -> dict[str, SAE]:
        """Load every pretrained SAE and check it reads this run's hook: d_in, and the hook name where it says."""
        c = self.cfg
        saes = {}
        for name, path in pretrained_names(c).items():
            sae = load_sae(path)
            hook = f"blocks.{c.layer}.hook_resid_post"
            theirs = sae.cfg.metadata.get("hook_name")
            if theirs and theirs != hook:
                raise ProgsaeError(
                    f"SAE {name} ({path}) reads {theirs} but this run extracts {hook}; set layer to match, or pass "
                    "an SAE of this layer"
                )
            d_model = self.lm()[0].config.hidden_size
            if sae.cfg.d_in != d_model:
                raise ProgsaeError(
                    f"SAE {name} ({path}) has d_in={sae.cfg.d_in} but {c.model} has width {d_model}; "
                    "pass an SAE of this model"
                )
            saes[name] = sae
        return saes

    def _import(self, name: str, pretrained: dict[str, SAE]) -> None:
        """The pretrained SAE, exactly as read (its folds applied), as saes/NAME in SAELens layout."""
        sae = pretrained[name]
        src = sae.cfg.source
        sae.cfg.progsae["pretrained"] = {
            "path": pretrained_names(self.cfg)[name],
            "format": src.get("format"),
            "folded": src.get("folded", []),
        }
        tmp = fresh_dir(self.out / "saes" / f"{name}.tmp")
        sae.save(tmp, "saelens")
        replace_dir(tmp, self.out / "saes" / name)

    def _extract(self, split: str, tokens: int, name: str) -> None:
        c = self.cfg
        model, tok, model_name = self.lm()
        ec = ExtractConfig(
            model=c.model,
            layer=c.layer,
            tokens=tokens,
            corpus=c.corpus,
            ctx_len=c.ctx_len,
            split=split,
            seed=c.seed,
            device=c.device,
        )
        extract(ec, self.out / name, model, tok, model_name, progress=self.progress)

    def _train(self, name: str) -> None:
        c, N = self.cfg, self.cfg.d_sae
        acts = ActivationDir(self.out / "acts")
        kw: dict = {}
        if name == "matryoshka":
            kw["matryoshka"] = [N // 4, N // 2, N]
        elif name == "matryoshka-sampled":
            kw["matryoshka_sampled"] = c.matryoshka_sampled
        n = N if name.startswith("matryoshka") else int(name.split("-")[1])
        meta = {k: v for k, v in acts.manifest["source"].items() if k in ("model_name", "hook_name")}
        tc = TrainConfig(
            d_sae=n,
            k=rescaled_k(c.k, n, N),
            tokens=c.sae_tokens,
            device=c.device,
            batch_size=c.batch_size,
            seed=c.seed,
            metadata=meta,
            **kw,
        )
        if self.force:  # else the trainer would resume from the old run's checkpoint
            shutil.rmtree(self.out / "saes" / name, ignore_errors=True)
        Trainer(tc, acts, self.out / "saes" / name).run(self.progress)

    def _permute(self, name: str) -> None:
        sae = SAE.load(self.out / "saes" / name).to(self.cfg.device)
        acts = ActivationDir(self.out / "acts")
        stats = latent_stats(sae, acts.iter_rows(4096, self.cfg.stats_tokens))
        save_stats(self.out / "stats" / f"{name}.safetensors", stats, str(self.out / "saes" / name))
        for metric in ("e_z2", "freq"):
            sort_by_importance(sae, stats, metric).save(self.out / "saes" / f"{name}-by-{metric}")

    def _evaluate(self, name: str) -> None:
        c = self.cfg
        sae = SAE.load(self.out / "saes" / name).to(c.device)
        acts = ActivationDir(self.out / "acts-test")
        lm = (self.lm()[0], c.layer, directory_contexts(acts, c.lm_tokens)) if c.lm_tokens else None
        if sae_names(c).get(base_name(name)) == "pretrained":  # their own size: N/16 .. N
            Gs = sorted({max(1, sae.d_sae // 2**i) for i in range(5)})
        else:
            Gs = [g for g in c.G if g <= sae.d_sae]
        out = {"name": name, **evaluate(sae, acts, Gs, None, c.rsa_tokens, lm, self.progress)}
        if (self.out / "saes" / name / "history.json").is_file():
            out["history"] = load_json(self.out / "saes" / name / "history.json")
        save_json(self.out / "eval" / f"{name}.json", out)

    # -- analysis ----------------------------------------------------------------------------------------

    def analyse(self) -> dict:
        c, N = self.cfg, self.cfg.d_sae
        evals = {n: load_json(self.out / "eval" / f"{n}.json") for n in self.all_saes()}
        acts = ActivationDir(self.out / "acts")
        res: dict = {
            "config": json.loads(json.dumps(asdict(c))),
            "source": acts.manifest["source"],
            "grid": c.G,
            "saes": {},
            "power_laws": {},
            "feature_splitting": [],
            "scaling": {},
        }
        roles = sae_names(c)
        for n, e in evals.items():
            res["saes"][n] = {
                "d_sae": e["d_sae"],
                "k": e["k"],
                "architecture": e.get("architecture", "topk"),
                "role": roles[base_name(n)],
                "table": e["table"],
                "lm": e.get("lm"),
            }
        res["pretrained"] = {}
        for n, role in roles.items():
            sae = SAE.load(self.out / "saes" / n)
            if role == "pretrained":
                res["pretrained"][n] = {
                    **sae.cfg.progsae.get("pretrained", {}),
                    "architecture": sae.architecture,
                    "d_in": sae.cfg.d_in,
                    "d_sae": sae.d_sae,
                    "k": sae.k,
                }
            path = self.out / "stats" / f"{n}.safetensors"  # vanilla and pretrained SAEs: from the permute stage
            if not path.is_file() or self.force and role not in ("vanilla", "pretrained"):
                save_stats(path, latent_stats(sae, acts.iter_rows(4096, c.stats_tokens)), str(self.out / "saes" / n))
            stats = load_stats(path)
            hi = max(3, sae.d_sae // 2)  # the fit window: the top half of the ranks (the tail is noise-dominated)
            res["power_laws"][n] = {
                m: fit_power_law(stats[m].numpy(), 1, hi if m != "dec_cov_eigs" else None).to_dict()
                for m in ("e_z2", "freq", "dec_cov_eigs")
            }
        for n in (f"{p}-by-e_z2" for p in res["pretrained"]):
            curve = evals[n]["curve"]["fvu_prefix"]
            if len(curve) > 32:
                res["scaling"][n] = fit_scaling(np.arange(1, len(curve) + 1), np.asarray(curve))
        if not c.train:
            res["findings"] = []
            return res
        big = SAE.load(self.out / "saes" / f"topk-{N}-by-e_z2")
        for G in (N // 4, N // 2):
            native = SAE.load(self.out / "saes" / f"topk-{G}")
            row_t = next(r for r in evals[f"topk-{N}-by-e_z2"]["table"] if r["G"] == G)
            row_n = next(r for r in evals[f"topk-{G}"]["table"] if r["G"] == G)
            res["feature_splitting"].append(feature_splitting(big, native, row_t, row_n))
        for n in (f"topk-{N}-by-e_z2", f"topk-{N}-by-freq", "matryoshka", "matryoshka-sampled"):
            curve = evals[n]["curve"]["fvu_prefix"]
            res["scaling"][n] = fit_scaling(np.arange(1, len(curve) + 1), np.asarray(curve))
        res["findings"] = findings(res, N)
        return res
