"""The multivariable Cox proportional-hazards model (Fig. 7), and the study's policy for it.

Everything statistical is lifelines: CoxPHFitter (Efron ties), proportional_hazard_test (scaled
Schoenfeld residuals) and k_fold_cross_validation. This module builds the design matrix, refuses
designs lifelines would fail on with an unhelpful message (no events, constant or collinear columns,
separation), turns the coefficients into the tables and the forest plot's rows, and writes the study
layout. The figures are drawn by :mod:`analysis.survival_plots`.

Categorical covariates (``coding``):

* ``"deviation"`` (default): one row per level; each level's log(HR) is its log-hazard minus the
  average log-hazard over all levels, so the rows sum to zero. This is how the paper's Fig. 7 reads
  (class 0..3: 0.97, 0.51, -0.53, -0.92, sum 0.03). The model is fitted with reference (dummy)
  coding and transformed exactly: gamma = A beta, Cov(gamma) = A Cov(beta) A^T, Wald CI and p.
* ``"reference"``: the usual dummy contrasts against the reference level (``--reference
  var=LEVEL``, default the first level in sorted order); the reference level is drawn in the forest
  plot as a row at log(HR) = 0 without a CI and is not a row of the summary table.

A categorical with two levels is always reference-coded (a deviation row would just be +-beta/2).

The study's policy, used by its cox and nomogram stages alike: :func:`paper_covariates` (the paper's
six covariates, less those without a contrast in this cohort) and :func:`fit_cox_with_fallback` (a
fit that does not converge is refitted once with a ridge penalty of :data:`FALLBACK_PENALIZER`).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
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
    read_table,
    row_ids,
    split_list,
    table_columns,
)

__all__ = [
    "FALLBACK_PENALIZER",
    "PAPER_CATEGORICAL",
    "PAPER_COVARIATES",
    "PH_ALPHA",
    "SEPARATION_COEF",
    "CoxConvergenceError",
    "CoxResult",
    "build_design",
    "check_design",
    "cox_cli",
    "cv_concordance",
    "fit_cox",
    "fit_cox_with_fallback",
    "log_hazard_table",
    "paper_covariates",
    "parse_reference",
    "scaled_schoenfeld",
    "variable_p_values",
    "write_cox_outputs",
]

log = logging.getLogger(__name__)

#: significance level of the proportional-hazards (Schoenfeld) test
PH_ALPHA = 0.05
#: a log(HR) this large means a hazard ratio beyond e^10 ~ 22000: a fit running off to infinity
SEPARATION_COEF = 10.0
#: the ridge penalty of the one refit after a fit that did not converge (fit_cox_with_fallback)
FALLBACK_PENALIZER = 0.1
#: the paper's multivariable model: DL class, age, sex, sorafenib, mRECIST, radiomic score
PAPER_COVARIATES = ("dl_class", "age", "sex", "sorafenib", "mrecist", "radiomic_score")
#: those of PAPER_COVARIATES that are categorical (a level per class / sex / response)
PAPER_CATEGORICAL = ("dl_class", "sex", "mrecist")


class CoxConvergenceError(SurvivalInputError):
    """The Cox fit did not converge (separation, collinearity): coefficients are not reported."""


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
    penalizer: float               # the ridge penalty actually fitted
    ids: list
    penalizer_note: str = ""       # why ``penalizer`` differs from the one asked for ('' when it does not)


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
    check_duration_event(df, duration, event)
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
            excluded.append({"patient_id": row_ids(data, [idx])[0], "reason": f"missing {c}"})
        keep &= ~miss
    if excluded:
        log.warning("%d row(s) left out of the Cox model: %s", len(excluded),
                    "; ".join(f"{e['patient_id']} ({e['reason']})" for e in excluded[:20]))
    data = data[keep]
    if data.empty:
        raise SurvivalInputError("no row has every covariate, duration and event: nothing to fit")
    ids = row_ids(data, data.index)
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


def fit_cox_with_fallback(df: pd.DataFrame, duration: str = DURATION, event: str = EVENT,
                          covariates: Sequence[str] = (), categorical: Sequence[str] = (),
                          reference: dict | None = None, penalizer: float = 0.0, *,
                          fallback_penalizer: float | None = FALLBACK_PENALIZER, coding: str = "deviation",
                          cv_folds: int = 5, seed: int = 0) -> CoxResult:
    """:func:`fit_cox`; a fit that does not converge is refitted once with ``fallback_penalizer``.

    Small cohorts separate (in the synthetic one every complete responder survives), and the study
    still needs a model: the refit is logged, ``result.penalizer`` is the penalty actually fitted and
    ``result.penalizer_note`` says why it differs from ``penalizer``. Only non-convergence
    (:class:`CoxConvergenceError`) is refitted; the error is raised as it is when
    ``fallback_penalizer`` is None or ``penalizer`` is already at least ``fallback_penalizer`` (a
    larger penalty is the caller's choice, not a default's).
    """
    fit = dict(duration=duration, event=event, covariates=covariates, categorical=categorical,
               reference=reference, coding=coding, cv_folds=cv_folds, seed=seed)
    try:
        return fit_cox(df, penalizer=penalizer, **fit)
    except CoxConvergenceError as exc:
        if fallback_penalizer is None or penalizer >= fallback_penalizer:
            raise
        reason = str(exc).splitlines()[0]
        log.warning("Cox fit with penalizer %g did not converge (%s); refitting with penalizer %g",
                    penalizer, reason, fallback_penalizer)
    result = fit_cox(df, penalizer=fallback_penalizer, **fit)
    result.penalizer_note = (f"refitted with penalizer {fallback_penalizer:g}: the fit with penalizer "
                             f"{penalizer:g} did not converge ({reason[:300]})")
    return result


def paper_covariates(table: pd.DataFrame, covariates: Sequence[str] = PAPER_COVARIATES,
                     categorical: Sequence[str] = PAPER_CATEGORICAL) -> tuple[list[str], list[str]]:
    """The covariates of the paper's multivariable model that ``table`` can estimate.

    A covariate is left out, with a warning naming it, when the table has no such column, no value
    in it, or one value for every patient (no contrast to estimate: e.g. an undertrained network
    predicting one class for everyone). Returns ``(covariates, categorical)``: the kept covariates
    in the order given, and the kept ones among ``categorical``.
    """
    kept = []
    for c in covariates:
        if c not in table:
            log.warning("Cox covariate %s left out: no column %r in the table", c, c)
        elif table[c].notna().sum() == 0:
            log.warning("Cox covariate %s left out: no values (empty for all %d patients)", c, len(table))
        elif table[c].nunique(dropna=True) < 2:
            log.warning("Cox covariate %s left out: one value (%s) for every patient", c,
                        table[c].dropna().iloc[0])
        else:
            kept.append(c)
    return kept, [c for c in categorical if c in kept]


def log_hazard_table(result: CoxResult) -> pd.DataFrame:
    """The forest plot's rows on the log scale: variable, level, covariate, log_hr with its 95% CI,
    hr, p, is_reference (a reference level: log(HR) 0, no CI)."""
    f = result.forest.copy()
    f["log_hr"] = f["coef"]
    with np.errstate(divide="ignore", invalid="ignore"):
        f["log_hr_lower_95"] = np.log(f["hr_lower_95"])
        f["log_hr_upper_95"] = np.log(f["hr_upper_95"])
    return f[["variable", "level", "covariate", "log_hr", "log_hr_lower_95", "log_hr_upper_95", "hr", "p",
              "is_reference"]]


def scaled_schoenfeld(result: CoxResult) -> pd.DataFrame:
    """Scaled Schoenfeld residuals (one column per design column, one row per death) with the death's
    ``time`` and its ``rank_time``: what the proportional-hazards test regresses on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resid = result.fitter.compute_residuals(result.design, "scaled_schoenfeld")
    times = result.design.loc[resid.index, result.duration]
    resid = resid.assign(time=times.to_numpy(), rank_time=times.rank(method="average").to_numpy())
    return resid.reset_index(drop=True)


