"""Cohort validation: every failure is reported, one line each, naming file/row, field, found, expected."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from analysis.cohort import (
    MIN_SCAN_VOXELS,
    PATIENT_ID_PATTERN,
    CohortError,
    check_cohort,
    check_patient_id,
    derive_risk_class,
    read_clinical,
    validate_cohort,
)


@pytest.fixture()
def cohort(tiny_cohort, tmp_path) -> Path:
    dst = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, dst)
    return dst


def first_pid(cohort: Path) -> str:
    return sorted(p.name for p in (cohort / "images").iterdir())[0]


def messages(cohort: Path) -> list[str]:
    return [str(p) for p in validate_cohort(cohort, progress=False)]


def test_synthetic_cohort_is_valid(cohort):
    assert messages(cohort) == []
    check_cohort(cohort, progress=False)  # no exception


def test_truncated_gzip_is_reported_naming_the_file(cohort):
    path = cohort / "images" / first_pid(cohort) / "t1.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msgs = messages(cohort)
    assert len(msgs) == 1
    assert str(path) in msgs[0] and "unreadable" in msgs[0] and "complete NIfTI" in msgs[0]


def test_label_value_3_is_reported(cohort):
    path = cohort / "labels" / first_pid(cohort) / "t0.nii.gz"
    img = nib.load(path)
    arr = np.asarray(img.dataobj).copy()
    arr[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(arr, img.affine, img.header), path)
    msgs = messages(cohort)
    assert msgs == [f"{path}: label values: found value(s) 3; expected only 0 (background), 1 (liver), 2 (tumour)"]


def test_label_affine_differing_from_image_is_reported(cohort):
    pid = first_pid(cohort)
    path = cohort / "labels" / pid / "t2.nii.gz"
    img = nib.load(path)
    affine = img.affine.copy()
    affine[0, 3] += 2.5  # a label shifted 2.5 mm
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine, img.header), path)
    msgs = messages(cohort)
    assert len(msgs) == 1
    assert msgs[0].startswith(f"{path}: affine: found differs from the image's by up to 2.5 mm")
    assert str(cohort / "images" / pid / "t2.nii.gz") in msgs[0]


def test_label_shape_differing_from_image_is_reported(cohort):
    path = cohort / "labels" / first_pid(cohort) / "t0.nii.gz"
    img = nib.load(path)
    arr = np.asarray(img.dataobj)[:-1]
    nib.save(nib.Nifti1Image(arr, img.affine), path)
    msgs = messages(cohort)
    assert len(msgs) == 1 and f"{path}: shape: found {arr.shape}" in msgs[0]


def test_nan_voxel_is_reported(cohort):
    path = cohort / "images" / first_pid(cohort) / "t0.nii.gz"
    img = nib.load(path)
    arr = np.asarray(img.get_fdata(), dtype=np.float32)
    arr[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(arr, img.affine), path)
    assert messages(cohort) == [
        f"{path}: voxel values: found 1 non-finite voxel(s) (NaN or inf); expected finite values everywhere"
    ]


def test_four_d_image_is_reported(cohort):
    path = cohort / "images" / first_pid(cohort) / "t0.nii.gz"
    img = nib.load(path)
    arr = np.stack([np.asarray(img.dataobj)] * 2, axis=-1)
    nib.save(nib.Nifti1Image(arr, img.affine), path)
    msgs = messages(cohort)
    assert any(m.startswith(f"{path}: dimensions: found 4-D array") and "a 3-D volume" in m for m in msgs)


def test_missing_t2_is_reported_and_its_label_is_unpaired(cohort):
    pid = first_pid(cohort)
    (cohort / "images" / pid / "t2.nii.gz").unlink()
    msgs = messages(cohort)
    assert f"{cohort / 'images' / pid}: time point t2: found missing; expected images/{pid}/t2.nii.gz" in msgs
    assert any(m.startswith(f"{cohort / 'labels' / pid / 't2.nii.gz'}: label: found unpaired") for m in msgs)
    assert len(msgs) == 2


def test_age_abc_is_reported_with_row_and_field(cohort):
    frame = pd.read_csv(cohort / "clinical.csv", dtype=str, keep_default_na=False)
    frame.loc[2, "age"] = "abc"
    frame.to_csv(cohort / "clinical.csv", index=False)
    pid = frame.loc[2, "patient_id"]
    assert messages(cohort) == [
        f"clinical.csv row 4 (patient_id {pid}): field 'age': found 'abc'; expected a number >= 18 and <= 110"
    ]


def test_bad_enum_duplicate_id_and_empty_required_cell(cohort):
    frame = pd.read_csv(cohort / "clinical.csv", dtype=str, keep_default_na=False)
    frame.loc[0, "sex"] = "male"
    frame.loc[1, "death"] = ""
    frame.loc[3, "patient_id"] = frame.loc[2, "patient_id"]
    frame.to_csv(cohort / "clinical.csv", index=False)
    msgs = messages(cohort)
    assert f"clinical.csv row 2 (patient_id {frame.loc[0, 'patient_id']}): field 'sex': found 'male'; expected one of 'F', 'M'" in msgs
    assert any("row 3" in m and "field 'death': found empty; expected one of 0, 1" in m for m in msgs)
    assert any("row 5" in m and "field 'patient_id'" in m and "a unique id (also on row 4)" in m for m in msgs)


def test_missing_column_is_reported(cohort):
    frame = pd.read_csv(cohort / "clinical.csv", dtype=str, keep_default_na=False)
    frame.drop(columns=["bclc"]).to_csv(cohort / "clinical.csv", index=False)
    msgs = messages(cohort)
    assert "clinical.csv: column 'bclc': found no such column; expected a column of that name" in msgs


def test_orphan_folder_and_stray_file_are_reported(cohort):
    pid = first_pid(cohort)
    shutil.copytree(cohort / "images" / pid, cohort / "images" / "GHOST01")
    shutil.copy(cohort / "images" / pid / "t0.nii.gz", cohort / "images" / pid / "t0_copy.nii.gz")
    msgs = messages(cohort)
    assert any(m.startswith(f"{cohort / 'images' / 'GHOST01'}: folder: found orphan") for m in msgs)
    assert f"{cohort / 'images' / pid / 't0_copy.nii.gz'}: file name: found 't0_copy.nii.gz'; expected t0.nii.gz, t1.nii.gz or t2.nii.gz" in msgs


def test_stated_risk_class_contradicting_the_rule_is_reported(cohort):
    clin = read_clinical(cohort / "clinical.csv")
    idx = int(np.flatnonzero(clin["risk_class"].notna())[0])
    frame = pd.read_csv(cohort / "clinical.csv", dtype=str, keep_default_na=False)
    wrong = (int(clin.loc[idx, "risk_class"]) + 1) % 4
    frame.loc[idx, "risk_class"] = str(wrong)
    frame.to_csv(cohort / "clinical.csv", index=False)
    msgs = messages(cohort)
    assert len(msgs) == 1 and "field 'risk_class'" in msgs[0] and "by the rule" in msgs[0]


def test_check_cohort_raises_with_every_problem(cohort):
    pid = first_pid(cohort)
    (cohort / "images" / pid / "t2.nii.gz").unlink()
    with pytest.raises(CohortError) as err:
        check_cohort(cohort, progress=False)
    assert len(err.value.problems) == 2 and "2 problem(s)" in str(err.value)


def test_acceptance_cli_exits_2_one_line_per_problem_and_writes_nothing(cohort):
    """The issue's acceptance case: six problems in one cohort, all listed, nothing written."""
    ids = sorted(p.name for p in (cohort / "images").iterdir())
    # 1 truncated gzip
    p1 = cohort / "images" / ids[0] / "t1.nii.gz"
    p1.write_bytes(p1.read_bytes()[:300])
    # 2 label value 3
    p2 = cohort / "labels" / ids[1] / "t0.nii.gz"
    img = nib.load(p2)
    arr = np.asarray(img.dataobj).copy()
    arr[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(arr, img.affine, img.header), p2)
    # 3 label affine differs
    p3 = cohort / "labels" / ids[2] / "t0.nii.gz"
    img = nib.load(p3)
    aff = img.affine.copy()
    aff[1, 3] -= 4.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), aff, img.header), p3)
    # 4 NaN voxel
    p4 = cohort / "images" / ids[3] / "t0.nii.gz"
    img = nib.load(p4)
    farr = np.asarray(img.get_fdata(), dtype=np.float32)
    farr[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(farr, img.affine), p4)
    # 5 missing t2 (and its label then unpaired)
    (cohort / "images" / ids[4] / "t2.nii.gz").unlink()
    (cohort / "labels" / ids[4] / "t2.nii.gz").unlink()
    # 6 age "abc"
    frame = pd.read_csv(cohort / "clinical.csv", dtype=str, keep_default_na=False)
    frame.loc[frame["patient_id"] == ids[5], "age"] = "abc"
    frame.to_csv(cohort / "clinical.csv", index=False)

    before = sorted((p, p.stat().st_mtime_ns) for p in cohort.rglob("*"))
    proc = subprocess.run([sys.executable, "-m", "analysis", "validate", str(cohort)],
                          capture_output=True, text=True, timeout=120)
    after = sorted((p, p.stat().st_mtime_ns) for p in cohort.rglob("*"))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if ": found " in line]
    assert len(lines) == 6, proc.stderr
    assert any(str(p1) in line and "unreadable" in line for line in lines)
    assert any(str(p2) in line and "value(s) 3" in line for line in lines)
    assert any(str(p3) in line and "affine" in line for line in lines)
    assert any(str(p4) in line and "non-finite" in line for line in lines)
    assert any("time point t2: found missing" in line for line in lines)
    assert any(f"patient_id {ids[5]}): field 'age': found 'abc'" in line for line in lines)
    assert before == after, "validate must write nothing"


