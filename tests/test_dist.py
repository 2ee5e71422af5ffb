"""Data-parallel training under torchrun (2 CPU processes, gloo) against one process on the same batches."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from progsae.cli import main
from progsae.files import load_json

# N large for the data so latents die and AuxK runs; Matryoshka so the nested loss is split too
TRAIN = ["--d-sae", "1024", "--k", "4", "--batch-size", "512", "--matryoshka", "256,1024", "--dead-tokens", "2048",
         "--kernel", "csr"]  # forced: auto may pick differently in separate processes (same values to rounding)


def torchrun(*args, stderr=subprocess.PIPE, **kw):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "progsae",
        *args,
    ]
    # a rank that dies of a signal prints its Python stacks and the C++ one of an exception it could not raise
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", "TORCH_SHOW_CPP_STACKTRACES": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, **kw)


def kill_all(marker: str) -> None:
    """SIGKILL every process whose command line mentions `marker` (as pkill -f, without needing procps)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def failure(err: str) -> str:
    """torchrun's stderr without progress bars: the ranks' own last words come before the launcher's summary."""
    lines = (line for line in re.split(r"[\r\n]+", err) if line.strip() and "step/s" not in line)
    return "\n".join(lines)[-8000:]


@pytest.fixture
def acts(make_synth_acts):
    """30 000 synthetic rows of 32 dimensions from 96 features (made once in the session)."""
    return make_synth_acts(30_000, 32, 96)


@pytest.mark.slow  # ~30 s: one process and torchrun
def test_two_gloo_ranks_train_what_one_process_trains_on_the_same_global_batches(acts, tmp_path):
    steps = ["--tokens", str(512 * 30), "--log-every", "1"]
    assert main(["train", str(acts), "--out", str(tmp_path / "one"), *TRAIN, *steps]) == 0
    p = torchrun("train", str(acts), "--out", str(tmp_path / "two"), *TRAIN, *steps)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, failure(err)
    assert out.count("trained 1024-latent SAE") == 1 and "(2 ranks)" in out  # rank 0 alone speaks

    one, two = (
        load_file(tmp_path / "one" / "sae_weights.safetensors"),
        load_file(tmp_path / "two" / "sae_weights.safetensors"),
    )
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    h1, h2 = load_json(tmp_path / "one" / "history.json"), load_json(tmp_path / "two" / "history.json")
    assert [m["step"] for m in h1] == [m["step"] for m in h2]
    for a, b in zip(h1, h2, strict=True):  # losses, FVU, L0 and dead latents are reduced over the ranks
        for key in ("loss", "fvu", "l0", "dead_frac"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert any(m["dead_frac"] > 0 and m["aux_fvu"] is not None for m in h1)  # AuxK ran, on global statistics
    assert load_json(tmp_path / "two" / "cfg.json")["metadata"]["progsae"]["training"]["ranks"] == 2


@pytest.mark.slow  # ~1 min: three torchrun trainings
def test_a_killed_torchrun_training_resumes_from_its_checkpoint_to_the_same_weights(acts, tmp_path):
    steps = ["--tokens", str(512 * 400), "--checkpoint-every", "20", "--keep-checkpoints", "2"]
    whole = torchrun("train", str(acts), "--out", str(tmp_path / "whole"), *TRAIN, *steps)
    err = whole.communicate(timeout=600)[1]
    assert whole.returncode == 0, failure(err)

    p = torchrun(
        "train",
        str(acts),
        "--out",
        str(tmp_path / "cut"),
        *TRAIN,
        *steps,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ck, t0 = tmp_path / "cut" / "checkpoints", time.monotonic()
    while not (ck.is_dir() and any(c.name.startswith("step-") and c.name[-4:] != ".tmp" for c in ck.iterdir())):
        assert p.poll() is None and time.monotonic() - t0 < 300, "no checkpoint appeared"
        time.sleep(0.02)
    kill_all(str(tmp_path / "cut"))  # torchrun and both ranks (each in a session of its own), mid-run
    p.communicate()
    assert not (tmp_path / "cut" / "sae_weights.safetensors").exists()

    again = torchrun("train", str(acts), "--out", str(tmp_path / "cut"), *TRAIN, *steps)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, failure(err)
    at = re.search(r"resuming from step (\d+) of 400", out)
    assert at and 0 < int(at[1]) < 400, out  # resumed, not retrained from scratch
    a, b = (
        load_file(tmp_path / "whole" / "sae_weights.safetensors"),
        load_file(tmp_path / "cut" / "sae_weights.safetensors"),
    )
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [c.name for c in sorted(ck.iterdir())] == ["step-00000380", "step-00000400"]  # the newest K kept


def rank_pid(marker: str, rank: int) -> int | None:
    """The pid of torchrun's worker `rank` whose command line mentions `marker`."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                env = dict(e.split("=", 1) for e in (proc / "environ").read_bytes().decode().split("\0") if "=" in e)
                if env.get("RANK") == str(rank) and "TORCHELASTIC_RUN_ID" in env:
                    return int(proc.name)
        except OSError:
            pass
    return None


@pytest.mark.slow  # ~50 s: four extractions, three under torchrun
def test_two_ranks_extract_the_bytes_of_one_process_and_a_killed_rank_loses_nothing(tiny_lm_dir, text_corpus, tmp_path):
    cmd = ["extract", "--model", str(tiny_lm_dir), "--layer", "1", "--corpus", str(text_corpus(150)),
           "--ctx-len", "16", "--tokens", "15000", "--shard-tokens", "600", "--batch-size", "2", "--out"]  # fmt: skip
    assert main([*cmd, str(tmp_path / "one")]) == 0
    p = torchrun(*cmd, str(tmp_path / "two"))
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, failure(err)
    files = sorted(f.name for f in (tmp_path / "one").iterdir())
    assert len(files) == 15000 // 600 + 2 and files == sorted(f.name for f in (tmp_path / "two").iterdir())
    for f in files:  # the same shards, contexts and manifest, byte for byte
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f

    cut = tmp_path / "cut"
    p = torchrun(*cmd, str(cut), stderr=subprocess.DEVNULL, start_new_session=True)
    part, t0 = tmp_path / "cut.partial", time.monotonic()
    while not (part.is_dir() and len(list(part.glob("shard-*.safetensors"))) >= 3):
        assert p.poll() is None and time.monotonic() - t0 < 120, "no shards appeared"
        time.sleep(0.01)
    os.kill(rank_pid(str(cut), 1), signal.SIGKILL)  # one rank dies; torchrun stops the other
    p.communicate(timeout=120)
    assert p.returncode != 0 and not cut.exists()
    kill_all(str(cut))
    again = torchrun(*cmd, str(cut))
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, failure(err)
    at = re.search(r"resuming extraction at (\d+) of 15000", out)
    assert at and 0 < int(at[1]) < 15000, out  # the shards written before the kill were kept
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (cut / f).read_bytes(), f
