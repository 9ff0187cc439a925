"""Tumour-burden baseline: a logistic regression on mask-derived burden (cv4, the study's folds).

What a reader of the masks alone would build before any deep model or radiomics: how much tumour
there is, in how many nodules, and how that changes after each TACE. A deep model or a radiomic
signature is only worth its cost if it beats this.

Features (:func:`burden_features`), one row per patient, from the label masks
``<masks>/<patient_id>/t{0,1,2}.nii.gz`` (default ``<cohort>/labels``; 0 background, 1 liver,
2 tumour):

* ``tumour_volume_ml_t{k}``: tumour (label 2) voxels x voxel volume, in mL. The voxel volume is
  ``|det|`` of the affine's 3x3 part, which equals the product of the zooms for axis-aligned scans
  and stays right for oblique ones and for flipped axes.
* ``tumour_fraction_t{k}``: tumour voxels / (liver + tumour) voxels (the tumour label replaces the
  liver where they overlap, so the sum is the whole liver).
* ``nodule_count_t{k}``: 3-D connected components of the tumour label, 26-connectivity (full
  3x3x3 structure, as :mod:`analysis.mrecist` counts lesions). Voxel counts and 26-connected
  components do not depend on the stored orientation, so masks are not reoriented.
* ``tumour_volume_change_t{1,2}``: the natural **log ratio** ``log((v_t + EPS_ML) / (v_0 + EPS_ML))``
  with ``EPS_ML = 0.1`` mL, not the relative change ``v_t / v_0 - 1``: a mask without tumour at
  baseline (``v_0 = 0``) would divide by zero. 0 = unchanged, ``log 2`` = doubled, ``-log 2`` =
  halved; close to the relative change for small changes of large tumours.
* ``tumour_fraction_change_t{1,2}``: ``f_t - f_0``; ``nodule_count_change_t{1,2}``: ``n_t - n_0``.

Bad input raises, naming the file: a patient with a missing mask for any time point (every
missing file is listed), an unreadable or truncated file, a volume that is not 3-D, label values
other than 0/1/2, and a mask without liver or tumour (fraction undefined: a failed segmentation).
Patient ids follow the one rule of :func:`analysis.cohort.check_patient_id` (each names a mask
folder): clinical.csv is read by :func:`analysis.clinical_table.read_clinical_table` (refusals name
the file row; repeated ids refused) and a patient folder whose name breaks the rule is refused.

Model (:func:`burden_model`): StandardScaler then multinomial logistic regression (lbfgs, C = 1,
class_weight = "balanced" since the four risk classes are unbalanced), fitted on each training
split only. Validation (:func:`predict_burden_cv4`): ``design_splits(y, "cv4", seed)`` on the
labelled patients in clinical.csv order: the same patient-level stratified folds as the prognosis
datalist and ``classify`` (all three call :func:`analysis.datalists.assign_folds` on that label
sequence), so the out-of-fold predictions pair patient by patient with the deep model's.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from analysis import metrics
from analysis.clinical_table import FIRST_ROW, RULE_COLUMNS, TableInputError, read_clinical_table, usage_exit
from analysis.cohort import (
    LABELS,
    TIMEPOINTS,
    check_patient_id,
    derive_risk_class,
    find_scan,
    mask_path,
    read_clinical,
)
from analysis.io import write_csv, write_json
from analysis.models import (
    NUM_CLASSES,
    PROB_COLUMNS,
    design_splits,
    predict_four_classes,
    prediction_frame,
    read_dl_predictions,
)

log = logging.getLogger(__name__)

__all__ = ["EPS_ML", "FEATURE_COLUMNS", "burden_cli", "burden_features", "burden_model", "predict_burden_cv4"]

#: added to both volumes of the log ratio (mL): about a 6 mm sphere, the smallest lesion that matters
EPS_ML = 0.1
_FOLLOW_UPS = TIMEPOINTS[1:]
_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)
#: per-time-point measurement (key of _burden_at) -> feature name stem
_MEASURES = (("volume_ml", "tumour_volume_ml"), ("fraction", "tumour_fraction"), ("count", "nodule_count"))
FEATURE_COLUMNS: list[str] = [
    *[f"tumour_volume_ml_{tp}" for tp in TIMEPOINTS],
    *[f"tumour_fraction_{tp}" for tp in TIMEPOINTS],
    *[f"nodule_count_{tp}" for tp in TIMEPOINTS],
    *[f"tumour_volume_change_{tp}" for tp in _FOLLOW_UPS],
    *[f"tumour_fraction_change_{tp}" for tp in _FOLLOW_UPS],
    *[f"nodule_count_change_{tp}" for tp in _FOLLOW_UPS],
]


# ---------------------------------------------------------------------------------- inputs
def _read_clinical(clinical) -> pd.DataFrame:
    """clinical.csv (path or DataFrame) with an Int64 ``risk_class``, filled by the rule where empty.

    A file goes through :func:`analysis.clinical_table.read_clinical_table` (no such or empty file,
    delimiter, a patient_id column, every id by the one patient-id rule, no repeated id; refusals
    name the file row, header = row 1); when the rule's columns are present the typed frame is
    :func:`analysis.cohort.read_clinical`'s, the reader the prognosis datalist uses, so both see the
    same labelled patients. A DataFrame's ids are held to the same rule (rows counted from 1).
    """
    if isinstance(clinical, pd.DataFrame):
        # a table's rows are counted from 1, a file's as validate counts them (header = row 1)
        frame, path, where, first = clinical.copy(), None, "clinical table", 1
        if "patient_id" not in frame:
            raise ValueError(f"{where}: no patient_id column (columns: {list(frame.columns)[:8]})")
        frame["patient_id"] = frame["patient_id"].astype(str).str.strip()
        for pos, pid in enumerate(frame["patient_id"].tolist()):
            check_patient_id(pid, f"{where} row {pos + first}")
    else:
        path = Path(clinical)
        frame = read_clinical_table(path, required=("patient_id",), typed=False)
        where, first = str(path), FIRST_ROW
    can_derive = all(c in frame for c in RULE_COLUMNS)
    if "risk_class" not in frame and not can_derive:
        missing = [c for c in RULE_COLUMNS if c not in frame]
        header = " row 1 (header)" if path is not None else ""
        raise TableInputError(f"{where}{header}: no risk_class column and column(s) "
                              f"{', '.join(map(repr, missing))} of the rule not found; expected risk_class "
                              f"or {', '.join(RULE_COLUMNS)} to derive it "
                              f"(found: {', '.join(map(str, frame.columns))})")
    given = pd.Series(np.nan, index=frame.index)
    if "risk_class" in frame:
        text = frame["risk_class"].astype("string").str.strip().fillna("")
        given = pd.to_numeric(text.where(text != ""), errors="coerce").astype(float)
        bad = np.flatnonzero(((text != "") & ~given.isin(range(NUM_CLASSES))).to_numpy())
        if len(bad):
            shown = " | ".join(f"{where} row {pos + first} (patient_id {frame['patient_id'].iloc[pos]}): "
                               f"risk_class: found {text.iloc[pos]!r}; expected 0, 1, 2, 3 or empty"
                               for pos in bad[:5])
            more = f" | ... and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise TableInputError(shown + more)
    if path is not None and can_derive:
        frame = read_clinical(path)
    frame["patient_id"] = frame["patient_id"].astype(str).str.strip()
    risk = given.fillna(derive_risk_class(frame).astype(float)) if can_derive else given
    frame["risk_class"] = risk.astype("Int64")
    dup = frame["patient_id"][frame["patient_id"].duplicated()].unique().tolist()
    if dup:  # a file's repeats are refused by read_clinical_table, naming the rows
        raise ValueError(f"{where}: patient_id repeated: {dup[:10]}")
    return frame


def _patient_ids(cohort: Path, masks: Path, patient_ids) -> list[str]:
    """The patients of :func:`burden_features`, each id by the one patient-id rule (it names a folder).

    ``patient_ids`` if given, else the cohort's clinical.csv (through
    :func:`analysis.clinical_table.read_clinical_table`: refusals name the file row), else the
    patient folders of ``masks`` (hidden folders, ``.name``, are not patients and are skipped).
    """
    if patient_ids is not None:
        return [check_patient_id(str(p), f"patient_ids[{i}]") for i, p in enumerate(patient_ids)]
    clinical = cohort / "clinical.csv"
    if clinical.exists():
        return read_clinical_table(clinical, required=("patient_id",), typed=False)["patient_id"].tolist()
    names = sorted(p.name for p in masks.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [check_patient_id(name, f"{masks / name} (a patient folder)") for name in names]


def read_mask(path: Path) -> tuple[np.ndarray, float]:
    """(labels, voxel volume in mm^3) of one mask file; errors name the file."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)  # reads every byte: a truncated .nii.gz fails here
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for broken files
        raise ValueError(f"{path}: cannot read as NIfTI ({exc.__class__.__name__}: {exc})") from exc
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D mask, found shape {data.shape}")
    found = np.unique(data)
    extra = [v for v in found.tolist() if v not in LABELS.values()]
    if extra:
        raise ValueError(f"{path}: mask values {extra[:5]} found; expected only 0 (background), "
                         "1 (liver), 2 (tumour)")
    return data, float(abs(np.linalg.det(np.asarray(img.affine, dtype=np.float64)[:3, :3])))


