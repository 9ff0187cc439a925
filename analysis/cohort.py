"""The cohort folder contract: paths, clinical table, the risk-class rule, and validation.

See docs/contracts.md. ``validate_cohort`` reports every problem at once; ``validate_cli`` exits
with status 2 when there is any and writes nothing.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import re
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

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

#: smallest accepted size (voxels) of a scan along each of its three axes. The synthetic cohort's
#: smallest scans are 16 x 16 x 8 (``analysis.synthetic.n_slices_for``: at least 8 slices); a
#: 1 x 1 x 1 "scan" or a single slice cannot be segmented or cropped to the networks' patches.
MIN_SCAN_VOXELS = 8


def load_schema() -> dict:
    """The JSON Schema of one clinical.csv row (analysis/resources/clinical.schema.json)."""
    return json.loads(resources.files("analysis").joinpath("resources/clinical.schema.json").read_text())


#: The one patient-id rule (the schema's ``patient_id`` pattern): letters, digits, ``_`` and ``-``,
#: at least one character. Ids name folders (images/<id>/), so ``.``, ``/``, ``\``, spaces and
#: empty ids are refused. Use :func:`check_patient_id` wherever an id becomes a path.
PATIENT_ID_PATTERN: str = load_schema()["properties"]["patient_id"]["pattern"]
_PATIENT_ID_RE = re.compile(PATIENT_ID_PATTERN)


def is_patient_id(value) -> bool:
    """True when ``value`` is a str matching :data:`PATIENT_ID_PATTERN` in full."""
    return isinstance(value, str) and _PATIENT_ID_RE.fullmatch(value) is not None


def check_patient_id(value, where: str) -> str:
    """``value`` when it is a valid patient id; else ValueError naming ``where``, what was found and expected.

    ``where`` says where the id came from (e.g. ``"clinical.csv row 4"``, ``"datalist.json item 3"``).
    """
    if not is_patient_id(value):
        found = "an empty id" if value in ("", None) else repr(value)
        raise ValueError(f"{where}: patient_id: found {found}; expected letters, digits, '_' or '-' only "
                         f"(the pattern {PATIENT_ID_PATTERN}), since the id names a folder")
    return value


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
    """CSV text -> the JSON value the schema checks. Empty -> None; unparsable stays a string.

    Columns the schema makes numeric (a number/integer type or an enum of numbers) are read with
    Python's ``float`` ("inf", "nan" included: the schema's checks then refuse them); whole numbers
    of integer-like columns become ``int``.
    """
    text = raw.strip()
    if text == "":
        return None
    rule = _column_rules().get(column)
    if rule is not None and rule.numeric:
        try:
            value = float(text)
        except ValueError:
            return text
        if rule.integer and math.isfinite(value) and value == int(value):
            return int(value)
        return value
    return text


def _read_table(path: str | Path) -> pd.DataFrame:
    """clinical.csv as text cells (no NA guessing: an empty cell is "")."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def read_clinical_rows(path: str | Path) -> list[dict]:
    """Rows of clinical.csv as dicts of parsed cells (the schema's view), in file order."""
    frame = _read_table(path)
    return [{c: _parse_cell(c, v) for c, v in row.items()} for row in frame.to_dict(orient="records")]


def type_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """clinical.csv's columns typed (in place, and returned): numbers as float, whole-number
    columns as Int64, empty categorical cells as None."""
    for col in NUMBER_COLUMNS:
        if col in frame:
            frame[col] = pd.to_numeric(frame[col], errors="coerce").astype(float)
    for col in INTEGER_COLUMNS:
        if col in frame:
            frame[col] = pd.to_numeric(frame[col].replace("", None), errors="coerce").astype("Int64")
    for col in ("mrecist", "aetiology"):
        if col in frame:
            frame[col] = frame[col].replace({"": None})
    return frame


