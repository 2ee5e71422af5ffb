import itertools
import json

import pytest
import torch

from progsae import ProgsaeError
from progsae.data import ActivationDir, ActivationWriter, SyntheticConfig, SyntheticSource, write_activations


def write_rows(path, n=1000, d=8, shard_tokens=128, chunk=100):
    rows = torch.arange(n * d, dtype=torch.float32).reshape(n, d)
    write_activations(path, rows.split(chunk), d, {"kind": "test"}, shard_tokens)
    return rows


def test_written_directory_reads_back_in_order_with_manifest(tmp_path):
    rows = write_rows(tmp_path / "a")
    acts = ActivationDir(tmp_path / "a")
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["n_tokens"] == 1000 and m["d_in"] == 8
    assert [s["n_tokens"] for s in m["shards"]] == [200] * 5  # shards end where additions (of 100) end
    torch.testing.assert_close(torch.cat(list(acts.iter_rows(300))), rows)
    assert sum(len(b) for b in acts.iter_rows(64, max_tokens=333)) == 333
    assert not (tmp_path / "a.partial").exists()


def test_killed_writer_resumes_without_losing_or_duplicating_rows(tmp_path):
    rows = torch.arange(600 * 4, dtype=torch.float32).reshape(600, 4)
    w = ActivationWriter(tmp_path / "a", 4, {"kind": "test"}, shard_tokens=100)
    for i in range(3):
        w.state = {"done": i + 1}
        w.add(rows[i * 100 : (i + 1) * 100], ids=torch.arange(i * 100, (i + 1) * 100))
    w.pending.append({"activations": rows[:50], "ids": torch.arange(50)})  # rows never flushed: lost with the process
    del w
    assert not (tmp_path / "a").exists()
    w = ActivationWriter(tmp_path / "a", 4, {"kind": "test"}, shard_tokens=100, resume=True)
    assert w.state == {"done": 3} and w.n_tokens == 300
    for i in range(w.state["done"], 6):
        w.add(rows[i * 100 : (i + 1) * 100], ids=torch.arange(i * 100, (i + 1) * 100))
    w.close()
    torch.testing.assert_close(torch.cat(list(ActivationDir(tmp_path / "a").iter_rows(64))), rows)
    other = ActivationWriter(tmp_path / "b", 4, {"kind": "other"}, resume=True)  # nothing to resume: fresh
    assert other.n_tokens == 0


