"""analysis.burden: hand-computed features, the datalist's folds, OOF contract, CLI outputs, bad input."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import metrics
from analysis.burden import (
    EPS_ML,
    FEATURE_COLUMNS,
    burden_cli,
    burden_features,
    burden_model,
    predict_burden_cv4,
)
from analysis.datalists import write_datalists
from analysis.io import save_nifti
from analysis.models import PROB_COLUMNS

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPE = (12, 12, 6)
VOX_20 = np.diag([2.0, 2.0, 5.0, 1.0])  # 2 x 2 x 5 mm = 20 mm^3 = 0.02 mL
FLIPPED_20 = np.array([[-2.0, 0, 0, 30.0], [0, 2.0, 0, -4.0], [0, 0, 5.0, 7.0], [0, 0, 0, 1]])  # same volume
VOX_2_5 = np.diag([1.0, 1.0, 2.5, 1.0])  # 2.5 mm^3


def _liver() -> np.ndarray:
    m = np.zeros(SHAPE, dtype=np.uint8)
    m[1:11, 1:11, 1:5] = 1  # 10 x 10 x 4 = 400 voxels of liver (tumour is drawn inside it)
    return m


def _write(folder: Path, pid: str, tp: str, mask: np.ndarray, affine: np.ndarray) -> Path:
    return save_nifti(folder / pid / f"{tp}.nii.gz", mask, affine, dtype=np.uint8)


@pytest.fixture
def hand_cohort(tmp_path) -> Path:
    """Two patients with burden known by hand (values in the test below)."""
    cohort = tmp_path / "hand"
    labels = cohort / "labels"
    # P1 t0: two separate blobs, 2x2x1 = 4 and 3x1x1 = 3 voxels, at 0.02 mL per voxel
    m = _liver()
    m[2:4, 2:4, 1] = 2
    m[7:10, 7, 3] = 2
    _write(labels, "P1", "t0", m, VOX_20)
    # P1 t1: two voxels touching only at a corner: one nodule with 26-connectivity (two with 6)
    m = _liver()
    m[3, 3, 2] = 2
    m[4, 4, 3] = 2
    _write(labels, "P1", "t1", m, FLIPPED_20)
    # P1 t2: complete response, no tumour left
    _write(labels, "P1", "t2", _liver(), VOX_20)
    # P2: no tumour at baseline (v0 = 0), then an 8-voxel nodule of 2.5 mm^3 voxels (0.02 mL)
    _write(labels, "P2", "t0", _liver(), VOX_20)
    m = _liver()
    m[5:7, 5:7, 2:4] = 2
    _write(labels, "P2", "t1", m, VOX_2_5)
    _write(labels, "P2", "t2", m, VOX_2_5)
    pd.DataFrame({"patient_id": ["P2", "P1"]}).to_csv(cohort / "clinical.csv", index=False)
    return cohort


def test_burden_features_hand_computed(hand_cohort):
    f = burden_features(hand_cohort)
    assert list(f.columns) == ["patient_id", *FEATURE_COLUMNS]
    assert f["patient_id"].tolist() == ["P2", "P1"]  # clinical.csv order
    p1, p2 = f.set_index("patient_id").loc["P1"], f.set_index("patient_id").loc["P2"]
    expected_p1 = {
        "tumour_volume_ml_t0": 0.14, "tumour_volume_ml_t1": 0.04, "tumour_volume_ml_t2": 0.0,
        "tumour_fraction_t0": 7 / 400, "tumour_fraction_t1": 2 / 400, "tumour_fraction_t2": 0.0,
        "nodule_count_t0": 2, "nodule_count_t1": 1, "nodule_count_t2": 0,
        "tumour_volume_change_t1": math.log((0.04 + 0.1) / (0.14 + 0.1)),
        "tumour_volume_change_t2": math.log(0.1 / (0.14 + 0.1)),
        "tumour_fraction_change_t1": 2 / 400 - 7 / 400, "tumour_fraction_change_t2": -7 / 400,
        "nodule_count_change_t1": -1, "nodule_count_change_t2": -2,
    }
    expected_p2 = {
        "tumour_volume_ml_t0": 0.0, "tumour_volume_ml_t1": 0.02, "tumour_volume_ml_t2": 0.02,
        "tumour_fraction_t0": 0.0, "tumour_fraction_t1": 8 / 400, "tumour_fraction_t2": 8 / 400,
        "nodule_count_t0": 0, "nodule_count_t1": 1, "nodule_count_t2": 1,
        # v0 = 0: the log ratio stays finite (a relative change would divide by zero)
        "tumour_volume_change_t1": math.log(1.2), "tumour_volume_change_t2": math.log(1.2),
        "tumour_fraction_change_t1": 8 / 400, "tumour_fraction_change_t2": 8 / 400,
        "nodule_count_change_t1": 1, "nodule_count_change_t2": 1,
    }
    assert EPS_ML == 0.1
    for row, expected in ((p1, expected_p1), (p2, expected_p2)):
        for col, value in expected.items():
            assert row[col] == pytest.approx(value, abs=1e-12), col


# ------------------------------------------------------------------------ folds and OOF
@pytest.fixture(scope="module")
def shuffled_cohort(small_cohort, tmp_path_factory) -> Path:
    """small_cohort with clinical.csv rows shuffled and one patient censored at 20 months.

    Shuffled so that an implementation ordering patients by id (not by clinical.csv, as the
    datalist does) gets different folds; the censored patient has no risk class.
    """
    cohort = tmp_path_factory.mktemp("burden") / "cohort"
    cohort.mkdir()
    for name in ("images", "labels"):
        os.symlink(small_cohort / name, cohort / name)
    clin = pd.read_csv(small_cohort / "clinical.csv", dtype=str, keep_default_na=False)
    clin = clin.sample(frac=1.0, random_state=5).reset_index(drop=True)
    clin.loc[2, ["os_months", "death", "risk_class"]] = ["20.0", "0", ""]
    clin.to_csv(cohort / "clinical.csv", index=False)
    return cohort


@pytest.fixture(scope="module")
def burden_run(shuffled_cohort) -> dict:
    feats = burden_features(shuffled_cohort)
    reversed_feats = feats.iloc[::-1].reset_index(drop=True)  # feature order must not matter
    oof = predict_burden_cv4(reversed_feats, shuffled_cohort / "clinical.csv", seed=0)
    paths = write_datalists(shuffled_cohort, out=shuffled_cohort.parent / "dl", seed=0)
    prog = json.loads(paths["prognosis"].read_text())
    return {"features": feats, "oof": oof, "prognosis": prog}


def test_folds_are_the_prognosis_datalist_folds(burden_run):
    prog = burden_run["prognosis"]
    dl_folds = {d["patient_id"]: d["fold"] for d in prog["training"]}
    ours = dict(zip(burden_run["oof"]["patient_id"], burden_run["oof"]["fold"]))
    assert ours == dl_folds
    assert set(ours.values()) == {0, 1, 2, 3}
    labels = {d["patient_id"]: d["label"] for d in prog["training"]}
    assert dict(zip(burden_run["oof"]["patient_id"], burden_run["oof"]["label"])) == labels


def test_oof_covers_every_labelled_patient_once(burden_run, shuffled_cohort):
    oof, prog = burden_run["oof"], burden_run["prognosis"]
    assert list(oof.columns) == ["patient_id", "fold", *PROB_COLUMNS, "pred_class", "label"]
    labelled = sorted(d["patient_id"] for d in prog["training"])
    assert oof["patient_id"].tolist() == labelled  # each once, sorted, the censored one absent
    censored = [e["patient_id"] for e in prog["excluded"]]
    assert len(censored) == 1 and censored[0] not in set(oof["patient_id"])
    assert len(burden_run["features"]) == 12  # features for every patient, labelled or not
    p = oof[PROB_COLUMNS].to_numpy()
    assert np.allclose(p.sum(axis=1), 1.0, atol=1e-9) and (p >= 0).all()
    assert (oof["pred_class"].to_numpy() == p.argmax(axis=1)).all()


def test_absent_training_class_gets_probability_zero():
    rng = np.random.default_rng(0)
    labels = [0] * 4 + [1] * 4 + [3]  # class 2 absent; class 3 in a single fold's test set only
    ids = [f"Q{i}" for i in range(len(labels))]
    feats = pd.DataFrame(rng.normal(size=(len(ids), len(FEATURE_COLUMNS))), columns=FEATURE_COLUMNS)
    feats.insert(0, "patient_id", ids)
    clin = pd.DataFrame({"patient_id": ids, "risk_class": labels})
    oof = predict_burden_cv4(feats, clin)
    assert sorted(oof["patient_id"]) == sorted(ids)
    assert (oof["prob_2"] == 0).all()
    fold3 = oof.loc[oof["patient_id"] == "Q8", "fold"].item()
    assert (oof.loc[oof["fold"] == fold3, "prob_3"] == 0).all()  # never seen in that fold's training
    assert (oof.loc[oof["fold"] != fold3, "prob_3"] > 0).all()
    assert np.allclose(oof[PROB_COLUMNS].sum(axis=1), 1.0)


def test_burden_model_is_a_balanced_multinomial_pipeline():
    pipe = burden_model(seed=3)
    assert [name for name, _ in pipe.steps] == ["scale", "clf"]
    clf = pipe.named_steps["clf"]
    assert clf.class_weight == "balanced" and clf.C == 1.0 and clf.random_state == 3
    X = np.random.default_rng(0).normal(size=(40, 3))
    y = np.arange(40) % 4
    assert pipe.fit(X, y).predict_proba(X).shape == (40, 4)


# --------------------------------------------------------------------------------- CLI
def test_cli_writes_every_file_and_compares_with_dl(shuffled_cohort, burden_run, tmp_path, caplog):
    oof = burden_run["oof"]
    rng = np.random.default_rng(1)
    dl = oof[["patient_id", "fold"]].iloc[1:].copy()  # the first labelled patient has no dl row
    probs = rng.dirichlet(np.ones(4), size=len(dl))
    dl[PROB_COLUMNS] = probs
    dl["pred_class"] = probs.argmax(axis=1)
    dl = pd.concat([dl, pd.DataFrame([{"patient_id": "HCC999", "fold": -1, "prob_0": 1.0, "prob_1": 0.0,
                                       "prob_2": 0.0, "prob_3": 0.0, "pred_class": 0}])])
    dl_path = tmp_path / "dl_predictions.csv"
    dl.to_csv(dl_path, index=False)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="analysis.burden"):
        summary = burden_cli(str(shuffled_cohort), str(out), dl_predictions=str(dl_path), n_boot=200)
    assert "macro AUC" in summary and str(out) in summary
    for rel in ("features.csv", "oof_predictions.csv", "evaluation/metrics.json", "evaluation/per_class.csv",
                "evaluation/confusion.csv", "comparison.csv"):
        assert (out / rel).is_file(), rel
    assert not list(out.rglob(".*"))  # no temporary file left behind
    written = pd.read_csv(out / "oof_predictions.csv", dtype={"patient_id": str})
    pd.testing.assert_frame_equal(written, oof, check_dtype=False)
    assert len(pd.read_csv(out / "features.csv")) == 12
    res = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert set(res) == {"auc_per_class", "auc_ci", "macro_auc", "macro_auc_ci", "accuracy", "n"}
    assert res["n"] == len(oof)
    assert res["macro_auc"] == pytest.approx(metrics.macro_auc(oof["label"], oof[PROB_COLUMNS].to_numpy()))
    per_class = pd.read_csv(out / "evaluation" / "per_class.csv")
    assert per_class["class"].astype(str).tolist() == ["0", "1", "2", "3", "macro"]
    conf = pd.read_csv(out / "evaluation" / "confusion.csv")
    assert conf[[f"pred_{k}" for k in range(4)]].to_numpy().sum() == len(oof)
    comp = pd.read_csv(out / "comparison.csv")
    assert comp["auc"].astype(str).tolist() == ["0", "1", "2", "3", "macro"]
    assert (comp["n"] == len(oof) - 1).all()
    assert np.allclose(comp["difference"], comp["auc_dl"] - comp["auc_burden"], equal_nan=True)
    left_out = oof["patient_id"].iloc[0]
    text = caplog.text
    assert left_out in text and "HCC999" in text


def test_help_lists_every_flag_with_its_description():
    run = subprocess.run([sys.executable, "-m", "analysis", "burden", "--help"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PAGER": "cat"})
    assert run.returncode == 0, run.stderr
    text = run.stdout + run.stderr  # fire writes help to stderr when it is not a terminal
    for flag, words in (("--masks", "folder of masks"), ("--clinical", "clinical.csv with patient_id"),
                        ("--dl_predictions", "out-of-fold predictions"), ("--seed", "fold seed"),
                        ("--n_boot", "bootstrap resamples")):
        assert flag in text and words in text, flag
    listing = subprocess.run([sys.executable, "-m", "analysis"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=60)
    assert "burden" in listing.stdout


# ------------------------------------------------------------------------------ bad input
def test_missing_mask_names_the_file(hand_cohort, tmp_path):
    missing = hand_cohort / "labels" / "P1" / "t1.nii.gz"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=str(missing)):
        burden_features(hand_cohort)
    masks = tmp_path / "seg_masks"
    shutil.copytree(hand_cohort / "labels", masks)
    (masks / "P2" / "t2.nii.gz").unlink()
    with pytest.raises(FileNotFoundError) as err:  # every missing file listed at once
        burden_features(hand_cohort, masks=masks)
    for gone in (masks / "P1" / "t1.nii.gz", masks / "P2" / "t2.nii.gz"):
        assert str(gone) in str(err.value)


def test_truncated_mask_names_the_file(hand_cohort):
    path = hand_cohort / "labels" / "P2" / "t1.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match=f"{path}: cannot read as NIfTI"):
        burden_features(hand_cohort)


def test_bad_mask_values_and_empty_masks_name_the_file(hand_cohort):
    m = _liver()
    m[2, 2, 2] = 3
    path = _write(hand_cohort / "labels", "P1", "t2", m, VOX_20)
    with pytest.raises(ValueError, match=f"{path}: mask values \\[3\\]"):
        burden_features(hand_cohort)
    path = _write(hand_cohort / "labels", "P1", "t2", np.zeros(SHAPE, dtype=np.uint8), VOX_20)
    with pytest.raises(ValueError, match=f"{path}: no liver or tumour voxel"):
        burden_features(hand_cohort)


def test_clinical_without_patient_id_is_a_clear_error(shuffled_cohort, burden_run, tmp_path):
    bad = tmp_path / "clinical.csv"
    clin = pd.read_csv(shuffled_cohort / "clinical.csv")
    clin.rename(columns={"patient_id": "id"}).to_csv(bad, index=False)
    missing = rf"{bad} row 1 \(header\): column 'patient_id' not found; expected a column of each name"
    with pytest.raises(ValueError, match=missing):
        predict_burden_cv4(burden_run["features"], bad)
    with pytest.raises(ValueError, match="clinical table: no patient_id column"):
        predict_burden_cv4(burden_run["features"], clin.rename(columns={"patient_id": "id"}))
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=f"burden: {missing}") as info:
        burden_cli(str(shuffled_cohort), str(out), clinical=str(bad))
    assert info.value.code == 2
    assert not out.exists()  # nothing written


def test_labelled_patient_without_features_is_an_error(shuffled_cohort, burden_run):
    feats = burden_run["features"]
    labelled = burden_run["oof"]["patient_id"].iloc[3]
    with pytest.raises(ValueError, match=f"no burden features: \\['{labelled}'\\]"):
        predict_burden_cv4(feats[feats["patient_id"] != labelled], shuffled_cohort / "clinical.csv")