def test_risk_class_rule_including_censoring():
    frame = pd.DataFrame({
        "os_months": [10.0, 10.0, 36.0, 50.0, 20.0, 35.99, 40.0, 12.0],
        "death":     [1,    1,    1,    0,    0,    1,     1,    0],
        "imaging_high_risk": [1, 0, 1, 0, 1, 0, 0, 0],
    })
    got = derive_risk_class(frame).tolist()
    assert got[:4] == [0, 1, 2, 3]
    assert got[4] is pd.NA          # censored at 20 months: short or long unknown
    assert got[5] == 1               # died at 35.99 months: short survivor
    assert got[6] == 3               # 40 months: long survivor, low risk
    assert got[7] is pd.NA


# ------------------------------------------------------------------ non-finite numbers (issue 15)
@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "NaN"])
def test_non_finite_os_months_is_refused_naming_row_and_column(cohort, text):
    """inf used to make a censored patient a long survivor (class 3) and NaN passed the minimum."""
    frame = pd.read_csv(cohort / "clinical.csv", dtype=str, keep_default_na=False)
    frame.loc[1, ["os_months", "death", "risk_class"]] = [text, "0", ""]
    frame.to_csv(cohort / "clinical.csv", index=False)
    shown = text.lower()
    assert messages(cohort) == [
        f"clinical.csv row 3 (patient_id {frame.loc[1, 'patient_id']}): field 'os_months': "
        f"found {shown} (not a finite number); expected a number >= 0"
    ]
    with pytest.raises(CohortError):
        check_cohort(cohort, progress=False)


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "NaN"])
@pytest.mark.parametrize("column, expected", [("age", "a number >= 18 and <= 110"),
                                              ("tace_cycles", "a whole number >= 1"),
                                              ("death", "one of 0, 1")])
