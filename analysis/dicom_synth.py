"""Synthetic DICOM series: a volume with its affine written as a classic MR series, and a
synthetic cohort exported the way a hospital's PACS would hand it over.

``python -m analysis synth-dicom --out DIR --patients 3`` writes::

    DIR/dicom/PAT<k>/STUDY<t>/SERIES<n>/<random>.dcm   one MR series per scan, files shuffled
    DIR/series.csv                                     patient_id,timepoint,series_uid
    DIR/clinical.csv                                   the synthetic cohort's clinical table

which ``python -m analysis import-dicom --dicom DIR/dicom --map DIR/series.csv --clinical
DIR/clinical.csv --out COHORT`` turns back into a cohort folder (README, "From PACS to a study").
The scans are those of :func:`analysis.synthetic.make_cohort` (same seed, same patients), each in
its own orientation with its small rotation (oblique), 5 mm slices, int16 scans stored as they are
and float32 scans as unsigned 12-bit values with a rescale slope and intercept. Each time point is
its own study (dates 4 weeks apart). The DICOM patient module holds made-up identity (a name, a
hospital id, a birth date) that the import must not carry into the cohort; ``Manufacturer`` is
:data:`SYNTHETIC_MANUFACTURER`, which the import reads as "synthetic" (cohort.json says so and the
study's report is labelled synthetic).

:func:`write_series` is the writer itself (the tests build their oblique LPS series with it).
Geometry: voxel ``(i, j, k)`` of the volume is pixel column ``i``, row ``j`` of slice ``k``; in LPS,
``ImageOrientationPatient`` = the affine's first two columns (unit), ``PixelSpacing`` = [row
spacing, column spacing] = [|column 1|, |column 0|], ``ImagePositionPatient`` of slice ``k`` = the
affine applied to ``(0, 0, k)``. NIfTI affines are RAS (nibabel): LPS = diag(-1, -1, 1) x RAS.
"""

from __future__ import annotations

import datetime
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from analysis.cohort import TIMEPOINTS

log = logging.getLogger(__name__)

__all__ = ["SYNTHETIC_MANUFACTURER", "RAS_TO_LPS", "write_series", "make_dicom_cohort", "synth_dicom_cli"]

#: Manufacturer of every series this module writes; import-dicom marks a cohort whose series all
#: carry it as synthetic
SYNTHETIC_MANUFACTURER = "hcc-tace-prognosis SYNTHETIC"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
#: NIfTI (RAS) <-> DICOM (LPS) patient coordinates: the first two axes change sign (its own inverse)
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: days between time points (t0 before TACE, t1 and t2 ~4 weeks after each TACE)
DAYS_BETWEEN = 28


def _ds(value: float) -> str:
    """A decimal string (VR DS, at most 16 characters) holding ``value`` as exactly as it fits."""
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(value))