def _burden_at(path: Path) -> dict[str, float]:
    data, voxel_mm3 = read_mask(path)
    tumour = data == LABELS["tumour"]
    n_tumour = int(tumour.sum())
    n_liver = n_tumour + int((data == LABELS["liver"]).sum())
    if n_liver == 0:
        raise ValueError(f"{path}: no liver or tumour voxel (empty mask, a failed segmentation?); "
                         "the tumour fraction is undefined")
    _, n_nodules = ndimage.label(tumour, structure=_STRUCTURE_26)
    return {"volume_ml": n_tumour * voxel_mm3 / 1000.0, "fraction": n_tumour / n_liver,
            "count": int(n_nodules)}


# -------------------------------------------------------------------------------- features
def burden_features(cohort, masks=None, patient_ids=None) -> pd.DataFrame:
    """``patient_id`` + :data:`FEATURE_COLUMNS`, one row per patient (module docstring).

    Patients: ``patient_ids`` if given, else the cohort's clinical.csv, else the patient folders
    of the masks folder (hidden ones skipped); every id follows the one patient-id rule
    (:func:`analysis.cohort.check_patient_id`), else ValueError naming where it came from (the file
    row of clinical.csv, the folder). ``masks`` defaults to ``<cohort>/labels``. Every patient needs
    a mask at t0, t1 and t2; a missing one raises FileNotFoundError listing every missing file.
    """
    cohort = Path(cohort)
    masks = Path(masks) if masks is not None else cohort / "labels"
    if not masks.is_dir():
        raise FileNotFoundError(f"masks folder {masks} not found; expected "
                                "<masks>/<patient_id>/t0.nii.gz ...")
    ids = _patient_ids(cohort, masks, patient_ids)
    # all missing files at once, so one run shows the whole gap instead of one file per attempt
    missing = [mask_path(masks, pid, tp) for pid in ids for tp in TIMEPOINTS
               if find_scan(masks, pid, tp) is None]
    if missing:
        shown = ", ".join(str(p) for p in missing[:10])
        shown += f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
        raise FileNotFoundError(f"{len(missing)} mask file(s) missing: {shown}; every patient needs "
                                "<masks>/<patient_id>/t0, t1 and t2 (.nii.gz or .nii)")
    rows = []
    for pid in ids:
        b = {tp: _burden_at(find_scan(masks, pid, tp)) for tp in TIMEPOINTS}
        row: dict = {"patient_id": pid}
        for key, name in _MEASURES:
            row.update({f"{name}_{tp}": b[tp][key] for tp in TIMEPOINTS})
        v0 = b["t0"]["volume_ml"]
        for tp in _FOLLOW_UPS:
            row[f"tumour_volume_change_{tp}"] = float(np.log((b[tp]["volume_ml"] + EPS_ML) / (v0 + EPS_ML)))
            row[f"tumour_fraction_change_{tp}"] = b[tp]["fraction"] - b["t0"]["fraction"]
            row[f"nodule_count_change_{tp}"] = b[tp]["count"] - b["t0"]["count"]
        rows.append(row)
    return pd.DataFrame(rows, columns=["patient_id", *FEATURE_COLUMNS])