def test_other_non_finite_numbers_are_refused(cohort, column, expected, text):
    frame = pd.read_csv(cohort / "clinical.csv", dtype=str, keep_default_na=False)
    frame.loc[4, [column, "risk_class"]] = [text, ""]
    frame.to_csv(cohort / "clinical.csv", index=False)
    assert messages(cohort) == [
        f"clinical.csv row 6 (patient_id {frame.loc[4, 'patient_id']}): field '{column}': "
        f"found {text.lower()} (not a finite number); expected {expected}"
    ]


# ------------------------------------------------------------------------ patient ids (issue 15)
@pytest.mark.parametrize("bad", ["../../escaped", "", "a/b", "a\\b", "a.b", ".", "P 01"])
def test_patient_ids_that_are_not_folder_names_are_refused(cohort, bad):
    frame = pd.read_csv(cohort / "clinical.csv", dtype=str, keep_default_na=False)
    original = frame.loc[0, "patient_id"]
    frame.loc[0, "patient_id"] = bad
    frame.to_csv(cohort / "clinical.csv", index=False)
    msgs = messages(cohort)
    where = f"clinical.csv row 2 (patient_id {bad})" if bad else "clinical.csv row 2"
    found = repr(bad) if bad else "empty"
    assert f"{where}: field 'patient_id': found {found}; expected text matching {PATIENT_ID_PATTERN}" in msgs
    # the id names no folder: only its former folder is reported (as an orphan), nothing is looked up
    assert [m for m in msgs if "field 'patient_id'" not in m] == [
        f"{cohort / 'images' / original}: folder: found orphan: no clinical.csv row; "
        f"expected a row with patient_id {original} or no folder"]


