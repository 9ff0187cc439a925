"""MONAI datalists for both bundles (docs/contracts.md, "Datalists").

Paths are written relative to ``dataset_dir`` (the cohort folder by default), the id the bundles
take as their data root, so a cohort folder can move with its datalists.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import io
from analysis.clinical_table import RULE_COLUMNS, read_clinical_table
from analysis.cohort import TIMEPOINTS, find_scan

log = logging.getLogger(__name__)


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(base).resolve())).as_posix()


def deal_by_class(labels: pd.Series, groups: int, seed: int = 0) -> pd.Series:
    """Group 0..groups-1 of every row: each class's rows, shuffled, dealt round-robin over the
    groups, carrying on where the previous class stopped, so group sizes differ by at most one
    and every class is spread as evenly as its size allows."""
    rng = np.random.default_rng(seed)
    out = pd.Series(-1, index=labels.index, dtype=int)
    slot = 0
    for cls in sorted(labels.unique()):
        for m in rng.permutation(np.flatnonzero(labels.to_numpy() == cls)):
            out.iloc[m] = slot % groups
            slot += 1
    return out


def assign_folds(labels: pd.Series, folds: int = 4, seed: int = 0) -> pd.Series:
    """Patient-level folds 0..folds-1, stratified by label (sklearn StratifiedKFold, shuffled).

    Classes with fewer patients than folds cannot appear in every fold; sklearn warns and
    spreads them as evenly as it can, which is the best any split can do.
    """
    from sklearn.model_selection import StratifiedKFold

    if len(labels) < folds:
        raise ValueError(f"{len(labels)} labelled patient(s) cannot fill {folds} folds: "
                         f"need at least {folds} (lower --folds or add patients)")
    out = pd.Series(-1, index=labels.index, dtype=int)
    if labels.value_counts().max() < folds:
        # sklearn refuses when no class can fill every fold (tiny cohorts): deal each class's
        # shuffled patients round-robin over the folds, carrying on where the last class stopped
        log.warning("no class has %d patients: folds are dealt round-robin per class instead of "
                    "StratifiedKFold", folds)
        return deal_by_class(labels, folds, seed)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        for k, (_, val_idx) in enumerate(splitter.split(np.zeros(len(labels)), labels.to_numpy())):
            out.iloc[val_idx] = k
    return out


def _clinical(cohort: Path) -> pd.DataFrame:
    """The cohort's clinical.csv through the verbs' one reader: every patient id follows the rule
    (it becomes a path in the datalists) and appears once; the risk-class rule's columns are there."""
    return read_clinical_table(Path(cohort) / "clinical.csv", required=("patient_id", *RULE_COLUMNS))


def segmentation_datalist(cohort: Path, base: Path, val_fraction: float = 0.2, seed: int = 0) -> dict:
    clinical = _clinical(cohort)
    ids = list(clinical["patient_id"])
    labelled = [pid for pid in ids if all(find_scan(cohort / "labels", pid, tp) for tp in TIMEPOINTS)]
    partial = [pid for pid in ids if pid not in labelled and find_scan(cohort / "labels", pid, "t0")]
    if partial:
        log.info("segmentation datalist: %d patient(s) with labels for only some time points use "
                 "those scans: %s", len(partial), ", ".join(partial))
    with_any = [pid for pid in ids if any(find_scan(cohort / "labels", pid, tp) for tp in TIMEPOINTS)]
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(with_any))
    n_val = int(round(len(order) * val_fraction))
    if len(order) >= 2:
        n_val = min(max(n_val, 1), len(order) - 1)
    val_ids = set(order[:n_val])

    def scans(pid: str, with_label: bool) -> list[dict]:
        items = []
        for tp in TIMEPOINTS:
            image = find_scan(cohort / "images", pid, tp)
            if image is None:
                continue
            item = {"image": _rel(image, base), "patient_id": pid, "timepoint": tp}
            if with_label:
                label = find_scan(cohort / "labels", pid, tp)
                if label is None:
                    continue
                item = {"image": item["image"], "label": _rel(label, base), "patient_id": pid, "timepoint": tp}
            items.append(item)
        return items

    return {
        "dataset_dir_hint": "paths are relative to dataset_dir",
        "seed": seed,
        "training": [s for pid in ids if pid in with_any and pid not in val_ids for s in scans(pid, True)],
        "validation": [s for pid in ids if pid in val_ids for s in scans(pid, True)],
        "testing": [s for pid in ids for s in scans(pid, False)],
    }


