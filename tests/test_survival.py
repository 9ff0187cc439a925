"""Kaplan-Meier, log-rank and Cox against hand-computed and R reference values, and every refusal."""

from __future__ import annotations

import json
import logging
import math
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
from scipy.stats import chi2

from analysis.survival import (
    CoxConvergenceError,
    SurvivalInputError,
    cox_cli,
    fit_cox,
    kaplan_meier,
    km_cli,
    km_grid,
    logrank,
    variable_p_values,
)

LOGRANK_COLUMNS = ["method", "subgroup", "n", "n_groups", "test_statistic", "p_value", "skipped_reason"]
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


# ----------------------------------------------------------- Kaplan-Meier, by hand
# Group A: 1 death, 3 death, 4 censored, 6 death.  Group B: 2 death, 5 censored, 7 death, 8 death.
HAND = pd.DataFrame({"patient_id": [f"P{i}" for i in range(8)],
                     "os_months": [1, 3, 4, 6, 2, 5, 7, 8], "death": [1, 1, 0, 1, 1, 0, 1, 1],
                     "g": ["A"] * 4 + ["B"] * 4})


def test_kaplan_meier_hand_computed():
    # A: S(1) = 3/4; S(3) = 3/4 * 2/3 = 1/2; t=4 censored; S(6) = 1/2 * 0/1 = 0; median 3
    # B: S(2) = 3/4; t=5 censored; S(7) = 3/4 * 1/2 = 3/8; S(8) = 0; median 7 (first S <= 1/2)
    res = kaplan_meier(HAND, "os_months", "death", "g")
    sa = res.fitters["A"].survival_function_.iloc[:, 0]
    sb = res.fitters["B"].survival_function_.iloc[:, 0]
    assert list(sa.loc[[1.0, 3.0, 4.0, 6.0]]) == pytest.approx([3 / 4, 1 / 2, 1 / 2, 0.0], abs=1e-12)
    assert list(sb.loc[[2.0, 5.0, 7.0, 8.0]]) == pytest.approx([3 / 4, 3 / 4, 3 / 8, 0.0], abs=1e-12)
    med = res.medians.set_index("group")
    assert med.loc["A", "median_os_months"] == 3.0 and med.loc["B", "median_os_months"] == 7.0
    assert list(med["n"]) == [4, 4] and list(med["events"]) == [3, 3]
    curves = res.curves[res.curves["group"] == "B"].set_index("time")
    assert list(curves.loc[[0.0, 2.0, 5.0, 7.0, 8.0], "at_risk"]) == [4, 4, 3, 2, 1]


def test_logrank_hand_computed():
    # at each death time: E_A = n_A d / N, V = n_A n_B d (N - d) / (N^2 (N - 1))
    #   t=1: n_A 4, n_B 4 -> E 1/2, V 1/4      t=2: 3, 4 -> E 3/7, V 12/49
    #   t=3: 3, 3 -> E 1/2, V 1/4              t=6: 1, 2 -> E 1/3, V 2/9
    #   t=7, t=8: n_A 0 -> E 0, V 0
    # O_A = 3; chi2 = (O - E)^2 / V = (3 - 37/21)^2 / (0.96712...) = 1.584994
    E = Fraction(1, 2) + Fraction(3, 7) + Fraction(1, 2) + Fraction(1, 3)
    V = Fraction(1, 4) + Fraction(12, 49) + Fraction(1, 4) + Fraction(2, 9)
    stat = float((3 - E) ** 2 / V)
    assert stat == pytest.approx(1.584994, abs=1e-6)
    lr = logrank(HAND, "os_months", "death", "g")
    assert lr["test_statistic"] == pytest.approx(stat, abs=1e-9)
    assert lr["p_value"] == pytest.approx(chi2.sf(stat, 1), abs=1e-12)
    assert (lr["n"], lr["n_groups"], lr["skipped_reason"]) == (8, 2, "")


