"""DICOM in, DICOM-SEG out (issue 17): import-dicom, its refusals, dicom-seg, the study on an import.

The series are generated here with pydicom (``analysis.dicom_synth.write_series``) from the tiny
synthetic cohort's volumes: LPS, 5 mm slices, oblique (rotated about two axes), rescale slope and
intercept other than 1 and 0, shuffled file names, one stack stored inferior-first. The checks of
geometry go through world coordinates computed here from the DICOM headers by the standard's
formula (PS3.3 C.7.6.2.1.1), not through the import's own code.
"""

from __future__ import annotations

import gzip
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from conftest import REPO_ROOT

from analysis.dicom_import import DicomImportError, import_dicom, import_dicom_cli
from analysis.dicom_seg import DicomSegError, write_dicom_segs
from analysis.dicom_synth import RAS_TO_LPS, write_series

PATIENTS = ("HCC001", "HCC002")
TPS = ("t0", "t1", "t2")
#: (slope, intercept) per time point: float32 output, int16 output, int16 output with a slope
RESCALE = {"t0": (0.5, -100.0), "t1": (1.0, 0.0), "t2": (2.0, 5.0)}
IDENTITY = {"PatientName": "Doe^Jane^Quintessa", "PatientBirthDate": "19510423", "PatientSex": "F"}


def _rotation(ax: float, az: float) -> np.ndarray:
    a, b = math.radians(ax), math.radians(az)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    rz = np.array([[math.cos(b), -math.sin(b), 0], [math.sin(b), math.cos(b), 0], [0, 0, 1]])
    return rz @ rx


def _affine_ras(p: int, t: int) -> np.ndarray:
    """An oblique LPS grid of 1.4 x 1.4 x 5 mm (12 + t deg about x, 7 + p deg about z) as a NIfTI (RAS) affine;
    t1 is stored inferior-first (a left-handed grid: the import reverses it)."""
    lps = np.eye(4)
    lps[:3, :3] = _rotation(12.0 + t, 7.0 + p) @ np.diag([1.4, 1.4, 5.0])
    lps[:3, 3] = [-20.0 + 3 * p, 30.0 - t, -40.0 + 2 * t]
    if t == 1:
        lps[:3, 2] *= -1
    return RAS_TO_LPS @ lps


@pytest.fixture(scope="module")
def dicom_set(tiny_cohort, tmp_path_factory) -> dict:
    """Two patients x three time points as DICOM series + series.csv + clinical.csv, and the truth."""
    root = tmp_path_factory.mktemp("dicom_set")
    rng = np.random.default_rng(17)
    truth, rows = {}, []
    for p, pid in enumerate(PATIENTS):
        identity = {**IDENTITY, "PatientID": f"MRN-77{p}31"}
        for t, tp in enumerate(TPS):
            data = np.asarray(nib.load(str(tiny_cohort / "images" / pid / f"{tp}.nii.gz")).dataobj, dtype=np.float64)
            label = np.asarray(nib.load(str(tiny_cohort / "labels" / pid / f"{tp}.nii.gz")).dataobj).astype(np.uint8)
            stored = np.round(1000 * data / data.max()).astype(np.uint16)
            slope, intercept = RESCALE[tp]
            affine = _affine_ras(p, t)
            folder = root / "dicom" / f"pacs_export_{p}" / f"study{t}" / ("s" + "".join(rng.choice(list("abcdef"), 6)))
            written = write_series(folder, stored, affine, slope=slope, intercept=intercept, patient=identity,
                                   study={"StudyDate": f"2024010{t + 1}"}, series_number=3 + t, rng=rng,
                                   manufacturer="ACME MR")
            truth[pid, tp] = {"affine": affine, "real": stored * slope + intercept, "label": label,
                              "series_uid": written["series_uid"], "sop_uids": written["sop_instance_uids"],
                              "paths": [p_.relative_to(root) for p_ in written["paths"]],
                              "folder": folder.relative_to(root / "dicom"), "study_uid": written["study_uid"]}
            # HCC002 t2 is named by its folder, every other scan by its SeriesInstanceUID
            by_folder = (pid, tp) == ("HCC002", "t2")
            rows.append({"patient_id": pid, "timepoint": tp, "series_uid": "" if by_folder else written["series_uid"],
                         "folder": str(folder.relative_to(root / "dicom")) if by_folder else ""})
    pd.DataFrame(rows).to_csv(root / "series.csv", index=False)
    clinical = pd.read_csv(tiny_cohort / "clinical.csv", dtype=str, keep_default_na=False)
    clinical[clinical["patient_id"].isin(PATIENTS)].to_csv(root / "clinical.csv", index=False)
    return {"root": root, "truth": truth}


