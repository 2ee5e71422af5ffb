import json
import shutil
import subprocess
import sys

import pytest
import torch

from progsae.cli import main

TRAIN = ["--d-sae", "128", "--k", "4", "--tokens", "20000", "--batch-size", "1024", "--matryoshka", "32,128"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, synth_acts):
    """synth -> train -> stats -> permute, shared by the tests below (small sizes, a few seconds)."""
    w = tmp_path_factory.mktemp("cli")
    shutil.copytree(synth_acts, w / "acts")
    assert main(["train", str(w / "acts"), "--out", str(w / "sae"), *TRAIN]) == 0
    assert main(["stats", str(w / "sae"), str(w / "acts"), "--out", str(w / "stats.safetensors")]) == 0
    assert (
        main(
            [
                "permute",
                str(w / "sae"),
                "--stats",
                str(w / "stats.safetensors"),
                "--by",
                "freq",
                "--out",
                str(w / "perm"),
            ]
        )
        == 0
    )
    return w


def test_pipeline_writes_every_artifact(workdir, capsys):
    cfg = json.loads((workdir / "sae" / "cfg.json").read_text())
    assert cfg["metadata"]["progsae"]["granularities"] == [32, 128]
    assert (
        json.loads((workdir / "perm" / "cfg.json").read_text())["metadata"]["progsae"]["permutation"]["metric"]
        == "freq"
    )
    assert (
        main(
            [
                "powerlaw",
                str(workdir / "stats.safetensors"),
                "--window",
                "1:50",
                "--plot",
                str(workdir / "pl.png"),
                "--json",
                str(workdir / "pl.json"),
            ]
        )
        == 0
    )
    assert "exponent" in capsys.readouterr().out
    assert set(json.loads((workdir / "pl.json").read_text())) == {"e_z2", "freq", "dec_cov_eigs"}
    assert (
        main(
            [
                "eval",
                str(workdir / "perm"),
                str(workdir / "acts"),
                "--out",
                str(workdir / "r.json"),
                "--G",
                "16,64,128",
                "--tokens",
                "5000",
            ]
        )
        == 0
    )
    r = json.loads((workdir / "r.json").read_text())
    assert [row["G"] for row in r["table"]] == [16, 64, 128] and r["n_tokens"] == 5000
    assert len(r["curve"]["fvu_prefix"]) == 128
    assert r["table"][-1]["fvu_prefix"] == pytest.approx(r["table"][-1]["fvu_rescaled"], rel=1e-5)
    assert r["precision"] == "fp32"
    args = ["eval", str(workdir / "perm"), str(workdir / "acts"), "--G", "16,64,128", "--tokens", "5000"]
    assert main([*args, "--out", str(workdir / "r16.json"), "--precision", "bf16"]) == 0
    r16 = json.loads((workdir / "r16.json").read_text())
    assert r16["precision"] == "bf16"  # selected in bf16, values in fp32: the same FVU up to near-ties
    assert r16["table"][-1]["fvu_prefix"] == pytest.approx(r["table"][-1]["fvu_prefix"], rel=0.01)


def test_rerunning_a_finished_training_resumes_instead_of_retraining(workdir, capsys):
    before = (workdir / "sae" / "sae_weights.safetensors").read_bytes()
    assert main(["train", str(workdir / "acts"), "--out", str(workdir / "sae"), *TRAIN]) == 0
    assert (workdir / "sae" / "sae_weights.safetensors").read_bytes() == before


def run_fails(args, capsys, match):
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("progsae: error:") and match in err, err
    return err


def test_bad_inputs_give_one_line_exit_2_and_no_partial_output(workdir, tmp_path, capsys):
    w = workdir
    run_fails(["train", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], capsys, "no activation directory")
    assert not (tmp_path / "o").exists()
    run_fails(
        ["train", str(w / "acts"), "--out", str(tmp_path / "o"), "--d-sae", "64", "--matryoshka", "16,32"],
        capsys,
        "end at d_sae=64",
    )
    assert not (tmp_path / "o").exists()
    run_fails(
        ["eval", str(w / "sae"), str(w / "acts"), "--out", str(tmp_path / "r.json"), "--G", "129"],
        capsys,
        "G=129 is outside 1..128",
    )
    assert not (tmp_path / "r.json").exists()
    run_fails(
        ["stats", str(tmp_path / "nosae"), str(w / "acts"), "--out", str(tmp_path / "s")], capsys, "no SAE directory"
    )
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "cfg.json").write_text((w / "sae" / "cfg.json").read_text())
    (corrupt / "sae_weights.safetensors").write_bytes(b"\x12\x00\x00\x00garbage")
    run_fails(
        ["stats", str(corrupt), str(w / "acts"), "--out", str(tmp_path / "s")], capsys, "not a readable safetensors"
    )
    assert main(["synth", "--out", str(tmp_path / "wide"), "--tokens", "100", "--d-in", "8"]) == 0
    capsys.readouterr()
    run_fails(
        ["eval", str(w / "sae"), str(tmp_path / "wide"), "--out", str(tmp_path / "r.json")], capsys, "expects d_in=16"
    )
    run_fails(
        ["permute", str(w / "sae"), "--stats", str(w / "sae" / "cfg.json"), "--out", str(tmp_path / "p")],
        capsys,
        "safetensors",
    )
    assert not (tmp_path / "p").exists()
    run_fails(["powerlaw", str(w / "stats.safetensors"), "--metrics", "e_z2,loudness"], capsys, "unknown metric")
    run_fails(["synth", "--out", str(w / "acts")], capsys, "already exists")
    run_fails(
        ["eval", str(w / "sae"), str(w / "acts"), "--out", str(tmp_path / "r.json"), "--lm-tokens", "10"],
        capsys,
        "no language-model activations",
    )
    run_fails(
        ["train", str(w / "acts"), "--out", str(tmp_path / "o"), "--matryoshka-sampled", "-1"], capsys, "must be >= 0"
    )
    assert main(["synth", "--out", str(tmp_path / "wide"), "--tokens", "100", "--d-in", "8", "--force"]) == 0
    capsys.readouterr()
    run_fails(
        [
            "train",
            str(tmp_path / "wide"),
            "--out",
            str(w / "sae"),
            "--d-sae",
            "128",
            "--k",
            "4",
            "--tokens",
            "20000",
            "--batch-size",
            "1024",
            "--matryoshka",
            "32,128",
        ],
        capsys,
        "d_in=16",
    )


