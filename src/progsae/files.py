"""Reading and writing progsae's files: safetensors and JSON, written to a temporary name and renamed.

Every failure a user can cause (missing file, corrupt safetensors, bad JSON) becomes a `ProgsaeError`
whose message names the file and the fix; the CLI prints it as one line and exits with code 2.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file


class ProgsaeError(Exception):
    """A problem with the user's input: the message says what is wrong and how to fix it."""


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write tensors (made contiguous: safetensors stores memory as it lies) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates its files 0600; ours follow the user's umask
    os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_file(path: str | Path, flag: str = "--out") -> Path:
    """A file path the command can write once its work is done, checked before the work starts."""
    path = Path(path)
    if path.is_dir():
        raise ProgsaeError(f"{flag} {path} is a directory; give a file path, e.g. {path / 'results.json'}")
    _check_writable(path.parent, path, flag)
    return path


def check_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """A directory path the command can create (or resume into), checked before the work starts."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ProgsaeError(f"{flag} {path} is an existing file; give a directory path, or remove the file")
    _check_writable(path if path.is_dir() else path.parent, path, flag)
    return path


def _check_writable(where: Path, path: Path, flag: str) -> None:
    """`where` (or its nearest existing parent) exists as a directory this user may write into."""
    p = where.absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise ProgsaeError(f"{flag} {path} cannot be written ({p} is not a writable directory); choose another path")


def _read_safetensors(path: str | Path, read):
    """read(path) for a safetensors file, with a missing or corrupt file turned into one clear error."""
    path = Path(path)
    if not path.is_file():
        raise ProgsaeError(f"{path}: file not found; check the path (it should be written by progsae)")
    try:
        return read(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ProgsaeError(f"{path}: not a readable safetensors file ({e}); re-create it") from None


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return _read_safetensors(path, load_file)


def load_tensor(path: str | Path, name: str) -> torch.Tensor | None:
    """One tensor of a safetensors file (read through its memory map), or None if it has no such tensor."""

    def read(p):
        with safe_open(p, framework="pt") as f:
            return f.get_tensor(name) if name in f.keys() else None

    return _read_safetensors(path, read)


def tensors_metadata(path: str | Path) -> dict[str, str]:
    def read(p):
        with safe_open(p, framework="pt") as f:
            return f.metadata() or {}

    return _read_safetensors(path, read)


def _tmp(path: Path) -> Path:
    """A temporary name beside `path`, unique to this process and thread (two writers of one file never share it)."""
    return path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")


def save_json(path: str | Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def load_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ProgsaeError(f"{path}: file not found; check the path")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProgsaeError(f"{path}: not valid JSON ({e}); re-create it") from None


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory `tmp` to `final`, replacing an old one only once the new one is whole."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def fresh_dir(path: Path) -> Path:
    """An empty directory at `path` (removed first if left over from an interrupted write)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path