def read_clinical(path: str | Path) -> pd.DataFrame:
    """clinical.csv as a typed DataFrame; ``risk_class`` is filled from the rule where absent.

    Does not validate: run :func:`validate_cohort` first on untrusted input.
    """
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame["patient_id"] = frame["patient_id"].str.strip()
    frame = type_columns(frame)
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


# ---------------------------------------------------------------------------------- validation
@dataclass(frozen=True)
class Problem:
    """One validation finding: where, which field, what was found, what is expected."""

    location: str
    field: str
    found: str
    expected: str

    def __str__(self) -> str:
        return f"{self.location}: {self.field}: found {self.found}; expected {self.expected}"


class CohortError(ValueError):
    """Raised by :func:`check_cohort` with every problem of a cohort, one per line."""

    def __init__(self, cohort: Path, problems: list[Problem]):
        self.cohort = Path(cohort)
        self.problems = problems
        lines = [f"cohort {cohort} has {len(problems)} problem(s):"] + [f"  {p}" for p in problems]
        super().__init__("\n".join(lines))


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _found(value) -> str:
    """How a parsed cell is shown after 'found': empty, a non-finite number said as such, or its repr."""
    if value is None:
        return "empty"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} (not a finite number)"
    return _short(value)


_KNOWN_KEYWORDS = {"type", "enum", "pattern", "minimum", "maximum", "description"}
_KNOWN_ROOT = {"$schema", "$id", "title", "description", "type", "required", "properties", "additionalProperties"}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class _ColumnRule:
    """One column's rules, compiled from the schema for the vectorised checks."""

    column: str
    required: bool
    type: str | None
    enum: tuple | None
    pattern: str | None
    minimum: float | None
    maximum: float | None

    @property
    def numeric(self) -> bool:
        """Cells are read as numbers (type number/integer, or an enum holding numbers)."""
        return self.type in ("number", "integer") or any(_is_number(v) for v in self.enum or ())

    @property
    def integer(self) -> bool:
        """Whole numbers are kept as int (type integer, or an enum of whole numbers only)."""
        numbers = [v for v in self.enum or () if _is_number(v)]
        return self.type == "integer" or (bool(numbers) and all(isinstance(v, int) for v in numbers))

    @property
    def expected(self) -> str:
        """What the column expects, in plain words (the 'expected' part of a Problem)."""
        if self.enum is not None:
            return "one of " + ", ".join("empty" if v is None else repr(v) for v in self.enum)
        if self.type in ("number", "integer") or self.minimum is not None or self.maximum is not None:
            words = {"number": "a number", "integer": "a whole number"}.get(self.type or "number")
            bounds = [f">= {self.minimum}"] if self.minimum is not None else []
            bounds += [f"<= {self.maximum}"] if self.maximum is not None else []
            return words + (" " + " and ".join(bounds) if bounds else "")
        if self.pattern is not None:
            return f"text matching {self.pattern}"
        return "text" if self.type == "string" else "a value"


def _compile_rules(schema: dict) -> dict[str, _ColumnRule]:
    """Per-column rules of the row schema; refuses keywords the vectorised checks do not implement,
    so that the schema file stays the one source of the rules."""
    unknown = set(schema) - _KNOWN_ROOT
    if unknown or schema.get("type") != "object" or schema.get("additionalProperties", True) is not True:
        raise ValueError(f"clinical.schema.json: root keyword(s) {sorted(unknown) or schema.get('type')} are not "
                         "implemented by analysis.cohort's vectorised checks; add them there first")
    required = set(schema.get("required", ()))
    rules = {}
    for column, spec in schema["properties"].items():
        extra = set(spec) - _KNOWN_KEYWORDS
        if extra or spec.get("type", "number") not in ("number", "integer", "string"):
            raise ValueError(f"clinical.schema.json: {column}: keyword(s) {sorted(extra) or spec['type']} are not "
                             "implemented by analysis.cohort's vectorised checks; add them there first")
        rules[column] = _ColumnRule(column, column in required, spec.get("type"),
                                    tuple(spec["enum"]) if "enum" in spec else None, spec.get("pattern"),
                                    spec.get("minimum"), spec.get("maximum"))
    return rules


