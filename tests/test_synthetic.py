"""The synthetic cohort generator: determinism, geometry, labels, marginals and a learnable signal."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from analysis.cohort import CLASS_NAMES, REQUIRED_COLUMNS, TIMEPOINTS, derive_risk_class, read_clinical
from analysis.io import file_sha256
from analysis.synthetic import CLINICAL_COLUMNS, make_clinical, make_cohort, n_slices_for, synth_cli


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): file_sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "a"
    make_cohort(out, n_patients=6, shape=32, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def table181() -> pd.DataFrame:
    return make_clinical(181, seed=0)


# ------------------------------------------------------------------------------- layout
def test_layout_and_cohort_json(cohort):
    meta = json.loads((cohort / "cohort.json").read_text())
    assert meta == {"synthetic": True, "generator": "analysis.synthetic", "seed": 0, "n_patients": 6,
                    "shape": 32, "version": 1}
    clinical = pd.read_csv(cohort / "clinical.csv", dtype=str, keep_default_na=False)
    assert list(clinical.columns) == list(CLINICAL_COLUMNS)
    assert set(REQUIRED_COLUMNS) <= set(clinical.columns)
    assert list(clinical.patient_id) == [f"HCC{i:03d}" for i in range(1, 7)]
    for pid in clinical.patient_id:
        for folder in ("images", "labels"):
            assert sorted(p.name for p in (cohort / folder / pid).iterdir()) == [f"{tp}.nii.gz" for tp in TIMEPOINTS]


def test_byte_identical_for_a_seed_and_different_for_another(cohort, tmp_path):
    again = make_cohort(tmp_path / "b", n_patients=6, shape=32, seed=0, progress=False)
    assert _files(again) == _files(cohort)
    other = make_cohort(tmp_path / "c", n_patients=6, shape=32, seed=1, progress=False)
    a, c = _files(cohort), _files(other)
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.startswith("images/"))


def test_clinical_same_with_or_without_images(cohort):
    written = pd.read_csv(cohort / "clinical.csv", dtype=str, keep_default_na=False)
    drawn = make_clinical(6, seed=0)[list(CLINICAL_COLUMNS)]
    pd.testing.assert_frame_equal(written, drawn.astype(str).replace({"<NA>": ""}), check_dtype=False)
    # patient i does not depend on the cohort size
    big = make_clinical(20, seed=0)
    pd.testing.assert_frame_equal(big.iloc[:6].reset_index(drop=True), make_clinical(6, seed=0))


# ------------------------------------------------------------------------------- geometry
def test_geometry_labels_and_dtypes(cohort):
    codes, dtypes = set(), set()
    nz = n_slices_for(32)
    for pid_dir in sorted((cohort / "images").iterdir()):
        affines = []
        for tp in TIMEPOINTS:
            img = nib.load(pid_dir / f"{tp}.nii.gz")
            lab = nib.load(cohort / "labels" / pid_dir.name / f"{tp}.nii.gz")
            assert img.shape == lab.shape
            np.testing.assert_array_equal(img.affine, lab.affine)
            assert lab.get_data_dtype() == np.uint8
            values = set(np.unique(np.asarray(lab.dataobj)).tolist())
            assert values <= {0, 1, 2} and {1, 2} <= values, (pid_dir.name, tp, values)
            codes.add("".join(nib.aff2axcodes(img.affine)))
            dtypes.add(str(img.get_data_dtype()))
            canonical = nib.as_closest_canonical(img)
            assert canonical.shape == (32, 32, nz)
            zooms = canonical.header.get_zooms()
            assert 1.2 <= zooms[0] <= 1.8 and zooms[0] == pytest.approx(zooms[1])
            assert zooms[2] == pytest.approx(5.0)
            assert np.isfinite(np.asarray(img.dataobj)).all()
            affines.append(img.affine)
        # time points are not aligned
        assert not np.allclose(affines[0], affines[1]) and not np.allclose(affines[1], affines[2])
    assert len(codes) >= 2, codes
    assert dtypes <= {"int16", "float32"}


def test_affines_place_the_anatomy_consistently_in_world_space(cohort):
    """Orientation, flips and per-scan affines agree with the stored arrays: the liver's world
    centroid stays put across time points (scans are moved, the patient is not) and lies on the
    patient's right (RAS+ x > 0 relative to the body) whatever the stored orientation."""
    for pid_dir in sorted((cohort / "labels").iterdir()):
        liver_c, body_c = [], []
        for tp in TIMEPOINTS:
            lab = nib.load(pid_dir / f"{tp}.nii.gz")
            arr = np.asarray(lab.dataobj)
            img = np.asarray(nib.load(cohort / "images" / pid_dir.name / f"{tp}.nii.gz").dataobj, dtype=float)
            liver_c.append(nib.affines.apply_affine(lab.affine, np.argwhere(arr > 0).mean(axis=0)))
            body_c.append(nib.affines.apply_affine(lab.affine, np.argwhere(img > 0.2 * np.percentile(img, 99)).mean(axis=0)))
        liver_c = np.array(liver_c)
        assert np.abs(liver_c - liver_c.mean(axis=0)).max() < 4.0, (pid_dir.name, liver_c)
        assert all(lc[0] > bc[0] for lc, bc in zip(liver_c, body_c)), (pid_dir.name, liver_c, body_c)


