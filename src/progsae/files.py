"""Reading and writing progsae's files: safetensors and JSON, written to a temporary name and renamed.

Every failure a user can cause (missing file, corrupt safetensors, bad JSON) becomes a `ProgsaeError`
whose message names the file and the fix; the CLI prints it as one line and exits with code 2.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import ProgsaeError


def save_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, durable: bool = False
) -> None:
    """Atomically write tensors (made contiguous: safetensors stores memory as it lies) to `path`.

    durable: fsync the file before the rename (checkpoints, shards), so a crash leaves the old or the new."""
    with atomic(path, durable) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates its files 0600; ours follow the user's umask


@contextmanager
def _writing(path: Path, tmp: Path):
    """Around a write of `path` through `tmp`: on failure the temporary file goes, and a full disk or a
    permission problem becomes one line naming the file (what was there before is untouched)."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, SafetensorError) and "No space" not in str(e):
            raise
        why = getattr(e, "strerror", None) or str(e)
        raise ProgsaeError(
            f"{path}: cannot be written ({why}); free space or choose another path, then rerun "
            "(earlier outputs are intact and the same command resumes)"
        ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync(path: str | Path) -> None:
    """Flush a file, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


@contextmanager
def atomic(path: str | Path, durable: bool = False):
    """`with atomic(path) as tmp:` write to `tmp`, a temporary name beside `path`; when the block ends the file is
    renamed to `path` (fsynced first if `durable`), and on failure removed (what was at `path` is untouched)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    with _writing(path, tmp):
        yield tmp
        if durable:
            fsync(tmp)
        os.replace(tmp, path)


def write_text(path: str | Path, text: str, durable: bool = False) -> Path:
    with atomic(path, durable) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_json(path: str | Path, obj, durable: bool = False) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n", durable)


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


def sweep_leftovers(root: Path) -> None:
    """Remove what writers cut short by a kill leave under `root`: temporary files and directories
    (`*.tmp`, `*.tmp.png`) and the old copy `replace_dir` keeps while it swaps (`*.old`). Only for a
    directory no one else is writing. Shallowest first: a removed directory takes its contents along."""
    for p in sorted(root.rglob("*"), key=lambda p: len(p.parts)):
        if not p.name.endswith((".tmp", ".tmp.png", ".old")):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def fresh_dir(path: Path) -> Path:
    """An empty directory at `path` (removed first if left over from an interrupted write)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path
