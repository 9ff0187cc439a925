"""Atomic NIfTI writing: a crash mid-write never leaves a half-written mask behind."""

from __future__ import annotations

import os

from monai.data import NibabelWriter


class AtomicNibabelWriter(NibabelWriter):
    """NibabelWriter that writes to a temporary file in the target folder, then renames it."""

    def write(self, filename, verbose: bool = False, **obj_kwargs):
        filename = os.fspath(filename)
        folder, base = os.path.split(filename)
        # keep the .nii.gz ending: nibabel picks compression from it
        tmp = os.path.join(folder, f".tmp-{os.getpid()}-{base}")
        try:
            super().write(tmp, verbose=verbose, **obj_kwargs)
            os.replace(tmp, filename)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
