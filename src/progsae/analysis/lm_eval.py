"""Recaptured language-modelling loss: the SAE's reconstruction spliced back into the model.

On held-out contexts, with layer L's output (the SAE's hook point) replaced at every non-BOS position:
    clean      the model as is                      CE_clean
    zero       h = 0                                CE_zero
    mean       h = mean of h over the eval tokens   CE_mean
    sae        h = SAE reconstruction at (G, mode)  CE_sae, KL(clean || spliced) per token
    recaptured = (CE_zero - CE_sae) / (CE_zero - CE_clean), and against mean ablation
    recaptured_mean = (CE_mean - CE_sae) / (CE_mean - CE_clean); delta CE = CE_sae - CE_clean in nats
Per-context sums are kept too ("per_context"): a bootstrap over contexts resamples them.
The model runs up to layer L once per batch (`Splicer.clean`); only layers L+1.. run per replacement.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.lm import Splicer, residual_stream
from ..errors import ProgsaeError
from ..sae import MODES, SAE


def directory_contexts(acts, tokens: int) -> torch.Tensor:
    """The first contexts [n, T] of an extracted activation directory, enough for `tokens` predictions."""
    from ..files import load_tensor

    src = acts.manifest.get("source", {})
    if src.get("kind") != "lm":
        raise ProgsaeError(
            f"{acts.path} holds no language-model activations (source {src.get('kind')!r}); "
            "recaptured LM loss needs a directory written by `progsae extract`"
        )
    contexts = load_tensor(acts.path / "contexts.safetensors", "contexts")
    if contexts is None:
        raise ProgsaeError(f"{acts.path}/contexts.safetensors is missing; re-extract the directory")
    return contexts[: max(1, min(len(contexts), -(-tokens // (contexts.shape[1] - 1))))]


def _ce_kl(logits: torch.Tensor, clean: tuple, ids: torch.Tensor) -> tuple[list, list, int]:
    """Per context: next-token CE and KL(clean || this) summed over positions 0..T-2; and the count.
    `clean`: the clean (log p, p), p computed once per batch. KL's terms are summed over the vocabulary in
    float32 (torch's cascade sum) and over positions in float64: 2e-5 relative to a float64 computation."""
    clean_logp, clean_p = clean
    logp = F.log_softmax(logits[:, :-1].float(), -1)
    ce = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).double().sum(1)
    terms = torch.sub(clean_logp, logp, out=logp).mul_(clean_p)  # logp is not needed after the CE
    kl = terms.sum(-1).double().sum(1)
    return ce.tolist(), kl.tolist(), ids[:, 1:].numel()


@dataclass
class LMSplice:
    """Where a reconstruction is spliced: the model, its layer L and the held-out contexts [n, T] (BOS first),
    run `batch_size` contexts at a time. The zero and mean ablations do not depend on the SAE: the first
    `recaptured_loss` on this object runs them and keeps their per-context sums for every later call."""

    model: object
    layer: int
    contexts: torch.Tensor
    batch_size: int = 8
    ablations: dict | None = field(default=None, repr=False)  # {"ce": {"zero", "mean"}, "kl": {...}} once run


