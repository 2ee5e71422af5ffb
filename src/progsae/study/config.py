"""A run's settings (`RunConfig`, every field a `progsae run` flag and config key) and the presets.

Each field is declared once, with its range; `validate` adds the checks that tie fields together and
checks the plan: every SAE the run will train gets a `TrainConfig` that must validate, so a bad setting is
refused before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..config import REQUIRED, from_dict, opt
from ..data.activations import DTYPES
from ..data.hook import HookConfig
from ..data.synthetic import SyntheticConfig
from ..errors import ProgsaeError
from ..products import KERNELS
from ..train import PRECISIONS, TrainConfig

# the fields a finished run may change: SAEs added or dropped, another judge (their own stages only)
INTERP_FIELDS = ("interp_tokens", "interp_latents", "judge", "judge_url")
ON_THE_FLY = ("lm", "synthetic")  # sources the SAEs train from as they are made, every SAE of a seed together
ADDITIVE = ("minutes_estimate", "saes", "train", *INTERP_FIELDS)


def hook(cfg: HookConfig) -> dict:
    """The hook settings of a config, to build another config on the same hook and contexts."""
    return {f.name: getattr(cfg, f.name) for f in fields(HookConfig)}


@dataclass
class RunConfig(HookConfig):
    """The hook and its contexts (`HookConfig`: model, layer, corpus, ctx_len, test_frac, keep_bos), then the run's own."""

    source: str = opt("cached", "the SAEs train on: cached (train_tokens extracted to acts/ first), lm (the model run on the fly, once per seed for all SAEs; acts/ then feeds the statistics only) or synthetic (known answers: the generator of `synthetic` instead of a model, run on the fly like lm)", choices=("cached", *ON_THE_FLY))
    synthetic: dict = opt({}, "with source synthetic: the generator's settings, SyntheticConfig's fields (see progsae synth --help); config file only")
    buffer_tokens: int = opt(262_144, "with source lm: activations shuffled together (memory: x d_in x 4 bytes, on the device)", min=1)
    train_tokens: int = opt(800_000, "activations extracted from the training split (source cached: what the SAEs train on)", min=1)
    acts_dtype: str = opt("float32", "extracted activations on disk: float32, or bfloat16 (half the disk; read as float32)", choices=DTYPES)
    test_tokens: int = opt(40_000, "held-out activations for evaluation", min=1)
    d_sae: int = opt(4096, "N, the largest dictionary", min=1)
    k: int = opt(32, "k of the N-latent SAEs; smaller native SAEs use k G / N", min=1)
    sae_tokens: int = opt(2_000_000, "training tokens per SAE", min=1)
    batch_size: int = opt(4096, "tokens per training step", min=1)
    precision: str = opt("fp32", "of the SAEs' encoder GEMM and top-k in training: fp32, bf16 or auto (see progsae train --help)", choices=PRECISIONS)
    kernel: str = opt("auto", "the sparse products' path in training: csr, gather, dense or auto (see progsae train --help)", choices=("auto", *KERNELS))
    matryoshka_sampled: int = opt(8, "granularities drawn per step by the sampled Matryoshka SAE", min=1)
    grid: list[int] = opt([], "G values (default N/16, N/8, N/4, N/2, N)", min=1)
    stats_tokens: int = opt(200_000, "held-out tokens of the importance statistics", min=1)
    rsa_tokens: int = opt(1000, "token sample of RSA", min=1)
    lm_tokens: int = opt(2048, "tokens of the recaptured LM loss", min=0)
    shrink_tokens: int = opt(400_000, "training activations each shrunk SAE is solved on (the vanilla SAE sorted by E[z²] shrunk to N/8, N/4, N/2 by truncate, refit, merge, distil; 0: none)", min=0)
    distil_tokens: int | None = opt(None, "fine-tuning tokens of each distilled SAE (method distil; default a quarter of sae_tokens)", min=1)
    seed: int = opt(0, "the first seed", min=0)
    seeds: int = opt(1, "every trained SAE is trained this many times (seed, seed+1, ...): intervals across seeds", min=1)
    outliers: str = opt("keep", "huge-norm tokens: keep (train and evaluate on all) or exclude", choices=("keep", "exclude"))
    outlier_quantile: float = opt(0.99, "a token is an outlier above this quantile of the training norms", min=0.5, below=1)
    bootstrap: int = opt(1000, "bootstrap replicates of every interval", min=1)
    device: str = opt("cpu", "cuda puts the model, SAE training and evaluation on the GPU")
    minutes_estimate: float | None = opt(None, "printed up front")
    interp_tokens: int = opt(40_000, "held-out tokens of the latent records, the browsers and the auto-interp contexts", min=1)
    interp_latents: int = opt(3, "latents auto-interpreted per rank band of each studied SAE (0: records and proxies only)", min=0)
    judge: str = opt("smollm2-135m", "the auto-interp judge: a local model, or the endpoint's model with judge_url")
    judge_url: str = opt("", "an OpenAI-compatible endpoint (key from PROGSAE_LLM_API_KEY or OPENAI_API_KEY)")
    saes: list[str] = opt([], "a pretrained SAE to study: PATH or NAME=PATH in any format progsae reads (repeatable)", flag="sae")
    train: bool = opt(True, "train the study's own SAEs (--no-train: study only the pretrained SAEs)")  # fmt: skip

    def validate(self) -> RunConfig:
        super().validate("run config")

        def bad(msg: str):
            raise ProgsaeError(f"run config: {msg}")

        if self.d_sae % 8:
            bad(f"d_sae must be divisible by 8 (SAEs of N/8, N/4 and N/2 are trained), got {self.d_sae}")
        if not self.judge:
            bad(f"judge must name a model, got {self.judge!r}")
        if self.judge_url and not self.judge_url.startswith(("http://", "https://")):
            bad(f"judge_url must be empty or an http(s) URL, got {self.judge_url!r}")
        if self.source in ON_THE_FLY and self.outliers == "exclude":
            bad("outliers 'exclude' needs source 'cached' (SAEs trained on the fly see every token); set one of them")
        if self.source == "synthetic":
            self.synthetic_config()
            if self.lm_tokens:
                bad("lm_tokens must be 0 with source synthetic (no language model reads synthetic activations)")
        elif self.synthetic:
            bad("synthetic settings are given but source is not synthetic; set source: synthetic or drop them")
        if any(g > self.d_sae for g in self.grid):
            bad(f"every G in grid must be in 1..{self.d_sae}, got {self.grid}")
        if not all(self.saes):
            bad(f"saes must be a list of SAE paths (PATH or NAME=PATH), got {self.saes!r}")
        if not self.train and not self.saes:
            bad("train is false and no saes are given; there is nothing to study")
        from .plan import Plan

        for spec in Plan(self).specs:  # names unique and not clashing with the trained SAEs; k <= N, ...
            if spec.trained:
                self.train_config(spec).validate()
        return self

    def train_config(self, spec, metadata: dict | None = None) -> TrainConfig:
        """The TrainConfig of one trained SAE of the plan: the run's shared settings and the family's options."""
        return TrainConfig(
            d_sae=spec.d_sae,
            k=spec.k,
            tokens=self.sae_tokens,
            device=self.device,
            batch_size=self.batch_size,
            precision=self.precision,
            kernel=self.kernel,
            seed=self.seed + spec.seed,
            log_every=max(1, self.sae_tokens // self.batch_size // 40),  # ~40 points: enough for the convergence slope
            metadata=dict(metadata or {}),
            **spec.train,
        )

    @property
    def distil(self) -> int:
        """Fine-tuning tokens of each distilled SAE."""
        return self.distil_tokens or max(1, self.sae_tokens // 4)

    def synthetic_config(self) -> SyntheticConfig:
        return from_dict(SyntheticConfig, self.synthetic, "run config synthetic")

    @property
    def G(self) -> list[int]:
        """The granularities every SAE is tabled at: the grid (default N/16 .. N) with N/4, N/2 and N."""
        N = self.d_sae
        return sorted(set(self.grid or [N // 16, N // 8, N // 4, N // 2, N]) | {N // 4, N // 2, N})

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return from_dict(cls, d, "run config")


PRESETS = {
    # 2 CPU cores, 34 minutes measured where bf16 is fast (an Intel Xeon with AMX; 46 on an AMD EPYC with AVX-512
    # BF16; auto trains in bf16 on both, longer in fp32): the embedded
    # SmolLM2-135M and the KJV corpus; two seeds; interpretability (records, browsers, the local judge on 15
    # latents per SAE) ~4 minutes; shrinking and evaluating the shrunk SAEs ~7 minutes
    "demo": RunConfig(seeds=2, precision="auto", minutes_estimate=34),
    # known answers, a few minutes on 2 CPU cores: the paper's methods trained on hierarchical synthetic data
    # (8 trees of a root, 3 children and 9 grandchildren among 128 Zipfian features in 64 dimensions: twice as
    # many features as dimensions), N = 128 latents, one per true feature
    "synthetic": RunConfig(
        source="synthetic",
        synthetic={"d_in": 64, "n_features": 128, "mean_active": 6, "trees": 8, "depth": 2, "branching": 3},
        train_tokens=50_000,
        test_tokens=20_000,
        d_sae=128,
        k=6,
        batch_size=1024,
        sae_tokens=600_000,
        lm_tokens=0,
        stats_tokens=50_000,
        rsa_tokens=500,  # RSA's cost is quadratic in its sample: at 1000 it took most of the evaluation
        interp_latents=0,
        seeds=3,
        minutes_estimate=3,
    ),
    # the paper's setting: Gemma-2-2b layer 2, N up to 65,536; GPUs and tens of millions of tokens. The SAEs
    # train straight from the model (50M tokens of float32 at d = 2304 would be 460 GB of shards); 2M tokens
    # are extracted, in bfloat16 (9 GB), for the outlier profile and the importance statistics
    "paper": RunConfig(
        model="google/gemma-2-2b",
        layer=2,
        corpus="hf:monology/pile-uncopyrighted:train",
        ctx_len=1024,
        source="lm",
        precision="auto",
        buffer_tokens=1_048_576,
        acts_dtype="bfloat16",
        train_tokens=2_000_000,
        test_tokens=500_000,
        d_sae=65536,
        k=256,
        sae_tokens=50_000_000,
        lm_tokens=100_000,
        stats_tokens=2_000_000,
        device="cuda",
        seeds=3,
        minutes_estimate=None,
    ),
}


@dataclass
class RunArgs:
    """`progsae run`'s arguments besides RunConfig's (see cli.py)."""

    out: str = opt(REQUIRED, "run directory: every stage's output, results.json, report.html")
    preset: str = opt("demo", "demo: SmolLM2-135M on 2 CPU cores; synthetic: known answers on 2 CPU cores; paper: Gemma-2-2b, N up to 65,536 on a GPU",
                      choices=tuple(PRESETS))  # fmt: skip
    config: str | None = opt(None, "JSON or YAML file of run settings overriding the preset; flags override it")
    force: bool = opt(False, "redo finished stages")
