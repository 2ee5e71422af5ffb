"""Recaptured language-modelling loss: the SAE's reconstruction spliced back into the model, by two definitions.

progsae's: on held-out contexts, layer L's output (the SAE's hook point) replaced at every position but the
first (BOS), every next-token prediction counted:
    clean      the model as is                      CE_clean
    zero       h = 0                                CE_zero
    mean       h = mean of h over the eval tokens   CE_mean
    sae        h = SAE reconstruction at (G, mode)  CE_sae, KL(clean || spliced) per token
    recaptured = (CE_zero - CE_sae) / (CE_zero - CE_clean), and against mean ablation
    recaptured_mean = (CE_mean - CE_sae) / (CE_mean - CE_clean); delta CE = CE_sae - CE_clean in nats
SAELens' (`sae_lens.evals.get_recons_loss` and `get_downstream_reconstruction_metrics`, the numbers Neuronpedia
shows), under its names: special tokens (`special_token_ids`: BOS, EOS, pad) are never spliced and the
predictions made at them are not counted; zero ablation zeroes every position, BOS included; KL counts the
prediction at the last position too:
    ce_loss_score = (ce_loss_with_ablation - ce_loss_with_sae) / (ce_loss_with_ablation - ce_loss_without_sae)
    kl_div_with_sae = mean KL(clean || spliced); kl_div_score = 1 - kl_div_with_sae / kl_div_with_ablation
Both come from the same model runs: a batch whose only special tokens are its BOS at position 0 splices the SAE
the same way under both, so only the zero ablation and batches with special tokens inside run twice.
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


SPECIAL_TOKEN_ATTRS = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id")


def special_token_ids(tokenizer) -> tuple[int, ...]:
    """The token ids SAELens' LM metrics leave out: the tokenizer's BOS, EOS, pad, sep and decoder-start ids, as
    `sae_lens.util.get_special_token_ids` reads them (additional special tokens, chat markers, are not among them)."""
    return tuple(sorted({i for a in SPECIAL_TOKEN_ATTRS if (i := getattr(tokenizer, a, None)) is not None}))


def _log_probs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp = F.log_softmax(logits.float(), -1)
    return logp, logp.exp()


def _ce_kl(logits: torch.Tensor, clean: tuple, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, in float64: next-token CE [B, T-1] and KL(clean || this) [B, T] (the last position's too).
    `clean`: the clean (log p, p) [B, T, V], computed once per batch. KL's terms are summed over the vocabulary in
    float32 (torch's cascade sum), and the callers sum over positions in float64: 2e-5 relative to float64."""
    clean_logp, clean_p = clean
    logp = F.log_softmax(logits.float(), -1)
    ce = -logp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).double()
    kl = torch.sub(clean_logp, logp, out=logp).mul_(clean_p).sum(-1).double()  # logp is not needed after the CE
    return ce, kl


@dataclass
class LMSplice:
    """Where a reconstruction is spliced: the model, its layer L, the held-out contexts [n, T] (BOS first) and the
    tokenizer's special token ids (`special_token_ids`, for SAELens' numbers), run `batch_size` contexts at a time.
    The ablations do not depend on the SAE: the first `recaptured_loss` on this object runs them and keeps their
    per-context sums for every later call."""

    model: object
    layer: int
    contexts: torch.Tensor
    special: tuple[int, ...]
    batch_size: int = 8
    ablations: dict | None = field(default=None, repr=False)  # per-context sums by key, once run


