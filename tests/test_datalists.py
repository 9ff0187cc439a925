"""Datalists: patient-level folds that are disjoint, covering and stratified; relative paths."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from analysis.cohort import read_clinical
from analysis.datalists import assign_folds, write_datalists


def test_folds_disjoint_covering_and_stratified():
    labels = pd.Series([0] * 20 + [1] * 12 + [2] * 8 + [3] * 16)
    folds = assign_folds(labels, folds=4, seed=3)
    assert set(folds) == {0, 1, 2, 3}
    assert len(folds) == len(labels)  # every patient in exactly one fold
    for cls, n in Counter(labels).items():
        per_fold = Counter(folds[labels == cls])
        # stratified: each class spread as evenly as possible (counts differ by at most 1)
        assert max(per_fold.values()) - min(per_fold.values()) <= 1, (cls, per_fold)
        assert sum(per_fold.values()) == n
    assert folds.equals(assign_folds(labels, folds=4, seed=3))  # deterministic for a seed


def test_too_few_patients_for_folds_is_a_clear_error():
    with pytest.raises(ValueError, match="3 labelled patient"):
        assign_folds(pd.Series([0, 1, 2]), folds=4)


def test_datalists_contract(tiny_cohort, tmp_path, caplog):
    cohort = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, cohort)
    caplog.set_level("INFO")
    paths = write_datalists(cohort, out=tmp_path / "dl", folds=4, seed=0)
    seg = json.loads(paths["segmentation"].read_text())
    prog = json.loads(paths["prognosis"].read_text())
    clin = read_clinical(cohort / "clinical.csv")

    # segmentation: patient-level held-out split, every scan listed for inference
    train_ids = {d["patient_id"] for d in seg["training"]}
    val_ids = {d["patient_id"] for d in seg["validation"]}
    assert train_ids and val_ids and not (train_ids & val_ids)
    assert len(seg["testing"]) == 3 * len(clin)
    for item in seg["training"] + seg["validation"]:
        assert (cohort / item["image"]).exists() and (cohort / item["label"]).exists()
        assert not Path(item["image"]).is_absolute()

    # prognosis: labelled patients exactly once, undefined class excluded with a logged reason
    defined = clin[clin["risk_class"].notna()]
    ids = [d["patient_id"] for d in prog["training"]]
    assert sorted(ids) == sorted(defined["patient_id"])
    assert {d["patient_id"] for d in prog["excluded"]} == set(clin.loc[clin["risk_class"].isna(), "patient_id"])
    for e in prog["excluded"]:
        assert "risk_class undefined" in e["reason"]
        assert e["patient_id"] in caplog.text
    for d in prog["training"]:
        assert d["label"] == int(defined.set_index("patient_id").loc[d["patient_id"], "risk_class"])
        assert 0 <= d["fold"] < 4
        for tp in ("t0", "t1", "t2"):
            assert (cohort / d[f"image_{tp}"]).exists() and (cohort / d[f"mask_{tp}"]).exists()


def test_cohort_folder_can_move(tiny_cohort, tmp_path):
    cohort = tmp_path / "a" / "cohort"
    shutil.copytree(tiny_cohort, cohort)
    write_datalists(cohort, folds=2, seed=0)
    moved = tmp_path / "b" / "cohort"
    shutil.move(str(cohort), str(moved))
    prog = json.loads((moved / "datalists" / "prognosis.json").read_text())
    assert all((moved / d["image_t0"]).exists() for d in prog["training"])


def test_masks_outside_the_cohort_are_relative_to_dataset_dir(tiny_cohort, tmp_path):
    cohort = tmp_path / "study" / "cohort"
    shutil.copytree(tiny_cohort, cohort)
    masks = tmp_path / "study" / "masks"
    paths = write_datalists(cohort, out=tmp_path / "study" / "datalists", masks=masks, folds=2)
    prog = json.loads(paths["prognosis"].read_text())
    first = prog["training"][0]
    assert first["mask_t0"] == f"../masks/{first['patient_id']}/t0.nii.gz"


def test_tiny_cohorts_still_get_stratified_covering_folds():
    labels = pd.Series([0, 0, 1, 1, 2, 3])  # no class can fill 4 folds: sklearn would refuse
    folds = assign_folds(labels, folds=4, seed=0)
    assert sorted(Counter(folds).values()) == [1, 1, 2, 2]  # every fold used, sizes balanced
    for cls in (0, 1):
        assert folds[labels == cls].nunique() == 2  # a class's patients land in different folds
