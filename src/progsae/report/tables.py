"""The report's numbers: how each is formatted, the CSV tables, and HTML tables (one formatter for both)."""

from __future__ import annotations

import csv
import html
from pathlib import Path

from ..files import atomic

# the results table: (column, key in a family's table row); each value shown with its 95% interval
RESULT_COLUMNS = (
    ("fvu_prefix", "fvu_prefix"),
    ("fvu_rescaled", "fvu_rescaled"),
    ("fvu_typical_prefix", "fvu_typical_prefix"),
    ("fvu_typical_rescaled", "fvu_typical_rescaled"),
    ("l0_prefix", "l0"),
    ("l0_rescaled", "l0_rescaled"),
    ("ce_loss_score_prefix", "ce_loss_score_prefix"),  # SAELens' definition: the headline LM number
    ("ce_loss_score_rescaled", "ce_loss_score_rescaled"),
    ("kl_div_with_sae_prefix", "kl_div_with_sae_prefix"),
    ("kl_div_with_sae_rescaled", "kl_div_with_sae_rescaled"),
    ("recaptured_prefix", "recaptured_prefix"),  # progsae's definition (see analysis/lm_eval.py)
    ("recaptured_rescaled", "recaptured_rescaled"),
    ("recaptured_vs_mean_prefix", "recaptured_mean_prefix"),
    ("recaptured_vs_mean_rescaled", "recaptured_mean_rescaled"),
    ("dce_prefix", "dce_prefix"),
    ("dce_rescaled", "dce_rescaled"),
    ("kl_prefix", "kl_prefix"),
    ("kl_rescaled", "kl_rescaled"),
    ("rsa_prefix", "rsa_prefix"),
    ("rsa_rescaled", "rsa_rescaled"),
    ("rsa_typical_prefix", "rsa_typical_prefix"),
    ("rsa_typical_rescaled", "rsa_typical_rescaled"),
    ("dead_frac", "dead_frac"),
)

# the reconstruction table: FVU and RSA on all tokens with the same on typical tokens beside them
RECONSTRUCTION = ("fvu_prefix", "fvu_rescaled", "fvu_typical_prefix", "fvu_typical_rescaled", "l0_prefix",
                  "l0_rescaled", "rsa_prefix", "rsa_rescaled", "rsa_typical_prefix", "rsa_typical_rescaled",
                  "dead_frac")  # fmt: skip


def fmt(v) -> str:
    """How every number appears on the page and in the tables."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    return f"{v:.4f}"


def fmt_ci(v, ci) -> str:
    """A mean with its 95% interval: "0.1234 [0.1200, 0.1250]" (the mean alone where there is no interval)."""
    return fmt(v) if not ci or v is None else f"{fmt(v)} [{fmt(ci[0])}, {fmt(ci[1])}]"


def seconds(v: float) -> str:
    return f"{v:,.0f} s"


def result_rows(res: dict, with_ci: bool = True) -> list[dict]:
    """One row per family and G: every metric as mean [interval] (page), or mean, lo, hi columns (CSV)."""
    rows = []
    for fam, f in res["families"].items():
        for r in f["table"]:
            row = {"sae": fam, "seeds": len(f["seeds"]), "d_sae": f["d_sae"], "G": r["G"]}
            for col, key in RESULT_COLUMNS:
                ci = r.get(f"{key}_ci")
                if with_ci:
                    row[col] = fmt_ci(r.get(key), ci)
                else:
                    row[col], row[f"{col}_lo"], row[f"{col}_hi"] = r.get(key), *(ci or (None, None))
            rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with atomic(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: fmt(v) if isinstance(v, float) or v is None else v for k, v in r.items()})


def html_table(rows: list[dict], cols: list[str]) -> str:
    def cell(v) -> str:  # text left-aligned, numbers right-aligned
        if isinstance(v, str):
            numeric = v[:1].isdigit() or v[:1] in "-–" and v[1:2].isdigit()
            return f"<td{'' if numeric else ' class=t'}>{html.escape(v)}</td>"
        return f"<td>{html.escape(fmt(v))}</td>"

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(cell(r.get(c)) for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