_RULES: dict[str, _ColumnRule] | None = None


def _column_rules() -> dict[str, _ColumnRule]:
    global _RULES
    if _RULES is None:
        _RULES = _compile_rules(load_schema())
    return _RULES


def _where(name: str, row: int, pid) -> str:
    """The location of a problem in clinical.csv: the file row (header = row 1) and the patient."""
    return f"{name} row {row} (patient_id {pid})" if pid else f"{name} row {row}"


def _table_problems(name: str, frame: pd.DataFrame) -> list[Problem]:
    """File-level problems (missing required columns, no rows); the row checks need none of them."""
    required = [c for c in load_schema().get("required", ()) if c not in frame.columns]
    problems = [Problem(name, f"column '{c}'", "no such column", "a column of that name") for c in required]
    if not problems and len(frame) == 0:
        problems.append(Problem(name, "rows", "no patient rows", "one row per patient"))
    return problems


def _unreadable(name: str, exc: Exception) -> Problem:
    return Problem(name, "file", f"unreadable CSV ({exc.__class__.__name__}: {exc})",
                   "a comma-separated table with a header row")


def _finite_validator(schema: dict):
    """jsonschema's Draft 2020-12 validator whose number and integer types are finite, as in JSON
    (which has no NaN or infinity): "inf" and "nan" cells fail ``type``."""
    from jsonschema import Draft202012Validator, validators

    base = Draft202012Validator.TYPE_CHECKER
    checker = base.redefine_many({
        "number": lambda _, x: base.is_type(x, "number") and math.isfinite(x),
        "integer": lambda _, x: base.is_type(x, "integer") and math.isfinite(x),
    })
    return validators.extend(Draft202012Validator, type_checker=checker)(schema)


def _validate_clinical_rowwise(path: str | Path) -> list[Problem]:
    """Reference implementation of :func:`validate_clinical`: jsonschema applied to each parsed row.

    About 1 ms per row; kept so that tests can check that the vectorised checks find exactly the
    same problems (same order, same words).
    """
    name = Path(path).name
    try:
        frame = _read_table(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure is reported, not raised
        return [_unreadable(name, exc)]
    problems = _table_problems(name, frame)
    if problems:
        return problems
    schema = load_schema()
    rules = _column_rules()
    required = set(schema.get("required", ()))
    validator = _finite_validator(schema)
    rows = [{c: _parse_cell(c, v) for c, v in row.items()} for row in frame.to_dict(orient="records")]
    seen: dict[str, int] = {}
    for i, row in enumerate(rows, start=2):  # row 1 is the header
        pid = row.get("patient_id")
        where = _where(name, i, pid)
        # empty optional cells are allowed; empty required ones are checked as null (and fail)
        doc = {k: v for k, v in row.items() if not (v is None and k not in required)}
        row_problems: list[Problem] = []
        for err in sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path]):
            field = err.absolute_path[0] if err.absolute_path else "row"
            expected = rules[field].expected if field in rules else err.message
            problem = Problem(where, f"field '{field}'", _found(err.instance), expected)
            if problem not in row_problems:  # one line per cell, however many keywords it fails
                row_problems.append(problem)
        problems += row_problems
        if isinstance(pid, str):
            if pid in seen:
                problems.append(Problem(where, "field 'patient_id'", repr(pid),
                                        f"a unique id (also on row {seen[pid]})"))
            seen.setdefault(pid, i)
        rc = row.get("risk_class")
        if rc is not None and rc in (0, 1, 2, 3):
            derived = derive_risk_class(pd.DataFrame([row])).iloc[0]
            if pd.notna(derived) and int(derived) != rc:
                problems.append(Problem(where, "field 'risk_class'", repr(rc),
                                        f"{int(derived)} by the rule from os_months, death and imaging_high_risk"))
    return problems


