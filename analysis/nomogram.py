"""Cox nomogram (Appendix 9 and 11), bootstrap-corrected calibration and decision curve.

Points (the rms-style nomogram): each variable's contribution to the linear predictor is
``beta * x`` (continuous) or ``beta_level`` (categorical, reference level 0). The variable whose
contribution spans the widest range over the observed patients gets 0-100 points; every other
variable is scaled by the same factor, starting at 0 at its own minimum. The total points are a
linear function of the Cox linear predictor, so predicted survival at time t is

    S(t | points) = exp(-H0(t) * exp(LP(points) - mean LP))

with H0 lifelines' Breslow baseline cumulative hazard at the covariate means (interpolated as
``CoxPHFitter.predict_survival_function(times=...)`` does). The tests assert equality with lifelines.

High risk (paper: "cumulative score above 0.70"): predicted mortality at the horizon (default
36 months), 1 - S(36), above the cut-off (default 0.70).

Calibration at the horizon follows Harrell's bootstrap optimism correction with Kaplan-Meier
grouping (``rms::calibrate(cmethod="KM")``): patients are split into quantile groups of predicted
survival; in each bootstrap resample the model is refitted, its (observed - predicted) gap per group
is computed on the resample and on the original data, and the mean difference (the optimism) is
subtracted from the apparent observed survival per group.

Decision curve at the horizon: net benefit of treating patients whose predicted mortality is at
least the threshold p, with event rates from Kaplan-Meier so censoring is handled (Vickers et al.
2008): NB(p) = (1 - S_KM(t | high)) P(high) - S_KM(t | high) P(high) p / (1 - p).
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

from analysis.cox import CoxResult, fit_cox_with_fallback, parse_reference, variable_p_values
from analysis.io import save_figure, write_csv, write_json
from analysis.survival_table import (
    DURATION,
    EVENT,
    SurvivalInputError,
    check_duration_event,
    read_table,
    split_list,
    table_columns,
)

log = logging.getLogger(__name__)

TIMES_MONTHS = (12.0, 24.0, 36.0)
HORIZON_MONTHS = 36.0
CUTOFF = 0.70
ALPHA = 0.05
SURVIVAL_TICKS = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05)


@dataclass
class Nomogram:
    cox: CoxResult
    variables: list
    scales: pd.DataFrame      # variable, level (categorical) or value, contribution, points
    point_factor: float       # points per unit of linear predictor (100 / widest range)
    min_lp: float             # linear predictor (uncentred) at 0 total points
    mean_lp: float            # linear predictor of the covariate means (lifelines' centring)
    max_points: float         # largest possible total
    times: tuple


def _contributions(result: CoxResult, design: pd.DataFrame) -> pd.DataFrame:
    """Per-patient, per-variable contribution beta * x to the (uncentred) linear predictor."""
    params = result.fitter.params_
    return pd.DataFrame({var: design[cols].to_numpy(float) @ params[cols].to_numpy(float)
                         for var, cols in result.variables.items()}, index=design.index)


def build_nomogram(result: CoxResult, times: Sequence[float] = TIMES_MONTHS) -> Nomogram:
    contrib = _contributions(result, result.design)
    ranges = contrib.max() - contrib.min()
    widest = float(ranges.max())
    if not widest > 0:
        raise SurvivalInputError("every variable's effect range is 0 (all coefficients 0?): no nomogram to draw")
    factor = 100.0 / widest
    rows = []
    params = result.fitter.params_
    for var in result.variables:
        lo = float(contrib[var].min())
        info = result.categorical.get(var)
        if info is not None:
            for level in info["levels"]:
                c = 0.0 if level == info["reference"] else float(params[f"{var}[{level}]"])
                rows.append({"variable": var, "level": level, "value": np.nan, "contribution": c,
                             "points": (c - lo) * factor})
        else:
            x = result.design[var]
            for v in _nice_ticks(float(x.min()), float(x.max())):
                c = float(params[var]) * v
                rows.append({"variable": var, "level": "", "value": v, "contribution": c, "points": (c - lo) * factor})
    # lifelines centres the linear predictor at the fitted covariate means; its public
    # predict_log_partial_hazard gives the centred one, so the offset is the difference
    X = result.design.drop(columns=[result.duration, result.event])
    centred = np.asarray(result.fitter.predict_log_partial_hazard(X), float)
    mean_lp = float(np.mean(contrib.sum(axis=1).to_numpy(float) - centred))
    return Nomogram(cox=result, variables=list(result.variables), scales=pd.DataFrame(rows), point_factor=factor,
                    min_lp=float(contrib.min().sum()), mean_lp=mean_lp,
                    max_points=float(ranges.sum() * factor), times=tuple(float(t) for t in times))


def _nice_ticks(lo: float, hi: float) -> list[float]:
    from matplotlib.ticker import MaxNLocator

    if hi <= lo:
        return [lo]
    ticks = [t for t in MaxNLocator(nbins=6).tick_values(lo, hi) if lo - 1e-9 <= t <= hi + 1e-9]
    return sorted(set([lo] + ticks + [hi])) if len(ticks) < 2 else ticks


def baseline_cumhaz(result: CoxResult, times: Sequence[float]) -> np.ndarray:
    """H0(t) exactly as lifelines' predict_* with ``times=`` interpolates it."""
    from lifelines.utils import interpolate_at_times

    return np.asarray(interpolate_at_times(result.fitter.baseline_cumulative_hazard_, np.asarray(times, float)))


