"""One place per option: every config field has its flag, flags reach the config, bad values are one line."""

import re
from dataclasses import fields

import pytest

from progsae import ProgsaeError
from progsae.analysis.evaluate import EvalArgs
from progsae.analysis.importance import PermuteArgs, StatsArgs
from progsae.analysis.powerlaw import PowerlawArgs
from progsae.analysis.shrink import ShrinkArgs
from progsae.cli import InspectArgs, build_parser, main
from progsae.config import check_fields, flag_name, from_args, load_file
from progsae.data.extract import ExtractArgs, ExtractConfig
from progsae.data.hook import HookConfig
from progsae.data.stream import StreamConfig
from progsae.data.synthetic import SynthArgs, SyntheticConfig
from progsae.report.browser import BrowseArgs
from progsae.study.config import RunConfig
from progsae.train import TrainConfig

COMMANDS = {"train": (TrainConfig, ["ACTS"]), "extract": (ExtractConfig, []), "run": (RunConfig, [])}

# every subcommand: the dataclasses its arguments come from, and the arguments still written by hand
ARGUMENTS = {
    "run": ((RunConfig,), {"preset", "config", "out", "force"}),
    "synth": ((SynthArgs, SyntheticConfig), set()),
    "extract": ((ExtractArgs, ExtractConfig), set()),
    "train": ((TrainConfig, StreamConfig), {"acts", "out", "config", "force"}),
    "stats": ((StatsArgs,), set()),
    "permute": ((PermuteArgs,), set()),
    "browse": ((BrowseArgs,), set()),
    "inspect": ((InspectArgs,), set()),
    "powerlaw": ((PowerlawArgs,), set()),
    "eval": ((EvalArgs,), set()),
    "shrink": ((ShrinkArgs,), set()),
}
NO_FLAG = {"metadata", "synthetic", "minutes_estimate"}  # dicts (file only) and a field `run` leaves to its presets


def subparser(name):
    p = build_parser()
    return next(a for a in p._subparsers._group_actions if a.dest == "command").choices[name]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_config_field_has_its_flag_named_after_it(command):
    cls, _ = COMMANDS[command]
    flags = {opt for a in subparser(command)._actions for opt in a.option_strings}
    skipped = NO_FLAG
    missing = [f.name for f in fields(cls) if f.name not in skipped and flag_name(f) not in flags]
    assert not missing, f"{command}: no flag for {missing}"
    for f in fields(cls):  # every field documents itself, flag or not
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


def test_flags_of_every_kind_reach_the_train_config():
    a = subparser("train").parse_args(
        ["ACTS", "--out", "o", "--d-sae", "64", "--matryoshka", "16,32,64", "--matryoshka-weights", "1,0.5,0.25",
         "--matryoshka-sampler", "pareto", "--pareto-a", "1.5", "--aux-coef", "0.1", "--warmup-steps", "7"]
    )  # fmt: skip
    from progsae.config import from_dict, given

    cfg = from_dict(TrainConfig, given(TrainConfig, a), "train config")
    assert (cfg.d_sae, cfg.matryoshka, cfg.matryoshka_weights) == (64, [16, 32, 64], [1.0, 0.5, 0.25])
    assert (cfg.matryoshka_sampler, cfg.pareto_a, cfg.aux_coef, cfg.warmup_steps) == ("pareto", 1.5, 0.1, 7)
    assert cfg.k == TrainConfig().k  # a flag left out keeps the default


def test_run_flags_override_the_config_file_and_booleans_negate():
    p = subparser("run")
    a = p.parse_args(["--out", "o", "--no-train", "--sae", "x=a", "--sae", "b", "--grid", "8,16", "--judge-url", "http://h"])
    from progsae.config import given

    assert given(RunConfig, a) == {"train": False, "saes": ["x=a", "b"], "grid": [8, 16], "judge_url": "http://h"}