def test_empty_group_listed_not_plotted():
    res = kaplan_meier(HAND.assign(pred_class=[0, 0, 0, 0, 3, 3, 3, 3]), "os_months", "death", "pred_class")
    # pred_class is a known 4-class column: classes 1 and 2 have nobody
    assert res.empty_groups == [1, 2]
    assert set(res.fitters) == {0, 3}
    med = res.medians.set_index("group")
    assert list(med.index) == [0, 1, 2, 3]
    assert med.loc[1, "n"] == 0 and not med.loc[1, "plotted"] and med.loc[1, "note"] == "no patients: not plotted"
    assert res.logrank["n_groups"] == 2 and res.logrank["skipped_reason"] == ""


def test_single_nonempty_group_is_skipped_with_reason():
    lr = logrank(HAND.assign(g="A"), "os_months", "death", "g")
    assert lr["skipped_reason"] == "fewer than two non-empty groups (only A): log-rank test needs two"
    assert math.isnan(lr["p_value"]) and lr["n"] == 8 and lr["n_groups"] == 1


def test_no_events_subgroup_is_skipped_with_reason():
    lr = logrank(HAND.assign(death=0), "os_months", "death", "g")
    assert lr["skipped_reason"] == "no events (no deaths): log-rank test undefined"
    assert math.isnan(lr["test_statistic"])


def test_patients_without_group_are_logged_not_dropped_silently(caplog):
    d = HAND.assign(g=["A", "A", "NA", "A", "B", "", "B", "B"])
    with caplog.at_level(logging.WARNING):
        res = kaplan_meier(d, "os_months", "death", "g")
    assert res.unassigned == ["P2", "P5"]
    assert "2 patient(s) without a group value left out: P2, P5" in caplog.text
    assert res.logrank["n"] == 6


# ------------------------------------------------------------------ the Fig. 6 grid
def _clinical(n: int = 36, seed: int = 3) -> pd.DataFrame:
    """A small cohort where class 0 dies early and class 3 lives long; TACE+MWA has no class 2."""
    rng = np.random.default_rng(seed)
    cls = np.arange(n) % 4
    treatment = np.where(np.arange(n) % 3 == 0, "TACE+MWA", "TACE")
    treatment[cls == 2] = "TACE"
    os_m = rng.exponential(np.array([8, 16, 30, 60])[cls]).round(1) + 0.5
    death = (rng.uniform(size=n) < 0.8).astype(int)
    return pd.DataFrame({
        "patient_id": [f"P{i:03d}" for i in range(n)], "age": rng.integers(40, 85, n), "sex": rng.choice(["F", "M"], n),
        "treatment": treatment, "sorafenib": rng.integers(0, 2, n), "os_months": os_m, "death": death,
        "bclc": rng.choice(list("ABC"), n), "child_pugh": "A", "afp_ge_400": 0, "tumour_size": "3-5cm",
        "nodules_gt3": 0, "tace_cycles": 2, "imaging_high_risk": (cls % 2 == 0).astype(int),
        "mrecist": np.array(["CR", "PR", "SD", "PD"])[(cls + rng.integers(0, 2, n)) % 4]})