def write_series(folder, volume, affine_ras, *, slope: float = 1.0, intercept: float = 0.0,
                 patient: dict | None = None, study: dict | None = None, series_uid: str | None = None,
                 series_number: int = 1, modality: str = "MR", manufacturer: str = SYNTHETIC_MANUFACTURER,
                 rng: np.random.Generator | None = None, positions=None, orientations=None,
                 description: str = "arterial phase") -> dict:
    """Write ``volume`` (stored integer values, ``(columns, rows, slices)``) as one DICOM series in ``folder``.

    ``affine_ras``: the volume's NIfTI affine (voxel -> RAS mm); the real values are
    ``stored * slope + intercept`` (``RescaleSlope``/``RescaleIntercept``). ``patient``: PatientName,
    PatientID, PatientBirthDate, PatientSex; ``study``: StudyInstanceUID, StudyDate, StudyTime,
    FrameOfReferenceUID (new UIDs where absent). ``rng`` shuffles the instance numbers' file names
    (random hex names); without it files are ``IM<k>.dcm`` in slice order. ``positions`` /
    ``orientations``: per-slice ImagePositionPatient / ImageOrientationPatient (LPS) replacing the
    affine's (the tests break a series with them). Returns the series' UIDs and file paths in slice order.
    """
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    vol = np.asarray(volume)
    if vol.ndim != 3 or not np.issubdtype(vol.dtype, np.integer):
        raise ValueError(f"volume: found {vol.ndim}-D {vol.dtype}; expected a 3-D integer array (stored values)")
    signed = bool(np.issubdtype(vol.dtype, np.signedinteger))
    lo, hi = (-32768, 32767) if signed else (0, 65535)
    if vol.size and (int(vol.min()) < lo or int(vol.max()) > hi):
        raise ValueError(f"volume: values {int(vol.min())}..{int(vol.max())} do not fit 16 bits")
    stored = vol.astype(np.int16 if signed else np.uint16)
    lps = RAS_TO_LPS @ np.asarray(affine_ras, dtype=np.float64)
    col_vec, row_vec = lps[:3, 0], lps[:3, 1]  # along i (columns), along j (rows)
    col_spacing, row_spacing = float(np.linalg.norm(col_vec)), float(np.linalg.norm(row_vec))
    iop = np.concatenate([col_vec / col_spacing, row_vec / row_spacing])
    patient = {"PatientName": "Synthetic^Patient", "PatientID": "SYN0000", "PatientBirthDate": "19600101",
               "PatientSex": "O", **(patient or {})}
    study = dict(study or {})
    study_uid = study.get("StudyInstanceUID") or generate_uid()
    frame_uid = study.get("FrameOfReferenceUID") or generate_uid()
    series_uid = series_uid or generate_uid()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = stored.shape[2]
    names = [f"IM{k + 1:04d}.dcm" for k in range(n)] if rng is None else \
        [f"{int(rng.integers(1 << 62)):016x}.dcm" for _ in range(n)]
    paths, sop_uids = [], []
    for k in range(n):
        position = lps[:3, :3] @ np.array([0.0, 0.0, float(k)]) + lps[:3, 3] if positions is None else positions[k]
        orientation = iop if orientations is None else orientations[k]
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE_STORAGE, sop_uid
        for key, value in patient.items():
            setattr(ds, key, value)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate = study.get("StudyDate", "20240101")
        ds.StudyTime = study.get("StudyTime", "090000")
        ds.SeriesDate, ds.SeriesTime = ds.StudyDate, ds.StudyTime
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.Modality, ds.Manufacturer = modality, manufacturer
        ds.ManufacturerModelName = "analysis.dicom_synth"
        ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = int(series_number), k + 1, 1
        ds.SeriesDescription = description
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "GR", "SP", ""
        ds.MRAcquisitionType, ds.EchoTime, ds.RepetitionTime = "3D", "1.5", "4.0"
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in orientation]
        ds.PixelSpacing = [_ds(row_spacing), _ds(col_spacing)]
        ds.SliceThickness = _ds(np.linalg.norm(lps[:3, 2]))
        ds.SliceLocation = _ds(float(np.dot(position, np.cross(orientation[:3], orientation[3:]))))
        ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), _ds(intercept)
        ds.RescaleType = "US"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1 if signed else 0
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = folder / names[k]
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        sop_uids.append(sop_uid)
    return {"series_uid": series_uid, "study_uid": study_uid, "frame_of_reference_uid": frame_uid,
            "sop_instance_uids": sop_uids, "paths": paths}


