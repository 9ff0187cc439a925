"""mRECIST tumour response (Lencioni & Llovet 2010) from masks and arterial-phase images.

Standard followed, not the paper's wording
------------------------------------------
The paper's Appendix 7 speaks of a change in the "minimum diameter" of target lesions. mRECIST
(Lencioni R, Llovet JM. Semin Liver Dis 2010;30:52-60) measures the *longest* axial diameter of
the *viable* (arterially enhancing) part of each target lesion; this module follows the standard.

Measurement (``measure_patient``)
---------------------------------
* Every scan is reoriented to RAS with nibabel (``as_closest_canonical``) so that array axis 2 is
  the patient's S axis whatever the stored orientation; the axial plane is then axes 0-1.
* Lesions are the 3-D connected components (26-connectivity) of the tumour label (2).
* Longest axial diameter (mm): for every axial slice, the largest distance between voxel *corners*
  of the set in that slice, computed in physical coordinates through the scan's affine (so
  anisotropic and oblique voxels are handled); the maximum over slices. An ``n x m`` voxel
  rectangle with spacing ``sx, sy`` therefore measures ``sqrt((n sx)^2 + (m sy)^2)`` (edge to edge,
  as a caliper on the image would).
* Viable part: tumour voxels brighter than the surrounding liver by a documented margin:
  ``intensity > median(shell) + k * 1.4826 * MAD(shell)`` with ``k = 2`` by default (``--k``), where
  the shell is the liver (label 1) within ``shell_mm = 5`` mm of the lesion; fewer than
  ``MIN_SHELL_VOXELS`` shell voxels -> the whole liver is the reference; no liver at all -> the
  whole lesion counts as viable and the row's ``notes`` says so. Viable 3-D components smaller
  than ``min_viable_mm3`` (10 mm^3) are discarded as noise. The viable diameter is the longest
  axial diameter of the lesion's viable voxels.
* Targets: baseline (t0) lesions with longest axial diameter >= 10 mm and some viable
  enhancement, at most two per liver, largest (longest diameter) first.
* Matching at follow-up: time points are not aligned voxel-wise, so every follow-up lesion's voxel
  centres are mapped through world coordinates into the baseline grid; it belongs to the baseline
  lesion it overlaps most; without overlap, to the baseline lesion whose centroid is nearest and
  within ``match_mm`` (15 mm). Several follow-up fragments of one target are summed (a target that
  splits). A target with no matched lesion measures 0 mm. Follow-up lesions matching no baseline
  lesion are new; a new lesion counts for PD when its longest diameter is >= 10 mm and it
  enhances (viable part present).
* The sum at each time point is the sum of the targets' viable diameters (``sum_mm_t*``).

Classification (``classify_diameters``; also usable on measured diameters from a CSV)
--------------------------------------------------------------------------------------
At t1 and t2, in this order:

* PD: a qualifying new lesion, or the sum increased by >= 20 % over the nadir (the smallest sum
  recorded since treatment started, baseline included); after a nadir of 0 any reappearing
  viable tumour is PD.
* CR: no viable enhancement in any target (sum 0).
* PR: the sum decreased by >= 30 % versus baseline.
* SD: otherwise.

Thresholds are compared with a relative tolerance of 1e-6 so that an exact 30 % / 20 % change
measured in floating point counts. Best response: the best of t1, t2 (CR > PR > SD > PD) up to
and including the first PD, without confirmation scans (the study has two follow-ups).
A patient without a measurable enhancing target at baseline gets ``NA`` with the reason.
Not assessed: non-target lesion progression and extrahepatic disease (masks carry no such labels).
User documentation: docs/mrecist.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import ConvexHull
from scipy.spatial.distance import pdist

from analysis.clinical_table import read_clinical_table, usage_exit
from analysis.cohort import LABELS, TIMEPOINTS, check_patient_id, find_scan
from analysis.io import save_figure, write_csv

log = logging.getLogger(__name__)

__all__ = [
    "RESPONSES",
    "Lesion",
    "best_response",
    "classify_diameters",
    "classify_response",
    "find_lesions",
    "load_canonical",
    "longest_axial_diameter_mm",
    "measure_patient",
    "mrecist_cli",
    "mrecist_from_masks",
    "plot_waterfall",
    "waterfall_data",
]

#: response categories, best first
RESPONSES: tuple[str, ...] = ("CR", "PR", "SD", "PD")
MIN_TARGET_MM = 10.0  # measurable lesion / qualifying new lesion (mRECIST, >= 1 cm)
MAX_TARGETS = 2  # per liver (mRECIST: up to two intrahepatic targets)
PR_DECREASE = 0.30
PD_INCREASE = 0.20
REL_TOL = 1e-6
DEFAULT_K = 2.0
DEFAULT_SHELL_MM = 5.0
DEFAULT_MATCH_MM = 15.0
DEFAULT_MIN_VIABLE_MM3 = 10.0
MIN_SHELL_VOXELS = 10
_FOLLOW_UPS = TIMEPOINTS[1:]
_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


# ------------------------------------------------------------------------------ geometry
def load_canonical(path: str | Path, is_mask: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(array, affine) of a NIfTI file reoriented to the closest RAS orientation."""
    import nibabel as nib

    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
    except Exception as exc:  # nibabel raises many types for broken files
        raise ValueError(f"{path}: cannot read as NIfTI ({exc})") from exc
    if len(img.shape) != 3:
        raise ValueError(f"{path}: expected a 3-D volume, found shape {img.shape}")
    if is_mask:
        data = np.rint(np.asarray(img.dataobj, dtype=np.float64)).astype(np.int16)
        found = set(np.unique(data).tolist())
        allowed = set(LABELS.values())
        if not found <= allowed:
            raise ValueError(f"{path}: mask values {sorted(found)} found; expected only "
                             f"{sorted(allowed)} (0 background, 1 liver, 2 tumour)")
    else:
        data = np.asarray(img.get_fdata(dtype=np.float32))
    return data, np.asarray(img.affine, dtype=np.float64)