def _codes(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(codes, distinct stripped texts) of a text column: ``texts[codes]`` is the stripped column.

    Checks then run once per distinct value (a handful for most columns) and map back through codes.
    """
    codes, uniques = pd.factorize(column.to_numpy(dtype=object), use_na_sentinel=False)
    stripped = np.array([u.strip() for u in uniques], dtype=object) if len(uniques) else uniques.astype(object)
    if len(stripped) and (stripped != uniques).any():
        again, stripped = pd.factorize(stripped, use_na_sentinel=False)
        codes = again[codes]
        stripped = np.asarray(stripped, dtype=object)
    return codes, stripped


def _parse_numbers(texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values, parsed) of stripped texts as Python's ``float`` reads them ("inf", "1e3", "1_000")."""
    values = np.full(len(texts), np.nan)
    filled = np.asarray(texts != "", dtype=bool)
    parsed = filled.copy()
    idx = np.flatnonzero(filled)
    try:
        values[idx] = texts[idx].astype(np.float64)  # float() on each object: exact, raises on any text
        return values, parsed
    except (ValueError, TypeError, OverflowError):
        pass
    # some cells are not numbers: let pandas find the numeric ones, then read those exactly
    approx = pd.to_numeric(pd.Series(texts[idx]), errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    sure = ~np.isnan(approx)
    try:
        values[idx[sure]] = texts[idx[sure]].astype(np.float64)
        rest = idx[~sure]
    except (ValueError, TypeError, OverflowError):
        rest = idx
    for j in rest:  # the few cells pandas could not read: text, "nan", or spellings only float() knows
        try:
            values[j] = float(texts[j])
        except ValueError:
            parsed[j] = False
    return values, parsed


def _bad_values(rule: _ColumnRule, texts: np.ndarray, numbers: np.ndarray, is_number: np.ndarray) -> np.ndarray:
    """For each distinct stripped text of a column: does it break the column's rule?

    Mirrors the row-wise path: empty is null (allowed when the column is optional), numeric columns
    hold numbers where ``float`` reads them and text elsewhere, and numbers must be finite.
    """
    empty = np.asarray(texts == "", dtype=bool)
    is_text = ~empty & ~is_number
    with np.errstate(invalid="ignore"):
        finite = is_number & np.isfinite(numbers)
        ok = np.ones(len(texts), dtype=bool)
        if rule.type == "number":
            ok &= finite
        elif rule.type == "integer":
            ok &= finite & (np.floor(numbers) == numbers)
        elif rule.type == "string":
            ok &= is_text
        if rule.enum is not None:
            allowed = np.zeros(len(texts), dtype=bool)
            numeric = [v for v in rule.enum if _is_number(v)]
            words = [v for v in rule.enum if isinstance(v, str)]
            if numeric:
                allowed |= is_number & np.isin(numbers, numeric)
            if words:
                allowed |= is_text & pd.Series(texts).isin(words).to_numpy()
            if None in rule.enum:
                allowed |= empty
            ok &= allowed
        if rule.pattern is not None and is_text.any():
            matched = np.ones(len(texts), dtype=bool)
            matched[is_text] = pd.Series(texts[is_text]).str.contains(rule.pattern, regex=True).to_numpy(dtype=bool)
            ok &= matched
        if rule.minimum is not None:
            ok &= ~finite | (numbers >= rule.minimum)
        if rule.maximum is not None:
            ok &= ~finite | (numbers <= rule.maximum)
    if not rule.required:
        ok |= empty
    return ~ok


def validate_clinical(path: str | Path) -> tuple[list[Problem], list[str]]:
    """Schema-check every row of clinical.csv, vectorised; returns (problems, patient ids).

    The rules are those of clinical.schema.json (type, pattern, enum, minimum, maximum, required;
    numbers must be finite), applied column by column with numpy/pandas, plus unique patient ids and
    a stated risk_class agreeing with :func:`derive_risk_class`. Finds exactly what
    :func:`_validate_clinical_rowwise` (jsonschema per row) finds, in the same order and words, at
    about a microsecond per row. Problems name the file row (the header is row 1). The ids are the
    distinct non-empty patient_id cells in file order.
    """
    name = Path(path).name
    try:
        frame = _read_table(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure is reported, not raised
        return [_unreadable(name, exc)], []
    pid_codes = pid_texts = None
    ids: list[str] = []
    if "patient_id" in frame.columns:
        pid_codes, pid_texts = _codes(frame["patient_id"])
        ids = [t for t in pid_texts.tolist() if t]
    problems = _table_problems(name, frame)
    if problems:
        return problems, ids

    found: list[tuple[int, int, str, str, str]] = []  # (row index, kind, field, found, expected)
    numbers_of: dict[str, np.ndarray] = {}
    texts_of: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for column, rule in _column_rules().items():
        if column not in frame.columns:
            continue  # an absent optional column (absent required ones were reported above)
        codes, texts = (pid_codes, pid_texts) if column == "patient_id" else _codes(frame[column])
        if rule.numeric:
            numbers, is_number = _parse_numbers(texts)
        else:
            numbers, is_number = np.full(len(texts), np.nan), np.zeros(len(texts), dtype=bool)
        if column in ("os_months", "death", "imaging_high_risk", "risk_class"):
            numbers_of[column] = np.where(is_number, numbers, np.nan)[codes]
            texts_of[column] = (codes, texts)
        bad = _bad_values(rule, texts, numbers, is_number)
        if bad.any():
            for i in np.flatnonzero(bad[codes]).tolist():
                value = _parse_cell(column, texts[codes[i]])
                found.append((i, 0, column, _found(value), rule.expected))

    # duplicate ids: every repeat names the row of the first occurrence
    filled = pid_texts != ""
    first = np.unique(pid_codes, return_index=True)[1]  # codes number ids in order of first appearance
    for i in np.flatnonzero(filled[pid_codes] & (first[pid_codes] != np.arange(len(pid_codes)))).tolist():
        pid = pid_texts[pid_codes[i]]
        found.append((i, 1, "patient_id", repr(pid), f"a unique id (also on row {int(first[pid_codes[i]]) + 2})"))

    # a stated risk_class must agree with the rule
    if "risk_class" in numbers_of:
        stated = numbers_of["risk_class"]
        derived = derive_risk_class(pd.DataFrame({c: numbers_of[c] for c in ("os_months", "death", "imaging_high_risk")}))
        derived = derived.to_numpy(dtype=float, na_value=np.nan)
        with np.errstate(invalid="ignore"):
            wrong = np.isin(stated, (0, 1, 2, 3)) & ~np.isnan(derived) & (derived != stated)
        codes, texts = texts_of["risk_class"]
        for i in np.flatnonzero(wrong).tolist():
            found.append((i, 2, "risk_class", repr(_parse_cell("risk_class", texts[codes[i]])),
                          f"{int(derived[i])} by the rule from os_months, death and imaging_high_risk"))

    found.sort(key=lambda t: t[:3])
    for i, _, column, what, expected in found:
        pid = pid_texts[pid_codes[i]]
        problems.append(Problem(_where(name, i + 2, pid), f"field '{column}'", what, expected))
    return problems, ids


def _check_volume(path: Path, is_label: bool) -> tuple[list[Problem], tuple | None]:
    """Load one NIfTI fully; returns (problems, (shape, affine)) with geometry when loadable."""
    import nibabel as nib

    problems: list[Problem] = []
    where = str(path)
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)  # reads every byte: catches truncated files
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError) as exc:
        return [Problem(where, "file", f"unreadable ({exc.__class__.__name__}: {exc})",
                        "a complete NIfTI-1/2 file (.nii or .nii.gz)")], None
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for corrupt headers
        return [Problem(where, "file", f"unreadable ({exc.__class__.__name__}: {exc})",
                        "a complete NIfTI-1/2 file (.nii or .nii.gz)")], None
    shape = tuple(int(s) for s in data.shape)
    if data.ndim != 3:
        problems.append(Problem(where, "dimensions", f"{data.ndim}-D array of shape {shape}",
                                "a 3-D volume (one arterial-phase scan)"))
    elif not is_label and min(shape) < MIN_SCAN_VOXELS:  # a label of another shape is reported as such
        problems.append(Problem(where, "dimensions", f"shape {shape}",
                                f"at least {MIN_SCAN_VOXELS} voxels along each axis"))
    if not np.issubdtype(data.dtype, np.integer):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            problems.append(Problem(where, "voxel values", f"{bad} non-finite voxel(s) (NaN or inf)",
                                    "finite values everywhere"))
    if is_label:
        values = np.unique(data)
        extra = [v for v in values.tolist() if v not in (0, 1, 2)]
        if extra:
            shown = ", ".join(str(int(v)) if float(v).is_integer() else str(v) for v in extra[:5])
            problems.append(Problem(where, "label values", f"value(s) {shown}",
                                    "only 0 (background), 1 (liver), 2 (tumour)"))
    return problems, (shape[:3], np.asarray(img.affine, dtype=float))


def _scan_files(folder: Path) -> dict[str, dict[str, list[Path]]]:
    """patient folder -> stem -> files; stems are file names without .nii/.nii.gz."""
    found: dict[str, dict[str, list[Path]]] = {}
    if not folder.is_dir():
        return found
    for patient_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        entries: dict[str, list[Path]] = {}
        for f in sorted(patient_dir.iterdir()):
            stem = f.name[:-7] if f.name.endswith(".nii.gz") else f.name[:-4] if f.name.endswith(".nii") else f.name
            entries.setdefault(stem, []).append(f)
        found[patient_dir.name] = entries
    return found


def _outside(path: Path, root: Path) -> bool:
    try:
        return not path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a link loop
        return True


def _links_outside(cohort: Path, images: dict, labels: dict) -> tuple[list[Problem], set[Path]]:
    """Links leading out of the cohort folder: (one problem per link, every path not to read).

    A link inside the folder (e.g. images/P02 -> P01) is fine. A file reached through a link that
    leaves the folder is never read (it could be anything, a FIFO included); the link is reported.
    """
    root = cohort.resolve()
    paths = [cohort / "clinical.csv", cohort / "cohort.json"]
    for kind, tree in (("images", images), ("labels", labels)):
        paths.append(cohort / kind)
        for pid, entries in tree.items():
            paths.append(cohort / kind / pid)
            paths += [f for files in entries.values() for f in files]
    problems: list[Problem] = []
    blocked: set[Path] = set()
    for path in paths:
        if not _outside(path, root):
            continue
        blocked.add(path)
        if path.is_symlink():
            try:
                target = os.readlink(path)
            except OSError as exc:
                target = f"? ({exc.__class__.__name__})"
            problems.append(Problem(str(path), "symbolic link",
                                    f"a link to {target} (resolving to {path.resolve()}), outside the cohort folder",
                                    f"files and folders inside {root} (copy the file in, or link within the folder)"))
    return problems, blocked


def validate_cohort(cohort: str | Path, progress: bool = True, jobs: int = 2) -> list[Problem]:
    """Every problem of a cohort folder (empty list = valid). Reads only; writes nothing.

    Checks clinical.csv against the JSON Schema (:func:`validate_clinical`), then every image and
    label: fully loadable, 3-D, at least :data:`MIN_SCAN_VOXELS` voxels along each axis (images),
    finite, label values in {0, 1, 2}, label shape and affine equal to the image's (within
    :data:`AFFINE_TOLERANCE_MM`), t0/t1/t2 all present, no orphan or unpaired files, and no
    symbolic link leading out of the cohort folder (such files are not read).
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    cohort = Path(cohort)
    if not cohort.is_dir():
        return [Problem(str(cohort), "folder", "does not exist", "a cohort folder (docs/contracts.md)")]
    problems: list[Problem] = []
    images, labels = _scan_files(cohort / "images"), _scan_files(cohort / "labels")
    link_problems, blocked = _links_outside(cohort, images, labels)
    clinical = cohort / "clinical.csv"
    ids: list[str] = []
    if clinical in blocked:
        pass  # reported as a link leaving the folder
    elif clinical.exists():
        clinical_problems, ids = validate_clinical(clinical)
        problems += clinical_problems
    else:
        problems.append(Problem(str(clinical), "file", "missing", "clinical.csv with one row per patient"))
    problems += link_problems
    ids = [pid for pid in ids if is_patient_id(pid)]  # the others are reported; they name no folder
    known = set(ids)

    if not (cohort / "images").is_dir():
        problems.append(Problem(str(cohort / "images"), "folder", "missing", "images/<patient_id>/t0|t1|t2.nii.gz"))
    for kind in ("images", "labels"):
        folder = cohort / kind
        for stray in sorted(folder.iterdir()) if folder.is_dir() else []:
            if stray.is_file() and not stray.name.startswith("."):
                problems.append(Problem(str(stray), "file", "a file outside any patient folder",
                                        f"{kind}/<patient_id>/t0|t1|t2.nii.gz"))
    for pid in ids:
        if pid not in images:
            problems.append(Problem(f"clinical.csv patient {pid}", "images", f"no folder images/{pid}",
                                    "a folder with t0, t1, t2"))
    for pid in images:
        if known and pid not in known:
            problems.append(Problem(str(cohort / "images" / pid), "folder", "orphan: no clinical.csv row",
                                    f"a row with patient_id {pid} or no folder"))
    jobs_list: list[tuple[Path, bool]] = []
    pairs: list[tuple[Path, Path]] = []
    for kind, tree in (("images", images), ("labels", labels)):
        for pid, entries in tree.items():
            for stem, files in entries.items():
                if stem not in TIMEPOINTS:
                    for f in files:
                        problems.append(Problem(str(f), "file name", repr(f.name),
                                                "t0.nii.gz, t1.nii.gz or t2.nii.gz"))
                    continue
                if len(files) > 1:
                    problems.append(Problem(str(files[0].parent), f"time point {stem}",
                                            f"{len(files)} files ({', '.join(f.name for f in files)})",
                                            "exactly one file per time point"))
                if files[0] not in blocked:
                    jobs_list.append((files[0], kind == "labels"))
            if kind == "images":
                for tp in TIMEPOINTS:
                    if tp not in entries:
                        problems.append(Problem(str(cohort / "images" / pid), f"time point {tp}", "missing",
                                                f"images/{pid}/{tp}.nii.gz"))
    for pid, entries in labels.items():
        for stem, files in entries.items():
            if stem not in TIMEPOINTS:
                continue
            image = images.get(pid, {}).get(stem)
            if not image:
                problems.append(Problem(str(files[0]), "label", "unpaired: no matching image",
                                        f"images/{pid}/{stem}.nii.gz beside it"))
            else:
                pairs.append((image[0], files[0]))

    results: dict[Path, tuple] = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {path: pool.submit(_check_volume, path, is_label) for path, is_label in jobs_list}
        bar = tqdm(futures.items(), total=len(futures), desc="validate scans", unit="scan",
                   disable=not progress or len(futures) < 20)
        for path, fut in bar:
            file_problems, geometry = fut.result()
            problems += file_problems
            results[path] = geometry
    for image, label in pairs:
        gi, gl = results.get(image), results.get(label)
        if gi is None or gl is None:
            continue
        if gi[0] != gl[0]:
            problems.append(Problem(str(label), "shape", str(gl[0]), f"{gi[0]} (the shape of {image.name})"))
        elif not np.allclose(gi[1], gl[1], atol=AFFINE_TOLERANCE_MM, rtol=0):
            diff = float(np.max(np.abs(gi[1] - gl[1])))
            problems.append(Problem(str(label), "affine", f"differs from the image's by up to {diff:.4g} mm",
                                    f"the affine of {image} within {AFFINE_TOLERANCE_MM} mm"))
    return problems


def check_cohort(cohort: str | Path, progress: bool = True) -> None:
    """Raise :class:`CohortError` listing every problem; return quietly when the cohort is valid."""
    problems = validate_cohort(cohort, progress=progress)
    if problems:
        raise CohortError(Path(cohort), problems)


def validate_cli(cohort: str, quiet: bool = False) -> None:
    """python -m analysis validate DIR: one line per problem, exit status 2 if any; writes nothing.

    Checks clinical.csv against the JSON Schema (finite numbers, patient ids that are folder names),
    then every image and label (loadable, 3-D, at least 8 voxels per axis, finite, label values
    0/1/2, label shape and affine equal to the image's, t0/t1/t2 all present, no orphan or unpaired
    files, no link leading out of the folder). Problems go to stderr.

    Args:
        cohort: the cohort folder to check (docs/contracts.md).
        quiet: no progress bar, and nothing printed when the cohort is valid (problems are still listed).
    """
    import sys

    problems = validate_cohort(cohort, progress=not quiet)
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        print(f"{len(problems)} problem(s) in cohort {cohort}", file=sys.stderr)
        raise SystemExit(2)
    if not quiet:
        print(f"cohort {cohort}: valid")


# ------------------------------------------------------------------------------------ summary
def summarise_cohort(cohort: str | Path) -> dict:
    """Headline counts of a cohort (after validation): patients, subgroups, events, classes, geometry."""
    import nibabel as nib

    cohort = Path(cohort)
    clin = read_clinical(cohort / "clinical.csv")
    spacings, orientations = [], {}
    for pid in clin["patient_id"]:
        for tp in TIMEPOINTS:
            p = find_scan(cohort / "images", pid, tp)
            if p is None:
                continue
            img = nib.load(str(p))
            spacings.append(img.header.get_zooms()[:3])
            code = "".join(nib.aff2axcodes(img.affine))
            orientations[code] = orientations.get(code, 0) + 1
    sp = np.array(spacings, dtype=np.float64) if spacings else np.zeros((0, 3))
    classes = clin["risk_class"].value_counts(dropna=False)
    return {
        "cohort": str(cohort),
        "synthetic": is_synthetic(cohort),
        "patients": int(len(clin)),
        "treatment": {k: int(v) for k, v in clin["treatment"].value_counts().items()},
        "deaths": int(clin["death"].sum()),
        "censored_fraction": round(float(1 - clin["death"].mean()), 3),
        "median_follow_up_months": round(float(clin["os_months"].median()), 1),
        "risk_class": {("undefined" if pd.isna(k) else str(int(k))): int(v) for k, v in classes.items()},
        "scans": int(len(spacings)),
        "orientations": orientations,
        "spacing_mm_min": sp.min(axis=0).round(2).tolist() if len(sp) else [],
        "spacing_mm_max": sp.max(axis=0).round(2).tolist() if len(sp) else [],
    }


def summary_cli(cohort: str) -> None:
    """python -m analysis summary DIR: headline counts of a cohort folder.

    Patients, treatment groups, deaths, censored fraction, median follow-up, risk classes, scans,
    orientations and the voxel spacing range. Meant for a folder that passes ``validate``.

    Args:
        cohort: the cohort folder (its clinical.csv and images/) to summarise.
    """
    for key, value in summarise_cohort(cohort).items():
        print(f"{key:>26}: {value}")