def test_tumour_enhances_above_liver_at_t0(tmp_path):
    out = make_cohort(tmp_path / "c", n_patients=3, shape=64, seed=3, progress=False)
    for pid_dir in sorted((out / "images").iterdir()):
        image = np.asarray(nib.load(pid_dir / "t0.nii.gz").dataobj, dtype=float)
        label = np.asarray(nib.load(out / "labels" / pid_dir.name / "t0.nii.gz").dataobj)
        tumour, liver = np.median(image[label == 2]), np.median(image[label == 1])
        assert tumour > 1.4 * liver, (pid_dir.name, tumour, liver)


def test_burden_gain_limit_hand_computed():
    """Liver: one ball of radius 30 mm (36000 pi mm^3). Tumour at its largest (t2): two 30 mm
    balls (2 x 4500 pi mm^3). Half the liver / tumour = 2, so the gain limit is 2^(1/3)."""
    from analysis.synthetic import MAX_TUMOUR_BURDEN, PatientPlan, burden_gain_limit

    assert MAX_TUMOUR_BURDEN == 0.5
    lobes = [(np.zeros(3), np.full(3, 30.0))]
    plan = PatientPlan("P1", {}, {}, liver_lobes=lobes,
                       lesions=[_lesion((20, 25, 30), (1, 1, 1)), _lesion((0, 0, 30), (0, 1, 1), kind="new")])
    assert burden_gain_limit(plan) == pytest.approx(2.0 ** (1.0 / 3.0), rel=1e-12)
    assert burden_gain_limit(PatientPlan("P2", {}, {}, liver_lobes=lobes)) == float("inf")


def test_tumour_never_swallows_the_liver_at_a_small_matrix(tmp_path):
    """At S = 32 lesions are drawn 2.5x the scaled anatomy; uncapped, HCC011 of seed 0 is all
    tumour (share 1.0 at every time point). With the burden cap no scan's tumour exceeds ~half of
    the organ (labels 1 + 2; the lobes-as-ellipsoids estimate is not exact, hence 0.6)."""
    out = make_cohort(tmp_path / "c", n_patients=12, shape=32, seed=0, progress=False)
    for path in sorted((out / "labels").rglob("*.nii.gz")):
        label = np.asarray(nib.load(path).dataobj)
        organ = int(np.isin(label, (1, 2)).sum())
        assert organ > 0 and (label == 2).sum() / organ <= 0.6, path


# ------------------------------------------------------------------------------- clinical
def test_marginals_close_to_table1(table181):
    df = table181
    assert len(df) == 181
    assert abs((df.treatment == "TACE").sum() - 110) <= 15
    assert df.age.mean() == pytest.approx(65.6, abs=2.5) and df.age.std() == pytest.approx(10.9, abs=2.0)
    assert (df.sex == "M").mean() == pytest.approx(0.834, abs=0.07)
    for col, expected in [("bclc", {"A": 0.287, "B": 0.530, "C": 0.182}),
                          ("child_pugh", {"A": 0.624, "B": 0.204, "NA": 0.171}),
                          ("tumour_size", {"<3cm": 0.564, "3-5cm": 0.315, ">5cm": 0.122}),
                          ("aetiology", {"HCV": 0.26, "HBV": 0.138, "Alcohol": 0.564, "NASH": 0.05})]:
        shares = df[col].value_counts(normalize=True)
        for level, share in expected.items():
            assert shares.get(level, 0.0) == pytest.approx(share, abs=0.08), (col, level, shares.to_dict())
    assert df.sorafenib.mean() == pytest.approx(0.221, abs=0.07)
    assert df.afp_ge_400.mean() == pytest.approx(0.564, abs=0.08)
    assert df.nodules_gt3.mean() == pytest.approx(0.696, abs=0.08)
    assert df.tace_cycles.min() >= 1
    assert df.tace_cycles.mean() == pytest.approx(5.1, abs=1.0) and df.tace_cycles.std() == pytest.approx(4.4, abs=1.3)
    # BCLC A more often in TACE+MWA, as in the paper
    share_a = df.groupby("treatment").bclc.apply(lambda s: (s == "A").mean())
    assert share_a["TACE+MWA"] > share_a["TACE"]
    assert set(df.mrecist) <= {"CR", "PR", "SD", "PD", "NA"}


