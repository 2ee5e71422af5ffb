"""One place per option: every config field has its flag, flags reach the config, bad values are one line."""

from dataclasses import fields

import pytest

from progsae.cli import build_parser, main
from progsae.config import flag_name
from progsae.data.extract import ExtractConfig
from progsae.study.config import RunConfig
from progsae.train import TrainConfig

COMMANDS = {"train": (TrainConfig, ["ACTS"]), "extract": (ExtractConfig, []), "run": (RunConfig, [])}


def subparser(name):
    p = build_parser()
    return next(a for a in p._subparsers._group_actions if a.dest == "command").choices[name]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_config_field_has_its_flag_named_after_it(command):
    cls, _ = COMMANDS[command]
    flags = {opt for a in subparser(command)._actions for opt in a.option_strings}
    skipped = {"metadata", "minutes_estimate"}
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
