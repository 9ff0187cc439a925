"""Issue 15 ("hard to break"): one patient-id rule wherever an id is read, output paths built from
ids stay inside their folder, and one clinical reader for the statistics verbs whose refusals are
one-line messages (file, row, column, found, expected) with exit status 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import REPO_ROOT

from analysis.clinical_table import TableInputError, read_clinical_table
from analysis.io import path_under

ESCAPING = "../../escaped"


def _clinical(n: int = 12) -> pd.DataFrame:
    """A valid clinical table (every required column, plus mrecist)."""
    rng = np.random.default_rng(0)
    return pd.DataFrame({
        "patient_id": [f"P{i:03d}" for i in range(n)], "age": rng.integers(40, 85, n),
        "sex": np.array(["F", "M"])[np.arange(n) % 2], "treatment": np.array(["TACE", "TACE+MWA"])[np.arange(n) % 2],
        "sorafenib": np.arange(n) % 2, "os_months": (rng.exponential(20, n) + 1).round(1),
        "death": (np.arange(n) % 3 != 0).astype(int), "bclc": np.array(list("ABC"))[np.arange(n) % 3],
        "child_pugh": "A", "afp_ge_400": 0, "tumour_size": "3-5cm", "nodules_gt3": 0, "tace_cycles": 2,
        "imaging_high_risk": np.arange(n) % 2, "mrecist": np.array(["CR", "PR", "SD", "PD"])[np.arange(n) % 4]})


# -------------------------------------------------------------------------------- path_under
def test_path_under_keeps_paths_inside_their_folder(tmp_path):
    out = tmp_path / "out"
    assert path_under(out, "P001", "t0.nii.gz") == out / "P001" / "t0.nii.gz"
    for parts in [(ESCAPING, "t0.nii.gz"), ("/etc/passwd",), (".",), ("P001/../../x",)]:
        with pytest.raises(ValueError, match=r"resolves to .*not inside the output folder .*out"):
            path_under(out, *parts)
    (tmp_path / "elsewhere").mkdir()
    out.mkdir()
    (out / "P002").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="not inside the output folder"):
        path_under(out, "P002", "t0.nii.gz")


# ---------------------------------------------------------------------- the statistics verbs
def _write(frame: pd.DataFrame, path: Path, case: str) -> None:
    if case == "empty":
        path.write_text("")
    elif case == "semicolon":
        frame.to_csv(path, index=False, sep=";")
    else:
        frame.to_csv(path, index=False)


def _run_verb(verb: str, clinical: Path, out: Path):
    if verb == "km":
        from analysis.km import km_cli

        return km_cli(str(clinical), "mrecist", str(out))
    if verb == "cox":
        from analysis.cox import cox_cli

        return cox_cli(str(clinical), str(out), "age", cv_folds=0)
    if verb == "nomogram":
        from analysis.nomogram import nomogram_cli

        return nomogram_cli(str(clinical), str(out), "age", n_boot=0)
    if verb == "table1":
        from analysis.table1 import table1_cli

        return table1_cli(str(clinical), out=str(out / "table1.csv"))
    if verb == "classify":
        from analysis.models import classify_cli

        features = clinical.parent / "features.csv"
        pd.DataFrame({"patient_id": [f"P{i:03d}" for i in range(12)], "f1": np.arange(12.0)}).to_csv(features,
                                                                                                   index=False)
        return classify_cli(str(features), str(clinical), str(out))
    raise AssertionError(verb)


VERBS = ["km", "cox", "nomogram", "table1", "classify"]
#: the column each verb cannot do without, dropped in the "missing column" case
NEEDED = {"km": "death", "cox": "death", "nomogram": "death", "table1": "treatment", "classify": "patient_id"}


def _case(case: str, verb: str) -> tuple[pd.DataFrame, str]:
    """(table, regex of the message) of each bad clinical.csv."""
    frame = _clinical()
    if case == "duplicate":
        frame.loc[5, "patient_id"] = "P002"
        return frame, r"clinical.csv row 7: patient_id: found 'P002' again \(first on row 4\); expected one row per patient"
    if case == "missing_column":
        return frame.drop(columns=[NEEDED[verb]]), (rf"clinical.csv row 1 \(header\): column '{NEEDED[verb]}' not found; "
                                                    r"expected a column of each name \(found: ")
    if case == "empty":
        return frame, r"clinical.csv: empty file; expected a comma-separated table with a header row"
    if case == "header_only":
        return frame.iloc[:0], r"clinical.csv: a header row and no patient row; expected one row per patient"
    if case == "semicolon":
        return frame, (r"clinical.csv row 1 \(header\): found semicolon-delimited columns \('patient_id;age;.*'\); "
                       r"expected comma-delimited columns")
    if case == "bad_id":
        frame.loc[3, "patient_id"] = ESCAPING
        return frame, (r"clinical.csv row 5: patient_id: found '\.\./\.\./escaped'; expected letters, digits, "
                       r"'_' or '-' only \(the pattern \^\[A-Za-z0-9_-\]\+\$\)")
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["duplicate", "missing_column", "empty", "header_only", "semicolon", "bad_id"])
@pytest.mark.parametrize("verb", VERBS)
def test_statistics_verbs_refuse_a_bad_clinical_table_in_one_line(tmp_path, capsys, verb, case):
    frame, message = _case(case, verb)
    clinical = tmp_path / "clinical.csv"
    _write(frame, clinical, case)
    with pytest.raises(SystemExit) as info:
        _run_verb(verb, clinical, tmp_path / "out")
    assert info.value.code == 2
    text = str(info.value)
    assert text.startswith(f"{verb}: ") and "\n" not in text
    assert re.search(message, text), text
    assert capsys.readouterr().err == text + "\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("verb", ["km", "cox", "nomogram"])
def test_survival_verbs_name_file_rows(tmp_path, verb):
    """A bad event or duration is named by its file row (header = row 1) and patient id, as validate does."""
    frame = _clinical()
    frame.loc[3, "death"] = 2
    frame.loc[[6, 8], "os_months"] = -1.0
    clinical = tmp_path / "clinical.csv"
    frame.to_csv(clinical, index=False)
    with pytest.raises(SystemExit, match=r"clinical.csv row 8 \(patient_id P006\): field 'os_months': found -1.0; "
                                         r"expected a number >= 0 \| .*clinical.csv row 10 \(patient_id P008\)") as info:
        _run_verb(verb, clinical, tmp_path / "out")
    assert info.value.code == 2
    frame.loc[[6, 8], "os_months"] = 5.0
    frame.to_csv(clinical, index=False)
    with pytest.raises(SystemExit, match=r"clinical.csv row 5 \(patient_id P003\): field 'death': found 2; "
                                         r"expected 0 or 1$"):
        _run_verb(verb, clinical, tmp_path / "out")


def test_cox_on_any_table_refuses_a_repeated_patient(tmp_path):
    """Before, cox counted a repeated patient twice (n = 40 for 39 patients) without a word."""
    frame = _clinical(40)
    frame.loc[39, "patient_id"] = "P000"
    frame.to_csv(tmp_path / "merged.csv", index=False)
    with pytest.raises(SystemExit, match=r"merged.csv row 41: patient_id: found 'P000' again \(first on row 2\)"):
        _run_verb("cox", tmp_path / "merged.csv", tmp_path / "out")


@pytest.mark.parametrize("verb, args", [
    ("km", ["--groups", "mrecist", "--out", "{out}"]),
    ("cox", ["--out", "{out}", "--covariates", "age", "--cv-folds", "0"]),
])
def test_command_line_prints_one_line_and_exits_2(tmp_path, verb, args):
    frame = _clinical()
    frame.loc[5, "patient_id"] = "P002"
    frame.to_csv(tmp_path / "clinical.csv", index=False)
    proc = subprocess.run([sys.executable, "-m", "analysis", verb, str(tmp_path / "clinical.csv"),
                           *[a.format(out=tmp_path / "out") for a in args]],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"{verb}: ")]
    assert len(lines) == 1 and "clinical.csv row 7: patient_id: found 'P002' again (first on row 4)" in lines[0]
    assert not (tmp_path / "out").exists()


def test_reader_types_like_read_clinical_and_keeps_file_order(tmp_path):
    from analysis.cohort import read_clinical

    frame = _clinical()
    frame.loc[2, "patient_id"] = "  P002 "  # validate strips cells: the same id
    frame.to_csv(tmp_path / "clinical.csv", index=False)
    got = read_clinical_table(tmp_path / "clinical.csv")
    pd.testing.assert_frame_equal(got, read_clinical(tmp_path / "clinical.csv"))
    assert got["patient_id"].tolist()[2] == "P002"
    # a table without the rule's columns is typed too, without a derived risk_class
    frame[["patient_id", "age", "death"]].to_csv(tmp_path / "c.csv", index=False)
    small = read_clinical_table(tmp_path / "c.csv")
    assert str(small["death"].dtype) == "Int64" and small["age"].dtype == float and "risk_class" not in small
    with pytest.raises(TableInputError, match=r"c.csv: no such file|nope.csv: no such file"):
        read_clinical_table(tmp_path / "nope.csv")


def test_classify_without_risk_class_or_its_rule_names_the_file(tmp_path):
    frame = _clinical()[["patient_id", "age", "death"]]
    frame.to_csv(tmp_path / "clinical.csv", index=False)
    with pytest.raises(SystemExit, match=r"classify: .*clinical.csv row 1 \(header\): no risk_class column and "
                                         r"column\(s\) 'os_months', 'imaging_high_risk' of the rule not found") as info:
        _run_verb("classify", tmp_path / "clinical.csv", tmp_path / "out")
    assert info.value.code == 2


# -------------------------------------------------------------------------------- datalists
def test_datalists_refuse_an_escaping_id(tmp_path, capsys):
    from analysis.datalists import datalists_cli

    cohort = tmp_path / "cohort"
    cohort.mkdir()
    frame = _clinical(8)
    frame.loc[1, "patient_id"] = ESCAPING
    frame.to_csv(cohort / "clinical.csv", index=False)
    with pytest.raises(SystemExit) as info:
        datalists_cli(str(cohort), out=str(tmp_path / "dl"))
    assert info.value.code == 2
    assert "clinical.csv row 3: patient_id: found '../../escaped'; expected letters, digits" in str(info.value)
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "dl").exists()


# -------------------------------------------------------------------------------- radiomics
def test_radiomics_refuses_bad_ids_before_any_work(tmp_path):
    from analysis import radiomics as R

    cohort = tmp_path / "cohort"
    (cohort / "images").mkdir(parents=True)
    (cohort / "masks").mkdir()
    frame = _clinical(4)
    frame.loc[2, "patient_id"] = ESCAPING
    frame.to_csv(cohort / "clinical.csv", index=False)
    out = tmp_path / "out" / "features.csv"
    with pytest.raises(SystemExit, match=r"radiomics: .*clinical.csv row 4: patient_id: found '\.\./\.\./escaped'") as info:
        R.radiomics_cli(str(cohort), str(cohort / "masks"), out=str(out))
    assert info.value.code == 2
    frame.loc[2, "patient_id"] = "P002"
    frame.to_csv(cohort / "clinical.csv", index=False)
    (cohort / "images" / "bad id").mkdir()
    (cohort / "images" / ".hidden").mkdir()  # not a patient: skipped
    with pytest.raises(SystemExit, match=r"radiomics: .*images/bad id \(a patient folder\): patient_id: found 'bad id'"):
        R.radiomics_cli(str(cohort), str(cohort / "masks"), out=str(out))
    with pytest.raises(ValueError, match=r"patients\[1\]: patient_id: found '\.\./x'"):
        R.extract_all(cohort, cohort / "masks", patients=["P000", "../x"], progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "escaped").exists()


def test_radiomics_cache_file_stays_inside_the_cache_folder(tmp_path):
    """The cache writer itself (a worker's task, whatever its origin) refuses an id leading out."""
    from analysis import radiomics as R

    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"not read: the cache path is checked first")
    cache = tmp_path / "out" / "cache"
    task = {"patient_id": ESCAPING, "image": str(scan), "mask": str(scan), "labels": [2],
            "params": str(R.default_params_path()), "settings_sha256": "0" * 64, "cache_dir": str(cache)}
    with pytest.raises(ValueError, match=r"resolves to .*escaped_.*not inside the output folder .*cache"):
        R.extract_patient(task)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["scan.nii.gz"]