def survival_from_points(nomo: Nomogram, total_points, t: float) -> np.ndarray:
    lp = nomo.min_lp + np.asarray(total_points, float) / nomo.point_factor
    h0 = baseline_cumhaz(nomo.cox, [t])[0]
    return np.exp(-h0 * np.exp(lp - nomo.mean_lp))


def patient_points(nomo: Nomogram, horizon: float = HORIZON_MONTHS, cutoff: float = CUTOFF) -> pd.DataFrame:
    """Per patient: points per variable, total points, predicted survival at each time, high-risk flag."""
    result = nomo.cox
    contrib = _contributions(result, result.design)
    points = (contrib - contrib.min()) * nomo.point_factor
    out = pd.DataFrame({"patient_id": result.ids}, index=result.design.index)
    for var in nomo.variables:
        out[f"points_{var}"] = points[var]
    out["total_points"] = points.sum(axis=1)
    out["log_partial_hazard"] = contrib.sum(axis=1) - nomo.mean_lp
    for t in sorted(set(nomo.times) | {float(horizon)}):
        out[f"survival_{_fmt(t)}_months"] = survival_from_points(nomo, out["total_points"], t)
    out[f"mortality_{_fmt(horizon)}_months"] = 1.0 - out[f"survival_{_fmt(horizon)}_months"]
    out["high_risk"] = out[f"mortality_{_fmt(horizon)}_months"] > cutoff
    return out.reset_index(drop=True)


def _fmt(t: float) -> str:
    return str(int(t)) if float(t).is_integer() else str(t)