@torch.no_grad()
def recaptured_loss(
    lm: LMSplice, saes: dict[str, SAE], Gs: Iterable[int], modes: Iterable[str] = MODES, progress: bool = True
) -> dict:
    """CE, KL and recaptured fraction (progsae's), and ce_loss_score and kl_div_with_sae (SAELens'), for every SAE
    at every G and mode, on `lm.contexts`.

    Returns {"n_tokens", "ce_clean", "ce_zero", "ce_mean", "kl_zero", "kl_mean", "n_tokens_saelens",
    "ce_loss_without_sae", "ce_loss_with_ablation", "kl_div_with_ablation", "special_token_ids", "per_context",
    "saes": {name: {mode: [{"G", "ce", "kl", "dce", "recaptured", "recaptured_mean", "ce_loss_with_sae",
    "ce_loss_score", "kl_div_with_sae", "kl_div_score", "per_context"}, ...]}}}. Per batch of contexts: one
    forward up to layer L, then layers L+1.. once for the clean model and once per distinct replacement (see the
    module docstring). A TopK SAE's rescaled mode at G = N is its prefix mode at N (the same code), so it is run
    once; the ablations run on the first call on `lm` only.
    """
    model, layer, contexts, batch_size = lm.model, lm.layer, lm.contexts, lm.batch_size
    Gs, modes = sorted(set(Gs)), list(modes)
    for sae in saes.values():
        for G in Gs:
            sae.check_G(G)
    for m in modes:
        if m not in MODES:
            raise ProgsaeError(f"unknown truncation mode {m!r}; use one of {', '.join(MODES)}")
    special = torch.tensor(lm.special, dtype=torch.long, device=model.device)
    if torch.isin(contexts[:, :-1].to(model.device), special).all():
        raise ProgsaeError(f"every prediction in the LM-loss contexts is made at a special token {lm.special}; "
                           "give contexts of text")  # fmt: skip
    splicer = Splicer(model, layer)
    batches = contexts.to(model.device).split(batch_size)
    known = lm.ablations is not None
    if not known:
        # the mean-ablation vector: mean of h over all non-BOS eval positions (a cheap pass up to layer L)
        mean = torch.stack(
            [residual_stream(model, ids, layer)[:, 1:].reshape(-1, model.config.hidden_size).sum(0) for ids in batches]
        ).sum(0) / (contexts.shape[0] * (contexts.shape[1] - 1))
    zero, ablations = ("zero", None, None), [("zero", None, None), ("mean", None, None)]
    keys = [(n, m, G) for n in saes for m in modes for G in Gs]
    same = {(n, "rescaled", saes[n].d_sae): (n, "prefix", saes[n].d_sae) for n in saes if "prefix" in modes}
    runs = [key for key in keys if key not in same] + ([] if known else ablations)
    ce = {key: [] for key in keys + ablations}  # per context: progsae's sums
    kl = {key: [] for key in keys + ablations}
    lens_ce = {key: [] for key in keys + [zero]}  # per context: SAELens' sums
    lens_kl = {key: [] for key in keys + [zero]}
    ce_clean, lens_clean, n_ce, n_kl = [], [], [], []
    bar = tqdm(total=len(batches) * (len(runs) + 1), desc="recaptured LM loss", unit="replacement",
               disable=not progress, dynamic_ncols=True)  # fmt: skip
    for ids in batches:
        h, logits = splicer.clean(ids)
        keep = ~torch.isin(ids, special)  # SAELens' positions: spliced, and their predictions counted
        shared = bool(keep[:, 1:].all()) and not keep[:, 0].any()  # special tokens at 0 only: one splice for both
        clean = _log_probs(logits)
        c, _ = _ce_kl(logits, clean, ids)
        del logits
        ce_clean += c.sum(1).tolist()
        lens_clean += (c * keep[:, :-1]).sum(1).tolist()
        n_ce += keep[:, :-1].sum(1).tolist()
        n_kl += keep.sum(1).tolist()
        bar.update(1)
        for key in runs:
            name, mode, G = key
            spliced, lens = h.clone(), None  # lens: SAELens' replacement where it differs from progsae's
            if name == "zero":
                spliced[:, 1:], lens = 0, torch.zeros_like(h)
            elif name == "mean":
                spliced[:, 1:] = mean
            else:
                rec = saes[name](h.reshape(-1, h.shape[-1]), G, mode).view(h.shape)
                spliced[:, 1:] = rec[:, 1:]
                lens = None if shared else torch.where(keep.unsqueeze(-1), rec, h)
            c, k = _ce_kl(splicer.logits(spliced), clean, ids)
            ce[key] += c.sum(1).tolist()
            kl[key] += k[:, :-1].sum(1).tolist()
            if name != "mean":  # SAELens has no mean ablation
                if lens is not None:
                    c, k = _ce_kl(splicer.logits(lens), clean, ids)
                lens_ce[key] += (c * keep[:, :-1]).sum(1).tolist()
                lens_kl[key] += (k * keep).sum(1).tolist()
            bar.update(1)
    bar.close()
    for key, twin in same.items():
        if key in ce:
            ce[key], kl[key], lens_ce[key], lens_kl[key] = ce[twin], kl[twin], lens_ce[twin], lens_kl[twin]
    if known:
        for key in ablations:
            ce[key], kl[key] = lm.ablations["ce"][key[0]], lm.ablations["kl"][key[0]]
        lens_ce[zero], lens_kl[zero] = lm.ablations["ce_loss_with_ablation"], lm.ablations["kl_div_with_ablation"]
    else:
        lm.ablations = {"ce": {k[0]: ce[k] for k in ablations}, "kl": {k[0]: kl[k] for k in ablations},
                        "ce_loss_with_ablation": lens_ce[zero], "kl_div_with_ablation": lens_kl[zero]}  # fmt: skip
    n_tok, n_lens, n_lens_kl = contexts[:, 1:].numel(), sum(n_ce), sum(n_kl)
    per_context = {"clean": ce_clean, "zero": ce[zero], "mean": ce[("mean", None, None)]}
    per_context |= {"kl_zero": kl[zero], "kl_mean": kl[("mean", None, None)]}
    per_context |= {"ce_loss_without_sae": lens_clean, "ce_loss_with_ablation": lens_ce[zero],
                    "kl_div_with_ablation": lens_kl[zero], "n_ce_loss": n_ce, "n_kl_div": n_kl}  # fmt: skip
    ce_m = {k: sum(v) / n_tok for k, v in ce.items()}
    kl_m = {k: sum(v) / n_tok for k, v in kl.items()}
    lens_ce_m = {k: sum(v) / n_lens for k, v in lens_ce.items()}
    lens_kl_m = {k: sum(v) / n_lens_kl for k, v in lens_kl.items()}
    ce_clean_m, lens_clean_m = sum(ce_clean) / n_tok, sum(lens_clean) / n_lens
    ce_zero, ce_mean = ce_m[zero], ce_m[("mean", None, None)]
    out = {
        "n_tokens": n_tok,
        "ce_clean": ce_clean_m,
        "ce_zero": ce_zero,
        "ce_mean": ce_mean,
        "kl_zero": kl_m[zero],
        "kl_mean": kl_m[("mean", None, None)],
        "ce_uniform": float(np.log(model.config.vocab_size)),  # a uniform guess: what ablation should not exceed
        "tokens_per_context": contexts.shape[1] - 1,
        "n_tokens_saelens": n_lens,  # the predictions SAELens counts (CE; its KL counts n_kl_div per context)
        "ce_loss_without_sae": lens_clean_m,
        "ce_loss_with_ablation": lens_ce_m[zero],
        "kl_div_with_ablation": lens_kl_m[zero],
        "special_token_ids": list(lm.special),
        "per_context": per_context,
        "saes": {},
    }
    for name in saes:
        out["saes"][name] = {
            m: [
                {
                    "G": G,
                    "ce": ce_m[(name, m, G)],
                    "kl": kl_m[(name, m, G)],
                    "dce": ce_m[(name, m, G)] - ce_clean_m,
                    "recaptured": _frac(ce_zero, ce_m[(name, m, G)], ce_clean_m),
                    "recaptured_mean": _frac(ce_mean, ce_m[(name, m, G)], ce_clean_m),
                    "ce_loss_with_sae": lens_ce_m[(name, m, G)],
                    "ce_loss_score": _frac(lens_ce_m[zero], lens_ce_m[(name, m, G)], lens_clean_m),
                    "kl_div_with_sae": lens_kl_m[(name, m, G)],
                    "kl_div_score": _frac(lens_kl_m[zero], lens_kl_m[(name, m, G)], 0.0),
                    "per_context": {"ce": ce[(name, m, G)], "kl": kl[(name, m, G)],
                                    "ce_loss_with_sae": lens_ce[(name, m, G)],
                                    "kl_div_with_sae": lens_kl[(name, m, G)]},  # fmt: skip
                }
                for G in Gs
            ]
            for m in modes
        }
    return out


def _frac(ablated: float, sae: float, clean: float) -> float | None:
    """The share of the ablation's loss increase the SAE recaptures."""
    return (ablated - sae) / (ablated - clean) if ablated != clean else None
