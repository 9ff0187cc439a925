"""Cox model against R reference values, every refusal, and the study's policy (covariate choice,
penalty fallback) moved here from analysis.study."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pandas as pd
import pytest

from analysis.cox import (
    FALLBACK_PENALIZER,
    CoxConvergenceError,
    cox_cli,
    fit_cox,
    fit_cox_with_fallback,
    log_hazard_table,
    paper_covariates,
    scaled_schoenfeld,
    variable_p_values,
)
from analysis.survival_table import SurvivalInputError

COX_COLUMNS = ["covariate", "coef", "se", "hr", "hr_lower_95", "hr_upper_95", "p"]
ROSSI_COVARIATES = ["fin", "age", "race", "wexp", "mar", "paro", "prio"]

# R survival::coxph (Efron ties, the default) on the Rossi et al. recidivism data bundled with
# lifelines (lifelines.datasets.load_rossi; the 0/1 columns of carData::Rossi):
#   > summary(coxph(Surv(week, arrest) ~ fin + age + race + wexp + mar + paro + prio, data = rossi))
#     n= 432, number of events= 114
#            coef exp(coef) se(coef)      z Pr(>|z|)
#   fin  -0.37942   0.68426  0.19138 -1.983  0.04742
#   age  -0.05744   0.94418  0.02200 -2.611  0.00903
#   race  0.31390   1.36875  0.30799  1.019  0.30812
#   wexp -0.14980   0.86088  0.21222 -0.706  0.48029
#   mar  -0.43370   0.64810  0.38187 -1.136  0.25606
#   paro -0.08487   0.91863  0.19576 -0.434  0.66461
#   prio  0.09150   1.09581  0.02865  3.194  0.00140
#   Concordance= 0.64  (se = 0.027 )
# The same R call on carData::Rossi's factors (levels "raceother", "marnot married", i.e. the other
# level as 1) prints identical magnitudes with the signs of race and mar flipped, e.g. in public
# course notes reproducing summary(coxph(...)). R prints the concordance to two decimals; Harrell's C
# as lifelines counts it is 0.6403, so the test holds it to 0.640 +- 1e-3.
R_COEF = {"fin": -0.37942, "age": -0.05744, "race": 0.31390, "wexp": -0.14980, "mar": -0.43370,
          "paro": -0.08487, "prio": 0.09150}
R_SE = {"fin": 0.19138, "age": 0.02200, "race": 0.30799, "wexp": 0.21222, "mar": 0.38187,
        "paro": 0.19576, "prio": 0.02865}
R_P = {"fin": 0.04742, "age": 0.00903, "race": 0.30812, "wexp": 0.48029, "mar": 0.25606,
       "paro": 0.66461, "prio": 0.00140}
R_HR = {"fin": 0.68426, "age": 0.94418, "race": 1.36875, "wexp": 0.86088, "mar": 0.64810, "paro": 0.91863,
        "prio": 1.09581}
R_CONCORDANCE = 0.640


@pytest.fixture(scope="module")
def rossi() -> pd.DataFrame:
    from lifelines.datasets import load_rossi

    d = load_rossi()
    d.insert(0, "patient_id", [f"R{i:03d}" for i in range(len(d))])
    return d


@pytest.fixture(scope="module")
def rossi_fit(rossi):
    return fit_cox(rossi, "week", "arrest", ROSSI_COVARIATES, cv_folds=3)


# ------------------------------------------------------------------------------- Cox vs R
def test_cox_reproduces_r_coxph_on_rossi(rossi_fit):
    s = rossi_fit.summary.set_index("covariate")
    assert list(rossi_fit.summary.columns) == COX_COLUMNS
    for c in ROSSI_COVARIATES:
        assert s.loc[c, "coef"] == pytest.approx(R_COEF[c], abs=1e-3), c
        assert s.loc[c, "se"] == pytest.approx(R_SE[c], abs=1e-3), c
        assert s.loc[c, "p"] == pytest.approx(R_P[c], abs=1e-3), c
        assert s.loc[c, "hr"] == pytest.approx(R_HR[c], abs=1e-3)
        # Wald 95% CI: exp(coef -+ 1.96 se)
        assert s.loc[c, "hr_lower_95"] == pytest.approx(math.exp(R_COEF[c] - 1.959964 * R_SE[c]), rel=2e-3)
        assert s.loc[c, "hr_upper_95"] == pytest.approx(math.exp(R_COEF[c] + 1.959964 * R_SE[c]), rel=2e-3)
    assert rossi_fit.concordance == pytest.approx(R_CONCORDANCE, abs=1e-3)
    assert len(rossi_fit.design) == 432
    assert int(rossi_fit.design["arrest"].sum()) == 114


def test_cv_concordance_is_out_of_fold_and_below_apparent(rossi_fit):
    # out-of-fold C of a 7-covariate model is optimistic-free: below the apparent 0.640, above chance
    assert 0.5 < rossi_fit.cv_concordance < rossi_fit.concordance
    assert "3-fold" in rossi_fit.cv_note


def test_schoenfeld_test_flags_known_violations_on_rossi(rossi_fit):
    # lifelines' rank-transformed test on this model rejects PH for age (p = 0.0007) and wexp (0.007)
    # and not for fin (0.90), as in the lifelines "testing the proportional hazard assumptions" guide
    ph = rossi_fit.ph_test.set_index("covariate")
    assert set(rossi_fit.ph_violations) == {"age", "wexp"}
    assert ph.loc["age", "p"] == pytest.approx(0.000714, abs=5e-5)
    assert ph.loc["fin", "p"] > 0.5


def test_variable_p_values_equal_wald_p_for_numeric(rossi_fit):
    p = variable_p_values(rossi_fit)
    for c in ROSSI_COVARIATES:
        assert p[c] == pytest.approx(R_P[c], abs=1e-3)


# --------------------------------------------------------------- categorical coding (Fig. 7)
def _with_classes(rossi: pd.DataFrame) -> pd.DataFrame:
    d = rossi.copy()
    d["cls"] = pd.cut(d["prio"], [-1, 0, 2, 5, 100], labels=False).astype(int)
    return d


def test_deviation_coding_equals_sum_to_zero_fit(rossi):
    """Per-level log(HR) (paper Fig. 7) = a direct fit with effect-coded columns, exactly."""
    from lifelines import CoxPHFitter

    d = _with_classes(rossi)
    res = fit_cox(d, "week", "arrest", ["fin", "age", "cls"], categorical=["cls"], cv_folds=0)
    rows = res.summary.set_index("covariate")
    assert [f"cls[{k}]" for k in range(4)] == [c for c in rows.index if c.startswith("cls")]
    # direct effect coding: column k = 1 if level k, -1 if level 3, else 0 (k = 0, 1, 2)
    eff = pd.DataFrame({"week": d["week"], "arrest": d["arrest"], "fin": d["fin"], "age": d["age"]})
    for k in range(3):
        eff[f"e{k}"] = (d["cls"] == k).astype(float) - (d["cls"] == 3).astype(float)
    direct = CoxPHFitter().fit(eff, "week", "arrest")
    gamma = [direct.params_[f"e{k}"] for k in range(3)]
    gamma.append(-sum(gamma))
    V = direct.variance_matrix_.loc[["e0", "e1", "e2"], ["e0", "e1", "e2"]].to_numpy()
    se3 = math.sqrt(np.ones(3) @ V @ np.ones(3))
    for k in range(4):
        assert rows.loc[f"cls[{k}]", "coef"] == pytest.approx(gamma[k], abs=1e-6)
    for k in range(3):
        assert rows.loc[f"cls[{k}]", "se"] == pytest.approx(math.sqrt(V[k, k]), abs=1e-6)
    assert rows.loc["cls[3]", "se"] == pytest.approx(se3, abs=1e-6)
    assert sum(rows.loc[f"cls[{k}]", "coef"] for k in range(4)) == pytest.approx(0.0, abs=1e-9)
    # the forest plot has one row per level
    assert (res.forest["variable"] == "cls").sum() == 4


def test_reference_coding_rows_and_reference_choice(rossi):
    d = _with_classes(rossi)
    dev = fit_cox(d, "week", "arrest", ["fin", "cls"], categorical=["cls"], cv_folds=0).summary.set_index("covariate")
    ref = fit_cox(d, "week", "arrest", ["fin", "cls"], categorical=["cls"], reference={"cls": "2"},
                  coding="reference", cv_folds=0)
    rows = ref.summary.set_index("covariate")
    assert "cls[2]" not in rows.index and {"cls[0]", "cls[1]", "cls[3]"} <= set(rows.index)
    # contrast vs reference = difference of the deviation effects (same model, other coding)
    for k in (0, 1, 3):
        assert rows.loc[f"cls[{k}]", "coef"] == pytest.approx(dev.loc[f"cls[{k}]", "coef"] - dev.loc["cls[2]", "coef"],
                                                              abs=1e-6)
    forest = ref.forest.set_index("covariate")
    assert bool(forest.loc["cls[2]", "is_reference"]) and forest.loc["cls[2]", "coef"] == 0.0
    with pytest.raises(SurvivalInputError, match=r"--reference cls=9: level not found; cls has levels \['0', '1', '2', '3'\]"):
        fit_cox(d, "week", "arrest", ["cls"], categorical=["cls"], reference={"cls": "9"})


def test_string_covariate_becomes_categorical_and_missing_rows_are_reported(rossi, caplog):
    d = rossi.copy()
    d["sex"] = np.where(d["race"] == 1, "M", "F")
    d.loc[[0, 5], "age"] = np.nan
    with caplog.at_level(logging.WARNING):
        res = fit_cox(d, "week", "arrest", ["age", "sex"], cv_folds=0)
    assert list(res.excluded["patient_id"]) == ["R000", "R005"]
    assert list(res.excluded["reason"]) == ["missing age", "missing age"]
    assert "R000 (missing age)" in caplog.text
    assert len(res.design) == 430
    # two-level categorical: reference coding, the sex[M] row equals race's effect in this model
    assert "sex[M]" in set(res.summary["covariate"]) and "sex[F]" not in set(res.summary["covariate"])


# ---------------------------------------------------------------------- Cox refusals
def _toy(n: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"patient_id": [f"P{i:02d}" for i in range(n)], "os_months": rng.uniform(1, 60, n).round(1),
                         "death": rng.integers(0, 2, n), "age": rng.normal(65, 10, n).round(),
                         "sorafenib": rng.integers(0, 2, n)})


def test_cox_separation_gives_clear_error_naming_column():
    d = _toy()
    d["marker"] = d["death"].astype(float)           # every death has marker 1, every survivor 0
    d.loc[d["death"] == 1, "os_months"] /= 10
    with pytest.raises(CoxConvergenceError) as err:
        fit_cox(d, covariates=["age", "marker"])
    msg = str(err.value)
    assert "did not converge" in msg and "['marker']" in msg and "separated" in msg
    assert "--penalizer" in msg and "Coefficients not reported" in msg
    # the remedy works: with a ridge penalty the fit is finite and reported
    res = fit_cox(d, covariates=["age", "marker"], penalizer=0.1, cv_folds=0)
    assert np.isfinite(res.summary["coef"]).all()


def test_cox_collinear_columns_named():
    d = _toy()
    d["age_months"] = d["age"] * 12 + 3
    with pytest.raises(SurvivalInputError, match=r"collinear columns \['age', 'age_months'\].*rank 2 < 3.*--penalizer"):
        fit_cox(d, covariates=["age", "sorafenib", "age_months"])
    # with a ridge penalty the estimate is unique: fitted, and the collinearity is logged
    res = fit_cox(d, covariates=["age", "sorafenib", "age_months"], penalizer=0.5, cv_folds=0)
    assert np.isfinite(res.summary["coef"]).all() and len(res.summary) == 3


def test_cox_constant_column_named():
    d = _toy().assign(child_pugh_b=0)
    with pytest.raises(SurvivalInputError, match=r"constant column\(s\) \['child_pugh_b'\]"):
        fit_cox(d, covariates=["age", "child_pugh_b"])


def test_cox_no_events():
    d = _toy().assign(death=0)
    with pytest.raises(SurvivalInputError, match="no events: every death is 0 in the 40 rows fitted"):
        fit_cox(d, covariates=["age"])


def test_cox_bad_event_values_named():
    d = _toy()
    d.loc[3, "death"] = 2
    with pytest.raises(SurvivalInputError, match=r"death must be 0 or 1; rows \[3\] have \[2\]"):
        fit_cox(d, covariates=["age"])


def test_cox_cli_writes_contract_outputs(tmp_path, rossi):
    table = tmp_path / "rossi.csv"
    _with_classes(rossi).to_csv(table, index=False)
    out = tmp_path / "cox"
    text = cox_cli(str(table), str(out), "fin,age,cls", duration="week", event="arrest", categorical="cls", cv_folds=2)
    assert "C-index" in text
    summary = json.loads((out / "summary.json").read_text())
    assert {"concordance", "cv_concordance", "n", "events", "converged", "ph_violations"} <= set(summary)
    assert summary["n"] == 432 and summary["events"] == 114 and summary["converged"] is True
    table_out = pd.read_csv(out / "tables" / "cox_summary.csv")
    assert list(table_out.columns) == COX_COLUMNS
    assert list(table_out["covariate"]) == ["fin", "age", "cls[0]", "cls[1]", "cls[2]", "cls[3]"]
    for name in ("cox_forest", "schoenfeld"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
        assert (out / "tables" / f"{name}.csv").exists()
    forest = pd.read_csv(out / "tables" / "cox_forest.csv")
    assert len(forest) == 6 and np.allclose(forest["log_hr"], table_out["coef"])


def test_cox_cli_separation_exits_with_message_and_writes_nothing(tmp_path):
    d = _toy()
    d["marker"] = d["death"]
    d.loc[d["death"] == 1, "os_months"] /= 10
    d.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(SystemExit, match=r"cox: Cox fit did not converge: column\(s\) \['marker'\]"):
        cox_cli(str(tmp_path / "t.csv"), str(tmp_path / "out"), "age,marker")
    assert not (tmp_path / "out").exists()


def test_log_hazard_table_and_residuals_are_the_figures_data(rossi_fit):
    table = log_hazard_table(rossi_fit).set_index("covariate")
    for c in ROSSI_COVARIATES:
        assert table.loc[c, "log_hr"] == pytest.approx(R_COEF[c], abs=1e-3)
        assert table.loc[c, "log_hr_lower_95"] == pytest.approx(R_COEF[c] - 1.959964 * R_SE[c], abs=2e-3)
    resid = scaled_schoenfeld(rossi_fit)
    # one row per arrest, one column per design column, plus the death's time and its rank
    assert len(resid) == 114 and list(resid.columns) == ROSSI_COVARIATES + ["time", "rank_time"]
    assert resid["rank_time"].min() >= 1 and resid["rank_time"].max() <= 114


# ------------------------------------------------- the study's policy (from analysis.study)
def _separated(n: int = 40) -> pd.DataFrame:
    """Every death has marker 1, every survivor 0, and the deaths come first: perfect separation."""
    d = _toy(n)
    d["marker"] = d["death"].astype(float)
    d.loc[d["death"] == 1, "os_months"] /= 10
    return d


def test_paper_covariates_drops_empty_and_constant_with_a_warning(caplog):
    d = _toy().assign(dl_class=np.nan, sex=np.where(np.arange(40) % 2, "M", "F"), mrecist="PR",
                      radiomic_score=np.linspace(0, 1, 40))
    with caplog.at_level(logging.WARNING, logger="analysis.cox"):
        covariates, categorical = paper_covariates(d)
    assert covariates == ["age", "sex", "sorafenib", "radiomic_score"]
    # the categorical subset keeps only what is left: dl_class and mrecist are gone, sex stays
    assert categorical == ["sex"]
    assert "covariate dl_class left out: no values (empty for all 40 patients)" in caplog.text
    assert "covariate mrecist left out: one value (PR) for every patient" in caplog.text
    assert "age" not in caplog.text and "radiomic_score" not in caplog.text
    # a covariate the table lacks is named as a missing column
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="analysis.cox"):
        assert paper_covariates(d.drop(columns=["sex"]))[1] == []
    assert "covariate sex left out: no column 'sex' in the table" in caplog.text


def test_fit_cox_with_fallback_refits_with_01_and_records_it(tmp_path, caplog):
    d = _separated()
    with pytest.raises(CoxConvergenceError):
        fit_cox(d, covariates=["age", "marker"], cv_folds=0)
    with caplog.at_level(logging.WARNING, logger="analysis.cox"):
        res = fit_cox_with_fallback(d, covariates=["age", "marker"], cv_folds=0)
    assert FALLBACK_PENALIZER == 0.1 and res.penalizer == 0.1
    assert "Cox fit with penalizer 0 did not converge" in caplog.text
    assert "refitting with penalizer 0.1" in caplog.text
    assert res.penalizer_note.startswith("refitted with penalizer 0.1: the fit with penalizer 0 did not converge")
    # the refit is the penalised model itself, number for number
    direct = fit_cox(d, covariates=["age", "marker"], penalizer=0.1, cv_folds=0)
    pd.testing.assert_frame_equal(res.summary, direct.summary)
    assert direct.penalizer_note == ""
    # cox/summary.json records the penalty actually fitted and why
    from analysis.cox import write_cox_outputs

    summary = write_cox_outputs(res, tmp_path)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert summary["penalizer"] == on_disk["penalizer"] == 0.1
    assert "did not converge" in on_disk["penalizer_note"]


def test_fit_cox_with_fallback_reraises_when_the_penalty_is_already_there(monkeypatch):
    d = _separated()
    # penalizer >= fallback: the caller chose the penalty, no silent change of model
    with pytest.raises(CoxConvergenceError, match="did not converge"):
        fit_cox_with_fallback(d, covariates=["age", "marker"], penalizer=0.0, fallback_penalizer=0.0, cv_folds=0)
    with pytest.raises(CoxConvergenceError):
        fit_cox_with_fallback(d, covariates=["age", "marker"], fallback_penalizer=None, cv_folds=0)
    # a fit already at 0.1 that does not converge is raised after one try, not refitted at 0.1 again
    import analysis.cox as cox

    calls = []

    def failing(df, penalizer, **kwargs):
        calls.append(penalizer)
        raise CoxConvergenceError("Cox fit did not converge: column(s) ['marker'] look separated")

    monkeypatch.setattr(cox, "fit_cox", failing)
    with pytest.raises(CoxConvergenceError, match=r"\['marker'\]"):
        cox.fit_cox_with_fallback(d, covariates=["age", "marker"], penalizer=0.1)
    assert calls == [0.1]
    # and a refit that fails too is raised, after exactly two tries
    calls.clear()
    with pytest.raises(CoxConvergenceError):
        cox.fit_cox_with_fallback(d, covariates=["age", "marker"], penalizer=0.0)
    assert calls == [0.0, 0.1]
