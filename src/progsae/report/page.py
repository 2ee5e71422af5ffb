"""report.html: every table and figure of a run on one self-contained page (figures inlined).

Every number on the page is formatted from results.json by `tables.fmt`, so page and file cannot disagree.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from ..files import write_text
from ..interp.bands import JUDGE_MIN
from ..study import results
from ..study.rundir import RunDir
from .figures import figures, sorted_copy
from .known import known_section
from .shrink import shrink_section
from .tables import RECONSTRUCTION, RESULT_COLUMNS, fmt, fmt_ci, html_table, result_rows, seconds, write_csv


def _synthetic(src: dict) -> str:
    tree = f", {src['trees']} trees of depth {src['depth']} and branching {src['branching']}" if src.get("trees") else ""
    return f"{src['n_features']} features in {src['d_in']} dimensions, {src['mean_active']} active per row{tree}"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def write_report(run_dir: str | Path) -> Path:
    """Tables, figures and report.html for the run in `run_dir`, from its results.json alone."""
    d = RunDir(run_dir)
    res = results.load(d.root)
    write_csv(d.tables / "results.csv", result_rows(res, with_ci=False))
    pl_rows = [
        {"sae": n, "metric": m, "window": w, **{k: f[m][w][k] for k in ("exponent", "r2", "lo", "hi")},
         "outlier_latents": f["outlier_latents"]["count"]}
        for n, f in res["power_laws"].items()
        for m in ("e_z2", "freq", "dec_cov_eigs")
        for w in (("full", "robust") if m != "dec_cov_eigs" else ("full",))
    ]  # fmt: skip
    write_csv(d.tables / "power_laws.csv", pl_rows)
    if res["feature_splitting"]:
        write_csv(d.tables / "feature_splitting.csv", res["feature_splitting"])
    sc_rows = [{"sae": n, **v} for n, v in res["scaling"].items()]
    if "scaling_over_N" in res:
        f = res["scaling_over_N"]
        sc_rows.append({"sae": "native SAEs over N (FVU at their own size)", **{k: v for k, v in f.items() if k not in ("N", "fvu")}})
    if sc_rows:
        write_csv(d.tables / "scaling.csv", sc_rows)
    tol = next((r["plateau"] for r in sc_rows if r.get("plateau") is not None), None)  # the fits' plateau rule
    tr_rows = [{"sae": n, **v} for n, v in res.get("training", {}).items()]
    if tr_rows:
        write_csv(d.tables / "training.csv", tr_rows)
    if _interp_rows(res):
        write_csv(d.tables / "interpretability.csv", _interp_rows(res))
    figs = figures(res, d.figures)

    rows = result_rows(res)
    c, src = res["config"], res["source"]
    lm = next((s["lm"] for s in res["saes"].values() if s.get("lm")), None)
    seeds = c.get("seeds", 1)
    parts = [
        "<h1>progsae: progressive coding with sparse autoencoders</h1>",
        (f"<p>Synthetic activations with known features ({html.escape(_synthetic(src))}); SAEs trained on the "
         f"generator's rows as they are drawn ({c['train_tokens']:,} rows kept for the statistics), "
         if c.get("source") == "synthetic" else
         f"<p>Model <b>{html.escape(src.get('model_name', c['model']))}</b>, hook <code>{html.escape(src.get('hook_name', ''))}</code>, "
         f"corpus <code>{html.escape(c['corpus'])}</code> (contexts of {c['ctx_len']} tokens). "
         + (f"SAEs trained straight from the model ({c['train_tokens']:,} training activations extracted for the "
           "statistics), " if c.get("source") == "lm" else f"{c['train_tokens']:,} training activations, "))
        + f"{c['test_tokens']:,} held-out; each SAE trained on {c['sae_tokens']:,} tokens, "
        f"{seeds} seed{'s' if seeds > 1 else ''}. N = {c['d_sae']}, k = {c['k']} (native smaller SAEs: k·G/N). "
        f"Run time {seconds(res.get('seconds', 0))} ({res.get('seconds', 0) / 60:.0f} minutes).</p>",
        "<p><b>How to read the numbers.</b> Every number is measured on held-out activations. A number in a table is "
        f"the mean over the {seeds} seed{'s' if seeds > 1 else ''} with its 95% interval in brackets: a block bootstrap "
        f"({c.get('bootstrap', 1000)} replicates) over held-out tokens in blocks of one context (FVU) or over the "
        "LM-loss contexts (ce_loss_score, kl_div_with_sae, recaptured, ΔCE, KL) or over RSA's token sample, nested in a "
        "bootstrap over seeds; L0 "
        "and the dead fraction have intervals across seeds only (none with one seed). Comparisons are paired: both "
        "SAEs are resampled with the same tokens. A verdict counts a G as won only when the interval of the "
        "difference excludes the reverse, and says reproduced only when every G is won in both truncation modes "
        "(partly: each mode's own verdict is named); it names the SAEs whose training had not converged.</p>",
        *_pretrained_section(res, figs),
        "<h2>The paper's findings beside ours</h2>",
        html_table(res["findings"], ["paper", "ours", "verdict", "rule"])
        if res["findings"]
        else "<p>No SAEs were trained in this run (train: false), so the paper's comparisons are not made.</p>",
        *known_section(res, d.tables, d.figures, _img),
        *shrink_section(res, d.tables, d.figures, _img),
        *_outlier_section(res, figs),
        "<h2>Results at each granularity (held-out activations)</h2>",
        "<p>FVU: fraction of variance unexplained. " + _lm_definitions(lm)
        + " RSA: Spearman correlation of the cosine-dissimilarity matrices of original and reconstructed activations. "
        "prefix: TopK over all N latents, then those ≥ G dropped (its L0 falls with G); rescaled: TopK over the first G "
        "with k·G/N, the paper's constant K/G (L0 = k·G/N, matched across SAEs). Native SAEs are meaningful at their own "
        "size; their rows at smaller G are truncations.</p>",
        "<h3>Reconstruction</h3>",
        _typical_text(res),
        html_table(rows, ["sae", "seeds", "G", *RECONSTRUCTION]),
        "<h3>Language-modelling loss with the reconstruction spliced in</h3>",
        html_table(rows, ["sae", "seeds", "G", *(col for col, _ in RESULT_COLUMNS if col not in RECONSTRUCTION)]),
        _img(figs["fvu"], "FVU against granularity G (95% intervals)"),
        _img(figs["curve"], "The full one-pass curve: FVU at every G, log-log, and the fitted scaling laws"),
        _img(figs["l0"], "FVU against L0: how much each SAE reconstructs for a given number of active latents"),
        _img(figs["recaptured"], "Recaptured LM loss against granularity G"),
        _img(figs["rsa"], "RSA against granularity G"),
        *_interp_section(res, figs),
        "<h2>Power laws of latent importance</h2>",
        "<p>Least-squares line in log-log over two rank windows: full (ranks 1..N/2) and robust (from the rank after "
        "the last outlier latent among the top N/8 ranks, to N/2). Outlier latents: more than "
        f"{res['outliers'].get('latent_threshold_share', 0.5):.0%} of their E[z²] comes from outlier tokens.</p>",
        html_table(pl_rows, ["sae", "metric", "window", "exponent", "r2", "lo", "hi", "outlier_latents"]),
        _img(figs["powerlaw"], "Importance against rank (log-log) with the full and robust fits"),
        *(
            [
                "<h2>Feature splitting</h2><p>A large SAE sorted by E[z²] and truncated to G against a native G-latent SAE. "
                "Decoder matches: the share of native decoder directions whose best cosine among the big SAE's first G "
                "latents (and among all N) exceeds 0.9 / 0.7; a native direction found only among all N has split or moved "
                "down the order.</p>",
                html_table(res["feature_splitting"], list(res["feature_splitting"][0])),
                _img(figs["splitting"], "Truncated large SAE against native SAE of the same size"),
            ]
            if res["feature_splitting"]
            else []
        ),
        "<h2>Scaling laws</h2><p>FVU(G) = a·G<sup>−b</sup> + c fitted by nonlinear least squares (the exponent profiled, "
        "(a, c) solved for each b with the floor c free in [0, min FVU]) to the one-pass prefix curve at 64 points spaced "
        "evenly in log G over the range shown; fallback if that fails: the log-log line with c = 0 (method column). "
        + (f"Points on the plateau, FVU ≥ {1 - tol:g} (within {tol:g} of 1: the first latents explain almost "
           "nothing), are no power law and are left out (plateau_points: how many G). " if tol is not None else "")
        + "With at most 4 points the three "
        "parameters leave at most one degree of freedom, so R² says nothing and is not given (–). "
        "A fixed-granularity Matryoshka curve steps at its granularities, so a smooth law fits it less well. "
        "Over N: each native SAE's FVU at its own size"
        + (f" ({len(res['scaling_over_N']['N'])} sizes)" if "scaling_over_N" in res else "")
        + ".</p>",
        html_table(sc_rows, ["sae", "a", "b", "c", "r2", "G_min", "G_max", "n_points", "plateau_points", "method"]),
        *(["<h2>Training</h2>", _training_text(res), html_table(tr_rows, list(tr_rows[0])),
           _img(figs["training"], "Training FVU against tokens")] if tr_rows else []),  # fmt: skip
        "<h2>Configuration</h2>",
        f"<p>Granularities evaluated: {', '.join(map(str, res['grid']))}.</p>",
        f"<pre>{html.escape(_json(c))}</pre>",
        "<h3>Stage times</h3>",
        html_table(
            [{"stage": k, "time": seconds(v)} for k, v in res.get("stage_seconds", {}).items()], ["stage", "time"]
        ),
    ]
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>progsae report</title><style>"
        "body{font-family:sans-serif;max-width:1250px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:12px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
        "td.t,th{text-align:left}img{max-width:100%}figure{margin:1em 0}"
        "figcaption{font-size:13px;color:#555}</style></head><body>" + "\n".join(parts) + _SELF_CHECK + "</body></html>"
    )
    return write_text(d.report, page)


def _interp_rows(res: dict) -> list[dict]:
    """One row per studied SAE and band: the run's judge's scores, the lexical judge's beside them, the proxies."""
    rows, it = [], res.get("interpretability") or {}
    lex = (it.get(results.LEXICAL) or {}).get("saes", {})
    for name, s in it.get("saes", {}).items():
        for b, lb in zip(s["bands"], lex[name]["bands"] if name in lex else [None] * len(s["bands"]), strict=True):
            rows.append({"sae": name, "latents": b["band"], "judge": it.get("judge") or "none", "scored": b["simulation"]["n"],
                         **_judged(b), "malformed replies": b["malformed"], **_judged(lb, " (lexical)"),
                         "live latents": b["live"], "token entropy": fmt(b["token_entropy"]),
                         "lens agreement": fmt(b["lens_agreement"])})  # fmt: skip
    return rows