def write_cox_outputs(result: CoxResult, out: str | Path) -> dict:
    """tables/cox_summary.csv, ph_test.csv, excluded.csv, figures/cox_forest.png, schoenfeld.png (each
    with its data) and summary.json of ``result`` under ``out``. Returns the summary."""
    from analysis.survival_plots import plot_forest, plot_schoenfeld

    out = Path(out)
    write_csv(out / "tables" / "cox_summary.csv", result.summary)
    save_figure(out / "figures" / "cox_forest.png", plot_forest(result).figure, data=log_hazard_table(result))
    write_csv(out / "tables" / "ph_test.csv", result.ph_test)
    residuals = scaled_schoenfeld(result)
    save_figure(out / "figures" / "schoenfeld.png", plot_schoenfeld(result, residuals), data=residuals)
    write_csv(out / "tables" / "excluded.csv", result.excluded)
    summary = {"concordance": result.concordance, "cv_concordance": result.cv_concordance,
               "n": len(result.design), "events": int(result.design[result.event].sum()), "converged": True,
               "ph_violations": result.ph_violations, "cv_note": result.cv_note, "penalizer": result.penalizer,
               "penalizer_note": result.penalizer_note, "categorical": result.categorical, "ties": "efron"}
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
    from analysis.clinical_table import TableInputError, usage_exit

    try:
        df = read_table(table, join, required=table_columns(duration, event, covariates, join))
        check_duration_event(df, duration, event, where=str(table), file_rows=True)
        result = fit_cox(df, duration, event, split_list(covariates), split_list(categorical),
                         parse_reference(reference), float(penalizer), coding, cv_folds, seed)
        summary = write_cox_outputs(result, out)
    except (SurvivalInputError, TableInputError) as exc:
        raise usage_exit(f"cox: {exc}") from None
    cv = summary["cv_concordance"]
    return (result.summary.round(4).to_string(index=False) +
            f"\nC-index {summary['concordance']:.3f}, cross-validated {cv if cv is None else round(cv, 3)}; "
            f"PH violations: {summary['ph_violations'] or 'none'}")
