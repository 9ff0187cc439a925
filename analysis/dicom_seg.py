"""Masks of DICOM-imported scans as DICOM Segmentation objects: ``python -m analysis dicom-seg``.

``dicom-seg --masks DIR --cohort COHORT --dicom DICOM --out SEGDIR`` takes label maps of the
masks layout (docs/contracts.md: ``<masks>/<patient_id>/<tp>.nii.gz``, 0 background, 1 liver,
2 tumour, on the grid of the cohort's image; hcc_liver_seg inference and the study's
``segmentation_inference/`` and ``masks/`` folders write them) and writes, per scan, one DICOM
Segmentation (highdicom, BINARY) to ``SEGDIR/<patient_id>/<tp>.dcm``:

- segment 1 "Liver": category SCT 91723000 "Anatomical Structure", type SCT 10200004 "Liver";
  segment 2 "Tumour": category SCT 49755003 "Morphologically Abnormal Structure", type
  SCT 108369006 "Neoplasm", anatomic region SCT 10200004 "Liver" (the codes of DICOM CID 7150 /
  7151 as pydicom ships them); algorithm type AUTOMATIC, identified as the bundle (name and
  version of its configs/metadata.json), family DCM 123110 "Artificial Intelligence";
- on the source series' geometry: one frame per source slice holding a segment (empty frames left
  out), each frame placed by the source slice's ImagePositionPatient and referencing that slice's
  SOPInstanceUID; the object references the source series (ReferencedSeriesSequence) and takes its
  patient and study from the source images, so a PACS files it beside them.

The source images are found again under ``--dicom`` through the cohort's ``dicom_series.json``
(written by ``import-dicom``): the series must still be there with the same instances in the same
slice order and geometry. Only scans of a DICOM import are accepted: a mask with no row in that
record (a NIfTI-sourced scan) is refused, and so is a mask whose shape or affine is not its
image's, or with values other than 0, 1, 2. Every problem is listed at once (exit 2) before
anything is written; the objects are written into a temporary folder beside ``--out`` and moved
into it at the end. ``SEGDIR/segmentations.csv`` lists what was written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from analysis.cohort import AFFINE_TOLERANCE_MM, TIMEPOINTS, Problem, find_scan, is_patient_id
from analysis.dicom_import import DicomProblems

log = logging.getLogger(__name__)

__all__ = ["SEGMENT_LABELS", "segment_descriptions", "write_dicom_segs", "dicom_seg_cli"]

#: label value -> segment label; the label value is the segment number
SEGMENT_LABELS: dict[int, str] = {1: "Liver", 2: "Tumour"}
#: SeriesNumber of the Segmentation series
SEG_SERIES_NUMBER = 901
MANUFACTURER = "hcc-tace-prognosis"
INDEX = "segmentations.csv"


class DicomSegError(DicomProblems):
    """The masks, the cohort or the source series cannot make Segmentation objects."""


def segment_descriptions(algorithm: str, version: str) -> list:
    """highdicom SegmentDescriptions of the two segments (module docstring)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    identification = hd.AlgorithmIdentificationSequence(name=algorithm, version=version,
                                                        family=codes.cid7162.ArtificialIntelligence)
    return [
        hd.seg.SegmentDescription(1, SEGMENT_LABELS[1], codes.cid7150.AnatomicalStructure, codes.SCT.Liver,
                                  hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, identification),
        hd.seg.SegmentDescription(2, SEGMENT_LABELS[2], codes.cid7150.MorphologicallyAbnormalStructure,
                                  codes.SCT.Neoplasm, hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, identification,
                                  anatomic_regions=[codes.SCT.Liver]),
    ]


def _bundle_version(bundle: str | os.PathLike | None) -> tuple[str, str]:
    """(name, version) of the segmentation bundle: its configs/metadata.json, else ("hcc_liver_seg", "unknown")."""
    folder = Path(bundle) if bundle else None
    if folder is None:
        try:
            from analysis.study import find_bundles

            folder = find_bundles() / "hcc_liver_seg"
        except FileNotFoundError:
            return "hcc_liver_seg", "unknown"
    try:
        meta = json.loads((folder / "configs" / "metadata.json").read_text())
        return str(meta.get("name") or folder.name).replace(" ", "_")[:64], str(meta.get("version", "unknown"))
    except (OSError, ValueError):
        return folder.name, "unknown"


def _masks(masks: Path) -> tuple[list[tuple[str, str, Path]], list[Problem]]:
    """(patient_id, tp, path) of every mask under ``masks`` (folders holding a t0/t1/t2 file)."""
    found, problems = [], []
    for folder in sorted(p for p in masks.iterdir() if p.is_dir() and not p.name.startswith(".")):
        scans = [(tp, find_scan(masks, folder.name, tp)) for tp in TIMEPOINTS]
        scans = [(tp, p) for tp, p in scans if p is not None]
        if not scans:
            continue  # not a patient folder (agreement/, say)
        if not is_patient_id(folder.name):
            problems.append(Problem(str(folder), "folder name", repr(folder.name),
                                    "a patient id (letters, digits, '_' or '-')"))
            continue
        found += [(folder.name, tp, p) for tp, p in scans]
    return found, problems


