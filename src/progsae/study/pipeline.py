"""The stage graph of `progsae run`; each stage a few lines calling the library.

    extract    acts/ and acts-test/             LM activations (train split, held-out split); source synthetic: the
                                                generator's rows, acts-test/ with its true codes (truth.safetensors)
    outliers   outliers.json                    the norm profile and the outlier threshold (acts-typical/ if excluded)
    train      saes/NAME (the plan's trained)   one SAE at a time from acts/, or every SAE of a seed from one
                                                pass of the model (source lm)
    import     saes/NAME (pretrained)           a user's SAE, checked against the run's hook and width, copied exactly
    permute    stats/NAME, saes/NAME-by-METRIC  vanilla and pretrained SAEs sorted by importance
    shrink     saes/NAME-by-e_z2-METHOD-G       the sorted vanilla SAE shrunk to G = N/8, N/4, N/2 by each method
    evaluate   eval/NAME.json                   every SAE at the G grid, both modes (dealt over torchrun ranks)
    interp     stats/NAME.records, interp/NAME.json, browse/NAME/, interp/judge-check.json  (the judge of the run
                                                and the lexical one, interp/lexical.py, side by side)
    analyse    results.json                     (results.py) every number across SAEs; findings.py the verdicts
The report (`progsae.report`) is written from results.json afterwards.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

from .. import dist
from ..analysis import latent_stats, load_stats, save_stats, sort_by_importance
from ..analysis.evaluate import evaluate
from ..analysis.lm_eval import LMSplice, directory_contexts, special_token_ids
from ..analysis.outliers import norm_profile
from ..analysis.shrink import DISTIL_FROM, distil, shrink
from ..data import ActivationDir, write_activations
from ..data.extract import ExtractConfig, extract
from ..data.lm import check_layer, load_lm
from ..data.stream import LMSource, StreamConfig
from ..data.synthetic import SyntheticSource, write_synthetic
from ..errors import ProgsaeError, check_device
from ..files import load_json, save_json, sweep_leftovers
from ..formats import load_sae, save_sae
from ..interp.autointerp import ChatJudge
from ..interp.lexical import LexicalJudge
from ..interp.llm import ChatClient
from ..interp.local import LocalJudge
from ..interp.proxies import proxies
from ..interp.records import TextRows, latent_records, save_records
from ..interp.study import judge_check, score_latents, stratified_latents
from ..report.browser import write_site
from ..sae import SAE
from ..train import Trainer, train_together
from .config import ADDITIVE, INTERP_FIELDS, ON_THE_FLY, RunConfig, hook
from .plan import METRICS, Plan
from .results import LEXICAL, analyse
from .rundir import RunDir
from .stages import Stages


class Run:
    def __init__(self, cfg: RunConfig, out: str | Path, force: bool = False, progress: bool = True):
        self.cfg, self.dir, self.force, self.progress = cfg.validate(), RunDir(out), force, progress
        self.out, self.plan = self.dir.root, Plan(cfg)
        self.resolved = json.loads(json.dumps(asdict(cfg)))
        if self.dir.config.is_file() and self.dir.timings.is_file() and not force:  # a stage finished: binding
            old, defaults = load_json(self.dir.config), json.loads(json.dumps(asdict(RunConfig())))
            diff = sorted(k for k in self.resolved if k not in ADDITIVE and old.get(k, defaults[k]) != self.resolved[k])
            if diff:
                raise ProgsaeError(
                    f"{self.out} holds a run with other settings ({', '.join(diff)}); "
                    "use another --out, or --force to redo it"
                )
        self.stages = Stages(self.out, self.dir.timings, force, progress)
        self._lm = self._judge = self._stream = self._splice = None
        self.device = cfg.device

    def lm(self):
        if self._lm is None:
            self._lm = load_lm(self.cfg.model, self.device)
        return self._lm

    def run(self) -> dict:
        c, d, st, plan = self.cfg, self.dir, self.stages, self.plan
        t0 = time.perf_counter()
        est = f", about {c.minutes_estimate:.0f} minutes on 2 CPU cores" if c.minutes_estimate else ""
        if st.timings and not self.force:
            est = f"; resuming ({len(st.timings)} stages already done)"
        what = "synthetic activations with known features" if c.source == "synthetic" else f"{c.model} layer {c.layer}"
        st.say(
            f"progsae run: {what}, {c.train_tokens:,} training activations, "
            f"N = {c.d_sae}, k = {c.k}, {len(plan.specs)} SAEs -> {self.out}{est}"
        )
        self.device = check_device(dist.init(c.device))  # under torchrun: cuda:LOCAL_RANK
        self.progress = st.progress = self.progress and dist.is_main()  # rank 0 alone shows progress
        if c.source != "synthetic":
            check_layer(self.lm()[0], c.layer)  # before anything is written
        if plan.names("pretrained"):
            width = c.synthetic_config().d_in if c.source == "synthetic" else self.lm()[0].config.hidden_size
        pretrained = read_pretrained(c, plan, width) if plan.names("pretrained") else {}
        if dist.is_main():
            sweep_leftovers(self.out)  # a killed invocation's half-written files
            save_json(d.config, self.resolved)
        for split, tokens in (("train", c.train_tokens), ("test", c.test_tokens)):
            st.stage(f"extract {split}", d.acts(split) / "manifest.json",
                     lambda s=split, t=tokens: self._extract(s, t), everyone=True)  # fmt: skip
        st.stage("outliers", d.outliers, self._outliers)
        if c.outliers == "exclude":  # SAEs train and are measured on the tokens at or below the threshold
            for split in ("train", "test"):
                st.stage(f"exclude outliers {d.rel(d.acts(split))}", d.acts(split, typical=True) / "manifest.json",
                         lambda s=split: self._exclude(s))  # fmt: skip
        for name in plan.names("vanilla", "native", "matryoshka", "pretrained"):
            if plan[name].role == "pretrained":
                st.stage(f"import {name}", d.sae(name) / "cfg.json", lambda n=name: self._import(n, pretrained[n]))
            elif c.source == "cached":
                st.stage(f"train {name}", d.sae(name) / "cfg.json", lambda n=name: self._train([n]), everyone=True)
        trained = [plan[n] for n in plan.names("vanilla", "native", "matryoshka")]
        for s in sorted({sp.seed for sp in trained}) if c.source in ON_THE_FLY else []:  # one pass per seed
            names = [sp.name for sp in trained if sp.seed == s]
            st.stage(f"train seed {c.seed + s} from the {'generator' if c.source == 'synthetic' else 'model'}",
                     d.sae(names[-1]) / "cfg.json",
                     lambda ns=names: self._train(ns), everyone=True)  # fmt: skip
        for name in plan.names("vanilla", "pretrained"):
            st.stage(f"permute {name}", d.sae(plan.sorted_copy(name, METRICS[-1])) / "cfg.json", lambda n=name: self._permute(n),
                     everyone=True)  # fmt: skip
        for name in plan.names("shrunk"):
            st.stage(f"shrink {name}", d.sae(name) / "cfg.json", lambda n=name: self._shrink(n), everyone=True)
        st.spread([(f"evaluate {n}", d.eval(n), lambda n=n: self._evaluate(n)) for n in plan.names()])
        settings = {k: self.resolved[k] for k in INTERP_FIELDS}
        settings[LEXICAL] = LexicalJudge.name  # a run made before the lexical judge redoes these stages
        for name in plan.interp():
            unlink_stale(d.interp(name), settings)  # other interp settings: redo this stage only (answers are cached)
            st.stage(f"interp {name}", d.interp(name), lambda n=name: self._interp(n, settings))
        if c.interp_latents and plan.interp():
            unlink_stale(d.judge_check, settings)
            st.stage("judge check", d.judge_check, lambda: self._judge_check(settings))
        if not dist.is_main():
            return {}
        t_analyse = time.perf_counter()
        results = analyse(self)
        st.timings["analyse"] = round(time.perf_counter() - t_analyse, 1)
        results["stage_seconds"] = st.seconds()
        results["seconds"] = round(sum(results["stage_seconds"].values()), 1)
        results["seconds_this_invocation"] = round(time.perf_counter() - t0, 1)
        save_json(d.results, results)
        return results

    # -- the stages' bodies ---------------------------------------------------------------------------------

    def acts(self, split: str = "train") -> ActivationDir:
        """The activations SAEs see: all of them, or with outliers excluded (`outliers: exclude`)."""
        return ActivationDir(self.dir.acts(split, typical=self.cfg.outliers == "exclude"))

    def threshold(self) -> float:
        return load_json(self.dir.outliers)["threshold"]

    def load(self, name: str) -> SAE:
        """An SAE of this run, encoding in the precision and by the kernel it was trained with (pretrained: fp32, csr)."""
        sae = load_sae(self.dir.sae(name)).to(self.device)
        sae.precision, sae.kernel = trained_as(sae)
        return sae

    def _extract(self, split: str, tokens: int) -> None:
        c = self.cfg
        if c.source == "synthetic":  # the held-out split carries its true codes
            write_synthetic(c.synthetic_config(), self.dir.acts(split), tokens, split == "test", self.progress)
            return
        ec = ExtractConfig(**hook(c), tokens=tokens, split=split, seed=c.seed, device=c.device, dtype=c.acts_dtype)
        extract(ec, self.dir.acts(split), *self.lm(), progress=self.progress)

    def _outliers(self) -> None:
        """The norm distribution of the training activations and the outlier threshold (outliers.json)."""
        prof = norm_profile(ActivationDir(self.dir.acts()), self.cfg.outlier_quantile, self.cfg.stats_tokens)
        for row in prof.get("outlier_tokens", []):
            row["token"] = self.lm()[1].decode([row["value"]])
        save_json(self.dir.outliers, prof)

    def _exclude(self, split: str) -> None:
        src, thr = ActivationDir(self.dir.acts(split)), self.threshold()
        rows = (x[x.norm(dim=1) <= thr] for x in src.iter_rows(8192))
        source = {**src.manifest["source"], "excluded": {"norm_above": thr, "quantile": self.cfg.outlier_quantile}}
        write_activations(self.dir.acts(split, typical=True), rows, src.d_in, source,
                          dtype=src.manifest.get("dtype", "float32"))  # fmt: skip

    def _import(self, name: str, sae: SAE) -> None:
        """The pretrained SAE, exactly as read (its folds applied), as saes/NAME in SAELens layout."""
        src = sae.cfg.source
        sae.cfg.progsae["pretrained"] = {"path": self.plan[name].path, "format": src.get("format"),
                                         "folded": src.get("folded", [])}  # fmt: skip
        save_sae(sae, self.dir.sae(name), "saelens")

    def _train(self, names: list[str]) -> None:
        """Train the SAEs `names` of one seed: from acts/ (source cached, one at a time), or together from
        one pass of the model (source lm), data-parallel under torchrun either way."""
        source = self.acts() if self.cfg.source == "cached" else self.stream()
        info = source.manifest["source"] if self.cfg.source == "cached" else source.describe()
        meta = {k: v for k, v in info.items() if k in ("model_name", "hook_name")}
        trainers = []
        for name in names:
            if self.force and dist.is_main():  # else the trainer would resume from the old run's checkpoint
                shutil.rmtree(self.dir.sae(name), ignore_errors=True)
            dist.barrier()
            trainers.append(Trainer(self.cfg.train_config(self.plan[name], meta), source, self.dir.sae(name)))
        train_together(trainers, self.progress)

    def stream(self) -> LMSource | SyntheticSource:
        """The source lm (the model on the training split, described in stream.json) or synthetic, built once."""
        if self._stream is None and self.cfg.source == "synthetic":
            self._stream = SyntheticSource(self.cfg.synthetic_config())
        if self._stream is None:
            c = self.cfg
            sc = StreamConfig(**hook(c), split_seed=c.seed, buffer_tokens=c.buffer_tokens)
            self._stream = LMSource(sc, self.device, *self.lm())
            if dist.is_main():
                save_json(self.dir.stream, {**self._stream.describe(), "epoch_tokens": self._stream.epoch_tokens()})
        return self._stream

    def _permute(self, name: str) -> None:
        sae = self.load(name)
        stats = self.stats(sae, split=True)
        if dist.is_main():
            save_stats(self.dir.stats(name), stats, str(self.dir.sae(name)))
            for metric in METRICS:
                save_sae(sort_by_importance(sae, stats, metric), self.dir.sae(self.plan.sorted_copy(name, metric)))

    def _shrink(self, name: str) -> None:
        """A shrunk SAE (plan: role shrunk) from its base, the vanilla SAE sorted by E[z²]; merge weighs by the
        base's E[z²] from the permute stage; distil fine-tunes on the SAEs' training source, resumably."""
        c, sp, out = self.cfg, self.plan[name], self.dir.sae(name)
        if self.force and dist.is_main():
            shutil.rmtree(out, ignore_errors=True)
        dist.barrier()
        start = self.plan.shrunk(sp.base, DISTIL_FROM, sp.d_sae)
        tune, source = replace(c.train_config(sp), tokens=c.distil), self.acts() if c.source == "cached" else self.stream()
        if sp.method == "distil" and (self.dir.sae(start) / "cfg.json").is_file():  # the merge stage's SAE, fine-tuned
            distil(self.load(start), tune, source, out, self.progress)
        elif sp.method == "distil" or dist.is_main():  # one rank solves; distil trains on every rank
            big = self.load(sp.base)
            weights = load_stats(self.dir.stats(self.plan[sp.base].base))["e_z2"][big.cfg.progsae["permutation"]["order"]]
            small = shrink(big, sp.d_sae, sp.method, lambda: self.acts().iter_rows(4096, c.shrink_tokens), sp.k,
                           weights=weights, tune=tune, source=source, out=out, progress=self.progress)  # fmt: skip
            if sp.method != "distil":  # distil's trainer wrote it
                save_sae(small.cpu(), out)

    def stats(self, sae: SAE, split: bool = False) -> dict:
        """Importance statistics on the training activations (with each latent's E[z²] on outlier tokens);
        `split`: every rank takes its share of the batches and the sums are reduced over the ranks."""
        rows = ActivationDir(self.dir.acts()).iter_rows(4096, self.cfg.stats_tokens)
        if split:
            rows = (x[dist.rank() :: dist.world()] for x in rows)
        if self.cfg.outliers == "exclude":
            rows = (x[x.norm(dim=1) <= self.threshold()] for x in rows)
        return latent_stats(sae, rows, outlier_norm=self.threshold(), reduce=split)

    def granularities(self, name: str, d_sae: int) -> list[int]:
        """Where an SAE is tabled: the run's grid up to its size; a pretrained SAE (and its sorted copies) at its
        own N/16 .. N."""
        spec = self.plan[name]
        if spec.role == "shrunk":  # a shrunk SAE is held against the others at its own size
            return [d_sae]
        if spec.role == "pretrained":
            return sorted({max(1, d_sae // 2**i) for i in range(5)})
        return [g for g in self.cfg.G if g <= d_sae]

    def _evaluate(self, name: str) -> None:
        c, sae = self.cfg, self.load(name)
        if c.lm_tokens and self._splice is None:  # one per run: the ablations run once for every SAE
            model, tok, _ = self.lm()
            contexts = directory_contexts(ActivationDir(self.dir.acts("test")), c.lm_tokens)
            self._splice = LMSplice(model, c.layer, contexts, special_token_ids(tok))
        out = {"name": name, **evaluate(sae, self.acts("test"), self.granularities(name, sae.d_sae),
                                        rsa_tokens=c.rsa_tokens, lm=self._splice, progress=self.progress,
                                        n_boot=c.bootstrap,  # typical tokens: all of them when outliers are excluded
                                        outlier_norm=self.threshold() if c.outliers == "keep" else None)}  # fmt: skip
        if self.dir.history(name).is_file():
            out["history"] = load_json(self.dir.history(name))
        save_json(self.dir.eval(name), out)

    def judge(self):
        if self._judge is None:
            c, cache = self.cfg, self.dir.llm_cache
            if c.judge_url:
                self._judge = ChatJudge(ChatClient(c.judge_url, c.judge, cache_dir=cache))
            else:
                self._judge = LocalJudge(c.judge, cache_dir=cache)
        return self._judge

    def _interp(self, name: str, settings: dict) -> None:
        """Latent records and proxies (stats/NAME.records.safetensors), auto-interp scores of latents sampled
        from every rank band (interp/NAME.json) and the feature browser (browse/NAME/)."""
        c, sae, acts = self.cfg, self.load(name), ActivationDir(self.dir.acts("test"))
        model, tok, _ = self.lm()
        rows = TextRows(acts, c.interp_tokens, sae, tok)
        rec = latent_records(sae, rows.x.split(4096))
        prox = proxies(sae, rec, acts, rows.contexts, model.get_output_embeddings().weight.detach().cpu())
        save_records(self.dir.records(name), {**rec, **prox}, sae, str(acts.path))
        edges = sorted(set(self.granularities(name, sae.d_sae)) | {sae.d_sae})
        latents = stratified_latents(list(range(sae.d_sae)), rec["freq"] > 0, edges, c.interp_latents)
        judge = self.judge() if latents else None
        scores = score_latents(judge, rows, rec, latents, self.progress) if judge else []
        lexical = {"judge": LexicalJudge.name, "scores": score_latents(LexicalJudge(), rows, rec, latents, False)}
        out = {"sae": name, "judge": judge.name if judge else None, "settings": settings, "edges": edges,
               "tokens": rows.n, "scores": scores, LEXICAL: lexical}  # fmt: skip
        write_site(sae, rows, rec, prox, self.dir.browser(name), f"{rows.n:,} held-out tokens of this run", out)
        save_json(self.dir.interp(name), out)

    def _judge_check(self, settings: dict) -> None:
        rows = TextRows(ActivationDir(self.dir.acts("test")), self.cfg.interp_tokens, None, self.lm()[1])
        save_json(self.dir.judge_check, {**judge_check(self.judge(), rows), "settings": settings,
                                         LEXICAL: judge_check(LexicalJudge(), rows)})  # fmt: skip


def trained_as(sae: SAE) -> tuple[str, str]:
    """The precision and kernel path an SAE was trained with (its training metadata); fp32 and csr for any other."""
    training = sae.cfg.progsae.get("training", {})
    return training.get("precision", "fp32"), training.get("kernel", "csr")


def unlink_stale(done: Path, settings: dict) -> None:
    """Remove a stage's output made with other settings (it reruns)."""
    if done.is_file() and load_json(done).get("settings") != settings:
        done.unlink()


def read_pretrained(c: RunConfig, plan: Plan, width: int) -> dict[str, SAE]:
    """Every pretrained SAE of the plan, checked to read this run's hook: d_in (the model's `width`), and the hook
    name where the SAE says."""
    saes = {}
    for name in plan.names("pretrained"):
        path, sae = plan[name].path, load_sae(plan[name].path)
        hook, theirs = f"blocks.{c.layer}.hook_resid_post", sae.cfg.metadata.get("hook_name")
        if theirs and theirs != hook:
            raise ProgsaeError(
                f"SAE {name} ({path}) reads {theirs} but this run extracts {hook}; set layer to match, or pass "
                "an SAE of this layer"
            )
        if sae.cfg.d_in != width:
            raise ProgsaeError(
                f"SAE {name} ({path}) has d_in={sae.cfg.d_in} but {c.model} has width {width}; pass an SAE of this model"
            )
        saes[name] = sae
    return saes