def _axis_rows(nomo: Nomogram) -> list[tuple[str, list[tuple[float, str, object]]]]:
    """The nomogram's axes top to bottom: (name, [(x position 0-100, label, value), ...])."""
    from matplotlib.ticker import MaxNLocator

    rows = [("Points", [(p, f"{p:g}", p) for p in range(0, 101, 10)])]
    for var in nomo.variables:
        sc = nomo.scales[nomo.scales["variable"] == var]
        rows.append((var, [(float(r.points), str(r.level) if r.level != "" else f"{r.value:g}",
                            r.level if r.level != "" else r.value) for r in sc.itertuples()]))
    total_scale = 100.0 / nomo.max_points
    tp_ticks = [t for t in MaxNLocator(nbins=8).tick_values(0, nomo.max_points) if 0 <= t <= nomo.max_points + 1e-9]
    rows.append(("Total points", [(t * total_scale, f"{t:g}", t) for t in tp_ticks]))
    for t in nomo.times:
        h0 = baseline_cumhaz(nomo.cox, [t])[0]
        ticks = []
        for s in SURVIVAL_TICKS:
            if h0 <= 0:
                break
            lp = math.log(-math.log(s) / h0) + nomo.mean_lp
            tp = (lp - nomo.min_lp) * nomo.point_factor
            if 0 <= tp <= nomo.max_points:
                ticks.append((tp * total_scale, f"{s:g}", s))
        rows.append((f"{_fmt(t)}-month survival", ticks))
    return [(name, sorted(ticks, key=lambda tk: tk[0])) for name, ticks in rows]


def nomogram_axes(nomo: Nomogram) -> pd.DataFrame:
    """The data behind :func:`plot_nomogram`: axis, label, value, x_position (0-100) of every tick,
    axes top to bottom, ticks left to right. A survival axis wholly outside the patients' total
    points has no row."""
    return pd.DataFrame([{"axis": name, "label": label, "value": value, "x_position": x}
                         for name, ticks in _axis_rows(nomo) for x, label, value in ticks],
                        columns=["axis", "label", "value", "x_position"])


def plot_nomogram(nomo: Nomogram, ax=None):
    """rms-style nomogram: points, one axis per variable, total points, survival axes per time.

    Args:
        nomo: :func:`build_nomogram`'s result; the ticks drawn are :func:`nomogram_axes`'.
        ax: Axes to draw on; None draws on a new figure sized to the number of axes.

    Returns:
        the Axes.
    """
    import matplotlib.pyplot as plt

    rows = _axis_rows(nomo)
    own = ax is None
    if own:
        _, ax = plt.subplots(figsize=(9, 0.55 * len(rows) + 0.8))
    for i, (name, ticks) in enumerate(rows):
        y = -i
        ax.text(-3, y, name, ha="right", va="center", fontsize=8)
        if ticks:
            xs = [x for x, _, _ in ticks]
            ax.plot([min(xs), max(xs)], [y, y], color="0.2", lw=1)
            last_x = -math.inf
            for x, label, _ in ticks:
                ax.plot([x, x], [y, y + 0.12], color="0.2", lw=1)
                # labels of close ticks (categorical levels with similar effects) go below the line
                below = x - last_x < 5
                ax.text(x, y - 0.12 if below else y + 0.18, label, ha="center", va="top" if below else "bottom",
                        fontsize=6)
                last_x = x if not below else last_x
        else:
            ax.text(0, y, "(outside the range of the data)", va="center", fontsize=6, color="0.4")
    ax.set_xlim(-35, 105)
    ax.set_ylim(-len(rows) + 0.5, 0.8)
    ax.axis("off")
    ax.set_title("Nomogram (Cox model): total points -> predicted overall survival", fontsize=9)
    if own:
        ax.figure.tight_layout()
    return ax


# ----------------------------------------------------------------------------- calibration
def _predict_survival(fitter, design: pd.DataFrame, t: float) -> np.ndarray:
    X = design.drop(columns=[c for c in (fitter.duration_col, fitter.event_col) if c in design])
    return fitter.predict_survival_function(X, times=[t]).to_numpy(float).ravel()


def _km_at(durations, events, t: float) -> float:
    from lifelines import KaplanMeierFitter

    return float(KaplanMeierFitter().fit(durations, events).predict(t))


