"""Kaplan-Meier and log-rank against hand-computed values, the Fig. 6 grid, the km verb and its refusals."""

from __future__ import annotations

import json
import logging
import math
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
from scipy.stats import chi2

from analysis.km import kaplan_meier, km_cli, km_grid, logrank

LOGRANK_COLUMNS = ["method", "subgroup", "n", "n_groups", "test_statistic", "p_value", "skipped_reason"]


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
    # without panels=True the grid is the only figure (the per-panel ones are opt-in)
    assert [f.name for f in (tmp_path / "km" / "figures").iterdir()] == ["km_grid.png"]
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
