"""DICOM series in, cohort folder out: ``python -m analysis import-dicom``.

``import-dicom --dicom DIR --map series.csv --clinical clinical.csv --out COHORT`` reads every
DICOM file under DIR once (headers only), picks each scan's series by the map (``patient_id,
timepoint`` and either ``series_uid``, a SeriesInstanceUID found anywhere under DIR, or ``folder``,
a folder under DIR holding one series), checks every series on its headers, and only then reads
pixels and writes the cohort folder of docs/contracts.md:

- ``images/<patient_id>/<tp>.nii.gz`` with the series' geometry: slices sorted by
  ImagePositionPatient projected on the slice normal (the cross product of the two
  ImageOrientationPatient vectors), voxel ``(i, j, k)`` = column ``i``, row ``j`` of the ``k``-th
  slice, the affine built from ImageOrientationPatient, PixelSpacing, the first slice's position
  and the slice step, converted from DICOM's LPS to NIfTI's RAS (first two rows negated), and
  ``RescaleSlope``/``RescaleIntercept`` applied per slice (int16 when every value is a whole number
  that fits, float32 otherwise);
- ``clinical.csv``, the given table after the checks of ``validate`` (its bytes unchanged);
- ``dicom_provenance.csv``: patient_id, timepoint, series_instance_uid, study_date, n_slices,
  spacing_x_mm, spacing_y_mm, spacing_z_mm (the NIfTI's voxel size), rows, columns,
  rescale_slope, rescale_intercept, image;
- ``dicom_series.json``: per scan the Study, Series and FrameOfReference UIDs and the
  SOPInstanceUIDs in the NIfTI's slice order, the record ``python -m analysis dicom-seg`` uses to
  reference the source images;
- ``cohort.json``: ``{"synthetic": ..., "source": "dicom", "importer": "analysis.dicom_import"}``
  (synthetic when every series comes from ``analysis.dicom_synth``).

Refusals are collected for every row and series before anything is read further, and reported
all at once (one line each, exit status 2, nothing written): a gap between slices larger than
:data:`GAP_FACTOR` x the median step, duplicate slice positions (two phases or acquisitions in one
series, say), slice positions off the slice normal, mixed orientations, image sizes or pixel
spacings within a series, a series that is not MR (or not single-frame MR Image Storage), fewer
than ``MIN_SCAN_VOXELS`` slices, pixel data pydicom cannot decode here or that is not MONOCHROME2,
a DICOM file under DIR whose header is unreadable or cut short, a patient without all three
time points, a series UID not found under DIR, a folder holding no or several series, map or
clinical rows that break the contracts. The cohort is written into a temporary folder beside
``--out``, checked by ``validate``, and renamed onto ``--out`` at the end.

Nothing identifying leaves the DICOM files: headers are read with a fixed list of tags that holds
no patient-module attribute (no name, id, birth date, sex, age, address, institution or accession
number), the ids of the cohort are the map's, and log lines carry counts and folder names only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from analysis.cohort import MIN_SCAN_VOXELS, TIMEPOINTS, Problem, check_patient_id

log = logging.getLogger(__name__)

__all__ = [
    "GAP_FACTOR",
    "IMPORTER",
    "SERIES_RECORD",
    "PROVENANCE",
    "Instance",
    "SeriesGeometry",
    "DicomImportError",
    "index_dicom",
    "series_geometry",
    "read_volume",
    "import_dicom",
    "import_dicom_cli",
    "require_dicom",
]

#: a step between consecutive slices larger than this times the median step is a gap (missing slices)
GAP_FACTOR = 1.5
#: two slices closer than this along the normal (mm) share a position
DUPLICATE_MM = 0.01
#: largest difference between two slices' direction cosines still read as one orientation
ORIENTATION_TOLERANCE = 1e-4
#: largest difference between two slices' pixel spacings (mm) still read as one spacing
SPACING_TOLERANCE_MM = 1e-3
#: largest distance of a slice position from the line through the first along the normal, as a
#: fraction of the smallest pixel spacing (a tilted or mixed stack has no NIfTI affine)
OFF_NORMAL_FRACTION = 0.1
#: the classic, one-image-per-file MR storage class this import reads
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
IMPORTER = "analysis.dicom_import"
SERIES_RECORD = "dicom_series.json"
PROVENANCE = "dicom_provenance.csv"
#: the only tags read from a header: geometry, identity of the series and instance, pixel format,
#: and StudyDate for the provenance table; no patient-module attribute is among them
HEADER_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
    "Modality", "Manufacturer", "StudyDate", "InstanceNumber", "AcquisitionNumber", "TemporalPositionIdentifier",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "NumberOfFrames",
    "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "RescaleSlope", "RescaleIntercept",
]
#: how many files or values a message lists before "..."
MAX_LISTED = 3


class DicomProblems(ValueError):
    """Every problem found, one per line; nothing was written."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def exit(self, out) -> SystemExit:
        """Print the problems on stderr, one a line, and return the SystemExit (status 2) to raise."""
        import sys

        for p in self.problems:
            print(p, file=sys.stderr)
        print(f"{len(self.problems)} problem(s): nothing written to {out}", file=sys.stderr)
        return SystemExit(2)