def _judged(band: dict | None, which: str = "") -> dict:
    keys = (("simulation", "simulation"), ("detection_auroc", "detection AUROC"))
    return {f"{label}{which}": fmt_ci(band[k]["mean"], band[k]["ci"]) if band else "–" for k, label in keys}


def _interp_section(res: dict, figs: dict) -> list[str]:
    it = res.get("interpretability") or {}
    if not it.get("saes"):
        return []
    check, rows = it.get("check"), _interp_rows(res)
    links = ", ".join(f"<a href='{html.escape(s['browser'])}'>{html.escape(n)}</a>" for n, s in it["saes"].items())
    judge = html.escape(it.get("judge") or "none (interp_latents: 0)")
    text = (
        f"<p>Judge: <b>{judge}</b>. "
        + (
            f"Its check, on latents that fire exactly on one word of the held-out text with the explanation given "
            f"(a competent judge scores near 1): simulation {fmt(check['simulation'])}, detection AUROC "
            f"{fmt(check['detection_auroc'])} "
            f"({', '.join(html.escape(x['word']) for x in check['latents'])}). "
            if check
            else ""
        )
        + _lexical_text(it)
        + "Latents are sampled evenly from each band of latents, the bands being the granularities: latents "
        "1-256 are the first 256 of the SAE's own order, which for the vanilla SAE permuted by E[z²] is its "
        "importance order on the training tokens and for a Matryoshka SAE its nesting order (first seed; a "
        "browser instead lists latents by E[z²] over the held-out tokens, and names each one's band). The explainer sees a latent's even-ranked top contexts "
        "and contexts at quantiles of its activations; simulation is the Pearson correlation of the simulator's "
        "per-token predictions with the true activations over held-out top (odd-ranked) and random non-firing "
        "contexts; detection asks whether each held-out context fires. Proxies (no LLM) cover every live latent: "
        "token entropy of the top activations, and lens agreement (the share of top activations whose next token "
        f"is among the latent's logit-lens tokens). Feature browsers: {links}.</p>"
    )
    return ["<h2>Interpretability by importance rank and granularity band</h2>", text,
            html_table(rows, list(rows[0])), _img(figs["interp"], "Interpretability against importance rank")]  # fmt: skip