# ----------------------------------------------------------------------------------- model
def burden_model(seed: int = 0) -> Pipeline:
    """Unfitted StandardScaler + multinomial logistic regression (C = 1, balanced class weights)."""
    # lbfgs fits the multinomial (softmax) model for 3+ classes; 15 standardised features
    # converge in far fewer than 5000 iterations
    clf = LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000, random_state=seed)
    return Pipeline([("scale", StandardScaler()), ("clf", clf)])


def _design(features, clinical) -> tuple[pd.DataFrame, pd.Series]:
    """(X, y) of the labelled patients in clinical.csv order, the order the datalist folds use."""
    clin = _read_clinical(clinical)
    if isinstance(features, pd.DataFrame):
        feats = features.copy()
    else:
        feats = pd.read_csv(features, dtype={"patient_id": str})
    if "patient_id" not in feats:
        raise ValueError(f"features: no patient_id column (columns: {list(feats.columns)[:8]})")
    feats["patient_id"] = feats["patient_id"].astype(str).str.strip()
    dup = feats["patient_id"][feats["patient_id"].duplicated()].unique().tolist()
    if dup:
        raise ValueError(f"features: patient_id repeated: {dup[:10]}")
    feats = feats.set_index("patient_id")
    labelled = clin[clin["risk_class"].notna()]
    undefined = clin.loc[clin["risk_class"].isna(), "patient_id"].tolist()
    if undefined:
        log.info("burden: %d patient(s) without risk class (censored before 36 months) not classified: %s",
                 len(undefined), undefined[:10])
    # a labelled patient left out would shift every later patient's fold away from the datalist's
    lacking = [p for p in labelled["patient_id"] if p not in feats.index]
    if lacking:
        raise ValueError(f"{len(lacking)} labelled patient(s) have no burden features: {lacking[:10]}")
    extra = sorted(set(feats.index) - set(clin["patient_id"]))
    if extra:
        log.warning("burden: %d feature row(s) without a clinical row ignored: %s", len(extra), extra[:10])
    X = feats.loc[labelled["patient_id"]].apply(pd.to_numeric, errors="coerce")
    if X.isna().any().any():
        col = X.columns[X.isna().any()][0]
        raise ValueError(f"features: column {col} is missing or not numeric for "
                         f"{X.index[X[col].isna()].tolist()[:5]}")
    y = pd.Series(labelled["risk_class"].astype(int).to_numpy(), index=X.index, name="risk_class")
    return X, y