def _group_gaps(pred: np.ndarray, durations, events, t: float, groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per quantile group of predicted survival: mean predicted, KM observed, size."""
    ranks = pd.Series(pred).rank(method="first").to_numpy()
    g = np.minimum((ranks - 1) * groups // len(pred), groups - 1).astype(int)
    mean_pred, obs, size = np.zeros(groups), np.zeros(groups), np.zeros(groups, int)
    d, e = np.asarray(durations, float), np.asarray(events, int)
    for k in range(groups):
        m = g == k
        mean_pred[k] = pred[m].mean()
        obs[k] = _km_at(d[m], e[m], t)
        size[k] = int(m.sum())
    return mean_pred, obs, size


def calibration(result: CoxResult, horizon: float = HORIZON_MONTHS, groups: int = 4, n_boot: int = 200,
                seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Apparent and bootstrap optimism-corrected calibration of predicted survival at ``horizon``."""
    from lifelines import CoxPHFitter

    design, dur, ev = result.design, result.duration, result.event
    n = len(design)
    groups = int(max(2, min(groups, n // 5)))
    pred = _predict_survival(result.fitter, design, horizon)
    mean_pred, obs, size = _group_gaps(pred, design[dur], design[ev], horizon, groups)
    rng = np.random.default_rng(seed)
    optimism, used = np.zeros(groups), 0
    for _ in range(int(n_boot)):
        idx = rng.integers(0, n, n)
        boot = design.iloc[idx].reset_index(drop=True)
        if boot[ev].sum() == 0:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                fb = CoxPHFitter(penalizer=result.penalizer).fit(boot, dur, ev)
            except Exception:  # noqa: BLE001, S112 - a resample the model cannot fit is skipped and counted
                continue
        if not np.all(np.isfinite(fb.params_)):
            continue
        pb, ob, _ = _group_gaps(_predict_survival(fb, boot, horizon), boot[dur], boot[ev], horizon, groups)
        pt, ot, _ = _group_gaps(_predict_survival(fb, design, horizon), design[dur], design[ev], horizon, groups)
        optimism += (ob - pb) - (ot - pt)
        used += 1
    if used == 0:
        raise SurvivalInputError("calibration: no bootstrap resample could be fitted; use --n-boot 0 or more data")
    optimism /= used
    table = pd.DataFrame({"group": np.arange(groups), "n": size, "predicted_survival": mean_pred,
                          "observed_km_survival": obs, "optimism": optimism,
                          "corrected_observed_survival": np.clip(obs - optimism, 0, 1)})
    info = {"horizon_months": horizon, "groups": groups, "n_boot": int(n_boot), "n_boot_used": used,
            "mean_abs_error_apparent": float(np.mean(np.abs(obs - mean_pred))),
            "mean_abs_error_corrected": float(np.mean(np.abs(table["corrected_observed_survival"] - mean_pred)))}
    if used < n_boot:
        log.warning("calibration: %d of %d bootstrap resamples could not be fitted and were skipped", n_boot - used, n_boot)
    return table, info


def plot_calibration(table: pd.DataFrame, horizon: float, ax=None):
    """Predicted against observed (Kaplan-Meier) survival at ``horizon`` per group, apparent and
    bootstrap-corrected, with the ideal diagonal.

    Args:
        table: :func:`calibration`'s table.
        horizon: months of the predicted survival (axis labels).
        ax: Axes to draw on; None draws on a new 5 x 5 inch figure.

    Returns:
        the Axes.
    """
    import matplotlib.pyplot as plt

    own = ax is None
    if own:
        _, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="0.5", linestyle="--", lw=1, label="ideal")
    ax.plot(table["predicted_survival"], table["observed_km_survival"], "o-", color="tab:blue", label="apparent")
    ax.plot(table["predicted_survival"], table["corrected_observed_survival"], "s-", color="tab:red",
            label="bootstrap-corrected")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"Predicted {_fmt(horizon)}-month survival", fontsize=8)
    ax.set_ylabel(f"Observed {_fmt(horizon)}-month survival (Kaplan-Meier)", fontsize=8)
    ax.legend(fontsize=7)
    ax.set_title(f"Calibration at {_fmt(horizon)} months", fontsize=9)
    if own:
        ax.figure.tight_layout()
    return ax


def decision_curve(risk: np.ndarray, durations, events, horizon: float = HORIZON_MONTHS,
                   thresholds: Sequence[float] | None = None) -> pd.DataFrame:
    """Net benefit of the model, treat-all and treat-none at ``horizon`` (KM event rates)."""
    thresholds = np.round(np.arange(0.01, 0.991, 0.01), 2) if thresholds is None else np.asarray(thresholds, float)
    d, e, risk = np.asarray(durations, float), np.asarray(events, int), np.asarray(risk, float)
    n = len(risk)
    s_all = _km_at(d, e, horizon)
    rows = []
    for p in thresholds:
        w = p / (1 - p)
        high = risk >= p
        frac = high.sum() / n
        if high.any():
            s_high = _km_at(d[high], e[high], horizon)
            nb = (1 - s_high) * frac - s_high * frac * w
        else:
            nb = 0.0
        rows.append({"threshold": float(p), "net_benefit_model": float(nb),
                     "net_benefit_treat_all": float((1 - s_all) - s_all * w), "net_benefit_treat_none": 0.0,
                     "fraction_high_risk": float(frac)})
    return pd.DataFrame(rows)


def plot_decision_curve(table: pd.DataFrame, horizon: float, ax=None):
    """Net benefit against threshold probability: the model, treat all and treat none.

    Args:
        table: :func:`decision_curve`'s table.
        horizon: months of the predicted mortality (axis label).
        ax: Axes to draw on; None draws on a new 6 x 4.5 inch figure.

    Returns:
        the Axes.
    """
    import matplotlib.pyplot as plt

    own = ax is None
    if own:
        _, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(table["threshold"], table["net_benefit_model"], color="tab:red", label="Cox model")
    ax.plot(table["threshold"], table["net_benefit_treat_all"], color="0.4", label="treat all")
    ax.plot(table["threshold"], table["net_benefit_treat_none"], color="0.1", linestyle="--", label="treat none")
    top = max(0.05, float(table[["net_benefit_model", "net_benefit_treat_all"]].max().max()) * 1.1)
    ax.set_ylim(-0.05, top)
    ax.set_xlabel(f"Threshold probability of death by {_fmt(horizon)} months", fontsize=8)
    ax.set_ylabel("Net benefit", fontsize=8)
    ax.legend(fontsize=7)
    ax.set_title(f"Decision curve at {_fmt(horizon)} months", fontsize=9)
    if own:
        ax.figure.tight_layout()
    return ax


# --------------------------------------------------------------------------------- assembly
class NoSignificantVariableError(SurvivalInputError):
    """No covariate reaches the selection threshold: the caller chooses the variables instead."""


def select_variables(full: CoxResult, alpha: float = ALPHA) -> tuple[list, dict]:
    """Variables whose joint Wald p in the full model ``full`` is below ``alpha`` (Appendix 9), in the
    model's order, and every variable's p."""
    pvals = variable_p_values(full)
    chosen = [v for v in full.variables if pvals[v] < alpha]
    if not chosen:
        raise NoSignificantVariableError(
            f"no covariate has p < {alpha} in the full Cox model (p: "
            + ", ".join(f"{k}={v:.3g}" for k, v in pvals.items()) + "); give --variables a,b to choose them")
    log.info("nomogram variables (p < %g): %s", alpha, chosen)
    return chosen, pvals


@dataclass
class NomogramResult:
    nomogram: Nomogram
    patients: pd.DataFrame         # per patient: points, survival at each time, high_risk
    summary: dict                  # nomogram/summary.json
    calibration: pd.DataFrame | None
    decision_curve: pd.DataFrame


def nomogram(df: pd.DataFrame, duration: str = DURATION, event: str = EVENT, covariates: Sequence[str] = (),
             categorical: Sequence[str] = (), reference: dict | None = None, penalizer: float = 0.0,
             variables: Sequence[str] | None = None, alpha: float = ALPHA, times: Sequence[float] = TIMES_MONTHS,
             horizon: float = HORIZON_MONTHS, cutoff: float = CUTOFF, n_boot: int = 200, groups: int = 4,
             seed: int = 0, out: str | Path | None = None,
             fallback_penalizer: float | None = None) -> NomogramResult:
    """Select variables, fit the final Cox model, build the nomogram, score every patient, calibrate
    (``n_boot`` resamples; 0 skips it) and draw the decision curve; with ``out`` write it all there.

    With ``fallback_penalizer`` (the study passes ``analysis.cox.FALLBACK_PENALIZER``) a Cox fit that
    does not converge is refitted once with that ridge penalty (:func:`analysis.cox.fit_cox_with_fallback`);
    the final model keeps the penalty the full model needed, and summary.json records the one fitted.
    """
    if not 0 < cutoff < 1:
        raise SurvivalInputError(f"cutoff {cutoff}: expected a probability in (0, 1)")
    covariates = list(covariates)
    if variables:
        unknown = [v for v in variables if v not in df]
        if unknown:
            raise SurvivalInputError(f"--variables {unknown}: not columns of the table")
        chosen, pvals, note = list(variables), {}, ""
    else:
        full = fit_cox_with_fallback(df, duration, event, covariates, categorical, reference, penalizer,
                                     fallback_penalizer=fallback_penalizer, cv_folds=0)
        chosen, pvals = select_variables(full, alpha)
        penalizer, note = full.penalizer, full.penalizer_note
    cats = [c for c in categorical if c in chosen]
    refs = {k: v for k, v in (reference or {}).items() if k in chosen}
    final = fit_cox_with_fallback(df, duration, event, chosen, cats, refs, penalizer,
                                  fallback_penalizer=fallback_penalizer, cv_folds=0)
    max_t = float(final.design[duration].max())
    if horizon > max_t:
        log.warning("horizon %g months is beyond the longest follow-up (%g): the baseline hazard is carried "
                    "flat, so predicted survival there is optimistic", horizon, max_t)
    nomo = build_nomogram(final, times)
    pts = patient_points(nomo, horizon, cutoff)
    h = _fmt(horizon)
    info = {"variables": chosen, "cutoff": float(cutoff), "n_high_risk": int(pts["high_risk"].sum()),
            "horizon_months": float(horizon), "times_months": list(nomo.times), "n": len(pts),
            "selection": "given" if variables else f"joint Wald p < {alpha} in the full model",
            "selection_p": pvals, "concordance": final.concordance, "penalizer": final.penalizer,
            "penalizer_note": final.penalizer_note or note}
    cal = None
    if n_boot > 0:
        cal, info["calibration"] = calibration(final, horizon, groups, n_boot, seed)
    dca = decision_curve(pts[f"mortality_{h}_months"], final.design[duration], final.design[event], horizon)
    result = NomogramResult(nomogram=nomo, patients=pts, summary=info, calibration=cal, decision_curve=dca)
    if out is not None:
        write_nomogram(result, out)
    return result


def write_nomogram(result: NomogramResult, out: str | Path) -> None:
    out = Path(out)
    nomo, horizon = result.nomogram, result.summary["horizon_months"]
    h = _fmt(horizon)
    save_figure(out / "figures" / "nomogram.png", plot_nomogram(nomo).figure, data=nomogram_axes(nomo))
    write_csv(out / "tables" / "nomogram_patients.csv", result.patients)
    write_csv(out / "tables" / "nomogram_cox_summary.csv", nomo.cox.summary)
    write_csv(out / "tables" / "nomogram_points.csv", nomo.scales)
    if result.calibration is not None:
        save_figure(out / "figures" / f"calibration_{h}m.png", plot_calibration(result.calibration, horizon).figure,
                    data=result.calibration)
    save_figure(out / "figures" / f"decision_curve_{h}m.png",
                plot_decision_curve(result.decision_curve, horizon).figure, data=result.decision_curve)
    write_json(out / "summary.json", result.summary)


def _floats(value) -> list[float]:
    try:
        return [float(v) for v in split_list(value)]
    except ValueError:
        raise SurvivalInputError(f"expected numbers separated by commas, found {value!r}") from None


def nomogram_cli(table: str, out: str, covariates, duration: str = DURATION, event: str = EVENT, categorical=None,
                 reference=None, penalizer: float = 0.0, join=None, variables=None, alpha: float = ALPHA,
                 times="12,24,36", horizon: float = HORIZON_MONTHS, cutoff: float = CUTOFF, n_boot: int = 200,
                 groups: int = 4, seed: int = 0):
    """Cox nomogram with per-patient points, survival at --times, high-risk flag, calibration and DCA.

    The nomogram's variables are --variables, or else the --covariates whose joint Wald p is below
    --alpha in the full Cox model. A patient is high risk when the predicted mortality at --horizon
    months is above --cutoff. Writes figures/nomogram.png, the calibration and decision-curve figures,
    tables/nomogram_*.csv and summary.json into OUT. The table flags are those of ``cox``.

    Args:
        table: per-patient CSV with the duration, event and covariate columns (a clinical.csv is read typed).
        out: output folder.
        covariates: candidate variables of the full model, comma-separated column names (a,b,c).
        duration: column of follow-up time in months (the unit of --times and --horizon).
        event: column of the event indicator, 1 = death, 0 = censored.
        categorical: comma-separated covariates to treat as categorical (non-numeric columns are anyway).
        reference: reference levels, VARIABLE=LEVEL[,VARIABLE=LEVEL] (default the first level in
            sorted order).
        penalizer: lifelines CoxPHFitter ridge penalty of the full and the final model (0 = none).
        join: NAME=FILE:COLUMN[,...] adds COLUMN of another per-patient CSV (joined on patient_id) as NAME.
        variables: comma-separated variables to use as given, instead of the selection by --alpha.
        alpha: selection threshold on each covariate's joint Wald p-value in the full model.
        times: comma-separated months at which every patient's predicted survival is given.
        horizon: months at which the predicted mortality 1 - S(t) meets --cutoff and at which the
            calibration and the decision curve are computed.
        cutoff: predicted mortality at --horizon above which a patient is high risk, a probability in (0, 1).
        n_boot: bootstrap resamples of the optimism-corrected calibration (0 skips the calibration).
        groups: quantile groups of predicted survival in the calibration (kept between 2 and n / 5).
        seed: seed of the calibration bootstrap.
    """
    from analysis.clinical_table import TableInputError, usage_exit

    try:
        df = read_table(table, join, required=table_columns(duration, event, covariates, join))
        check_duration_event(df, duration, event, where=str(table), file_rows=True)
        info = nomogram(df, duration, event, split_list(covariates), split_list(categorical),
                        parse_reference(reference), float(penalizer), split_list(variables) or None, float(alpha),
                        _floats(times), float(horizon), float(cutoff), int(n_boot), int(groups), int(seed),
                        out=out).summary
    except (SurvivalInputError, TableInputError) as exc:
        raise usage_exit(f"nomogram: {exc}") from None
    return (f"variables {info['variables']}; {info['n_high_risk']} of {info['n']} patients high risk "
            f"(predicted {_fmt(info['horizon_months'])}-month mortality > {info['cutoff']})")


__all__ = [
    "NoSignificantVariableError",
    "Nomogram",
    "NomogramResult",
    "baseline_cumhaz",
    "build_nomogram",
    "calibration",
    "decision_curve",
    "nomogram",
    "nomogram_axes",
    "nomogram_cli",
    "patient_points",
    "plot_calibration",
    "plot_decision_curve",
    "plot_nomogram",
    "select_variables",
    "survival_from_points",
    "write_nomogram",
]
