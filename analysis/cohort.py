"""The cohort folder contract: paths, clinical table, the risk-class rule, and validation.

See docs/contracts.md. ``validate_cohort`` reports every problem at once; ``validate_cli`` exits
with status 2 when there is any and writes nothing.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

TIMEPOINTS: tuple[str, ...] = ("t0", "t1", "t2")
LABELS: dict[str, int] = {"background": 0, "liver": 1, "tumour": 2}
NUM_CLASSES = 4
CLASS_NAMES: dict[int, str] = {
    0: "class 0 (short OS, high imaging risk)",
    1: "class 1 (short OS, low imaging risk)",
    2: "class 2 (long OS, high imaging risk)",
    3: "class 3 (long OS, low imaging risk)",
}
#: overall survival (months) separating short from long survivors (paper, Appendix 5)
OS_CUTOFF_MONTHS = 36.0

REQUIRED_COLUMNS: tuple[str, ...] = (
    "patient_id", "age", "sex", "treatment", "sorafenib", "os_months", "death", "bclc",
    "child_pugh", "afp_ge_400", "tumour_size", "nodules_gt3", "tace_cycles", "imaging_high_risk",
)
OPTIONAL_COLUMNS: tuple[str, ...] = ("aetiology", "risk_class", "mrecist")
NUMBER_COLUMNS = ("age", "os_months")
INTEGER_COLUMNS = ("sorafenib", "death", "afp_ge_400", "nodules_gt3", "tace_cycles", "imaging_high_risk",
                   "risk_class")

#: largest allowed difference between an image's and its label's affine entries (mm) and
#: origin (mm). Scanner exports round affines to ~1e-4 mm; anything above 1e-3 mm is a real
#: mismatch (a label saved from another scan or resampled).
AFFINE_TOLERANCE_MM = 1e-3


# --------------------------------------------------------------------------------------- paths
def find_scan(folder: Path, patient_id: str, timepoint: str) -> Path | None:
    """``<folder>/<patient_id>/<timepoint>.nii.gz`` or ``.nii``; None when neither exists."""
    for ext in (".nii.gz", ".nii"):
        p = Path(folder) / patient_id / f"{timepoint}{ext}"
        if p.exists():
            return p
    return None


def image_path(cohort: str | Path, patient_id: str, timepoint: str) -> Path:
    found = find_scan(Path(cohort) / "images", patient_id, timepoint)
    return found or Path(cohort) / "images" / patient_id / f"{timepoint}.nii.gz"


def label_path(cohort: str | Path, patient_id: str, timepoint: str) -> Path:
    found = find_scan(Path(cohort) / "labels", patient_id, timepoint)
    return found or Path(cohort) / "labels" / patient_id / f"{timepoint}.nii.gz"


def mask_path(masks: str | Path, patient_id: str, timepoint: str) -> Path:
    found = find_scan(Path(masks), patient_id, timepoint)
    return found or Path(masks) / patient_id / f"{timepoint}.nii.gz"


def is_synthetic(cohort: str | Path) -> bool:
    meta = Path(cohort) / "cohort.json"
    if not meta.exists():
        return False
    try:
        return bool(json.loads(meta.read_text()).get("synthetic", False))
    except (OSError, ValueError):
        return False


# ------------------------------------------------------------------------------ clinical table
def _parse_cell(column: str, raw: str):
    """CSV text -> the JSON value the schema checks. Empty -> None; unparsable stays a string."""
    text = raw.strip()
    if text == "":
        return None
    if column in NUMBER_COLUMNS or column in INTEGER_COLUMNS:
        try:
            value = float(text)
        except ValueError:
            return text
        if column in INTEGER_COLUMNS and math.isfinite(value) and value == int(value):
            return int(value)
        return value
    return text


def read_clinical_rows(path: str | Path) -> list[dict]:
    """Rows of clinical.csv as dicts of parsed cells (the schema's view), in file order."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    return [{c: _parse_cell(c, v) for c, v in row.items()} for row in frame.to_dict(orient="records")]


def read_clinical(path: str | Path) -> pd.DataFrame:
    """clinical.csv as a typed DataFrame; ``risk_class`` is filled from the rule where absent.

    Does not validate: run :func:`validate_cohort` first on untrusted input.
    """
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame["patient_id"] = frame["patient_id"].str.strip()
    for col in NUMBER_COLUMNS:
        if col in frame:
            frame[col] = pd.to_numeric(frame[col], errors="coerce").astype(float)
    for col in INTEGER_COLUMNS:
        if col in frame:
            frame[col] = pd.to_numeric(frame[col].replace("", None), errors="coerce").astype("Int64")
    for col in ("mrecist", "aetiology"):
        if col in frame:
            frame[col] = frame[col].replace({"": None})
    derived = derive_risk_class(frame)
    if "risk_class" not in frame:
        frame["risk_class"] = derived
    else:
        frame["risk_class"] = frame["risk_class"].fillna(derived)
    return frame


def derive_risk_class(frame: pd.DataFrame) -> pd.Series:
    """The paper's 4-class label (Appendix 5) from os_months, death and imaging_high_risk.

    short survivors (died before 36 months): 0 if high imaging risk else 1;
    long survivors (followed >= 36 months, dead or alive): 2 if high risk else 3;
    censored before 36 months: undefined (<NA>), since short/long is unknown.
    """
    os_m = pd.to_numeric(frame["os_months"], errors="coerce")
    death = pd.to_numeric(frame["death"], errors="coerce")
    high = pd.to_numeric(frame["imaging_high_risk"], errors="coerce")
    out = pd.Series(pd.NA, index=frame.index, dtype="Int64")
    short = (os_m < OS_CUTOFF_MONTHS) & (death == 1)
    long_ = os_m >= OS_CUTOFF_MONTHS
    out[short & (high == 1)] = 0
    out[short & (high == 0)] = 1
    out[long_ & (high == 1)] = 2
    out[long_ & (high == 0)] = 3
    return out


def load_schema() -> dict:
    return json.loads(resources.files("analysis").joinpath("resources/clinical.schema.json").read_text())
