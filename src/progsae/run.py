"""The paper's study as one command: `progsae run`.

Stages (each saves its output under RUN_DIR; a rerun skips finished stages, `force` redoes them):
    extract   acts/ and acts-test/                 LM activations (train split, held-out split)
    train     saes/topk-N, topk-N_2, topk-N_4      vanilla TopK SAEs (k scaled to keep K/G constant)
              saes/matryoshka, matryoshka-sampled  Matryoshka, fixed M = {N/4, N/2, N} and sampled
    permute   stats/*.safetensors, saes/topk-*-by-{e_z2,freq}   vanilla SAEs sorted by importance
    evaluate  eval/*.json                          every SAE at the G grid, both modes: FVU curve, L0,
                                                   dead fraction, RSA, recaptured LM loss and KL
    interp    stats/NAME.records.safetensors,      latent records and proxies, auto-interp scores by rank
              interp/NAME.json, browse/NAME/       band, the feature browser (permuted vanilla, Matryoshka,
              interp/judge-check.json              pretrained by E[z²]); the judge on known-word latents
    analyse   results.json                         power laws, feature splitting, scaling fits, interpretability
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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import dist
from .analysis import fit_power_law, latent_stats, load_stats, save_stats, sort_by_importance
from .analysis.aggregate import Aggregate
from .analysis.compare import feature_splitting
from .analysis.evaluate import evaluate
from .analysis.findings import findings
from .analysis.lm_eval import LMSplice, directory_contexts
from .analysis.outliers import FLAG_SHARE, flagged_latents, norm_profile, robust_window
from .analysis.scaling import fit_scaling
from .config import from_dict, opt
from .data import ActivationDir, write_activations
from .data.activations import DTYPES
from .data.extract import ExtractConfig, extract
from .data.lm import check_layer, load_lm
from .data.stream import LMSource, StreamConfig
from .errors import ProgsaeError, check_device
from .files import load_json, save_json, sweep_leftovers
from .formats import load_sae, save_sae
from .interp import bands as interpretability
from .interp.autointerp import ChatJudge
from .interp.llm import ChatClient
from .interp.local import LocalJudge
from .interp.proxies import proxies
from .interp.records import TextRows, latent_records, load_records, save_records
from .interp.study import judge_check, score_latents, stratified_latents
from .report.browser import write_site
from .sae import SAE, rescaled_k
from .train import PRECISIONS, TrainConfig, Trainer, train_together


@dataclass
class RunConfig:
    model: str = opt("smollm2-135m", "the language model: smollm2-135m, gemma3-270m, a transformers id or a directory")
    layer: int = opt(6, "decoder layer L whose residual stream the SAEs read")
    corpus: str = opt("kjv", "kjv, a .txt/.jsonl/.parquet file or directory, or hf:NAME[:CONFIG]:SPLIT")
    ctx_len: int = opt(128, "tokens per context, BOS first")
    source: str = opt("cached", "the SAEs train on: cached (train_tokens extracted to acts/ first) or lm (the model run on the fly, once per seed for all SAEs; acts/ then feeds the statistics only)")
    buffer_tokens: int = opt(262_144, "with source lm: activations shuffled together (memory: x d_in x 4 bytes, on the device)")
    train_tokens: int = opt(800_000, "activations extracted from the training split (source cached: what the SAEs train on)")
    acts_dtype: str = opt("float32", "extracted activations on disk: float32, or bfloat16 (half the disk; read as float32)")
    test_tokens: int = opt(40_000, "held-out activations for evaluation")
    d_sae: int = opt(4096, "N, the largest dictionary")
    k: int = opt(32, "k of the N-latent SAEs; smaller native SAEs use k G / N")
    sae_tokens: int = opt(2_000_000, "training tokens per SAE")
    batch_size: int = opt(4096, "tokens per training step")
    precision: str = opt("fp32", "of the SAEs' encoder GEMM and top-k in training: fp32, bf16 or auto (see progsae train --help)")
    matryoshka_sampled: int = opt(8, "granularities drawn per step by the sampled Matryoshka SAE")
    grid: list[int] = opt([], "G values (default N/16, N/8, N/4, N/2, N)")
    stats_tokens: int = opt(200_000, "held-out tokens of the importance statistics")
    rsa_tokens: int = opt(1000, "token sample of RSA")
    lm_tokens: int = opt(2048, "tokens of the recaptured LM loss")
    seed: int = opt(0, "the first seed")
    seeds: int = opt(1, "every trained SAE is trained this many times (seed, seed+1, ...): intervals across seeds")
    outliers: str = opt("keep", "huge-norm tokens: keep (train and evaluate on all) or exclude")
    outlier_quantile: float = opt(0.99, "a token is an outlier above this quantile of the training norms")
    bootstrap: int = opt(1000, "bootstrap replicates of every interval")
    device: str = opt("cpu", "cuda puts the model, SAE training and evaluation on the GPU")
    minutes_estimate: float | None = opt(None, "printed up front")
    interp_tokens: int = opt(40_000, "held-out tokens of the latent records, the browsers and the auto-interp contexts")
    interp_latents: int = opt(3, "latents auto-interpreted per rank band of each studied SAE (0: records and proxies only)")
    judge: str = opt("smollm2-135m", "the auto-interp judge: a local model, or the endpoint's model with judge_url")
    judge_url: str = opt("", "an OpenAI-compatible endpoint (key from PROGSAE_LLM_API_KEY or OPENAI_API_KEY)")
    saes: list[str] = opt([], "a pretrained SAE to study: PATH or NAME=PATH in any format progsae reads (repeatable)", flag="sae")
    train: bool = opt(True, "train the study's own SAEs (--no-train: study only the pretrained SAEs)")

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
            "seeds",
            "bootstrap",
            "interp_tokens",
            "matryoshka_sampled",
            "buffer_tokens",
        ):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ProgsaeError(f"run config: {f} must be a positive integer, got {getattr(self, f)!r}")
        for f in ("layer", "lm_tokens", "seed"):
            if getattr(self, f) < 0:
                raise ProgsaeError(f"run config: {f} must be >= 0, got {getattr(self, f)!r}")
        if self.ctx_len < 2:
            raise ProgsaeError(f"run config: ctx_len must be at least 2 (BOS and one token), got {self.ctx_len}")
        if self.k > self.d_sae:
            raise ProgsaeError(f"run config: k={self.k} exceeds d_sae={self.d_sae}")
        if self.d_sae % 8:
            raise ProgsaeError(
                f"run config: d_sae must be divisible by 8 (SAEs of N/8, N/4 and N/2 are trained), got {self.d_sae}"
            )
        if not isinstance(self.interp_latents, int) or self.interp_latents < 0:
            raise ProgsaeError(f"run config: interp_latents must be an integer >= 0, got {self.interp_latents!r}")
        if not isinstance(self.judge, str) or not self.judge:
            raise ProgsaeError(f"run config: judge must name a model, got {self.judge!r}")
        if not isinstance(self.judge_url, str) or self.judge_url and not self.judge_url.startswith(("http://", "https://")):
            raise ProgsaeError(f"run config: judge_url must be empty or an http(s) URL, got {self.judge_url!r}")
        if self.outliers not in ("keep", "exclude"):
            raise ProgsaeError(f"run config: outliers must be 'keep' or 'exclude', got {self.outliers!r}")
        if self.source not in ("cached", "lm"):
            raise ProgsaeError(f"run config: source must be 'cached' or 'lm', got {self.source!r}")
        if self.source == "lm" and self.outliers == "exclude":
            raise ProgsaeError(
                "run config: outliers 'exclude' needs source 'cached' (SAEs trained from the model see every token); "
                "set one of them"
            )
        if self.precision not in PRECISIONS:
            raise ProgsaeError(f"run config: precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.acts_dtype not in DTYPES:
            raise ProgsaeError(f"run config: acts_dtype must be 'float32' or 'bfloat16', got {self.acts_dtype!r}")
        if not 0.5 <= self.outlier_quantile < 1:
            raise ProgsaeError(f"run config: outlier_quantile must be in [0.5, 1), got {self.outlier_quantile!r}")
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
        return from_dict(cls, d, "run config")


INTERP_FIELDS = ("interp_tokens", "interp_latents", "judge", "judge_url")


def interp_edges(cfg: RunConfig, n: int) -> list[int]:
    """The rank bands of an n-latent SAE: the run's granularities up to n (a pretrained SAE: n/16 .. n)."""
    grid = cfg.G if n == cfg.d_sae else [max(1, n // 2**i) for i in range(5)]
    return sorted({g for g in grid if g <= n} | {n})


PRESETS = {
    # 2 CPU cores, 26 minutes measured where bf16 is fast (auto trains in bf16; longer in fp32): the embedded
    # SmolLM2-135M and the KJV corpus; two seeds; interpretability (records, browsers, the local judge on 15
    # latents per SAE) ~4 minutes
    "demo": RunConfig(seeds=2, precision="auto", minutes_estimate=27),
    # the paper's setting: Gemma-2-2b layer 2, N up to 65,536; GPUs and tens of millions of tokens. The SAEs
    # train straight from the model (50M tokens of float32 at d = 2304 would be 460 GB of shards); 2M tokens
    # are extracted, in bfloat16 (9 GB), for the outlier profile and the importance statistics
    "paper": RunConfig(
        model="google/gemma-2-2b",
        layer=2,
        corpus="hf:monology/pile-uncopyrighted:train",
        ctx_len=1024,
        source="lm",
        precision="auto",
        buffer_tokens=1_048_576,
        acts_dtype="bfloat16",
        train_tokens=2_000_000,
        test_tokens=500_000,
        d_sae=65536,
        k=256,
        sae_tokens=50_000_000,
        lm_tokens=100_000,
        stats_tokens=2_000_000,
        device="cuda",
        seeds=3,
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
        if name in out or name in trained_names(cfg) or re.search(r"-by-(e_z2|freq)$|-seed\d+$", name):
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
    """name -> role of the SAEs the run trains: every family once per seed (NAME, NAME-seed1, ...)."""
    if not cfg.train:
        return {}
    N = cfg.d_sae
    families = {f"topk-{N}": "vanilla", **{f"topk-{N // m}": "native" for m in (2, 4, 8)}}
    families |= {"matryoshka": "matryoshka", "matryoshka-sampled": "matryoshka"}
    return {seed_name(f, s): role for s in range(cfg.seeds) for f, role in families.items()}


def seed_name(family: str, s: int) -> str:
    return family if s == 0 else f"{family}-seed{s}"


def family(name: str) -> tuple[str, int]:
    """(family, seed index) of an SAE name: topk-4096-seed1-by-e_z2 -> (topk-4096-by-e_z2, 1)."""
    m = re.fullmatch(r"(.*?)-seed(\d+)(-by-(?:e_z2|freq))?", name)
    return (m[1] + (m[3] or ""), int(m[2])) if m else (name, 0)


class Run:
    def __init__(self, cfg: RunConfig, out: str | Path, force: bool = False, progress: bool = True):
        self.cfg, self.out, self.force, self.progress = cfg.validate(), Path(out), force, progress
        saved = self.out / "config.json"
        resolved = json.loads(json.dumps(asdict(cfg)))
        started = (self.out / "timings.json").is_file()  # a stage has finished: the settings are binding
        if saved.is_file() and started and not force:
            old = load_json(saved)
            defaults = json.loads(json.dumps(asdict(RunConfig())))  # fields added since: their defaults
            # SAEs added or dropped, another judge: their own stages only
            additive = ("minutes_estimate", "saes", "train", *INTERP_FIELDS)
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
        self._lm = self._judge = self._stream = None
        self._splice: LMSplice | None = None  # the recaptured loss's model and contexts, with their ablations
        self.device = cfg.device
        self.stages: list[str] = []  # this config's stages, in order

    def say(self, msg: str) -> None:
        if self.progress and dist.is_main():
            print(msg, flush=True)

    def stage(self, name: str, done: Path, fn, everyone: bool = False) -> None:
        """Run `fn` unless `done` exists. Under torchrun rank 0 decides; a stage split over the ranks
        (`everyone`: extraction, training, statistics) runs on every rank, the others on rank 0 alone
        while the rest wait."""
        self.stages.append(name)
        if dist.agree(done.exists() and not self.force):
            self.say(f"[{name}] done already ({done.relative_to(self.out)})")
            return
        self.say(f"[{name}] ...")
        t = time.perf_counter()
        if everyone or dist.is_main():
            fn()
        dist.barrier()
        self.timings[name] = round(time.perf_counter() - t, 1)
        if dist.is_main():
            save_json(self.out / "timings.json", self.timings)

    def spread(self, stages: list[tuple[str, Path, object]]) -> None:
        """Stages independent of each other (one SAE each), dealt over the ranks under torchrun: rank 0
        decides which are done, rank r runs every world-th of the rest, and the ranks meet once at the end."""
        self.stages += [name for name, _, _ in stages]
        done = dist.broadcast(torch.tensor([int(d.exists() and not self.force) for _, d, _ in stages]))
        for (name, d, _), finished in zip(stages, done.tolist(), strict=True):
            if finished:
                self.say(f"[{name}] done already ({d.relative_to(self.out)})")
        todo = [st for st, finished in zip(stages, done.tolist(), strict=True) if not finished]
        if todo and dist.world() > 1:
            self.say(f"{len(todo)} stages dealt over {dist.world()} ranks (rank 0's shown)")
        mine: dict[str, float] = {}
        for name, _, fn in todo[dist.rank() :: dist.world()]:
            self.say(f"[{name}] ...")
            t = time.perf_counter()
            fn()
            mine[name] = round(time.perf_counter() - t, 1)
            if dist.is_main():
                save_json(self.out / "timings.json", self.timings | mine)
        for timings in dist.gather(mine):  # the times of the stages each rank ran, once all are done
            self.timings |= timings
        if dist.is_main():
            save_json(self.out / "timings.json", self.timings)

    def lm(self):
        if self._lm is None:
            self._lm = load_lm(self.cfg.model, self.device)
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
        self.device = check_device(dist.init(c.device))  # under torchrun: cuda:LOCAL_RANK
        self.progress = self.progress and dist.is_main()  # rank 0 alone shows progress
        check_layer(self.lm()[0], c.layer)  # before anything is written
        pretrained = self._check_pretrained()
        if dist.is_main():
            sweep_leftovers(self.out)  # a killed invocation's half-written files
            save_json(self.out / "config.json", self.resolved)
        for split, tokens, name in (("train", c.train_tokens, "acts"), ("test", c.test_tokens, "acts-test")):
            self.stage(
                f"extract {split}",
                self.out / name / "manifest.json",
                lambda s=split, t=tokens, n=name: self._extract(s, t, n),
                everyone=True,
            )
        self.stage("outliers", self.out / "outliers.json", self._outliers)
        if c.outliers == "exclude":  # SAEs train and are measured on the tokens at or below the threshold
            for name in ("acts", "acts-test"):
                self.stage(
                    f"exclude outliers {name}",
                    self.out / f"{name}-typical" / "manifest.json",
                    lambda n=name: self._exclude(n),
                )
        for name, role in sae_names(c).items():
            if role == "pretrained":
                self.stage(
                    f"import {name}", self.out / "saes" / name / "cfg.json", lambda n=name: self._import(n, pretrained)
                )
            elif c.source == "cached":
                self.stage(
                    f"train {name}", self.out / "saes" / name / "cfg.json", lambda n=name: self._train([n]), everyone=True
                )
        for s in range(c.seeds if c.source == "lm" and c.train else 0):  # one pass of the model per seed
            names = [n for n in trained_names(c) if family(n)[1] == s]
            self.stage(
                f"train seed {c.seed + s} from the model",
                self.out / "saes" / names[-1] / "cfg.json",
                lambda ns=names: self._train(ns),
                everyone=True,
            )
        for name, role in sae_names(c).items():
            if role in ("vanilla", "pretrained"):
                self.stage(
                    f"permute {name}",
                    self.out / "saes" / f"{name}-by-freq" / "cfg.json",
                    lambda n=name: self._permute(n),
                    everyone=True,
                )
        self.spread(
            [(f"evaluate {n}", self.out / "eval" / f"{n}.json", lambda n=n: self._evaluate(n)) for n in self.all_saes()]
        )
        settings = {k: self.resolved[k] for k in INTERP_FIELDS}
        for name in self.interp_saes():
            done = self.out / "interp" / f"{name}.json"
            if done.is_file() and load_json(done).get("settings") != settings:
                done.unlink()  # other interp settings: redo this stage only (the LLM cache keeps every answer)
            self.stage(f"interp {name}", done, lambda n=name: self._interp(n, settings))
        if c.interp_latents and self.interp_saes():
            done = self.out / "interp" / "judge-check.json"
            if done.is_file() and load_json(done).get("settings") != settings:
                done.unlink()
            self.stage("judge check", done, lambda: self._judge_check(settings))
        if not dist.is_main():
            return {}
        t_analyse = time.perf_counter()
        results = self.analyse()
        self.timings["analyse"] = round(time.perf_counter() - t_analyse, 1)
        # this config's stages over every invocation (not those of SAEs dropped since)
        results["stage_seconds"] = {k: v for k, v in self.timings.items() if k in self.stages or k == "analyse"}
        results["seconds"] = round(sum(results["stage_seconds"].values()), 1)
        results["seconds_this_invocation"] = round(time.perf_counter() - t0, 1)
        save_json(self.out / "results.json", results)
        return results

    def acts(self, split: str = "acts") -> ActivationDir:
        """The activations SAEs see: all of them, or with outliers excluded (`outliers: exclude`)."""
        return ActivationDir(self.out / (f"{split}-typical" if self.cfg.outliers == "exclude" else split))

    def threshold(self) -> float:
        return load_json(self.out / "outliers.json")["threshold"]

    def _outliers(self) -> None:
        """The norm distribution of the training activations and the outlier threshold (outliers.json)."""
        prof = norm_profile(ActivationDir(self.out / "acts"), self.cfg.outlier_quantile, self.cfg.stats_tokens)
        if "outlier_tokens" in prof:
            tok = self.lm()[1]
            for row in prof["outlier_tokens"]:
                row["token"] = tok.decode([row["value"]])
        save_json(self.out / "outliers.json", prof)

    def _exclude(self, split: str) -> None:
        src, thr = ActivationDir(self.out / split), self.threshold()
        rows = (x[x.norm(dim=1) <= thr] for x in src.iter_rows(8192))
        source = {**src.manifest["source"], "excluded": {"norm_above": thr, "quantile": self.cfg.outlier_quantile}}
        write_activations(self.out / f"{split}-typical", rows, src.d_in, source, dtype=src.manifest.get("dtype", "float32"))

    def all_saes(self) -> list[str]:
        names = list(sae_names(self.cfg))
        return names + [
            f"{n}-by-{m}"
            for n, r in sae_names(self.cfg).items()
            if r in ("vanilla", "pretrained")
            for m in ("e_z2", "freq")
        ]

    def interp_saes(self) -> list[str]:
        """The SAEs whose latents are recorded, browsed and auto-interpreted (first seed): latents in rank order."""
        N = self.cfg.d_sae
        trained = [f"topk-{N}-by-e_z2", "matryoshka", "matryoshka-sampled"] if self.cfg.train else []
        return trained + [f"{n}-by-e_z2" for n, r in sae_names(self.cfg).items() if r == "pretrained"]

    def judge(self):
        if self._judge is None:
            c, cache = self.cfg, self.out / "llm-cache"
            if c.judge_url:
                self._judge = ChatJudge(ChatClient(c.judge_url, c.judge, cache_dir=cache))
            else:
                self._judge = LocalJudge(c.judge, cache_dir=cache)
        return self._judge

    def _interp(self, name: str, settings: dict) -> None:
        """Latent records and proxies (stats/NAME.records.safetensors), auto-interp scores of latents sampled
        from every rank band (interp/NAME.json) and the feature browser (browse/NAME/)."""
        c = self.cfg
        sae = self.load(name)
        acts = ActivationDir(self.out / "acts-test")
        model, tok, _ = self.lm()
        rows = TextRows(acts, c.interp_tokens, sae, tok)
        rec = latent_records(sae, rows.x.split(4096))
        prox = proxies(sae, rec, acts, rows.contexts, model.get_output_embeddings().weight.detach().cpu())
        save_records(self.out / "stats" / f"{name}.records.safetensors", {**rec, **prox}, sae, str(acts.path))
        edges = interp_edges(c, sae.d_sae)
        latents = stratified_latents(list(range(sae.d_sae)), rec["freq"] > 0, edges, c.interp_latents)
        judge = self.judge() if latents else None
        scores = score_latents(judge, rows, rec, latents, self.progress) if judge else []
        out = {"sae": name, "judge": judge.name if judge else None, "settings": settings, "edges": edges,
               "tokens": rows.n, "scores": scores}  # fmt: skip
        write_site(sae, rows, rec, prox, self.out / "browse" / name, f"{rows.n:,} held-out tokens of this run", out)
        save_json(self.out / "interp" / f"{name}.json", out)

    def _judge_check(self, settings: dict) -> None:
        rows = TextRows(ActivationDir(self.out / "acts-test"), self.cfg.interp_tokens, None, self.lm()[1])
        save_json(self.out / "interp" / "judge-check.json", {**judge_check(self.judge(), rows), "settings": settings})

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
        save_sae(sae, self.out / "saes" / name, "saelens")

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
            dtype=c.acts_dtype,
        )
        extract(ec, self.out / name, model, tok, model_name, progress=self.progress)

    def _train(self, names: list[str]) -> None:
        """Train the SAEs `names` of one seed: from acts/ (source cached, one at a time), or together from
        one pass of the model (source lm), data-parallel under torchrun either way."""
        c, N = self.cfg, self.cfg.d_sae
        source = self.acts() if c.source == "cached" else self.stream()
        info = source.manifest["source"] if c.source == "cached" else source.describe()
        meta = {k: v for k, v in info.items() if k in ("model_name", "hook_name")}
        trainers = []
        for name in names:
            fam, s = family(name)
            kw: dict = {}
            if fam == "matryoshka":
                kw["matryoshka"] = [N // 4, N // 2, N]
            elif fam == "matryoshka-sampled":
                kw["matryoshka_sampled"] = c.matryoshka_sampled
            n = N if fam.startswith("matryoshka") else int(fam.split("-")[1])
            tc = TrainConfig(
                d_sae=n,
                k=rescaled_k(c.k, n, N),
                tokens=c.sae_tokens,
                device=c.device,
                batch_size=c.batch_size,
                precision=c.precision,
                seed=c.seed + s,
                log_every=max(1, c.sae_tokens // c.batch_size // 40),  # ~40 points: enough for the convergence slope
                metadata=meta,
                **kw,
            )
            if self.force and dist.is_main():  # else the trainer would resume from the old run's checkpoint
                shutil.rmtree(self.out / "saes" / name, ignore_errors=True)
            dist.barrier()
            trainers.append(Trainer(tc, source, self.out / "saes" / name))
        train_together(trainers, self.progress)

    def stream(self) -> LMSource:
        """The model run on the fly over the training split (source lm), built once (every seed draws its own
        batches from it); its description in stream.json."""
        if self._stream is None:
            c = self.cfg
            sc = StreamConfig(c.model, c.layer, c.corpus, c.ctx_len, split_seed=c.seed, buffer_tokens=c.buffer_tokens)
            self._stream = LMSource(sc, self.device, *self.lm())
            if dist.is_main():
                save_json(self.out / "stream.json", {**self._stream.describe(), "epoch_tokens": self._stream.epoch_tokens()})
        return self._stream

    def load(self, name: str) -> SAE:
        """An SAE of this run, encoding in the precision it was trained in (pretrained ones: fp32)."""
        sae = load_sae(self.out / "saes" / name).to(self.device)
        sae.precision = trained_precision(sae)
        return sae

    def _permute(self, name: str) -> None:
        sae = self.load(name)
        stats = self._stats(sae, split=True)
        if dist.is_main():
            save_stats(self.out / "stats" / f"{name}.safetensors", stats, str(self.out / "saes" / name))
            for metric in ("e_z2", "freq"):
                save_sae(sort_by_importance(sae, stats, metric), self.out / "saes" / f"{name}-by-{metric}")

    def _stats(self, sae: SAE, split: bool = False) -> dict:
        """Importance statistics on the training activations (with each latent's E[z²] on outlier tokens);
        `split`: every rank takes its share of the batches and the sums are reduced over the ranks."""
        rows = ActivationDir(self.out / "acts").iter_rows(4096, self.cfg.stats_tokens)
        if split:
            rows = (x[dist.rank() :: dist.world()] for x in rows)
        if self.cfg.outliers == "exclude":
            rows = (x[x.norm(dim=1) <= self.threshold()] for x in rows)
        return latent_stats(sae, rows, outlier_norm=self.threshold(), reduce=split)

    def _evaluate(self, name: str) -> None:
        c = self.cfg
        sae = self.load(name)
        acts = self.acts("acts-test")
        contexts = directory_contexts(ActivationDir(self.out / "acts-test"), c.lm_tokens) if c.lm_tokens else None
        if c.lm_tokens and self._splice is None:  # one per run: the ablations run once for every SAE
            self._splice = LMSplice(self.lm()[0], c.layer, contexts)
        if sae_names(c).get(base_name(name)) == "pretrained":  # their own size: N/16 .. N
            Gs = sorted({max(1, sae.d_sae // 2**i) for i in range(5)})
        else:
            Gs = [g for g in c.G if g <= sae.d_sae]
        out = {"name": name, **evaluate(sae, acts, Gs, rsa_tokens=c.rsa_tokens, lm=self._splice, progress=self.progress,
                                        n_boot=c.bootstrap)}
        if (self.out / "saes" / name / "history.json").is_file():
            out["history"] = load_json(self.out / "saes" / name / "history.json")
        save_json(self.out / "eval" / f"{name}.json", out)

    # -- analysis ----------------------------------------------------------------------------------------

    def analyse(self) -> dict:
        c, N = self.cfg, self.cfg.d_sae
        evals = {n: load_json(self.out / "eval" / f"{n}.json") for n in self.all_saes()}
        acts = ActivationDir(self.out / "acts")
        roles = sae_names(c)
        families: dict[str, list[str]] = {}
        for n in self.all_saes():
            families.setdefault(family(n)[0], []).append(n)
        agg = Aggregate(evals, families, c.bootstrap, c.seed)
        res: dict = {
            "config": json.loads(json.dumps(asdict(c))),
            "source": acts.manifest["source"],
            "grid": c.G,
            "outliers": {**load_json(self.out / "outliers.json"), "handling": c.outliers},
            "saes": {},
            "families": {},
            "power_laws": {},
            "feature_splitting": [],
            "scaling": {},
            "training": {},
        }
        for n, e in evals.items():
            res["saes"][n] = {
                "d_sae": e["d_sae"],
                "k": e["k"],
                "architecture": e.get("architecture", "topk"),
                "role": roles[base_name(n)],
                "family": family(n)[0],
                "seed": family(n)[1],
                "table": e["table"],
                "lm": {k: v for k, v in e["lm"].items() if not k.startswith("per_context")} if e.get("lm") else None,
            }
        for fam, names in families.items():
            res["families"][fam] = {
                **{k: res["saes"][names[0]][k] for k in ("d_sae", "k", "architecture", "role")},
                "seeds": names,
                "table": agg.table(fam),
            }
        curves = {  # each family's prefix curve, averaged over seeds
            fam: {k: np.mean([evals[n]["curve"][k] for n in names], 0) for k in ("fvu_prefix", "l0")}
            for fam, names in families.items()
        }
        res["pretrained"] = {}
        if c.source == "lm" and c.train:  # the stream the SAEs trained on (source cached: acts/)
            res["stream"] = load_json(self.out / "stream.json")
        pool = res["stream"]["epoch_tokens"] if "stream" in res else c.train_tokens  # tokens of one pass
        for n, role in roles.items():
            sae = self.load(n)
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
                save_stats(path, self._stats(sae), str(self.out / "saes" / n))
            res["power_laws"][n] = power_laws(load_stats(path), sae.d_sae)
            if (self.out / "saes" / n / "history.json").is_file():
                res["training"][n] = {
                    **convergence(load_json(self.out / "saes" / n / "history.json"), pool),
                    "precision": sae.precision,
                }
        res["outliers"]["latent_threshold_share"] = FLAG_SHARE
        for fam in families:
            if fam.endswith("-by-e_z2") or fam.endswith("-by-freq") or fam.startswith("matryoshka"):
                G = np.arange(1, len(curves[fam]["fvu_prefix"]) + 1)
                if len(G) > 32:
                    res["scaling"][fam] = fit_scaling(G, curves[fam]["fvu_prefix"], lo=16)
        res["interpretability"] = self._interpretability()
        if not c.train:
            res["findings"] = []
            return res
        big = load_sae(self.out / "saes" / f"topk-{N}-by-e_z2")
        for G in (N // 8, N // 4, N // 2):
            native = load_sae(self.out / "saes" / f"topk-{G}")
            row_t = next(r for r in evals[f"topk-{N}-by-e_z2"]["table"] if r["G"] == G)
            row_n = next(r for r in evals[f"topk-{G}"]["table"] if r["G"] == G)
            res["feature_splitting"].append(feature_splitting(big, native, row_t, row_n))
        sizes = [N // 8, N // 4, N // 2, N]  # scaling over N: each native SAE at its own size
        fvus = [res["families"][f"topk-{n}"]["table"][-1]["fvu_prefix"] for n in sizes]
        res["scaling_over_N"] = {"N": sizes, "fvu": fvus, **fit_scaling(sizes, fvus)}
        res["_curves"] = curves
        res["findings"] = findings(agg, res, N)
        study, check = res["interpretability"]["saes"], res["interpretability"]["check"]
        if check:
            res["findings"] += interpretability.findings(
                study, f"topk-{N}-by-e_z2", ["matryoshka", "matryoshka-sampled"], N, check, c.bootstrap, c.seed
            )
        del res["_curves"]
        return res

    def _interpretability(self) -> dict:
        """Per studied SAE: scores and proxies by rank band, the browser's path; the judge and its check."""
        c = self.cfg
        out: dict = {"judge": None, "check": None, "saes": {}}
        if (self.out / "interp" / "judge-check.json").is_file():
            out["check"] = load_json(self.out / "interp" / "judge-check.json")
            out["judge"] = out["check"]["judge"]
        for name in self.interp_saes():
            it = load_json(self.out / "interp" / f"{name}.json")
            rec = load_records(self.out / "stats" / f"{name}.records.safetensors")
            prox = {"live": (rec["freq"] > 0).numpy(), "token_entropy": rec["token_entropy"].numpy(),
                    "lens_agreement": rec["lens_agreement"].numpy()}  # fmt: skip
            out["saes"][name] = {
                "scores": it["scores"],
                "bands": interpretability.bands(it["scores"], prox, it["edges"], c.bootstrap, c.seed),
                "browser": f"browse/{name}/index.html",
                "tokens": it["tokens"],
            }
        return out


def trained_precision(sae: SAE) -> str:
    """The precision an SAE was trained in (its training metadata), fp32 for any other."""
    return sae.cfg.progsae.get("training", {}).get("precision", "fp32")


def power_laws(stats: dict, n: int) -> dict:
    """Per statistic, the fit over ranks 1..N/2 ("full") and over the robust window ("robust": after the
    outlier latents, see analysis/outliers.py); and the outlier latents themselves."""
    hi = max(3, n // 2)  # the top half of the ranks (the tail is noise-dominated)
    e_z2 = stats["e_z2"].numpy()
    flagged = flagged_latents(e_z2, stats["e_z2_outlier"].numpy()) if "e_z2_outlier" in stats else np.array([], int)
    lo = robust_window(e_z2, flagged, hi)
    out = {"outlier_latents": {"count": int(len(flagged)), "top": flagged[:20].tolist(), "robust_lo": lo}}
    if "e_z2_outlier" in stats:
        out["outlier_latents"]["share_of_e_z2"] = float(stats["e_z2_outlier"][flagged].sum() / stats["e_z2"].sum())
    for m in ("e_z2", "freq", "dec_cov_eigs"):
        # the covariance of n decoder rows has rank at most n - 1: the rest are rounding noise, not a spectrum
        v, top = stats[m].numpy(), min(n - 1, len(stats[m])) if m == "dec_cov_eigs" else hi
        full = fit_power_law(v, 1, top).to_dict()
        out[m] = {"full": full, "robust": fit_power_law(v, lo, top).to_dict() if m != "dec_cov_eigs" else full}
    return out


def convergence(history: list[dict], pool: int) -> dict:
    """How far training got: the slope of the batch FVU against log2(tokens) over the second half of training
    (the FVU change per doubling of tokens; a half, not less, so batch noise does not decide it) and whether it
    is below the stated criterion."""
    h = [p for p in history if p.get("fvu") is not None]
    tail = h[-max(3, len(h) // 2) :]
    t, f = np.log2([p["tokens"] for p in tail]), np.array([p["fvu"] for p in tail])
    slope = float(np.polyfit(t, f, 1)[0]) if len(tail) >= 3 and np.ptp(t) > 0 else None
    final = float(np.mean(f[-3:]))
    return {
        "tokens": h[-1]["tokens"] if h else 0,
        "passes": round((h[-1]["tokens"] if h else 0) / pool, 1),
        "final_fvu": final,
        "fvu_per_doubling": slope,
        "converged": slope is not None and -slope < CONVERGED * final,
    }


CONVERGED = 0.01  # converged: one more doubling of the tokens is projected to lower FVU by < 1% of its value