def _lexical_text(it: dict) -> str:
    lex = it.get(results.LEXICAL)
    if not lex:
        return ""
    return (
        f"Beside it, the lexical judge (<b>{html.escape(lex['judge'])}</b>): its explanation of a latent is the "
        "few words or word pairs whose presence best predicts the latent on the explanation contexts, its simulation "
        "1 on those tokens and 0 elsewhere (the columns marked lexical). It measures a weaker, lexical notion of "
        "interpretability (how far a latent is a lookup of a few words) and passes its check by construction: "
        f"simulation {fmt(lex['check']['simulation'])}, detection AUROC {fmt(lex['check']['detection_auroc'])}. The "
        f"interpretability findings are decided by the run's judge when it scores at least {JUDGE_MIN} on its check, "
        "else by the lexical judge, and say which. "
    )


def precisions(res: dict) -> str:
    """What the SAEs trained in: fp32, bf16 (the selected values recomputed in fp32), or both (auto per size)."""
    used = sorted({t.get("precision", "fp32") for t in res.get("training", {}).values()}) or ["fp32"]
    return " / ".join("bf16 (selected values recomputed in fp32)" if p == "bf16" else p for p in used)


def _training_text(res: dict) -> str:
    c, st = res["config"], res.get("stream")
    drawn = (
        f"streamed from the model over the corpus's training split ({st['epoch_tokens']:,} tokens a pass, "
        f"{c['buffer_tokens']:,} shuffled together; one pass of the model feeds every SAE of a seed)"
        if st
        else f"drawn from {c['train_tokens']:,} extracted training activations"
    )
    return (
        f"<p>Each SAE saw {c['sae_tokens']:,} tokens {drawn} "
        f"({c['sae_tokens'] / (st['epoch_tokens'] if st else c['train_tokens']):.1f} passes); encoder GEMM and "
        f"top-k in {precisions(res)} (precision {c.get('precision', 'fp32')}). Convergence: the slope of the batch FVU against "
        "log₂(tokens) over the second half of training, i.e. the FVU change one more doubling of the tokens is "
        "projected to bring; an SAE counts as converged when that is under 1% of its final FVU.</p>"
    )


