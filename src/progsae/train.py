"""Training TopK and Matryoshka SAEs: the config and the loop (the loss of a batch: losses.py).

Optimiser: Adam, lr = base_lr / sqrt(N / 2^14) with linear warmup; decoder rows kept at unit norm (the
gradient's component along each row removed before the step, rows renormalised after).

With `out`, a checkpoint is written every `checkpoint_every` steps (see `checkpoint.py`), and
`train(..., out=OUT)` resumes from the newest.
Data-parallel under torchrun (see `dist.py`): identical state on every rank, gradients summed.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import dist
from .autotune import choose_kernel, choose_precision
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import REQUIRED, check_fields, from_dict, opt
from .errors import ProgsaeError, check_device
from .files import save_json
from .formats import write_sae
from .losses import sae_loss
from .products import KERNELS
from .sae import SAE, SAEConfig, geometric_median

SAMPLERS = ("uniform", "pareto")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    d_sae: int = opt(4096, "dictionary size N", min=1)
    k: int = opt(32, "active latents per token", min=1)
    tokens: int = opt(2_000_000, "training tokens", min=1)
    batch_size: int = opt(4096, "tokens per step (the global batch under torchrun)", min=1)
    lr: float | None = opt(None, "learning rate (default 2e-4 / sqrt(N / 2^14))", above=0)
    warmup_steps: int = opt(1000, "linear learning-rate warmup, capped at a tenth of the run", min=0)
    matryoshka: list[int] | None = opt(None, "fixed nested granularities m1 < ... < N", min=1)
    matryoshka_weights: list[float] | None = opt(None, "weight c_m of each fixed granularity (default uniform)", min=0)
    matryoshka_sampled: int = opt(0, "draw this many granularities per step (N always added); 0: none", min=0)
    matryoshka_sampler: str = opt("uniform", "uniform on 1..N, or pareto: P(m) ~ m^-pareto_a", choices=SAMPLERS)
    pareto_a: float = opt(1.0, "exponent of the pareto sampler (1: log-uniform)")
    k_aux: int | None = opt(None, "dead latents in the AuxK loss (default d_in / 2)", min=0)
    aux_coef: float = opt(1 / 32, "weight of the AuxK loss", min=0)
    dead_tokens: int = opt(1_000_000, "tokens without firing before a latent counts as dead", min=1)
    seed: int = opt(0, "seeds the initialisation, the batch order and the sampler")
    device: str = opt("cpu", "where the SAE trains: cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    precision: str = opt("fp32", "encoder GEMM and top-k selection: fp32, bf16 (the selected values recomputed in fp32; weights and Adam stay fp32), or auto (bf16 where a timed GEMM of the encoder's shape is 1.5x faster; a resumed run keeps its choice)", choices=PRECISIONS)
    kernel: str = opt("auto", "the sparse products' path: csr (PyTorch's CSR products), gather (embedding_bag / index_add_), dense (a [B, N] code: SAELens' computation), or auto (each timed on the run's shape at start-up, the fastest kept; a resumed run keeps its choice); every path gives the same values and gradients", choices=("auto", *KERNELS))
    log_every: int = opt(50, "steps between history entries", min=1)
    checkpoint_every: int = opt(500, "steps between checkpoints", min=1)
    keep_checkpoints: int = opt(2, "checkpoints kept (the newest K)", min=1)
    skip_nonfinite: bool = opt(False, "leave activation rows holding NaN or Inf out, with a warning (default: stop, naming them)")
    metadata: dict = opt({}, "passed into the SAE's cfg (model_name, hook_name, ...)")

    def validate(self) -> TrainConfig:
        """The declared ranges and choices (`check_fields`), then the checks that tie fields together."""
        check_fields(self, "train config")

        def bad(msg):
            raise ProgsaeError(f"train config: {msg}")

        if self.k > self.d_sae:
            bad(f"k={self.k} exceeds d_sae={self.d_sae}")
        if self.matryoshka is not None:
            m = self.matryoshka
            if self.matryoshka_sampled:
                bad("give fixed granularities or a sampled count, not both")
            if not m or any(b <= a for a, b in zip(m, m[1:], strict=False)) or m[-1] != self.d_sae:
                bad(f"granularities must be increasing, >= 1 and end at d_sae={self.d_sae}; got {m}")
            if self.matryoshka_weights is not None and len(self.matryoshka_weights) != len(m):
                bad(f"matryoshka_weights needs {len(m)} non-negative numbers, one per granularity")
        elif self.matryoshka_weights is not None:
            bad("matryoshka_weights given without fixed granularities")
        return self

    @property
    def mode(self) -> str:
        return "fixed" if self.matryoshka else "sampled" if self.matryoshka_sampled else "none"

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.batch_size)

    def base_lr(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.d_sae / 2**14)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return from_dict(cls, d, "train config")

    def jsonable(self) -> dict:
        """The fields as JSON values (what a checkpoint and the SAE's training record hold)."""
        return json.loads(json.dumps(asdict(self)))


@dataclass
class TrainArgs:
    """`progsae train`'s arguments besides TrainConfig's and StreamConfig's (see cli.py)."""

    out: str = opt(REQUIRED, "SAE directory to write (SAELens layout), with history.json and checkpoints/ (a rerun resumes from the newest)")
    acts: str | None = opt(None, "activation directory; without it the model runs on the fly (StreamConfig flags)",
                           positional=True)  # fmt: skip
    config: str | None = opt(None, "JSON or YAML file of TrainConfig fields; flags override it")
    force: bool = opt(False, "discard an existing run directory instead of resuming")


# -- losses --------------------------------------------------------------------------------------------


def sample_granularities(cfg: TrainConfig, gen: torch.Generator) -> list[int]:
    """This step's prefix ends: the fixed M, or `matryoshka_sampled` draws plus N; [N] for plain TopK."""
    N = cfg.d_sae
    if cfg.matryoshka:
        return list(cfg.matryoshka)
    if not cfg.matryoshka_sampled:
        return [N]
    u = torch.rand(cfg.matryoshka_sampled, generator=gen, dtype=torch.float64)
    if cfg.matryoshka_sampler == "uniform":
        m = (u * N).floor() + 1
    elif cfg.pareto_a == 1.0:  # log-uniform on [1, N]
        m = (N**u).floor()
    else:  # inverse CDF of the continuous density ~ m^-a on [1, N]
        a1 = 1 - cfg.pareto_a
        m = ((N**a1 - 1) * u + 1) ** (1 / a1)
    return sorted({int(v) for v in m.clamp(1, N).tolist()} | {N})


def granularity_weights(cfg: TrainConfig, bounds: list[int]) -> torch.Tensor:
    if cfg.matryoshka_weights is not None:
        return torch.tensor(cfg.matryoshka_weights, dtype=torch.float32)
    return torch.full((len(bounds),), 1.0 / len(bounds))


# -- the loop --------------------------------------------------------------------------------------------


class Trainer:
    """Holds everything a run needs to continue: SAE, Adam, dead-latent counters, sampler RNG, step.

    Under torchrun every rank holds the same state: it reads each global batch, trains on its
    contiguous share of the rows, and sums gradients, losses and fired latents over the ranks; only
    rank 0 writes checkpoints, history and the SAE (`out` must be a path every rank sees, to resume).
    """

    def __init__(self, cfg: TrainConfig, source, out: str | Path | None = None, init: SAE | None = None):
        """`init`: a TopK SAE of cfg's width and k to start from (its metadata kept, `SAE.fold_decoder_norm`)
        instead of the tied initialisation; a checkpoint in `out` still comes first (a resumed run)."""
        self.cfg = cfg.validate()
        self.init = init
        self.source = source
        self.out = Path(out) if out is not None else None
        d_in = source.d_in
        progsae = {"matryoshka": cfg.mode, "granularities": cfg.matryoshka or None,
                   "matryoshka_sampled": cfg.matryoshka_sampled or None}  # fmt: skip
        self.device = check_device(dist.init(cfg.device))
        self.rank, self.world = dist.rank(), dist.world()
        if cfg.batch_size % self.world:
            raise ProgsaeError(
                f"batch_size {cfg.batch_size} does not split evenly over {self.world} ranks; "
                f"use a multiple of {self.world}"
            )
        if init is not None:
            if init.architecture != "topk" or (init.cfg.d_in, init.d_sae, init.k) != (d_in, cfg.d_sae, cfg.k):
                raise ProgsaeError(f"a warm start needs a TopK SAE of d_in={d_in}, d_sae={cfg.d_sae}, k={cfg.k}")
            progsae = {**init.cfg.progsae, **progsae}
        meta = {**(init.cfg.metadata if init is not None else {}), **cfg.metadata}
        self.sae = SAE(SAEConfig(d_in, cfg.d_sae, cfg.k, meta, progsae)).to(self.device)
        self.k_aux = cfg.k_aux if cfg.k_aux is not None else d_in // 2
        # Adam sees W_enc as the contiguous [N, d] block it is stored as: fused Adam copies a transposed
        # tensor in and out every step (31 -> 8 ms for both matrices at N = 16384, d = 576)
        self.adam_params = [p.detach().t() if p is self.sae.W_enc else p for p in self.sae.parameters()]
        self.opt = torch.optim.Adam(self.adam_params, lr=cfg.base_lr(), betas=(0.9, 0.999), fused=True)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.since_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=self.device)
        self.step = 0
        self.history: list[dict] = []
        self.elapsed = 0.0
        ck = latest_checkpoint(self.out) if self.out is not None else None
        if ck is not None:
            load_checkpoint(self, ck)  # its precision and kernel too: auto is measured once, when the run begins
        else:
            self.precision, self.bf16_speedup = choose_precision(cfg.precision, d_in, cfg.d_sae, self.device)
            t0 = time.perf_counter()
            self._init_weights()
            self.elapsed = time.perf_counter() - t0  # the first batch's cost (an LM stream's first buffer) counts
        for p in self.sae.parameters():  # every rank starts from rank 0's weights
            dist.broadcast(p.data)
        if ck is None or cfg.kernel != "auto":  # forced, or measured on the initial weights
            self.kernel, self.kernel_timings = choose_kernel(cfg.kernel, self._timed_step, self.device)

    def _timed_step(self, kernel: str) -> None:
        """A training step's forward and backward by `kernel`, on a seeded random batch of this rank's share
        (what `kernel: auto` times; the weights and every RNG of the run are left as they were)."""
        g = torch.Generator().manual_seed(self.cfg.seed)
        x = torch.randn(self.cfg.batch_size // self.world, self.sae.cfg.d_in, generator=g).to(self.device)
        bounds = sample_granularities(self.cfg, g)
        sae_loss(self.sae, x, bounds=bounds, weights=granularity_weights(self.cfg, bounds),
                 bf16=self.precision == "bf16", kernel=kernel).loss.backward()  # fmt: skip
        self.sae.zero_grad(set_to_none=True)

    def _init_weights(self) -> None:
        if self.init is not None:  # training keeps decoder rows at unit norm
            self.sae.load_state_dict(self.init.state_dict())
            return self.sae.fold_decoder_norm()
        torch.manual_seed(self.cfg.seed)
        sample = next(self.source.batches(self.cfg.batch_size, self.cfg.seed, 0))
        self.sae.init_tied(self.gen, geometric_median(sample.to(self.device)))

    def lr_at(self, step: int) -> float:
        warm = min(self.cfg.warmup_steps, self.cfg.steps // 10)
        return self.cfg.base_lr() * min(1.0, (step + 1) / warm) if warm else self.cfg.base_lr()

    def train_step(self, x: torch.Tensor) -> torch.Tensor:
        """One step on the global batch x [batch_size, d_in] (each rank trains on its share of it). It reads one
        number back to the host, AuxK's width (see `sae_loss`), and returns the step's numbers on the device
        (`metrics` reads them)."""
        cfg, sae = self.cfg, self.sae
        x = x.to(self.device, non_blocking=True)
        if getattr(self.source, "sharded", False):  # x is already this rank's share (an LM stream)
            mean = dist.all_sum(x.sum(0)) / cfg.batch_size
            total_var = dist.all_sum((x - mean).pow(2).sum())
        else:
            total_var = (x - x.mean(0)).pow(2).sum()
            share = x.shape[0] // self.world
            x = x[self.rank * share : (self.rank + 1) * share]
        bounds = sample_granularities(cfg, self.gen)
        dead = self.since_fired >= cfg.dead_tokens  # none can be dead before dead_tokens have gone by
        res = sae_loss(sae, x, bounds=bounds, weights=granularity_weights(cfg, bounds), k_aux=self.k_aux,
                       dead=dead if self.step * cfg.batch_size >= cfg.dead_tokens else None, aux_coef=cfg.aux_coef,
                       total_var=total_var, bf16=self.precision == "bf16", kernel=self.kernel)  # fmt: skip
        sae.zero_grad(set_to_none=True)
        res.loss.backward()
        fired = torch.zeros(cfg.d_sae, device=self.device)
        fired.index_add_(0, res.indices.reshape(-1), (res.values > 0).reshape(-1).to(fired.dtype))
        if self.world > 1:
            for p in sae.parameters():
                dist.all_sum(p.grad)
            dist.all_sum(fired)
        sae.project_decoder_grad()
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        views = [(a, p) for a, p in zip(self.adam_params, sae.parameters(), strict=True) if a is not p]
        for a, p in views:
            a.grad = p.grad.t()
        self.opt.step()
        for a, _ in views:
            a.grad = None
        sae.normalize_decoder()
        self.since_fired += cfg.batch_size
        self.since_fired.masked_fill_(fired > 0, 0)
        self.step += 1
        aux = torch.full((), float("nan"), device=self.device) if res.aux is None else res.aux.detach()
        numbers = dist.all_sum(torch.stack([res.loss.detach(), res.fvu, aux, (res.values > 0).sum().float()]))
        return torch.cat([numbers, dead.float().mean().unsqueeze(0)])

    def metrics(self, numbers: torch.Tensor) -> dict:
        """A history entry from `train_step`'s numbers (read back to the host here, at log steps only)."""
        loss_, fvu_, aux_, active, dead_frac = numbers.tolist()
        return {"step": self.step, "loss": loss_, "fvu": fvu_, "aux_fvu": None if math.isnan(aux_) else aux_,
                "l0": active / self.cfg.batch_size, "dead_frac": dead_frac, "lr": self.lr_at(self.step - 1)}  # fmt: skip

    def run(self, progress: bool = True) -> SAE:
        return train_together([self], progress)[0]

    def after_step(self, numbers: torch.Tensor) -> None:
        """Log every log_every steps, checkpoint every checkpoint_every (rank 0)."""
        cfg = self.cfg
        if self.step % cfg.log_every == 0 or self.step == cfg.steps:
            self.history.append({**self.metrics(numbers), "tokens": self.step * cfg.batch_size})
        if self.out is not None and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps):
            if dist.is_main():
                self.save_checkpoint()

    def finish(self) -> SAE:
        cfg = self.cfg
        last = self.history[-1] if self.history else {}
        self.sae.cfg.progsae["training"] = {
            "tokens": self.step * cfg.batch_size, "steps": self.step, "final_fvu": last.get("fvu"),
            "final_l0": last.get("l0"), "dead_frac": float((self.since_fired >= cfg.dead_tokens).float().mean()),
            "seconds": round(self.elapsed, 2), "precision": self.precision, "kernel": self.kernel,  # fmt: skip
            **({"bf16_gemm_speedup": round(self.bf16_speedup, 2)} if self.bf16_speedup else {}),
            **({"kernel_seconds": {k: round(v, 5) for k, v in self.kernel_timings.items()}}
               if self.kernel_timings else {}),  # fmt: skip
            "config": cfg.jsonable(),
            **({"ranks": self.world} if self.world > 1 else {}),
        }
        if self.out is not None and dist.is_main():  # cfg.json, written last, says the SAE is whole
            save_json(self.out / "history.json", self.history)
            write_sae(self.sae, self.out)
        dist.barrier()  # the SAE is on disk before any rank returns
        return self.sae

    def save_checkpoint(self) -> None:
        """This step's checkpoint in OUT/checkpoints/ (see `checkpoint.save_checkpoint`)."""
        save_checkpoint(self)


def train_together(trainers: list[Trainer], progress: bool = True) -> list[SAE]:
    """Train several SAEs on one stream of batches, so the source (an LM run on the fly) is paid once.

    They share the source, batch size and seed; each takes every batch from its own step on (after a
    kill they may have checkpointed at different steps) until its own last step."""
    first = trainers[0]
    cfg, main = first.cfg, dist.is_main()
    if any((t.source, t.cfg.batch_size, t.cfg.seed) != (first.source, cfg.batch_size, cfg.seed) for t in trainers):
        raise ValueError("SAEs trained together share one source, batch size and seed")
    start, end = min(t.step for t in trainers), max(t.cfg.steps for t in trainers)
    desc = "train" if len(trainers) == 1 else f"train {len(trainers)} SAEs"
    precisions = sorted({t.precision for t in trainers})
    speedup = [t.bf16_speedup for t in trainers if t.bf16_speedup]
    desc += f" [{'/'.join(precisions)}" + (f"; bf16 GEMM {speedup[0]:.1f}x fp32" if speedup else "")
    desc += f"; {'/'.join(sorted({t.kernel for t in trainers}))}]"
    desc += "" if first.world == 1 else f" ({first.world} ranks)"
    bar = tqdm(total=end, initial=start, disable=not (progress and main), unit="step", desc=desc, dynamic_ncols=True)
    batches = first.source.batches(cfg.batch_size, cfg.seed, start) if start < end else iter(())
    with bar:  # closed before an error is printed
        for step in range(start, end):
            t0 = time.perf_counter()
            x = next(batches)
            stepping = [t for t in trainers if t.step == step < t.cfg.steps]
            share = (time.perf_counter() - t0) / len(stepping)  # the source's time, split over its SAEs
            for t in stepping:
                t0 = time.perf_counter()
                m = t.train_step(x)
                t.elapsed += time.perf_counter() - t0 + share
                t.after_step(m)
            last = trainers[-1]
            m = last.history[-1] if last.history and last.history[-1]["step"] == last.step else None
            if m is not None:  # just logged
                bar.set_postfix(fvu=f"{m['fvu']:.4f}", l0=f"{m['l0']:.1f}", dead=f"{m['dead_frac']:.3f}")
            bar.update(1)
    return [t.finish() for t in trainers]


def train(source, cfg: TrainConfig, out: str | Path | None = None, progress: bool = True) -> SAE:
    """Train an SAE on `source` (anything with d_in and batches(batch_size, seed, start)); with `out`, saved
    there (SAELens layout) with history.json and checkpoints/, from which a rerun of the same config resumes."""
    return Trainer(cfg, source, out).run(progress)