def _as_stored(data: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(stored integers, slope, intercept) for a scan: int16 as it is, float as 12-bit unsigned."""
    if np.issubdtype(data.dtype, np.integer):
        return data.astype(np.int16), 1.0, 0.0
    lo, hi = float(data.min()), float(data.max())
    # a slope of 4 significant digits keeps the DS exact, so real = stored * slope + intercept holds
    slope = float(f"{max(hi - lo, 1e-6) / 4095:.4g}")
    intercept = float(f"{lo:.6g}")
    stored = np.clip(np.round((data - intercept) / slope), 0, 65535).astype(np.uint16)
    return stored, slope, intercept


def make_dicom_cohort(out, n_patients: int = 3, shape: int = 64, seed: int = 2026, progress: bool = True) -> Path:
    """Write the synthetic cohort of ``(n_patients, shape, seed)`` as DICOM (module docstring); returns ``out``.

    ``out`` must be new or empty. Deterministic files except the UIDs (new ones each run).
    """
    import nibabel as nib
    import pandas as pd

    from analysis.io import write_bytes, write_csv
    from analysis.synthetic import make_cohort

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty folder; expected a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix=".synth-dicom-", dir=out.parent) as tmp:
        cohort = make_cohort(Path(tmp) / "cohort", n_patients=n_patients, shape=shape, seed=seed, progress=progress)
        staging = Path(tmp) / "out"
        clinical = pd.read_csv(cohort / "clinical.csv", dtype=str, keep_default_na=False)
        rows = []
        base = datetime.date(2024, 1, 8)
        for index, pid in enumerate(clinical["patient_id"]):
            age = int(clinical.loc[index, "age"])
            patient = {"PatientName": f"Synthetic^Patient{index + 1:03d}",
                       "PatientID": f"SYN{int(rng.integers(10**7, 10**8))}",
                       "PatientBirthDate": f"{base.year - age}0{1 + index % 9}15",
                       "PatientSex": clinical.loc[index, "sex"]}
            for t, tp in enumerate(TIMEPOINTS):
                img = nib.load(str(cohort / "images" / pid / f"{tp}.nii.gz"))
                stored, slope, intercept = _as_stored(np.asarray(img.dataobj))
                day = base + datetime.timedelta(days=DAYS_BETWEEN * t + 3 * index)
                written = write_series(staging / "dicom" / f"PAT{index + 1:03d}" / f"STUDY{t + 1}" / "SERIES1", stored,
                                       img.affine, slope=slope, intercept=intercept, patient=patient,
                                       study={"StudyDate": day.strftime("%Y%m%d")}, series_number=1 + t, rng=rng)
                rows.append({"patient_id": pid, "timepoint": tp, "series_uid": written["series_uid"]})
        write_csv(staging / "series.csv", pd.DataFrame(rows))
        write_bytes(staging / "clinical.csv", (cohort / "clinical.csv").read_bytes())
        if out.exists():
            out.rmdir()
        shutil.move(str(staging), str(out))
    log.info("wrote %d synthetic patients (%d DICOM series) to %s", n_patients, 3 * n_patients, out)
    return out


def synth_dicom_cli(out, patients: int = 3, shape: int = 64, seed: int = 2026) -> str:
    """Write a synthetic cohort as DICOM series, a series map and clinical.csv (import-dicom's input).

    OUT/dicom/ holds one MR series per scan (LPS, 5 mm slices, oblique, rescale slope and intercept on
    float scans, shuffled file names, made-up patient names and hospital ids), OUT/series.csv maps
    patient_id,timepoint to each SeriesInstanceUID and OUT/clinical.csv is the cohort's clinical table.

    Args:
        out: the folder to write; it must be new or empty.
        patients: number of patients, an integer >= 1.
        shape: in-plane matrix size S, an integer >= 16 (as python -m analysis synth).
        seed: generator seed (the scans of python -m analysis synth with the same seed).
    """
    from analysis.clinical_table import usage_exit
    from analysis.dicom_import import require_dicom
    from analysis.synthetic import check_args

    try:
        require_dicom("pydicom")
        check_args(patients, shape, seed, names=("--patients", "--shape", "--seed"))
        make_dicom_cohort(out, n_patients=patients, shape=shape, seed=seed)
    except (ValueError, FileExistsError) as exc:
        raise usage_exit(f"analysis synth-dicom: {exc}") from None
    return (f"synthetic DICOM: {patients} patients, {3 * patients} series -> {Path(out) / 'dicom'}; "
            f"map {Path(out) / 'series.csv'}, clinical {Path(out) / 'clinical.csv'}")