def longest_axial_diameter_mm(region: np.ndarray, affine: np.ndarray) -> float:
    """Longest in-plane diameter (mm) over the axial slices (axis 2) of a boolean region.

    Distances are between voxel corners mapped through ``affine``; 0.0 for an empty region.
    """
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    offsets = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
    best = 0.0
    for k in np.flatnonzero(region.any(axis=(0, 1))):
        ij = np.argwhere(region[:, :, k]).astype(np.float64)
        corners = np.unique((ij[:, None, :] + offsets[None, :, :]).reshape(-1, 2), axis=0)
        # the hull is affine-invariant: find it in index space, measure in mm
        hull = corners[ConvexHull(corners).vertices] if len(corners) > 4 else corners
        pts = np.column_stack([hull, np.full(len(hull), float(k))]) @ linear.T
        best = max(best, float(pdist(pts).max()))
    return best


def _voxel_volume_mm3(affine: np.ndarray) -> float:
    return float(abs(np.linalg.det(np.asarray(affine)[:3, :3])))


@dataclass
class Lesion:
    """One connected tumour component at one time point."""

    label: int
    n_voxels: int
    centroid_mm: np.ndarray
    longest_mm: float
    viable_mm: float
    notes: list[str] = field(default_factory=list)
    ijk: np.ndarray | None = field(default=None, repr=False)  # voxel indices (n, 3) in its scan

    @property
    def enhancing(self) -> bool:
        return self.viable_mm > 0


def _shifted(affine: np.ndarray, offset) -> np.ndarray:
    """Affine of a sub-array starting at voxel ``offset``."""
    out = np.array(affine, dtype=np.float64)
    out[:3, 3] = affine[:3, :3] @ np.asarray(offset, dtype=np.float64) + affine[:3, 3]
    return out


