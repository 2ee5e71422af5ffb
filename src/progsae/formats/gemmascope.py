"""Gemma Scope: params.npz (the file, or its folder layer_L/width_W/average_l0_X/).

    W_enc [d, N], W_dec [N, d], b_enc [N], b_dec [d], threshold [N]   (some files spell them w_enc, w_dec)
    z = ReLU(pre) * (pre > threshold), pre = x W_enc + b_enc (no b_dec subtracted; folded: b_enc + b_dec W_enc)
    x̂ = z W_dec + b_dec
Read with numpy, allow_pickle=False. Written back as SAELens directories.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import ProgsaeError
from ..sae import SAE
from .common import build


def read(file: Path) -> SAE:
    if "embedding" in str(file.resolve()):
        raise ProgsaeError(
            f"{file}: a Gemma Scope embedding SAE reads the unscaled token embedding (SAELens rescales it by "
            "sqrt(d_in)); progsae reads residual-stream SAEs: pass a layer_L SAE"
        )
    try:
        with np.load(file, allow_pickle=False) as z:
            arrays = {key.lower(): np.asarray(z[key]) for key in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ProgsaeError(f"{file}: not a readable .npz of arrays ({e}); download it again") from None
    missing = [n for n in ("w_enc", "w_dec", "b_enc", "b_dec", "threshold") if n not in arrays]
    if missing:
        raise ProgsaeError(f"{file}: array {missing[0]} is missing; a Gemma Scope params.npz holds W_enc, W_dec, b_enc, b_dec, threshold")
    t = {n: torch.from_numpy(a.astype(np.float64)) for n, a in arrays.items()}
    meta = {}
    m = re.search(r"layer_(\d+)", str(file.resolve()))
    if m and "-res" in str(file.resolve()):
        meta["hook_name"] = f"blocks.{m.group(1)}.hook_resid_post"
    return build(
        file, "jumprelu", t["w_enc"], t["b_enc"], t["w_dec"], t["b_dec"], t["threshold"],
        subtract_b_dec=False, metadata=meta, source={"format": "gemmascope", "file": str(file), "folded": ["no b_dec subtracted from the input"]},
    )  # fmt: skip