def _typical_text(res: dict) -> str:
    o = res["outliers"]
    if o["handling"] == "exclude":
        return ("<p>Outlier tokens are excluded (outliers: exclude): every evaluated token is typical, so the "
                "typical-token columns are empty (–).</p>")  # fmt: skip
    return (
        f"<p>FVU and RSA on all held-out tokens and on the <b>typical</b> ones: tokens whose activation norm is at "
        f"or below the outlier threshold ({o['threshold']:.4g}, the {o['quantile']} quantile of the training norms). "
        f"Outlier tokens hold {o['outlier_variance_share']:.0%} of the training tokens' variance, and an SAE may "
        "reconstruct them far better or worse than the rest, so the FVU on all tokens can say little about a typical "
        "token. A typical token's FVU is the typical tokens' squared residual over their squared deviation from the "
        "mean of all held-out tokens, which makes the FVU on all tokens the variance-weighted mean of the typical and "
        "the outlier tokens' FVU; typical RSA is the RSA on the sample's typical tokens. Intervals as for all tokens.</p>"
    )


def _outlier_section(res: dict, figs: dict) -> list[str]:
    o = res["outliers"]
    q = o["norm_quantiles"]
    handling = {
        "keep": "SAEs are trained and evaluated on every token (outliers: keep, the default: in a measurement "
        "on this model and layer, excluding the outliers from training left the FVU on all tokens unchanged and "
        "lowered the recaptured LM loss slightly, while hiding the outlier latents from the statistics; see the "
        "README). The latents that exist for outlier tokens are flagged below and skipped by the robust power-law fit",
        "exclude": "SAEs are trained and evaluated only on tokens at or below the threshold (outliers: exclude); "
        "recaptured LM loss still splices the SAE in at every position. Outlier latents cannot be flagged: the "
        "statistics see no outlier tokens",
    }[o["handling"]]
    parts = [
        "<h2>Outlier tokens</h2>",
        f"<p>Activation norms of {o['n_tokens']:,} training tokens: median {q['0.5']:.1f}, 90th percentile {q['0.9']:.1f}, "
        f"99th {q['0.99']:.1f}, 99.9th {q['0.999']:.1f}, maximum {q['max']:.1f}. The largest 1% of tokens (by squared "
        f"deviation from the mean) hold {o['variance_share']['top_1%']:.0%} of the variance, the largest 5% hold "
        f"{o['variance_share']['top_5%']:.0%}. Tokens above the {o['quantile']} norm quantile ({o['threshold']:.1f}) "
        f"are outliers: {o['n_outliers']:,} tokens with {o['outlier_variance_share']:.0%} of the variance. {handling}.</p>",
    ]
    if o.get("outlier_tokens"):
        pos = ", ".join(f"position {p['value']}: {p['share']:.0%}" for p in o.get("outlier_positions", [])[:3])
        parts.append(f"<p>Most common outlier tokens (positions in their context: {pos}):</p>")
        parts.append(html_table([{"token": repr(t["token"]), "count": t["count"], "share": t["share"]} for t in o["outlier_tokens"]],
                                ["token", "count", "share"]))  # fmt: skip
    rows = [
        {"sae": n, "outlier latents": f["outlier_latents"]["count"], "their share of E[z²]": f["outlier_latents"].get("share_of_e_z2"),
         "robust fit starts at rank": f["outlier_latents"]["robust_lo"]}
        for n, f in res["power_laws"].items()
    ]  # fmt: skip
    parts.append(html_table(rows, list(rows[0])) if rows else "")
    parts.append(_img(figs["norms"], "Distribution of activation norms (log-log) and the outlier threshold"))
    return parts