def predict_burden_cv4(features, clinical, seed: int = 0) -> pd.DataFrame:
    """Out-of-fold predictions of :func:`burden_model` for every labelled patient.

    ``features``: :func:`burden_features` output (or its CSV); ``clinical``: clinical.csv path or
    table (risk_class derived by the rule where absent). Columns: ``patient_id, fold,
    prob_0..prob_3, pred_class, label`` (docs/contracts.md); a class absent from a training split
    gets probability 0. Rows sorted by patient_id.
    """
    X, y = _design(features, clinical)
    if len(y) < 8:
        raise ValueError(f"only {len(y)} labelled patients; 4-fold cross-validation needs at least 8")
    frames = []
    for fold, (tr, te) in enumerate(design_splits(y, "cv4", seed)):
        y_tr = y.iloc[tr].to_numpy()
        classes = np.unique(y_tr)
        if len(classes) < 2:
            raise ValueError(f"cv4 fold {fold}: training patients hold only class {classes.tolist()}")
        # labels re-encoded 0..m-1, the encoding models.predict_four_classes maps back to the four classes
        pipe = burden_model(seed).fit(X.iloc[tr], np.searchsorted(classes, y_tr))
        frames.append(prediction_frame(predict_four_classes(pipe, classes, X.iloc[te]), X.index[te], fold,
                                       y.iloc[te].to_numpy()))
    oof = pd.concat(frames, ignore_index=True)
    return oof.sort_values("patient_id", kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------ comparison
def _compare_with_dl(oof: pd.DataFrame, dl: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """Paired bootstrap of AUC(deep model) - AUC(burden) on the patients both predicted.

    One row per class and ``macro``: ``auc, auc_dl, auc_burden, difference (= auc_dl - auc_burden),
    diff_ci_lower, diff_ci_upper, p_value, n_boot, n``.
    """
    dl = dl[[c for c in ("patient_id", *PROB_COLUMNS, "fold", "label") if c in dl]]
    merged = oof.merge(dl, on="patient_id", suffixes=("", "_dl"))
    no_dl = sorted(set(oof["patient_id"]) - set(merged["patient_id"]))
    if no_dl:
        log.warning("burden: %d labelled patient(s) have no deep-model prediction, left out of the "
                    "comparison: %s", len(no_dl), no_dl[:10])
    no_burden = sorted(set(dl["patient_id"]) - set(merged["patient_id"]))
    if no_burden:
        log.warning("burden: %d deep-model prediction(s) of patients with no burden prediction (no risk "
                    "class, or not in clinical.csv), left out of the comparison: %s",
                    len(no_burden), no_burden[:10])
    if len(merged) == 0:
        raise ValueError("--dl-predictions: no patient in common with the burden predictions")
    if "label" in dl:
        lab = pd.to_numeric(merged["label_dl"], errors="coerce")
        disagree = merged.loc[lab.notna() & (lab != merged["label"]), "patient_id"]
        if len(disagree):
            raise ValueError(f"--dl-predictions: label differs from clinical.csv's risk_class for "
                             f"{disagree.tolist()[:10]}; are both from the same cohort?")
    if "fold" in dl:
        other = int((pd.to_numeric(merged["fold_dl"], errors="coerce") != merged["fold"]).sum())
        if other:
            log.warning("burden: %d of %d patients are in another fold in --dl-predictions: the two models "
                        "were not trained on the same splits", other, len(merged))
    y = merged["label"].to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.AbsentClassWarning)
        table = metrics.paired_bootstrap_test(y, merged[[f"{c}_dl" for c in PROB_COLUMNS]].to_numpy(),
                                              merged[PROB_COLUMNS].to_numpy(), n_boot=n_boot, seed=seed)
    table = table.rename(columns={"auc_a": "auc_dl", "auc_b": "auc_burden"})
    table["n"] = len(merged)
    return table


# ------------------------------------------------------------------------------------- CLI
def burden_cli(cohort: str, out: str, masks: str | None = None, clinical: str | None = None,
               dl_predictions: str | None = None, seed: int = 0, n_boot: int = 2000) -> str:
    """Tumour-burden logistic regression baseline, 4-fold cross-validated on the datalist's folds.

    Writes into OUT: features.csv, oof_predictions.csv, evaluation/metrics.json,
    evaluation/per_class.csv, evaluation/confusion.csv and, with --dl-predictions,
    comparison.csv (paired bootstrap of AUC(deep model) - AUC(burden)).

    Args:
        cohort: cohort folder (docs/contracts.md); its clinical.csv and labels/ are the defaults.
        out: output folder.
        masks: folder of masks <masks>/<patient_id>/t0|t1|t2.nii.gz (0 background, 1 liver,
            2 tumour); default <cohort>/labels. Every patient needs all three.
        clinical: clinical.csv with patient_id and risk_class (or os_months, death,
            imaging_high_risk to derive it); default <cohort>/clinical.csv.
        dl_predictions: a deep model's out-of-fold predictions.csv (patient_id, fold,
            prob_0..prob_3) to compare with, on the patients both predicted.
        seed: fold seed; the same as the prognosis datalist's (default 0) for the same folds.
        n_boot: bootstrap resamples for the AUC confidence intervals and the paired test.
    """
    cohort_dir = Path(cohort)
    out_dir = Path(out)
    try:
        clinical_path = Path(clinical) if clinical is not None else cohort_dir / "clinical.csv"
        clin = _read_clinical(clinical_path)
        # the cheap inputs first, so a wrong path fails before every mask is read
        dl = read_dl_predictions(dl_predictions) if dl_predictions is not None else None
        feats = burden_features(cohort_dir, masks, patient_ids=clin["patient_id"].tolist())
        oof = predict_burden_cv4(feats, clin, seed=seed)
        y, p = oof["label"].to_numpy(), oof[PROB_COLUMNS].to_numpy()
        for k in sorted(set(range(NUM_CLASSES)) - set(y.tolist())):
            log.warning("burden: class %d has no labelled patient: its AUC is null, left out of the "
                        "macro AUC", k)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", metrics.AbsentClassWarning)
            res = metrics.evaluate(y, p, n_boot=n_boot, seed=seed)
            per_class = metrics.metrics_table(y, p, result=res)
        conf = metrics.confusion(y, oof["pred_class"])
        comparison = _compare_with_dl(oof, dl, n_boot, seed) if dl is not None else None
    except (ValueError, FileNotFoundError) as exc:
        # one line on stderr, exit status 2 and nothing written, instead of a traceback
        raise usage_exit(f"burden: {exc}") from None
    write_csv(out_dir / "features.csv", feats)
    write_csv(out_dir / "oof_predictions.csv", oof)
    write_json(out_dir / "evaluation" / "metrics.json", res)
    write_csv(out_dir / "evaluation" / "per_class.csv", per_class)
    write_csv(out_dir / "evaluation" / "confusion.csv", conf)
    ci = res["macro_auc_ci"] or [float("nan")] * 2
    macro = float("nan") if res["macro_auc"] is None else res["macro_auc"]
    summary = (f"burden: {res['n']} labelled patients, macro AUC {macro:.3f} "
               f"(95% CI {ci[0]:.3f}-{ci[1]:.3f}), accuracy {res['accuracy']:.3f}")
    if comparison is not None:
        write_csv(out_dir / "comparison.csv", comparison)
        row = comparison.set_index("auc").loc["macro"]
        summary += (f"; deep model - burden macro AUC {row['difference']:+.3f} "
                    f"(p = {row['p_value']:.3g}, n = {int(row['n'])})")
    return f"{summary}; outputs in {out_dir}"
