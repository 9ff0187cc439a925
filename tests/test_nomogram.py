"""Nomogram: points monotone in each effect, survival identical to lifelines, high-risk flag,
calibration and decision-curve invariants, selection by p < 0.05 and its refusal."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from analysis.cox import FALLBACK_PENALIZER, CoxConvergenceError, fit_cox
from analysis.nomogram import (
    NoSignificantVariableError,
    build_nomogram,
    calibration,
    decision_curve,
    nomogram,
    nomogram_axes,
    nomogram_cli,
    patient_points,
    survival_from_points,
)
from analysis.survival_table import SurvivalInputError

ROSSI_COVARIATES = ["fin", "age", "race", "wexp", "mar", "paro", "prio"]


@pytest.fixture(scope="module")
def rossi() -> pd.DataFrame:
    from lifelines.datasets import load_rossi

    d = load_rossi()
    d.insert(0, "patient_id", [f"R{i:03d}" for i in range(len(d))])
    # a 4-level categorical with a clear gradient, standing in for the model's risk class
    d["cls"] = pd.cut(d["prio"], [-1, 0, 2, 5, 100], labels=["none", "low", "mid", "high"]).astype(str)
    return d


@pytest.fixture(scope="module")
def model(rossi):
    return fit_cox(rossi, "week", "arrest", ["fin", "age", "cls"], categorical=["cls"], cv_folds=0)


@pytest.fixture(scope="module")
def nomo(model):
    return build_nomogram(model, times=(12, 26, 52))


def test_predicted_survival_equals_lifelines(model, nomo):
    pts = patient_points(nomo, horizon=52, cutoff=0.7)
    X = model.design.drop(columns=["week", "arrest"])
    expected = model.fitter.predict_survival_function(X, times=[12, 26, 52]).T.to_numpy()
    got = pts[["survival_12_months", "survival_26_months", "survival_52_months"]].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(pts["log_partial_hazard"], model.fitter.predict_log_partial_hazard(X), atol=1e-10)


def test_points_monotone_in_each_effect_and_scaled_to_100(model, nomo):
    pts = patient_points(nomo, horizon=52)
    params = model.fitter.params_
    # continuous: points move with beta * x (age has beta < 0, so older -> fewer points)
    for var in ("fin", "age"):
        effect = params[var] * model.design[var].to_numpy()
        order = np.argsort(effect, kind="stable")
        assert np.all(np.diff(pts[f"points_{var}"].to_numpy()[order]) >= -1e-9), var
    assert params["age"] < 0
    age_pts = pts.groupby(model.design["age"].to_numpy())["points_age"].first()
    assert age_pts.is_monotonic_decreasing
    # categorical: level points in the order of the level coefficients (reference 0)
    scale = nomo.scales[nomo.scales["variable"] == "cls"].set_index("level")
    beta = {lv: (0.0 if lv == model.categorical["cls"]["reference"] else params[f"cls[{lv}]"])
            for lv in scale.index}
    assert sorted(scale.index, key=lambda lv: scale.loc[lv, "points"]) == sorted(beta, key=beta.get)
    # the widest effect gets exactly 0-100; every variable starts at 0
    spans = {v: pts[f"points_{v}"].max() - pts[f"points_{v}"].min() for v in ("fin", "age", "cls")}
    assert max(spans.values()) == pytest.approx(100.0) and min(pts[[f"points_{v}" for v in spans]].min()) == 0.0
    np.testing.assert_allclose(pts["total_points"], pts[[f"points_{v}" for v in spans]].sum(axis=1))
    # total points are a strictly increasing function of the linear predictor
    order = np.argsort(pts["log_partial_hazard"].to_numpy())
    assert np.all(np.diff(pts["total_points"].to_numpy()[order]) >= -1e-9)


def test_survival_axes_decrease_with_points(nomo):
    tp = np.linspace(0, nomo.max_points, 7)
    for t in (12, 26, 52):
        s = survival_from_points(nomo, tp, t)
        assert np.all(np.diff(s) < 0)
    assert np.all(survival_from_points(nomo, tp, 52) < survival_from_points(nomo, tp, 12))


def test_high_risk_flag_is_mortality_above_cutoff(rossi):
    res = nomogram(rossi, "week", "arrest", ["fin", "age", "cls"], ["cls"], variables=["age", "cls"],
                   times=(12, 26, 52), horizon=52, cutoff=0.4, n_boot=0)
    pts = res.patients
    assert (pts["high_risk"] == (pts["mortality_52_months"] > 0.4)).all()
    assert res.summary["n_high_risk"] == int((1 - pts["survival_52_months"] > 0.4).sum()) > 0
    assert res.summary["variables"] == ["age", "cls"] and res.summary["cutoff"] == 0.4
    with pytest.raises(SurvivalInputError, match=r"cutoff 1.5: expected a probability in \(0, 1\)"):
        nomogram(rossi, "week", "arrest", ["age"], cutoff=1.5)


def test_selection_keeps_p_below_005(rossi):
    # R coxph on rossi (see test_survival): fin p 0.047, age 0.009, prio 0.0014; others > 0.25
    res = nomogram(rossi, "week", "arrest", ROSSI_COVARIATES, horizon=52, times=(52,), n_boot=0)
    assert res.summary["variables"] == ["fin", "age", "prio"]
    assert res.summary["selection_p"]["fin"] == pytest.approx(0.04742, abs=1e-3)


def test_selection_with_nothing_significant_says_what_to_do(rossi):
    with pytest.raises(SurvivalInputError, match=r"no covariate has p < 0.05 .*paro=0\.\d+.*give --variables") as err:
        nomogram(rossi, "week", "arrest", ["paro", "mar"], horizon=52)
    # its own type, so a caller (the study) can choose the variables without reading the message
    assert isinstance(err.value, NoSignificantVariableError)


def test_decision_curve_invariants(model, nomo):
    pts = patient_points(nomo, horizon=52)
    risk = pts["mortality_52_months"].to_numpy()
    d, e = model.design["week"], model.design["arrest"]
    thresholds = [risk.min() / 2, 0.3, risk.max() + 0.01]
    dca = decision_curve(risk, d, e, horizon=52, thresholds=thresholds)
    # treat all: KM mortality at 52 weeks (114 arrests, no censoring before 52 -> 114/432)
    s_all = 1 - 114 / 432
    w = np.array(thresholds) / (1 - np.array(thresholds))
    np.testing.assert_allclose(dca["net_benefit_treat_all"], (1 - s_all) - s_all * w, atol=1e-12)
    # below every predicted risk the model treats everyone: same as treat all; above all: nobody
    assert dca["net_benefit_model"].iloc[0] == pytest.approx(dca["net_benefit_treat_all"].iloc[0], abs=1e-12)
    assert dca["net_benefit_model"].iloc[-1] == 0.0 and dca["fraction_high_risk"].iloc[-1] == 0.0


def test_calibration_bootstrap_corrected(model):
    table, info = calibration(model, horizon=52, groups=4, n_boot=8, seed=1)
    assert len(table) == 4 and table["n"].sum() == 432 and info["n_boot_used"] == 8
    # groups are ordered by predicted survival, and the apparent observed KM follows them
    assert table["predicted_survival"].is_monotonic_increasing
    assert np.corrcoef(table["predicted_survival"], table["observed_km_survival"])[0, 1] > 0.8
    # a 5-parameter model on 432 patients is well calibrated: gaps of a few percent
    assert info["mean_abs_error_apparent"] < 0.06
    assert ((table["corrected_observed_survival"] >= 0) & (table["corrected_observed_survival"] <= 1)).all()
    assert np.isfinite(table["optimism"]).all() and (table["optimism"] != 0).any()
    again, _ = calibration(model, horizon=52, groups=4, n_boot=8, seed=1)
    pd.testing.assert_frame_equal(table, again)


def test_nomogram_cli_writes_contract_outputs(tmp_path, rossi):
    rossi.to_csv(tmp_path / "t.csv", index=False)
    out = tmp_path / "nomo"
    text = nomogram_cli(str(tmp_path / "t.csv"), str(out), "fin,age,cls,paro", duration="week", event="arrest",
                        categorical="cls", times="12,26,52", horizon=52, cutoff=0.5, n_boot=4)
    summary = json.loads((out / "summary.json").read_text())
    assert {"variables", "cutoff", "n_high_risk"} <= set(summary)
    assert summary["cutoff"] == 0.5 and "paro" not in summary["variables"] and "cls" in summary["variables"]
    pts = pd.read_csv(out / "tables" / "nomogram_patients.csv")
    assert len(pts) == 432 and summary["n_high_risk"] == int(pts["high_risk"].sum())
    assert f"{summary['n_high_risk']} of 432" in text
    for name in ("nomogram", "calibration_52m", "decision_curve_52m"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000, name
        assert len(pd.read_csv(out / "tables" / f"{name}.csv")) > 0, name


def test_nomogram_cli_unknown_variable(tmp_path, rossi):
    rossi.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(SystemExit, match=r"nomogram: --variables \['tumour'\]: not columns of the table"):
        nomogram_cli(str(tmp_path / "t.csv"), str(tmp_path / "o"), "age", duration="week", event="arrest",
                     variables="tumour")
    assert not (tmp_path / "o").exists()


def test_nomogram_axes_are_the_figures_ticks(nomo):
    axes = nomogram_axes(nomo)
    names = list(dict.fromkeys(axes["axis"]))
    assert names[:5] == ["Points", "fin", "age", "cls", "Total points"]
    points = axes[axes["axis"] == "Points"]
    assert list(points["value"]) == list(points["x_position"]) == list(range(0, 101, 10))
    # each survival axis: labels decrease left to right (more points, lower survival), all inside 0-100
    for t in (12, 26, 52):
        s = axes[axes["axis"] == f"{t}-month survival"]
        assert s["value"].is_monotonic_decreasing and s["x_position"].between(0, 100).all()
    # a categorical level's tick sits at its points from the scale
    cls = nomogram_axes(nomo).query("axis == 'cls'").set_index("label")["x_position"]
    scale = nomo.scales[nomo.scales["variable"] == "cls"].set_index("level")["points"]
    for level, pts in scale.items():
        assert cls[str(level)] == pytest.approx(pts)


def _separated(n: int = 60, seed: int = 0) -> pd.DataFrame:
    """marker = death and the deaths come first: an unpenalised Cox fit runs off to infinity."""
    rng = np.random.default_rng(seed)
    d = pd.DataFrame({"patient_id": [f"P{i:02d}" for i in range(n)], "os_months": rng.uniform(1, 60, n).round(1),
                      "death": rng.integers(0, 2, n), "age": rng.normal(65, 10, n).round()})
    d["marker"] = d["death"].astype(float)
    d.loc[d["death"] == 1, "os_months"] /= 10
    return d


def test_nomogram_uses_the_one_penalty_fallback(tmp_path):
    d = _separated()
    with pytest.raises(CoxConvergenceError):
        nomogram(d, covariates=["age", "marker"], n_boot=0)
    # the full model needs the penalty: selection and the final model both use 0.1, recorded in summary.json
    res = nomogram(d, covariates=["age", "marker"], n_boot=0, fallback_penalizer=FALLBACK_PENALIZER,
                   out=tmp_path / "selected")
    assert res.nomogram.cox.penalizer == 0.1 and "marker" in res.summary["variables"]
    summary = json.loads((tmp_path / "selected" / "summary.json").read_text())
    assert summary["penalizer"] == 0.1 and "did not converge" in summary["penalizer_note"]
    # with the variables given, only the final model is fitted, and it falls back the same way
    given = nomogram(d, covariates=["age", "marker"], variables=["age", "marker"], n_boot=0,
                     fallback_penalizer=FALLBACK_PENALIZER)
    assert given.summary["penalizer"] == 0.1 and given.summary["variables"] == ["age", "marker"]
    direct = fit_cox(d, covariates=["age", "marker"], penalizer=0.1, cv_folds=0)
    pd.testing.assert_frame_equal(given.nomogram.cox.summary, direct.summary)
    # a model that converges keeps its penalty and has no note
    plain = nomogram(d, covariates=["age", "marker"], variables=["age"], n_boot=0,
                     fallback_penalizer=FALLBACK_PENALIZER).summary
    assert plain["penalizer"] == 0.0 and plain["penalizer_note"] == ""