def test_check_patient_id():
    assert PATIENT_ID_PATTERN == "^[A-Za-z0-9_-]+$"
    assert check_patient_id("HCC_001-b", "datalist item 3") == "HCC_001-b"
    for bad in ["../../escaped", "", "a/b", "a\\b", "a.b", "..", "HCC01\n", " HCC01", None, 7]:
        with pytest.raises(ValueError) as err:
            check_patient_id(bad, "datalist item 3")
        text = str(err.value)
        assert text.startswith("datalist item 3: patient_id: found ")
        assert (repr(bad) if bad not in ("", None) else "an empty id") in text
        assert PATIENT_ID_PATTERN in text


def test_duplicate_patient_id_is_refused(cohort):
    frame = pd.read_csv(cohort / "clinical.csv", dtype=str, keep_default_na=False)
    first, second = frame.loc[0, "patient_id"], frame.loc[5, "patient_id"]
    frame.loc[5, "patient_id"] = first
    frame.to_csv(cohort / "clinical.csv", index=False)
    msgs = messages(cohort)
    assert f"clinical.csv row 7 (patient_id {first}): field 'patient_id': found {first!r}; " \
           "expected a unique id (also on row 2)" in msgs
    assert len(msgs) == 2 and f"{cohort / 'images' / second}: folder: found orphan" in msgs[1]


# ------------------------------------------------------------------------- scan size (issue 15)
@pytest.mark.parametrize("shape, refused", [((1, 1, 1), True), ((32, 32, MIN_SCAN_VOXELS - 1), True),
                                            ((MIN_SCAN_VOXELS, 16, MIN_SCAN_VOXELS), False)])
def test_scans_smaller_than_the_minimum_are_refused(cohort, shape, refused):
    pid = first_pid(cohort)
    image, label = cohort / "images" / pid / "t0.nii.gz", cohort / "labels" / pid / "t0.nii.gz"
    affine = nib.load(image).affine
    nib.save(nib.Nifti1Image(np.ones(shape, np.float32), affine), image)
    nib.save(nib.Nifti1Image(np.zeros(shape, np.uint8), affine), label)
    expected = [f"{image}: dimensions: found shape {shape}; expected at least {MIN_SCAN_VOXELS} voxels along each axis"]
    assert messages(cohort) == (expected if refused else [])


def test_the_smallest_synthetic_scans_pass(tmp_path):
    from analysis.synthetic import make_cohort

    out = make_cohort(tmp_path / "c", n_patients=2, shape=16, seed=0, progress=False)
    assert nib.load(out / "images" / first_pid(out) / "t0.nii.gz").shape == (16, 16, 8)
    assert messages(out) == []


# -------------------------------------------------------------------------- symlinks (issue 15)
def test_a_file_linked_from_outside_the_cohort_is_refused_and_not_read(cohort, tmp_path):
    pid = first_pid(cohort)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    link = cohort / "images" / pid / "t1.nii.gz"
    target = outside / "t1.nii.gz"
    target.write_bytes(b"not a NIfTI: would be 'unreadable' if it were read")
    link.unlink()
    link.symlink_to(target)
    assert messages(cohort) == [
        f"{link}: symbolic link: found a link to {target} (resolving to {target.resolve()}), outside the cohort "
        f"folder; expected files and folders inside {cohort.resolve()} (copy the file in, or link within the folder)"
    ]


def test_a_patient_folder_linked_from_outside_is_refused_once(cohort, tmp_path):
    pid = first_pid(cohort)
    outside = tmp_path / "elsewhere" / pid
    shutil.move(str(cohort / "labels" / pid), outside)
    (cohort / "labels" / pid).symlink_to(outside, target_is_directory=True)
    msgs = messages(cohort)
    assert len(msgs) == 1 and msgs[0].startswith(f"{cohort / 'labels' / pid}: symbolic link: found a link to {outside}")


def test_links_inside_the_cohort_are_accepted(cohort):
    pid = first_pid(cohort)
    store = cohort / "store"
    store.mkdir()
    for kind in ("images", "labels"):
        scan = cohort / kind / pid / "t2.nii.gz"
        shutil.move(str(scan), store / f"{kind}_t2.nii.gz")
        scan.symlink_to(Path("..") / ".." / "store" / f"{kind}_t2.nii.gz")
    assert messages(cohort) == []