def _copy(dicom_set, tmp_path) -> Path:
    dst = tmp_path / "site"
    shutil.copytree(dicom_set["root"], dst)
    return dst


def _args(site: Path, out: Path) -> dict:
    return {"dicom": site / "dicom", "map": site / "series.csv", "clinical": site / "clinical.csv", "out": out}


@pytest.fixture(scope="module")
def imported(dicom_set, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "cohort"
    import_dicom(**_args(dicom_set["root"], out), progress=False)
    return out


def _grid_map(img: nib.Nifti1Image, source_affine: np.ndarray) -> np.ndarray:
    """Source voxel index of every voxel of ``img`` through world coordinates (checked to be whole numbers)."""
    shape = img.shape
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1).reshape(-1, 3).astype(float)
    world = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    src = (world - source_affine[:3, 3]) @ np.linalg.inv(source_affine[:3, :3]).T
    whole = np.round(src)
    assert np.abs(src - whole).max() < 1e-4, "voxel centres differ from the source's"
    return whole.astype(int)


def _dicom_world_lps(ds, r: int, c: int) -> np.ndarray:
    """PS3.3 C.7.6.2.1.1: the LPS position of pixel (row r, column c)."""
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    dr, dc = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
    return ipp + iop[:3] * dc * c + iop[3:] * dr * r


# ------------------------------------------------------------------------------- round trip
def test_round_trip_voxels_and_world_coordinates(dicom_set, imported):
    for (pid, tp), truth in dicom_set["truth"].items():
        img = nib.load(str(imported / "images" / pid / f"{tp}.nii.gz"))
        data = np.asarray(img.dataobj)
        assert data.shape == truth["real"].shape
        assert data.dtype == (np.float32 if tp == "t0" else np.int16), (pid, tp, data.dtype)
        assert np.allclose(img.header.get_zooms(), (1.4, 1.4, 5.0), atol=1e-4)
        idx = _grid_map(img, truth["affine"])
        assert len({tuple(v) for v in idx}) == data.size  # a one-to-one map onto the source grid
        assert np.array_equal(data.reshape(-1), truth["real"][idx[:, 0], idx[:, 1], idx[:, 2]])
        if tp == "t1":  # stored inferior-first: the import sorted the slices along the normal
            assert np.array_equal(idx[:, 2].reshape(data.shape)[0, 0], np.arange(data.shape[2])[::-1])
        # independently of the writer: a pixel's LPS position from its file's header is the RAS
        # world position of the NIfTI voxel holding the same value (x and y change sign)
        ds = pydicom.dcmread(dicom_set["root"] / truth["paths"][5])
        for r, c in ((0, 0), (7, 20), (31, 3)):
            lps = _dicom_world_lps(ds, r, c)
            ras = np.array([-lps[0], -lps[1], lps[2]])
            voxel = np.linalg.inv(img.affine) @ np.append(ras, 1.0)
            assert np.abs(voxel[:3] - np.round(voxel[:3])).max() < 1e-4
            i, j, k = np.round(voxel[:3]).astype(int)
            value = float(ds.pixel_array[r, c]) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            assert data[i, j, k] == value


