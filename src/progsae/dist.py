"""Data parallelism on PyTorch's own engine: a command launched by torchrun trains on every rank.

    torchrun --standalone --nproc-per-node N -m progsae train ACTS --out SAE ...

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; `init` joins the process group (gloo on CPU, nccl on
GPU, each rank on cuda:LOCAL_RANK). Without torchrun every function here is the single-process no-op,
so the training code has one path. Rank 0 alone writes files and prints.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as tdist


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str) -> str:
    """Join torchrun's process group once (if launched by it); returns this rank's device."""
    if not launched():
        return device
    if device.startswith("cuda") and ":" not in device:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if not tdist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        # a long timeout: in `progsae run` the other ranks wait while rank 0 alone evaluates and reports
        tdist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(hours=24))
    return device


def active() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def rank() -> int:
    return tdist.get_rank() if active() else 0


def world() -> int:
    return tdist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def _collective(t: torch.Tensor, op) -> torch.Tensor:
    """Apply the collective `op` to `t` in place (nccl reduces CUDA tensors only: a CPU one goes through the GPU)."""
    if not active():
        return t
    if tdist.get_backend() == "nccl" and t.device.type != "cuda":
        on_gpu = t.to(f"cuda:{torch.cuda.current_device()}")
        op(on_gpu)
        t.copy_(on_gpu.cpu())
    else:
        op(t)
    return t


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over the ranks, in place; returns it."""
    return _collective(t, tdist.all_reduce)


def all_max(t: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum of `t` over the ranks, in place; returns it."""
    return _collective(t, lambda u: tdist.all_reduce(u, tdist.ReduceOp.MAX))


def broadcast(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's `t` on every rank, in place."""
    return _collective(t, lambda u: tdist.broadcast(u, 0))


def agree(flag: bool) -> bool:
    """Rank 0's `flag` on every rank (one decision, e.g. whether a stage is done, taken by rank 0)."""
    return bool(broadcast(torch.tensor([int(flag)])).item())


def gather(obj) -> list:
    """Every rank's `obj` (picklable: this process's own plain data, never a file), in rank order."""
    if not active():
        return [obj]
    out = [None] * world()
    tdist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        tdist.barrier()


def close(ok: bool = True) -> None:
    """Leave the process group; after success, only once every rank is done (no rank tears down a
    connection another is still reading)."""
    if tdist.is_available() and tdist.is_initialized():
        if ok:
            tdist.barrier()
        tdist.destroy_process_group()
