"""Input checks and the liver-presence check, as MONAI dictionary transforms used from the configs.

Errors name the file, say what was found and what is expected, and are raised before any output
is written for that case.
"""

from __future__ import annotations

import logging
import os
from typing import Hashable, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage
from monai.config import KeysCollection
from monai.transforms import MapTransform

logger = logging.getLogger("hcc_liver_seg")

#: label values of the masks contract: 0 background, 1 liver, 2 tumour
LABEL_VALUES = (0, 1, 2)


def _filename(value) -> str:
    meta = getattr(value, "meta", None)
    if isinstance(meta, Mapping) and meta.get("filename_or_obj"):
        return str(meta["filename_or_obj"])
    return "<in-memory image>"


class Above:
    """``x > threshold``, as a named, picklable callable for ``select_fn`` (CropForegroundd)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = float(threshold)

    def __call__(self, x):
        return x > self.threshold


class CheckNiftid(MapTransform):
    """Before loading: every path exists, is a readable NIfTI, and holds one 3-D volume.

    A trailing singleton 4th dimension (x, y, z, 1) is accepted, as scanners export it; anything
    else 4-D (several phases, time points or channels in one file) is refused: the model takes one
    arterial-phase volume per file.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key]
            if not isinstance(path, (str, os.PathLike)):
                continue  # already loaded (e.g. a cached item): nothing to check here
            path = os.fspath(path)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{key} file not found: {path} (expected a NIfTI file .nii or .nii.gz)")
            try:
                img = nib.load(path)
                shape = tuple(int(s) for s in img.shape)
                # the voxels, not only the header: a truncated file fails here, named, rather than
                # deep inside the loader after earlier cases were written
                voxels = np.asanyarray(img.dataobj)
            except Exception as e:  # nibabel raises several types for corrupt/unknown files
                raise ValueError(
                    f"{key} file is not a readable NIfTI image: {path} ({type(e).__name__}: {e})"
                ) from e
            if voxels.dtype.kind == "f" and not np.isfinite(voxels).all():
                bad = int(voxels.size - np.isfinite(voxels).sum())
                raise ValueError(f"{key} file {path}: {bad} voxel(s) are NaN or infinite; expected finite "
                                 f"intensities (check the export of this scan)")
            if len(shape) == 4 and shape[3] == 1:
                continue
            if len(shape) != 3:
                raise ValueError(
                    f"{key} file {path}: expected a 3-D volume (x, y, z), found a {len(shape)}-D image of "
                    f"shape {shape}; split multi-phase/multi-time-point data into one file per volume"
                )
            if min(shape) < 2:
                raise ValueError(f"{key} file {path}: volume of shape {shape} is too small to segment")
        return d


class CheckLabeld(MapTransform):
    """After loading: label values are in {0, 1, 2} and the label has the image's shape."""

    def __init__(
        self,
        keys: KeysCollection = "label",
        image_key: str = "image",
        allowed: Sequence[int] = LABEL_VALUES,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.allowed = tuple(int(v) for v in allowed)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            lab = d[key]
            arr = lab.detach().cpu().numpy() if isinstance(lab, torch.Tensor) else np.asarray(lab)
            values = np.unique(arr)
            bad = [v for v in values.tolist() if v not in self.allowed]
            if bad:
                shown = ", ".join(f"{v:g}" for v in bad[:10]) + (" ..." if len(bad) > 10 else "")
                raise ValueError(
                    f"{key} file {_filename(lab)}: label values {{{shown}}} outside "
                    f"{set(self.allowed)} (0 background, 1 liver, 2 tumour)"
                )
            img = d.get(self.image_key)
            if img is not None and tuple(np.shape(img)) != tuple(arr.shape):
                raise ValueError(
                    f"{key} file {_filename(lab)}: shape {tuple(arr.shape)} differs from image "
                    f"{_filename(img)} shape {tuple(np.shape(img))}; a label must be on its image's grid"
                )
        return d


class LiverCheckd(MapTransform):
    """After post-processing: a case with less liver (+ tumour) than `min_liver_ml` gets an empty
    mask and a warning naming the file, instead of a crash or a stray speck of "liver".

    Expects a 1-channel label map carrying its affine (a MetaTensor, in the input's space).
    Logs liver and tumour volumes (mL) of every case: the progress log of inference.
    """

    def __init__(self, keys: KeysCollection = "pred", min_liver_ml: float = 0.0, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.min_liver_ml = float(min_liver_ml)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            voxel_ml = float(np.prod(np.asarray(pred.pixdim, dtype=float))) / 1000.0 if hasattr(pred, "pixdim") else 1e-3
            liver_ml = float((pred == 1).sum()) * voxel_ml
            tumour_ml = float((pred == 2).sum()) * voxel_ml
            name = _filename(pred)
            if liver_ml + tumour_ml <= self.min_liver_ml or liver_ml + tumour_ml == 0:
                logger.warning(
                    "no liver found in %s (liver+tumour %.1f mL <= %.1f mL): writing an empty mask",
                    name, liver_ml + tumour_ml, self.min_liver_ml,
                )
                pred.zero_() if isinstance(pred, torch.Tensor) else pred.fill(0)
            else:
                logger.info("%s: liver %.1f mL, tumour %.1f mL", name, liver_ml, tumour_ml)
        return d


class KeepLargestLiverd(MapTransform):
    """Keep the largest connected component of liver + tumour (labels 1 and 2 together).

    Liver fragments and tumour blobs not connected to the main liver body become background; tumour
    inside or touching the liver is kept. Same result as MONAI's
    ``KeepLargestConnectedComponentd(applied_labels=[1, 2], independent=False)`` (26-connectivity),
    which needs scikit-image on CPU; this uses scipy.ndimage, already a dependency.
    """

    def __init__(self, keys: KeysCollection = "pred", labels: Sequence[int] = (1, 2), allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.labels = tuple(int(v) for v in labels)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            arr = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
            fg = np.isin(arr, self.labels)
            comps, n = ndimage.label(fg, structure=np.ones((3,) * fg.ndim, dtype=bool))
            if n > 1:
                sizes = np.bincount(comps.ravel())
                sizes[0] = 0
                drop = fg & (comps != int(sizes.argmax()))
                if isinstance(pred, torch.Tensor):
                    pred[torch.as_tensor(drop, device=pred.device)] = 0
                else:
                    arr[drop] = 0
                    d[key] = arr
        return d
