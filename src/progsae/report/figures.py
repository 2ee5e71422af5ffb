"""The report's figures, as PNG files under RUN_DIR/figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .tables import MODES, metric


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
                pts = [(r["G"], metric(r, key, mode)) for r in rows if metric(r, key, mode) is not None]
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
    for ax, stat in zip(axes, ("e_z2", "freq", "dec_cov_eigs"), strict=True):
        for n, fits in res["power_laws"].items():
            v = np.asarray(res["_series"][n][stat])
            v = np.sort(v[v > 0])[::-1]
            (line,) = ax.loglog(np.arange(1, len(v) + 1), v, lw=1.2, label=n, color=colour[n])
            f = fits[stat]
            r = np.array([f["lo"], f["hi"]], dtype=float)
            ax.loglog(r, np.exp(f["intercept"]) * r ** f["exponent"], "--", color=line.get_color(), lw=1)
        ax.set_title(stat)
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
