"""Kaplan-Meier curves with log-rank tests (Fig. 6) and the multivariable Cox model (Fig. 7).

Everything statistical is lifelines: KaplanMeierFitter, multivariate_logrank_test,
add_at_risk_counts, CoxPHFitter, proportional_hazard_test (scaled Schoenfeld residuals) and
k_fold_cross_validation. This module prepares the data, refuses inputs lifelines would fail on
with an unhelpful message, and writes figures and tables in the study layout.

Categorical covariates in the Cox model (``coding``):

* ``"deviation"`` (default): one row per level; each level's log(HR) is its log-hazard minus the
  average log-hazard over all levels, so the rows sum to zero. This is how the paper's Fig. 7 reads
  (class 0..3: 0.97, 0.51, -0.53, -0.92, sum 0.03). The model is fitted with reference (dummy)
  coding and transformed exactly: gamma = A beta, Cov(gamma) = A Cov(beta) A^T, Wald CI and p.
* ``"reference"``: the usual dummy contrasts against the reference level (``--reference
  var=LEVEL``, default the first level in sorted order); the reference level is drawn in the forest
  plot as a row at log(HR) = 0 without a CI and is not a row of the summary table.

A categorical with two levels is always reference-coded (a deviation row would just be +-beta/2).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.io import save_figure, write_csv, write_json

log = logging.getLogger(__name__)

DURATION = "os_months"
EVENT = "death"
#: the paper's mid-term evaluation point drawn as a dashed line (Fig. 6)
MARKER_MONTHS = 30.0
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
#: group values meaning "not assessed": such patients are left out of that method with a log line
MISSING_TOKENS = {"", "NA", "N/A", "nan", "NaN", "None"}
ALL = "all"
PH_ALPHA = 0.05


class SurvivalInputError(ValueError):
    """Input that cannot give a valid survival analysis; the message says what and how to fix it."""


class CoxConvergenceError(SurvivalInputError):
    """The Cox fit did not converge (separation, collinearity): coefficients are not reported."""


# ------------------------------------------------------------------------------ input helpers
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


def _read_ids_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise SurvivalInputError(f"{path}: file not found")
    frame = pd.read_csv(path, dtype={"patient_id": str}, keep_default_na=False, na_values=[""])
    if "patient_id" not in frame:
        raise SurvivalInputError(f"{path}: no patient_id column (found {list(frame.columns)})")
    frame["patient_id"] = frame["patient_id"].astype(str).str.strip()
    dup = frame["patient_id"][frame["patient_id"].duplicated()].unique().tolist()
    if dup:
        raise SurvivalInputError(f"{path}: patient_id repeated ({dup[:10]}); expected one row per patient")
    return frame


def join_column(df: pd.DataFrame, file: str | Path, column: str, name: str, label: str | None = None) -> pd.DataFrame:
    """Left-join ``column`` of ``file`` onto ``df`` by patient_id as ``name``; log ids not found."""
    other = _read_ids_table(file)
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


def _check_duration_event(df: pd.DataFrame, duration: str, event: str, where: str = "table") -> None:
    for col in (duration, event):
        if col not in df:
            raise SurvivalInputError(f"{where}: no column {col!r} (found {list(df.columns)})")
    d = pd.to_numeric(df[duration], errors="coerce")
    e = pd.to_numeric(df[event], errors="coerce")
    bad = df.index[(d < 0) | ~np.isfinite(d.fillna(0))].tolist()
    if bad:
        raise SurvivalInputError(f"{where}: {duration} must be a number >= 0; rows {bad[:10]} are not")
    bad = df.index[e.notna() & ~e.isin([0, 1])].tolist()
    if bad:
        raise SurvivalInputError(f"{where}: {event} must be 0 or 1; rows {bad[:10]} have "
                                 f"{df.loc[bad[:10], event].tolist()}")


def _ids(df: pd.DataFrame, index) -> list[str]:
    if "patient_id" in df:
        return df.loc[index, "patient_id"].astype(str).tolist()
    return [f"row {i}" for i in index]


# ------------------------------------------------------------------------------- Kaplan-Meier
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


def _normalise_groups(series: pd.Series, column: str = "") -> pd.Series:
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

    _check_duration_event(df, duration, event)
    if group not in df:
        raise SurvivalInputError(f"no group column {group!r} (found {list(df.columns)})")
    data = df.copy()
    data[group] = _normalise_groups(data[group], group)
    levels = _group_levels(data[group], group, levels)
    no_group = data[group].isna()
    unassigned = _ids(data, data.index[no_group])
    label = label or group
    if unassigned:
        log.log(log_level, "%s: %d patient(s) without a group value left out: %s", label, len(unassigned),
                ", ".join(unassigned[:20]))
    no_time = data[duration].isna() | data[event].isna()
    if no_time.any():
        log.log(log_level, "%d patient(s) without %s/%s left out: %s", int(no_time.sum()), duration, event,
                    ", ".join(_ids(data, data.index[no_time])[:20]))
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


def plot_km(result: KMResult, ax, title: str = "", marker_months: float | None = MARKER_MONTHS,
            at_risk: bool = True, xlabel: str = "Overall survival (months)") -> None:
    """Draw one panel: curves with CIs, dashed marker line, log-rank p, numbers at risk below."""
    from lifelines.plotting import add_at_risk_counts

    # one colour per level across every panel, so class 3 keeps its colour where class 2 is empty
    order = list(result.medians["group"])
    for level, kmf in result.fitters.items():
        kmf.plot_survival_function(ax=ax, ci_show=True, ci_alpha=0.12, show_censors=True, color=f"C{order.index(level) % 10}",
                                   censor_styles={"ms": 4, "marker": "|"})
    if marker_months is not None:
        ax.axvline(marker_months, color="0.3", linestyle="--", linewidth=1)
    lr = result.logrank
    text = (f"log-rank p = {lr['p_value']:.3g}" if not lr["skipped_reason"] else f"not tested: {lr['skipped_reason']}")
    if result.empty_groups:
        text += f"\nno patients: {', '.join(map(str, result.empty_groups))}"
    ax.text(0.02, 0.03, text, transform=ax.transAxes, fontsize=7, va="bottom")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("Survival probability", fontsize=8)
    ax.tick_params(labelsize=7)
    if result.fitters:
        ax.legend(fontsize=7, loc="upper right")
        if at_risk:
            add_at_risk_counts(*result.fitters.values(), ax=ax, rows_to_show=["At risk"], fontsize=6)
    else:
        ax.text(0.5, 0.5, "no patients", transform=ax.transAxes, ha="center")


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
                        ", ".join(_ids(df, df.index[missing])[:20]))
    return panels


@dataclass
class KMGrid:
    """All panels of a km run: ``results[(method, subgroup)]`` plus the tables written."""

    results: dict
    figure: object                 # the grid figure (closed once saved)
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
    import matplotlib.pyplot as plt

    if not methods:
        raise SurvivalInputError("no grouping method given: expected at least one (name, column)")
    for name, column in methods:
        if column not in df:
            raise SurvivalInputError(f"method {name!r}: no column {column!r} (found {list(df.columns)})")
    panels = _subgroups(df, by)
    nrow, ncol = len(methods), len(panels)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 4.4 * nrow), squeeze=False)
    results, unassigned = {}, []
    for i, (name, column) in enumerate(methods):
        lv = (levels or {}).get(name) or _group_levels(_normalise_groups(df[column]), column, None)
        for j, (sub_name, sub) in enumerate(panels):
            # the whole-cohort panel logs who has no group; subgroup panels would repeat it
            res = kaplan_meier(sub, duration, event, column, levels=lv, label=f"{name} ({sub_name})",
                               log_level=logging.WARNING if sub_name == ALL else logging.DEBUG)
            results[(name, sub_name)] = res
            if sub_name == ALL:
                unassigned += [{"method": name, "patient_id": pid, "reason": f"no value in {column}"}
                               for pid in res.unassigned]
            label = chr(ord("A") + i * ncol + j) if i * ncol + j < 26 else ""
            plot_km(res, axes[i][j], title=f"{label}  {name} - {sub_name} (n={res.logrank['n']})",
                    marker_months=marker_months)
    fig.tight_layout(h_pad=4.0)
    lr, med, cur = km_tables(results)
    grid = KMGrid(results=results, figure=fig, logrank=lr, medians=med, curves=cur,
                  unassigned=pd.DataFrame(unassigned, columns=["method", "patient_id", "reason"]))
    if out is not None:
        write_km(grid, out, marker_months, panels)
    return grid


def write_km(grid: KMGrid, out: str | Path, marker_months: float | None = MARKER_MONTHS, panels: bool = False) -> dict:
    import matplotlib.pyplot as plt

    out = Path(out)
    cur = grid.curves
    save_figure(out / "figures" / "km_grid.png", grid.figure, data=cur)
    for (method, sub), res in (grid.results.items() if panels else ()):
        f, ax = plt.subplots(figsize=(6, 5))
        plot_km(res, ax, title=f"{method} - {sub} (n={res.logrank['n']})", marker_months=marker_months)
        f.tight_layout()
        save_figure(out / "figures" / f"km_{_slug(method)}_{_slug(sub)}.png", f,
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
    from analysis.cohort import read_clinical

    df = read_clinical(clinical)
    _check_duration_event(df, duration, event, where=str(clinical))
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
    try:
        summary = run_km(clinical, groups, out, by=by or None, duration=duration, event=event,
                         marker_months=marker_months, panels=bool(panels))
    except SurvivalInputError as exc:
        raise SystemExit(f"km: {exc}") from None
    lines = [f"{r['method']:>20} {r['subgroup']:>10} n={r['n']:<4} " +
             (f"p={r['p_value']:.3g}" if r["p_value"] is not None else f"skipped: {r['skipped_reason']}")
             for r in summary["logrank"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ Cox
@dataclass
class CoxResult:
    fitter: object                 # fitted lifelines CoxPHFitter (on ``design``)
    design: pd.DataFrame           # duration, event + design columns actually fitted
    duration: str
    event: str
    variables: dict                # variable -> list of design columns
    categorical: dict              # variable -> {"levels": [...], "reference": level, "coding": str}
    summary: pd.DataFrame          # covariate, coef, se, hr, hr_lower_95, hr_upper_95, p
    forest: pd.DataFrame           # variable, level, covariate, coef, lower, upper, p, is_reference
    concordance: float
    cv_concordance: float | None
    cv_note: str
    ph_test: pd.DataFrame          # covariate, test_statistic, p, violation
    ph_violations: list
    excluded: pd.DataFrame         # patient_id/row, reason
    penalizer: float
    ids: list


def _level_label(value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def parse_reference(reference) -> dict:
    """``--reference "A=x,B=y"`` (Cox reference levels per categorical variable) -> {A: x, B: y}."""
    out = {}
    for item in split_list(reference):
        if "=" not in item:
            raise SurvivalInputError(f"--reference {item!r}: expected VARIABLE=LEVEL")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def build_design(df: pd.DataFrame, duration: str, event: str, covariates: Sequence[str],
                 categorical: Sequence[str] = (), reference: dict | None = None,
                 coding: str = "deviation") -> tuple[pd.DataFrame, dict, dict, pd.DataFrame, list]:
    """Numeric design matrix for lifelines, with rows lacking any value dropped (and reported).

    Non-numeric covariates are treated as categorical even when not listed. Returns
    ``(design, variables, categorical_info, excluded, ids)``.
    """
    if coding not in ("deviation", "reference"):
        raise SurvivalInputError(f"coding {coding!r}: expected 'deviation' or 'reference'")
    reference = dict(reference or {})
    covariates = list(covariates)
    if not covariates:
        raise SurvivalInputError("no covariates given")
    _check_duration_event(df, duration, event)
    missing_cols = [c for c in covariates if c not in df]
    if missing_cols:
        raise SurvivalInputError(f"covariate column(s) {missing_cols} not in the table (found {list(df.columns)})")
    unknown = [c for c in list(categorical) + list(reference) if c not in covariates]
    if unknown:
        raise SurvivalInputError(f"--categorical/--reference name(s) {unknown} are not among --covariates {covariates}")
    data = df.copy()
    cats = list(categorical)
    for c in covariates:
        if c in cats:
            continue
        values = data[c].dropna()
        values = values[~values.astype(str).str.strip().isin(MISSING_TOKENS)]
        if pd.to_numeric(values, errors="coerce").isna().any():
            log.info("covariate %s is not numeric: treated as categorical", c)
            cats.append(c)
    # rows with any missing value cannot enter a Cox fit: drop them by name, never silently
    excluded = []
    keep = pd.Series(True, index=data.index)
    for c in [duration, event] + covariates:
        col = data[c]
        if c in cats:
            miss = col.isna() | col.astype(str).str.strip().isin(MISSING_TOKENS)
        else:
            miss = pd.to_numeric(col, errors="coerce").isna()
        for idx in data.index[miss & keep]:
            excluded.append({"patient_id": _ids(data, [idx])[0], "reason": f"missing {c}"})
        keep &= ~miss
    if excluded:
        log.warning("%d row(s) left out of the Cox model: %s", len(excluded),
                    "; ".join(f"{e['patient_id']} ({e['reason']})" for e in excluded[:20]))
    data = data[keep]
    if data.empty:
        raise SurvivalInputError("no row has every covariate, duration and event: nothing to fit")
    ids = _ids(data, data.index)
    design = pd.DataFrame({duration: pd.to_numeric(data[duration]).astype(float),
                           event: pd.to_numeric(data[event]).astype(int)}, index=data.index)
    variables, cat_info = {}, {}
    for c in covariates:
        if c not in cats:
            design[c] = pd.to_numeric(data[c]).astype(float)
            variables[c] = [c]
            continue
        labels = data[c].map(_level_label)
        levels = sorted(labels.unique(), key=lambda v: (float(v) if _is_number(v) else math.inf, v))
        known = [str(k) for k in KNOWN_LEVELS.get(c, [])]
        if known and set(levels) <= set(known):
            levels = [k for k in known if k in levels]   # CR, PR, SD, PD: CR is the reference
        ref = reference.get(c, levels[0])
        if ref not in levels:
            raise SurvivalInputError(f"--reference {c}={ref}: level not found; {c} has levels {levels}")
        var_coding = coding if len(levels) > 2 else "reference"
        cat_info[c] = {"levels": levels, "reference": ref, "coding": var_coding}
        cols = []
        for level in levels:
            if level == ref:
                continue
            name = f"{c}[{level}]"
            design[name] = (labels == level).astype(float)
            cols.append(name)
        variables[c] = cols
    return design, variables, cat_info, pd.DataFrame(excluded, columns=["patient_id", "reason"]), ids


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_design(design: pd.DataFrame, duration: str, event: str, penalizer: float = 0.0) -> None:
    """Refuse a design lifelines cannot fit, naming the columns: no events, constant, collinear."""
    X = design.drop(columns=[duration, event])
    n_events = int(design[event].sum())
    if n_events == 0:
        raise SurvivalInputError(f"no events: every {event} is 0 in the {len(design)} rows fitted; "
                                 "a Cox model needs at least one death")
    constant = [c for c in X.columns if X[c].nunique() <= 1]
    if constant:
        raise SurvivalInputError(
            f"constant column(s) {constant}: every fitted row has the same value, so the effect cannot "
            "be estimated; drop them from --covariates (for a categorical level: no patient or every "
            "patient in it)")
    centred = (X - X.mean()).to_numpy(float)
    rank = np.linalg.matrix_rank(centred)
    if rank < X.shape[1]:
        # a column is part of a linear dependence when removing it keeps the rank
        involved = [c for i, c in enumerate(X.columns)
                    if np.linalg.matrix_rank(np.delete(centred, i, axis=1)) == rank]
        if penalizer > 0:
            # the ridge penalty makes the fit unique; the split between these columns is the penalty's
            log.warning("collinear columns %s (rank %d < %d): fitted only because --penalizer %g makes the "
                        "estimate unique; their separate effects are not interpretable", involved, rank,
                        X.shape[1], penalizer)
            return
        raise SurvivalInputError(
            f"collinear columns {involved}: the design has rank {rank} < {X.shape[1]} columns (one is a "
            "linear combination of the others), so their effects are not identifiable; drop one of them "
            "from --covariates" + ("" if penalizer else " or fit with --penalizer (e.g. 0.1)"))
    if X.shape[1] >= len(design):
        raise SurvivalInputError(f"{X.shape[1]} design columns for {len(design)} rows: too many covariates; "
                                 "drop some or use --penalizer")


#: a log(HR) this large means a hazard ratio beyond e^10 ~ 22000: a fit running off to infinity
SEPARATION_COEF = 10.0


def _fit_checked(design: pd.DataFrame, duration: str, event: str, penalizer: float):
    """CoxPHFitter.fit with lifelines' convergence trouble turned into CoxConvergenceError."""
    from lifelines import CoxPHFitter
    from lifelines.exceptions import ConvergenceError, ConvergenceWarning

    cph = CoxPHFitter(penalizer=penalizer)
    remedy = ("drop the column(s) or fit with --penalizer (e.g. 0.1)" if not penalizer
              else f"drop the column(s) or raise --penalizer above {penalizer}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        try:
            cph.fit(design, duration_col=duration, event_col=event)
        except (ConvergenceError, np.linalg.LinAlgError, ValueError, ZeroDivisionError) as exc:
            raise CoxConvergenceError(
                f"Cox fit failed to converge ({str(exc).splitlines()[0][:200]}); columns "
                f"{[c for c in design.columns if c not in (duration, event)]}: look for a column that separates "
                f"deaths from survivors; {remedy}") from None
    conv = [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]
    params = cph.params_
    se = cph.standard_errors_
    suspicious = [c for c in params.index
                  if not np.isfinite(params[c]) or abs(params[c]) > SEPARATION_COEF or not np.isfinite(se[c])]
    failed = any("converge" in m or "separation" in m or "suspiciously" in m for m in conv)
    if suspicious or failed:
        # lifelines' own warnings name columns too ("Column x have very low variance ...")
        flagged = [c for c in params.index if any(f"Column {c} " in m or f"'{c}'" in m for m in conv)]
        named = list(dict.fromkeys(suspicious + flagged)) or list(params.index)
        said = list(dict.fromkeys(m.strip().split(". ")[0] for m in conv))[:3]
        raise CoxConvergenceError(
            f"Cox fit did not converge: column(s) {named} look separated (log(HR) "
            f"{', '.join(f'{c}={params[c]:.3g}' for c in named)}: a level or range with all or none of the "
            f"deaths sends its log(HR) to infinity). Coefficients not reported; {remedy}."
            + (f" lifelines said: {'; '.join(said)}" if said else ""))
    return cph


def _wald_rows(names, coef, cov, variable, levels) -> list[dict]:
    from scipy.stats import norm

    rows = []
    z975 = norm.ppf(0.975)
    for i, name in enumerate(names):
        se = float(math.sqrt(max(cov[i, i], 0.0)))
        b = float(coef[i])
        p = float(2 * norm.sf(abs(b) / se)) if se > 0 else np.nan
        rows.append({"covariate": name, "variable": variable, "level": levels[i], "coef": b, "se": se,
                     "hr": math.exp(b), "hr_lower_95": math.exp(b - z975 * se), "hr_upper_95": math.exp(b + z975 * se),
                     "p": p, "is_reference": False})
    return rows


def _coefficient_rows(cph, variables: dict, cat_info: dict) -> list[dict]:
    params = cph.params_
    cov = cph.variance_matrix_.loc[params.index, params.index].to_numpy(float)
    pos = {c: i for i, c in enumerate(params.index)}
    rows = []
    for var, cols in variables.items():
        idx = [pos[c] for c in cols]
        beta = params.to_numpy(float)[idx]
        sub = cov[np.ix_(idx, idx)]
        info = cat_info.get(var)
        if info is None:
            rows += _wald_rows([var], beta, sub, var, [""])
            continue
        levels, ref = info["levels"], info["reference"]
        if info["coding"] == "reference":
            rows.append({"covariate": f"{var}[{ref}]", "variable": var, "level": ref, "coef": 0.0, "se": np.nan,
                         "hr": 1.0, "hr_lower_95": np.nan, "hr_upper_95": np.nan, "p": np.nan, "is_reference": True})
            rows += _wald_rows(cols, beta, sub, var, [lv for lv in levels if lv != ref])
            continue
        # deviation coding: full K-vector of level effects (reference = 0) minus its mean
        k = len(levels)
        embed = np.zeros((k, len(cols)))
        for j, lv in enumerate(lv for lv in levels if lv != ref):
            embed[levels.index(lv), j] = 1.0
        A = (np.eye(k) - np.full((k, k), 1.0 / k)) @ embed
        rows += _wald_rows([f"{var}[{lv}]" for lv in levels], A @ beta, A @ sub @ A.T, var, levels)
    return rows


def variable_p_values(result: CoxResult) -> dict:
    """Joint Wald p per variable (chi-square, one df per design column): the selection test."""
    from scipy.stats import chi2

    params, cov = result.fitter.params_, result.fitter.variance_matrix_
    out = {}
    for var, cols in result.variables.items():
        b = params[cols].to_numpy(float)
        V = cov.loc[cols, cols].to_numpy(float)
        stat = float(b @ np.linalg.solve(V, b))
        out[var] = float(chi2.sf(stat, len(cols)))
    return out


def cv_concordance(design: pd.DataFrame, duration: str, event: str, penalizer: float = 0.0, k: int = 5,
                   seed: int = 0) -> tuple[float | None, str]:
    """Mean out-of-fold Harrell's C over ``k`` folds (lifelines.utils.k_fold_cross_validation)."""
    from lifelines import CoxPHFitter
    from lifelines.utils import k_fold_cross_validation

    if not k:
        return None, "not computed (cv_folds 0)"
    k = int(min(k, len(design)))
    if k < 2 or int(design[event].sum()) < 2:
        return None, "too few rows or events for cross-validation"
    with warnings.catch_warnings():
        # folds of a small cohort can hold a constant dummy; the fold score still counts
        warnings.simplefilter("ignore")
        try:
            scores = k_fold_cross_validation(CoxPHFitter(penalizer=penalizer), design, duration, event, k=k,
                                             scoring_method="concordance_index", seed=seed)
        except Exception as exc:  # noqa: BLE001 - any fold failure means no CV estimate, said in the note
            return None, f"cross-validation failed in a fold: {type(exc).__name__}: {str(exc)[:200]}"
    scores = [s for s in scores if np.isfinite(s)]
    if not scores:
        return None, "no fold gave a concordance (folds without comparable pairs)"
    return float(np.mean(scores)), f"{k}-fold, seed {seed}, mean of {len(scores)} fold(s)"


def fit_cox(df: pd.DataFrame, duration: str = DURATION, event: str = EVENT, covariates: Sequence[str] = (),
            categorical: Sequence[str] = (), reference: dict | None = None, penalizer: float = 0.0,
            coding: str = "deviation", cv_folds: int = 5, seed: int = 0) -> CoxResult:
    """Fit the multivariable Cox model (Efron ties) with all checks, PH test and concordances."""
    from lifelines.statistics import proportional_hazard_test

    design, variables, cat_info, excluded, ids = build_design(df, duration, event, covariates, categorical,
                                                              reference, coding)
    check_design(design, duration, event, penalizer)
    cph = _fit_checked(design, duration, event, penalizer)
    rows = _coefficient_rows(cph, variables, cat_info)
    forest = pd.DataFrame(rows)
    summary = forest[~forest["is_reference"]][["covariate", "coef", "se", "hr", "hr_lower_95", "hr_upper_95", "p"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ph = proportional_hazard_test(cph, design, time_transform="rank")
    ph_df = ph.summary.reset_index().rename(columns={"index": "covariate"})
    ph_df = ph_df[["covariate", "test_statistic", "p"]].assign(violation=lambda d: d["p"] < PH_ALPHA)
    violations = ph_df.loc[ph_df["violation"], "covariate"].tolist()
    if violations:
        log.warning("proportional hazards rejected (Schoenfeld, p < %.2f) for %s", PH_ALPHA, violations)
    cv, note = cv_concordance(design, duration, event, penalizer, k=cv_folds, seed=seed)
    return CoxResult(fitter=cph, design=design, duration=duration, event=event, variables=variables,
                     categorical=cat_info, summary=summary.reset_index(drop=True), forest=forest,
                     concordance=float(cph.concordance_index_), cv_concordance=cv, cv_note=note, ph_test=ph_df,
                     ph_violations=violations, excluded=excluded, penalizer=penalizer, ids=ids)


def plot_forest(result: CoxResult):
    """Fig. 7 style: one row per covariate / level, diamond at log(HR), line for the 95% CI."""
    import matplotlib.pyplot as plt

    f = result.forest.copy()
    f["log_hr"] = f["coef"]
    f["log_hr_lower_95"] = np.log(f["hr_lower_95"])
    f["log_hr_upper_95"] = np.log(f["hr_upper_95"])
    n = len(f)
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * n + 1.4))
    y = np.arange(n)[::-1]
    for yi, (_, r) in zip(y, f.iterrows()):
        if r["is_reference"]:
            ax.plot([0], [yi], marker="D", mfc="white", mec="0.4", ms=6)
            ax.text(1.02, yi, "reference", transform=ax.get_yaxis_transform(), va="center", fontsize=7)
            continue
        ax.plot([r["log_hr_lower_95"], r["log_hr_upper_95"]], [yi, yi], color="0.2", lw=1.2)
        ax.plot([r["log_hr"]], [yi], marker="D", color="tab:red" if r["p"] < 0.05 else "tab:blue", ms=7)
        ax.text(1.02, yi, f"{r['log_hr']:.2f} ({r['log_hr_lower_95']:.2f}, {r['log_hr_upper_95']:.2f})  p={r['p']:.3g}",
                transform=ax.get_yaxis_transform(), va="center", fontsize=7)
    ax.axvline(0, color="0.3", linestyle="--", lw=1)
    labels = [r["covariate"] if not r["level"] else f"{r['variable']} = {r['level']}" for _, r in f.iterrows()]
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel("log(HR) with 95% CI (red: p < 0.05)", fontsize=8)
    cv = f"{result.cv_concordance:.2f}" if result.cv_concordance is not None else "n/a"
    ax.set_title(f"Cox model: n={len(result.design)}, events={int(result.design[result.event].sum())}, "
                 f"C-index {result.concordance:.2f} (cross-validated {cv})", fontsize=9)
    fig.tight_layout()
    data = f[["variable", "level", "covariate", "log_hr", "log_hr_lower_95", "log_hr_upper_95", "hr", "p",
              "is_reference"]]
    return fig, data


def plot_schoenfeld(result: CoxResult):
    """Scaled Schoenfeld residuals against rank time per design column, with the PH test p."""
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resid = result.fitter.compute_residuals(result.design, "scaled_schoenfeld")
    times = result.design.loc[resid.index, result.duration]
    rank_t = times.rank(method="average").to_numpy()
    cols = list(resid.columns)
    ncol = min(3, len(cols))
    nrow = math.ceil(len(cols) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3 * nrow), squeeze=False)
    ph = result.ph_test.set_index("covariate")
    for ax, c in zip(axes.ravel(), cols):
        ax.scatter(rank_t, resid[c], s=8, alpha=0.6)
        ax.axhline(result.fitter.params_[c], color="tab:red", lw=1)
        p = ph.loc[c, "p"] if c in ph.index else np.nan
        ax.set_title(f"{c}: PH p={p:.3g}{'  VIOLATED' if p < PH_ALPHA else ''}", fontsize=8)
        ax.set_xlabel("rank of time", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[len(cols):]:
        ax.axis("off")
    fig.tight_layout()
    data = resid.assign(time=times.to_numpy(), rank_time=rank_t).reset_index(drop=True)
    return fig, data


def read_table(table, join=None) -> pd.DataFrame:
    """The Cox/nomogram input: one CSV (clinical.csv is read typed), plus ``NAME=FILE:COLUMN`` joins."""
    path = Path(table)
    if not path.exists():
        raise SurvivalInputError(f"{path}: file not found")
    if path.name == "clinical.csv":
        from analysis.cohort import read_clinical

        df = read_clinical(path)
    else:
        df = pd.read_csv(path, keep_default_na=False, na_values=[""],
                         dtype={"patient_id": str})
    for spec in split_list(join):
        name, file, column = parse_column_spec(spec)
        if file is None:
            raise SurvivalInputError(f"--join {spec!r}: expected NAME=FILE:COLUMN")
        if "patient_id" not in df:
            raise SurvivalInputError(f"{path}: no patient_id column to join {file} on")
        df = join_column(df, file, column, name)
    return df


def write_cox_outputs(result: CoxResult, out: str | Path) -> dict:
    out = Path(out)
    write_csv(out / "tables" / "cox_summary.csv", result.summary)
    fig, data = plot_forest(result)
    save_figure(out / "figures" / "cox_forest.png", fig, data=data)
    write_csv(out / "tables" / "ph_test.csv", result.ph_test)
    fig, data = plot_schoenfeld(result)
    save_figure(out / "figures" / "schoenfeld.png", fig, data=data)
    write_csv(out / "tables" / "excluded.csv", result.excluded)
    summary = {"concordance": result.concordance, "cv_concordance": result.cv_concordance,
               "n": len(result.design), "events": int(result.design[result.event].sum()), "converged": True,
               "ph_violations": result.ph_violations, "cv_note": result.cv_note, "penalizer": result.penalizer,
               "categorical": result.categorical, "ties": "efron"}
    write_json(out / "summary.json", summary)
    return summary


def cox_cli(table: str, out: str, covariates, duration: str = DURATION, event: str = EVENT, categorical=None,
            reference=None, penalizer: float = 0.0, coding: str = "deviation", join=None, cv_folds: int = 5,
            seed: int = 0):
    """Multivariable Cox model on any table: summary, forest plot, C-index (+ CV), Schoenfeld PH test.

    Efron ties; rows lacking a value of any covariate are dropped and listed in tables/excluded.csv.
    Writes tables/cox_summary.csv, tables/ph_test.csv, figures/cox_forest.png, figures/schoenfeld.png
    and summary.json into OUT. A join, e.g. --join dl_class=oof_predictions.csv:pred_class.

    Args:
        table: per-patient CSV with the duration, event and covariate columns (a clinical.csv is read typed).
        out: output folder.
        covariates: the model's variables, comma-separated column names (a,b,c), --join names included.
        duration: column of follow-up time (months in clinical.csv).
        event: column of the event indicator, 1 = death, 0 = censored.
        categorical: comma-separated covariates to treat as categorical (non-numeric columns are anyway).
        reference: reference levels, VARIABLE=LEVEL[,VARIABLE=LEVEL] (default the first level in sorted
            order); used by --coding reference and by categoricals with two levels.
        penalizer: lifelines CoxPHFitter ridge penalty (0 = none; e.g. 0.1 for collinear or separating data).
        coding: categorical coding, deviation (each level's log(HR) against the mean of all levels, as in
            Fig. 7) or reference (dummy contrasts against the reference level).
        join: NAME=FILE:COLUMN[,...] adds COLUMN of another per-patient CSV (joined on patient_id) as NAME.
        cv_folds: folds of the cross-validated C-index (0 skips it).
        seed: seed of the cross-validation folds.
    """
    try:
        df = read_table(table, join)
        result = fit_cox(df, duration, event, split_list(covariates), split_list(categorical),
                         parse_reference(reference), float(penalizer), coding, cv_folds, seed)
        summary = write_cox_outputs(result, out)
    except SurvivalInputError as exc:
        raise SystemExit(f"cox: {exc}") from None
    cv = summary["cv_concordance"]
    return (result.summary.round(4).to_string(index=False) +
            f"\nC-index {summary['concordance']:.3f}, cross-validated {cv if cv is None else round(cv, 3)}; "
            f"PH violations: {summary['ph_violations'] or 'none'}")
