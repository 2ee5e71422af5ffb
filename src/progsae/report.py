"""The report of a run: CSV tables, PNG figures and one self-contained HTML page (figures inlined).

Every number on the page is formatted from results.json by `fmt`, so page and file cannot disagree.
"""

from __future__ import annotations

import base64
import csv
import html
from pathlib import Path

import numpy as np

from .files import load_json

MODES = ("prefix", "rescaled")


def fmt(v) -> str:
    """How every number appears on the page and in the tables."""
    if v is None:
        return "–"
    if isinstance(v, int):
        return str(v)
    return f"{v:.4f}"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    _plt().close(fig)
    tmp.replace(path)
    return path


def _metric(row: dict, key: str, mode: str):
    v = row.get(f"{key}_{mode}")
    return v["cosine"]["spearman"] if key == "rsa" and v is not None else v


def _colours(names) -> dict[str, str]:
    """One colour per SAE, the same in every figure."""
    return {n: f"C{i % 10}" for i, n in enumerate(sorted(names))}


def figures(res: dict, run_dir: Path) -> dict[str, Path]:
    plt = _plt()
    colour = _colours(res["saes"])
    out = run_dir / "figures"
    figs = {}
    N = res["config"]["d_sae"]
    curves = [f"topk-{N}", f"topk-{N}-by-e_z2", f"topk-{N}-by-freq", "matryoshka", "matryoshka-sampled"]
    curves = [n for n in curves + [f"topk-{N // 2}", f"topk-{N // 4}"] if n in res["saes"]]
    for key, label in (
        ("fvu", "FVU (lower is better)"),
        ("recaptured", "recaptured LM loss"),
        ("rsa", "RSA (Spearman, cosine)"),
    ):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
        for ax, mode in zip(axes, MODES, strict=True):
            for n in curves:
                rows = res["saes"][n]["table"]
                pts = [(r["G"], _metric(r, key, mode)) for r in rows if _metric(r, key, mode) is not None]
                if not pts:
                    continue
                native = n in (f"topk-{N // 2}", f"topk-{N // 4}")
                ax.plot(
                    *zip(*pts, strict=True), "s" if native else "o-", label=n, ms=7 if native else 4, color=colour[n]
                )
            ax.set_xscale("log", base=2)
            ax.set_xlabel("granularity G")
            ax.set_title(f"{mode} truncation")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(label)
        if curves:
            axes[1].legend(fontsize=7)
        fig.tight_layout()
        figs[key] = _save(fig, out / f"{key}_vs_G.png")

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, metric in zip(axes, ("e_z2", "freq", "dec_cov_eigs"), strict=True):
        for n, fits in res["power_laws"].items():
            v = np.asarray(res["_series"][n][metric])
            v = np.sort(v[v > 0])[::-1]
            (line,) = ax.loglog(np.arange(1, len(v) + 1), v, lw=1.2, label=n, color=colour[n])
            f = fits[metric]
            r = np.array([f["lo"], f["hi"]], dtype=float)
            ax.loglog(r, np.exp(f["intercept"]) * r ** f["exponent"], "--", color=line.get_color(), lw=1)
        ax.set_title(metric)
        ax.set_xlabel("rank")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    figs["powerlaw"] = _save(fig, out / "power_laws.png")

    for p in res.get("pretrained", {}):  # each pretrained SAE: as given, and permuted two ways
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for n, style in ((p, "-"), (f"{p}-by-e_z2", "-"), (f"{p}-by-freq", "--")):
            curve = res["_curves"][n]
            axes[0].loglog(np.arange(1, len(curve) + 1), curve, style, label=n, color=colour[n], lw=1.3)
            rows = res["saes"][n]["table"]
            pts = [(r["G"], r["recaptured_prefix"]) for r in rows if r.get("recaptured_prefix") is not None]
            if pts:
                axes[1].plot(*zip(*pts, strict=True), "o" + style, label=n, color=colour[n], ms=4)
        axes[0].set_xlabel("granularity G (every G, one pass)")
        axes[0].set_ylabel("FVU, prefix truncation")
        axes[1].set_xscale("log", base=2)
        axes[1].set_xlabel("granularity G")
        axes[1].set_ylabel("recaptured LM loss, prefix")
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"pretrained SAE {p}", fontsize=10)
        fig.tight_layout()
        figs[f"pretrained:{p}"] = _save(fig, out / f"pretrained_{p}.png")

    fs = res["feature_splitting"]
    if fs:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        x = np.arange(len(fs))
        ax.bar(x - 0.2, [f["fvu_truncated"] for f in fs], 0.4, label=f"topk-{N} by E[z²], truncated")
        ax.bar(x + 0.2, [f["fvu_native"] for f in fs], 0.4, label="native SAE of size G")
        ax.set_xticks(x, [f"G={f['G']}" for f in fs])
        ax.set_ylabel("FVU (rescaled mode)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        figs["splitting"] = _save(fig, out / "feature_splitting.png")

    if not res["_history"]:
        return figs
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for n in sorted(res["_history"]):
        h = res["_history"][n]
        ax.plot([p["tokens"] for p in h], [p["fvu"] for p in h], label=n, color=colour[n])
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("training FVU (batch)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    figs["training"] = _save(fig, out / "training_curves.png")
    return figs


def table_rows(res: dict) -> list[dict]:
    rows = []
    for n, s in res["saes"].items():
        for r in s["table"]:
            row = {"sae": n, "d_sae": s["d_sae"], "G": r["G"], "l0_prefix": r["l0"], "dead_frac": r["dead_frac"]}
            for mode in MODES:
                row[f"fvu_{mode}"] = r[f"fvu_{mode}"]
                row[f"recaptured_{mode}"] = r.get(f"recaptured_{mode}")
                row[f"kl_{mode}"] = r.get(f"kl_{mode}")
                row[f"rsa_{mode}"] = _metric(r, "rsa", mode)
            rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: fmt(v) if isinstance(v, float) or v is None else v for k, v in r.items()})
    tmp.replace(path)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _table(rows: list[dict], cols: list[str]) -> str:
    def cell(v) -> str:  # text left-aligned, numbers right-aligned
        return f"<td class='t'>{html.escape(v)}</td>" if isinstance(v, str) else f"<td>{html.escape(fmt(v))}</td>"

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(cell(r[c]) for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(run_dir: str | Path) -> Path:
    """Tables, figures and report.html for the run in `run_dir` (reads results.json and the eval files)."""
    run_dir = Path(run_dir)
    res = load_json(run_dir / "results.json")
    from .analysis import load_stats

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
        _table(
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
        _table(
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
        _table(pl_rows, ["sae", "metric", "exponent", "r2", "lo", "hi"]),
        _img(figs["powerlaw"], "Importance against rank (log-log) with least-squares fits"),
        *(
            [
                "<h2>Feature splitting</h2>",
                _table(res["feature_splitting"], list(res["feature_splitting"][0])),
                _img(figs["splitting"], "Truncated large SAE against native SAE of the same size"),
            ]
            if res["feature_splitting"]
            else []
        ),
        "<h2>Scaling of FVU with G</h2><p>FVU(G) ≈ a·G<sup>−b</sup> + c, fitted to the one-pass prefix curve for G ≥ 16. "
        "A low R² means the curve is not a power law: a fixed-granularity Matryoshka curve steps at its granularities.</p>",
        _table(sc_rows, ["sae", "a", "b", "c", "r2"]),
        *(["<h2>Training</h2>", _img(figs["training"], "Training FVU against tokens")] if "training" in figs else []),
        "<h2>Configuration</h2>",
        f"<p>Granularities evaluated: {', '.join(map(str, res['grid']))}.</p>",
        f"<pre>{html.escape(_json(c))}</pre>",
        "<h3>Stage times</h3>",
        _table(
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
    parts.append(_table(rows, list(rows[0])))
    parts += [_img(figs[f"pretrained:{n}"], f"pretrained SAE {n}: as given and permuted") for n in res["pretrained"]]
    return parts


def _json(obj) -> str:
    import json

    return json.dumps(obj, indent=1)
