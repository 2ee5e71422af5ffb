"""The one error a user can cause, and the device check every stage shares.

A `ProgsaeError`'s message says what is wrong and how to fix it; the CLI prints it as one line and exits
with code 2.
"""

from __future__ import annotations

import torch


class ProgsaeError(Exception):
    """A problem with the user's input: the message says what is wrong and how to fix it."""


def check_device(name: str) -> torch.device:
    """torch.device(name), or a ProgsaeError if it is malformed or not on this machine."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ProgsaeError(f"device {name!r} is not a device; use cpu or cuda (cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ProgsaeError(f"device {name!r}: this torch has no CUDA device available; use the cpu device")
    return device