# records on <body> how many figures decoded, for a browser test (and a reader's devtools)
_SELF_CHECK = (
    "<script>window.addEventListener('load',()=>{const i=[...document.images];"
    "document.body.dataset.images=i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length;});</script>"
)


def _lm_definitions(lm: dict | None) -> str:
    """What the LM-loss columns are: SAELens' ce_loss_score (the headline) and progsae's recaptured, with the
    cross-entropies they are made of."""
    ratio = "(CE<sub>ablated</sub> − CE<sub>SAE</sub>) / (CE<sub>ablated</sub> − CE<sub>clean</sub>)"
    special = f": ids {', '.join(map(str, lm['special_token_ids']))}" if lm and "special_token_ids" in lm else ""
    text = (
        f"<b>ce_loss_score</b> is SAELens' and Neuronpedia's number, defined as theirs: {ratio}, with layer L's output "
        "zeroed at every position, BOS included, for CE<sub>ablated</sub>; the SAE spliced in at every position but "
        f"the tokenizer's special tokens (BOS, EOS, pad{special}); and the predictions made at special tokens left "
        "out. <b>kl_div_with_sae</b>: SAELens' mean KL(clean ‖ spliced) in nats over the same positions (the last "
        f"one's prediction included). <b>recaptured</b> is progsae's (the paper's): the same ratio {ratio} with "
        "the zero ablation and the SAE at every position but the first (BOS) and every prediction counted; "
        "recaptured vs mean: against mean ablation, (CE<sub>mean</sub> − CE<sub>SAE</sub>) / (CE<sub>mean</sub> − "
        "CE<sub>clean</sub>), the stricter baseline; ΔCE = CE<sub>SAE</sub> − CE<sub>clean</sub> in nats; kl: "
        "KL(clean ‖ spliced) in nats per token, progsae's positions."
    )
    if lm and "ce_loss_without_sae" in lm:
        text += (f" SAELens' count: CE clean {fmt(lm['ce_loss_without_sae'])}, zero-ablated "
                 f"{fmt(lm['ce_loss_with_ablation'])} nats over {lm['n_tokens_saelens']} predictions.")  # fmt: skip
    if lm:
        text += (f" progsae's: CE clean {fmt(lm['ce_clean'])}, zero-ablated {fmt(lm['ce_zero'])}, mean-ablated "
                 f"{fmt(lm['ce_mean'])} nats over {lm['n_tokens']} tokens (a uniform guess over the vocabulary would "
                 f"be {fmt(lm.get('ce_uniform'))}).")  # fmt: skip
    return text