# ------------------------------------------------------------------------- study: _masks
def _masks_context(tmp_path: Path, ids: list[str]):
    cohort = tmp_path / "cohort"
    frame = _clinical(len(ids)).assign(patient_id=ids)
    cohort.mkdir()
    frame.to_csv(cohort / "clinical.csv", index=False)
    for pid in ids:
        for tp in ("t0", "t1", "t2"):
            label = cohort / "labels" / pid / f"{tp}.nii.gz"
            if ".." not in pid:
                label.parent.mkdir(parents=True, exist_ok=True)
                label.write_bytes(b"label")
    return SimpleNamespace(cohort=cohort, clinical=cohort / "clinical.csv", masks_source="auto",
                           path=lambda *parts: tmp_path / "study" / Path(*parts))


class _Bar:
    def reset(self, total=None):
        pass

    def update(self, n=1):
        pass


def test_study_masks_refuse_an_escaping_id(tmp_path):
    from analysis import study

    ctx = _masks_context(tmp_path, ["P000", ESCAPING])
    staging = tmp_path / "study" / "masks"
    with pytest.raises(ValueError, match=r"clinical.csv row 3: patient_id: found '\.\./\.\./escaped'"):
        study._masks(ctx, staging, _Bar())
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "study" / "escaped").exists()


