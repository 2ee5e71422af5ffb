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

    table: per G in Gs, fvu_prefix, fvu_rescaled, l0, dead_frac, rsa_prefix, rsa_rescaled and, with
    lm = (model, layer, contexts [n, T]), recaptured_*, kl_*, ce_* per mode.
    curve: fvu_prefix, l0, dead_frac at every G = 1..N.
    """
    for G in Gs:
        sae.check_G(G)
    n = min(max_tokens or acts.n_tokens, acts.n_tokens)
    modes = sae.modes  # threshold architectures have no rescaled mode: its fields stay None
    acc = ProgressiveEval(sae, Gs if "rescaled" in modes else ())
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
    }
    if lm is not None:
        model, layer, contexts = lm
        res = recaptured_loss(model, layer, {"sae": sae}, contexts, Gs, modes, progress=progress)
        out["lm"] = {k: v for k, v in res.items() if k != "saes"}
        for row in table:
            for mode in MODES:
                if mode not in modes:
                    row[f"recaptured_{mode}"] = row[f"kl_{mode}"] = row[f"ce_{mode}"] = None
                    continue
                hit = next(x for x in res["saes"]["sae"][mode] if x["G"] == row["G"])
                row[f"recaptured_{mode}"], row[f"kl_{mode}"], row[f"ce_{mode}"] = (
                    hit["recaptured"],
                    hit["kl"],
                    hit["ce"],
                )
    return out