class DicomImportError(DicomProblems):
    """The series, the map or the clinical table cannot make a cohort."""


@dataclass(frozen=True)
class Instance:
    """The header fields of one DICOM file that the import uses (nothing identifying)."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    frame_uid: str
    modality: str
    manufacturer: str
    study_date: str
    instance_number: int | None
    acquisition: str
    temporal: str
    position: tuple | None
    orientation: tuple | None
    pixel_spacing: tuple | None
    rows: int | None
    columns: int | None
    frames: int
    samples: int
    photometric: str
    transfer_syntax: str
    slope: float
    intercept: float


@dataclass(frozen=True)
class SeriesGeometry:
    """A checked series: its instances in slice order and the NIfTI affine (RAS) of the volume."""

    instances: tuple[Instance, ...]
    affine_ras: np.ndarray
    shape: tuple[int, int, int]  # (columns, rows, slices)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(np.linalg.norm(self.affine_ras[:3, a])) for a in range(3))


def require_dicom(*modules: str) -> None:
    """ValueError saying how to install the ``dicom`` extra when one of ``modules`` is not importable."""
    import importlib.util

    missing = [m for m in modules or ("pydicom",) if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} not installed; expected the project's dicom extra: "
                         "pip install 'hcc-tace-prognosis[dicom]' (from the repository: pip install '.[dicom]'; "
                         "tox's envs have it)")


# ------------------------------------------------------------------------------------ reading
def _text(ds, name: str) -> str:
    value = ds.get(name)
    return "" if value is None else str(value).strip()


def _floats(ds, name: str, n: int) -> tuple | None:
    value = ds.get(name)
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _number(ds, name: str, default: float) -> float:
    value = ds.get(name)
    try:
        return default if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return float("nan")


def _frames(ds) -> int:
    value = _number(ds, "NumberOfFrames", 1.0)
    return int(value) if np.isfinite(value) else 0


def _instance(path: Path, ds) -> Instance:
    number = ds.get("InstanceNumber")
    try:
        number = int(number) if number not in (None, "") else None
    except (TypeError, ValueError):
        number = None
    meta = getattr(ds, "file_meta", None)
    return Instance(
        path=path, sop_class_uid=_text(ds, "SOPClassUID"), sop_instance_uid=_text(ds, "SOPInstanceUID"),
        study_uid=_text(ds, "StudyInstanceUID"), series_uid=_text(ds, "SeriesInstanceUID"),
        frame_uid=_text(ds, "FrameOfReferenceUID"), modality=_text(ds, "Modality"),
        manufacturer=_text(ds, "Manufacturer"), study_date=_text(ds, "StudyDate"), instance_number=number,
        acquisition=_text(ds, "AcquisitionNumber"), temporal=_text(ds, "TemporalPositionIdentifier"),
        position=_floats(ds, "ImagePositionPatient", 3), orientation=_floats(ds, "ImageOrientationPatient", 6),
        pixel_spacing=_floats(ds, "PixelSpacing", 2),
        rows=int(ds.Rows) if ds.get("Rows") is not None else None,
        columns=int(ds.Columns) if ds.get("Columns") is not None else None,
        frames=_frames(ds),
        samples=int(ds.get("SamplesPerPixel") or 1), photometric=_text(ds, "PhotometricInterpretation"),
        transfer_syntax=str(getattr(meta, "TransferSyntaxUID", "") or ""),
        slope=_number(ds, "RescaleSlope", 1.0), intercept=_number(ds, "RescaleIntercept", 0.0))


def index_dicom(folder: str | os.PathLike, progress: bool = False) -> tuple[dict[str, list[Instance]], list[Path]]:
    """(SeriesInstanceUID -> its instances, DICOM files whose header is unreadable) under ``folder``.

    Headers only. Files that are not DICOM (no ``DICM`` preamble) and DICOMDIR files are skipped,
    hidden files and folders too; a DICOM file whose header pydicom cannot parse or that holds no
    SeriesInstanceUID (every stored image has one: a file cut short, say) is in the second list.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    root = Path(folder)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".") and f.upper() != "DICOMDIR"]
    from tqdm.auto import tqdm

    series: dict[str, list[Instance]] = {}
    skipped, broken = 0, []
    for path in tqdm(files, desc="read DICOM headers", unit="file", disable=not progress or len(files) < 200):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
            inst = _instance(path, ds)
        except InvalidDicomError:  # no DICOM preamble: another kind of file
            skipped += 1
            continue
        except Exception:  # noqa: BLE001 - a DICOM file whose header pydicom cannot parse, whatever the error
            broken.append(path)
            continue
        if not inst.series_uid:
            meta = getattr(ds, "file_meta", None)
            if str(getattr(meta, "MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY:
                skipped += 1  # a DICOMDIR under another name
            else:
                broken.append(path)  # every stored image has one: a header cut short, say
            continue
        series.setdefault(inst.series_uid, []).append(inst)
    log.info("%s: %d DICOM file(s) in %d series (%d other file(s) skipped)", root, sum(map(len, series.values())),
             len(series), skipped)
    return series, broken


# ---------------------------------------------------------------------------------- geometry
def _listed(items, limit: int = MAX_LISTED) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _file(inst: Instance, root: Path | None) -> str:
    try:
        return str(inst.path.relative_to(root)) if root else inst.path.name
    except ValueError:
        return inst.path.name


def _decodable(transfer_syntax: str) -> str | None:
    """None when pydicom can decode pixel data of this transfer syntax here, else why not."""
    from pydicom.uid import UID

    uid = UID(transfer_syntax) if transfer_syntax else None
    if uid is None or not uid.is_compressed:
        return None
    try:
        from pydicom.pixels import get_decoder

        decoder = get_decoder(uid)
    except (NotImplementedError, ValueError) as exc:
        return f"no decoder for it ({exc})"
    if decoder.is_available:
        return None
    return "its decoder needs " + "; ".join(decoder.missing_dependencies)


def series_geometry(instances: list[Instance], where: str, root: Path | None = None
                    ) -> tuple[list[Problem], SeriesGeometry | None]:
    """Check one series on its headers and sort it; (problems, geometry) with geometry None on any problem.

    ``where`` names the series in the problems (the map row); ``root`` makes file names relative to it.
    """
    problems: list[Problem] = []

    def add(field: str, found: str, expected: str) -> None:
        problems.append(Problem(where, field, found, expected))

    modalities = Counter(i.modality or "empty" for i in instances)
    if set(modalities) != {"MR"}:
        add("Modality", _listed(f"{m!r} ({n} file(s))" for m, n in modalities.items()),
            "'MR' (arterial-phase MRI) in every file of the series")
    classes = Counter(i.sop_class_uid for i in instances)
    if set(classes) != {MR_IMAGE_STORAGE} and set(modalities) == {"MR"}:
        multi = sum(n for c, n in classes.items() if c.startswith(MR_IMAGE_STORAGE + "."))
        add("SOPClassUID", _listed(f"{c or 'empty'} ({n} file(s))" for c, n in classes.items())
            + (" (enhanced / multi-frame MR)" if multi else ""),
            f"MR Image Storage ({MR_IMAGE_STORAGE}), one image per file: export the series as classic MR images")
    frames = sorted({i.frames for i in instances})
    if frames != [1] and set(classes) == {MR_IMAGE_STORAGE}:
        add("NumberOfFrames", _listed(frames), "1 (one image per file)")
    formats = Counter((i.samples, i.photometric) for i in instances)
    bad_format = [f for f in formats if f[0] != 1 or f[1] != "MONOCHROME2"]
    if bad_format:
        add("pixel format", _listed(f"SamplesPerPixel {s}, {p or 'no PhotometricInterpretation'}" for s, p in bad_format),
            "grey-level images, higher values brighter (SamplesPerPixel 1, MONOCHROME2)")
    for syntax in sorted({i.transfer_syntax for i in instances}):
        why = _decodable(syntax)
        if why:
            add("TransferSyntaxUID", f"{syntax} (compressed; {why})",
                "pixel data pydicom can decode here: install that package, or decompress the series "
                "(e.g. gdcmconv --raw, dcmdjpeg) before the import")
    missing = {name: sum(getattr(i, attr) is None for i in instances) for name, attr in (
        ("ImagePositionPatient", "position"), ("ImageOrientationPatient", "orientation"),
        ("PixelSpacing", "pixel_spacing"), ("Rows", "rows"), ("Columns", "columns"))}
    for name, count in missing.items():
        if count:
            add(name, f"missing or unreadable in {count} of {len(instances)} file(s)", "a value in every file")
    rescale_bad = sum(not (np.isfinite(i.slope) and np.isfinite(i.intercept) and i.slope != 0) for i in instances)
    if rescale_bad:
        add("RescaleSlope/RescaleIntercept", f"unreadable or a zero slope in {rescale_bad} file(s)",
            "numbers (slope not 0), or both absent (1 and 0)")
    if problems:
        return problems, None

    sizes = Counter((i.rows, i.columns) for i in instances)
    if len(sizes) > 1:
        add("image size", "mixed: " + _listed(f"{r} x {c} ({n} file(s))" for (r, c), n in sizes.most_common()),
            "one Rows x Columns for every slice of the series")
    iops = np.array([i.orientation for i in instances])
    first = iops[0]
    if np.max(np.abs(iops - first)) > ORIENTATION_TOLERANCE:
        distinct = []
        for v in iops:
            if not any(np.max(np.abs(v - d)) <= ORIENTATION_TOLERANCE for d in distinct):
                distinct.append(v)
        add("ImageOrientationPatient", f"mixed: {len(distinct)} orientations ("
            + _listed("[" + ", ".join(f"{x:.4g}" for x in d) + "]" for d in distinct) + ")",
            "one orientation for every slice of the series (a localiser or a reformat mixed in?)")
    spacings = np.array([i.pixel_spacing for i in instances])
    if np.max(np.abs(spacings - spacings[0])) > SPACING_TOLERANCE_MM:
        add("PixelSpacing", "mixed: " + _listed(sorted({f"{a:g} x {b:g}" for a, b in spacings})),
            "one pixel spacing for every slice of the series")
    row_dir, col_dir = first[:3], first[3:]
    if abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3 \
            or abs(float(np.dot(row_dir, col_dir))) > 1e-3:
        add("ImageOrientationPatient", "[" + ", ".join(f"{x:.4g}" for x in first) + "] (not two orthogonal unit vectors)",
            "two orthogonal unit direction cosines")
    if problems:
        return problems, None

    row_dir, col_dir = row_dir / np.linalg.norm(row_dir), col_dir / np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)
    positions = np.array([i.position for i in instances])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    ordered = [instances[k] for k in order]
    n = len(ordered)
    rows, columns = ordered[0].rows, ordered[0].columns
    steps = np.diff(along)
    dup = np.flatnonzero(steps < DUPLICATE_MM)
    if dup.size:
        pairs = [f"{along[k]:.2f} mm ({_file(ordered[k], root)} and {_file(ordered[k + 1], root)})" for k in dup]
        hint = []
        for label, attr in (("AcquisitionNumber", "acquisition"), ("TemporalPositionIdentifier", "temporal")):
            values = sorted({getattr(i, attr) for i in instances} - {""})
            if len(values) > 1:
                hint.append(f"{len(values)} {label} values")
        add("slice positions", f"{dup.size} duplicate position(s) along the slice normal at " + _listed(pairs)
            + (f"; the series holds {' and '.join(hint)}" if hint else ""),
            "one slice per position: a series of one phase and one acquisition (several phases in one series? "
            "export the arterial phase alone)")
    if n < MIN_SCAN_VOXELS:
        add("slices", f"{n} slice(s)", f"at least {MIN_SCAN_VOXELS} slices (a volume, not a localiser)")
    if min(rows, columns) < MIN_SCAN_VOXELS:
        add("image size", f"{rows} x {columns}", f"at least {MIN_SCAN_VOXELS} x {MIN_SCAN_VOXELS} pixels")
    if problems:
        return problems, None

    median = float(np.median(steps))
    gaps = np.flatnonzero(steps > GAP_FACTOR * median)
    if gaps.size:
        add("slice positions", f"{gaps.size} gap(s): " + _listed(
            f"{steps[k]:.2f} mm between {along[k]:.2f} and {along[k + 1]:.2f} mm" for k in gaps)
            + f" (median step {median:.2f} mm)",
            f"steps at most {GAP_FACTOR} x the median step (missing slices? export the whole series)")
    off = positions - positions[0] - np.outer(along - along[0], normal)
    drift = float(np.max(np.linalg.norm(off, axis=1)))
    if drift > OFF_NORMAL_FRACTION * float(np.min(spacings[0])):
        add("slice positions", f"positions off the slice normal by up to {drift:.2f} mm (a tilted or mixed stack)",
            f"positions on one line along the normal (within {OFF_NORMAL_FRACTION} x the pixel spacing)")
    if problems:
        return problems, None

    row_spacing, col_spacing = spacings[0]  # DICOM: [between rows, between columns]
    step = (along[-1] - along[0]) / (n - 1)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing   # along a row: i, the column index
    lps[:3, 1] = col_dir * row_spacing   # down a column: j, the row index
    lps[:3, 2] = normal * step
    lps[:3, 3] = positions[0]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return [], SeriesGeometry(tuple(ordered), ras, (int(columns), int(rows), n))


def read_volume(geometry: SeriesGeometry) -> tuple[np.ndarray, str, str]:
    """The series' voxels ``(columns, rows, slices)`` with each slice's rescale applied.

    Returns (array, rescale slope, rescale intercept) with the two as text (one value, or
    "per slice" when they differ between slices). The array is int16 when every value is a whole
    number within int16, float32 otherwise. Raises ValueError naming the file it cannot read.
    """
    import pydicom

    out = np.empty(geometry.shape, dtype=np.float64)
    for k, inst in enumerate(geometry.instances):
        try:
            ds = pydicom.dcmread(inst.path)
            pixels = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - pydicom and its decoders raise many types
            raise ValueError(f"{inst.path.name}: pixel data unreadable ({type(exc).__name__}: {exc})") from None
        if pixels.shape != geometry.shape[1::-1]:
            raise ValueError(f"{inst.path.name}: pixel data of shape {pixels.shape}; expected "
                             f"{geometry.shape[1]} x {geometry.shape[0]} (Rows x Columns)")
        out[:, :, k] = pixels.T.astype(np.float64) * inst.slope + inst.intercept
    whole = np.all(out == np.round(out)) and out.min() >= -32768 and out.max() <= 32767
    slopes = {i.slope for i in geometry.instances}
    intercepts = {i.intercept for i in geometry.instances}
    slope = f"{slopes.pop():g}" if len(slopes) == 1 else "per slice"
    intercept = f"{intercepts.pop():g}" if len(intercepts) == 1 else "per slice"
    return out.astype(np.int16 if whole else np.float32), slope, intercept


# -------------------------------------------------------------------------------- the map
def _read_map(path: Path, dicom: Path, series: dict[str, list[Instance]]
              ) -> tuple[list[Problem], list[dict], dict[str, set[str]]]:
    """(problems, rows, declared) of series.csv: its usable rows as dicts (patient_id, timepoint,
    where, instances, row) and the time points each patient has a row for (usable or not)."""
    from analysis.clinical_table import TableInputError, read_checked_csv

    try:
        frame = read_checked_csv(path)
    except TableInputError as exc:
        return [Problem(str(path), "file", str(exc).replace(f"{path}: ", ""), "series.csv as in docs/contracts.md")], [], {}
    name = path.name
    problems: list[Problem] = []
    missing = [c for c in ("patient_id", "timepoint") if c not in frame.columns]
    if missing or not {"series_uid", "folder"} & set(frame.columns):
        need = missing + ([] if {"series_uid", "folder"} & set(frame.columns) else ["series_uid or folder"])
        return [Problem(f"{name} row 1 (header)", "columns", f"no {', '.join(need)} (found: "
                        f"{', '.join(map(str, frame.columns))})",
                        "patient_id, timepoint and series_uid (a SeriesInstanceUID) or folder (under --dicom)")], [], {}
    by_folder: dict[str, list[Instance]] = {}
    if "folder" in frame.columns:
        for items in series.values():
            for inst in items:
                by_folder.setdefault(str(inst.path.parent), []).append(inst)
    rows: list[dict] = []
    declared: dict[str, set[str]] = {}
    seen: dict[tuple, int] = {}
    used: dict[str, int] = {}
    root = dicom.resolve()
    for pos, record in enumerate(frame.to_dict(orient="records")):
        row = pos + 2
        pid = str(record["patient_id"]).strip()
        tp = str(record["timepoint"]).strip()
        uid = str(record.get("series_uid", "") or "").strip()
        folder = str(record.get("folder", "") or "").strip()
        where = f"{name} row {row}"
        try:
            check_patient_id(pid, where)
        except ValueError:
            problems.append(Problem(where, "patient_id", repr(pid) if pid else "an empty id",
                                    "letters, digits, '_' or '-' only: the study's id (it names a folder), "
                                    "never the hospital's"))
            continue
        if tp not in TIMEPOINTS:
            problems.append(Problem(where, "timepoint", repr(tp), "one of " + ", ".join(TIMEPOINTS)))
            continue
        declared.setdefault(pid, set()).add(tp)
        where = f"{name} row {row} ({pid} {tp})"
        if (pid, tp) in seen:
            problems.append(Problem(where, "patient_id, timepoint", f"{pid} {tp} again (first on row {seen[pid, tp]})",
                                    "one row per patient and time point"))
            continue
        seen[pid, tp] = row
        if bool(uid) == bool(folder):
            problems.append(Problem(where, "series_uid / folder", "both given" if uid else "neither given",
                                    "exactly one of them"))
            continue
        if uid:
            where = f"{where}, series {uid}"
            instances = series.get(uid)
            if not instances:
                problems.append(Problem(where, "series_uid", f"not found under {dicom} ({len(series)} series there)",
                                        "the SeriesInstanceUID of a series whose files are under --dicom"))
                continue
        else:
            where = f"{where}, folder {folder}"
            target = (dicom / folder).resolve()
            if target != root and root not in target.parents:
                problems.append(Problem(where, "folder", f"resolves to {target}, outside {root}",
                                        "a folder under --dicom"))
                continue
            if not target.is_dir():
                problems.append(Problem(where, "folder", "no such folder", f"a folder under {dicom} holding one series"))
                continue
            instances = [i for p, items in by_folder.items() if Path(p).resolve() == target
                         or target in Path(p).resolve().parents for i in items]
            uids = sorted({i.series_uid for i in instances})
            if not uids:
                problems.append(Problem(where, "folder", "no DICOM file", "a folder holding one series"))
                continue
            if len(uids) > 1:
                problems.append(Problem(where, "folder", f"{len(uids)} series (SeriesInstanceUIDs {_listed(uids)})",
                                        "a folder holding one series (give series_uid to pick one)"))
                continue
            uid = uids[0]
            where = f"{where}, series {uid}"
        if uid in used:
            problems.append(Problem(where, "series", f"the series of row {used[uid]} again",
                                    "a different series for each patient and time point"))
            continue
        used[uid] = row
        rows.append({"patient_id": pid, "timepoint": tp, "where": where, "instances": instances, "row": row})
    return problems, rows, declared


def _time_points(map_name: str, declared: dict[str, set[str]], clinical_ids: list[str] | None,
                 clinical_name: str) -> list[Problem]:
    """A patient of the map without all three time points, a patient of clinical.csv without a row
    in the map, a patient of the map not in clinical.csv."""
    problems: list[Problem] = []
    for pid, have in declared.items():
        missing = [tp for tp in TIMEPOINTS if tp not in have]
        if missing:
            problems.append(Problem(f"{map_name} patient {pid}", "time point" + ("s" if len(missing) > 1 else ""),
                                    f"{', '.join(missing)} missing (rows for {', '.join(sorted(have))} only)",
                                    "a row for each of t0, t1, t2 (docs/contracts.md: all three are required)"))
    if clinical_ids is not None:
        for pid in clinical_ids:
            if pid not in declared:
                problems.append(Problem(f"{clinical_name} patient {pid}", "time points", f"no row in {map_name}",
                                        "rows for t0, t1 and t2 of every patient of clinical.csv"))
        known = set(clinical_ids)
        for pid in declared:
            if pid not in known:
                problems.append(Problem(f"{map_name} patient {pid}", "patient_id", f"{pid!r} not in {clinical_name}",
                                        "a patient_id of clinical.csv"))
    return problems


# ---------------------------------------------------------------------------------- output
def _check_out(out: Path) -> list[Problem]:
    if not out.exists():
        return []
    if not out.is_dir():
        return [Problem(str(out), "--out", "a file", "a new folder, an empty one or an earlier import-dicom cohort")]
    if not any(out.iterdir()):
        return []
    meta = out / "cohort.json"
    try:
        earlier = json.loads(meta.read_text()).get("importer") == IMPORTER if meta.is_file() else False
    except (OSError, ValueError, AttributeError):
        earlier = False
    if not earlier:
        return [Problem(str(out), "--out", "a folder that is not empty and holds no earlier import",
                        "a new folder, an empty one or an earlier import-dicom cohort (replaced)")]
    return []


def _replace(staging: Path, out: Path) -> None:
    """Rename ``staging`` onto ``out``; an earlier ``out`` is moved aside first and then removed."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "cohort")
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def import_dicom(dicom, map, clinical, out, progress: bool = True) -> Path:  # noqa: A002 - the flag is --map
    """Import the mapped DICOM series as a cohort folder (module docstring); returns ``out``.

    Raises :class:`DicomImportError` listing every problem; nothing is written then.
    """
    import pandas as pd

    from analysis.cohort import validate_clinical, validate_cohort
    from analysis.io import path_under, save_nifti, write_bytes, write_csv, write_json

    dicom, map_path, clinical, out = Path(dicom), Path(map), Path(clinical), Path(out)
    problems: list[Problem] = []
    if not dicom.is_dir():
        raise DicomImportError([Problem(str(dicom), "--dicom", "no such folder", "the folder holding the DICOM files")])
    problems += _check_out(out)
    clinical_ids: list[str] | None = None
    if not clinical.is_file():
        problems.append(Problem(str(clinical), "--clinical", "no such file", "clinical.csv (docs/contracts.md)"))
    else:
        clinical_problems, clinical_ids = validate_clinical(clinical)
        problems += clinical_problems
    series, broken = index_dicom(dicom, progress=progress)
    # its series is unknown, and a slice of a mapped series may be among them
    problems += [Problem(str(path), "DICOM header", "unreadable or cut short (no SeriesInstanceUID)",
                         "a complete DICOM file, or no such file under --dicom") for path in broken]
    if not map_path.is_file():
        problems.append(Problem(str(map_path), "--map", "no such file", "series.csv: patient_id,timepoint,series_uid|folder"))
        rows = []
    else:
        map_problems, rows, declared = _read_map(map_path, dicom, series)
        problems += map_problems
        if not map_problems or declared:
            problems += _time_points(map_path.name, declared, clinical_ids, clinical.name)
    geometries: dict[tuple[str, str], SeriesGeometry] = {}
    root = dicom.resolve()
    for r in rows:
        series_problems, geometry = series_geometry(r["instances"], r["where"], root=root)
        problems += series_problems
        if geometry is not None:
            geometries[r["patient_id"], r["timepoint"]] = geometry
    if problems:
        raise DicomImportError(problems)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.import-", dir=out.parent))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700; the cohort gets a plain mkdir's mode
    try:
        provenance, record = [], []
        from tqdm.auto import tqdm

        for r in tqdm(rows, desc="import series", unit="series", disable=not progress):
            pid, tp = r["patient_id"], r["timepoint"]
            geometry = geometries[pid, tp]
            try:
                volume, slope, intercept = read_volume(geometry)
            except ValueError as exc:
                problems.append(Problem(r["where"], "pixel data", str(exc), "pixel data of every file readable"))
                continue
            image = path_under(staging, "images", pid, f"{tp}.nii.gz")
            save_nifti(image, volume, geometry.affine_ras, dtype=volume.dtype)
            first = geometry.instances[0]
            sx, sy, sz = geometry.spacing
            provenance.append({"patient_id": pid, "timepoint": tp, "series_instance_uid": first.series_uid,
                               "study_date": first.study_date, "n_slices": geometry.shape[2],
                               "spacing_x_mm": round(sx, 6), "spacing_y_mm": round(sy, 6), "spacing_z_mm": round(sz, 6),
                               "rows": geometry.shape[1], "columns": geometry.shape[0], "rescale_slope": slope,
                               "rescale_intercept": intercept, "image": f"images/{pid}/{tp}.nii.gz"})
            record.append({"patient_id": pid, "timepoint": tp, "image": f"images/{pid}/{tp}.nii.gz",
                           "study_instance_uid": first.study_uid, "series_instance_uid": first.series_uid,
                           "frame_of_reference_uid": first.frame_uid,
                           "sop_class_uid": first.sop_class_uid,
                           "sop_instance_uids": [i.sop_instance_uid for i in geometry.instances],
                           "affine_ras": geometry.affine_ras.round(6).tolist()})
        if problems:
            raise DicomImportError(problems)
        write_bytes(staging / "clinical.csv", clinical.read_bytes())
        write_csv(staging / PROVENANCE, pd.DataFrame(provenance))
        write_json(staging / SERIES_RECORD, {"importer": IMPORTER, "version": 1, "scans": record})
        synthetic = bool(rows) and all(i.manufacturer == _synthetic_manufacturer()
                                       for g in geometries.values() for i in g.instances)
        write_json(staging / "cohort.json", {"synthetic": synthetic, "source": "dicom", "importer": IMPORTER,
                                             "series_record": SERIES_RECORD, "provenance": PROVENANCE})
        final = validate_cohort(staging, progress=False)
        if final:
            raise DicomImportError(final)
        _replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("imported %d series of %d patients into %s", len(rows), len({r['patient_id'] for r in rows}), out)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _synthetic_manufacturer() -> str:
    from analysis.dicom_synth import SYNTHETIC_MANUFACTURER

    return SYNTHETIC_MANUFACTURER


def import_dicom_cli(dicom: str, map: str, clinical: str, out: str, quiet: bool = False) -> str:  # noqa: A002
    """Import a hospital's DICOM series as a cohort folder: NIfTI with the series' geometry, provenance.

    Every series is checked on its headers before any pixel is read (gaps over 1.5x the median slice
    step, duplicate positions, mixed orientations or image sizes, not MR, a missing time point, a
    series UID not under --dicom, ...); every problem is listed at once on stderr, one line each, and
    the command exits with status 2 having written nothing. Patient names, hospital ids and other
    identifying tags never reach the cohort: its ids are the map's.

    Args:
        dicom: the folder holding the DICOM files (searched recursively, any layout).
        map: series.csv with the columns patient_id,timepoint (t0, t1, t2) and series_uid (a SeriesInstanceUID
            under --dicom) or folder (a folder under --dicom holding one series), one row per scan.
        clinical: clinical.csv of the patients (docs/contracts.md), checked as validate does and copied in.
        out: the cohort folder to write; new, empty or an earlier import (replaced at the end, in one rename).
        quiet: no progress bars.
    """
    from analysis.flags import as_bool

    try:
        require_dicom("pydicom")
        path = import_dicom(dicom, map, clinical, out, progress=not as_bool(quiet, "quiet"))
    except DicomImportError as exc:
        raise exc.exit(out) from None
    except ValueError as exc:
        from analysis.clinical_table import usage_exit

        raise usage_exit(f"analysis import-dicom: {exc}") from None
    n = len(json.loads((path / SERIES_RECORD).read_text())["scans"])
    return f"imported {n} series -> {path} (provenance: {path / PROVENANCE})"