def prognosis_datalist(cohort: Path, base: Path, masks: Path, folds: int = 4, seed: int = 0) -> dict:
    clinical = _clinical(cohort)

    def item(pid: str) -> dict:
        entry: dict = {"patient_id": pid}
        for tp in TIMEPOINTS:
            image = find_scan(cohort / "images", pid, tp) or cohort / "images" / pid / f"{tp}.nii.gz"
            entry[f"image_{tp}"] = _rel(image, base)
        for tp in TIMEPOINTS:
            mask = find_scan(masks, pid, tp) or masks / pid / f"{tp}.nii.gz"
            entry[f"mask_{tp}"] = _rel(mask, base)
        return entry

    defined = clinical[clinical["risk_class"].notna()].reset_index(drop=True)
    undefined = clinical[clinical["risk_class"].isna()]
    excluded = []
    for _, row in undefined.iterrows():
        reason = (f"censored at {row['os_months']:.1f} months (< 36) with no death: risk_class undefined"
                  if row.get("death") == 0 else "risk_class undefined")
        excluded.append({"patient_id": row["patient_id"], "reason": reason})
    if excluded:
        log.info("prognosis datalist: %d patient(s) left out of classification: %s", len(excluded),
                 "; ".join(f"{e['patient_id']} ({e['reason']})" for e in excluded))
    fold_of = assign_folds(defined["risk_class"].astype(int), folds=folds, seed=seed)
    training = []
    for i, row in defined.iterrows():
        entry = item(row["patient_id"])
        entry = {"patient_id": entry.pop("patient_id"), "label": int(row["risk_class"]),
                 "fold": int(fold_of.iloc[i]), **entry}
        training.append(entry)
    return {
        "dataset_dir_hint": "paths are relative to dataset_dir",
        "num_folds": folds,
        "seed": seed,
        "training": training,
        "unlabelled": [item(pid) for pid in undefined["patient_id"]],
        "excluded": excluded,
    }


def write_datalists(cohort: str | Path, out: str | Path | None = None, folds: int = 4, seed: int = 0,
                    masks: str | Path | None = None, dataset_dir: str | Path | None = None,
                    val_fraction: float = 0.2) -> dict[str, Path]:
    """Write ``segmentation.json`` and ``prognosis.json``; returns their paths.

    ``masks`` is the folder of liver/tumour masks the prognosis model reads (default the
    cohort's manual ``labels/``; the study passes the segmentation output). ``dataset_dir``
    is the folder paths are relative to (default: the cohort folder).
    """
    cohort = Path(cohort)
    out = Path(out) if out is not None else cohort / "datalists"
    base = Path(dataset_dir) if dataset_dir is not None else cohort
    masks = Path(masks) if masks is not None else cohort / "labels"
    seg = segmentation_datalist(cohort, base, val_fraction=val_fraction, seed=seed)
    prog = prognosis_datalist(cohort, base, masks, folds=folds, seed=seed)
    paths = {
        "segmentation": io.write_json(out / "segmentation.json", seg),
        "prognosis": io.write_json(out / "prognosis.json", prog),
    }
    log.info("datalists: %d/%d labelled scans for segmentation training/validation, %d scans to segment; "
             "%d patients in %d folds, %d unlabelled", len(seg["training"]), len(seg["validation"]),
             len(seg["testing"]), len(prog["training"]), folds, len(prog["unlabelled"]))
    return paths


def datalists_cli(cohort: str, out: str | None = None, folds: int = 4, seed: int = 0,
                  masks: str | None = None, dataset_dir: str | None = None, val_fraction: float = 0.2) -> None:
    """python -m analysis datalists DIR --folds 4 --seed K --out DIR2 [--masks DIR] [--dataset-dir DIR]

    Writes segmentation.json (labelled patients' scans split into training and validation, every scan
    for testing) and prognosis.json (patients with a defined risk_class in stratified folds, the others
    listed as unlabelled and excluded). Paths in them are relative to --dataset-dir.

    Args:
        cohort: the cohort folder (docs/contracts.md).
        out: folder for segmentation.json and prognosis.json (default <cohort>/datalists).
        folds: number of prognosis cross-validation folds (patient level, stratified by risk_class).
        seed: seed of the fold assignment and of the segmentation training/validation split.
        masks: folder of liver/tumour masks <masks>/<patient_id>/t0|t1|t2.nii.gz that prognosis.json
            points to (default <cohort>/labels, the manual labels).
        dataset_dir: folder every datalist path is relative to, the bundles' data root (default the cohort).
        val_fraction: fraction of the labelled patients held out for segmentation validation (rounded; at
            least one patient on each side when there are two or more).
    """
    from analysis.clinical_table import usage_exit

    try:
        paths = write_datalists(cohort, out=out, folds=folds, seed=seed, masks=masks, dataset_dir=dataset_dir,
                                val_fraction=val_fraction)
    except ValueError as exc:
        raise usage_exit(f"datalists: {exc}") from None
    for name, path in paths.items():
        print(f"{name}: {path}")
