"""results.json: every number of a run, gathered from its stages' files and computed across SAEs; the
report reads this file alone (`load`).

    config, source, grid     the resolved settings, what the activations are, the granularities tabled
    plan                     family -> role, base and metric (a sorted copy), granularities, training options
    saes                     name -> d_sae, k, architecture, role, family, seed, table (one row per G; FVU and
                             RSA on all tokens and on typical ones, analysis/evaluate.py), lm
    families                 family -> d_sae, k, architecture, role, seeds, table (means with 95% intervals)
    curves                   family -> fvu_prefix, l0 at every G = 1..N, averaged over its seeds
    outliers, power_laws     the norm profile; per SAE the power-law fits (full and robust windows)
    series                   per SAE with power laws: e_z2, freq, dec_cov_eigs as computed (the fits' data)
    feature_splitting, scaling, scaling_over_N, training, history, stream, pretrained, interpretability
    known_answers            where the held-out activations carry truth: recovery metrics per family (known.py)
    shrink                   the vanilla SAE shrunk by each method against native SAEs, tokens spent (shrink.py)
    findings                 the paper's findings beside ours, each with its verdict and rule (findings.py)
    stage_seconds, seconds, seconds_this_invocation
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..analysis import fit_power_law, load_stats, save_stats
from ..analysis.aggregate import Aggregate
from ..analysis.compare import feature_splitting
from ..analysis.outliers import FLAG_SHARE, flagged_latents, robust_window
from ..analysis.scaling import fit_scaling
from ..analysis.shrink import provenance
from ..data import ActivationDir
from ..files import load_json
from ..formats import load_sae
from ..interp import bands
from ..interp.records import load_records
from .findings import findings, interpretability_findings, not_converged
from .known import known_answers, known_findings
from .rundir import RunDir
from .shrink import shrink_finding, shrink_results

CONVERGED = 0.01  # converged: one more doubling of the tokens is projected to lower FVU by < 1% of its value
SERIES = ("e_z2", "freq", "dec_cov_eigs")
LEXICAL = "lexical"  # the lexical judge's part, beside the run's judge's: interp/NAME.json, judge-check.json, results


def load(run_dir: str | Path) -> dict:
    """A run's results.json (what the report reads)."""
    return load_json(RunDir(run_dir).results)


