"""One SAE on one activation directory: the one-pass curve, RSA and (optionally) recaptured LM loss.

The shared body of `progsae eval` and the evaluate stage of `progsae run`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..config import REQUIRED, opt
from ..data import ActivationDir
from ..data.truth import load_truth
from ..sae import MODES, SAE
from ..train import PRECISIONS
from .importance import PRECISION_HELP, SAE_HELP
from .intervals import block_weights
from .lm_eval import LMSplice, recaptured_loss
from .progressive import ProgressiveEval
from .recovery import TruthEval
from .rsa import _rank_matrix, rsa, spearman_replicates

# per G and mode, with lm: SAELens' ce_loss_score and kl_div_with_sae, then progsae's (see lm_eval.py)
LM_KEYS = ("ce_loss_score", "kl_div_with_sae", "kl_div_score", "ce_loss_with_sae", "recaptured", "recaptured_mean",
           "dce", "kl", "ce")  # fmt: skip


@dataclass
class EvalArgs:
    """`progsae eval`'s arguments (see cli.py)."""

    sae: str = opt(REQUIRED, SAE_HELP, positional=True)
    acts: str = opt(REQUIRED, "activation directory", positional=True)
    out: str = opt(REQUIRED, "results JSON")
    G: list[int] | None = opt(None, "granularities to table (default powers of two up to N)", min=1)
    tokens: int | None = opt(None, "use at most this many tokens (default all)", min=1)
    rsa_tokens: int = opt(1000, "token sample for RSA", min=1)
    lm_tokens: int = opt(0, "also measure recaptured LM loss and KL on this many tokens of the directory's contexts",
                         min=0)  # fmt: skip
    model: str | None = opt(None, "model for the LM loss (default: the one named in the activation manifest)")
    device: str = opt("cpu", "where the SAE and the model run: cpu or cuda")
    precision: str = opt("fp32", PRECISION_HELP, choices=PRECISIONS)



def evaluate(
    sae: SAE,
    acts: ActivationDir,
    Gs: list[int],
    *,
    max_tokens: int | None = None,
    rsa_tokens: int = 1000,
    lm: LMSplice | None = None,
    progress: bool = True,
    n_boot: int = 1000,
    outlier_norm: float | None = None,
) -> dict:
    """{"n_tokens", "d_sae", "k", "rsa_tokens", "table", "curve"[, "lm"]}.

    truth: where the directory holds `truth.safetensors`, the known-answer metrics (`recovery.TruthEval`).
    table: per G in Gs, fvu_prefix, fvu_rescaled, l0 (prefix), l0_rescaled, dead_frac, rsa_prefix, rsa_rescaled
    and, with lm (the model, layer and contexts to splice into), per mode: SAELens' ce_loss_score_*, kl_div_with_sae_*,
    kl_div_score_*, ce_loss_with_sae_*; progsae's recaptured_* (against zero ablation), recaptured_mean_*, dce_*
    (CE_sae - CE_clean, nats), kl_*, ce_*. With outlier_norm (analysis/outliers.py: a token above
    it is an outlier) also fvu_typical_* and rsa_typical_* per mode, on the typical tokens alone (the FVU's
    deviations from the mean of all tokens, see `ProgressiveEval`; the RSA on the sample's typical rows);
    blocks["typical"] and rsa_boot["typical:MODE:G"] their bootstrap sums and replicates (None without it).
    curve: fvu_prefix, l0, dead_frac at every G = 1..N. RSA: on `rsa_tokens` rows taken evenly across the set;
    rsa_boot: its bootstrap replicates over those tokens (`rsa.spearman_replicates`).
    blocks: per block of about one context of held-out rows, the squared residual at each G (both modes)
    and the squared deviation from the mean, for bootstrap intervals; lm.per_context[_sae] likewise.
    The same `lm` passed for several SAEs runs its ablations once (see `LMSplice`).
    """
    for G in Gs:
        sae.check_G(G)
    n = min(max_tokens or acts.n_tokens, acts.n_tokens)
    modes = sae.modes  # threshold architectures have no rescaled mode: its fields stay None
    src = acts.manifest.get("source", {})
    block = src["ctx_len"] - (0 if src.get("keep_bos") else 1) if src.get("kind") == "lm" else 128  # ~ a context
    acc = ProgressiveEval(sae, Gs if "rescaled" in modes else (), block_G=Gs, block_size=block, outlier_norm=outlier_norm)
    truth = load_truth(acts)
    known = TruthEval(sae, truth, Gs) if truth is not None else None
    stride, picked, at = max(1, n // rsa_tokens), [], 0  # the RSA sample: every stride-th row, across the set
    for x in tqdm(acts.iter_rows(4096, n), total=-(-n // 4096), desc="eval", unit="batch", disable=not progress):
        acc.update(x)
        if known is not None:
            known.update(x)
        picked.append(x[(-at) % stride :: stride])
        at += len(x)
    r = acc.result()
    table = [r.at(G) for G in Gs]
    sample = torch.cat(picked)[:rsa_tokens].to(sae.W_dec.device)
    W = torch.from_numpy(block_weights(len(sample), n_boot, seed=2))  # the same draws for every SAE: paired
    ranks_x = _rank_matrix(sample.cpu())
    typical = None if outlier_norm is None else sample.double().norm(dim=1) <= outlier_norm  # the sample's typical rows
    if typical is not None and int(typical.sum()) < 3:  # no pair of pairs to rank
        typical = None
    if typical is not None:
        W_t = torch.from_numpy(block_weights(int(typical.sum()), n_boot, seed=3))
        ranks_t = _rank_matrix(sample[typical].cpu())
    rsa_boot = {}
    with torch.no_grad():
        for row in table:
            for mode in MODES:
                row[f"rsa_{mode}"] = row[f"rsa_typical_{mode}"] = None
                if mode not in modes:
                    continue
                rec = sae(sample, row["G"], mode)
                row[f"rsa_{mode}"] = rsa(sample, rec)
                rsa_boot[f"{mode}:{row['G']}"] = spearman_replicates(sample.cpu(), rec.cpu(), W, ranks_x).tolist()
                if typical is not None:
                    x_t, rec_t = sample[typical].cpu(), rec[typical].cpu()
                    row[f"rsa_typical_{mode}"] = rsa(x_t, rec_t)
                    rsa_boot[f"typical:{mode}:{row['G']}"] = spearman_replicates(x_t, rec_t, W_t, ranks_t).tolist()
    out = {
        "n_tokens": r.n_tokens,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "architecture": sae.architecture,
        "precision": sae.precision,  # how the encode selected (SAE.precision)
        "rsa_tokens": sample.shape[0],
        "rsa_typical_tokens": None if typical is None else int(typical.sum()),
        "table": table,
        "curve": {"fvu_prefix": r.fvu.tolist(), "l0": r.l0.tolist(), "dead_frac": r.dead_frac.tolist()},
        "blocks": r.blocks,
        "rsa_boot": rsa_boot,  # bootstrap replicates of the cosine-Spearman RSA over the sample's tokens
    }
    if known is not None:
        out["truth"] = known.result()
    if lm is not None:
        res = recaptured_loss(lm, {"sae": sae}, Gs, modes, progress)
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
