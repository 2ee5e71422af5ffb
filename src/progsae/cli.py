"""The `progsae` command: one subcommand per stage, each a thin shell over the library.

Every user error is one line `progsae: error: ...` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from . import dist
from .config import numbers
from .errors import ProgsaeError
from .files import check_output_dir, check_output_file, save_json
from .train import PRECISIONS


def _rank_window(text: str) -> tuple[int, int | None]:
    lo, _, hi = text.partition(":")
    try:
        return int(lo or 1), int(hi) if hi else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO:HI ranks (e.g. 1:1000 or 10:), got {text!r}") from None


def cmd_synth(a) -> None:
    from .data import SyntheticConfig, SyntheticSource, write_activations

    if a.tokens < 1:
        raise ProgsaeError(f"--tokens must be at least 1, got {a.tokens}")
    if Path(a.out).exists() and not a.force:
        raise ProgsaeError(f"{a.out} already exists; choose another --out, or --force to replace it")
    cfg = SyntheticConfig(
        d_in=a.d_in, n_features=a.features, alpha=a.alpha, mean_active=a.mean_active, noise=a.noise, seed=a.seed
    )
    src = SyntheticSource(cfg)
    n_batches = -(-a.tokens // 8192)
    first = 1_000_000_000 if a.held_out else 0  # same features, a disjoint stretch of the stream
    rows = (src.sample(min(8192, a.tokens - j * 8192), first + j) for j in range(n_batches))
    out = write_activations(
        a.out,
        tqdm(rows, total=n_batches, desc="synth", unit="batch"),
        cfg.d_in,
        {
            **src.describe(),
            "held_out": a.held_out,
            "note": "synthetic activations with known features (tests and demos only)",
        },
    )
    print(
        f"wrote {a.tokens} synthetic activations (d_in={cfg.d_in}, {cfg.n_features} features, alpha={cfg.alpha}) to {out}"
    )


def cmd_extract(a) -> None:
    from .config import from_dict, given
    from .data.extract import ExtractConfig, extract

    cfg = from_dict(ExtractConfig, given(ExtractConfig, a), "extract")
    if (Path(a.out) / "manifest.json").is_file() and not a.force:
        print(f"{a.out} is already a complete activation directory; nothing to do (--force re-extracts)")
        return
    extract(cfg, a.out)


def cmd_train(a) -> None:
    from .config import from_dict, given, load_file
    from .data import ActivationDir
    from .data.stream import LMSource, StreamConfig
    from .train import TrainConfig, Trainer

    cfg = TrainConfig.from_dict({**(load_file(a.config) if a.config else {}), **given(TrainConfig, a)})
    stream = given(StreamConfig, a)
    if a.acts and stream:
        raise ProgsaeError(f"give ACTS or --{next(iter(stream)).replace('_', '-')} (training from the model), not both")
    if a.acts:
        acts = ActivationDir(a.acts, cfg.skip_nonfinite)
        source = acts.manifest.get("source", {})
    else:  # straight from the model: no activations on disk
        acts = LMSource(from_dict(StreamConfig, stream, "stream"), dist.init(cfg.device))
        source = acts.describe()
    cfg.metadata.update({k: v for k, v in source.items() if k in ("model_name", "hook_name")})
    out = check_output_dir(a.out)
    dist.init(cfg.device)  # under torchrun: join the ranks before touching --out
    if a.force and out.exists() and dist.is_main():
        import shutil

        shutil.rmtree(out)
    dist.barrier()
    trainer = Trainer(cfg, acts, out)
    say = print if dist.is_main() else lambda *_: None
    if trainer.step >= cfg.steps and (out / "cfg.json").is_file():
        say(f"{out} is already trained to {trainer.step} steps with these settings; nothing to do (--force retrains)")
        return
    if trainer.step:
        say(f"resuming from step {trainer.step} of {cfg.steps}")
    sae = trainer.run()
    t = sae.cfg.progsae["training"]
    say(
        f"trained {sae.d_sae}-latent SAE (k={sae.k}, matryoshka={cfg.mode}) on {t['tokens']} tokens in "
        f"{t['seconds']:.0f}s: FVU {t['final_fvu']:.4f}, L0 {t['final_l0']:.1f}, dead {t['dead_frac']:.3f}; saved to {out}"
        + (f" ({dist.world()} ranks)" if dist.world() > 1 else "")
    )


def cmd_stats(a) -> None:
    from .analysis import latent_stats, save_stats
    from .data import ActivationDir
    from .formats import load_sae

    check_output_file(a.out)
    sae, acts = load_sae(a.sae), ActivationDir(a.acts)
    _check_d_in(sae, acts)
    _set_precision(sae, a.precision)
    n = min(a.tokens or acts.n_tokens, acts.n_tokens)
    rows = tqdm(acts.iter_rows(4096, n), total=-(-n // 4096), desc="stats", unit="batch")
    stats = latent_stats(sae, rows)
    save_stats(a.out, stats, str(a.sae))
    print(f"statistics of {sae.d_sae} latents over {n} tokens written to {a.out}")


def cmd_permute(a) -> None:
    from .analysis import load_stats, sort_by_importance
    from .formats import load_sae, save_sae

    check_output_dir(a.out)
    sae = load_sae(a.sae)
    save_sae(sort_by_importance(sae, load_stats(a.stats, sae), a.by), a.out, a.format)
    fmt = a.format or sae.cfg.source.get("format", "saelens")
    wrote = f"{fmt} format" if fmt in ("saelens", "sparsify") else f"SAELens format (progsae writes no {fmt} files)"
    print(f"SAE with latents sorted by {a.by} (descending) written to {a.out} in {wrote}")


def inspect_sae(path: str, stats_path: str | None = None) -> dict:
    """What `progsae inspect` prints, as a dict."""
    import torch

    from .analysis import load_stats
    from .analysis.rsa import spearman
    from .formats import load_sae

    sae = load_sae(path)
    src, p = sae.cfg.source, sae.cfg.progsae
    info = {
        "path": str(path),
        "format": src.get("format", "saelens"),
        "folded": src.get("folded", []),
        "architecture": sae.architecture,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "model_name": sae.cfg.metadata.get("model_name"),
        "hook_name": sae.cfg.metadata.get("hook_name"),
        "granularities": p.get("granularities"),
        "permutation": (p.get("permutation") or {}).get("metric"),
    }
    if hasattr(sae, "threshold"):
        t = sae.threshold.detach().double()
        info["threshold"] = {"min": float(t.min()), "median": float(t.median()), "max": float(t.max())}
    if stats_path:
        stats = load_stats(stats_path, sae)
        index = torch.arange(sae.d_sae, dtype=torch.float64)
        info["order"] = {
            m: {
                "spearman_index": spearman(index, stats[m].double()),
                "sorted": bool((stats[m][1:] <= stats[m][:-1]).all()),
            }
            for m in ("e_z2", "freq")
        }
    return info


def cmd_browse(a) -> None:
    from .data import ActivationDir
    from .data.lm import load_lm
    from .formats import load_sae
    from .report.browser import browse, server

    out = check_output_dir(a.out)
    sae, acts = load_sae(a.sae), ActivationDir(a.acts)
    _check_d_in(sae, acts)
    model, tok, _ = load_lm(a.model or acts.manifest.get("source", {}).get("model", ""))
    browse(sae, acts, out, model, tok, max_tokens=a.tokens)
    print(f"browser of {sae.d_sae} latents written to {out}/index.html (opens from disk)")
    if a.serve is not None:
        with server(out, a.serve) as srv:
            print(f"serving it at http://127.0.0.1:{srv.server_address[1]}/ (Ctrl-C stops)", flush=True)
            srv.serve_forever()


def cmd_inspect(a) -> None:
    info = inspect_sae(a.sae, a.stats)
    if a.json:
        print(json.dumps(info, indent=2))
        return
    arch = info["architecture"]
    if arch == "topk":
        arch += f" (k = {info['k']})"
    if "threshold" in info:
        t = info["threshold"]
        arch += f", threshold {t['min']:.4g}" + ("" if t["min"] == t["max"] else f" .. {t['max']:.4g} (median {t['median']:.4g})")
        if arch.startswith("batchtopk") and info["k"] is not None:
            arch += f", trained for mean L0 {info['k']:g}"
    rows = [
        ("format", info["format"] + (f" (folded into the weights: {', '.join(info['folded'])})" if info["folded"] else "")),
        ("architecture", arch),
        ("d_in x d_sae", f"{info['d_in']} x {info['d_sae']}"),
        ("model", info["model_name"] or "unknown"),
        ("hook", info["hook_name"] or "unknown"),
        ("granularities", ", ".join(map(str, info["granularities"])) if info["granularities"] else "none (not Matryoshka)"),
        ("permutation", f"sorted by {info['permutation']}" if info["permutation"] else "none recorded"),
    ]
    for m, o in (info.get("order") or {}).items():
        verdict = "in importance order" if o["sorted"] else "not in importance order (progsae permute sorts it)"
        rows.append((f"order by {m}", f"Spearman(index, {m}) = {o['spearman_index']:+.3f}: {verdict}"))
    width = max(len(k) for k, _ in rows)
    print(f"{a.sae}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def cmd_powerlaw(a) -> None:
    from .analysis import fit_power_law, load_stats, plot_power_laws

    stats = load_stats(a.stats)
    lo, hi = a.window
    series = {m: stats[m].numpy() for m in a.metrics}
    fits = {m: fit_power_law(v, lo, hi) for m, v in series.items()}
    for m, f in fits.items():
        print(f"{m:>13}: exponent {f.exponent:+.3f}  R^2 {f.r2:.3f}  (ranks {f.lo}..{f.hi})")
    if a.plot:
        plot_power_laws(series, fits, a.plot, title=str(a.stats))
        print(f"plot written to {a.plot}")
    if a.json:
        save_json(a.json, {m: f.to_dict() for m, f in fits.items()})


def cmd_eval(a) -> None:
    from .analysis import default_grid
    from .analysis.evaluate import evaluate
    from .analysis.lm_eval import LMSplice, directory_contexts
    from .data import ActivationDir
    from .data.lm import load_lm
    from .errors import check_device
    from .formats import load_sae

    check_output_file(a.out)
    sae, acts = load_sae(a.sae).to(check_device(a.device)), ActivationDir(a.acts)
    _check_d_in(sae, acts)
    _set_precision(sae, a.precision, a.device)
    Gs = a.G or default_grid(sae.d_sae)
    for G in Gs:
        sae.check_G(G)
    lm = None
    if a.lm_tokens:  # load the model first: a bad one fails before the long passes
        contexts = directory_contexts(acts, a.lm_tokens)
        source = acts.manifest["source"]
        lm = LMSplice(load_lm(a.model or source["model"], a.device)[0], source["layer"], contexts)
    results = {"sae": str(a.sae), "acts": str(a.acts),
               **evaluate(sae, acts, Gs, max_tokens=a.tokens, rsa_tokens=a.rsa_tokens, lm=lm)}  # fmt: skip
    save_json(a.out, results)
    head = "  recaptured prefix/rescaled" if lm else ""

    def num(v, spec: str) -> str:  # rescaled values are None for SAEs without a rescaled mode
        return "—" if v is None else format(v, spec)

    print(f"{'G':>8} {'FVU prefix':>11} {'FVU rescaled':>13} {'L0':>7} {'dead':>6} {'RSA':>6}{head}")
    for row in results["table"]:
        line = (
            f"{row['G']:>8} {row['fvu_prefix']:>11.4f} {num(row['fvu_rescaled'], '>13.4f'):>13} {row['l0']:>7.1f} "
            f"{row['dead_frac']:>6.3f} {row['rsa_prefix']['cosine']['spearman']:>6.3f}"
        )
        if lm:
            line += f"  {row['recaptured_prefix']:>10.3f} / {num(row['recaptured_rescaled'], '.3f')}"
        print(line)
    if "rescaled" not in sae.modes:
        print(f"rescaled mode: none for a {sae.architecture} SAE (its first G latents are the prefix mode)")
    if lm:
        r = results["lm"]
        print(
            f"LM cross-entropy over {r['n_tokens']} tokens: clean {r['ce_clean']:.3f}, "
            f"zero-ablated {r['ce_zero']:.3f}, mean-ablated {r['ce_mean']:.3f}"
        )
    print(f"RSA: Spearman correlation of cosine dissimilarities over {results['rsa_tokens']} tokens (prefix mode)")
    print(f"results ({results['n_tokens']} tokens; full FVU curve over G=1..{sae.d_sae}) written to {a.out}")


def cmd_run(a) -> None:
    from .config import given, load_file
    from .report import write_report
    from .run import PRESETS, Run, RunConfig

    base = {**asdict(PRESETS[a.preset]), **(load_file(a.config) if a.config else {}), **given(RunConfig, a)}
    cfg = RunConfig.from_dict(base)
    results = Run(cfg, a.out, force=a.force).run()
    if not dist.is_main():  # under torchrun rank 0 alone writes the report
        return
    report = write_report(a.out)
    print(f"\nreport: {report}  ({results['seconds'] / 60:.1f} minutes)")
    for f in results["findings"]:
        print(f"- {f['verdict']}: {f['paper']} -- ours: {f['ours']}")


def _set_precision(sae, precision: str, device: str = "cpu") -> None:
    """How the SAE's encode selects: fp32, bf16 (TopK only: `SAE.encode` refuses it otherwise), or auto (bf16
    where a timed GEMM of its encoder's shape is 1.5x faster, as in training)."""
    from .train import choose_precision

    if precision == "auto":
        precision = choose_precision("auto", sae.cfg.d_in, sae.d_sae, device)[0] if sae.architecture == "topk" else "fp32"
    sae.precision = precision


