"""One reader for the per-patient tables the verbs take, clinical.csv first of all.

``km``, ``cox``, ``nomogram``, ``table1``, ``classify``, ``datalists`` and ``radiomics`` read
clinical.csv through :func:`read_clinical_table`, which makes the checks of ``validate`` that a
reader can make before any analysis: a missing or empty file, a delimiter other than ``,``, a
header without a patient row, missing columns, patient ids outside the one rule
(:func:`analysis.cohort.check_patient_id`) and repeated ids. Each refusal is a
:class:`TableInputError` naming the file, the row (file rows: the header is row 1, the first
patient row 2, as ``validate`` counts them), the column, what was found and what is expected.
The typed frame comes from :func:`analysis.cohort.read_clinical` and keeps the file's row order, so
the patient at position ``i`` is on file row ``file_row(i)``.

:func:`usage_exit` is how a verb ends on such an error: one line on stderr, exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from analysis.cohort import check_patient_id, read_clinical, type_columns

__all__ = [
    "FIRST_ROW",
    "RULE_COLUMNS",
    "TableInputError",
    "check_ids",
    "file_row",
    "read_checked_csv",
    "read_clinical_table",
    "usage_exit",
]

#: file row of a table's first data row: the header is row 1 (``validate`` counts the same way)
FIRST_ROW = 2
#: the columns the risk-class rule reads (analysis.cohort.derive_risk_class)
RULE_COLUMNS: tuple[str, ...] = ("os_months", "death", "imaging_high_risk")
#: problems listed in one message before "... and N more"
MAX_LISTED = 10


class TableInputError(ValueError):
    """A table a verb cannot use as given; the message names the file, row, column, found and expected."""


def file_row(position: int) -> int:
    """The file row (header = row 1) of the data row at 0-based ``position``."""
    return int(position) + FIRST_ROW


def _one_line(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    listed = problems[:MAX_LISTED]
    more = f" | ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return f"{len(problems)} problems: " + " | ".join(listed) + more


def _header_line(raw: bytes) -> str:
    text = raw[:65536].decode("utf-8-sig", errors="replace")
    return next((line for line in text.splitlines() if line.strip()), "")


def read_checked_csv(path: str | Path, **read_csv_kwargs) -> pd.DataFrame:
    """A comma-separated table with a header and at least one row, every cell as text (by default).

    Refuses, naming the file: no such file, an empty file, a ``;`` or tab-delimited file (found by
    its header line), a file pandas cannot parse, a header without rows. ``read_csv_kwargs``
    replace the text-cell defaults (``dtype=str, keep_default_na=False``).
    """
    path = Path(path)
    if not path.is_file():
        raise TableInputError(f"{path}: no such file; expected a comma-separated table with a header row")
    raw = path.read_bytes()
    if not raw.strip():
        raise TableInputError(f"{path}: empty file; expected a comma-separated table with a header row "
                              "(row 1) and one row per patient")
    header = _header_line(raw)
    for name, sep in (("semicolon", ";"), ("tab", "\t")):
        if header.count(sep) > header.count(","):
            raise TableInputError(f"{path} row 1 (header): found {name}-delimited columns ({header[:80]!r}); "
                                  "expected comma-delimited columns: save the table as CSV with ',' between cells")
    kwargs = {"dtype": str, "keep_default_na": False, **read_csv_kwargs}
    try:
        frame = pd.read_csv(path, **kwargs)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TableInputError(f"{path}: unreadable CSV ({type(exc).__name__}: {reason}); expected a "
                              "comma-separated table with a header row and the same number of cells per row") from None
    if frame.empty:
        raise TableInputError(f"{path}: a header row and no patient row; expected one row per patient "
                              f"(columns found: {', '.join(map(str, frame.columns))})")
    return frame


def check_ids(frame: pd.DataFrame, path: str | Path, column: str = "patient_id") -> None:
    """Every id of ``column`` follows the patient-id rule and appears once (ids are compared stripped).

    Raises one :class:`TableInputError` listing every offending file row.
    """
    problems: list[str] = []
    seen: dict[str, int] = {}
    for pos, value in enumerate(frame[column].tolist()):
        row = file_row(pos)
        pid = value.strip() if isinstance(value, str) else value
        try:
            check_patient_id(pid, f"{path} row {row}")
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if pid in seen:
            problems.append(f"{path} row {row}: {column}: found {pid!r} again (first on row {seen[pid]}); "
                            "expected one row per patient")
        else:
            seen[pid] = row
    if problems:
        raise TableInputError(_one_line(problems))


def _check_columns(frame: pd.DataFrame, path: Path, required) -> None:
    missing = [c for c in dict.fromkeys(required) if c not in frame.columns]
    if missing:
        what = "column" if len(missing) == 1 else "columns"
        raise TableInputError(f"{path} row 1 (header): {what} {', '.join(map(repr, missing))} not found; "
                              f"expected a column of each name (found: {', '.join(map(str, frame.columns))})")


def read_clinical_table(path: str | Path, required=("patient_id",), typed: bool = True) -> pd.DataFrame:
    """clinical.csv (or any per-patient table) after the checks every verb makes on it.

    ``required``: the columns the calling verb needs (each missing one is named). When the table has
    a ``patient_id`` column every id is checked (the one rule, no repeats). ``typed``: the frame of
    :func:`analysis.cohort.read_clinical` (numbers parsed, ``risk_class`` derived by the rule where
    absent) when the rule's columns are there, else the same typing without a derived risk_class;
    ``typed=False`` keeps every cell as text. Rows keep the file's order (position i = file row i + 2).
    """
    path = Path(path)
    text = read_checked_csv(path)
    _check_columns(text, path, required)
    if "patient_id" in text:
        check_ids(text, path)
        text["patient_id"] = text["patient_id"].str.strip()
    if not typed:
        return text
    if all(c in text for c in RULE_COLUMNS):
        return read_clinical(path)
    # no rule column: read_clinical's typing without a derived risk_class
    return type_columns(text)


def usage_exit(message: str) -> SystemExit:
    """Print ``message`` on stderr as one line and return the SystemExit (status 2) to raise.

    ``raise usage_exit(f"km: {exc}") from None``: the command line shows the message, never a
    traceback, and exits 2 as ``validate`` does; ``str()`` of the exception is still the message.
    """
    line = " ".join(str(message).split("\n"))
    print(line, file=sys.stderr)
    exc = SystemExit(line)
    exc.code = 2
    return exc
