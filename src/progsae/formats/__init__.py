"""SAE files in every layout progsae reads and writes; the SAE math (sae.py) knows none of them.

    format               files                                          read  write
    saelens (progsae's)  cfg.json + sae_weights.safetensors [+ sparsity]  yes   yes
    sparsify             cfg.json + sae.safetensors (or a run directory)  yes   yes
    dictionary_learning  trainer_i/ae.pt + config.json                    yes   (as saelens)
    gemmascope           params.npz (the file or its folder)              yes   (as saelens)

Each reader returns a float32 `SAE` that computes exactly what the library computes by default: every
field that changes the computation is folded into the weights or the file is refused with one line
naming the field and the fix. `sae.cfg.source` records where it came from and the original config,
whose fields progsae does not interpret are written back unchanged by the same format's writer.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ProgsaeError
from ..files import fresh_dir, replace_dir
from ..sae import SAE
from . import dictionary_learning, gemmascope, saelens, sparsify

READERS = {
    "saelens": saelens.read,
    "sparsify": sparsify.read,
    "dictionary_learning": dictionary_learning.read,
    "gemmascope": gemmascope.read,
}
WRITERS = {"saelens": saelens.write, "sparsify": sparsify.write}


def detect(path: str | Path) -> tuple[str, Path]:
    """(format, the directory or file to read) for a local path; a run directory with one SAE resolves to it."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".npz":
            return "gemmascope", path
        if path.name in ("cfg.json", "sae_weights.safetensors", "sae.safetensors", "ae.pt", "config.json"):
            return detect(path.parent)
        raise ProgsaeError(f"{path}: not an SAE file progsae knows; pass an SAE directory or a Gemma Scope params.npz")
    if not path.is_dir():
        raise ProgsaeError(f"{path}: no SAE directory or file here; pass an SAE directory (or a hub id, with network)")
    if (path / "params.npz").is_file():
        return "gemmascope", path / "params.npz"
    if (path / "sae.safetensors").is_file():
        return "sparsify", path
    if (path / "sae_weights.safetensors").is_file() or (path / "cfg.json").is_file():
        return "saelens", path
    if (path / "ae.pt").is_file():
        return "dictionary_learning", path
    inner = sorted(
        p.parent
        for pattern in ("*/sae.safetensors", "*/*/sae.safetensors", "*/ae.pt", "*/sae_weights.safetensors")
        for p in path.glob(pattern)
    )
    if len(inner) == 1:
        return detect(inner[0])
    if inner:
        names = ", ".join(str(p) for p in inner[:6]) + (", ..." if len(inner) > 6 else "")
        raise ProgsaeError(f"{path} holds {len(inner)} SAEs ({names}); pass one of them")
    raise ProgsaeError(
        f"{path}: no SAE files here (cfg.json + sae_weights.safetensors, sae.safetensors, ae.pt or params.npz); "
        "pass the directory an SAE was saved to"
    )


def load_sae(path: str | Path) -> SAE:
    """The SAE at `path`: a local directory or file in any supported format, or a Hugging Face hub id
    `owner/repo[/folder]` (downloaded into the normal hub cache; needs network)."""
    local = Path(path)
    if not local.exists() and _looks_like_hub_id(str(path)):
        local = _download(str(path))
    fmt, where = detect(local)
    sae = READERS[fmt](where)
    sae.cfg.source.setdefault("format", fmt)
    sae.cfg.source.setdefault("path", str(path))
    return sae


def save_sae(sae: SAE, path: str | Path, format: str | None = None) -> Path:
    """Write `sae` as the directory `path` in `format`, whole: written as `path.tmp/`, then renamed over any
    SAE there. Default format: the one it was read in where progsae writes that format, else SAELens'
    (dictionary_learning and Gemma Scope sources)."""
    path = Path(path)
    tmp = fresh_dir(path.with_name(path.name + ".tmp"))
    write_sae(sae, tmp, format)
    replace_dir(tmp, path)
    return path


def write_sae(sae: SAE, path: str | Path, format: str | None = None) -> Path:
    """Write `sae`'s files into the directory `path` (cfg.json last: it marks the SAE whole), beside what is
    there (a training run's history and checkpoints). Formats as in `save_sae`."""
    if format is None:
        format = sae.cfg.source.get("format", "saelens")
        format = format if format in WRITERS else "saelens"
    if format not in WRITERS:
        raise ProgsaeError(f"unknown SAE format {format!r} to write; use one of {', '.join(WRITERS)}")
    path = Path(path)
    WRITERS[format](sae, path)
    return path


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) >= 2 and not text.startswith((".", "/", "~")) and all(parts)


def _download(hub_id: str) -> Path:
    parts = hub_id.split("/")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ProgsaeError(
            f"{hub_id}: not a local path, and HF_HUB_OFFLINE is set so the hub is not asked; "
            "download the SAE and pass its directory"
        )
    try:
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(repo, allow_patterns=[f"{sub}/*"] if sub else None, etag_timeout=10))
    except Exception as e:  # network, auth, missing repo: all end the same way for the user
        raise ProgsaeError(
            f"{hub_id}: not a local path and not downloadable from the Hugging Face hub ({type(e).__name__}); "
            "check the id and your network, or download the SAE and pass its directory"
        ) from None
    return root / sub if sub else root


__all__ = ["detect", "load_sae", "save_sae", "write_sae", "READERS", "WRITERS"]
