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
    CohortError,
    check_cohort,
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