def _viable_region(lesion: np.ndarray, image: np.ndarray, mask: np.ndarray, affine: np.ndarray,
                   k: float, shell_mm: float, min_viable_mm3: float,
                   whole_liver=None) -> tuple[np.ndarray, str | None]:
    """Viable voxels of ``lesion`` (arrays cropped around the lesion with at least ``shell_mm`` margin)."""
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    dist = ndimage.distance_transform_edt(~lesion, sampling=spacing)
    shell = (dist > 0) & (dist <= shell_mm) & (mask == LABELS["liver"])
    reference = image[shell]
    note = None
    if reference.size < MIN_SHELL_VOXELS and whole_liver is not None:
        reference = whole_liver()
        note = "liver shell too small: whole liver used as enhancement reference"
    if reference.size < MIN_SHELL_VOXELS:
        return lesion.copy(), "no liver voxels to compare enhancement with: whole lesion counted as viable"
    med = float(np.median(reference))
    robust_sd = 1.4826 * float(np.median(np.abs(reference - med)))
    viable = lesion & (image > med + k * robust_sd)
    if min_viable_mm3 > 0 and viable.any():
        lab, n = ndimage.label(viable, structure=_STRUCTURE_26)
        sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
        too_small = np.flatnonzero(sizes * _voxel_volume_mm3(affine) < min_viable_mm3) + 1
        if too_small.size:
            viable[np.isin(lab, too_small)] = False
    return viable, note


def find_lesions(mask: np.ndarray, affine: np.ndarray, image: np.ndarray | None = None,
                 k: float = DEFAULT_K, shell_mm: float = DEFAULT_SHELL_MM,
                 min_viable_mm3: float = DEFAULT_MIN_VIABLE_MM3) -> tuple[list[Lesion], np.ndarray]:
    """Tumour components of a (canonical) mask with their diameters; also the labelled array.

    Without ``image`` the viable part cannot be judged and is reported as 0 mm.
    """
    labelled, _ = ndimage.label(mask == LABELS["tumour"], structure=_STRUCTURE_26)
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    margin = np.ceil(shell_mm / spacing).astype(int) + 1
    liver_cache: list[np.ndarray] = []

    def whole_liver() -> np.ndarray:
        if not liver_cache:
            liver_cache.append(image[mask == LABELS["liver"]])
        return liver_cache[0]

    lesions = []
    for lab, box in enumerate(ndimage.find_objects(labelled), start=1):
        lo = np.maximum([b.start for b in box] - margin, 0)
        hi = np.minimum(np.array([b.stop for b in box]) + margin, labelled.shape)
        crop = tuple(slice(a, b) for a, b in zip(lo, hi))
        region = labelled[crop] == lab
        crop_affine = _shifted(affine, lo)
        ijk = np.argwhere(region) + lo
        centroid = affine[:3, :3] @ ijk.mean(axis=0) + affine[:3, 3]
        notes: list[str] = []
        if image is None:
            viable_mm = 0.0
        else:
            viable, note = _viable_region(region, image[crop], mask[crop], crop_affine, k, shell_mm,
                                          min_viable_mm3, whole_liver)
            viable_mm = longest_axial_diameter_mm(viable, crop_affine)
            if note:
                notes.append(note)
        lesions.append(Lesion(lab, len(ijk), centroid, longest_axial_diameter_mm(region, crop_affine),
                              viable_mm, notes, ijk))
    return lesions, labelled


def _match(baseline: list[Lesion], labelled0: np.ndarray, affine0: np.ndarray, follow: list[Lesion],
           affine1: np.ndarray, match_mm: float) -> dict[int, int | None]:
    """follow-up lesion label -> baseline lesion label (None = new lesion)."""
    to_base = np.linalg.inv(affine0) @ affine1
    out: dict[int, int | None] = {}
    for les in follow:
        ijk = les.ijk.astype(np.float64)
        mapped = np.rint(ijk @ to_base[:3, :3].T + to_base[:3, 3]).astype(int)
        inside = np.all((mapped >= 0) & (mapped < labelled0.shape), axis=1)
        hits = labelled0[tuple(mapped[inside].T)]
        hits = hits[hits > 0]
        if hits.size:
            values, counts = np.unique(hits, return_counts=True)
            out[les.label] = int(values[np.argmax(counts)])
            continue
        dists = [(float(np.linalg.norm(les.centroid_mm - b.centroid_mm)), b.label) for b in baseline]
        near = min(dists, default=(np.inf, None))
        out[les.label] = near[1] if near[0] <= match_mm else None
    return out


