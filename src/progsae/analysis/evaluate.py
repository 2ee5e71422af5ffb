"""One SAE on one activation directory: the one-pass curve, RSA and (optionally) recaptured LM loss.

The shared body of `progsae eval` and the evaluate stage of `progsae run`.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..data import ActivationDir
from ..sae import MODES, SAE
from .lm_eval import recaptured_loss
from .progressive import ProgressiveEval
from .rsa import rsa

LM_KEYS = ("recaptured", "recaptured_mean", "dce", "kl", "ce")  # per G and mode, with lm


def evaluate(
    sae: SAE,
    acts: ActivationDir,
    Gs: list[int],
    max_tokens: int | None = None,
    rsa_tokens: int = 1000,
    lm: tuple | None = None,
    progress: bool = True,
) -> dict:
    """{"n_tokens", "d_sae", "k", "rsa_tokens", "table", "curve"[, "lm"]}.

    table: per G in Gs, fvu_prefix, fvu_rescaled, l0 (prefix), l0_rescaled, dead_frac, rsa_prefix, rsa_rescaled
    and, with lm = (model, layer, contexts [n, T]), recaptured_* (against zero ablation), recaptured_mean_*,
    dce_* (CE_sae - CE_clean, nats), kl_*, ce_* per mode.
    curve: fvu_prefix, l0, dead_frac at every G = 1..N.
    blocks: per block of about one context of held-out rows, the squared residual at each G (both modes)
    and the squared deviation from the mean, for bootstrap intervals; lm.per_context[_sae] likewise.
    """
    for G in Gs:
        sae.check_G(G)
    n = min(max_tokens or acts.n_tokens, acts.n_tokens)
    modes = sae.modes  # threshold architectures have no rescaled mode: its fields stay None
    src = acts.manifest.get("source", {})
    block = src["ctx_len"] - (0 if src.get("keep_bos") else 1) if src.get("kind") == "lm" else 128  # ~ a context
    acc = ProgressiveEval(sae, Gs if "rescaled" in modes else (), block_G=Gs, block_size=block)
    for x in tqdm(acts.iter_rows(4096, n), total=-(-n // 4096), desc="eval", unit="batch", disable=not progress):
        acc.update(x)
    r = acc.result()
    table = [r.at(G) for G in Gs]
    sample = next(acts.iter_rows(rsa_tokens, rsa_tokens)).to(sae.W_dec.device)
    with torch.no_grad():
        for row in table:
            for mode in MODES:
                row[f"rsa_{mode}"] = rsa(sample, sae(sample, row["G"], mode)) if mode in modes else None
    out = {
        "n_tokens": r.n_tokens,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "architecture": sae.architecture,
        "rsa_tokens": sample.shape[0],
        "table": table,
        "curve": {"fvu_prefix": r.fvu.tolist(), "l0": r.l0.tolist(), "dead_frac": r.dead_frac.tolist()},
        "blocks": r.blocks,
    }
    if lm is not None:
        model, layer, contexts = lm
        res = recaptured_loss(model, layer, {"sae": sae}, contexts, Gs, modes, progress=progress)
        out["lm"] = {k: v for k, v in res.items() if k != "saes"}
        out["lm"]["per_context_sae"] = {}
        for row in table:
            for mode in MODES:
                hit = next((x for x in res["saes"]["sae"].get(mode, []) if x["G"] == row["G"]), {})
                for key in LM_KEYS:  # None for a mode the SAE lacks
                    row[f"{key}_{mode}"] = hit.get(key)
                if hit:
                    out["lm"]["per_context_sae"][f"{mode}:{row['G']}"] = hit["per_context"]
    return out