def test_provenance_and_series_record(dicom_set, imported):
    prov = pd.read_csv(imported / "dicom_provenance.csv", dtype=str)
    assert list(prov.columns[:8]) == ["patient_id", "timepoint", "series_instance_uid", "study_date", "n_slices",
                                      "spacing_x_mm", "spacing_y_mm", "spacing_z_mm"]
    assert len(prov) == 6
    for row in prov.itertuples():
        truth = dicom_set["truth"][row.patient_id, row.timepoint]
        assert row.series_instance_uid == truth["series_uid"]
        assert row.study_date == f"2024010{TPS.index(row.timepoint) + 1}"
        assert int(row.n_slices) == truth["real"].shape[2]
        assert [float(row.spacing_x_mm), float(row.spacing_y_mm), float(row.spacing_z_mm)] == pytest.approx([1.4, 1.4, 5.0])
        assert (float(row.rescale_slope), float(row.rescale_intercept)) == RESCALE[row.timepoint]
    record = json.loads((imported / "dicom_series.json").read_text())
    for scan in record["scans"]:
        truth = dicom_set["truth"][scan["patient_id"], scan["timepoint"]]
        assert scan["study_instance_uid"] == truth["study_uid"]
        order = truth["sop_uids"][::-1] if scan["timepoint"] == "t1" else truth["sop_uids"]
        assert scan["sop_instance_uids"] == order  # slice order of the NIfTI
    meta = json.loads((imported / "cohort.json").read_text())
    assert meta["source"] == "dicom" and meta["synthetic"] is False  # "ACME MR", not the synthetic generator
    from analysis.cohort import validate_cohort

    assert validate_cohort(imported, progress=False) == []


def test_nothing_identifying_reaches_the_cohort(imported):
    secrets = [b"Doe", b"Quintessa", b"19510423", b"MRN-77", b"ACME"]
    for path in imported.rglob("*"):
        if path.is_file():
            raw = path.read_bytes()
            raw = gzip.decompress(raw) if path.name.endswith(".gz") else raw
            found = [s for s in secrets if s in raw]
            assert not found, f"{path}: {found}"
    assert sorted(p.name for p in (imported / "images").iterdir()) == list(PATIENTS)


def test_a_rerun_replaces_an_earlier_import_and_a_foreign_folder_is_refused(dicom_set, tmp_path):
    out = tmp_path / "cohort"
    import_dicom(**_args(dicom_set["root"], out), progress=False)
    (out / "images" / "HCC001" / "stale.txt").write_text("x")
    import_dicom(**_args(dicom_set["root"], out), progress=False)
    assert not (out / "images" / "HCC001" / "stale.txt").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DicomImportError, match="not empty and holds no earlier import"):
        import_dicom(**_args(dicom_set["root"], foreign), progress=False)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort", "foreign"]  # no temporary folder left


# --------------------------------------------------------------------------------- refusals
def _files(site: Path, truth: dict) -> list[Path]:
    return [site / p for p in truth["paths"]]  # in the writer's slice order


def _edit(path: Path, **attrs) -> None:
    ds = pydicom.dcmread(path)
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(path)


def _refused(site: Path, tmp_path: Path, capsys) -> list[str]:
    """Run the command-line function; assert exit 2 and nothing written; return the problem lines."""
    out = tmp_path / "out"
    before = sorted(tmp_path.iterdir())
    with pytest.raises(SystemExit) as exc:
        import_dicom_cli(**{k: str(v) for k, v in _args(site, out).items()}, quiet=True)
    assert exc.value.code == 2
    assert not out.exists() and sorted(tmp_path.iterdir()) == before
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == f"{len(lines) - 1} problem(s): nothing written to {out}"
    return lines[:-1]


def test_refuses_a_gap_in_slice_positions(dicom_set, tmp_path, capsys):
    site = _copy(dicom_set, tmp_path)
    truth = dicom_set["truth"]["HCC001", "t0"]
    _files(site, truth)[6].unlink()
    lines = _refused(site, tmp_path, capsys)
    assert len(lines) == 1 and truth["series_uid"] in lines[0] and "series.csv row 2 (HCC001 t0" in lines[0]
    assert "1 gap(s): 10.00 mm between" in lines[0] and "(median step 5.00 mm)" in lines[0]


def test_refuses_duplicate_positions(dicom_set, tmp_path, capsys):
    """A second phase in the same series: every slice again at the same positions."""
    site = _copy(dicom_set, tmp_path)
    truth = dicom_set["truth"]["HCC002", "t1"]
    for path in _files(site, truth)[:4]:
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.AcquisitionNumber = 2
        ds.save_as(path.with_name("phase2_" + path.name))
    lines = _refused(site, tmp_path, capsys)
    assert len(lines) == 1 and truth["series_uid"] in lines[0] and "HCC002 t1" in lines[0]
    assert "4 duplicate position(s)" in lines[0] and "2 AcquisitionNumber values" in lines[0]