def test_outputs_are_checked_before_the_work_and_written_with_the_users_umask(workdir, tmp_path, capsys, monkeypatch):
    import os
    import stat

    import progsae.analysis.evaluate
    from progsae.train import Trainer

    def no_work(*a, **k):
        raise AssertionError("the work started before the output was checked")

    monkeypatch.setattr(progsae.analysis.evaluate, "evaluate", no_work)
    monkeypatch.setattr(Trainer, "run", no_work)
    monkeypatch.setattr(progsae.analysis, "latent_stats", no_work)
    w = workdir
    (tmp_path / "results").mkdir()
    (tmp_path / "file").write_text("x")
    run_fails(["eval", str(w / "sae"), str(w / "acts"), "--out", str(tmp_path / "results")], capsys, "is a directory")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        run_fails(["eval", str(w / "sae"), str(w / "acts"), "--out", str(locked / "r.json")], capsys, "cannot be written")
    run_fails(["train", str(w / "acts"), "--out", str(tmp_path / "file"), *TRAIN], capsys, "is an existing file")
    run_fails(["stats", str(w / "sae"), str(w / "acts"), "--out", str(tmp_path / "results")], capsys, "is a directory")
    assert (tmp_path / "file").read_text() == "x"
    monkeypatch.undo()
    # statistics of another SAE (here: of the unsorted SAE, for its permuted copy) are refused by permute and inspect
    for cmd in (["permute", str(w / "perm"), "--out", str(tmp_path / "p2")], ["inspect", str(w / "perm")]):
        run_fails([*cmd, "--stats", str(w / "stats.safetensors")], capsys, "statistics of another SAE")
    assert not (tmp_path / "p2").exists()
    # files follow the umask: safetensors used to come out 0600
    old = os.umask(0o022)
    try:
        assert main(["stats", str(w / "sae"), str(w / "acts"), "--out", str(tmp_path / "s.safetensors")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "s.safetensors").stat().st_mode) == 0o644


def test_a_killed_command_says_how_to_resume(workdir, tmp_path):
    import os
    import signal
    import time

    cmd = [sys.executable, "-m", "progsae.cli", "train", str(workdir / "acts"), "--out", str(tmp_path / "s"),
           "--d-sae", "128", "--k", "4", "--tokens", "100000000", "--batch-size", "1024"]  # fmt: skip
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen, t0 = b"", time.monotonic()
    while b"train" not in seen and time.monotonic() - t0 < 120:  # until the progress bar shows: it is training
        seen += os.read(p.stderr.fileno(), 4096)
    p.send_signal(signal.SIGTERM)
    err = (seen + p.stderr.read()).decode()
    assert p.wait(timeout=60) == 130 and "progsae: interrupted" in err and "resumes" in err, err[-1000:]


def test_unknown_metric_choice_and_help_from_the_installed_script():
    r = subprocess.run(
        [sys.executable, "-m", "progsae.cli", "permute", "x", "--stats", "s", "--by", "loud", "--out", "o"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "invalid choice: 'loud'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, "-m", "progsae.cli", "train", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--matryoshka-sampled" in r.stdout


def test_a_device_this_machine_lacks_is_one_error_line(workdir, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run_fails(
        ["train", str(workdir / "acts"), "--out", str(tmp_path / "o"), *TRAIN, "--device", "cuda"],
        capsys,
        "no CUDA device",
    )
    run_fails(
        ["eval", str(workdir / "sae"), str(workdir / "acts"), "--out", str(tmp_path / "r.json"), "--device", "gpu"],
        capsys,
        "is not a device",
    )


def test_synth_writes_what_the_synthetic_config_describes(tmp_path, capsys):
    from progsae.data import ActivationDir, SyntheticConfig, SyntheticSource

    args = ["--tokens", "300", "--d-in", "8", "--features", "16", "--mean-active", "2", "--magnitude-std", "0.5"]
    assert main(["synth", "--out", str(tmp_path / "a"), *args, "--seed", "4"]) == 0
    assert "wrote 300 synthetic activations (d_in=8, 16 features, alpha=1.0)" in capsys.readouterr().out
    cfg = SyntheticConfig(d_in=8, n_features=16, mean_active=2, magnitude_std=0.5, seed=4)
    acts = ActivationDir(tmp_path / "a")
    assert {k: acts.manifest["source"][k] for k in ("magnitude_std", "held_out")} == {"magnitude_std": 0.5, "held_out": False}
    assert torch.equal(torch.cat(list(acts.iter_rows(300))), SyntheticSource(cfg).sample(300, 0))
