"""report.html: every table and figure of a run on one self-contained page (figures inlined).

Every number on the page is formatted from results.json by `tables.fmt`, so page and file cannot disagree.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from ..files import load_json
from .figures import figures
from .tables import fmt, html_table, table_rows, write_csv


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def write_report(run_dir: str | Path) -> Path:
    """Tables, figures and report.html for the run in `run_dir` (reads results.json and the eval files)."""
    run_dir = Path(run_dir)
    res = load_json(run_dir / "results.json")
    from ..analysis import load_stats

    res["_series"] = {
        n: {m: load_stats(run_dir / "stats" / f"{n}.safetensors")[m].numpy() for m in ("e_z2", "freq", "dec_cov_eigs")}
        for n in res["power_laws"]
    }
    res["_history"] = {
        n: load_json(run_dir / "saes" / n / "history.json")
        for n in res["power_laws"]
        if (run_dir / "saes" / n / "history.json").is_file()
    }
    res["_curves"] = {
        n: load_json(run_dir / "eval" / f"{n}.json")["curve"]["fvu_prefix"]
        for p in res.get("pretrained", {})
        for n in (p, f"{p}-by-e_z2", f"{p}-by-freq")
    }
    rows = table_rows(res)
    write_csv(run_dir / "tables" / "results.csv", rows)
    pl_rows = [
        {"sae": n, "metric": m, **{k: f[k] for k in ("exponent", "r2", "lo", "hi")}}
        for n, fits in res["power_laws"].items()
        for m, f in fits.items()
    ]
    write_csv(run_dir / "tables" / "power_laws.csv", pl_rows)
    if res["feature_splitting"]:
        write_csv(run_dir / "tables" / "feature_splitting.csv", res["feature_splitting"])
    sc_rows = [{"sae": n, **v} for n, v in res["scaling"].items()]
    if sc_rows:
        write_csv(run_dir / "tables" / "scaling.csv", sc_rows)
    figs = figures(res, run_dir)

    c, src = res["config"], res["source"]
    lm = next((s["lm"] for s in res["saes"].values() if s.get("lm")), None)
    parts = [
        "<h1>progsae: progressive coding with sparse autoencoders</h1>",
        f"<p>Model <b>{html.escape(src.get('model_name', c['model']))}</b>, hook <code>{html.escape(src.get('hook_name', ''))}</code>, "
        f"corpus <code>{html.escape(c['corpus'])}</code> (contexts of {c['ctx_len']} tokens). "
        f"{c['train_tokens']:,} training activations, {c['test_tokens']:,} held-out; each SAE trained on {c['sae_tokens']:,} tokens. "
        f"N = {c['d_sae']}, k = {c['k']} (native smaller SAEs: k·G/N). Run time {res.get('seconds', 0) / 60:.1f} minutes.</p>",
        *_pretrained_section(res, figs),
        "<h2>The paper's findings beside ours</h2>",
        html_table(
            [{"paper": f["paper"], "ours": f["ours"], "verdict": f["verdict"]} for f in res["findings"]],
            ["paper", "ours", "verdict"],
        )
        if res["findings"]
        else "<p>No SAEs were trained in this run (train: false), so the paper's comparisons are not made.</p>",
        "<h2>Results at each granularity (held-out activations)</h2>",
        "<p>FVU: fraction of variance unexplained. Recaptured: (CE<sub>zero</sub> − CE<sub>SAE</sub>) / (CE<sub>zero</sub> − CE<sub>clean</sub>)"
        + (
            f"; CE clean {fmt(lm['ce_clean'])}, zero-ablated {fmt(lm['ce_zero'])}, mean-ablated {fmt(lm['ce_mean'])} over {lm['n_tokens']} tokens"
            if lm
            else ""
        )
        + " (whole contexts). RSA: Spearman correlation of the cosine-dissimilarity matrices of original and "
        "reconstructed activations (it can fall below 0 when a few latents reconstruct mostly the shared mean direction). "
        "prefix: TopK over all N latents, then those ≥ G dropped; rescaled: TopK over the first G with k·G/N, "
        "the paper's constant K/G (at small G only a handful of latents). L0 is the prefix mode's.</p>",
        html_table(
            rows,
            [
                "sae",
                "G",
                "fvu_prefix",
                "fvu_rescaled",
                "recaptured_prefix",
                "recaptured_rescaled",
                "kl_prefix",
                "kl_rescaled",
                "rsa_prefix",
                "rsa_rescaled",
                "l0_prefix",
                "dead_frac",
            ],
        ),
        _img(figs["fvu"], "FVU against granularity G"),
        _img(figs["recaptured"], "Recaptured LM loss against granularity G"),
        _img(figs["rsa"], "RSA against granularity G"),
        "<h2>Power laws of latent importance</h2>",
        html_table(pl_rows, ["sae", "metric", "exponent", "r2", "lo", "hi"]),
        _img(figs["powerlaw"], "Importance against rank (log-log) with least-squares fits"),
        *(
            [
                "<h2>Feature splitting</h2>",
                html_table(res["feature_splitting"], list(res["feature_splitting"][0])),
                _img(figs["splitting"], "Truncated large SAE against native SAE of the same size"),
            ]
            if res["feature_splitting"]
            else []
        ),
        "<h2>Scaling of FVU with G</h2><p>FVU(G) ≈ a·G<sup>−b</sup> + c, fitted to the one-pass prefix curve for G ≥ 16. "
        "A low R² means the curve is not a power law: a fixed-granularity Matryoshka curve steps at its granularities.</p>",
        html_table(sc_rows, ["sae", "a", "b", "c", "r2"]),
        *(["<h2>Training</h2>", _img(figs["training"], "Training FVU against tokens")] if "training" in figs else []),
        "<h2>Configuration</h2>",
        f"<p>Granularities evaluated: {', '.join(map(str, res['grid']))}.</p>",
        f"<pre>{html.escape(_json(c))}</pre>",
        "<h3>Stage times</h3>",
        html_table(
            [{"stage": k, "seconds": float(v)} for k, v in res.get("stage_seconds", {}).items()], ["stage", "seconds"]
        ),
    ]
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>progsae report</title><style>"
        "body{font-family:sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
        "td.t,th{text-align:left}img{max-width:100%}figure{margin:1em 0}"
        "figcaption{font-size:13px;color:#555}</style></head><body>" + "\n".join(parts) + _SELF_CHECK + "</body></html>"
    )
    path = run_dir / "report.html"
    tmp = path.with_name("report.html.tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path


# records on <body> how many figures decoded, for a browser test (and a reader's devtools)
_SELF_CHECK = (
    "<script>window.addEventListener('load',()=>{const i=[...document.images];"
    "document.body.dataset.images=i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length;});</script>"
)


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
        sorted_table = {r["G"]: r for r in res["saes"][f"{n}-by-e_z2"]["table"]}
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