def test_refuses_mixed_orientations_and_image_sizes(dicom_set, tmp_path, capsys):
    site = _copy(dicom_set, tmp_path)
    a, b = dicom_set["truth"]["HCC001", "t1"], dicom_set["truth"]["HCC001", "t2"]
    _edit(_files(site, a)[3], ImageOrientationPatient=[0, 1, 0, 0, 0, -1])  # a sagittal slice mixed in
    small = pydicom.dcmread(_files(site, b)[2])
    small.Rows = small.Columns = 16
    small.PixelData = np.zeros((16, 16), np.uint16).tobytes()
    small.save_as(_files(site, b)[2])
    lines = _refused(site, tmp_path, capsys)
    assert len(lines) == 2
    assert a["series_uid"] in lines[0] and "ImageOrientationPatient: found mixed: 2 orientations" in lines[0]
    assert b["series_uid"] in lines[1] and "image size: found mixed: 32 x 32 (12 file(s)), 16 x 16 (1 file(s))" in lines[1]


def test_refuses_a_series_that_is_not_mr(dicom_set, tmp_path, capsys):
    site = _copy(dicom_set, tmp_path)
    truth = dicom_set["truth"]["HCC002", "t0"]
    for path in _files(site, truth):
        _edit(path, Modality="CT")
    lines = _refused(site, tmp_path, capsys)
    assert len(lines) == 1 and truth["series_uid"] in lines[0]
    assert "Modality: found 'CT' (13 file(s)); expected 'MR'" in lines[0]


def test_refuses_a_missing_time_point(dicom_set, tmp_path, capsys):
    site = _copy(dicom_set, tmp_path)
    frame = pd.read_csv(site / "series.csv", dtype=str, keep_default_na=False)
    frame[~((frame["patient_id"] == "HCC001") & (frame["timepoint"] == "t2"))].to_csv(site / "series.csv", index=False)
    lines = _refused(site, tmp_path, capsys)
    assert lines == ["series.csv patient HCC001: time point: found t2 missing (rows for t0, t1 only); expected a row "
                     "for each of t0, t1, t2 (docs/contracts.md: all three are required)"]


def test_refuses_a_series_uid_not_in_the_folder(dicom_set, tmp_path, capsys):
    site = _copy(dicom_set, tmp_path)
    frame = pd.read_csv(site / "series.csv", dtype=str, keep_default_na=False)
    frame.loc[4, "series_uid"] = "1.2.3.4.5"
    frame.to_csv(site / "series.csv", index=False)
    lines = _refused(site, tmp_path, capsys)
    assert lines == [f"series.csv row 6 (HCC002 t1), series 1.2.3.4.5: series_uid: found not found under "
                     f"{site / 'dicom'} (6 series there); expected the SeriesInstanceUID of a series whose files are "
                     "under --dicom"]


def test_refuses_everything_at_once_and_a_folder_holding_two_series(dicom_set, tmp_path, capsys):
    """Several broken series, a bad map row and a clinical problem: every one listed in one run."""
    site = _copy(dicom_set, tmp_path)
    t = dicom_set["truth"]
    _files(site, t["HCC001", "t0"])[6].unlink()
    for path in _files(site, t["HCC002", "t0"]):
        _edit(path, Modality="CT")
    # a localiser written into the folder that HCC002 t2 is mapped by
    write_series(site / "dicom" / t["HCC002", "t2"]["folder"], np.zeros((16, 16, 3), np.uint16), np.eye(4))
    clinical = pd.read_csv(site / "clinical.csv", dtype=str, keep_default_na=False)
    clinical.loc[0, "sex"] = "X"
    clinical.to_csv(site / "clinical.csv", index=False)
    lines = _refused(site, tmp_path, capsys)
    text = "\n".join(lines)
    assert len(lines) == 4, text
    assert "clinical.csv row 2 (patient_id HCC001): field 'sex'" in text
    assert "HCC002 t2), folder" in text and "folder: found 2 series" in text
    assert "gap(s)" in text and "Modality: found 'CT'" in text


def test_unreadable_pixels_are_refused_and_leave_nothing(dicom_set, tmp_path, capsys):
    """Headers fine, pixel data cut short: found while reading, after other scans were converted;
    the staging folder goes and --out is never made."""
    site = _copy(dicom_set, tmp_path)
    path = _files(site, dicom_set["truth"]["HCC002", "t2"])[4]
    path.write_bytes(path.read_bytes()[:-300])
    lines = _refused(site, tmp_path, capsys)
    assert len(lines) == 1 and "HCC002 t2" in lines[0] and "pixel data" in lines[0]