def test_study_masks_written_only_inside_staging(tmp_path):
    """A valid id whose staging folder leads out (a symbolic link) is refused by path_under."""
    from analysis import study

    ctx = _masks_context(tmp_path, ["P000", "P001"])
    staging = tmp_path / "study" / "masks"
    staging.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (staging / "P001").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=r"P001/t0.nii.gz.*not inside the output folder .*masks"):
        study._masks(ctx, staging, _Bar())
    assert list((tmp_path / "elsewhere").iterdir()) == []
    (staging / "P001").unlink()
    assert study._masks(ctx, staging, _Bar()) == {"manual": 6}
    assert (staging / "P001" / "t2.nii.gz").read_bytes() == b"label"


# ------------------------------------------------------------------------- mrecist and burden
def _files(root: Path) -> set[str]:
    """Every path under ``root`` (files and folders), relative: what a refused run must leave as it was."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _id_cohort(tmp_path: Path, ids: list[str] | None, case: str = "csv") -> Path:
    """A cohort folder with empty images/ and labels/ and, unless ``ids`` is None, a clinical.csv."""
    cohort = tmp_path / "cohort"
    for sub in ("images", "labels"):
        (cohort / sub).mkdir(parents=True)
    if ids is not None:
        _write(_clinical(len(ids)).assign(patient_id=ids), cohort / "clinical.csv", case)
    return cohort


def _mrecist(cohort: Path, out: Path):
    from analysis.mrecist import mrecist_cli

    return mrecist_cli(cohort=str(cohort), out=str(out / "mrecist.csv"))


def _burden(cohort: Path, out: Path):
    from analysis.burden import burden_cli

    return burden_cli(str(cohort), str(out), n_boot=0)


ID_VERBS = {"mrecist": _mrecist, "burden": _burden}
RULE = r"expected letters, digits, '_' or '-' only \(the pattern \^\[A-Za-z0-9_-\]\+\$\)"


@pytest.mark.parametrize("verb", sorted(ID_VERBS))
def test_mrecist_and_burden_refuse_an_escaping_id_in_clinical_csv(tmp_path, capsys, verb):
    cohort = _id_cohort(tmp_path, ["P000", ESCAPING, "P002"])
    before = _files(tmp_path)
    with pytest.raises(SystemExit) as info:
        ID_VERBS[verb](cohort, tmp_path / "out")
    assert info.value.code == 2
    text = str(info.value)
    assert re.fullmatch(rf"{verb}: .*cohort/clinical.csv row 3: patient_id: found '\.\./\.\./escaped'; {RULE}.*",
                        text), text
    assert capsys.readouterr().err == text + "\n"
    assert _files(tmp_path) == before  # nothing written, inside the output folder or out of it


@pytest.mark.parametrize("verb", sorted(ID_VERBS))
def test_mrecist_and_burden_refuse_a_patient_folder_outside_the_rule(tmp_path, capsys, verb):
    """No clinical.csv: the patients are folder names (images/ for mrecist, the masks for
    burden_features; the burden verb itself needs clinical.csv for the labels); a hidden folder is
    not a patient, a name breaking the rule is refused. A folder name cannot hold '/', so the rule's
    other side is tested: a space."""
    cohort = _id_cohort(tmp_path, None)
    folder = cohort / ("images" if verb == "mrecist" else "labels")
    for name in ("P001", ".hidden", "bad id"):
        (folder / name).mkdir()
    before = _files(tmp_path)
    message = rf"{folder.name}/bad id \(a patient folder\): patient_id: found 'bad id'; {RULE}"
    if verb == "mrecist":
        with pytest.raises(SystemExit) as info:
            _mrecist(cohort, tmp_path / "out")
        assert info.value.code == 2
        assert re.fullmatch(rf"mrecist: .*{message}.*", str(info.value)), str(info.value)
        assert capsys.readouterr().err.count("\n") == 1
    else:
        from analysis.burden import burden_features

        with pytest.raises(ValueError, match=message):
            burden_features(cohort)
    assert _files(tmp_path) == before
    (folder / "bad id").rmdir()
    if verb == "mrecist":
        from analysis.mrecist import mrecist_from_masks

        table = mrecist_from_masks(cohort)  # .hidden skipped: one patient, without scans
        assert table["patient_id"].tolist() == ["P001"] and table["best_response"].tolist() == ["NA"]
    else:
        from analysis.burden import burden_features

        with pytest.raises(FileNotFoundError, match=r"3 mask file\(s\) missing: .*P001/t0.nii.gz") as missing:
            burden_features(cohort)
        assert ".hidden" not in str(missing.value)


def test_mrecist_and_burden_refuse_an_escaping_id_given_directly(tmp_path):
    """The functions behind the verbs hold ids given in code to the same rule, before any path is made."""
    from analysis.burden import burden_features, predict_burden_cv4
    from analysis.mrecist import measure_patient

    cohort = _id_cohort(tmp_path, None)
    with pytest.raises(ValueError, match=rf"measure_patient: patient_id: found '\.\./\.\./escaped'; {RULE}"):
        measure_patient(cohort, cohort / "labels", ESCAPING)
    with pytest.raises(ValueError, match=rf"patient_ids\[1\]: patient_id: found '\.\./\.\./escaped'; {RULE}"):
        burden_features(cohort, patient_ids=["P000", ESCAPING])
    table = pd.DataFrame({"patient_id": ["P000", ESCAPING], "risk_class": [0, 1]})
    with pytest.raises(ValueError, match=r"clinical table row 2: patient_id: found '\.\./\.\./escaped'"):
        predict_burden_cv4(pd.DataFrame({"patient_id": ["P000"], "f": [1.0]}), table)
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()


def test_mrecist_diameters_follow_the_id_rule(tmp_path):
    from analysis.mrecist import mrecist_cli

    src = tmp_path / "diameters.csv"
    pd.DataFrame({"patient_id": ["a", ESCAPING, "a"], "sum_mm_t0": [40, 30, 20]}).to_csv(src, index=False)
    with pytest.raises(SystemExit, match=r"mrecist: 2 problems: .*diameters.csv row 3: patient_id: found "
                                         r"'\.\./\.\./escaped'.* \| .*diameters.csv row 4: patient_id: found "
                                         r"'a' again \(first on row 2\)") as info:
        mrecist_cli(diameters=str(src), out=str(tmp_path / "out" / "mrecist.csv"))
    assert info.value.code == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["duplicate", "empty"])
@pytest.mark.parametrize("verb", sorted(ID_VERBS))
def test_mrecist_and_burden_refuse_a_repeated_id_or_an_empty_clinical_csv(tmp_path, capsys, verb, case):
    cohort = _id_cohort(tmp_path, ["P000", "P001", "P000"], case)
    message = {"duplicate": r"clinical.csv row 4: patient_id: found 'P000' again \(first on row 2\); "
                            r"expected one row per patient",
               "empty": r"clinical.csv: empty file; expected a comma-separated table with a header row"}[case]
    before = _files(tmp_path)
    with pytest.raises(SystemExit) as info:
        ID_VERBS[verb](cohort, tmp_path / "out")
    assert info.value.code == 2
    text = str(info.value)
    assert text.startswith(f"{verb}: ") and "\n" not in text and re.search(message, text), text
    assert capsys.readouterr().err == text + "\n"
    assert _files(tmp_path) == before


@pytest.mark.parametrize("verb, case, args", [
    ("mrecist", "duplicate", ["--cohort", "{cohort}", "--out", "{out}/mrecist.csv"]),
    ("burden", "empty", ["{cohort}", "--out", "{out}"]),
])
def test_mrecist_and_burden_command_line_one_line_exit_2(tmp_path, verb, case, args):
    cohort = _id_cohort(tmp_path, ["P000", "P001", "P000"], case)
    before = _files(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "analysis", verb,
                           *[a.format(cohort=cohort, out=tmp_path / "out") for a in args]],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"{verb}: ")]
    expected = {"duplicate": "clinical.csv row 4: patient_id: found 'P000' again (first on row 2)",
                "empty": "clinical.csv: empty file; expected a comma-separated table"}[case]
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert _files(tmp_path) == before