def test_censoring_and_risk_class_rule(table181):
    df = table181
    assert 0.20 <= 1 - df.death.mean() <= 0.30
    expected = derive_risk_class(df)
    pd.testing.assert_series_equal(df.risk_class, expected, check_names=False)
    censored_early = (df.death == 0) & (df.os_months < 36)
    assert censored_early.any() and df.risk_class[censored_early].isna().all()
    assert df.risk_class[~censored_early].notna().all()
    counts = df.risk_class.value_counts()
    assert set(counts.index) == set(CLASS_NAMES) and counts.min() >= 15, counts.to_dict()


# ------------------------------------------------------------------------------- signal
def test_cox_on_tumour_burden_and_imaging_flag(table181):
    from lifelines import CoxPHFitter

    df = table181
    data = pd.DataFrame({
        "log_tumour_t2": np.log1p(df.latent_tumour_ml_t2),
        "growth": np.log1p(df.latent_tumour_ml_t2) - np.log1p(df.latent_tumour_ml_t0),
        "imaging_high_risk": df.imaging_high_risk.astype(float),
        "os_months": df.os_months, "death": df.death,
    })
    cph = CoxPHFitter().fit(data, duration_col="os_months", event_col="death")
    assert cph.concordance_index_ > 0.65


def test_synth_cli(tmp_path):
    message = synth_cli(tmp_path / "cli", patients=2, shape=16, seed=5)
    assert "2 patients" in message
    assert read_clinical(tmp_path / "cli" / "clinical.csv").shape[0] == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"n_patients": 0}, "n_patients: found 0, expected an integer >= 1"),
    ({"shape": 8}, "shape: found 8, expected an integer >= 16"),
    ({"seed": -1}, "seed: found -1, expected an integer >= 0"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    args = {"n_patients": 2, "shape": 16, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_cohort(tmp_path / "x", progress=False, **args)


@pytest.mark.parametrize("flags, message", [
    ({"patients": 2.5}, "analysis synth: --patients: found 2.5, expected an integer >= 1"),
    ({"shape": "big"}, "analysis synth: --shape: found 'big', expected an integer >= 16"),
])
def test_synth_cli_bad_flags_exit_with_one_line(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        synth_cli(tmp_path / "cli", **{"patients": 2, "shape": 16, "seed": 0, **flags})
    assert not (tmp_path / "cli").exists()


def test_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("not a cohort")
    with pytest.raises(FileExistsError, match="not empty"):
        make_cohort(tmp_path, n_patients=1, shape=16, progress=False)
    assert (tmp_path / "keep.txt").exists()


def _latent_image_features(df: pd.DataFrame) -> pd.DataFrame:
    """What a reader of the images can measure: tumour and viable volume, lesion count per time
    point, enhancement heterogeneity and satellites (the generator's truth for these)."""
    feats = {}
    for tp in TIMEPOINTS:
        feats[f"log_tumour_{tp}"] = np.log1p(df[f"latent_tumour_ml_{tp}"])
        feats[f"log_viable_{tp}"] = np.log1p(df[f"latent_viable_ml_{tp}"])
        feats[f"lesions_{tp}"] = df[f"latent_n_lesions_{tp}"]
    feats["heterogeneity"] = df.latent_heterogeneity
    feats["satellites"] = df.latent_n_satellites
    return pd.DataFrame(feats)


def test_oracle_classifier_on_image_derivable_features(table181):
    """The 4-class label is learnable from what images show: a multinomial logistic regression on
    image-derivable quantities reaches a cross-validated macro AUC >= 0.9 (0.95 measured)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    df = table181[table181.risk_class.notna()]
    X, y = _latent_image_features(df).to_numpy(), df.risk_class.astype(int).to_numpy()
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    proba = cross_val_predict(model, X, y, cv=StratifiedKFold(4, shuffle=True, random_state=0), method="predict_proba")
    assert roc_auc_score(y, proba, multi_class="ovr", average="macro") >= 0.9
    # and the images alone carry no oracle when the label is shuffled (the check can fail)
    rng = np.random.default_rng(0)
    shuffled = cross_val_predict(model, X, rng.permutation(y), cv=StratifiedKFold(4, shuffle=True, random_state=0),
                                 method="predict_proba")
    assert roc_auc_score(rng.permutation(y), shuffled, multi_class="ovr", average="macro") < 0.7


def test_images_show_the_planned_course(tmp_path):
    """Tumour volume measured on the labels follows the plan (rank correlation across patients and
    time points), and growth t0 -> t2 on the labels tracks the latent prognosis."""
    from scipy.stats import spearmanr

    out = make_cohort(tmp_path / "c", n_patients=10, shape=48, seed=2, progress=False)
    plan = make_clinical(10, seed=2)
    measured, planned, growth = [], [], []
    for _, row in plan.iterrows():
        vols = []
        for tp in TIMEPOINTS:
            lab = nib.load(out / "labels" / row.patient_id / f"{tp}.nii.gz")
            voxel_ml = float(np.prod(lab.header.get_zooms())) / 1000.0
            vols.append(float((np.asarray(lab.dataobj) == 2).sum()) * voxel_ml)
            planned.append(row[f"latent_tumour_ml_{tp}"])
        measured += vols
        growth.append(np.log(vols[2] / vols[0]))
    assert spearmanr(measured, planned).statistic > 0.85
    assert spearmanr(growth, plan.latent_z).statistic > 0.6


def _lesion(d, v, kind="nodule"):
    from analysis.synthetic import Lesion

    return Lesion(centre=np.zeros(3), diameter=tuple(d), viable=tuple(v), normal=np.array([1.0, 0, 0]), kind=kind,
                  irregularity=0.0, shape_freqs=np.zeros((1, 3)), shape_phases=np.zeros(1))


@pytest.mark.parametrize("lesions, expected, sums", [
    # viable diameter = d * v^(1/3): 40 * 0.125^(1/3) = 20 -> -50 % -> PR at t1, kept as best
    ([_lesion((40, 40, 40), (1, 0.125, 0.125))], "PR", (40, 20, 20)),
    # 40 -> 32 (-20 %) SD, then 40 again = +25 % over the nadir 32 -> PD; best before PD is SD
    ([_lesion((40, 40, 40), (1, 0.512, 1))], "SD", (40, 32, 40)),
    # complete necrosis of both targets -> CR; the third (smaller) lesion is not a target
    ([_lesion((30, 30, 30), (1, 0, 0)), _lesion((20, 20, 20), (1, 0, 0)), _lesion((15, 15, 15), (1, 1, 1))],
     "CR", (50, 0, 0)),
    # a measurable new lesion at t1 -> PD even though the target shrank
    ([_lesion((40, 30, 30), (1, 1, 1)), _lesion((0, 20, 20), (0, 1, 1), kind="new")], "PD", (40, 30, 30)),
    # a new lesion too small to measure (10 mm as imaged = 14.3 mm nominal) does not count
    ([_lesion((40, 30, 30), (1, 1, 1)), _lesion((0, 12, 12), (0, 1, 1), kind="new")], "SD", (40, 30, 30)),
    # no measurable target at baseline -> NA
    ([_lesion((12, 12, 12), (1, 1, 1))], "NA", (0, 0, 0)),
])
def test_mrecist_from_planned_diameters(lesions, expected, sums):
    from analysis.synthetic import _best_mrecist

    response, got = _best_mrecist(lesions)
    assert response == expected
    np.testing.assert_allclose(got, sums, atol=1e-9)


def test_rerun_replaces_an_earlier_synthetic_cohort(tmp_path):
    out = tmp_path / "c"
    make_cohort(out, n_patients=3, shape=16, seed=0, progress=False)
    make_cohort(out, n_patients=2, shape=16, seed=0, progress=False)
    for folder in ("images", "labels"):
        assert sorted(p.name for p in (out / folder).iterdir()) == ["HCC001", "HCC002"]
    assert json.loads((out / "cohort.json").read_text())["n_patients"] == 2


def test_rerun_into_a_folder_left_by_an_interrupted_synth(tmp_path, monkeypatch, caplog):
    """A synth interrupted mid-way (here: after the first patient) leaves images/ and labels/
    without cohort.json; a rerun into that folder starts over, says so, and ends complete."""
    import logging

    from analysis import synthetic

    out = tmp_path / "c"
    real = synthetic._write_patient
    written = []

    def interrupted(*args, **kwargs):
        if written:
            raise KeyboardInterrupt
        written.append(real(*args, **kwargs))

    monkeypatch.setattr(synthetic, "_write_patient", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_cohort(out, n_patients=3, shape=16, seed=0, progress=False)
    assert (out / "images" / "HCC001").is_dir() and not (out / "cohort.json").exists()
    assert (out / synthetic.INCOMPLETE_MARKER).exists()
    monkeypatch.setattr(synthetic, "_write_patient", real)
    with caplog.at_level(logging.WARNING, logger="analysis.synthetic"):
        make_cohort(out, n_patients=2, shape=16, seed=0, progress=False)
    assert "interrupted synth" in caplog.text and "starting over" in caplog.text
    assert not (out / synthetic.INCOMPLETE_MARKER).exists()
    assert json.loads((out / "cohort.json").read_text())["n_patients"] == 2
    assert _files(out) == _files(make_cohort(tmp_path / "fresh", n_patients=2, shape=16, seed=0, progress=False))
    # a folder of someone else's files is still refused, marker or not
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        make_cohort(tmp_path / "foreign", n_patients=1, shape=16, progress=False)