# ---------------------------------------------------------------------------- per patient
def _scan_pair(cohort: Path, masks: Path, pid: str, tp: str):
    mpath = find_scan(masks, pid, tp)
    if mpath is None:
        return None, f"no mask for {tp}"
    ipath = find_scan(cohort / "images", pid, tp)
    if ipath is None:
        return None, f"no image for {tp}"
    mask, maff = load_canonical(mpath, is_mask=True)
    image, iaff = load_canonical(ipath)
    if mask.shape != image.shape or not np.allclose(maff, iaff, atol=1e-3):
        raise ValueError(f"{mpath}: mask shape/affine {mask.shape} does not match image {ipath} "
                         f"{image.shape}; masks must have exactly the geometry of their image")
    return (image, mask, maff), None


def measure_patient(cohort: str | Path, masks: str | Path, patient_id: str, k: float = DEFAULT_K,
                    shell_mm: float = DEFAULT_SHELL_MM, match_mm: float = DEFAULT_MATCH_MM,
                    min_viable_mm3: float = DEFAULT_MIN_VIABLE_MM3, min_target_mm: float = MIN_TARGET_MM) -> dict:
    """Target diameters, sums and new-lesion flags of one patient (one row of mrecist.csv).

    ``min_target_mm`` is mRECIST's 10 mm; change it only for anatomy drawn at a reduced scale
    (small synthetic volumes), never for patient data.
    """
    check_patient_id(patient_id, "measure_patient")  # the id names the scans' folders
    cohort, masks = Path(cohort), Path(masks)
    row: dict = {"patient_id": patient_id}
    notes: list[str] = []
    scan0, why = _scan_pair(cohort, masks, patient_id, "t0")
    if scan0 is None:
        row.update(sum_mm_t0=np.nan, reason=f"baseline not measurable: {why}")
        return row
    image0, mask0, aff0 = scan0
    base, lab0 = find_lesions(mask0, aff0, image0, k, shell_mm, min_viable_mm3)
    for les in base:
        notes += [f"t0: {n}" for n in les.notes]
    candidates = [b for b in base if b.longest_mm >= min_target_mm - REL_TOL and b.enhancing]
    targets = sorted(candidates, key=lambda b: (-b.longest_mm, -b.viable_mm))[:MAX_TARGETS]
    row["n_lesions_t0"] = len(base)
    row["n_targets"] = len(targets)
    if not targets:
        row["sum_mm_t0"] = 0.0
        row["reason"] = ("baseline not measurable: no enhancing lesion with longest axial diameter "
                         f">= {min_target_mm:g} mm ({len(base)} lesion(s) found)")
        row["notes"] = "; ".join(notes)
        return row
    for i, t in enumerate(targets, start=1):
        row[f"target{i}_longest_mm_t0"] = t.longest_mm
        row[f"target{i}_viable_mm_t0"] = t.viable_mm
    row["sum_mm_t0"] = sum(t.viable_mm for t in targets)
    for tp in _FOLLOW_UPS:
        scan, why = _scan_pair(cohort, masks, patient_id, tp)
        if scan is None:
            row[f"sum_mm_{tp}"] = np.nan
            notes.append(f"{tp} not assessed: {why}")
            continue
        image, mask, aff = scan
        follow, _ = find_lesions(mask, aff, image, k, shell_mm, min_viable_mm3)
        for les in follow:
            notes += [f"{tp}: {n}" for n in les.notes]
        matched = _match(base, lab0, aff0, follow, aff, match_mm)
        for i, t in enumerate(targets, start=1):
            row[f"target{i}_viable_mm_{tp}"] = sum(f.viable_mm for f in follow if matched[f.label] == t.label)
        row[f"sum_mm_{tp}"] = sum(row[f"target{i}_viable_mm_{tp}"] for i in range(1, len(targets) + 1))
        new = [f for f in follow if matched[f.label] is None]
        qualifying = [f for f in new if f.longest_mm >= min_target_mm - REL_TOL and f.enhancing]
        row[f"new_lesion_mm_{tp}"] = max((f.longest_mm for f in new), default=0.0)
        row[f"new_lesion_{tp}"] = int(bool(qualifying))
    row["reason"] = ""
    row["notes"] = "; ".join(notes)
    return row


