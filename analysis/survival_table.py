"""The input of every survival analysis: one row per patient with a duration and an event.

Reading and joining per-patient tables (``patient_id`` keyed CSVs), the ``[NAME=][FILE:]COLUMN``
spec of the command line, and the duration/event checks that turn what lifelines would fail on
with an unhelpful message into a :class:`SurvivalInputError` naming the file, the column, what was
found and what is expected. :mod:`analysis.km`, :mod:`analysis.cox` and :mod:`analysis.nomogram`
all start here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "DURATION",
    "EVENT",
    "KNOWN_LEVELS",
    "MISSING_TOKENS",
    "SurvivalInputError",
    "check_duration_event",
    "join_column",
    "parse_column_spec",
    "read_ids_table",
    "read_table",
    "row_ids",
    "split_list",
    "table_columns",
]

log = logging.getLogger(__name__)

#: the study's duration (months) and event (1 = death) columns, the defaults of every function
DURATION = "os_months"
EVENT = "death"
#: level order for grouping columns the project knows; other columns use sorted observed values
KNOWN_LEVELS: dict[str, list] = {
    "mrecist": ["CR", "PR", "SD", "PD"],
    "best_response": ["CR", "PR", "SD", "PD"],
    "response_t1": ["CR", "PR", "SD", "PD"],
    "response_t2": ["CR", "PR", "SD", "PD"],
    "pred_class": [0, 1, 2, 3],
    "risk_class": [0, 1, 2, 3],
    "label": [0, 1, 2, 3],
    "dl_class": [0, 1, 2, 3],
    "radiomics_class": [0, 1, 2, 3],
}
#: group values meaning "not assessed": such patients are left out of that analysis with a log line
MISSING_TOKENS = {"", "NA", "N/A", "nan", "NaN", "None"}


class SurvivalInputError(ValueError):
    """Input that cannot give a valid survival analysis; the message says what and how to fix it."""


def parse_column_spec(spec: str) -> tuple[str, str | None, str]:
    """``[NAME=][FILE:]COLUMN`` -> (name, file or None, column).

    Without ``FILE`` the column is read from the main table; without ``NAME`` the column name is used
    (``mrecist`` is shown as ``mRECIST``).
    """
    text = str(spec).strip()
    name = None
    if "=" in text:
        name, text = (part.strip() for part in text.split("=", 1))
    file, column = (None, text)
    if ":" in text:
        file, column = text.rsplit(":", 1)
        file = file.strip() or None
    column = column.strip()
    if not column:
        raise SurvivalInputError(f"group spec {spec!r}: expected [NAME=][FILE:]COLUMN, found no column")
    if not name:
        name = "mRECIST" if column == "mrecist" else (column if file is None else f"{Path(file).stem}:{column}")
    return name, file, column


def split_list(value) -> list[str]:
    """A CLI list: a Python list/tuple from fire, or a comma-separated string (``[a,b]`` too)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        items = str(value).strip().strip("[]").split(",")
    return [i.strip().strip("'\"") for i in items if i.strip().strip("'\"")]


def read_ids_table(path: str | Path) -> pd.DataFrame:
    """A per-patient CSV keyed by ``patient_id`` (read as text, stripped); refuses repeated ids and
    ids outside the patient-id rule (and what :func:`analysis.clinical_table.read_checked_csv` refuses)."""
    from analysis.clinical_table import file_row, read_checked_csv
    from analysis.cohort import check_patient_id

    path = Path(path)
    if not path.exists():
        raise SurvivalInputError(f"{path}: file not found")
    frame = read_checked_csv(path, dtype={"patient_id": str}, keep_default_na=False, na_values=[""])
    if "patient_id" not in frame:
        raise SurvivalInputError(f"{path}: no patient_id column (found {list(frame.columns)})")
    frame["patient_id"] = frame["patient_id"].fillna("").astype(str).str.strip()
    dup = frame["patient_id"][frame["patient_id"].duplicated()].unique().tolist()
    if dup:
        raise SurvivalInputError(f"{path}: patient_id repeated ({dup[:10]}); expected one row per patient")
    for pos, pid in enumerate(frame["patient_id"]):
        try:
            check_patient_id(pid, f"{path} row {file_row(pos)}")
        except ValueError as exc:
            raise SurvivalInputError(str(exc)) from None
    return frame


def join_column(df: pd.DataFrame, file: str | Path, column: str, name: str, label: str | None = None) -> pd.DataFrame:
    """Left-join ``column`` of ``file`` onto ``df`` by patient_id as ``name``; log ids not found."""
    other = read_ids_table(file)
    if column not in other:
        raise SurvivalInputError(f"{file}: no column {column!r} (found {list(other.columns)})")
    missing = sorted(set(df["patient_id"]) - set(other["patient_id"]))
    if missing:
        log.warning("%s: %d patient(s) of the main table have no row (%s): no %s for them",
                    file, len(missing), ", ".join(missing[:20]), label or name)
    extra = sorted(set(other["patient_id"]) - set(df["patient_id"]))
    if extra:
        log.warning("%s: %d patient(s) not in the main table ignored (%s)", file, len(extra), ", ".join(extra[:20]))
    out = df.drop(columns=[name], errors="ignore")
    return out.merge(other[["patient_id", column]].rename(columns={column: name}), on="patient_id", how="left")