@torch.no_grad()
def recaptured_loss(
    lm: LMSplice, saes: dict[str, SAE], Gs: Iterable[int], modes: Iterable[str] = MODES, progress: bool = True
) -> dict:
    """CE, KL and recaptured fraction for every SAE at every G and mode, on `lm.contexts`.

    Returns {"n_tokens", "ce_clean", "ce_zero", "ce_mean", "saes": {name: {mode: [{"G", "ce", "kl",
    "recaptured"}, ...]}}}. Per batch of contexts: one forward up to layer L, then layers L+1.. once for
    the clean model and once per distinct replacement. A TopK SAE's rescaled mode at G = N is its prefix
    mode at N (the same code), so it is run once; the ablations run on the first call on `lm` only.
    """
    model, layer, contexts, batch_size = lm.model, lm.layer, lm.contexts, lm.batch_size
    Gs, modes = sorted(set(Gs)), list(modes)
    for sae in saes.values():
        for G in Gs:
            sae.check_G(G)
    for m in modes:
        if m not in MODES:
            raise ProgsaeError(f"unknown truncation mode {m!r}; use one of {', '.join(MODES)}")
    splicer = Splicer(model, layer)
    batches = contexts.to(model.device).split(batch_size)
    known = lm.ablations is not None
    if not known:
        # the mean-ablation vector: mean of h over all non-BOS eval positions (a cheap pass up to layer L)
        mean = torch.stack(
            [residual_stream(model, ids, layer)[:, 1:].reshape(-1, model.config.hidden_size).sum(0) for ids in batches]
        ).sum(0) / (contexts.shape[0] * (contexts.shape[1] - 1))
    ablations = [("zero", None, None), ("mean", None, None)]
    keys = [(n, m, G) for n in saes for m in modes for G in Gs]
    same = {(n, "rescaled", saes[n].d_sae): (n, "prefix", saes[n].d_sae) for n in saes if "prefix" in modes}
    runs = [key for key in keys if key not in same] + ([] if known else ablations)
    ce = {key: [] for key in keys + ablations}  # per context
    kl = {key: [] for key in keys + ablations}
    ce_clean, n_tok = [], 0
    bar = tqdm(total=len(batches) * (len(runs) + 1), desc="recaptured LM loss", unit="pass", disable=not progress,
               dynamic_ncols=True)  # fmt: skip
    for ids in batches:
        h, logits = splicer.clean(ids)
        clean_logp = F.log_softmax(logits[:, :-1].float(), -1)
        clean = (clean_logp, clean_logp.exp())
        c, _, n = _ce_kl(logits, clean, ids)
        del logits
        ce_clean += c
        n_tok += n
        bar.update(1)
        for key in runs:
            name, mode, G = key
            spliced = h.clone()
            if name == "zero":
                spliced[:, 1:] = 0
            elif name == "mean":
                spliced[:, 1:] = mean
            else:
                body = h[:, 1:].reshape(-1, h.shape[-1])
                spliced[:, 1:] = saes[name](body, G, mode).view(h.shape[0], -1, h.shape[-1])
            c, k, _ = _ce_kl(splicer.logits(spliced), clean, ids)
            ce[key] += c
            kl[key] += k
            bar.update(1)
    bar.close()
    for key, twin in same.items():
        if key in ce:
            ce[key], kl[key] = ce[twin], kl[twin]
    if known:
        for key in ablations:
            ce[key], kl[key] = lm.ablations["ce"][key[0]], lm.ablations["kl"][key[0]]
    else:
        lm.ablations = {"ce": {k[0]: ce[k] for k in ablations}, "kl": {k[0]: kl[k] for k in ablations}}
    per_context = {"clean": ce_clean, "zero": ce[("zero", None, None)], "mean": ce[("mean", None, None)]}
    per_context |= {"kl_zero": kl[("zero", None, None)], "kl_mean": kl[("mean", None, None)]}
    ce_ctx, kl_ctx = ce, kl
    ce = {k: sum(v) / n_tok for k, v in ce_ctx.items()}
    kl_mean = {k: sum(v) / n_tok for k, v in kl_ctx.items()}
    ce_clean_mean = sum(ce_clean) / n_tok
    ce_zero, ce_mean = ce[("zero", None, None)], ce[("mean", None, None)]
    out = {
        "n_tokens": n_tok,
        "ce_clean": ce_clean_mean,
        "ce_zero": ce_zero,
        "ce_mean": ce_mean,
        "kl_zero": kl_mean[("zero", None, None)],
        "kl_mean": kl_mean[("mean", None, None)],
        "ce_uniform": float(np.log(model.config.vocab_size)),  # a uniform guess: what ablation should not exceed
        "tokens_per_context": contexts.shape[1] - 1,
        "per_context": per_context,
        "saes": {},
    }
    for name in saes:
        out["saes"][name] = {
            m: [
                {
                    "G": G,
                    "ce": ce[(name, m, G)],
                    "kl": kl_mean[(name, m, G)],
                    "dce": ce[(name, m, G)] - ce_clean_mean,
                    "recaptured": _frac(ce_zero, ce[(name, m, G)], ce_clean_mean),
                    "recaptured_mean": _frac(ce_mean, ce[(name, m, G)], ce_clean_mean),
                    "per_context": {"ce": ce_ctx[(name, m, G)], "kl": kl_ctx[(name, m, G)]},
                }
                for G in Gs
            ]
            for m in modes
        }
    return out


def _frac(ablated: float, sae: float, clean: float) -> float | None:
    """The share of the ablation's loss increase the SAE recaptures."""
    return (ablated - sae) / (ablated - clean) if ablated != clean else None
