"""Input checks for the Eq. 3 input module: fail early, naming the patient and time point."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.transforms import MapTransform


class PrognosisInputError(ValueError):
    """A datalist item cannot be turned into the 3-time-point input."""


class ValidateTimepointsd(MapTransform):
    """Before loading: every image/mask key is present and its file exists.

    Without this, a missing time point surfaces as a KeyError or an ITK/nibabel traceback that
    does not say which patient it was.
    """

    def __init__(self, keys: Sequence[Hashable], patient_key: str = "patient_id") -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.patient_key = patient_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        pid = d.get(self.patient_key, "<no patient_id>")
        for key in self.keys:
            tp = str(key).rsplit("_", 1)[-1]
            path = d.get(key)
            if not path:
                raise PrognosisInputError(f"patient {pid}: time point {tp} missing ('{key}' not in "
                                          f"the datalist item); ProgSwin-UNETR needs t0, t1 and t2")
            if isinstance(path, str) and not os.path.exists(path):
                raise PrognosisInputError(f"patient {pid}: time point {tp}: {key} file not found: {path}")
        return d


class RequireNonEmptyMaskd(MapTransform):
    """After loading and binarising: each mask has at least one foreground voxel.

    An empty mask would crop to nothing and multiply the image to all zeros.
    """

    def __init__(self, keys: Sequence[Hashable], patient_key: str = "patient_id") -> None:
        super().__init__(keys)
        self.patient_key = patient_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        pid = d.get(self.patient_key, "<no patient_id>")
        for key in self.key_iterator(d):
            mask = d[key]
            if not bool(torch.as_tensor(mask).gt(0).any()):
                tp = str(key).rsplit("_", 1)[-1]
                src = getattr(mask, "meta", {}).get("filename_or_obj", "")
                raise PrognosisInputError(
                    f"patient {pid}: time point {tp}: mask is empty (no liver or tumour voxel)"
                    + (f" in {src}" if src else "") + "; check the segmentation of this scan")
        return d
