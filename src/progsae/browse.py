"""`progsae browse`: a static feature browser that opens from disk (no server).

DIR/index.html     every latent in importance order (E[z²] over the records' tokens): rank, id, frequency,
                   E[z²], token entropy, lens agreement, a histogram sparkline; search by latent id or token
DIR/latents/I.html one page per latent: top and sampled contexts with tokens shaded by the latent's activation,
                   its logit-lens tokens, its nearest latents by decoder cosine, its Matryoshka band
DIR/style.css, DIR/search.js   shared by every page (pages carry no copy)
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import torch

from .analysis.proxies import proxies
from .analysis.records import latent_records
from .data import ActivationDir
from .files import ProgsaeError, fresh_dir, load_tensor, replace_dir
from .sae import SAE

WINDOW = (12, 3)  # tokens shown before and after the activating one

CSS = """body{font-family:sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
td.t{text-align:left}.ctx{font-family:monospace;font-size:13px;margin:3px 0;white-space:pre-wrap}
.tok{border-radius:2px}.hi{outline:1px solid #c00}.lens span{display:inline-block;margin:2px;padding:1px 5px;
background:#eef;border-radius:3px;font-family:monospace}"""

SEARCH_JS = """function go(){const q=document.getElementById('q').value.trim();const out=document.getElementById('hits');
out.innerHTML='';if(!q)return;if(/^\\d+$/.test(q)){location.href='latents/'+q+'.html';return;}
const ids=(window.TOKENS||{})[q]||(window.TOKENS||{})[' '+q]||[];
for(const i of ids){const a=document.createElement('a');a.href='latents/'+i+'.html';a.textContent='latent '+i;
a.className='hit';out.appendChild(a);out.appendChild(document.createTextNode(' '));}
if(!ids.length)out.textContent='no latent has '+JSON.stringify(q)+' among its top tokens';}
window.addEventListener('load',()=>{const m=location.hash.match(/^#q=(.*)/);
if(m){document.getElementById('q').value=decodeURIComponent(m[1]);go();}});"""


def _spark(hist: torch.Tensor) -> str:
    h = hist.double()
    h = (h / h.max()).tolist() if h.max() > 0 else h.tolist()
    bars = "".join(f"<rect x='{i * 2}' y='{16 - 16 * v:.1f}' width='2' height='{16 * v:.1f}'/>" for i, v in enumerate(h))
    return f"<svg width='{2 * len(h)}' height='16' fill='#48c'>{bars}</svg>"


class _Texts:
    def __init__(self, tok):
        self.tok, self.cache = tok, {}

    def __call__(self, i: int) -> str:
        if i not in self.cache:
            self.cache[i] = self.tok.decode([i]) if self.tok is not None else f"<{i}>"
        return self.cache[i]


def browse(sae: SAE, acts: ActivationDir, out: str | Path, model=None, tokenizer=None, max_tokens: int = 50_000,
           n_top: int = 12, n_sample: int = 8, progress: bool = True) -> Path:  # fmt: skip
    """Write the browser for `sae` over the first `max_tokens` rows of the extracted directory `acts`."""
    if acts.manifest.get("source", {}).get("kind") != "lm":
        raise ProgsaeError(f"{acts.path} holds no extracted LM activations; the browser needs `progsae extract` output")
    n = min(max_tokens, acts.n_tokens)
    x = torch.cat(list(acts.iter_rows(4096, n)))
    rec = latent_records(sae, x.split(4096), n_top=n_top, n_sample=n_sample)
    contexts = load_tensor(acts.path / "contexts.safetensors", "contexts")
    unemb = model.get_output_embeddings().weight if model is not None else None
    prox = proxies(sae, rec, acts, contexts, unemb) if unemb is not None else None
    with torch.no_grad():
        values, indices = sae.encode(x)
    from .analysis.records import row_contexts

    all_rows = torch.arange(n)
    ctx_of, pos_of = row_contexts(acts, all_rows)
    text = _Texts(tokenizer)
    order = torch.sort(rec["e_z2"], descending=True, stable=True).indices.tolist()
    W = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=1)
    bands = sae.cfg.progsae.get("granularities") or []
    tmp = fresh_dir(Path(str(out) + ".tmp"))
    (tmp / "latents").mkdir()
    (tmp / "style.css").write_text(CSS)
    (tmp / "search.js").write_text(SEARCH_JS)

    def activation_at(row: int, latent: int) -> float:
        hit = indices[row] == latent
        return float(values[row][hit].sum()) if hit.any() else 0.0

    def context_html(row: int, latent: int, top: float) -> str:
        c, p = int(ctx_of[row]), int(pos_of[row])
        spans = []
        for q in range(max(1, p - WINDOW[0]), min(contexts.shape[1], p + WINDOW[1] + 1)):
            r = row + (q - p)
            a = activation_at(r, latent) if 0 <= r < n and int(ctx_of[r]) == c and int(pos_of[r]) == q else 0.0
            alpha = 0 if top <= 0 else min(1.0, a / top)
            cls = "tok hi" if q == p else "tok"
            spans.append(f"<span class='{cls}' title='{a:.3f}' style='background:rgba(255,120,0,{alpha:.2f})'>"
                         f"{html.escape(text(int(contexts[c, q])))}</span>")  # fmt: skip
        return f"<div class='ctx'>{''.join(spans)}</div>"

    tokens_index: dict[str, list[int]] = {}
    rank_of = {latent: r + 1 for r, latent in enumerate(order)}
    for latent in order:
        rows = [int(r) for r in rec["top_rows"][latent] if r >= 0]
        top = float(rec["top_values"][latent, 0])
        for r in rows[:3]:
            tokens_index.setdefault(text(int(contexts[ctx_of[r], pos_of[r]])), []).append(latent)
        near = (W @ W[latent]).topk(min(6, sae.d_sae)).indices.tolist()[1:]
        band = next((b for b in bands if latent < b), None)
        lens = "".join(f"<span>{html.escape(text(int(t)))}</span>" for t in prox["logit_lens"][latent]) if prox else "–"
        sample = [int(r) for r in rec["sample_rows"][latent] if r >= 0]
        body = [
            f"<p><a href='../index.html'>all latents</a></p><h1>latent {latent}</h1>",
            f"<p>importance rank {rank_of[latent]} (E[z²] {float(rec['e_z2'][latent]):.4g}), frequency "
            f"{float(rec['freq'][latent]):.4g}, max {top:.3f}"
            + (f", Matryoshka band: latents below {band}" if band else "") + "</p>",
            f"<h2>logit lens</h2><div class='lens'>{lens}</div>",
            "<h2>top activations</h2>" + "".join(context_html(r, latent, top) for r in rows),
            "<h2>a sample of its activations (high to low)</h2>" + "".join(context_html(r, latent, top) for r in sample),
            "<h2>nearest latents by decoder cosine</h2><p>"
            + " ".join(f"<a href='{j}.html'>{j}</a> ({float(W[j] @ W[latent]):.2f})" for j in near) + "</p>",
        ]
        _page(tmp / "latents" / f"{latent}.html", f"latent {latent}", "".join(body), "../")
    rows = []
    for r, latent in enumerate(order, 1):
        ent = f"{float(prox['token_entropy'][latent]):.2f}" if prox else "–"
        agr = prox["lens_agreement"][latent] if prox else None
        agr = "–" if agr is None or torch.isnan(agr) else f"{float(agr):.2f}"
        rows.append(f"<tr><td>{r}</td><td><a href='latents/{latent}.html'>{latent}</a></td>"
                    f"<td>{float(rec['freq'][latent]):.4f}</td><td>{float(rec['e_z2'][latent]):.4g}</td>"
                    f"<td>{ent}</td><td>{agr}</td><td>{_spark(rec['hist'][latent])}</td></tr>")  # fmt: skip
    (tmp / "tokens.js").write_text("window.TOKENS=" + json.dumps(tokens_index) + ";")
    index = (
        f"<h1>{sae.d_sae} latents, by importance</h1><p>Over {n:,} tokens of {html.escape(str(acts.path))}. "
        "Search a latent id or a token: <input id='q' onkeydown=\"if(event.key==='Enter')go()\"> "
        "<button onclick='go()'>find</button> <span id='hits'></span></p>"
        "<table id='latents'><thead><tr><th>rank</th><th>latent</th><th>frequency</th><th>E[z²]</th>"
        "<th>token entropy</th><th>lens agreement</th><th>activations</th></tr></thead><tbody>"
        + "".join(rows) + "</tbody></table><script src='tokens.js'></script><script src='search.js'></script>"
    )
    _page(tmp / "index.html", "progsae browser", index, "")
    replace_dir(tmp, Path(out))
    return Path(out)


def _page(path: Path, title: str, body: str, root: str) -> None:
    path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<link rel='stylesheet' href='{root}style.css'></head><body>{body}</body></html>"
    )