def test_a_dicom_file_cut_short_is_refused_by_name(dicom_set, tmp_path, capsys):
    """The last slice cut inside its header: pydicom reads what is there, without a series or a
    position; the file is named, rather than the scan imported one slice short."""
    site = _copy(dicom_set, tmp_path)
    path = _files(site, dicom_set["truth"]["HCC001", "t2"])[-1]
    path.write_bytes(path.read_bytes()[:400])
    lines = _refused(site, tmp_path, capsys)
    assert lines == [f"{path}: DICOM header: found unreadable or cut short (no SeriesInstanceUID); expected a "
                     "complete DICOM file, or no such file under --dicom"]


def test_command_line_exit_status(dicom_set, tmp_path):
    site = _copy(dicom_set, tmp_path)
    run = lambda out: subprocess.run([sys.executable, "-m", "analysis", "import-dicom", "--dicom", str(site / "dicom"),  # noqa: E731
                                      "--map", str(site / "series.csv"), "--clinical", str(site / "clinical.csv"),
                                      "--out", str(out), "--quiet", "true"], cwd=REPO_ROOT, capture_output=True,
                                     text=True, timeout=300)
    proc = run(tmp_path / "ok")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "imported 6 series" in proc.stdout
    (site / "series.csv").write_text("patient_id,timepoint\nHCC001,t0\n")
    proc = run(tmp_path / "bad")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "series.csv row 1 (header): columns: found no series_uid or folder" in proc.stderr
    assert not (tmp_path / "bad").exists()


# -------------------------------------------------------------------------------- DICOM-SEG
def _masks_on_imported_grid(dicom_set, imported: Path, masks: Path) -> dict:
    """The source labels resampled (by index, exactly) onto the imported images' grids."""
    from analysis.io import save_nifti

    out = {}
    for (pid, tp), truth in dicom_set["truth"].items():
        img = nib.load(str(imported / "images" / pid / f"{tp}.nii.gz"))
        idx = _grid_map(img, truth["affine"])
        mask = truth["label"][idx[:, 0], idx[:, 1], idx[:, 2]].reshape(img.shape)
        save_nifti(masks / pid / f"{tp}.nii.gz", mask, img.affine, dtype=np.uint8)
        out[pid, tp] = mask
    return out


def test_dicom_seg_reads_back_with_segments_references_and_frames(dicom_set, imported, tmp_path):
    _masks_on_imported_grid(dicom_set, imported, tmp_path / "masks")
    written = write_dicom_segs(tmp_path / "masks", imported, dicom_set["root"] / "dicom", tmp_path / "seg",
                               progress=False)
    assert len(written) == 6
    for (pid, tp), truth in dicom_set["truth"].items():
        seg = pydicom.dcmread(tmp_path / "seg" / pid / f"{tp}.dcm")
        assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.Modality == "SEG"
        assert seg.SegmentationType == "BINARY"
        segments = {s.SegmentNumber: s for s in seg.SegmentSequence}
        assert sorted(segments) == [1, 2]
        liver, tumour = segments[1], segments[2]
        assert liver.SegmentLabel == "Liver" and tumour.SegmentLabel == "Tumour"
        assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
        assert liver.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
        assert tumour.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
        assert tumour.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
        assert liver.SegmentAlgorithmType == "AUTOMATIC"
        # the source series, its study and its patient (a PACS files the object beside them)
        source = pydicom.dcmread(dicom_set["root"] / truth["paths"][0])
        assert seg.StudyInstanceUID == truth["study_uid"] and seg.PatientID == source.PatientID
        assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
        assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [truth["series_uid"]]
        referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
        assert referenced == set(truth["sop_uids"])
        # frames placed by their positions rebuild the mask on the source grid
        positions = {}
        for k, rel in enumerate(truth["paths"]):
            ds = pydicom.dcmread(dicom_set["root"] / rel, stop_before_pixels=True)
            positions[k] = np.array([float(v) for v in ds.ImagePositionPatient])
        rebuilt = np.zeros(truth["label"].shape, np.uint8)
        frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
        for f, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
            ipp = np.array([float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient])
            k = min(positions, key=lambda s: np.linalg.norm(positions[s] - ipp))
            assert np.linalg.norm(positions[k] - ipp) < 1e-3
            ref = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            assert ref == truth["sop_uids"][k]
            number = group.SegmentIdentificationSequence[0].ReferencedSegmentNumber
            assert not np.any(rebuilt[:, :, k][frames[f].T > 0])  # one segment per voxel
            rebuilt[:, :, k][frames[f].T > 0] = number
        assert np.array_equal(rebuilt, truth["label"]), (pid, tp)
        # highdicom parses it back as a Segmentation of the source series
        import highdicom as hd

        parsed = hd.seg.segread(tmp_path / "seg" / pid / f"{tp}.dcm")
        assert parsed.get_segment_numbers() == [1, 2]
        assert {uid for _, _, uid in parsed.get_source_image_uids()} == set(truth["sop_uids"])
    index = pd.read_csv(tmp_path / "seg" / "segmentations.csv", dtype=str)
    assert len(index) == 6 and set(index["segments"]) == {"1 Liver;2 Tumour"}