PRECISION_HELP = ("encoder GEMM and top-k of a TopK SAE: fp32 (default), bf16 (selected values recomputed in fp32, "
                  "as in training) or auto (bf16 where this machine's bf16 GEMM is 1.5x faster)")  # fmt: skip


def _check_d_in(sae, acts) -> None:
    if sae.cfg.d_in != acts.d_in:
        raise ProgsaeError(
            f"the SAE expects d_in={sae.cfg.d_in} but {acts.path} holds d_in={acts.d_in}; "
            "use activations from the layer the SAE was trained on"
        )


SAE_HELP = (
    "SAE: a directory of progsae, SAELens, sparsify (or a sparsify run directory with one hookpoint) or "
    "dictionary_learning (trainer_i/), a Gemma Scope params.npz, or a hub id owner/repo[/folder] (network)"
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other progsae error
        self.exit(2, f"progsae: error: {self.prog.removeprefix('progsae ')}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .analysis import METRICS
    from .config import add_flags
    from .data.extract import ExtractConfig
    from .data.stream import StreamConfig
    from .run import PRESETS, RunConfig
    from .train import TrainConfig

    p = _Parser(
        prog="progsae",
        description="Progressive sparse autoencoders: train TopK and "
        "Matryoshka SAEs, reorder latents by importance, evaluate at every dictionary size.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("run", help="the paper's study end to end: activations, SAEs, permutation, evaluation, report")
    s.add_argument(
        "--preset",
        choices=list(PRESETS),
        default="demo",
        help="demo: SmolLM2-135M on 2 CPU cores (default); paper: Gemma-2-2b, N up to 65,536 on a GPU",
    )
    s.add_argument("--config", help="JSON or YAML file of run settings overriding the preset; flags override it")
    s.add_argument("--out", required=True, help="run directory: every stage's output, results.json, report.html")
    add_flags(s, RunConfig, skip=("minutes_estimate",))
    s.add_argument("--force", action="store_true", help="redo finished stages")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("synth", help="write synthetic activations with known features (tests and demos)")
    s.add_argument("--out", required=True, help="activation directory to create")
    s.add_argument("--tokens", type=int, default=1_000_000)
    s.add_argument("--d-in", type=int, default=64)
    s.add_argument("--features", type=int, default=512, help="number of true feature directions")
    s.add_argument("--alpha", type=float, default=1.0, help="feature i fires with probability ~ i^-alpha")
    s.add_argument("--mean-active", type=float, default=8.0, help="mean number of active features per token")
    s.add_argument("--noise", type=float, default=0.01)
    s.add_argument("--seed", type=int, default=0, help="seeds the features and the stream")
    s.add_argument("--held-out", action="store_true", help="same features, tokens disjoint from the default stream")
    s.add_argument("--force", action="store_true", help="replace --out if it exists")
    s.set_defaults(fn=cmd_synth)

    s = sub.add_parser("extract", help="residual-stream activations of a language model over a text corpus")
    s.add_argument("--out", required=True, help="activation directory to create (a killed run resumes)")
    s.add_argument("--force", action="store_true", help="re-extract even if --out is complete")
    add_flags(s, ExtractConfig)
    s.set_defaults(fn=cmd_extract)

    s = sub.add_parser(
        "train",
        help="train a TopK or Matryoshka SAE on an activation directory, or straight from the model (no ACTS)",
    )
    s.add_argument(
        "acts", nargs="?", help="activation directory; without it the model runs on the fly (StreamConfig flags)"
    )
    s.add_argument(
        "--out",
        required=True,
        help="SAE directory to write (SAELens layout), with history.json and checkpoints/ (a rerun resumes from the newest)",
    )
    s.add_argument("--config", help="JSON or YAML file of TrainConfig fields; flags override it")
    s.add_argument("--force", action="store_true", help="discard an existing run directory instead of resuming")
    add_flags(s, TrainConfig)
    add_flags(s, StreamConfig)
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("stats", help="importance statistics of every latent (E[z^2], frequency, E[z], max)")
    s.add_argument("sae", help=SAE_HELP)
    s.add_argument("acts", help="activation directory")
    s.add_argument("--out", required=True, help="statistics file (.safetensors)")
    s.add_argument("--tokens", type=int, help="use at most this many tokens (default all)")
    s.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)
    s.set_defaults(fn=cmd_stats)

    s = sub.add_parser("permute", help="reorder an SAE's latents by decreasing importance (no retraining)")
    s.add_argument("sae", help=SAE_HELP)
    s.add_argument("--stats", required=True, help="statistics file from `progsae stats`")
    s.add_argument("--by", default="e_z2", choices=METRICS, help="importance metric (default e_z2)")
    s.add_argument("--out", required=True, help="SAE directory to write")
    s.add_argument(
        "--format",
        choices=["saelens", "sparsify"],
        help="layout to write (default: the one read; dictionary_learning and Gemma Scope sources as saelens)",
    )
    s.set_defaults(fn=cmd_permute)

    s = sub.add_parser("browse", help="a static feature browser: latents in importance order, their contexts")
    s.add_argument("sae", help=SAE_HELP)
    s.add_argument("acts", help="activation directory from `progsae extract` (held-out split)")
    s.add_argument("--out", required=True, help="directory to write (index.html opens from disk)")
    s.add_argument("--tokens", type=int, default=50_000, help="rows of ACTS to read (default 50,000)")
    s.add_argument("--model", help="model for the logit lens and the tokens (default: the one ACTS was extracted from)")
    s.add_argument("--serve", type=int, nargs="?", const=8000, metavar="PORT",
                   help="then serve it on http://127.0.0.1:PORT (default 8000) until Ctrl-C")  # fmt: skip
    s.set_defaults(fn=cmd_browse)

    s = sub.add_parser("inspect", help="what an SAE file is: format, architecture, sizes, hook, order")
    s.add_argument("sae", help=SAE_HELP)
    s.add_argument("--stats", help="statistics file: also tell whether the latents are in importance order")
    s.add_argument("--json", action="store_true", help="print the facts as JSON")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("powerlaw", help="fit power laws of importance against rank")
    s.add_argument("stats", help="statistics file from `progsae stats`")
    s.add_argument(
        "--metrics",
        type=lambda t: t.split(","),
        default=["e_z2", "freq", "dec_cov_eigs"],
        help="comma-separated: e_z2, freq, e_z, max, dec_cov_eigs",
    )
    s.add_argument("--window", type=_rank_window, default=(1, None), help="rank window LO:HI (default all)")
    s.add_argument("--plot", help="write a log-log plot with the fits (PNG)")
    s.add_argument("--json", help="write the fits as JSON")
    s.set_defaults(fn=cmd_powerlaw)

    s = sub.add_parser("eval", help="FVU, L0 and dead fraction at every granularity, both truncation modes")
    s.add_argument("sae", help=SAE_HELP)
    s.add_argument("acts", help="activation directory")
    s.add_argument("--out", required=True, help="results JSON")
    s.add_argument("--G", type=numbers(int), help="granularities to table (default powers of two up to N)")
    s.add_argument("--tokens", type=int, help="use at most this many tokens (default all)")
    s.add_argument("--rsa-tokens", type=int, default=1000, help="token sample for RSA (default 1000)")
    s.add_argument(
        "--lm-tokens",
        type=int,
        default=0,
        help="also measure recaptured LM loss and KL on this many tokens of the directory's contexts",
    )
    s.add_argument("--model", help="model for the LM loss (default: the one named in the activation manifest)")
    s.add_argument("--device", default="cpu", help="where the SAE and the model run: cpu (default) or cuda")
    s.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)
    s.set_defaults(fn=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "metrics", None):
        from .analysis import METRICS

        bad = [m for m in args.metrics if m not in (*METRICS, "dec_cov_eigs")]
        if bad:
            print(
                f"progsae: error: unknown metric {bad[0]!r}; use e_z2, freq, e_z, max or dec_cov_eigs", file=sys.stderr
            )
            return 2
    import signal
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:  # `kill` ends a command as Ctrl-C does: with a word on how to resume
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    ok = False
    try:
        args.fn(args)
        ok = True
    except ProgsaeError as e:
        print(f"progsae: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "progsae: interrupted; finished stages, checkpoints and partial extractions are kept: "
            "the same command resumes from them",
            file=sys.stderr,
        )
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        dist.close(ok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
