"""`progsae browse`: a static feature browser that opens from disk (no server; `--serve` for localhost).

DIR/index.html     every latent in importance order (E[z²] over the records' tokens): rank, id, frequency,
                   E[z²], auto-interp score where scored, token entropy, lens agreement, a histogram
                   sparkline; search by latent id or token
DIR/latents/I.html one page per latent: its explanation and scores (with the judge) where scored; its top
                   contexts, contexts at quantiles of its activations and random contexts where it does not
                   fire, tokens shaded by the latent's activation; its logit-lens tokens, its nearest latents
                   by decoder cosine, its Matryoshka band
DIR/latents.js     the list's data (rank order; histograms as one digit per bin), rendered PAGE rows at a time
DIR/style.css, DIR/index.js, DIR/tokens.js   shared by every page (pages carry no copy)
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..analysis.importance import SAE_HELP
from ..config import REQUIRED, opt
from ..data import ActivationDir
from ..files import fresh_dir, replace_dir
from ..interp.proxies import proxies
from ..interp.records import TextRows, latent_records, non_activating, quantile_rows
from ..interp.study import WINDOW  # the tokens shown around an activation, as the judge sees them
from ..sae import SAE

CSS = """body{font-family:sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
td.t{text-align:left}.ctx{font-family:monospace;font-size:13px;margin:3px 0;white-space:pre-wrap}
.hi{outline:1px solid #c00}.lens span{display:inline-block;margin:2px;padding:1px 5px;
background:#eef;border-radius:3px;font-family:monospace}.expl{background:#f6f6f0;padding:6px 10px}"""

PAGE = 500  # index rows shown at a time: a 65K-latent list stays light


@dataclass
class BrowseArgs:
    """`progsae browse`'s arguments (see cli.py)."""

    sae: str = opt(REQUIRED, SAE_HELP, positional=True)
    acts: str = opt(REQUIRED, "activation directory from `progsae extract` (held-out split)", positional=True)
    out: str = opt(REQUIRED, "directory to write (index.html opens from disk)")
    tokens: int = opt(50_000, "rows of ACTS to read", min=1)
    model: str | None = opt(None, "model for the logit lens and the tokens (default: the one ACTS was extracted from)")
    serve: int | None = opt(None, "then serve it on http://127.0.0.1:PORT (default 8000) until Ctrl-C",
                            const=8000, metavar="PORT", min=0, max=65535)  # fmt: skip

INDEX_JS = """function go(){const q=document.getElementById('q').value.trim();const out=document.getElementById('hits');
out.innerHTML='';if(!q)return;if(/^\\d+$/.test(q)){location.href='latents/'+q+'.html';return;}
const ids=(window.TOKENS||{})[q]||(window.TOKENS||{})[' '+q]||[];
for(const i of ids){const a=document.createElement('a');a.href='latents/'+i+'.html';a.textContent='latent '+i;
a.className='hit';out.appendChild(a);out.appendChild(document.createTextNode(' '));}
if(!ids.length)out.textContent='no latent has '+JSON.stringify(q)+' among its top tokens';}
let start=0;const NS='http://www.w3.org/2000/svg';
function num(v,d){return v===null?'–':(d?v.toPrecision(4):v.toFixed(2));}
function spark(h){const s=document.createElementNS(NS,'svg');s.setAttribute('width',2*h.length);s.setAttribute('height',16);
s.setAttribute('fill','#48c');for(let i=0;i<h.length;i++){const v=(+h[i])*16/9;if(!v)continue;
const r=document.createElementNS(NS,'rect');r.setAttribute('x',2*i);r.setAttribute('y',16-v);r.setAttribute('width',2);
r.setAttribute('height',v);s.appendChild(r);}return s;}
function show(){const L=window.LATENTS,body=document.getElementById('rows');body.innerHTML='';
const end=Math.min(L.length,start+PAGE);for(let r=start;r<end;r++){const [id,f,e,sc,en,ag,h]=L[r];
const tr=document.createElement('tr');const a=document.createElement('a');a.href='latents/'+id+'.html';a.textContent=id;
const cells=[r+1,a,f.toFixed(4),num(e,1),num(sc),num(en),num(ag)];
for(const c of cells){const td=document.createElement('td');if(c instanceof Node)td.appendChild(c);else td.textContent=c;tr.appendChild(td);}
const td=document.createElement('td');td.appendChild(spark(h));tr.appendChild(td);body.appendChild(tr);}
document.getElementById('span').textContent='ranks '+(start+1)+'-'+end+' of '+L.length;}
function page(d){const n=window.LATENTS.length;start=Math.max(0,Math.min(start+d*PAGE,(Math.ceil(n/PAGE)-1)*PAGE));show();}
window.addEventListener('load',()=>{show();const m=location.hash.match(/^#q=(.*)/);
if(m){document.getElementById('q').value=decodeURIComponent(m[1]);go();}});"""


def _num(v, f: str = ".2f") -> str:
    return "–" if v is None or (isinstance(v, float) and v != v) else format(float(v), f)


def browse(sae: SAE, acts: ActivationDir, out: str | Path, model=None, tokenizer=None, max_tokens: int = 50_000,
           n_top: int = 12, n_sample: int = 8, progress: bool = True) -> Path:  # fmt: skip
    """Write the browser for `sae` over the first `max_tokens` rows of the extracted directory `acts`."""
    rows = TextRows(acts, max_tokens, sae, tokenizer)
    rec = latent_records(sae, rows.x.split(4096), n_top=n_top, n_sample=n_sample)
    unemb = model.get_output_embeddings().weight if model is not None else None
    prox = proxies(sae, rec, acts, rows.contexts, unemb) if unemb is not None else None
    return write_site(sae, rows, rec, prox, out, f"{rows.n:,} tokens of {acts.path}")


def write_site(sae: SAE, rows: TextRows, rec: dict, prox: dict | None, out: str | Path, source: str,
               scores: dict | None = None, n_top: int = 12, n_quantile: int = 8, n_random: int = 3) -> Path:  # fmt: skip
    """The site from a records pass (`rec`) and its proxies; `scores`: {"judge", "scores": [...]} as in interp/NAME.json."""
    order = torch.sort(rec["e_z2"], descending=True, stable=True).indices.tolist()
    W = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=1)
    bands = sae.cfg.progsae.get("granularities") or []
    scored = {s["latent"]: s for s in (scores or {}).get("scores", [])}
    judge = (scores or {}).get("judge", "")
    tmp = fresh_dir(Path(str(out) + ".tmp"))
    (tmp / "latents").mkdir()
    (tmp / "style.css").write_text(CSS)
    (tmp / "index.js").write_text(f"const PAGE={PAGE};\n" + INDEX_JS)

    def context_html(row: int, latent: int, top: float) -> str:
        tokens, acts = rows.example(row, latent, *WINDOW)
        first = row - rows.window(row, *WINDOW).index(row)
        spans = []
        for j, (t, a) in enumerate(zip(tokens, acts, strict=True)):  # tokens that do not fire carry no markup
            hi = " class=hi" if first + j == row else ""
            alpha = 0 if top <= 0 else min(1.0, a / top)
            shade = f" title={a:.3f} style=background:rgba(255,120,0,{alpha:.2f})" if a > 0 else ""
            spans.append(f"<span{hi}{shade}>{html.escape(t)}</span>" if hi or shade else html.escape(t))
        return f"<div class='ctx'>{''.join(spans)}</div>"

    tokens_index: dict[str, list[int]] = {}
    rank_of = {latent: r + 1 for r, latent in enumerate(order)}
    for latent in order:
        top_rows = [int(r) for r in rec["top_rows"][latent] if r >= 0][:n_top]
        top = float(rec["top_values"][latent, 0])
        for r in top_rows[:3]:
            tokens_index.setdefault(rows.text(int(rows.token_ids[r])), []).append(latent)
        near = (W @ W[latent]).topk(min(6, sae.d_sae)).indices.tolist()[1:]
        band = next((b for b in bands if latent < b), None)
        lens = "".join(f"<span>{html.escape(rows.text(int(t)))}</span>" for t in prox["logit_lens"][latent]) if prox else "–"
        body = [
            f"<p><a href='../index.html'>all latents</a></p><h1>latent {latent}</h1>",
            f"<p>rank {rank_of[latent]} of {sae.d_sae} by E[z²] over these tokens ({float(rec['e_z2'][latent]):.4g}), frequency "
            f"{float(rec['freq'][latent]):.4g}, max {top:.3f}"
            + (f", Matryoshka band: latents below {band}" if band else "") + "</p>",
        ]  # fmt: skip
        if latent in scored:
            s = scored[latent]
            body.append(
                f"<p class='expl'>Explanation: <b>{html.escape(s['explanation'] or '–')}</b><br>simulation "
                f"{_num(s['simulation'])}, detection AUROC {_num(s['detection_auroc'])}, balanced accuracy "
                f"{_num(s['detection_bacc'])} (judge: {html.escape(judge)})"
                + (f"; {html.escape(s['error'])}" if s.get("error") else "") + "</p>"
            )  # fmt: skip
        sample = quantile_rows(rec, latent, n_quantile)
        body += [
            f"<h2>logit lens</h2><div class='lens'>{lens}</div>",
            "<h2>top activations</h2>" + "".join(context_html(r, latent, top) for r in top_rows),
            "<h2>at quantiles of its activations (high to low)</h2>"
            + "".join(context_html(r, latent, top) for r in sample),
            "<h2>random contexts where it does not fire</h2>"
            + "".join(context_html(r, latent, top) for r in non_activating(rec, latent, n_random)),
            "<h2>nearest latents by decoder cosine</h2><p>"
            + " ".join(f"<a href='{j}.html'>{j}</a> ({float(W[j] @ W[latent]):.2f})" for j in near) + "</p>",
        ]  # fmt: skip
        _page(tmp / "latents" / f"{latent}.html", f"latent {latent}", "".join(body), "../")
    def r4(v):
        return None if v is None or v != v else float(f"{float(v):.4g}")

    listing = []
    for latent in order:
        h = rec["hist"][latent].double()
        h = (9 * h / h.max()).round().int().tolist() if h.max() > 0 else [0] * len(h)
        listing.append([latent, r4(rec["freq"][latent]), r4(rec["e_z2"][latent]),
                        r4(scored[latent]["simulation"]) if latent in scored else None,
                        r4(prox["token_entropy"][latent]) if prox else None,
                        r4(prox["lens_agreement"][latent]) if prox else None, "".join(map(str, h))])  # fmt: skip
    (tmp / "latents.js").write_text("window.LATENTS=" + json.dumps(listing, separators=(",", ":")) + ";")
    (tmp / "tokens.js").write_text("window.TOKENS=" + json.dumps(tokens_index) + ";")
    judged = f" Scores: simulation correlation by {html.escape(judge)}, {len(scored)} latents." if scored else ""
    index = (
        f"<h1>{sae.d_sae} latents, by importance</h1><p>Over {html.escape(source)}.{judged} "
        "Search a latent id or a token: <input id='q' onkeydown=\"if(event.key==='Enter')go()\"> "
        "<button onclick='go()'>find</button> <span id='hits'></span></p>"
        "<p><button onclick='page(-1)'>previous</button> <span id='span'></span> "
        "<button onclick='page(1)'>next</button></p>"
        "<table id='latents'><thead><tr><th>rank</th><th>latent</th><th>frequency</th><th>E[z²]</th>"
        "<th>score</th><th>token entropy</th><th>lens agreement</th><th>activations</th></tr></thead>"
        "<tbody id='rows'></tbody></table>"
        "<script src='latents.js'></script><script src='tokens.js'></script><script src='index.js'></script>"
    )
    _page(tmp / "index.html", "progsae browser", index, "")
    replace_dir(tmp, Path(out))
    return Path(out)


def _page(path: Path, title: str, body: str, root: str) -> None:
    path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<link rel='stylesheet' href='{root}style.css'></head><body>{body}</body></html>"
    )


def server(directory: str | Path, port: int = 8000):
    """An HTTP server of the site on 127.0.0.1:PORT (0: any free port); `serve_forever()` runs it."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    return ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Quiet, directory=str(directory)))