def _check_mask(path: Path, image: Path, record: dict, where: str) -> tuple[list[Problem], np.ndarray | None]:
    import nibabel as nib

    try:
        mask_img = nib.load(str(path))
        mask = np.asanyarray(mask_img.dataobj)
        image_img = nib.load(str(image))
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a bad file
        return [Problem(where, "file", f"unreadable ({type(exc).__name__}: {exc})", "a NIfTI mask and its image")], None
    problems = []
    if mask.shape != image_img.shape:
        problems.append(Problem(where, "shape", str(mask.shape),
                                f"{image_img.shape}, the shape of {image} (masks on the image's grid)"))
    for name, affine in (("the image's", image_img.affine), ("the imported series'", np.asarray(record["affine_ras"]))):
        diff = float(np.max(np.abs(np.asarray(mask_img.affine) - affine)))
        if diff > AFFINE_TOLERANCE_MM:
            problems.append(Problem(where, "affine", f"differs from {name} by up to {diff:.4g} mm",
                                    f"{name} affine within {AFFINE_TOLERANCE_MM} mm (masks on the image's grid)"))
    if not problems:
        values = sorted(np.unique(mask).tolist())
        extra = [v for v in values if v not in (0, 1, 2)]
        if extra:
            problems.append(Problem(where, "label values", ", ".join(f"{v:g}" for v in extra[:5]),
                                    "only 0 (background), 1 (liver), 2 (tumour)"))
    return problems, (None if problems else mask.astype(np.uint8))


def _sources(record: dict, series: dict, where: str, root: Path) -> tuple[list[Problem], list | None]:
    """The record's source instances found again under --dicom, in the record's slice order."""
    from analysis.dicom_import import series_geometry

    uid = record["series_instance_uid"]
    found = {i.sop_instance_uid: i for i in series.get(uid, [])}
    wanted = record["sop_instance_uids"]
    missing = [u for u in wanted if u not in found]
    if missing:
        return [Problem(where, "source images", f"{len(missing)} of the series' {len(wanted)} images not found under "
                        f"{root} (series {uid})", "the DICOM folder the cohort was imported from")], None
    problems, geometry = series_geometry([found[u] for u in wanted], f"{where} (source series {uid})", root=root)
    if geometry is None:
        return problems, None
    order = [i.sop_instance_uid for i in geometry.instances]
    diff = float(np.max(np.abs(geometry.affine_ras - np.asarray(record["affine_ras"]))))
    if order != wanted or diff > AFFINE_TOLERANCE_MM:
        return [Problem(where, "source images", f"series {uid} under {root} differs from the imported one "
                        f"(slice order {'same' if order == wanted else 'changed'}, affine off by {diff:.3g} mm)",
                        "the series as it was imported")], None
    return [], list(geometry.instances)