def analyse(run) -> dict:
    """Every number across the SAEs of `run` (a `pipeline.Run` whose stages are done)."""
    c, d, plan, N = run.cfg, run.dir, run.plan, run.cfg.d_sae
    evals = {n: load_json(d.eval(n)) for n in plan.names()}
    families = plan.families()
    agg = Aggregate(evals, families, c.bootstrap, c.seed)
    res: dict = {
        "config": json.loads(json.dumps(asdict(c))),
        "source": ActivationDir(d.acts()).manifest["source"],
        "grid": c.G,
        "plan": plan.describe(),
        "outliers": {**load_json(d.outliers), "handling": c.outliers},
        "saes": {},
        "families": {},
        "power_laws": {},
        "series": {},
        "feature_splitting": [],
        "scaling": {},
        "training": {},
        "history": {},
    }
    for n, e in evals.items():
        sp = plan[n]
        res["saes"][n] = {"d_sae": e["d_sae"], "k": e["k"], "architecture": e.get("architecture", "topk"),
                          "role": sp.role, "family": sp.family, "seed": sp.seed, "table": e["table"],
                          "lm": {k: v for k, v in e["lm"].items() if not k.startswith("per_context")} if e.get("lm") else None}  # fmt: skip
    for fam, names in families.items():
        res["families"][fam] = {**{k: res["saes"][names[0]][k] for k in ("d_sae", "k", "architecture", "role")},
                                "seeds": names, "table": agg.table(fam)}  # fmt: skip
    res["curves"] = {  # each family's prefix curve, averaged over seeds
        fam: {k: np.mean([evals[n]["curve"][k] for n in names], 0).tolist() for k in ("fvu_prefix", "l0")}
        for fam, names in families.items()
    }
    res["pretrained"] = {}
    if c.source == "lm" and c.train:  # the stream the SAEs trained on (source cached: acts/)
        res["stream"] = load_json(d.stream)
    pool = res["stream"]["epoch_tokens"] if "stream" in res else c.train_tokens  # tokens of one pass
    pool = c.sae_tokens if c.source == "synthetic" else pool  # the generator never repeats a row
    for n in plan.names("vanilla", "native", "matryoshka", "pretrained"):
        sae, role = run.load(n), plan[n].role
        if role == "pretrained":
            res["pretrained"][n] = {**sae.cfg.progsae.get("pretrained", {}), "architecture": sae.architecture,
                                    "d_in": sae.cfg.d_in, "d_sae": sae.d_sae, "k": sae.k}  # fmt: skip
        path = d.stats(n)  # vanilla and pretrained SAEs: from the permute stage
        if not path.is_file() or run.force and role not in ("vanilla", "pretrained"):
            save_stats(path, run.stats(sae), str(d.sae(n)))
        stats = load_stats(path)
        res["power_laws"][n] = power_laws(stats, sae.d_sae)
        res["series"][n] = {m: stats[m].tolist() for m in SERIES}
        if d.history(n).is_file():
            res["history"][n] = load_json(d.history(n))
            res["training"][n] = {**convergence(res["history"][n], pool), "precision": sae.precision}
    res["outliers"]["latent_threshold_share"] = FLAG_SHARE
    for fam, names in families.items():
        if plan[names[0]].metric or plan[names[0]].role == "matryoshka":
            G = np.arange(1, len(res["curves"][fam]["fvu_prefix"]) + 1)
            if len(G) > 32 and (fit := fit_scaling(G, np.asarray(res["curves"][fam]["fvu_prefix"]), lo=16)):
                res["scaling"][fam] = fit
    res["interpretability"] = interpretability(run)
    not_shrunk = {f: names for f, names in families.items() if plan[names[0]].role != "shrunk"}  # shrunk: their section
    res["known_answers"] = known_answers(evals, not_shrunk, c.seed)
    shrunk = {n: provenance(run.load(n)) for n in plan.names("shrunk")}
    res["shrink"] = shrink_results(agg, plan, shrunk, c.sae_tokens)
    if not c.train:
        res["findings"] = []
        return res
    big, natives = plan.vanilla("e_z2"), [n for n in plan.names("native") if plan[n].seed == 0]
    for n in sorted(natives, key=lambda n: plan[n].d_sae):
        G = plan[n].d_sae
        row_t = next(r for r in evals[big]["table"] if r["G"] == G)
        row_n = next(r for r in evals[n]["table"] if r["G"] == G)
        res["feature_splitting"].append(feature_splitting(load_sae(d.sae(big)), load_sae(d.sae(n)), row_t, row_n))
    own = sorted(natives + [plan.vanilla()], key=lambda n: plan[n].d_sae)  # scaling over N: each at its own size
    sizes, fvus = [plan[n].d_sae for n in own], [res["families"][n]["table"][-1]["fvu_prefix"] for n in own]
    res["scaling_over_N"] = {"N": sizes, "fvu": fvus, **(fit_scaling(sizes, fvus) or {"method": "no fit: too few points"})}
    res["findings"] = findings(agg, res, plan)
    if res["known_answers"]:
        studied = [n for f in families if plan[families[f][0]].role in ("vanilla", "matryoshka") for n in families[f]]
        res["findings"] += [dict(f, verdict=f["verdict"] + not_converged(res, plan, studied))
                            for f in known_findings(res["known_answers"], plan, c.G)]  # fmt: skip
    if res["shrink"]:
        natives = [n for n in plan.names("native") if plan[n].d_sae in {r["G"] for r in res["shrink"]["rows"]}]
        f = shrink_finding(res["shrink"], c.sae_tokens)
        res["findings"].append(dict(f, verdict=f["verdict"] + not_converged(res, plan, [plan.vanilla(), *natives])))
    ours = len(res["findings"])
    study, check = res["interpretability"]["saes"], res["interpretability"]["check"]
    if check:
        matryoshkas = [n for n in plan.interp() if plan[n].role == "matryoshka"]
        res["findings"] += interpretability_findings(study, big, matryoshkas, N, check, c.bootstrap, c.seed,
                                                     lexical=res["interpretability"][LEXICAL])  # fmt: skip
        for f in res["findings"][ours:]:  # the interpretability findings: about the SAEs studied
            f["verdict"] += not_converged(res, plan, [big, *matryoshkas])
    return res


def interpretability(run) -> dict:
    """Per studied SAE: scores and proxies by rank band, the browser's path; the judge and its check. Under
    LEXICAL the same for the lexical judge (interp/lexical.py): judge, check, per studied SAE scores and bands."""
    c, d = run.cfg, run.dir
    out: dict = {"judge": None, "check": None, "saes": {}, LEXICAL: None}
    if d.judge_check.is_file():
        check = load_json(d.judge_check)
        out["check"] = {k: v for k, v in check.items() if k != LEXICAL}
        out["judge"] = check["judge"]
        if LEXICAL in check:
            out[LEXICAL] = {"judge": check[LEXICAL]["judge"], "check": check[LEXICAL], "saes": {}}
    for name in run.plan.interp():
        it, rec = load_json(d.interp(name)), load_records(d.records(name))
        prox = {"live": (rec["freq"] > 0).numpy(), "token_entropy": rec["token_entropy"].numpy(),
                "lens_agreement": rec["lens_agreement"].numpy()}  # fmt: skip
        out["saes"][name] = {
            "scores": it["scores"],
            "bands": bands.bands(it["scores"], prox, it["edges"], c.bootstrap, c.seed),
            "browser": d.rel(d.browser(name) / "index.html"),
            "tokens": it["tokens"],
        }
        if out[LEXICAL] and LEXICAL in it:
            lex = it[LEXICAL]["scores"]
            out[LEXICAL]["saes"][name] = {"scores": lex,
                                          "bands": bands.bands(lex, prox, it["edges"], c.bootstrap, c.seed)}  # fmt: skip
    return out


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
    for m in SERIES:
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
