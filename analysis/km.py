"""Kaplan-Meier curves per risk group with log-rank tests, and the paper's Fig. 6 grid.

Everything statistical is lifelines (KaplanMeierFitter, multivariate_logrank_test); this module
prepares the groups (level order, empty levels, patients without a group), tests each panel or
says why it cannot, and writes the study layout. The figures are drawn by
:mod:`analysis.survival_plots`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.io import save_figure, write_csv, write_json
from analysis.survival_table import (
    DURATION,
    EVENT,
    KNOWN_LEVELS,
    MISSING_TOKENS,
    SurvivalInputError,
    check_duration_event,
    join_column,
    parse_column_spec,
    row_ids,
    split_list,
)

__all__ = [
    "ALL",
    "MARKER_MONTHS",
    "KMGrid",
    "KMResult",
    "kaplan_meier",
    "km_cli",
    "km_grid",
    "km_tables",
    "logrank",
    "run_km",
    "write_km",
]

log = logging.getLogger(__name__)

#: the paper's mid-term evaluation point drawn as a dashed line (Fig. 6)
MARKER_MONTHS = 30.0
#: name of the whole-cohort panel, beside one panel per subgroup
ALL = "all"


@dataclass
class KMResult:
    """Per-group Kaplan-Meier fits of one (method, subgroup) panel."""

    fitters: dict                  # level -> fitted KaplanMeierFitter (non-empty groups only)
    medians: pd.DataFrame          # group, n, events, median_os_months, ci, median_reached, plotted
    empty_groups: list             # levels with no patient in this panel (listed, not plotted)
    logrank: dict                  # n, n_groups, test_statistic, p_value, skipped_reason
    curves: pd.DataFrame           # group, time, survival, ci_lower_95, ci_upper_95, at_risk
    unassigned: list = field(default_factory=list)  # patient ids without a group value


def _group_levels(series: pd.Series, column: str, levels: Sequence | None) -> list:
    if levels is not None:
        return list(levels)
    known = KNOWN_LEVELS.get(column)
    observed = [v for v in pd.unique(series.dropna())]
    if known is not None:
        extra = [v for v in observed if v not in known]
        return list(known) + sorted(extra, key=str)
    return sorted(observed, key=lambda v: (str(type(v)), v))


def _normalise_groups(series: pd.Series) -> pd.Series:
    """Group values as comparable labels: 'NA'/empty -> None; integer-valued numbers -> int; else str.

    Built as an object Series explicitly: ``Series.map`` would turn ``[1, None]`` into ``[1.0, nan]``.
    """
    raw = [None if pd.isna(v) or str(v).strip() in MISSING_TOKENS else v for v in series.astype(object)]
    present = [v for v in raw if v is not None]
    numeric = pd.to_numeric(pd.Series([str(v) for v in present], dtype=object), errors="coerce")
    if present and numeric.notna().all() and (numeric == numeric.round()).all():
        values = [None if v is None else int(float(v)) for v in raw]
    else:
        values = [None if v is None else str(v).strip() for v in raw]
    return pd.Series(values, index=series.index, dtype=object)


def logrank(df: pd.DataFrame, duration: str, event: str, group: str) -> dict:
    """Multivariate log-rank test over the non-empty groups of ``group``.

    Returns ``n, n_groups, test_statistic, p_value, skipped_reason``; a panel with fewer than two
    non-empty groups or no event is not tested and says why.
    """
    from lifelines.statistics import multivariate_logrank_test

    data = df[[duration, event, group]].dropna()
    n = len(data)
    present = pd.unique(data[group])
    n_events = int(pd.to_numeric(data[event]).sum())
    out = {"n": n, "n_groups": len(present), "test_statistic": np.nan, "p_value": np.nan, "skipped_reason": ""}
    if n == 0:
        out["skipped_reason"] = "no patients"
    elif len(present) < 2:
        out["skipped_reason"] = (f"fewer than two non-empty groups (only {', '.join(map(str, present))}): "
                                 "log-rank test needs two")
    elif n_events == 0:
        out["skipped_reason"] = "no events (no deaths): log-rank test undefined"
    if out["skipped_reason"]:
        return out
    res = multivariate_logrank_test(data[duration].astype(float), data[group].astype(str),
                                    data[event].astype(int))
    out["test_statistic"] = float(res.test_statistic)
    out["p_value"] = float(res.p_value)
    return out


def kaplan_meier(df: pd.DataFrame, duration: str = DURATION, event: str = EVENT, group: str = "pred_class",
                 levels: Sequence | None = None, label: str | None = None, log_level: int = logging.WARNING) -> KMResult:
    """Kaplan-Meier per level of ``group`` plus the log-rank test, for one panel.

    Patients without a group value are left out and their ids returned in ``unassigned`` (and
    logged at ``log_level`` under ``label``). Levels with no patient are listed in ``empty_groups``
    and in ``medians`` with n = 0.
    """
    from lifelines import KaplanMeierFitter
    from lifelines.utils import median_survival_times

    check_duration_event(df, duration, event)
    if group not in df:
        raise SurvivalInputError(f"no group column {group!r} (found {list(df.columns)})")
    data = df.copy()
    data[group] = _normalise_groups(data[group])
    levels = _group_levels(data[group], group, levels)
    no_group = data[group].isna()
    unassigned = row_ids(data, data.index[no_group])
    label = label or group
    if unassigned:
        log.log(log_level, "%s: %d patient(s) without a group value left out: %s", label, len(unassigned),
                ", ".join(unassigned[:20]))
    no_time = data[duration].isna() | data[event].isna()
    if no_time.any():
        log.log(log_level, "%d patient(s) without %s/%s left out: %s", int(no_time.sum()), duration, event,
                ", ".join(row_ids(data, data.index[no_time])[:20]))
    data = data[~no_group & ~no_time]

    fitters, rows, curves, empty = {}, [], [], []
    for level in levels:
        sub = data[data[group] == level]
        if sub.empty:
            empty.append(level)
            rows.append({"group": level, "n": 0, "events": 0, "median_os_months": np.nan,
                         "median_ci_lower_95": np.nan, "median_ci_upper_95": np.nan,
                         "median_reached": False, "plotted": False, "note": "no patients: not plotted"})
            continue
        kmf = KaplanMeierFitter(label=str(level)).fit(sub[duration].astype(float), sub[event].astype(int))
        fitters[level] = kmf
        median = float(kmf.median_survival_time_)
        ci = median_survival_times(kmf.confidence_interval_).to_numpy(dtype=float).ravel()
        lo, hi = (ci[0], ci[1]) if ci.size >= 2 else (np.nan, np.nan)
        rows.append({"group": level, "n": len(sub), "events": int(sub[event].sum()),
                     "median_os_months": median if np.isfinite(median) else np.nan,
                     "median_ci_lower_95": lo if np.isfinite(lo) else np.nan,
                     "median_ci_upper_95": hi if np.isfinite(hi) else np.nan,
                     "median_reached": bool(np.isfinite(median)), "plotted": True,
                     "note": "" if np.isfinite(median) else "median not reached"})
        sf = kmf.survival_function_.iloc[:, 0]
        cis = kmf.confidence_interval_survival_function_
        curves.append(pd.DataFrame({"group": level, "time": sf.index.to_numpy(float), "survival": sf.to_numpy(float),
                                    "ci_lower_95": cis.iloc[:, 0].to_numpy(float),
                                    "ci_upper_95": cis.iloc[:, 1].to_numpy(float),
                                    "at_risk": kmf.event_table["at_risk"].reindex(sf.index).to_numpy()}))
    if empty:
        log.info("%s: group(s) with no patient listed, not plotted: %s", label, ", ".join(map(str, empty)))
    curve_cols = ["group", "time", "survival", "ci_lower_95", "ci_upper_95", "at_risk"]
    median_cols = ["group", "n", "events", "median_os_months", "median_ci_lower_95", "median_ci_upper_95",
                   "median_reached", "plotted", "note"]
    return KMResult(fitters=fitters, medians=pd.DataFrame(rows, columns=median_cols), empty_groups=empty,
                    logrank=logrank(data, duration, event, group),
                    curves=pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=curve_cols),
                    unassigned=unassigned)


def _subgroups(df: pd.DataFrame, by: str | None) -> list[tuple[str, pd.DataFrame]]:
    panels = [(ALL, df)]
    if by:
        if by not in df:
            raise SurvivalInputError(f"--by {by!r}: no such column (found {list(df.columns)})")
        for value in sorted(df[by].dropna().astype(str).unique()):
            panels.append((value, df[df[by].astype(str) == value]))
        missing = df[by].isna()
        if missing.any():
            log.warning("%d patient(s) without %s are only in the %r panel: %s", int(missing.sum()), by, ALL,
                        ", ".join(row_ids(df, df.index[missing])[:20]))
    return panels


@dataclass
class KMGrid:
    """All panels of a km run: ``results[(method, subgroup)]`` (methods in row order, subgroups in
    column order, as :func:`analysis.survival_plots.plot_km_grid` draws them) plus its tables."""

    results: dict
    logrank: pd.DataFrame          # method, subgroup, n, n_groups, test_statistic, p_value, skipped_reason
    medians: pd.DataFrame          # method, subgroup, group, n, events, median_os_months (+ 95% CI)
    curves: pd.DataFrame           # method, subgroup, group, time, survival, CI, at_risk
    unassigned: pd.DataFrame       # method, patient_id, reason


def km_grid(df: pd.DataFrame, methods: Sequence[tuple[str, str]], by: str | None = "treatment",
            duration: str = DURATION, event: str = EVENT, marker_months: float | None = MARKER_MONTHS,
            levels: dict | None = None, out: str | Path | None = None, panels: bool = False) -> KMGrid:
    """The Fig. 6 grid: rows = methods (name, group column), columns = all + each ``by`` value.

    Level order and the empty levels listed come from ``levels[name]``, else from the column's known
    levels (``KNOWN_LEVELS``), else from the values over the whole cohort. With ``out`` every figure
    and table is written there (figures/km_grid.png, tables/logrank.csv, median_os.csv,
    unassigned.csv, summary.json; with ``panels`` also one figures/km_<method>_<subgroup>.png each).
    """
    if not methods:
        raise SurvivalInputError("no grouping method given: expected at least one (name, column)")
    for name, column in methods:
        if column not in df:
            raise SurvivalInputError(f"method {name!r}: no column {column!r} (found {list(df.columns)})")
    subgroups = _subgroups(df, by)
    results, unassigned = {}, []
    for name, column in methods:
        lv = (levels or {}).get(name) or _group_levels(_normalise_groups(df[column]), column, None)
        for sub_name, sub in subgroups:
            # the whole-cohort panel logs who has no group; subgroup panels would repeat it
            res = kaplan_meier(sub, duration, event, column, levels=lv, label=f"{name} ({sub_name})",
                               log_level=logging.WARNING if sub_name == ALL else logging.DEBUG)
            results[(name, sub_name)] = res
            if sub_name == ALL:
                unassigned += [{"method": name, "patient_id": pid, "reason": f"no value in {column}"}
                               for pid in res.unassigned]
    lr, med, cur = km_tables(results)
    grid = KMGrid(results=results, logrank=lr, medians=med, curves=cur,
                  unassigned=pd.DataFrame(unassigned, columns=["method", "patient_id", "reason"]))
    if out is not None:
        write_km(grid, out, marker_months, panels)
    return grid


def write_km(grid: KMGrid, out: str | Path, marker_months: float | None = MARKER_MONTHS, panels: bool = False) -> dict:
    """figures/km_grid.png (+ its curves), the tables and summary.json of ``grid`` under ``out``;
    with ``panels`` also figures/km_<method>_<subgroup>.png per panel. Returns the summary."""
    from analysis.survival_plots import plot_km, plot_km_grid

    out = Path(out)
    cur = grid.curves
    save_figure(out / "figures" / "km_grid.png", plot_km_grid(grid, marker_months=marker_months), data=cur)
    for (method, sub), res in (grid.results.items() if panels else ()):
        ax = plot_km(res, title=f"{method} - {sub} (n={res.logrank['n']})", marker_months=marker_months)
        save_figure(out / "figures" / f"km_{_slug(method)}_{_slug(sub)}.png", ax.figure,
                    data=cur[(cur["method"] == method) & (cur["subgroup"] == sub)])
    write_csv(out / "tables" / "logrank.csv", grid.logrank)
    write_csv(out / "tables" / "median_os.csv", grid.medians)
    write_csv(out / "tables" / "unassigned.csv", grid.unassigned)
    methods = list(dict.fromkeys(m for m, _ in grid.results))
    subgroups = list(dict.fromkeys(s for _, s in grid.results))
    summary = {"methods": methods, "subgroups": subgroups, "marker_months": marker_months,
               "n_unassigned": len(grid.unassigned),
               "logrank": _logrank_records(grid)}
    write_json(out / "summary.json", summary)
    return summary


def km_tables(results: dict) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(logrank, median OS, curves) tables of ``km_grid`` results."""
    lr, med, cur = [], [], []
    for (method, sub), res in results.items():
        lr.append({"method": method, "subgroup": sub, **res.logrank})
        med.append(res.medians.assign(method=method, subgroup=sub))
        cur.append(res.curves.assign(method=method, subgroup=sub))
    lr_cols = ["method", "subgroup", "n", "n_groups", "test_statistic", "p_value", "skipped_reason"]
    med_df = pd.concat(med, ignore_index=True)
    med_df = med_df[["method", "subgroup"] + [c for c in med_df.columns if c not in ("method", "subgroup")]]
    cur_df = pd.concat(cur, ignore_index=True)
    cur_df = cur_df[["method", "subgroup"] + [c for c in cur_df.columns if c not in ("method", "subgroup")]]
    return pd.DataFrame(lr, columns=lr_cols), med_df, cur_df


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(text)).strip("_") or "x"