# ---------------------------------------------------------------------------- classification
def classify_response(baseline: float, nadir: float, current: float, new_lesion: bool = False) -> str:
    """mRECIST response of one follow-up from viable-diameter sums (mm); see module docstring."""
    if new_lesion:
        return "PD"
    if nadir > 0:
        if (current - nadir) / nadir >= PD_INCREASE - REL_TOL:
            return "PD"
    elif current > 0:
        return "PD"  # viable tumour reappearing after complete response
    if current == 0:
        return "CR"
    if (baseline - current) / baseline >= PR_DECREASE - REL_TOL:
        return "PR"
    return "SD"


def best_response(responses: list[str]) -> str:
    """Best of the responses in time order, up to and including the first PD; NA if none."""
    seen: list[str] = []
    for r in responses:
        if r in RESPONSES:
            seen.append(r)
            if r == "PD":
                break
    return min(seen, key=RESPONSES.index) if seen else "NA"


def _numeric(df: pd.DataFrame, column: str) -> pd.Series:
    raw = df[column]
    values = pd.to_numeric(raw, errors="coerce")
    bad = values.isna() & raw.notna() & (raw.astype(str).str.strip() != "")
    bad |= values < 0
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        pid = df["patient_id"].iloc[i]
        raise ValueError(f"row {i + 1} (patient_id {pid}): column {column} = {str(raw.iloc[i])!r}; "
                         f"expected a diameter in mm >= 0 or empty (not assessed)")
    return values.astype(float)