def read_table(table, join=None, required=()) -> pd.DataFrame:
    """The Cox/nomogram input: one CSV (clinical.csv is read typed), plus ``NAME=FILE:COLUMN`` joins.

    The main table goes through :func:`analysis.clinical_table.read_clinical_table` (no such or
    empty file, delimiter, a header without rows, the ``required`` columns, patient ids: the rule
    and no repeats), whose :class:`~analysis.clinical_table.TableInputError` is raised as is.
    Rows keep the file's order, joins included (position i = file row i + 2).
    """
    from analysis.clinical_table import read_checked_csv, read_clinical_table

    path = Path(table)
    if path.name == "clinical.csv":
        df = read_clinical_table(path, required=required)
    else:
        read_clinical_table(path, required=required, typed=False)  # the checks; the frame is read typed below
        df = read_checked_csv(path, keep_default_na=False, na_values=[""], dtype={"patient_id": str})
        if "patient_id" in df:
            df["patient_id"] = df["patient_id"].str.strip()
    for spec in split_list(join):
        name, file, column = parse_column_spec(spec)
        if file is None:
            raise SurvivalInputError(f"--join {spec!r}: expected NAME=FILE:COLUMN")
        if "patient_id" not in df:
            raise SurvivalInputError(f"{path}: no patient_id column to join {file} on")
        df = join_column(df, file, column, name)
    return df


def table_columns(duration: str, event: str, covariates, join=None) -> tuple[str, ...]:
    """The columns the main table of cox/nomogram must have: duration, event and every covariate
    that no ``--join NAME=FILE:COLUMN`` brings in."""
    joined = {parse_column_spec(spec)[0] for spec in split_list(join)}
    return (duration, event, *[c for c in split_list(covariates) if c not in joined])


def check_duration_event(df: pd.DataFrame, duration: str, event: str, where: str = "table",
                         file_rows: bool = False) -> None:
    """Refuse a missing column, a negative or infinite duration and an event other than 0/1, naming
    the rows; missing values pass (each analysis leaves those rows out and says so).

    ``file_rows``: ``df`` is a table as read from the file ``where`` (row order kept), so the rows
    are named by their file row (header = row 1) and patient_id, as ``validate`` names them;
    otherwise by their index labels.
    """
    for col in (duration, event):
        if col not in df:
            raise SurvivalInputError(f"{where}: no column {col!r} (found {list(df.columns)})")
    d = pd.to_numeric(df[duration], errors="coerce")
    e = pd.to_numeric(df[event], errors="coerce")
    bad_d = (d < 0) | ~np.isfinite(d.fillna(0))
    bad_e = e.notna() & ~e.isin([0, 1])
    if file_rows:
        for col, bad, expected in ((duration, bad_d, "a number >= 0"), (event, bad_e, "0 or 1")):
            if bad.any():
                raise SurvivalInputError(_file_row_problems(df, where, col, np.flatnonzero(bad.to_numpy()), expected))
        return
    bad = df.index[bad_d].tolist()
    if bad:
        raise SurvivalInputError(f"{where}: {duration} must be a number >= 0; rows {bad[:10]} are not")
    bad = df.index[bad_e].tolist()
    if bad:
        raise SurvivalInputError(f"{where}: {event} must be 0 or 1; rows {bad[:10]} have "
                                 f"{df.loc[bad[:10], event].tolist()}")


def _file_row_problems(df: pd.DataFrame, where: str, column: str, positions, expected: str) -> str:
    """One line naming each offending file row: ``FILE row R (patient_id P): field 'C': found V; expected E``."""
    from analysis.clinical_table import MAX_LISTED, file_row

    items = []
    for pos in positions[:MAX_LISTED]:
        pid = f" (patient_id {df['patient_id'].iloc[pos]})" if "patient_id" in df else ""
        value = df[column].iloc[pos]
        found = "empty" if pd.isna(value) else repr(value.item() if hasattr(value, "item") else value)
        items.append(f"{where} row {file_row(pos)}{pid}: field '{column}': found {found}; expected {expected}")
    more = f" | ... and {len(positions) - MAX_LISTED} more" if len(positions) > MAX_LISTED else ""
    return " | ".join(items) + more


def row_ids(df: pd.DataFrame, index) -> list[str]:
    """The patient ids of rows ``index`` (``row <i>`` for a table without patient_id), for messages."""
    if "patient_id" in df:
        return df.loc[index, "patient_id"].astype(str).tolist()
    return [f"row {i}" for i in index]
