"""Baseline characteristics table (the paper's Table 1), overall and per group.

Categorical rows show ``n (%)``, continuous rows ``mean (SD)`` (sample SD, ddof 1). Percentages use
every patient of the column (N/A included) as denominator, as the paper's Table 1 does.

Tests (p-values on each characteristic's first row):

* categorical: Pearson chi-square, ``scipy.stats.chi2_contingency`` with its defaults, which means
  Yates' continuity correction for a 2 x 2 table (this reproduces the paper's sex p = 0.081;
  without it p = 0.051) and none for larger tables (BCLC p = 0.012 as published). N/A and levels
  empty in every group are shown but left out of the test.
* continuous, two groups: Student's t-test (equal variances). From the paper's summary numbers
  (65.1 +- 9.4, n 110 vs 66.3 +- 12.8, n 71) Student gives p = 0.469 and Welch 0.498; the published
  0.476 is closest to Student's. More than two groups: one-way ANOVA.

A test that cannot be computed (fewer than two non-empty levels or groups) leaves p empty; the
reason is in ``summary.json`` (``notes``). Patients without a group value are left out and listed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from analysis.io import write_csv, write_json

log = logging.getLogger(__name__)

__all__ = ["ROWS", "table1", "table1_cli", "write_table1"]

NA_LABEL = "N/A"
#: (column, characteristic, kind, {value: level label}) in the paper's order; kind "cat"/"num"
ROWS: tuple[tuple[str, str, str, dict], ...] = (
    ("age", "Age at diagnosis, mean (SD)", "num", {}),
    ("sex", "Sex, n (%)", "cat", {"F": "Female", "M": "Male"}),
    ("aetiology", "Aetiology, n (%)", "cat",
     {"HCV": "Hepatitis C", "HBV": "Hepatitis B", "Alcohol": "Alcohol", "NASH": "NASH", "Other": "Other"}),
    ("tumour_size", "Tumour size, n (%)", "cat", {"<3cm": "< 3 cm", "3-5cm": "3-5 cm", ">5cm": "> 5 cm"}),
    ("nodules_gt3", "Number of nodules, n (%)", "cat", {"0": "<= 3", "1": "> 3"}),
    ("bclc", "BCLC stage at initial diagnosis, n (%)", "cat", {"A": "A", "B": "B", "C": "C"}),
    ("child_pugh", "Child-Pugh class at initial diagnosis, n (%)", "cat", {"A": "A", "B": "B"}),
    ("mrecist", "mRECIST, n (%)", "cat", {"CR": "CR", "PR": "PR", "SD": "SD", "PD": "PD"}),
    ("sorafenib", "Sorafenib, n (%)", "cat", {"0": "No", "1": "Yes"}),
    ("afp_ge_400", "AFP (ng/mL), n (%)", "cat", {"1": ">= 400", "0": "< 400"}),
    ("tace_cycles", "Number of TACE cycles, mean (SD)", "num", {}),
)
_NA_VALUES = {"", "NA", "N/A", "nan", "None", "<NA>"}


def _as_text(series: pd.Series) -> pd.Series:
    """Category values as text ('1' not '1.0'); N/A for every spelling of missing."""
    def one(v):
        if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
            return NA_LABEL
        if isinstance(v, (float, np.floating)) and float(v).is_integer():
            v = int(v)
        text = str(v).strip()
        return NA_LABEL if text in _NA_VALUES else text
    return series.map(one)


def _fmt_count(n: int, total: int) -> str:
    return f"{n} ({100.0 * n / total:.1f})" if total else f"{n} (-)"


def _fmt_mean(values: pd.Series) -> str:
    v = values.dropna()
    if v.empty:
        return "-"
    sd = f"{v.std(ddof=1):.1f}" if len(v) > 1 else "-"
    return f"{v.mean():.1f} ({sd})"


def _categorical(frame, column, label, levels, group, groups, notes, tests):
    text = _as_text(frame[column])
    known = [lv for lv in levels if (text == lv).any()]
    extra = sorted(set(text) - set(levels) - {NA_LABEL})
    order = known + extra + ([NA_LABEL] if (text == NA_LABEL).any() else [])
    counts = pd.crosstab(text, frame[group]).reindex(index=order, columns=groups, fill_value=0)
    tested = counts.drop(index=[NA_LABEL], errors="ignore")
    tested = tested.loc[tested.sum(axis=1) > 0, tested.sum(axis=0) > 0]
    p = np.nan
    if tested.shape[0] >= 2 and tested.shape[1] >= 2:
        p = float(stats.chi2_contingency(tested.to_numpy())[1])
        tests[label] = "Pearson chi-square" + (" with Yates correction" if tested.shape == (2, 2) else "")
    else:
        notes.append(f"{label}: no test (fewer than two non-empty levels or groups outside N/A)")
    if (text == NA_LABEL).any():
        notes.append(f"{label}: {int((text == NA_LABEL).sum())} N/A shown, left out of the test")
    rows = [{"characteristic": label, "level": "", "overall": "", **{g: "" for g in groups}, "p_value": p}]
    totals = {g: int((frame[group] == g).sum()) for g in groups}
    for lv in order:
        shown = levels.get(lv, lv) if lv != NA_LABEL else NA_LABEL
        rows.append({"characteristic": label, "level": shown,
                     "overall": _fmt_count(int(counts.loc[lv].sum()), len(frame)),
                     **{g: _fmt_count(int(counts.loc[lv, g]), totals[g]) for g in groups}, "p_value": np.nan})
    return rows


def _continuous(frame, column, label, group, groups, notes, tests):
    values = pd.to_numeric(frame[column], errors="coerce")
    samples = [values[frame[group] == g].dropna().to_numpy(dtype=float) for g in groups]
    p = np.nan
    usable = [s for s in samples if len(s) >= 2]
    if len(usable) == len(groups) == 2:
        p = float(stats.ttest_ind(*samples, equal_var=True).pvalue)
        tests[label] = "Student t-test (equal variances)"
    elif len(usable) == len(groups) > 2:
        p = float(stats.f_oneway(*samples).pvalue)
        tests[label] = "one-way ANOVA"
    else:
        notes.append(f"{label}: no test (a group has fewer than two values)")
    missing = int(values.isna().sum())
    if missing:
        notes.append(f"{label}: {missing} missing value(s) left out of mean, SD and test")
    return [{"characteristic": label, "level": "", "overall": _fmt_mean(values),
             **{g: _fmt_mean(values[frame[group] == g]) for g in groups}, "p_value": p}]


def _group_order(values: pd.Series) -> list[str]:
    present = sorted(values.unique().tolist())
    preferred = [g for g in ("TACE", "TACE+MWA") if g in present]
    return preferred + [g for g in present if g not in preferred]


def table1(clinical: pd.DataFrame, group: str = "treatment", mrecist: pd.DataFrame | None = None,
           mrecist_column: str = "best_response") -> pd.DataFrame:
    """Table 1; ``table.attrs["summary"]`` holds the tests used, notes and excluded patients.

    ``mrecist``: a mrecist.csv table; its ``mrecist_column`` becomes the ``mrecist`` row (joined on
    patient_id; patients absent from it are N/A), replacing a clinical ``mrecist`` column.
    """
    if group not in clinical.columns:
        raise ValueError(f"group column {group!r} not in the clinical table; columns: {list(clinical.columns)}")
    frame = clinical.copy()
    frame["patient_id"] = frame["patient_id"].astype(str).str.strip()
    notes: list[str] = []
    if mrecist is not None:
        for col in ("patient_id", mrecist_column):
            if col not in mrecist.columns:
                raise ValueError(f"mRECIST table lacks column {col!r}; found {list(mrecist.columns)}")
        resp = mrecist.assign(patient_id=mrecist["patient_id"].astype(str).str.strip())
        resp = resp.drop_duplicates("patient_id").set_index("patient_id")[mrecist_column]
        absent = sorted(set(frame["patient_id"]) - set(resp.index))
        if absent:
            log.warning("table1: %d patient(s) without mRECIST result, shown as N/A: %s", len(absent), absent)
            notes.append(f"mRECIST: no result for {', '.join(absent)} (N/A)")
        frame["mrecist"] = frame["patient_id"].map(resp)
    grp = frame[group].map(lambda v: None if pd.isna(v) or str(v).strip() in _NA_VALUES else str(v).strip())
    excluded = frame.loc[grp.isna(), "patient_id"].tolist()
    if excluded:
        log.warning("table1: %d patient(s) without a %s value left out: %s", len(excluded), group, excluded)
        notes.append(f"left out (no {group}): {', '.join(excluded)}")
    frame = frame.assign(**{group: grp})[grp.notna()]
    groups = _group_order(frame[group])
    tests: dict[str, str] = {}
    rows = [{"characteristic": "patients, n", "level": "", "overall": str(len(frame)),
             **{g: str(int((frame[group] == g).sum())) for g in groups}, "p_value": np.nan}]
    skipped = []
    for column, label, kind, levels in ROWS:
        if column == group:
            continue
        if column not in frame.columns or _as_text(frame[column]).eq(NA_LABEL).all():
            skipped.append(column)
            continue
        if kind == "num":
            rows += _continuous(frame, column, label, group, groups, notes, tests)
        else:
            rows += _categorical(frame, column, label, levels, group, groups, notes, tests)
    if skipped:
        log.info("table1: rows without data skipped: %s", skipped)
    table = pd.DataFrame(rows, columns=["characteristic", "level", "overall", *groups, "p_value"])
    summary = {"group": group, "groups": {g: int((frame[group] == g).sum()) for g in groups},
               "n": len(frame), "tests": tests, "rows_without_data": skipped,
               "excluded_patients": excluded, "notes": notes}
    table.attrs["summary"] = summary
    return table


def write_table1(table: pd.DataFrame, out: str | Path) -> Path:
    """OUT (table1.csv) and, from ``table.attrs["summary"]``, summary.json beside it."""
    write_csv(out, table)
    if "summary" in table.attrs:
        write_json(Path(out).parent / "summary.json", table.attrs["summary"])
    return Path(out)


def table1_cli(clinical: str, group: str = "treatment", out: str = "table1.csv", mrecist: str | None = None,
               mrecist_column: str = "best_response") -> str:
    """Table 1 of a clinical.csv: writes OUT and summary.json beside it.

    Categorical rows n (%), continuous rows mean (SD), a chi-square, t-test or ANOVA p-value per
    characteristic (analysis.table1). Patients without a --group value are left out and listed.

    Args:
        clinical: the clinical.csv to tabulate.
        group: column whose values are the table's columns besides overall, e.g. treatment.
        out: the table CSV to write; summary.json (tests, notes, excluded patients) goes beside it.
        mrecist: a mrecist.csv whose --mrecist-column becomes the mRECIST row, replacing clinical.csv's
            mrecist column (joined on patient_id; patients absent from it are N/A).
        mrecist_column: the column of --mrecist to use, e.g. best_response, response_t1 or response_t2.
    """
    from analysis.clinical_table import read_clinical_table, usage_exit

    try:
        frame = read_clinical_table(clinical, required=("patient_id", group))
        resp = None
        if mrecist is not None:
            # every cell as text: the response "NA" is a category here, not a missing value
            resp = read_clinical_table(mrecist, required=("patient_id", mrecist_column), typed=False)
        table = table1(frame, group=group, mrecist=resp, mrecist_column=mrecist_column)
    except ValueError as exc:
        raise usage_exit(f"table1: {exc}") from None
    write_table1(table, out)
    summary = table.attrs["summary"]
    return f"{out}: {len(table)} rows, {summary['n']} patients in groups {summary['groups']}"
