"""Atomic file writes (temp file in the same folder, then rename): no half-written outputs.

Every helper takes the destination path first, as ``analysis.io`` does.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from typing import Any


def _atomic(path: str, write: Callable[[str], None]) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = "".join(os.path.basename(path).partition(".")[1:])
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    # mkstemp makes the file 0600; an output gets the mode a plain open() would give it
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def path_under(folder: str, *parts: str) -> str:
    """``folder/parts...`` after checking that, resolved, it lies inside ``folder``."""
    base = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(base, *[str(p) for p in parts]))
    if path != base and not path.startswith(base.rstrip(os.sep) + os.sep):
        raise ValueError(f"output path {os.path.join(folder, *map(str, parts))} resolves to {path}, outside the "
                         f"output folder {base}: refusing to write there")
    return path


def _clean(obj: Any) -> Any:
    """NaN -> null so the JSON is standard (absent classes are null in metrics.json)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: str, obj: Any) -> str:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(_clean(obj), f, indent=2, allow_nan=False)
            f.write("\n")

    return _atomic(path, w)


def write_csv(path: str, frame) -> str:
    return _atomic(path, lambda tmp: frame.to_csv(tmp, index=False))


def save_figure(path: str, fig, data=None) -> str:
    """PNG of ``fig`` and, when given, the CSV of the data behind it (same stem)."""
    import matplotlib.pyplot as plt

    _atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))
    plt.close(fig)
    if data is not None:
        write_csv(os.path.splitext(path)[0] + ".csv", data)
    return path


def save_weights(path: str, state: dict) -> str:
    """A state dict of tensors, as ``torch.save`` writes it (readable with ``weights_only=True``)."""
    import torch

    return _atomic(path, lambda tmp: torch.save(state, tmp))


def save_nifti(path: str, array, affine) -> str:
    import nibabel as nib
    import numpy as np

    img = nib.Nifti1Image(np.asarray(array, dtype=np.float32), np.asarray(affine, dtype=np.float64))
    return _atomic(path, lambda tmp: nib.save(img, tmp))