def write_dicom_segs(masks, cohort, dicom, out, bundle=None, progress: bool = True) -> list[Path]:
    """One DICOM Segmentation per mask of a DICOM-imported scan (module docstring); returns the files.

    Raises :class:`DicomSegError` listing every problem; nothing is written then.
    """
    import highdicom as hd
    import pandas as pd
    import pydicom

    from analysis.dicom_import import SERIES_RECORD, index_dicom
    from analysis.io import path_under, write_csv

    masks, cohort, dicom, out = Path(masks), Path(cohort), Path(dicom), Path(out)
    problems: list[Problem] = []
    for flag, folder in (("--masks", masks), ("--cohort", cohort), ("--dicom", dicom)):
        if not folder.is_dir():
            problems.append(Problem(str(folder), flag, "no such folder", "an existing folder"))
    if out.exists() and not out.is_dir():
        problems.append(Problem(str(out), "--out", "a file", "a folder (new or existing)"))
    if problems:
        raise DicomSegError(problems)
    record_path = cohort / SERIES_RECORD
    if not record_path.is_file():
        raise DicomSegError([Problem(str(cohort), SERIES_RECORD, "no such file: its scans were not imported from DICOM",
                                     "a cohort written by python -m analysis import-dicom (DICOM-SEG is written "
                                     "only for DICOM-sourced scans; NIfTI masks stay the default)")])
    try:
        records = {(r["patient_id"], r["timepoint"]): r for r in json.loads(record_path.read_text())["scans"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DicomSegError([Problem(str(record_path), "file", f"unreadable ({type(exc).__name__}: {exc})",
                                     "the record import-dicom wrote")]) from None
    found, problems = _masks(masks)
    if not found and not problems:
        problems.append(Problem(str(masks), "masks", "no <patient_id>/t0|t1|t2.nii.gz file",
                                "the masks layout of docs/contracts.md (hcc_liver_seg inference output)"))
    series, _ = index_dicom(dicom, progress=progress)  # a lost source image is found missing below
    root = dicom.resolve()
    jobs = []
    for pid, tp, path in found:
        where = f"{path}"
        record = records.get((pid, tp))
        if record is None:
            problems.append(Problem(where, "scan", f"{pid} {tp} has no row in {record_path.name}: not a DICOM-sourced scan",
                                    "masks of scans imported with import-dicom only"))
            continue
        mask_problems, mask = _check_mask(path, cohort / record["image"], record, where)
        source_problems, instances = _sources(record, series, where, root)
        problems += mask_problems + source_problems
        if not mask_problems and not source_problems:
            jobs.append((pid, tp, record, mask, instances))
    if problems:
        raise DicomSegError(problems)

    name, version = _bundle_version(bundle)
    descriptions = segment_descriptions(name, version)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.dicom-seg-", dir=out.parent))
    written, index = [], []
    try:
        from tqdm.auto import tqdm

        for pid, tp, record, mask, instances in tqdm(jobs, desc="DICOM-SEG", unit="scan", disable=not progress):
            sources = [pydicom.dcmread(i.path, stop_before_pixels=True) for i in instances]
            # mask[i, j, k] is column i, row j of slice k: frames (slice, row, column) in the sources' order
            seg = hd.seg.Segmentation(
                source_images=sources, pixel_array=np.ascontiguousarray(mask.transpose(2, 1, 0)),
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
                series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER, sop_instance_uid=hd.UID(),
                instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name=name,
                software_versions=f"{name} {version}"[:64], device_serial_number="none",
                content_label="LIVER_TUMOUR", content_description=f"{name} liver and tumour",
                series_description=f"{name} {version} liver + tumour")
            target = path_under(staging, pid, f"{tp}.dcm")
            target.parent.mkdir(parents=True, exist_ok=True)
            seg.save_as(target)
            index.append({"patient_id": pid, "timepoint": tp, "file": f"{pid}/{tp}.dcm",
                          "source_series_instance_uid": record["series_instance_uid"],
                          "seg_series_instance_uid": str(seg.SeriesInstanceUID),
                          "seg_sop_instance_uid": str(seg.SOPInstanceUID), "frames": int(seg.NumberOfFrames),
                          "segments": ";".join(f"{k} {SEGMENT_LABELS[k]}" for k in sorted(set(np.unique(mask).tolist()) - {0}))})
        for pid, tp, *_ in jobs:
            final = path_under(out, pid, f"{tp}.dcm")
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / pid / f"{tp}.dcm", final)
            written.append(final)
        previous = pd.read_csv(out / INDEX, dtype=str) if (out / INDEX).is_file() else None
        frame = pd.DataFrame(index).astype(str)
        if previous is not None:
            done = set(zip(frame["patient_id"], frame["timepoint"]))
            keep = [(p, t) not in done for p, t in zip(previous["patient_id"], previous["timepoint"])]
            frame = pd.concat([previous[keep], frame], ignore_index=True)
        write_csv(out / INDEX, frame.sort_values(["patient_id", "timepoint"]))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %d DICOM Segmentation object(s) to %s", len(written), out)
    return written


def dicom_seg_cli(masks: str, cohort: str, dicom: str, out: str, bundle: str | None = None, quiet: bool = False) -> str:
    """Write the masks of DICOM-imported scans as DICOM Segmentation objects (liver, tumour) for PACS.

    One BINARY Segmentation per scan (OUT/<patient_id>/<tp>.dcm) on the source series' geometry,
    referencing its images, with the segments coded (SCT Liver; SCT Neoplasm in the liver). Only scans
    that import-dicom brought in are accepted; every problem is listed at once on stderr and the
    command exits with status 2 having written nothing.

    Args:
        masks: the masks folder (<patient_id>/<tp>.nii.gz, 0/1/2 on the image's grid), e.g. a study's
            segmentation_inference/ or masks/, or hcc_liver_seg inference output.
        cohort: the cohort folder written by import-dicom (its images and dicom_series.json).
        dicom: the DICOM folder the cohort was imported from (the source images are found there again).
        out: the folder to write the Segmentation objects and segmentations.csv into.
        bundle: the hcc_liver_seg bundle folder that made the masks (its name and version identify the
            algorithm in each object; default the repository's bundles/hcc_liver_seg).
        quiet: no progress bars.
    """
    from analysis.dicom_import import require_dicom
    from analysis.flags import as_bool

    logging.getLogger("highdicom").setLevel(logging.WARNING)  # one INFO line per source image otherwise
    try:
        require_dicom("pydicom", "highdicom")
        written = write_dicom_segs(masks, cohort, dicom, out, bundle=bundle, progress=not as_bool(quiet, "quiet"))
    except DicomSegError as exc:
        raise exc.exit(out) from None
    except ValueError as exc:
        from analysis.clinical_table import usage_exit

        raise usage_exit(f"analysis dicom-seg: {exc}") from None
    return f"wrote {len(written)} DICOM Segmentation object(s) -> {out} (index: {Path(out) / INDEX})"
