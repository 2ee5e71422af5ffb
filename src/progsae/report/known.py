"""The report's "known answers" section: recovery of the true features at every G (results.json's
`known_answers`, from study/known.py), its table, CSV and two figures. Shown for any run whose held-out
activations carry truth."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from .figures import _legend, _plt, _save, styles
from .tables import fmt_ci, html_table, write_csv

COLUMNS = (("mcc", "MCC"), ("recovered", "recovered"), ("recovered_parents", "parents recovered"),
           ("recovered_top_decile", "top decile recovered"), ("f1_prefix", "F1 prefix"), ("f1_rescaled", "F1 rescaled"),
           ("absorption_prefix", "absorption prefix"), ("absorption_rescaled", "absorption rescaled"),
           ("uniqueness", "uniqueness"))  # fmt: skip


def known_rows(ka: dict, with_ci: bool = True) -> list[dict]:
    rows = []
    for fam, f in ka["families"].items():
        for r in f["table"]:
            row = {"sae": fam, "G": r["G"]}
            for key, col in COLUMNS:
                if with_ci:
                    row[col] = fmt_ci(r.get(key), r.get(f"{key}_ci"))
                else:
                    row[col] = r.get(key)
            row["recovered by depth"] = ", ".join(f"{v:.3f}" for v in r.get("recovered_depth", []))
            rows.append(row)
    return rows


def known_figures(res: dict, out: Path) -> dict[str, Path]:
    """recovered(G) by depth (a panel per depth) and MCC(G), one line per trained family."""
    plt, ka, st = _plt(), res["known_answers"], styles(res)
    fams = [f for f in ka["families"] if res["families"][f]["role"] in ("vanilla", "matryoshka")]
    depths = len(ka["depth_counts"])
    fig, axes = plt.subplots(1, depths, figsize=(4.2 * depths, 3.8), sharey=True, squeeze=False)
    for d, ax in enumerate(axes[0]):
        for fam in fams:
            rows = ka["families"][fam]["table"]
            ax.plot([r["G"] for r in rows], [r["recovered_depth"][d] for r in rows], marker="o", ms=3,
                    color=st[fam]["color"], ls=st[fam]["ls"], label=fam)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("granularity G")
        ax.set_title(f"depth {d} ({ka['depth_counts'][d]} features)" + (": roots and flat" if d == 0 and depths > 1 else ""))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("true features recovered (cos ≥ 0.9)")
    _legend(axes[0][-1], 7)
    figs = {"known_recovered": _save(fig, out / "known_recovered.png")}
    fig, ax = plt.subplots(figsize=(6, 4))
    for fam in fams:
        rows = ka["families"][fam]["table"]
        y = np.array([r["mcc"] for r in rows])
        ci = [r.get("mcc_ci") for r in rows]
        err = np.abs(np.array(ci).T - y) if all(ci) else None
        ax.errorbar([r["G"] for r in rows], y, yerr=err, color=st[fam]["color"], ls=st[fam]["ls"], marker="o", ms=3,
                    capsize=2, label=fam)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("granularity G")
    ax.set_ylabel("MCC of the first G latents")
    ax.grid(alpha=0.3)
    _legend(ax, 7)
    figs["known_mcc"] = _save(fig, out / "known_mcc.png")
    return figs


def known_section(res: dict, tables: Path, figs_dir: Path, img) -> list[str]:
    """The section's HTML parts (none without truth); writes tables/known_answers.csv and its figures."""
    ka = res.get("known_answers")
    if not ka:
        return []
    write_csv(tables / "known_answers.csv", known_rows(ka, with_ci=False))
    figs = known_figures(res, figs_dir)
    depth = ", ".join(f"{n} at depth {d}" for d, n in enumerate(ka["depth_counts"]))
    return [
        "<h2>Known answers: recovery of the true features at every G</h2>",
        f"<p>The held-out activations carry their truth: {ka['n_features']} true features ({html.escape(depth)}). "
        "Each SAE is read in its stored order, so a permuted SAE and a Matryoshka SAE are compared as progressive "
        "codes. MCC: Hungarian matching of the first G decoder rows to the true features by |cos|, mean of the "
        "matched similarities (SAELens' definition at G = N). Recovered: the share of true features whose best match "
        "among the first G latents has cos ≥ 0.9; parents: of the features with children; top decile: of the most "
        "frequent tenth. F1: each of the first G latents as a detector of its best-matching feature on the held-out "
        "rows (SAELens' per-latent definition), averaged. Absorption: for each recovered parent, the share of the rows "
        "where it and one of its children fire on which its latent is off. Intervals: across seeds.</p>",
        html_table(known_rows(ka), ["sae", "G", *(c for _, c in COLUMNS), "recovered by depth"]),
        img(figs["known_recovered"], "True features recovered by the first G latents, by depth in the hierarchy"),
        img(figs["known_mcc"], "MCC of the first G latents against the true features (95% intervals across seeds)"),
    ]
