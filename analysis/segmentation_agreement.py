"""Agreement of automatic segmentation masks with manual label maps, scan by scan (paper Eq. 2).

Both folders have the masks layout of docs/contracts.md: ``<dir>/<patient_id>/t{0,1,2}.nii.gz``
(or ``.nii``), 0 background, 1 liver parenchyma, 2 tumour. Every scan that has a manual label is
scored; masks without a manual label (inference covers every scan) are ignored.

Per scan (:func:`dice_table`), with M the automatic mask and G the manual label:

* ``dice_liver``: Dice of label 1 (liver parenchyma, tumour excluded);
* ``dice_tumour``: Dice of label 2;
* ``dice_eq2``: the paper's Eq. 2, ``2 (|M1 n G1| + |M2 n G2|) / (|M1| + |G1| + |M2| + |G2|)``:
  voxels of both labels pooled, so the large liver dominates (as in
  ``bundles/hcc_liver_seg/scripts/metrics.py``);
* ``dice_whole_liver``: Dice of labels 1 and 2 taken as one organ (the liver outline, whatever the
  tumour boundary inside it);
* ``n_voxels_pred_tumour``, ``n_voxels_true_tumour``: tumour voxel counts, so a tumour Dice of 0
  or 1 can be told apart from a scan without tumour;
* ``hd95_whole_liver_mm``, ``hd95_tumour_mm``: the 95th-percentile Hausdorff distance between
  the surfaces, in millimetres of the scan's voxel spacing (MONAI's
  ``compute_hausdorff_distance``); NaN when either side is empty.

**Empty sets**: the Dice of two empty sets is 1.0 here (both agree there is nothing), so a scan
where neither mask nor label has tumour scores ``dice_tumour = 1``. The bundle's
``CombinedDiceMetric`` instead returns NaN there and leaves the case out of its mean; the
voxel counts above let a reader drop such scans if they want that convention.

Bad input raises ValueError / FileNotFoundError naming the file(s): a labelled scan without a
mask (every missing file in one message), an unreadable or truncated file, a volume that is not
3-D, label values other than 0/1/2, and a mask whose shape or affine (within
:data:`analysis.cohort.AFFINE_TOLERANCE_MM`) differs from its label's. Masks are compared voxel by
voxel in their stored orientation, which is why the grids must agree exactly: a resampled mask is
not silently scored against the wrong voxels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.burden import read_mask  # same reading, value check and error wording as burden
from analysis.cohort import AFFINE_TOLERANCE_MM, LABELS, TIMEPOINTS, find_scan, mask_path
from analysis.io import write_csv

__all__ = ["DICE_COLUMNS", "HD95_COLUMNS", "PER_SCAN_COLUMNS", "dice", "dice_table", "hd95_mm", "seg_dice_cli",
           "summarise"]

DICE_COLUMNS: list[str] = ["dice_liver", "dice_tumour", "dice_eq2", "dice_whole_liver"]
HD95_COLUMNS: list[str] = ["hd95_whole_liver_mm", "hd95_tumour_mm"]
PER_SCAN_COLUMNS: list[str] = ["patient_id", "timepoint", *DICE_COLUMNS,
                               "n_voxels_pred_tumour", "n_voxels_true_tumour", *HD95_COLUMNS]
_LIVER, _TUMOUR = LABELS["liver"], LABELS["tumour"]


# ------------------------------------------------------------------------------------ Dice
def _ratio(intersection: int, total: int) -> float:
    """``2 |A n B| / (|A| + |B|)``; 1.0 when both sets are empty (they agree: nothing there)."""
    return 1.0 if total == 0 else 2.0 * intersection / total


def dice(pred: np.ndarray, true: np.ndarray) -> float:
    """Dice of two boolean arrays of equal shape; 1.0 when both are empty."""
    return _ratio(int(np.count_nonzero(pred & true)), int(np.count_nonzero(pred) + np.count_nonzero(true)))


def hd95_mm(pred: np.ndarray, true: np.ndarray, spacing_mm) -> float:
    """95th-percentile Hausdorff distance (mm) of two boolean masks; NaN when either is empty."""
    if not pred.any() or not true.any():
        return float("nan")
    import torch
    from monai.metrics import compute_hausdorff_distance

    to = lambda a: torch.from_numpy(np.ascontiguousarray(a))[None, None]  # noqa: E731
    value = compute_hausdorff_distance(to(pred), to(true), include_background=True, percentile=95,
                                       spacing=[float(s) for s in spacing_mm])
    return float(value.reshape(-1)[0])


def _scan_row(pred: np.ndarray, true: np.ndarray, spacing_mm=(1.0, 1.0, 1.0)) -> dict:
    m1, g1 = pred == _LIVER, true == _LIVER
    m2, g2 = pred == _TUMOUR, true == _TUMOUR
    # Eq. 2 pools the voxel counts of both labels before dividing (not a mean of two Dice values)
    inter = int(np.count_nonzero(m1 & g1)) + int(np.count_nonzero(m2 & g2))
    total = sum(int(np.count_nonzero(a)) for a in (m1, g1, m2, g2))
    return {
        "dice_liver": dice(m1, g1),
        "dice_tumour": dice(m2, g2),
        "dice_eq2": _ratio(inter, total),
        "dice_whole_liver": dice(m1 | m2, g1 | g2),
        "n_voxels_pred_tumour": int(np.count_nonzero(m2)),
        "n_voxels_true_tumour": int(np.count_nonzero(g2)),
        "hd95_whole_liver_mm": hd95_mm(m1 | m2, g1 | g2, spacing_mm),
        "hd95_tumour_mm": hd95_mm(m2, g2, spacing_mm),
    }


# ----------------------------------------------------------------------------------- files
def _labelled_scans(labels: Path) -> list[tuple[str, str, Path]]:
    """(patient_id, timepoint, label file) of every manual label, sorted by patient then time."""
    if not labels.is_dir():
        raise FileNotFoundError(f"labels folder {labels} not found; expected "
                                "<labels>/<patient_id>/t0.nii.gz ...")
    scans = [(p.name, tp, found) for p in sorted(labels.iterdir()) if p.is_dir()
             for tp in TIMEPOINTS if (found := find_scan(labels, p.name, tp)) is not None]
    if not scans:
        raise FileNotFoundError(f"labels folder {labels} holds no <patient_id>/t0|t1|t2.nii.gz label")
    return scans


def _read_with_affine(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    data, _ = read_mask(path)  # raises naming the file: unreadable, not 3-D, values not 0/1/2
    # a header-only load (the voxels were read above): cheap, and keeps burden's reader unchanged
    return data, np.asarray(nib.load(str(path)).affine, dtype=np.float64)


def _affine_text(affine: np.ndarray) -> str:
    return str(np.round(affine, 4).tolist())


def dice_table(masks, labels) -> pd.DataFrame:
    """One row per manual label in ``labels``: :data:`PER_SCAN_COLUMNS` (module docstring).

    Args:
        masks: folder of automatic masks ``<masks>/<patient_id>/t{k}.nii.gz``.
        labels: folder of manual labels of the same layout (a cohort's ``labels/``).

    Rows are sorted by patient_id, then time point. Raises FileNotFoundError listing every
    labelled scan without a mask, and ValueError naming the file(s) for unreadable files, values
    outside {0, 1, 2}, and shape or affine mismatches.
    """
    masks, labels = Path(masks), Path(labels)
    scans = _labelled_scans(labels)
    if not masks.is_dir():
        raise FileNotFoundError(f"masks folder {masks} not found; expected <masks>/<patient_id>/t0.nii.gz ...")
    # every gap at once, before reading any voxel, so one run shows the whole problem
    missing = [mask_path(masks, pid, tp) for pid, tp, _ in scans if find_scan(masks, pid, tp) is None]
    if missing:
        raise FileNotFoundError(f"{len(missing)} labelled scan(s) have no mask: "
                                f"{', '.join(str(p) for p in missing)}")
    rows = []
    for pid, tp, label_file in scans:
        mask_file = find_scan(masks, pid, tp)
        pred, pred_affine = _read_with_affine(mask_file)
        true, true_affine = _read_with_affine(label_file)
        if pred.shape != true.shape:
            raise ValueError(f"shape mismatch: mask {mask_file} has shape {pred.shape}, "
                             f"label {label_file} has shape {true.shape}")
        if not np.allclose(pred_affine, true_affine, atol=AFFINE_TOLERANCE_MM, rtol=0):
            raise ValueError(f"affine mismatch (tolerance {AFFINE_TOLERANCE_MM} mm): mask {mask_file} "
                             f"has affine {_affine_text(pred_affine)}, label {label_file} has affine "
                             f"{_affine_text(true_affine)}")
        spacing_mm = np.linalg.norm(true_affine[:3, :3], axis=0)
        rows.append({"patient_id": pid, "timepoint": tp, **_scan_row(pred, true, spacing_mm)})
    return pd.DataFrame(rows, columns=PER_SCAN_COLUMNS)


def summarise(per_scan: pd.DataFrame) -> pd.DataFrame:
    """One row: ``n_scans``, ``<dice column>_mean`` for each, and the worst Eq. 2 scan.

    The worst scan is ``dice_eq2_min`` with its ``dice_eq2_min_patient_id`` and
    ``dice_eq2_min_timepoint`` (the first in row order on ties).
    """
    if per_scan.empty:
        raise ValueError("no scans to summarise")
    worst = per_scan.loc[per_scan["dice_eq2"].idxmin()]
    row: dict = {"n_scans": len(per_scan)}
    row.update({f"{c}_mean": float(per_scan[c].mean()) for c in DICE_COLUMNS})
    # HD95 is undefined (NaN) on scans with an empty side: the median of the defined ones
    row.update({f"{c}_median": float(per_scan[c].median()) if per_scan[c].notna().any() else float("nan")
                for c in HD95_COLUMNS if c in per_scan})
    row.update({"dice_eq2_min": float(worst["dice_eq2"]), "dice_eq2_min_patient_id": worst["patient_id"],
                "dice_eq2_min_timepoint": worst["timepoint"]})
    return pd.DataFrame([row])


# ------------------------------------------------------------------------------------- CLI
def _labels_folder(labels: Path) -> Path:
    """A cohort folder's ``labels/``, or the folder itself when it is already a labels folder."""
    return labels / "labels" if (labels / "labels").is_dir() else labels


def seg_dice_cli(masks: str, labels: str, out: str) -> str:
    """Dice of automatic masks against manual labels, per scan (paper Eq. 2 and per label).

    Writes OUT/per_scan.csv (patient_id, timepoint, dice_liver, dice_tumour, dice_eq2,
    dice_whole_liver, n_voxels_pred_tumour, n_voxels_true_tumour, hd95_whole_liver_mm,
    hd95_tumour_mm) and OUT/summary.csv (n_scans, the mean of each Dice column, the median
    HD95s, the worst Eq. 2 scan). The Dice of two empty sets is 1.

    Args:
        masks: folder of automatic masks <masks>/<patient_id>/t0|t1|t2.nii.gz (0 background,
            1 liver, 2 tumour), e.g. the segmentation bundle's inference output.
        labels: manual labels: a cohort folder (its labels/ is used) or a labels folder of the
            same layout. Every labelled scan needs a mask of the same shape and affine.
        out: output folder for per_scan.csv and summary.csv.
    """
    out_dir = Path(out)
    try:
        per_scan = dice_table(masks, _labels_folder(Path(labels)))
        summary = summarise(per_scan)
    except (ValueError, FileNotFoundError) as exc:
        # one clear line and nothing written, instead of a traceback
        raise SystemExit(f"seg-dice: {exc}") from None
    write_csv(out_dir / "per_scan.csv", per_scan)
    write_csv(out_dir / "summary.csv", summary)
    s = summary.iloc[0]
    return (f"seg-dice: {s['n_scans']} scans, Eq. 2 Dice {s['dice_eq2_mean']:.3f} "
            f"(min {s['dice_eq2_min']:.2f} {s['dice_eq2_min_patient_id']} {s['dice_eq2_min_timepoint']})")
