"""Atomic file output: every file the project writes goes through here.

Each writer creates a temporary file in the destination folder and renames it over the target,
so a run interrupted at any point leaves either the old file or the new one, never half of one.
Every writer takes the destination path first (the bundles' scripts/io.py do the same).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

_UMASK = os.umask(0)
os.umask(_UMASK)

__all__ = [
    "atomic_path",
    "write_text",
    "write_bytes",
    "write_json",
    "write_csv",
    "save_figure",
    "save_nifti",
    "file_sha256",
    "path_under",
]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    ``suffix`` defaults to the target's own suffixes so that libraries choosing a format by
    extension (nibabel, matplotlib) see the right one.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(target.suffixes) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; outputs get the permissions a plain open() would have given them
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def write_csv(path: str | os.PathLike, frame, index: bool = False, **kwargs) -> Path:
    """Write a pandas DataFrame as CSV atomically."""
    with atomic_path(path, suffix=".csv") as tmp:
        frame.to_csv(tmp, index=index, **kwargs)
    return Path(path)


def save_figure(path: str | os.PathLike, fig, data=None, dpi: int = 150, close: bool = True) -> Path:
    """Save a matplotlib figure as PNG and, when ``data`` (a DataFrame) is given, the data behind it.

    The data goes to ``tables/<stem>.csv`` when the PNG lives in a ``figures/`` folder (the study
    layout), otherwise beside the PNG as ``<stem>.csv``.
    """
    target = Path(path)
    with atomic_path(target, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    if data is not None:
        if target.parent.name == "figures":
            csv_path = target.parent.parent / "tables" / f"{target.stem}.csv"
        else:
            csv_path = target.with_suffix(".csv")
        write_csv(csv_path, data)
    if close:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return target


def save_nifti(path: str | os.PathLike, array, affine, dtype=None, header=None) -> Path:
    """Save an array as NIfTI with ``affine`` atomically (qform and sform both set)."""
    import nibabel as nib
    import numpy as np

    arr = np.asarray(array)
    if dtype is not None:
        arr = arr.astype(dtype)
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64), header=header)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    if dtype is not None:
        img.set_data_dtype(np.dtype(dtype))
    suffix = ".nii.gz" if str(path).endswith(".gz") else ".nii"
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def path_under(folder: str | os.PathLike, *parts: str | os.PathLike) -> Path:
    """``folder/part/...``, after checking that it resolves to a path strictly inside ``folder``.

    Every output path built from an outside value (a patient id, a file name) goes through here:
    ``..``, an absolute part or a symbolic link leading out of ``folder`` raises ValueError naming
    both, before anything is written. Returns the joined path as given (not resolved).
    """
    base = Path(folder)
    target = base.joinpath(*parts)
    root, resolved = base.resolve(), target.resolve()
    if resolved == root or root not in resolved.parents:
        raise ValueError(f"output path {str(target)!r} (from {[str(p) for p in parts]}) resolves to {resolved}, "
                         f"which is not inside the output folder {root}; expected a path under it")
    return target


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