def run_km(clinical: str | Path, groups, out: str | Path, by: str | None = "treatment",
           duration: str = DURATION, event: str = EVENT, marker_months: float | None = MARKER_MONTHS,
           panels: bool = False) -> dict:
    """The km verb: read clinical.csv, join the group files, draw and write every panel and the grid."""
    from analysis.clinical_table import read_clinical_table

    df = read_clinical_table(clinical, required=("patient_id", duration, event, *([by] if by else [])))
    check_duration_event(df, duration, event, where=str(clinical), file_rows=True)
    specs = split_list(groups)
    if not specs:
        raise SurvivalInputError("--groups: give at least one [NAME=][FILE:]COLUMN (comma-separated for several)")
    methods, levels = [], {}
    for spec in specs:
        name, file, column = parse_column_spec(spec)
        key = f"group::{name}"
        if file is None:
            if column not in df:
                raise SurvivalInputError(f"{clinical}: no column {column!r} for --groups {spec!r}")
            df[key] = df[column]
        else:
            df = join_column(df, file, column, key, label=name)
        # level order/empty levels follow the source column's name (pred_class -> 0..3)
        levels[name] = _group_levels(_normalise_groups(df[key]), column, None)
        methods.append((name, key))
    grid = km_grid(df, methods, by=by, duration=duration, event=event, marker_months=marker_months,
                   levels=levels, out=out, panels=panels)
    return {"logrank": _logrank_records(grid)}


