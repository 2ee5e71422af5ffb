"""The report's "shrinking" section: the vanilla SAE shrunk to N/8, N/4, N/2 by each method of `analysis.shrink`
against the native SAE of that size, with the tokens each spent (results.json's `shrink`, from study/shrink.py):
its table, tables/shrink.csv and a figure of FVU against tokens spent."""

from __future__ import annotations

import html
from pathlib import Path

from .figures import _legend, _plt, _save
from .tables import fmt, fmt_ci, html_table, write_csv

STYLE = {"truncate": ("x", "tab:blue"), "refit": ("o", "tab:orange"), "merge": ("s", "tab:purple"),
         "distil": ("D", "tab:red"), "native": ("*", "black")}  # fmt: skip


def shrink_rows(sr: dict, with_ci: bool = True) -> list[dict]:
    """One row per G and method (native last): FVU, ce_loss_score, share of the gap closed, tokens."""
    rows = []
    for r in sr["rows"]:
        entries = [*r["methods"].items(), *([("native", r["native"])] if r["native"] else [])]
        for m, e in entries:
            row = {"G": r["G"], "k": r["k"], "method": m, "sae": e["family"], "tokens": e["tokens"]}
            for key, col in (("fvu", "FVU"), ("ce_loss_score", "ce_loss_score"), ("gap_closed", "gap closed")):
                if with_ci:
                    v = e.get(key)
                    row[col] = (f"{v:.0%}" + (f" [{e[key + '_ci'][0]:.0%}, {e[key + '_ci'][1]:.0%}]"
                                              if e.get(key + "_ci") else "")) if key == "gap_closed" and v is not None \
                        else fmt_ci(v, e.get(f"{key}_ci"))  # fmt: skip
                else:
                    row[col], ci = e.get(key), e.get(f"{key}_ci") or (None, None)
                    row[f"{col}_lo"], row[f"{col}_hi"] = ci
            rows.append(row)
    return rows


def shrink_figure(sr: dict, out: Path) -> Path:
    """FVU against tokens spent, a panel per G: each method, and the native SAE."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(sr["rows"]), figsize=(4.2 * len(sr["rows"]), 3.8), sharey=True, squeeze=False)
    for ax, r in zip(axes[0], sr["rows"], strict=True):
        entries = [*r["methods"].items(), *([("native", r["native"])] if r["native"] else [])]
        for m, e in entries:
            ci = e.get("fvu_ci")
            err = [[max(0.0, e["fvu"] - ci[0])], [max(0.0, ci[1] - e["fvu"])]] if ci else None
            marker, colour = STYLE.get(m, ("o", "0.3"))
            hollow = {"mfc": "none", "ms": 11} if m == "refit" else {"ms": 6}  # refit and merge read the same rows
            ax.errorbar([max(e["tokens"], 1)], [e["fvu"]], yerr=err, marker=marker, ls="none", capsize=2, label=m,
                        color=colour, **hollow)  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"G = {r['G']} (k = {r['k']})")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out FVU")
    fig.supxlabel("activation rows read (truncate reads none: drawn at 1)", fontsize=9)
    _legend(axes[0][-1], 7)
    return _save(fig, out / "shrink.png")


def shrink_section(res: dict, tables: Path, figs_dir: Path, img) -> list[str]:
    """The section's HTML parts (none where the run shrank nothing); writes tables/shrink.csv and its figure."""
    sr = res.get("shrink")
    if not sr:
        return []
    write_csv(tables / "shrink.csv", shrink_rows(sr, with_ci=False))
    path = shrink_figure(sr, figs_dir)
    c = res["config"]
    return [
        "<h2>Shrinking a large SAE: the paper's first open question</h2>",
        f"<p>{html.escape(sr['base'])} (N = {sr['N']}) made into a G-latent SAE by each method of "
        "<code>progsae shrink</code>: <b>truncate</b> keeps its first G latents (k·G/N); <b>refit</b> re-solves their "
        "decoder and b_dec by least squares on their codes; <b>merge</b> groups all N decoder directions into G "
        "(weighted by E[z²]) so split pieces are recombined, then refits; <b>distil</b> fine-tunes the merged SAE. "
        f"The shrinks read {sr['rows_read']:,} training activations; distil then trains on "
        f"{sr['distil_tokens']:,} tokens; a native SAE trains on {c['sae_tokens']:,}. FVU is at the SAE's own "
        "size on held-out activations, with its 95% interval; <i>gap closed</i> is the share of the truncated "
        "prefix's FVU gap to the native SAE that the method closes, paired by seed, with the interval across "
        "seeds. Tokens are the activation rows each read (all methods also rely on the importance order's "
        f"statistics pass over {c.get('stats_tokens', 0):,} tokens, shared and not counted).</p>",
        html_table(shrink_rows(sr), ["G", "k", "method", "sae", "FVU", "ce_loss_score", "gap closed", "tokens"]),
        img(path, "FVU of each shrink method and the native SAE against tokens spent"),
        f"<p>Table: <code>tables/shrink.csv</code>; figure: <code>figures/{path.name}</code>. "
        f"Best FVU at the smallest G: {fmt(min(e['fvu'] for e in sr['rows'][0]['methods'].values()))}.</p>",
    ]
