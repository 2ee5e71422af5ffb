"""The report's figures, as PNG files under RUN_DIR/figures.

Every family of SAEs keeps one style in every figure: colour by method (vanilla unsorted, sorted by E[z²],
sorted by frequency, native sizes, fixed and sampled Matryoshka, pretrained), line style by variant.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..analysis.scaling import predict
from ..files import atomic
from ..sae import MODES

MARKER_NATIVE = "s"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    _plt().close(fig)
    return path


def _legend(ax, size: int) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=size)


def sorted_copy(res: dict, base: str, metric: str) -> str:
    """The family of `base`'s latents sorted by `metric` (from the run's plan)."""
    return next(f for f, p in res["plan"].items() if p["base"] == base and p["metric"] == metric)


def styles(res: dict) -> dict[str, dict]:
    """family -> matplotlib style, from the family's role in the plan: the same in every figure."""
    N = res["config"]["d_sae"]
    vanilla = {None: {"color": "0.45", "ls": ":"}, "e_z2": {"color": "tab:blue", "ls": "-"},
               "freq": {"color": "tab:blue", "ls": "--"}}  # fmt: skip
    nested = iter(["tab:orange", "tab:red", "tab:olive", "tab:gray"])
    out, others = {}, iter(["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "0.2"])
    pre_colour: dict[str, str] = {}
    for fam, f in res["families"].items():
        p = res["plan"][fam]
        if f["role"] == "vanilla":
            out[fam] = vanilla[p["metric"]]
        elif f["role"] == "matryoshka":
            out[fam] = {"color": next(nested, "0.3"), "ls": "-"}
        elif f["role"] == "native":  # greens, darker for larger
            shade = 0.45 + 0.5 * np.log2(f["d_sae"] / (N / 8)) / 3
            out[fam] = {"color": _plt().cm.Greens(shade), "ls": "none", "marker": MARKER_NATIVE}
        elif f["role"] == "shrunk":  # in the figures of their own section (report/shrink.py)
            out[fam] = {"color": "0.5", "ls": "none", "marker": "."}
        else:  # pretrained: one colour per SAE; as given solid, sorted dashed / dotted
            colour = pre_colour.setdefault(p["base"] or fam, next(others, "0.3"))
            out[fam] = {"color": colour, "ls": {"e_z2": "--", "freq": ":"}.get(p["metric"], "-")}
    return out


def _trained(res: dict) -> list[str]:
    return [f for f, v in res["families"].items() if v["role"] not in ("pretrained", "shrunk")]


def figures(res: dict, out: Path) -> dict[str, Path]:
    """Every figure of the report, as PNG files in the directory `out`: name -> path."""
    plt = _plt()
    st = styles(res)
    figs = {}
    fams = _trained(res)
    first_native = next((f for f in fams if res["families"][f]["role"] == "native"), None)

    # metrics at the table's G, with 95% intervals
    for key, label in (
        ("fvu", "FVU (lower is better)"),
        ("recaptured", "recaptured LM loss (vs zero ablation)"),
        ("rsa", "RSA (Spearman, cosine)"),
    ):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, mode in zip(axes, MODES, strict=True):
            for fam in fams:
                rows = [r for r in res["families"][fam]["table"] if r.get(f"{key}_{mode}") is not None]
                if not rows:
                    continue
                x = np.array([r["G"] for r in rows])
                y = np.array([r[f"{key}_{mode}"] for r in rows])
                ci = [r.get(f"{key}_{mode}_ci") for r in rows]
                err = None
                if all(ci):
                    err = np.abs(np.array(ci).T - y)
                s = st[fam]
                if s.get("marker") == MARKER_NATIVE:  # a native SAE: only its own size
                    x, y, err = x[-1:], y[-1:], None if err is None else err[:, -1:]
                ax.errorbar(x, y, yerr=err, color=s["color"], ls=s["ls"], marker=s.get("marker", "o"), ms=4,
                            capsize=2, label=fam if s.get("marker") != MARKER_NATIVE else "native SAEs (own size)" if fam == first_native else None)  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set_xlabel("granularity G")
            ax.set_ylabel(label)
            ax.set_title(f"{mode} truncation")
            ax.grid(alpha=0.3)
        _legend(axes[1], 7)
        fig.suptitle("Native SAEs (green squares) at their own size; bars: 95% intervals", fontsize=9)
        fig.tight_layout()
        figs[key] = _save(fig, out / f"{key}_vs_G.png")

    curves = res["curves"]
    # the full one-pass curve: every G, log-log, with the nonlinear fits over their ranges
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for fam in fams:
        if fam not in curves or st[fam].get("marker") == MARKER_NATIVE:
            continue
        c = curves[fam]["fvu_prefix"]
        axes[0].loglog(np.arange(1, len(c) + 1), c, color=st[fam]["color"], ls=st[fam]["ls"], lw=1.3, label=fam)
        if fam in res["scaling"]:
            f = res["scaling"][fam]
            G = np.geomspace(f["G_min"], f["G_max"], 100)
            axes[1].loglog(np.arange(1, len(c) + 1), c, color=st[fam]["color"], ls=st[fam]["ls"], lw=1, alpha=0.5)
            r2 = "no goodness of fit" if f["r2"] is None else f"R² {f['r2']:.3f}"
            axes[1].loglog(G, predict(f, G), color=st[fam]["color"], lw=2.2, alpha=0.8,
                           label=f"{fam}: {f['a']:.2f}·G^-{f['b']:.2f} + {f['c']:.3f} ({r2})")  # fmt: skip
    nat = [(f, v) for f, v in res["families"].items() if v["role"] in ("native", "vanilla") and not res["plan"][f]["metric"]]
    for fam, v in nat:
        colour = st[fam]["color"] if v["role"] == "native" else plt.cm.Greens(0.95)
        axes[0].plot(v["d_sae"], v["table"][-1]["fvu_prefix"], MARKER_NATIVE, color=colour, ms=6)
    for ax in axes:
        ax.set_xlabel("granularity G (every G from one pass; prefix truncation)")
        ax.set_ylabel("FVU")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_title("FVU at every G (green squares: native SAEs at their size)")
    axes[1].set_title("fits FVU(G) = a·G^-b + c (thick) over the data (thin)")
    _legend(axes[0], 7)
    _legend(axes[1], 6)
    fig.tight_layout()
    figs["curve"] = _save(fig, out / "fvu_curve.png")

    # FVU against L0: each prefix curve traced over G, rescaled points at the table's G, native SAEs
    fig, ax = plt.subplots(figsize=(6.5, 4.3))
    for fam in fams:
        s = st[fam]
        if fam in curves and s.get("marker") != MARKER_NATIVE:
            c = curves[fam]
            keep = np.asarray(c["l0"]) > 0
            ax.loglog(np.asarray(c["l0"])[keep], np.asarray(c["fvu_prefix"])[keep], color=s["color"], ls=s["ls"],
                      lw=1.3, label=f"{fam} (prefix, every G)")  # fmt: skip
        rows = [r for r in res["families"][fam]["table"] if r.get("fvu_rescaled") is not None]
        if s.get("marker") == MARKER_NATIVE:
            rows = rows[-1:]
        if rows:
            ax.loglog([r["l0_rescaled"] for r in rows], [r["fvu_rescaled"] for r in rows], s.get("marker", "o"),
                      color=s["color"], ms=5, mfc="none" if s.get("marker") != MARKER_NATIVE else s["color"])  # fmt: skip
    ax.set_xlabel("L0 (mean active latents per token)")
    ax.set_ylabel("FVU")
    ax.set_title("FVU against L0 (open circles: rescaled mode at the table's G)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    _legend(ax, 6)
    fig.tight_layout()
    figs["l0"] = _save(fig, out / "fvu_vs_l0.png")

    # activation norms
    o = res["outliers"]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    e, cnt = np.asarray(o["histogram"]["edges"]), np.asarray(o["histogram"]["counts"])
    ax.stairs(cnt, e, fill=True, alpha=0.6, color="tab:blue")
    ax.axvline(o["threshold"], color="tab:red", ls="--", label=f"outlier threshold (quantile {o['quantile']})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("activation norm ||x||")
    ax.set_ylabel("tokens")
    _legend(ax, 8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    figs["norms"] = _save(fig, out / "activation_norms.png")

    # power laws: importance against rank, full-window fit dotted, robust-window fit dashed, outlier latents marked
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    labels = {"e_z2": "E[z²] of the latent", "freq": "firing frequency", "dec_cov_eigs": "eigenvalue of decoder cov."}
    for ax, stat in zip(axes, ("e_z2", "freq", "dec_cov_eigs"), strict=True):
        for n, fits in res["power_laws"].items():
            fam = res["saes"][n]["family"] if n in res["saes"] else n
            if res["saes"].get(n, {}).get("seed", 0) or fam not in st:
                continue
            s = st[fam]
            v = np.asarray(res["series"][n][stat])
            order = np.argsort(-v, kind="stable")
            v = v[order]
            pos = v > 0
            ranks = np.arange(1, len(v) + 1)
            ax.loglog(ranks[pos], v[pos], lw=1.1, color=s["color"], ls=s["ls"] if s["ls"] != "none" else "-",
                      alpha=0.9 if s.get("marker") != MARKER_NATIVE else 0.5, label=n)  # fmt: skip
            for which, ls in (("full", ":"), ("robust", "--")):
                f = fits[stat][which]
                r = np.array([f["lo"], f["hi"]], dtype=float)
                ax.loglog(r, np.exp(f["intercept"]) * r ** f["exponent"], ls, color="k", lw=0.8, alpha=0.6)
            if stat == "e_z2" and fits["outlier_latents"]["count"]:
                rank_of = np.empty(len(order), int)
                rank_of[order] = ranks
                flagged = np.asarray(fits["outlier_latents"]["top"], int)
                ax.loglog(rank_of[flagged], np.asarray(res["series"][n][stat])[flagged], "x", color=s["color"], ms=5)
        ax.set_title(f"{stat}: fits dotted (ranks 1..N/2), dashed (robust window)", fontsize=8)
        ax.set_xlabel("rank")
        ax.set_ylabel(labels[stat])
        ax.grid(alpha=0.3, which="both")
    _legend(axes[0], 6)
    fig.suptitle("x: outlier latents (most of their E[z²] on outlier tokens)", fontsize=9)
    fig.tight_layout()
    figs["powerlaw"] = _save(fig, out / "power_laws.png")

    for p in res.get("pretrained", {}):  # each pretrained SAE: as given, and permuted two ways
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for n in (p, sorted_copy(res, p, "e_z2"), sorted_copy(res, p, "freq")):
            c, s = curves[n]["fvu_prefix"], st[n]
            axes[0].loglog(np.arange(1, len(c) + 1), c, color=s["color"], ls=s["ls"], label=n, lw=1.3)
            rows = res["families"][n]["table"]
            pts = [(r["G"], r["recaptured_prefix"]) for r in rows if r.get("recaptured_prefix") is not None]
            if pts:
                axes[1].plot(*zip(*pts, strict=True), "o", ls=s["ls"], label=n, color=s["color"], ms=4)
        axes[0].set_xlabel("granularity G (every G, one pass)")
        axes[0].set_ylabel("FVU, prefix truncation")
        axes[1].set_xscale("log", base=2)
        axes[1].set_xlabel("granularity G")
        axes[1].set_ylabel("recaptured LM loss, prefix")
        for ax in axes:
            ax.grid(alpha=0.3)
        _legend(axes[0], 7)
        fig.suptitle(f"pretrained SAE {p}", fontsize=10)
        fig.tight_layout()
        figs[f"pretrained:{p}"] = _save(fig, out / f"pretrained_{p}.png")

    fs = res["feature_splitting"]
    if fs:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        x = np.arange(len(fs))
        ax.bar(x - 0.2, [f["fvu_truncated"] for f in fs], 0.4, label=f"{next(f for f in fams if res['families'][f]['role'] == 'vanilla')} by E[z²], truncated", color="tab:blue")
        ax.bar(x + 0.2, [f["fvu_native"] for f in fs], 0.4, label="native SAE of size G", color="tab:green")
        ax.set_xticks(x, [f"G={f['G']}" for f in fs])
        ax.set_ylabel("FVU (rescaled mode)")
        ax.set_xlabel("granularity G")
        _legend(ax, 8)
        fig.tight_layout()
        figs["splitting"] = _save(fig, out / "feature_splitting.png")

    if res.get("training"):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for n, h in sorted(res["history"].items()):
            fam = res["saes"].get(n, {}).get("family", n)
            s = st.get(fam, {"color": "0.3", "ls": "-"})
            ax.plot([p["tokens"] for p in h], [p["fvu"] for p in h], color=s["color"],
                    ls=s["ls"] if s["ls"] != "none" else "-", label=n, lw=1)  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("training FVU (batch)")
        _legend(ax, 6)
        ax.grid(alpha=0.3, which="both")
        fig.tight_layout()
        figs["training"] = _save(fig, out / "training_curves.png")

    study = res.get("interpretability", {}).get("saes", {})
    if study:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name, it in study.items():
            s = st.get(res["saes"].get(name, {}).get("family", name), {"color": "0.3", "ls": "-"})
            ls = s["ls"] if s["ls"] != "none" else "-"
            pts = [(x["latent"] + 1, x["simulation"]) for x in it["scores"] if x["simulation"] is not None]
            if pts:
                axes[0].scatter(*zip(*pts, strict=True), color=s["color"], s=12, alpha=0.6)
            b = [x for x in it["bands"] if x["simulation"]["mean"] is not None]
            if b:
                axes[0].plot([x["hi"] for x in b], [x["simulation"]["mean"] for x in b], color=s["color"], ls=ls,
                             marker="o", ms=4, label=name)  # fmt: skip
            b = [x for x in it["bands"] if x["lens_agreement"] is not None]
            axes[1].plot([x["hi"] for x in b], [x["lens_agreement"] for x in b], color=s["color"], ls=ls, marker="o",
                         ms=4, label=name)  # fmt: skip
        axes[0].set_ylabel(f"simulation score ({res['interpretability'].get('judge') or 'no judge'})")
        axes[0].set_title("auto-interp: dots per latent, lines: band means", fontsize=9)
        axes[1].set_ylabel("lens agreement (mean over the band's live latents)")
        axes[1].set_title("LLM-free proxy, every latent", fontsize=9)
        for ax in axes:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("latent, in the SAE's order: E[z²] (permuted) or nesting (Matryoshka); band means at the band's end", fontsize=8)
            ax.grid(alpha=0.3)
        _legend(axes[1], 7)
        fig.tight_layout()
        figs["interp"] = _save(fig, out / "interpretability.png")
    return figs
