"""Faults: a full disk mid-write, NaN rows skipped on request, and kills at random moments.

Each ends in one line and exit code 2 with earlier outputs intact, or, rerun, in exactly what an
uninterrupted run writes; every resume test checks that the rerun resumed rather than started over.
"""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import progsae.files
from progsae.cli import main
from progsae.data import ActivationDir, ActivationWriter, SyntheticConfig, SyntheticSource, write_activations
from progsae.files import ProgsaeError, load_tensors, save_tensors

TRAIN = ["--d-sae", "256", "--k", "4", "--batch-size", "256", "--matryoshka", "64,256", "--dead-tokens", "1024",
         "--kernel", "csr"]  # forced: auto may pick differently in separate processes (same values to rounding)


def full_disk_after(monkeypatch, n_ok: int, name: str):
    """Let `n_ok` safetensors writes of files called `name` through; the next one writes half and fails."""
    real, seen = progsae.files.save_file, []

    def save_file(tensors, path, metadata=None):
        if os.path.basename(path).startswith(name):
            seen.append(path)
            if len(seen) > n_ok:
                with open(path, "wb") as f:
                    f.write(b"\x00" * 100)  # what got written before the disk filled
                raise OSError(28, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(progsae.files, "save_file", save_file)


@pytest.mark.slow  # ~15 s: three training runs
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_the_rerun_resumes(
    synth_acts, tmp_path, monkeypatch, capsys
):
    acts = synth_acts
    args = [*TRAIN, "--tokens", str(256 * 30), "--checkpoint-every", "10"]
    assert main(["train", str(acts), "--out", str(tmp_path / "whole"), *args]) == 0
    capsys.readouterr()

    full_disk_after(monkeypatch, 1, "state.safetensors")  # checkpoint 10 is written, checkpoint 20 fails
    assert main(["train", str(acts), "--out", str(tmp_path / "cut"), *args]) == 2
    err = capsys.readouterr().err.strip()  # the progress bar, closed, then one line
    assert err.count("progsae: error") == 1 and err.splitlines()[-1].startswith("progsae: error"), err
    assert "No space left on device" in err and "step-00000020.tmp/state.safetensors" in err, err
    ck = tmp_path / "cut" / "checkpoints"
    assert [p.name for p in ck.iterdir()] == ["step-00000010"]  # no half-written checkpoint, no .tmp
    assert not (tmp_path / "cut" / "sae_weights.safetensors").exists()

    monkeypatch.undo()
    assert main(["train", str(acts), "--out", str(tmp_path / "cut"), *args]) == 0
    assert "resuming from step 10 of 30" in capsys.readouterr().out
    a, b = (
        load_file(tmp_path / "whole" / "sae_weights.safetensors"),
        load_file(tmp_path / "cut" / "sae_weights.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_full_disk_during_a_shard_write_keeps_the_shards_before_it_and_the_writer_resumes(tmp_path, monkeypatch):
    rows = torch.randn(1000, 8, generator=torch.Generator().manual_seed(0))
    source = {"kind": "test"}

    def write(resume_from_state: bool):
        w = ActivationWriter(tmp_path / "a", 8, source, shard_tokens=200, resume=True)
        done = w.state.get("chunks_done", 0) if resume_from_state else 0
        for i in range(done, 10):
            w.state = {"chunks_done": i + 1}
            w.add(rows[i * 100 : (i + 1) * 100])
        return w.close()

    full_disk_after(monkeypatch, 2, "shard-")
    with pytest.raises(ProgsaeError, match=r"shard-00002.safetensors: cannot be written \(No space left on device\)"):
        write(True)
    part = tmp_path / "a.partial"
    assert sorted(p.name for p in part.iterdir()) == [
        "progress.json",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    monkeypatch.undo()
    write(True)
    assert [s["n_tokens"] for s in ActivationDir(tmp_path / "a").shards] == [200] * 5
    torch.testing.assert_close(torch.cat(list(ActivationDir(tmp_path / "a").iter_rows(1000))), rows, rtol=0, atol=0)


def test_nan_rows_are_skipped_with_a_warning_when_asked_and_the_rest_trains_as_if_they_were_never_there(
    tmp_path, capsys
):
    src = SyntheticSource(SyntheticConfig(d_in=8, n_features=32, seed=3))
    rows = src.sample(3000, 0)
    bad = [5, 700, 701, 2999]
    keep = torch.ones(3000, dtype=torch.bool)
    keep[bad] = False
    write_activations(tmp_path / "dirty", rows.split(500), 8, {"kind": "test"}, 1000)
    clean_chunks = [c[k] for c, k in zip(rows.split(500), keep.split(500), strict=True)]
    write_activations(tmp_path / "clean", clean_chunks, 8, {"kind": "test"}, 996)  # the same shards, less the bad rows
    for i, r in enumerate(bad):
        shard = tmp_path / "dirty" / f"shard-{r // 1000:05d}.safetensors"
        t = load_tensors(shard)
        t["activations"][r % 1000, i % 8] = float("nan") if i % 2 else float("-inf")
        save_tensors(shard, t)
    assert [s["n_tokens"] for s in ActivationDir(tmp_path / "clean").shards] == [997, 1000, 999]

    args = ["--d-sae", "32", "--k", "2", "--tokens", "3000", "--batch-size", "100"]
    assert main(["train", str(tmp_path / "dirty"), "--out", str(tmp_path / "s1"), *args]) == 2
    assert "row 5 holds NaN or Inf" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "dirty"), "--out", str(tmp_path / "s1"), *args, "--skip-nonfinite"]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert (
        len(warning) == 1
        and "skipping 4 of 3000 rows holding NaN or Inf (first: shard-00000.safetensors row 5)" in warning[0]
    )
    assert main(["train", str(tmp_path / "clean"), "--out", str(tmp_path / "s2"), *args]) == 0
    a, b = (
        load_file(tmp_path / "s1" / "sae_weights.safetensors"),
        load_file(tmp_path / "s2" / "sae_weights.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # minutes: 2000 steps, run twice and killed twice
def test_training_killed_with_sigkill_at_random_moments_reruns_to_the_uninterrupted_bytes(synth_acts, tmp_path, kill_rng):
    acts = synth_acts
    args = [*TRAIN, "--tokens", str(256 * 2000), "--checkpoint-every", "50"]
    cmd = [sys.executable, "-m", "progsae", "train", str(acts), *args, "--out"]
    assert subprocess.run([*cmd, str(tmp_path / "whole")], capture_output=True).returncode == 0
    rng, resumed_at = kill_rng, []
    for _ in range(2):  # two kills at random moments once a checkpoint exists
        p = subprocess.Popen(
            [*cmd, str(tmp_path / "cut")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        ck, t0 = tmp_path / "cut" / "checkpoints", time.monotonic()
        while not (ck.is_dir() and any(not c.name.endswith(".tmp") for c in ck.iterdir())):
            assert p.poll() is None and time.monotonic() - t0 < 120, "no checkpoint appeared"
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))
        p.send_signal(signal.SIGKILL)
        out = p.communicate()[0]
        resumed_at += [int(s) for s in re.findall(r"resuming from step (\d+)", out)]
    r = subprocess.run([*cmd, str(tmp_path / "cut")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    resumed_at += [int(s) for s in re.findall(r"resuming from step (\d+)", r.stdout)]
    assert resumed_at and all(0 < s < 2000 for s in resumed_at), r.stdout  # it resumed every time it could
    for f in ("sae_weights.safetensors", "history.json"):
        assert (tmp_path / "whole" / f).read_bytes() == (tmp_path / "cut" / f).read_bytes(), f


@pytest.mark.slow  # ~1 min: 15 000 tokens extracted twice, killed twice
def test_extraction_killed_with_sigkill_at_random_moments_reruns_to_the_uninterrupted_files(
    tiny_lm_dir, text_corpus, tmp_path, kill_rng
):
    cmd = [sys.executable, "-m", "progsae", "extract", "--model", str(tiny_lm_dir), "--layer", "1", "--corpus",
           str(text_corpus(150)), "--ctx-len", "16", "--tokens", "15000", "--shard-tokens", "600",
           "--batch-size", "2", "--out"]  # fmt: skip
    assert subprocess.run([*cmd, str(tmp_path / "whole")], capture_output=True).returncode == 0
    rng, resumed = kill_rng, []
    for _ in range(2):
        p = subprocess.Popen([*cmd, str(tmp_path / "cut")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        part, t0 = tmp_path / "cut.partial", time.monotonic()
        while not (part.is_dir() and any(part.glob("shard-*.safetensors"))):
            assert p.poll() is None and time.monotonic() - t0 < 120, "no shard appeared"
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.2))
        p.send_signal(signal.SIGKILL)
        resumed += re.findall(r"resuming extraction at (\d+)", p.communicate()[0])
    r = subprocess.run([*cmd, str(tmp_path / "cut")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    resumed += re.findall(r"resuming extraction at (\d+)", r.stdout)
    assert resumed and all(0 < int(n) < 15000 for n in resumed), r.stdout  # it resumed, not started over
    files = sorted(f.name for f in (tmp_path / "whole").iterdir())
    assert files == sorted(f.name for f in (tmp_path / "cut").iterdir()) and len(files) == 15000 // 600 + 2
    for f in files:
        assert (tmp_path / "whole" / f).read_bytes() == (tmp_path / "cut" / f).read_bytes(), f


def one_line(capsys, match: str) -> None:
    err = capsys.readouterr().err.strip()
    assert err.count("progsae: error") == 1 and match in err.splitlines()[-1], err


def test_bad_files_and_settings_are_one_line_and_exit_2_with_nothing_half_written(
    synth_acts, tiny_lm_dir, tmp_path, capsys
):
    import json
    import shutil

    acts = synth_acts
    train = ["--d-sae", "32", "--k", "4", "--tokens", "2560", "--batch-size", "256"]
    # a shard truncated after the manifest was written: named when it is read, no SAE
    cut = tmp_path / "cut"
    shutil.copytree(acts, cut)
    shard = cut / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert main(["train", str(cut), "--out", str(tmp_path / "s1"), *train]) == 2
    one_line(capsys, "shard-00000.safetensors: not a readable safetensors")
    assert not (tmp_path / "s1" / "cfg.json").exists()
    # a manifest that lies about its counts: refused when the directory is opened
    lies = tmp_path / "lies"
    shutil.copytree(acts, lies)
    m = json.loads((lies / "manifest.json").read_text())
    (lies / "manifest.json").write_text(json.dumps({**m, "n_tokens": m["n_tokens"] + 5}))
    assert main(["train", str(lies), "--out", str(tmp_path / "s2"), *train]) == 2
    one_line(capsys, f"n_tokens is {m['n_tokens'] + 5} but its shards list {m['n_tokens']} rows")
    m["shards"][0]["n_tokens"] += 5  # one shard's count lies: named when that shard is read
    m["n_tokens"] += 5
    (lies / "manifest.json").write_text(json.dumps(m))
    assert main(["train", str(lies), "--out", str(tmp_path / "s2"), *train]) == 2
    one_line(capsys, "shard-00000.safetensors: activations have shape")
    assert not (tmp_path / "s2").exists()
    # an empty corpus
    (tmp_path / "empty.txt").write_text("")
    assert main(["extract", "--corpus", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "x")]) == 2
    one_line(capsys, "the corpus holds fewer than 127 tokens")
    assert not list(tmp_path.glob("x*"))
    # statistics (the permutation's source) of another length than the SAE
    assert main(["train", str(acts), "--out", str(tmp_path / "a"), *train]) == 0
    assert main(["train", str(acts), "--out", str(tmp_path / "b"), *train, "--d-sae", "64"]) == 0
    assert main(["stats", str(tmp_path / "b"), str(acts), "--out", str(tmp_path / "b.safetensors")]) == 0
    capsys.readouterr()
    assert main(["permute", str(tmp_path / "a"), "--stats", str(tmp_path / "b.safetensors"), "--out", str(tmp_path / "p")]) == 2
    one_line(capsys, "holds statistics of another SAE")
    assert not list(tmp_path.glob("p*"))
    # a run config with an unknown key, one out of range, and a layer beyond the model
    (tmp_path / "run.yaml").write_text("d_sae: 4096\nlayers: 3\n")
    assert main(["run", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "r")]) == 2
    one_line(capsys, "run config: unknown field(s) layers")
    assert main(["run", "--out", str(tmp_path / "r"), "--outlier-quantile", "1.5"]) == 2
    one_line(capsys, "outlier_quantile must be in [0.5, 1)")
    assert main(["run", "--out", str(tmp_path / "r"), "--model", str(tiny_lm_dir), "--layer", "99"]) == 2
    one_line(capsys, "layer 99 does not exist")
    assert not (tmp_path / "r").exists()
