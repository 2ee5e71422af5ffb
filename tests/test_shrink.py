"""Shrink (issue 21): the least-squares refit against a dense torch.linalg.lstsq, its guarantees on the rows it
was fitted on, and `progsae shrink`'s files and refusals."""

import pytest
import torch

from progsae import ProgsaeError, load_sae, save_sae
from progsae.analysis.shrink import shrink
from progsae.cli import main
from progsae.data import ActivationDir
from progsae.sae import SAE, SAEConfig


def rows(acts: ActivationDir, n: int = 6000) -> torch.Tensor:
    return torch.cat(list(acts.iter_rows(4096, n)))


def random_sae(d: int, N: int, k: int, seed: int = 0, architecture: str = "topk") -> SAE:
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(d, N, k, architecture=architecture)).init_tied(g)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(N, generator=g))
        sae.b_dec.copy_(0.2 * torch.randn(d, generator=g))
        sae.W_dec.mul_(1 + torch.rand(N, 1, generator=g))  # decoder norms not 1
        if architecture == "jumprelu":
            sae.threshold.copy_(0.3 * torch.rand(N, generator=g))
    return sae


def dense_code(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    code = sae.encode(x)
    return torch.zeros(len(x), sae.d_sae).scatter_add_(1, code.indices, code.values)


def fvu(sae: SAE, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((sae(x) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


@pytest.mark.parametrize("architecture, k", [("topk", 3), ("jumprelu", None)])
def test_refit_equals_a_dense_least_squares_and_keeps_every_code(synth_acts, architecture, k):
    acts = ActivationDir(synth_acts)
    x = rows(acts)
    sae = random_sae(16, 48, 6 if architecture == "topk" else None, architecture=architecture)
    small = shrink(sae, 16, "refit", acts.iter_rows(1000, len(x)), k)
    base = sae.truncate(16, k)
    Z = dense_code(base, x).double()
    live = (Z != 0).any(0)
    assert live.sum() >= 10  # most latents fire: the comparison has something to compare
    design = torch.cat([Z[:, live], torch.ones(len(x), 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(design, x.double()).solution
    torch.testing.assert_close(small.W_dec[live].double(), sol[:-1], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(small.b_dec.double(), sol[-1], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(small.W_dec[~live], base.W_dec[~live])  # the rows say nothing of a silent latent
    before, after = base.encode(x), small.encode(x)
    assert torch.equal(before.indices, after.indices)
    torch.testing.assert_close(after.values, before.values, atol=1e-5, rtol=1e-5)
    assert fvu(small, x) <= fvu(base, x) + 1e-6  # the optimum over decoders for these codes
    assert fvu(small, x) < 0.9 * fvu(base, x)
    assert small.cfg.progsae["shrink"] == {"from": sae.fingerprint(), "N": 48, "method": "refit", "rows": len(x)}


def test_shrink_writes_a_standalone_sae_and_refuses_bad_input_in_one_line(synth_acts, tmp_path, capsys):
    sae = random_sae(16, 48, 6)
    save_sae(sae, tmp_path / "big", "saelens")
    out = tmp_path / "small"
    assert main(["shrink", str(tmp_path / "big"), str(synth_acts), "--G", "12", "--out", str(out), "--tokens", "3000"]) == 0
    small = load_sae(out)
    assert (small.d_sae, small.k) == (12, 2) and small.cfg.progsae["shrink"]["rows"] == 3000
    x = rows(ActivationDir(synth_acts), 3000)
    expected = shrink(sae, 12, "refit", [x])
    torch.testing.assert_close(small(x), expected(x))
    assert main(["shrink", str(tmp_path / "big"), str(synth_acts), "--G", "12", "--out", str(tmp_path / "t"),
                 "--method", "truncate", "--k", "4"]) == 0  # fmt: skip
    torch.testing.assert_close(load_sae(tmp_path / "t")(x), sae.truncate(12, 4)(x))
    other = tmp_path / "wide"
    save_sae(random_sae(32, 48, 6), other, "saelens")
    capsys.readouterr()
    base = ["shrink", str(tmp_path / "big"), str(synth_acts), "--out", str(tmp_path / "bad")]
    assert main([*base, "--G", "48"]) == 2
    assert main([*base, "--G", "12", "--k", "13"]) == 2
    with pytest.raises(SystemExit) as e:  # argparse: not a method progsae has
        main([*base, "--G", "12", "--method", "merge"])
    assert e.value.code == 2
    assert main(["shrink", str(other), str(synth_acts), "--G", "8", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "d_in=32" in err and "G=48" in err and "k=13" in err
    assert all(len(line) < 400 for line in err.strip().splitlines())
    assert not (tmp_path / "bad").exists()


def test_shrink_refuses_what_it_cannot_do():
    sae = random_sae(16, 48, None, architecture="jumprelu")
    with pytest.raises(ProgsaeError, match="fires by threshold"):
        shrink(sae, 8, "truncate", k=2)
    with pytest.raises(ProgsaeError, match="no activation rows"):
        shrink(sae, 8, "refit", [])