def _pretrained_section(res: dict, figs: dict) -> list[str]:
    """Each pretrained SAE: where it came from, what was folded, and its progressive curves."""
    if not res.get("pretrained"):
        return []
    parts = [
        "<h2>Pretrained SAEs</h2><p>Each SAE as given, and the same SAE with its latents sorted by E[z²] and by "
        "firing frequency (no retraining; identical at G = N). Threshold architectures (JumpReLU, BatchTopK, ReLU) "
        "have only the prefix truncation: their latents fire independently, so the first G latents are a G-latent "
        "SAE. Left: FVU at every G from one pass; right: recaptured LM loss.</p>"
    ]
    rows = []
    for n, p in res["pretrained"].items():
        table = {r["G"]: r for r in res["saes"][n]["table"]}
        sorted_table = {r["G"]: r for r in res["saes"][sorted_copy(res, n, "e_z2")]["table"]}
        half = sorted(table)[-2] if len(table) > 1 else max(table)
        rows.append(
            {
                "sae": n,
                "source": f"{p.get('format')}: {p.get('path')}",
                "architecture": p["architecture"],
                "d_sae": p["d_sae"],
                "folded into the weights": ", ".join(p.get("folded") or []) or "nothing",
                "FVU at G=N/2, as given": table[half]["fvu_prefix"],
                "FVU at G=N/2, by E[z²]": sorted_table[half]["fvu_prefix"],
                "FVU at G=N": table[max(table)]["fvu_prefix"],
            }
        )
    parts.append(html_table(rows, list(rows[0])))
    parts += [_img(figs[f"pretrained:{n}"], f"pretrained SAE {n}: as given and permuted") for n in res["pretrained"]]
    return parts


def _json(obj) -> str:
    import json

    return json.dumps(obj, indent=1)
