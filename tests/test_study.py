"""The whole study on a tiny synthetic cohort: outputs, resume, change propagation, kill, bad input.

One tiny study (10 patients, 2 folds, 64^3 network input, feature_size 12, one epoch) is run once per
session; the tests that change things work on copies of its output folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from analysis.study import STAGE_NAMES, run_study

pytestmark = pytest.mark.slow

TINY = dict(patients=10, shape=64, net_size=64, seg_roi=64, feature_size=12, seg_epochs=1, prog_epochs=1, folds=2,
            bootstrap=200, radiomics_jobs=2)
TINY_FLAGS = ["--profile=scratch"] + [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("study") / "out"
    results, summary = run_study(out=out, profile="scratch", progress=False, **TINY)
    failed = [(r.name, r.message) for r in results if r.status == "failed"]
    assert not failed, failed
    return out, results


def copy_study(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def statuses(results) -> dict[str, str]:
    return {r.name: r.status for r in results}


def test_study_produces_every_output(study):
    out, results = study
    assert [r.name for r in results] == list(STAGE_NAMES)
    assert set(statuses(results).values()) == {"ran"}
    clinical = pd.read_csv(out / "cohort" / "clinical.csv")
    ids = list(clinical["patient_id"])
    expected = [
        "manifest.json", "validation/summary.json", "datalists/segmentation.json", "datalists/prognosis.json",
        "segmentation/models/model.pt", "masks/sources.csv", "prognosis/oof_predictions.csv",
        "prognosis/evaluation/metrics.json", "radiomics/features.csv", "classify/summary.json",
        "classify/radiomic_score.csv", "mrecist/mrecist.csv", "km/tables/logrank.csv", "cox/summary.json",
        "cox/tables/cox_summary.csv", "nomogram/summary.json", "table1/table1.csv", "report.html",
    ]
    missing = [p for p in expected if not (out / p).exists()]
    assert not missing, missing
    # every scan has a mask with its image's geometry
    for pid in ids:
        for tp in ("t0", "t1", "t2"):
            image = nib.load(out / "cohort" / "images" / pid / f"{tp}.nii.gz")
            mask = nib.load(out / "masks" / pid / f"{tp}.nii.gz")
            assert mask.shape == image.shape
            np.testing.assert_allclose(mask.affine, image.affine, atol=1e-3)
    # out-of-fold predictions: every labelled patient exactly once, probabilities sum to 1
    oof = pd.read_csv(out / "prognosis" / "oof_predictions.csv")
    labelled = [d["patient_id"] for d in json.loads((out / "datalists" / "prognosis.json").read_text())["training"]]
    assert sorted(oof["patient_id"]) == sorted(labelled)
    np.testing.assert_allclose(oof[[f"prob_{k}" for k in range(4)]].sum(axis=1), 1.0, atol=1e-5)
    assert list((out / "gradcam").rglob("*.png")), "Grad-CAM++ montages missing"
    # no staging leftovers and no temporary files anywhere
    assert not list(out.rglob(".*.tmp")) and not any((out / ".partial").glob("*"))


def test_report_names_each_part_and_says_synthetic(study):
    out, _ = study
    html = (out / "report.html").read_text()
    for part in ("Segmentation", "ProgSwin-UNETR", "Grad-CAM", "Radiomics", "mRECIST", "Kaplan", "Cox",
                 "Nomogram", "Table 1"):
        assert part.lower() in html.lower(), part
    assert "synthetic" in html.lower()
    assert "<img" in html and 'src="http' not in html


def test_second_run_skips_every_stage(study, tmp_path):
    out = copy_study(study[0], tmp_path / "again")
    results, _ = run_study(out=out, profile="scratch", progress=False, **TINY)
    assert set(statuses(results).values()) == {"skipped"}


def test_changing_one_input_redoes_exactly_the_stages_downstream(study, tmp_path):
    out = copy_study(study[0], tmp_path / "changed")
    clinical = out / "cohort" / "clinical.csv"
    frame = pd.read_csv(clinical, dtype=str, keep_default_na=False)
    frame.loc[0, "age"] = str(float(frame.loc[0, "age"]) + 1.0)  # age feeds Table 1 and the Cox model only
    frame.to_csv(clinical, index=False)
    results, _ = run_study(out=out, cohort=None, profile="scratch", progress=False, **TINY)
    ran = {name for name, s in statuses(results).items() if s == "ran"}
    assert ran == {"validate", "datalists", "masks", "classify", "km", "cox", "nomogram", "table1", "report"}
    # the expensive image stages were not touched
    for name in ("segmentation", "segmentation_inference", "prognosis", "gradcam", "radiomics", "mrecist"):
        assert statuses(results)[name] == "skipped", name


def test_force_redoes_one_stage(study, tmp_path):
    out = copy_study(study[0], tmp_path / "forced")
    results, _ = run_study(out=out, profile="scratch", progress=False, force=["table1"], **TINY)
    assert {n for n, s in statuses(results).items() if s == "ran"} == {"table1"}


def test_killed_run_resumes_without_redoing_finished_stages(study, tmp_path):
    out = copy_study(study[0], tmp_path / "killed")
    before = (out / "gradcam").stat().st_mtime_ns
    old_pngs = sorted(p.relative_to(out) for p in (out / "gradcam").rglob("*.png"))
    cmd = [sys.executable, "-m", "analysis", "study", "--out", str(out), "--quiet", "--force", "gradcam", *TINY_FLAGS]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / ".partial").glob("gradcam-*")):
        time.sleep(0.05)
    assert list((out / ".partial").glob("gradcam-*")), "the forced stage never started"
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)  # like a kill of the whole job, bundle subprocess included
    proc.wait(timeout=30)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["gradcam"]["status"] == "running"
    # the published output is the old, complete one
    assert sorted(p.relative_to(out) for p in (out / "gradcam").rglob("*.png")) == old_pngs
    assert (out / "gradcam").stat().st_mtime_ns == before

    results, _ = run_study(out=out, profile="scratch", progress=False, **TINY)
    st = statuses(results)
    assert st["gradcam"] == "ran"
    assert all(st[n] == "skipped" for n in STAGE_NAMES[: STAGE_NAMES.index("gradcam")])
    assert not any((out / ".partial").glob("*"))


def test_bad_cohort_stops_before_training_with_the_validation_report(study, tmp_path):
    cohort = tmp_path / "bad_cohort"
    shutil.copytree(study[0] / "cohort", cohort)
    pid = sorted(p.name for p in (cohort / "images").iterdir())[0]
    label = cohort / "labels" / pid / "t0.nii.gz"
    img = nib.load(label)
    arr = np.asarray(img.dataobj).copy()
    arr[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(arr, img.affine, img.header), label)
    (cohort / "images" / pid / "t2.nii.gz").unlink()
    out = tmp_path / "bad_out"
    proc = subprocess.run([sys.executable, "-m", "analysis", "study", "--cohort", str(cohort), "--out", str(out),
                           "--quiet", *TINY_FLAGS], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert f"{label}: label values: found value(s) 3" in proc.stderr
    assert "time point t2: found missing" in proc.stderr
    assert not (out / "segmentation").exists() and not (out / "datalists").exists()
