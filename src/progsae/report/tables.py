"""The report's numbers: how each is formatted, the CSV tables, and HTML tables (one formatter for both)."""

from __future__ import annotations

import csv
import html
from pathlib import Path

MODES = ("prefix", "rescaled")


def fmt(v) -> str:
    """How every number appears on the page and in the tables."""
    if v is None:
        return "–"
    if isinstance(v, int):
        return str(v)
    return f"{v:.4f}"


def metric(row: dict, key: str, mode: str):
    v = row.get(f"{key}_{mode}")
    return v["cosine"]["spearman"] if key == "rsa" and v is not None else v


def table_rows(res: dict) -> list[dict]:
    rows = []
    for n, s in res["saes"].items():
        for r in s["table"]:
            row = {"sae": n, "d_sae": s["d_sae"], "G": r["G"], "l0_prefix": r["l0"], "dead_frac": r["dead_frac"]}
            for mode in MODES:
                row[f"fvu_{mode}"] = r[f"fvu_{mode}"]
                row[f"recaptured_{mode}"] = r.get(f"recaptured_{mode}")
                row[f"kl_{mode}"] = r.get(f"kl_{mode}")
                row[f"rsa_{mode}"] = metric(r, "rsa", mode)
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


def html_table(rows: list[dict], cols: list[str]) -> str:
    def cell(v) -> str:  # text left-aligned, numbers right-aligned
        return f"<td class='t'>{html.escape(v)}</td>" if isinstance(v, str) else f"<td>{html.escape(fmt(v))}</td>"

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(cell(r[c]) for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