def test_km_grid_layout_and_tables(tmp_path):
    df = _clinical()
    df["pred_class"] = np.arange(len(df)) % 4
    df.loc[df["treatment"] == "TACE+MWA", "death"] = 0      # a subgroup with no events
    grid = km_grid(df, [("mRECIST", "mrecist"), ("ProgSwin-UNETR", "pred_class")], by="treatment",
                   out=tmp_path / "km")
    lr = pd.read_csv(tmp_path / "km" / "tables" / "logrank.csv", keep_default_na=False)
    assert list(lr.columns) == LOGRANK_COLUMNS
    assert list(zip(lr["method"], lr["subgroup"])) == [
        ("mRECIST", "all"), ("mRECIST", "TACE"), ("mRECIST", "TACE+MWA"),
        ("ProgSwin-UNETR", "all"), ("ProgSwin-UNETR", "TACE"), ("ProgSwin-UNETR", "TACE+MWA")]
    mwa = lr[lr["subgroup"] == "TACE+MWA"]
    assert (mwa["skipped_reason"] == "no events (no deaths): log-rank test undefined").all()
    assert (mwa["p_value"] == "").all()
    # the 'all' panel equals a direct lifelines test on the whole cohort
    from lifelines.statistics import multivariate_logrank_test

    direct = multivariate_logrank_test(df["os_months"], df["pred_class"], df["death"])
    row = lr[(lr["method"] == "ProgSwin-UNETR") & (lr["subgroup"] == "all")].iloc[0]
    assert float(row["p_value"]) == pytest.approx(direct.p_value, rel=1e-9)
    assert int(row["n"]) == 36 and int(row["n_groups"]) == 4
    # class 2 is empty in TACE+MWA: listed with n = 0, not plotted
    med = grid.medians
    empty = med[(med["method"] == "ProgSwin-UNETR") & (med["subgroup"] == "TACE+MWA") & (med["group"] == 2)]
    assert len(empty) == 1 and int(empty["n"].iloc[0]) == 0 and not bool(empty["plotted"].iloc[0])
    assert (tmp_path / "km" / "figures" / "km_grid.png").stat().st_size > 10_000
    assert (tmp_path / "km" / "tables" / "km_grid.csv").exists()
    summary = json.loads((tmp_path / "km" / "summary.json").read_text())
    assert summary["subgroups"] == ["all", "TACE", "TACE+MWA"] and summary["marker_months"] == 30.0


def test_km_cli_joins_group_files_and_lists_unassigned(tmp_path, caplog):
    df = _clinical(24)
    (tmp_path / "cohort").mkdir()
    df.to_csv(tmp_path / "cohort" / "clinical.csv", index=False)
    preds = pd.DataFrame({"patient_id": df["patient_id"][:-2], "fold": 0, "pred_class": (np.arange(22) % 4)})
    preds.to_csv(tmp_path / "oof.csv", index=False)
    with caplog.at_level(logging.WARNING):
        text = km_cli(str(tmp_path / "cohort" / "clinical.csv"),
                      f"mrecist,ProgSwin-UNETR={tmp_path / 'oof.csv'}:pred_class", str(tmp_path / "out"),
                      by="", marker_months=24, panels=True)
    assert "ProgSwin-UNETR" in text and "P022, P023" in caplog.text
    un = pd.read_csv(tmp_path / "out" / "tables" / "unassigned.csv")
    assert list(un["patient_id"]) == ["P022", "P023"] and set(un["method"]) == {"ProgSwin-UNETR"}
    lr = pd.read_csv(tmp_path / "out" / "tables" / "logrank.csv")
    assert lr.loc[(lr["method"] == "ProgSwin-UNETR") & (lr["subgroup"] == "all"), "n"].item() == 22
    assert lr.loc[(lr["method"] == "mRECIST") & (lr["subgroup"] == "all"), "n"].item() == 24
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["marker_months"] == 24
    # --panels: one figure (and its data) per panel beside the grid
    assert (tmp_path / "out" / "figures" / "km_ProgSwin-UNETR_all.png").exists()
    assert len(pd.read_csv(tmp_path / "out" / "tables" / "km_mRECIST_all.csv")) > 0


def test_km_cli_bad_group_file_message(tmp_path):
    df = _clinical(8)
    df.to_csv(tmp_path / "clinical.csv", index=False)
    pd.DataFrame({"patient_id": ["P000", "P000"], "pred_class": [0, 1]}).to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(SystemExit, match=r"dup.csv: patient_id repeated \(\['P000'\]\)"):
        km_cli(str(tmp_path / "clinical.csv"), f"{tmp_path / 'dup.csv'}:pred_class", str(tmp_path / "out"))
    pd.DataFrame({"patient_id": ["P000"], "pred_class": [0]}).to_csv(tmp_path / "one.csv", index=False)
    with pytest.raises(SystemExit, match=r"no column 'risk' \(found \['patient_id', 'pred_class'\]\)"):
        km_cli(str(tmp_path / "clinical.csv"), f"{tmp_path / 'one.csv'}:risk", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