@pytest.mark.parametrize(
    "setting, match",
    [
        ({"d_sae": "4096"}, "d_sae must be int, got '4096'"),
        ({"seeds": 1.5}, "seeds must be int"),
        ({"grid": 8}, "grid must be a list of int"),
        ({"train": "yes"}, "train must be bool"),
        ({"layers": 3}, "unknown field(s) layers"),
        ({"layer": -1}, "layer must be >= 0"),
        ({"ctx_len": 1}, "ctx_len must be at least 2"),
        ({"k": 8192}, "k=8192 exceeds d_sae=4096"),
        ({"matryoshka_sampled": 0}, "matryoshka_sampled must be a positive integer"),
        ({"outlier_quantile": 1.5}, "outlier_quantile must be in [0.5, 1)"),
    ],
)
def test_a_run_config_with_a_bad_key_or_value_is_one_line(tmp_path, capsys, setting, match):
    import json

    (tmp_path / "cfg.json").write_text(json.dumps(setting))
    assert main(["run", "--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert not (tmp_path / "out").exists()


def test_a_train_flag_of_the_wrong_type_is_one_argparse_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "acts", "--out", "o", "--matryoshka", "16,x"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "comma-separated ints" in err, err


def test_every_subcommand_has_its_dataclass_and_every_argument_is_a_field():
    commands = next(a for a in build_parser()._subparsers._group_actions if a.dest == "command").choices
    assert set(commands) == set(ARGUMENTS)
    for name, (classes, by_hand) in ARGUMENTS.items():
        actions = {a.dest: a for a in commands[name]._actions if a.dest != "help"}
        declared = {f.name: f for cls in classes for f in fields(cls) if f.name not in NO_FLAG}
        assert set(actions) == set(declared) | by_hand, name  # every field has its argument, and vice versa
        for f in declared.values():
            a = actions[f.name]
            if f.metadata.get("positional"):
                assert a.option_strings == [], (name, f.name)
            else:
                assert a.option_strings[0] == flag_name(f) and a.default is None, (name, f.name)
            assert a.help.startswith(f.metadata["help"]), (name, f.name)


def test_the_synth_flags_default_to_the_synthetic_config_and_reach_it():
    p = build_parser()
    cfg = from_args(SyntheticConfig, p.parse_args(["synth", "--out", "o"]), "synthetic")
    assert cfg == SyntheticConfig()  # no copy of its defaults to drift
    a = from_args(SynthArgs, p.parse_args(["synth", "--out", "o"]), "synth")
    assert (a.out, a.tokens, a.held_out, a.force) == ("o", 1_000_000, False, False)
    flags = ["--d-in", "8", "--features", "9", "--alpha", "0.5", "--mean-active", "2", "--magnitude-std", "0.1",
             "--noise", "0", "--seed", "3"]  # fmt: skip
    cfg = from_args(SyntheticConfig, p.parse_args(["synth", "--out", "o", *flags]), "synthetic")
    assert cfg == SyntheticConfig(d_in=8, n_features=9, alpha=0.5, mean_active=2, magnitude_std=0.1, noise=0, seed=3)
    shown = {a.option_strings[0]: a.help for a in subparser("synth")._actions if a.option_strings}
    for f in fields(SyntheticConfig):  # --help shows the config's own defaults (a switch's is off)
        if f.type not in (bool, "bool"):
            assert shown[flag_name(f)].endswith(f"(default {f.default})"), f.name
        else:
            assert f.default is False and "(default" not in shown[flag_name(f)], f.name


def test_run_help_shows_the_default_presets_values():
    """`progsae run` without --preset runs the demo preset: its help gives the demo's values, not RunConfig's."""
    from progsae.study.config import PRESETS

    shown = {a.option_strings[0]: a.help for a in subparser("run")._actions if a.option_strings}
    assert shown["--seeds"].endswith("(default 2)") and shown["--precision"].endswith("(default auto)")
    assert PRESETS["demo"].seeds == 2 and RunConfig().seeds == 1  # the two differ: the help follows the preset


def test_extract_stream_and_run_declare_the_hook_once():
    for cls in (ExtractConfig, StreamConfig):
        assert issubclass(cls, HookConfig)
        mine = {f.name: f for f in fields(cls)}
        for f in fields(HookConfig):  # the same default, help and range, inherited
            assert mine[f.name] is f or (mine[f.name].default, mine[f.name].metadata) == (f.default, f.metadata)
    hook = HookConfig()
    assert (hook.model, hook.layer, hook.corpus, hook.ctx_len, hook.test_frac, hook.keep_bos) == (
        "smollm2-135m", 6, "kjv", 128, 0.05, False)  # fmt: skip
    assert (hook.first_position, hook.per_context) == (1, 127)
    assert (HookConfig(keep_bos=True).first_position, HookConfig(keep_bos=True).per_context) == (0, 128)


@pytest.mark.parametrize(
    "cfg, match",
    [
        (ExtractConfig(test_frac=1.0), "extract: test_frac must be in (0, 1), got 1.0"),
        (ExtractConfig(test_frac=0), "extract: test_frac must be in (0, 1), got 0"),
        (ExtractConfig(tokens=0), "extract: tokens must be a positive integer, got 0"),
        (ExtractConfig(batch_size=2.5), "extract: batch_size must be an integer, got 2.5"),
        (ExtractConfig(shard_tokens=-1), "extract: shard_tokens must be >= 0, got -1"),
        (ExtractConfig(split="dev"), "extract: split must be 'train' or 'test', got 'dev'"),
        (ExtractConfig(ctx_len=1), "extract: ctx_len must be at least 2 (BOS and one token), got 1"),
        (StreamConfig(layer=-1), "stream: layer must be >= 0, got -1"),
        (StreamConfig(forward_batch=0), "stream: forward_batch must be a positive integer, got 0"),
        (StreamConfig(ctx_len=0), "stream: ctx_len must be a positive integer, got 0"),
    ],
)
def test_a_hook_setting_out_of_range_is_one_line(cfg, match):
    with pytest.raises(ProgsaeError, match=f"^{re.escape(match)}$"):
        cfg.validate()


def test_one_token_contexts_need_keep_bos():
    assert ExtractConfig(ctx_len=1, keep_bos=True).validate().per_context == 1


def test_check_fields_words_every_kind_of_range():
    from dataclasses import dataclass

    from progsae.config import opt

    @dataclass
    class Ranges:
        a: float = opt(0.5, "", above=0, below=1)
        b: float = opt(0.5, "", min=0.5, below=1)
        c: float = opt(1.0, "", above=0)
        d: int = opt(3, "", max=3)
        e: str = opt("x", "", choices=("x",))

    for field, value, want in [
        ("a", 1, "in (0, 1)"), ("b", 0.4, "in [0.5, 1)"), ("c", 0.0, "> 0"), ("d", 4, "<= 3"), ("e", "y", "'x'"),
    ]:  # fmt: skip
        with pytest.raises(ProgsaeError, match=f"^r: {field} must be {re.escape(want)}, got {value!r}$"):
            check_fields(Ranges(**{field: value}), "r")
    check_fields(Ranges(b=0.5), "r")  # inclusive min


@pytest.mark.parametrize(
    "args, match",
    [
        (["stats", "s", "a"], "the following arguments are required: --out"),
        (["stats", "s", "a", "--out", "o", "--precision", "fp16"], "invalid choice: 'fp16'"),
        (["inspect", "s", "--no-json"], "unrecognized arguments: --no-json"),  # a command's own switch
        (["eval", "s", "a", "--out", "o", "--G", "8,x"], "comma-separated ints"),
        (["browse", "s", "a", "--out", "o", "--tokens", "many"], "invalid int value: 'many'"),
    ],
)
def test_a_bad_command_argument_is_one_argparse_line(capsys, args, match):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("progsae: error:") and match in err, err


@pytest.mark.parametrize(
    "args, match",
    [
        (["synth", "--out", "o", "--tokens", "0"], "synth: tokens must be a positive integer, got 0"),
        (["synth", "--out", "o", "--mean-active", "600"], "synthetic: mean_active must be in (0, n_features]"),
        (["synth", "--out", "o", "--noise", "-1"], "synthetic: noise must be >= 0, got -1.0"),
        (["eval", "s", "a", "--out", "o", "--rsa-tokens", "0"], "eval: rsa_tokens must be a positive integer"),
        (["powerlaw", "s", "--window", "a:b"], "powerlaw: window must be LO:HI ranks"),
        (["powerlaw", "s", "--window", "0:5"], "powerlaw: window must be LO:HI ranks with 1 <= LO <= HI"),
        (["browse", "s", "a", "--out", "o", "--serve", "70000"], "browse: serve must be in [0, 65535]"),
    ],
)
def test_a_command_value_out_of_range_is_one_line_before_any_work(tmp_path, capsys, args, match):
    args = [str(tmp_path / a) if a in ("o", "s", "a") else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert not (tmp_path / "o").exists()


def test_command_arguments_of_every_kind_reach_their_dataclass():
    p = build_parser()
    a = from_args(BrowseArgs, p.parse_args(["browse", "s", "a", "--out", "o", "--serve"]), "browse")
    assert (a.sae, a.acts, a.out, a.tokens, a.model, a.serve) == ("s", "a", "o", 50_000, None, 8000)
    assert from_args(BrowseArgs, p.parse_args(["browse", "s", "a", "--out", "o"]), "browse").serve is None
    a = from_args(PowerlawArgs, p.parse_args(["powerlaw", "t", "--metrics", "e_z2,max", "--window", "10:"]), "pl")
    assert (a.metrics, a.ranks) == (["e_z2", "max"], (10, None))
    assert from_args(PowerlawArgs, p.parse_args(["powerlaw", "t"]), "pl").ranks == (1, None)
    a = from_args(EvalArgs, p.parse_args(["eval", "s", "a", "--out", "o", "--G", "16,64"]), "eval")
    assert (a.G, a.tokens, a.rsa_tokens, a.lm_tokens, a.device, a.precision) == ([16, 64], None, 1000, 0, "cpu", "fp32")
    a = from_args(InspectArgs, p.parse_args(["inspect", "s", "--json"]), "inspect")
    assert (a.sae, a.stats, a.json) == ("s", None, True)


# a run's config.json as the release before the study/ package wrote it (progsae.run.RunConfig's defaults)
OLD_RUN_CONFIG = {"model": "smollm2-135m", "layer": 6, "corpus": "kjv", "ctx_len": 128, "source": "cached",
                  "buffer_tokens": 262144, "train_tokens": 800000, "acts_dtype": "float32", "test_tokens": 40000,
                  "d_sae": 4096, "k": 32, "sae_tokens": 2000000, "batch_size": 4096, "precision": "fp32",
                  "matryoshka_sampled": 8, "grid": [], "stats_tokens": 200000, "rsa_tokens": 1000, "lm_tokens": 2048,
                  "seed": 0, "seeds": 1, "outliers": "keep", "outlier_quantile": 0.99, "bootstrap": 1000,
                  "device": "cpu", "minutes_estimate": None, "interp_tokens": 40000, "interp_latents": 3,
                  "judge": "smollm2-135m", "judge_url": "", "saes": [], "train": True}  # fmt: skip


def test_a_config_file_of_the_release_before_loads_to_the_same_settings(tmp_path):
    """Every key the old RunConfig had is still a key with the same default; fields added since keep theirs."""
    import json
    from dataclasses import asdict

    (tmp_path / "old.json").write_text(json.dumps(OLD_RUN_CONFIG))
    cfg = RunConfig.from_dict(load_file(tmp_path / "old.json"))
    assert {k: v for k, v in asdict(cfg).items() if k in OLD_RUN_CONFIG} == OLD_RUN_CONFIG
    assert asdict(cfg) == asdict(RunConfig())  # the new fields (test_frac, keep_bos) at their defaults