def test_dicom_seg_refuses_scans_not_from_dicom_and_masks_off_grid(dicom_set, imported, tiny_cohort, tmp_path):
    with pytest.raises(DicomSegError, match="dicom_series.json: found no such file: its scans were not imported from DICOM"):
        write_dicom_segs(tiny_cohort / "labels", tiny_cohort, dicom_set["root"] / "dicom", tmp_path / "seg",
                         progress=False)
    masks = tmp_path / "masks"
    _masks_on_imported_grid(dicom_set, imported, masks)
    shutil.copytree(tiny_cohort / "labels" / "HCC003", masks / "HCC003")  # a patient the import never saw
    img = nib.load(str(masks / "HCC001" / "t1.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :-1], img.affine), str(masks / "HCC001" / "t1.nii.gz"))
    with pytest.raises(DicomSegError) as exc:
        write_dicom_segs(masks, imported, dicom_set["root"] / "dicom", tmp_path / "seg", progress=False)
    text = str(exc.value)
    assert "HCC001/t1.nii.gz: shape: found (32, 32, 12); expected (32, 32, 13)" in text
    assert "HCC003 t0 has no row in dicom_series.json: not a DICOM-sourced scan" in text
    assert len(exc.value.problems) == 4  # HCC001 t1, HCC003 t0-t2
    assert not (tmp_path / "seg").exists()


# --------------------------------------------------------------------------- the whole path
@pytest.mark.slow
def test_study_on_an_imported_cohort_and_its_masks_back_as_dicom_seg(tmp_path):
    """The README's "From PACS to a study" on 3 synthetic patients: synth-dicom, import-dicom, the
    study (demo profile: the shipped weights, inference only; 2 folds, 200 bootstrap resamples),
    dicom-seg over the study's automatic masks."""
    from analysis.dicom_synth import make_dicom_cohort
    from analysis.study import run_study

    site = make_dicom_cohort(tmp_path / "site", n_patients=3, shape=32, seed=2026, progress=False)
    cohort = import_dicom(site / "dicom", site / "series.csv", site / "clinical.csv", tmp_path / "cohort",
                          progress=False)
    assert json.loads((cohort / "cohort.json").read_text())["synthetic"] is True
    results, summary = run_study(cohort=cohort, out=tmp_path / "study", profile="demo", folds=2, bootstrap=200,
                                 progress=False)
    status = {r.name: r.status for r in results}
    # 3 patients: every stage runs but classify, which needs 8 labelled patients (README says so)
    assert {k: v for k, v in status.items() if v != "ran"} == {"classify": "failed"}, status
    assert "needs at least 8" in next(r.message for r in results if r.name == "classify")
    assert summary["synthetic"] is True and "SYNTHETIC" in (tmp_path / "study" / "report.html").read_text()
    masks = tmp_path / "study" / "segmentation_inference"
    written = write_dicom_segs(masks, cohort, site / "dicom", tmp_path / "seg", progress=False)
    assert len(written) == 9
    seg = pydicom.dcmread(written[0])
    record = json.loads((cohort / "dicom_series.json").read_text())["scans"][0]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == record["series_instance_uid"]
    assert seg.PatientName == "Synthetic^Patient001"
