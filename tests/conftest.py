"""Fixtures shared by the test modules: a synthetic activation directory, a tiny LM with its corpus, and the
seeded generator of random kill moments.

Each is made once per session and is read-only: a test that changes one copies it first (shutil.copytree).
A module's own fixture of the same name overrides these (pytest looks in the module before conftest.py).
"""

import os
import random

import pytest
import torch

from lm_fixtures import TEXT, tiny_lm
from progsae.autotune import time_kernels as TIME_KERNELS


@pytest.fixture(autouse=True)
def csr_by_auto(monkeypatch):
    """`kernel: auto` picks csr from a fixed table, so that a run replays bit for bit whatever this machine's
    timings (the paths agree only to float rounding); the tests of auto itself undo this (`real_kernel_timing`)."""
    from progsae import autotune

    monkeypatch.setattr(autotune, "time_kernels", lambda step, device: {"csr": 1.0, "gather": 2.0, "dense": 3.0})


@pytest.fixture
def real_kernel_timing(monkeypatch):
    from progsae import autotune

    monkeypatch.setattr(autotune, "time_kernels", TIME_KERNELS)


@pytest.fixture(scope="session")
def make_synth_acts(tmp_path_factory):
    """make_synth_acts(tokens, d_in, features) -> the directory `progsae synth` writes with those sizes (its
    default seed), made once per size in the session."""
    from progsae.cli import main

    made = {}

    def make(tokens: int = 20_000, d_in: int = 16, features: int = 64):
        key = (tokens, d_in, features)
        if key not in made:
            out = tmp_path_factory.mktemp(f"synth-{tokens}-{d_in}-{features}") / "acts"
            args = ["--tokens", str(tokens), "--d-in", str(d_in), "--features", str(features)]
            assert main(["synth", "--out", str(out), *args]) == 0
            made[key] = out
        return made[key]

    return make


@pytest.fixture(scope="session")
def synth_acts(make_synth_acts):
    """20 000 synthetic activation rows of 16 dimensions drawn from 64 features (`progsae synth`)."""
    return make_synth_acts(20_000, 16, 64)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A tiny random 3-layer Llama and its word-level tokenizer, saved by lm_fixtures.tiny_lm (seed 0)."""
    path = tmp_path_factory.mktemp("tiny-lm")
    with torch.random.fork_rng(devices=[]):  # tiny_lm seeds the global generator: leave it as it was
        tiny_lm(path)
    return path


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    """text_corpus(n) -> a text file holding lm_fixtures.TEXT n times (written once per n)."""
    made = {}

    def make(repeats: int):
        if repeats not in made:
            made[repeats] = tmp_path_factory.mktemp(f"corpus-{repeats}") / "text.txt"
            made[repeats].write_text(TEXT * repeats)
        return made[repeats]

    return make


@pytest.fixture
def kill_rng() -> random.Random:
    """The generator of a test's random kill moments: seeded from PROGSAE_KILL_SEED when set (to replay a
    failure), else from a fresh seed. The seed is printed: pytest shows it with a failure."""
    seed = int(os.environ.get("PROGSAE_KILL_SEED") or random.SystemRandom().randrange(2**32))
    print(f"kill timings seed {seed} (replay with PROGSAE_KILL_SEED={seed})")
    return random.Random(seed)