def test_shuffled_batches_cover_each_row_once_per_epoch_and_resume_by_index(tmp_path):
    rows = write_rows(tmp_path / "a", n=1024, shard_tokens=128, chunk=128)
    acts = ActivationDir(tmp_path / "a")
    epoch = torch.cat(list(itertools.islice(acts.batches(64, seed=3), 16)))
    assert sorted(epoch[:, 0].tolist()) == sorted(rows[:, 0].tolist())
    assert not torch.equal(epoch, rows)
    stream = list(itertools.islice(acts.batches(64, seed=3), 40))
    resumed = list(itertools.islice(acts.batches(64, seed=3, start=25), 15))
    for a, b in zip(stream[25:], resumed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = next(acts.batches(64, seed=4))
    assert not torch.equal(other, stream[0])


def test_missing_or_corrupt_files_are_named(tmp_path):
    with pytest.raises(ProgsaeError, match="no activation directory"):
        ActivationDir(tmp_path / "none")
    write_rows(tmp_path / "a")
    (tmp_path / "a" / "shard-00003.safetensors").unlink()
    with pytest.raises(ProgsaeError, match="shard-00003.safetensors: shard listed in the manifest is missing"):
        ActivationDir(tmp_path / "a")
    write_rows(tmp_path / "b")
    (tmp_path / "b" / "shard-00001.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ProgsaeError, match="shard-00001.safetensors: not a readable safetensors"):
        list(ActivationDir(tmp_path / "b").iter_rows(100))
    write_rows(tmp_path / "c")
    (tmp_path / "c" / "manifest.json").write_text("{broken")
    with pytest.raises(ProgsaeError, match="manifest.json: not valid JSON"):
        ActivationDir(tmp_path / "c")


def test_shard_with_wrong_width_is_reported(tmp_path):
    write_rows(tmp_path / "a")
    write_rows(tmp_path / "w", d=4)
    (tmp_path / "w" / "shard-00000.safetensors").replace(tmp_path / "a" / "shard-00000.safetensors")
    with pytest.raises(ProgsaeError, match=r"the manifest says \[200, 8\]"):
        next(ActivationDir(tmp_path / "a").iter_rows(10))


def test_nan_or_inf_activations_stop_training_naming_the_shard_and_row(tmp_path, capsys):
    from progsae.cli import main
    from progsae.files import load_tensors, save_tensors

    write_rows(tmp_path / "a")
    shard = tmp_path / "a" / "shard-00002.safetensors"
    t = load_tensors(shard)
    t["activations"][37, 3] = float("nan")
    t["activations"][90, 0] = float("inf")
    save_tensors(shard, t)
    with pytest.raises(ProgsaeError, match=r"shard-00002.safetensors: row 37 holds NaN or Inf activations \(2 such"):
        list(ActivationDir(tmp_path / "a").iter_rows(100))
    args = ["train", str(tmp_path / "a"), "--out", str(tmp_path / "sae"), "--d-sae", "16", "--k", "2",
            "--tokens", "2000", "--batch-size", "100"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "row 37 holds NaN or Inf" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "sae" / "cfg.json").exists()  # no SAE trained on NaN


def test_synthetic_stream_is_seeded_and_has_the_promised_statistics():
    src = SyntheticSource(SyntheticConfig(d_in=16, n_features=100, alpha=1.0, mean_active=5, noise=0.0, seed=1))
    assert src.probs.sum().item() == pytest.approx(5, rel=1e-3)
    assert (src.probs[1:] <= src.probs[:-1]).all()
    torch.testing.assert_close(src.sample(10, 3), SyntheticSource(src.cfg).sample(10, 3))
    x = src.sample(20000, 0)
    # with noise 0 every row is a non-negative combination of the directions; check energy per row
    expected = (src.probs * (1 + 0.2**2)).sum()  # E[sum a_i^2] for near-orthogonal directions
    assert x.pow(2).sum(1).mean().item() == pytest.approx(expected.item(), rel=0.15)
    with pytest.raises(ProgsaeError, match="mean_active"):
        SyntheticConfig(n_features=4, mean_active=5)


def test_write_synthetic_writes_the_streams_first_rows_and_a_held_out_stretch(tmp_path):
    from progsae.data.synthetic import BATCH, write_synthetic

    cfg = SyntheticConfig(d_in=8, n_features=32, mean_active=3, seed=2)
    n = BATCH + 100  # a whole batch and part of the next
    acts = ActivationDir(write_synthetic(cfg, tmp_path / "a", n, progress=False))
    src = SyntheticSource(cfg)
    rows = torch.cat(list(acts.iter_rows(4096)))
    assert torch.equal(rows, torch.cat([src.sample(BATCH, 0), src.sample(100, 1)]))
    assert acts.manifest["source"] == {**src.describe(), "held_out": False,
                                       "note": "synthetic activations with known features (tests and demos only)"}  # fmt: skip
    held = ActivationDir(write_synthetic(cfg, tmp_path / "h", 100, held_out=True, progress=False))
    assert torch.equal(torch.cat(list(held.iter_rows(100))), src.sample(100, 1_000_000_000))
    assert held.manifest["source"]["held_out"] is True


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"d_in": 0}, "synthetic: d_in must be a positive integer, got 0"),
        ({"n_features": 0, "mean_active": 1}, "synthetic: n_features must be a positive integer, got 0"),
        ({"mean_active": 0}, r"synthetic: mean_active must be > 0, got 0"),
        ({"alpha": -1.0}, r"synthetic: alpha must be >= 0, got -1.0"),
        ({"magnitude_std": -0.1}, r"synthetic: magnitude_std must be >= 0, got -0.1"),
    ],
)
def test_a_synthetic_setting_out_of_range_is_refused_in_one_line(kw, match):
    with pytest.raises(ProgsaeError, match=f"^{match}$"):
        SyntheticConfig(**kw)


def test_an_sae_of_another_width_is_refused_by_the_activations(tmp_path):
    from progsae import SAE, SAEConfig

    write_rows(tmp_path / "a", d=8)
    acts = ActivationDir(tmp_path / "a")
    acts.check_sae(SAE(SAEConfig(8, 16, 2)))
    with pytest.raises(ProgsaeError, match=r"the SAE expects d_in=4 but .* holds d_in=8"):
        acts.check_sae(SAE(SAEConfig(4, 16, 2)))
