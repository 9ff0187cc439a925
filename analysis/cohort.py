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


def _schema_expectation(error) -> str:
    """Plain-words version of what a JSON Schema keyword wanted."""
    schema = error.schema
    if error.validator == "enum":
        return "one of " + ", ".join("empty" if v is None else repr(v) for v in schema["enum"])
    if error.validator in ("type", "minimum", "maximum"):
        kind = schema.get("type", "number")
        words = {"number": "a number", "integer": "a whole number", "string": "text"}.get(kind, kind)
        bounds = []
        if "minimum" in schema:
            bounds.append(f">= {schema['minimum']}")
        if "maximum" in schema:
            bounds.append(f"<= {schema['maximum']}")
        return words + (" " + " and ".join(bounds) if bounds else "")
    if error.validator == "pattern":
        return f"text matching {schema['pattern']}"
    if error.validator == "required":
        return "a value (column required)"
    return error.message


def validate_clinical(path: Path) -> tuple[list[Problem], list[dict]]:
    """Schema-check every row of clinical.csv; returns (problems, parsed rows)."""
    import jsonschema

    name = Path(path).name
    try:
        rows = read_clinical_rows(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure is reported, not raised
        return [Problem(name, "file", f"unreadable CSV ({exc.__class__.__name__}: {exc})",
                        "a comma-separated table with a header row")], []
    problems: list[Problem] = []
    if rows:
        missing = [c for c in REQUIRED_COLUMNS if c not in rows[0]]
        for column in missing:
            problems.append(Problem(name, f"column '{column}'", "no such column", "a column of that name"))
        if missing:
            return problems, rows
    else:
        problems.append(Problem(name, "rows", "no patient rows", "one row per patient"))
    validator = jsonschema.Draft202012Validator(load_schema())
    seen: dict[str, int] = {}
    for i, row in enumerate(rows, start=2):  # row 1 is the header
        pid = row.get("patient_id")
        where = f"{name} row {i} (patient_id {pid})" if pid else f"{name} row {i}"
        # empty optional cells are allowed; empty required ones are reported as missing values
        doc = {k: v for k, v in row.items() if not (v is None and k not in REQUIRED_COLUMNS)}
        for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
            field = err.absolute_path[0] if err.absolute_path else "row"
            found = "empty" if err.instance is None else _short(err.instance)
            problems.append(Problem(where, f"field '{field}'", found, _schema_expectation(err)))
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
    return problems, rows


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


def validate_cohort(cohort: str | Path, progress: bool = True, jobs: int = 2) -> list[Problem]:
    """Every problem of a cohort folder (empty list = valid). Reads only; writes nothing.

    Checks clinical.csv against the JSON Schema, then every image and label: fully loadable,
    3-D, finite, label values in {0, 1, 2}, label shape and affine equal to the image's
    (within :data:`AFFINE_TOLERANCE_MM`), t0/t1/t2 all present, no orphan or unpaired files.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    cohort = Path(cohort)
    if not cohort.is_dir():
        return [Problem(str(cohort), "folder", "does not exist", "a cohort folder (docs/contracts.md)")]
    problems: list[Problem] = []
    clinical = cohort / "clinical.csv"
    rows: list[dict] = []
    if clinical.exists():
        clinical_problems, rows = validate_clinical(clinical)
        problems += clinical_problems
    else:
        problems.append(Problem(str(clinical), "file", "missing", "clinical.csv with one row per patient"))
    ids = [r["patient_id"] for r in rows if isinstance(r.get("patient_id"), str)]

    images, labels = _scan_files(cohort / "images"), _scan_files(cohort / "labels")
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
        if ids and pid not in ids:
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

    Checks clinical.csv against the JSON Schema, then every image and label (loadable, 3-D, finite,
    label values 0/1/2, label shape and affine equal to the image's, t0/t1/t2 all present, no orphan
    or unpaired files). Problems go to stderr.

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
