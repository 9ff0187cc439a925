"""The Eq. 3 input module's own transforms: input checks (fail early, naming the patient and time
point) and the mask channels stacked after the images."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.transforms import CropForegroundd, MapTransform, MaskIntensityd


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


class RequireFinited(MapTransform):
    """After loading: every voxel of each image is finite. A NaN or Inf would make the masked,
    normalised input NaN and the prediction meaningless without any error."""

    def __init__(self, keys: Sequence[Hashable], patient_key: str = "patient_id") -> None:
        super().__init__(keys)
        self.patient_key = patient_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            finite = torch.isfinite(torch.as_tensor(d[key]))
            if not bool(finite.all()):
                tp = str(key).rsplit("_", 1)[-1]
                src = getattr(d[key], "meta", {}).get("filename_or_obj", "")
                raise PrognosisInputError(
                    f"patient {d.get(self.patient_key, '<no patient_id>')}: time point {tp}: "
                    f"{int((~finite).sum())} voxel(s) are NaN or infinite" + (f" in {src}" if src else "")
                    + "; expected finite intensities (check the export of this scan)")
        return d


def _pairs(image_keys: Sequence[Hashable], mask_keys: Sequence[Hashable]) -> list[tuple[Hashable, Hashable]]:
    image_keys, mask_keys = list(image_keys), list(mask_keys)
    if len(image_keys) != len(mask_keys) or not image_keys:
        raise ValueError(f"image_keys {image_keys} and mask_keys {mask_keys}: expected one mask per image "
                         f"(the same number of each, at least one)")
    return list(zip(image_keys, mask_keys))


class CropEachToMaskd(MapTransform):
    """Crop every time point's image and mask to the box of that time point's own mask.

    One MONAI ``CropForegroundd`` per (image, mask) pair, in time order: the scans are months
    apart and the liver moves and changes, so each is cropped to its own mask (plus ``margin``
    voxels), never to another time point's.
    """

    def __init__(self, image_keys: Sequence[Hashable], mask_keys: Sequence[Hashable], margin=0,
                 allow_smaller: bool = True) -> None:
        pairs = _pairs(image_keys, mask_keys)
        super().__init__([k for pair in pairs for k in pair])
        self.crops = [CropForegroundd(keys=[image, mask], source_key=mask, margin=margin, allow_smaller=allow_smaller)
                      for image, mask in pairs]

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for crop in self.crops:
            d = crop(d)
        return d


class MaskEachImaged(MapTransform):
    """Zero every time point's image outside its own mask: one MONAI ``MaskIntensityd`` per pair."""

    def __init__(self, image_keys: Sequence[Hashable], mask_keys: Sequence[Hashable]) -> None:
        pairs = _pairs(image_keys, mask_keys)
        super().__init__([image for image, _ in pairs])
        self.masks = [MaskIntensityd(keys=image, mask_key=mask) for image, mask in pairs]

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for mask in self.masks:
            d = mask(d)
        return d


#: what is stacked after the three masked images (``mask_channels`` id of the configs)
MASK_CHANNELS = {"none": 0, "union": 1, "labels": 2}


def _mode(mask_channels: str) -> str:
    mode = str(mask_channels).strip().lower()
    if mode not in MASK_CHANNELS:
        raise ValueError(f"mask_channels: expected one of {sorted(MASK_CHANNELS)}; got {mask_channels!r}")
    return mode


def input_channels(mask_channels: str = "none", timepoints: int = 3) -> int:
    """Network input channels for a ``mask_channels`` mode: 3 (none), 6 (union), 9 (labels)."""
    return timepoints * (1 + MASK_CHANNELS[_mode(mask_channels)])


def input_keys(image_keys: Sequence[str], mask_keys: Sequence[str], mask_channels: str = "none") -> list[str]:
    """Keys ConcatItemsd stacks into ``image``: the images, then the masks unless mode is none."""
    return list(image_keys) + ([] if _mode(mask_channels) == "none" else list(mask_keys))


class MaskChannelsd(MapTransform):
    """After masking: turn each (resized, nearest) label map into the channels it adds to the input.

    - ``union``: one binary channel, liver or tumour (the liver's extent: useful where tissue
      inside the liver is 0 after z-normalisation);
    - ``labels``: two binary channels, liver (label 1) and tumour (label 2): the paper's
      "enhanced target regions", one-hot, so the network sees how much of the liver is tumour
      and where, at every time point;
    - ``none``: the maps are left as they are (only the masked images are stacked).

    Label values other than 0, 1, 2 are an error naming the patient and time point.
    """

    def __init__(self, keys: Sequence[Hashable], mask_channels: str = "none", patient_key: str = "patient_id") -> None:
        super().__init__(keys)
        self.mode = _mode(mask_channels)
        self.patient_key = patient_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        if self.mode == "none":
            return d
        for key in self.key_iterator(d):
            mask = d[key]
            values = torch.unique(torch.as_tensor(mask))
            unknown = [float(v) for v in values if float(v) not in (0.0, 1.0, 2.0)]
            if unknown:
                tp = str(key).rsplit("_", 1)[-1]
                raise PrognosisInputError(
                    f"patient {d.get(self.patient_key, '<no patient_id>')}: time point {tp}: mask has "
                    f"label value(s) {unknown[:5]}; expected 0 background, 1 liver, 2 tumour")
            if self.mode == "union":
                d[key] = (mask > 0).to(torch.float32)
            else:
                d[key] = torch.cat([mask == 1, mask == 2], dim=0).to(torch.float32)
        return d