def _logrank_records(grid: KMGrid) -> list[dict]:
    """logrank rows for JSON (NaN -> null)."""
    return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
            for row in grid.logrank.to_dict(orient="records")]


def km_cli(clinical: str, groups, out: str, by: str = "treatment", duration: str = DURATION, event: str = EVENT,
           marker_months: float = MARKER_MONTHS, panels: bool = False):
    """Kaplan-Meier curves and log-rank tests per group method, whole cohort and per --by subgroup.

    Several --groups methods give the Fig. 6 grid (rows methods, columns all + each --by value), e.g.
    --groups mRECIST=clinical.csv:mrecist,ProgSwin-UNETR=oof_predictions.csv:pred_class (comma-separated
    in one flag: fire keeps only the last of a repeated flag). Writes figures/km_grid.png,
    tables/logrank.csv, tables/median_os.csv, tables/unassigned.csv and summary.json into OUT.

    Args:
        clinical: clinical.csv with patient_id and the --duration, --event and --by columns.
        groups: one or more [NAME=][FILE:]COLUMN, comma-separated; FILE is joined on patient_id, without
            FILE the column comes from --clinical; NAME labels the method (default the column name).
        out: output folder.
        by: column whose values give one subgroup panel each besides the whole cohort ('' for none).
        duration: column of follow-up time in months.
        event: column of the event indicator, 1 = death, 0 = censored.
        marker_months: time in months marked by a dashed vertical line (the paper's mid-term point).
        panels: also write one figure per panel, figures/km_<method>_<subgroup>.png.
    """
    from analysis.clinical_table import TableInputError, usage_exit

    try:
        summary = run_km(clinical, groups, out, by=by or None, duration=duration, event=event,
                         marker_months=marker_months, panels=bool(panels))
    except (SurvivalInputError, TableInputError) as exc:
        raise usage_exit(f"km: {exc}") from None
    lines = [f"{r['method']:>20} {r['subgroup']:>10} n={r['n']:<4} " +
             (f"p={r['p_value']:.3g}" if r["p_value"] is not None else f"skipped: {r['skipped_reason']}")
             for r in summary["logrank"]]
    return "\n".join(lines)