def classify_diameters(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``response_t1, response_t2, best_response`` (and ``reason``) to a diameters table.

    Needs ``patient_id`` and ``sum_mm_t0``; ``sum_mm_t1``/``sum_mm_t2`` (empty = not assessed) and
    ``new_lesion_t1``/``new_lesion_t2`` (0/1) are optional. Sums are of viable diameters in mm.
    """
    for col in ("patient_id", "sum_mm_t0"):
        if col not in df.columns:
            raise ValueError(f"diameters table lacks column {col!r}; found {list(df.columns)}; expected "
                             "patient_id, sum_mm_t0[, sum_mm_t1, sum_mm_t2, new_lesion_t1, new_lesion_t2]")
    out = df.copy()
    sums = {tp: _numeric(out, f"sum_mm_{tp}") if f"sum_mm_{tp}" in out else pd.Series(np.nan, index=out.index)
            for tp in TIMEPOINTS}
    news = {}
    for tp in _FOLLOW_UPS:
        col = f"new_lesion_{tp}"
        flag = pd.to_numeric(out[col], errors="coerce") if col in out else pd.Series(0.0, index=out.index)
        bad = ~flag.fillna(0).isin([0, 1])
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(f"row {i + 1} (patient_id {out['patient_id'].iloc[i]}): column {col} = "
                             f"{str(out[col].iloc[i])!r}; expected 0 or 1")
        news[tp] = flag.fillna(0).astype(bool)
    reasons = out["reason"].fillna("").astype(str).tolist() if "reason" in out else [""] * len(out)
    results: dict[str, list[str]] = {f"response_{tp}": [] for tp in _FOLLOW_UPS}
    best = []
    for n, i in enumerate(out.index):
        s0 = sums["t0"][i]
        if not (s0 > 0):
            for tp in _FOLLOW_UPS:
                results[f"response_{tp}"].append("NA")
            best.append("NA")
            if not reasons[n]:
                reasons[n] = f"baseline not measurable: sum_mm_t0 = {s0}"
            log.info("patient %s: mRECIST NA (%s)", out.at[i, "patient_id"], reasons[n])
            continue
        nadir = s0
        row = []
        for tp in _FOLLOW_UPS:
            s = sums[tp][i]
            r = "NA" if np.isnan(s) else classify_response(s0, nadir, s, bool(news[tp][i]))
            if not np.isnan(s):
                nadir = min(nadir, s)
            results[f"response_{tp}"].append(r)
            row.append(r)
        best.append(best_response(row))
    for col, values in results.items():
        out[col] = values
    out["best_response"] = best
    out["reason"] = reasons
    return out


# ---------------------------------------------------------------------------- cohort level
def _patients(cohort: Path, masks: Path) -> list[str]:
    """The cohort's patients: clinical.csv's ids in file order, else the folders under images/.

    Ids follow the one patient-id rule (:func:`analysis.cohort.check_patient_id`), since each names
    a folder: clinical.csv is read by :func:`analysis.clinical_table.read_clinical_table` (ids
    checked, no repeats, refusals naming the file row); a folder under images/ whose name breaks the
    rule is refused; hidden folders (``.name``) are not patients and are skipped.
    """
    clinical = cohort / "clinical.csv"
    if clinical.exists():
        return read_clinical_table(clinical, required=("patient_id",), typed=False)["patient_id"].tolist()
    folder = cohort / "images"
    if not folder.is_dir():
        raise FileNotFoundError(f"{cohort}: neither clinical.csv nor images/ found; expected a cohort folder")
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [check_patient_id(name, f"{folder / name} (a patient folder)") for name in names]


_ORDER = ["patient_id", "n_lesions_t0", "n_targets", "target1_longest_mm_t0", "target2_longest_mm_t0",
          *[f"target{i}_viable_mm_{tp}" for i in (1, 2) for tp in TIMEPOINTS],
          *[f"sum_mm_{tp}" for tp in TIMEPOINTS],
          *[f"{c}_{tp}" for tp in _FOLLOW_UPS for c in ("new_lesion_mm", "new_lesion")],
          *[f"response_{tp}" for tp in _FOLLOW_UPS], "best_response", "reason", "notes"]


def mrecist_from_masks(cohort: str | Path, masks: str | Path | None = None, k: float = DEFAULT_K,
                       shell_mm: float = DEFAULT_SHELL_MM, match_mm: float = DEFAULT_MATCH_MM,
                       min_viable_mm3: float = DEFAULT_MIN_VIABLE_MM3,
                       min_target_mm: float = MIN_TARGET_MM) -> pd.DataFrame:
    """mrecist.csv for every patient of a cohort (``masks`` defaults to ``<cohort>/labels``)."""
    cohort = Path(cohort)
    masks = Path(masks) if masks is not None else cohort / "labels"
    if not masks.is_dir():
        raise FileNotFoundError(f"masks folder {masks} not found; expected <masks>/<patient_id>/t0.nii.gz ...")
    rows = [measure_patient(cohort, masks, pid, k, shell_mm, match_mm, min_viable_mm3, min_target_mm)
            for pid in _patients(cohort, masks)]
    table = classify_diameters(pd.DataFrame(rows))
    return table[[c for c in _ORDER if c in table] + [c for c in table if c not in _ORDER]]


def waterfall_data(table: pd.DataFrame) -> pd.DataFrame:
    """patient_id, best_change_pct (the smallest follow-up viable sum against baseline, %),
    best_response; largest change first, patients without a baseline or follow-up sum left out."""
    s0 = pd.to_numeric(table["sum_mm_t0"], errors="coerce")
    follow = table[[c for c in ("sum_mm_t1", "sum_mm_t2") if c in table]].apply(pd.to_numeric, errors="coerce")
    change = follow.min(axis=1).sub(s0).div(s0).mul(100)
    data = pd.DataFrame({"patient_id": table["patient_id"], "best_change_pct": change,
                         "best_response": table["best_response"]}).dropna(subset=["best_change_pct"])
    return data.sort_values("best_change_pct", ascending=False).reset_index(drop=True)


def plot_waterfall(table: pd.DataFrame, ax=None):
    """Best % change of the viable sum from baseline per patient (bars coloured by best response),
    with the -30 % (PR) and +20 % (PD) thresholds dashed.

    Args:
        table: mrecist.csv's rows (sum_mm_t0, sum_mm_t1, sum_mm_t2, best_response); the bars are
            :func:`waterfall_data`'s.
        ax: Axes to draw on; None draws on a new figure sized to the number of patients.

    Returns:
        the Axes.
    """
    import matplotlib.pyplot as plt

    data = waterfall_data(table)
    colours = {"CR": "tab:green", "PR": "tab:blue", "SD": "tab:gray", "PD": "tab:red"}
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.0, 0.25 * len(data) + 2), 3.5))
    ax.bar(range(len(data)), data["best_change_pct"], color=[colours.get(r, "k") for r in data["best_response"]])
    ax.axhline(-30, ls="--", c="tab:blue", lw=0.8)
    ax.axhline(20, ls="--", c="tab:red", lw=0.8)
    ax.set_xticks(range(len(data)), data["patient_id"], rotation=90, fontsize=6)
    ax.set_ylabel("best change of viable sum (%)")
    ax.set_title("mRECIST waterfall (dashed: -30 % PR, +20 % PD)")
    return ax


def _read_diameters(path: Path) -> pd.DataFrame:
    """A --diameters table: the checks of :func:`analysis.clinical_table.read_clinical_table` (empty
    file, delimiter, patient_id and sum_mm_t0 columns, the patient-id rule, no repeated id, file rows
    in messages), then the numbers as pandas reads them."""
    if not path.exists():
        raise FileNotFoundError(f"diameters file {path} not found")
    ids = read_clinical_table(path, required=("patient_id", "sum_mm_t0"), typed=False)["patient_id"]
    frame = pd.read_csv(path, dtype={"patient_id": str})
    frame["patient_id"] = ids.to_numpy()
    return frame


def mrecist_cli(cohort: str | None = None, masks: str | None = None, out: str = "mrecist.csv",
                diameters: str | None = None, k: float = DEFAULT_K, shell_mm: float = DEFAULT_SHELL_MM,
                match_mm: float = DEFAULT_MATCH_MM, min_viable_mm3: float = DEFAULT_MIN_VIABLE_MM3,
                min_target_mm: float = MIN_TARGET_MM, figure: bool = True) -> str:
    """mRECIST per patient: from --cohort/--masks, or only classify --diameters FILE.

    Writes OUT (mrecist.csv) and, with --figure, figures/waterfall.png (+ tables/waterfall.csv)
    beside it. The measurement flags (--k to --min-target-mm) apply to --cohort only; the rules are in
    docs/mrecist.md.

    Args:
        cohort: cohort folder whose arterial-phase images/ are measured, with --masks.
        masks: folder of masks <masks>/<patient_id>/t0|t1|t2.nii.gz (0 background, 1 liver, 2 tumour);
            default <cohort>/labels.
        out: the mrecist.csv to write (per patient the viable sums, response at t1 and t2, best_response).
        diameters: CSV of measured viable-diameter sums to classify instead of measuring (patient_id,
            sum_mm_t0 and optionally sum_mm_t1, sum_mm_t2, new_lesion_t1, new_lesion_t2); wins over --cohort.
        k: viable tumour = voxels brighter than median + k x 1.4826 x MAD of the surrounding liver shell.
        shell_mm: width in mm of the liver shell around each lesion that is the reference intensity.
        match_mm: a follow-up lesion overlapping none belongs to the nearest baseline lesion within this (mm).
        min_viable_mm3: viable 3-D components smaller than this volume (mm^3) are discarded as noise.
        min_target_mm: smallest longest axial diameter (mm) of a target and of a qualifying new lesion;
            10 is the standard, change it only for scaled synthetic anatomy.
        figure: also draw the waterfall plot of the best change from baseline (--nofigure to skip it).
    """
    try:
        if diameters is not None:
            table = classify_diameters(_read_diameters(Path(diameters)))
        elif cohort is not None:
            table = mrecist_from_masks(cohort, masks, k=k, shell_mm=shell_mm, match_mm=match_mm,
                                       min_viable_mm3=min_viable_mm3, min_target_mm=min_target_mm)
        else:
            raise ValueError("give --cohort DIR [--masks DIR] or --diameters FILE")
    except (FileNotFoundError, ValueError) as exc:
        # one line on stderr, exit status 2 and nothing written, instead of a traceback
        raise usage_exit(f"mrecist: {exc}") from None
    write_csv(out, table)
    if figure and len(table):
        save_figure(Path(out).parent / "figures" / "waterfall.png", plot_waterfall(table).figure,
                    data=waterfall_data(table))
    counts = table["best_response"].value_counts().reindex([*RESPONSES, "NA"], fill_value=0)
    return f"{out}: " + ", ".join(f"{r} {n}" for r, n in counts.items())
