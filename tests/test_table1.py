"""Table 1: counts, percentages and p-values on hand-made tables, and the paper's own counts."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.table1 import table1, table1_cli


def _hand_table() -> pd.DataFrame:
    """20 patients: 12 TACE, 8 TACE+MWA, one extra without treatment."""
    tace = {
        "sex": ["F"] * 2 + ["M"] * 10,
        "bclc": ["A"] * 2 + ["B"] * 6 + ["C"] * 4,
        "child_pugh": ["A"] * 6 + ["B"] * 4 + ["NA"] * 2,
        "age": [50, 52, 54, 56, 58, 60, 62, 64, 66, 68, 70, 72],
        "sorafenib": [1] * 3 + [0] * 9,
    }
    mwa = {
        "sex": ["F"] * 4 + ["M"] * 4,
        "bclc": ["A"] * 4 + ["B"] * 3 + ["C"] * 1,
        "child_pugh": ["A"] * 2 + ["B"] * 4 + ["NA"] * 2,
        "age": [60, 62, 64, 66, 68, 70, 72, 80],
        "sorafenib": [0] * 8,
    }
    frame = pd.concat([pd.DataFrame(tace).assign(treatment="TACE"), pd.DataFrame(mwa).assign(treatment="TACE+MWA")])
    extra = {"sex": "M", "bclc": "A", "child_pugh": "A", "age": 99, "sorafenib": 0, "treatment": ""}
    frame = pd.concat([frame, pd.DataFrame([extra])])
    frame.insert(0, "patient_id", [f"P{i:02d}" for i in range(len(frame))])
    return frame.reset_index(drop=True)


def _row(table, characteristic, level=""):
    hit = table[table.characteristic.str.startswith(characteristic) & (table.level == level)]
    assert len(hit) == 1, (characteristic, level)
    return hit.iloc[0]


def test_hand_made_counts_and_p_values():
    table = table1(_hand_table())
    summary = table.attrs["summary"]
    assert list(table.columns) == ["characteristic", "level", "overall", "TACE", "TACE+MWA", "p_value"]
    assert _row(table, "patients, n")[["overall", "TACE", "TACE+MWA"]].tolist() == ["20", "12", "8"]
    assert summary["excluded_patients"] == ["P20"]  # no treatment: left out and listed

    # sex 2x2 [[2, 4], [10, 4]], Yates: chi2 = N (|ad - bc| - N/2)^2 / (r1 r2 c1 c2) = 20 * 22^2 / 8064
    assert _row(table, "Sex", "Female")[["overall", "TACE", "TACE+MWA"]].tolist() == ["6 (30.0)", "2 (16.7)", "4 (50.0)"]
    chi2 = 20 * 22 ** 2 / (6 * 14 * 12 * 8)
    assert _row(table, "Sex").p_value == pytest.approx(math.erfc(math.sqrt(chi2 / 2)), rel=1e-9)  # = 0.2733
    assert _row(table, "Sex").p_value == pytest.approx(0.2733, abs=1e-4)

    # BCLC 3x2, no correction: chi2 = 25/9 by hand (expected 3.6/2.4, 5.4/3.6, 3.0/2.0); df 2 -> p = exp(-chi2/2)
    assert _row(table, "BCLC", "C")[["overall", "TACE", "TACE+MWA"]].tolist() == ["5 (25.0)", "4 (33.3)", "1 (12.5)"]
    assert _row(table, "BCLC").p_value == pytest.approx(math.exp(-25 / 9 / 2), rel=1e-9)  # 0.2494

    # Child-Pugh: N/A shown (denominator includes it) but tested on A/B only:
    # [[6, 2], [4, 4]], Yates: 16 (16 - 8)^2 / (8 * 8 * 10 * 6) = 4/15
    assert _row(table, "Child-Pugh", "N/A")[["overall", "TACE", "TACE+MWA"]].tolist() == ["4 (20.0)", "2 (16.7)", "2 (25.0)"]
    assert _row(table, "Child-Pugh", "A").TACE == "6 (50.0)"
    assert _row(table, "Child-Pugh").p_value == pytest.approx(math.erfc(math.sqrt(4 / 15 / 2)), rel=1e-9)
    assert any("Child-Pugh" in n and "4 N/A" in n for n in summary["notes"])

    # age: Student t with pooled variance, by hand
    a = np.arange(50, 73, 2, dtype=float)
    b = np.array([60, 62, 64, 66, 68, 70, 72, 80], dtype=float)
    sp2 = ((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2)
    t = (a.mean() - b.mean()) / math.sqrt(sp2 * (1 / len(a) + 1 / len(b)))
    age = _row(table, "Age")
    assert age.p_value == pytest.approx(2 * stats.t.sf(abs(t), len(a) + len(b) - 2), rel=1e-9)
    # by hand: TACE 61, SS 572 -> SD sqrt(52) = 7.21; MWA 542/8 = 67.75, SS 283.5 -> sqrt(40.5) = 6.36;
    # overall 1274/20 = 63.7, SS 572 + 12 * 2.7^2 + 283.5 + 8 * 4.05^2 = 1074.2 -> sqrt(1074.2/19) = 7.52
    assert (age.overall, age.TACE, age["TACE+MWA"]) == ("63.7 (7.5)", "61.0 (7.2)", "67.8 (6.4)")
    assert summary["tests"]["Age at diagnosis, mean (SD)"] == "Student t-test (equal variances)"
    assert summary["tests"]["Sex, n (%)"] == "Pearson chi-square with Yates correction"
    assert summary["tests"]["BCLC stage at initial diagnosis, n (%)"] == "Pearson chi-square"

    # sorafenib: No/Yes with 0/1 mapped; tumour size etc. absent -> not shown, listed
    assert _row(table, "Sorafenib", "Yes")[["overall", "TACE", "TACE+MWA"]].tolist() == ["3 (15.0)", "3 (25.0)", "0 (0.0)"]
    assert "tumour_size" in summary["rows_without_data"] and "aetiology" in summary["rows_without_data"]


def test_paper_counts_reproduce_published_p_values():
    """Table 1 of the paper: sex p = 0.081 (Yates), BCLC 0.012, tumour size 0.001."""
    def col(groups):
        return [v for v, n in groups for _ in range(n)]
    tace = pd.DataFrame({"sex": col([("F", 23), ("M", 87)]), "bclc": col([("A", 23), ("B", 63), ("C", 24)]),
                         "tumour_size": col([("<3cm", 51), ("3-5cm", 40), (">5cm", 19)])}).assign(treatment="TACE")
    mwa = pd.DataFrame({"sex": col([("F", 7), ("M", 64)]), "bclc": col([("A", 29), ("B", 33), ("C", 9)]),
                        "tumour_size": col([("<3cm", 51), ("3-5cm", 17), (">5cm", 3)])}).assign(treatment="TACE+MWA")
    frame = pd.concat([tace, mwa], ignore_index=True)
    frame.insert(0, "patient_id", [f"P{i}" for i in range(len(frame))])
    table = table1(frame)
    assert _row(table, "patients, n")[["overall", "TACE", "TACE+MWA"]].tolist() == ["181", "110", "71"]
    assert _row(table, "Sex", "Female")[["overall", "TACE", "TACE+MWA"]].tolist() == ["30 (16.6)", "23 (20.9)", "7 (9.9)"]
    assert _row(table, "BCLC", "B")[["overall", "TACE", "TACE+MWA"]].tolist() == ["96 (53.0)", "63 (57.3)", "33 (46.5)"]
    assert round(_row(table, "Sex").p_value, 3) == 0.081
    assert round(_row(table, "BCLC").p_value, 3) == 0.012
    assert round(_row(table, "Tumour size").p_value, 3) == 0.001


def test_cli_with_mrecist_join_and_errors(tmp_path):
    rows = []
    for i in range(8):
        rows.append({"patient_id": f"P{i}", "age": 60 + i, "sex": "MF"[i % 2],
                     "treatment": ["TACE", "TACE+MWA"][i % 2], "sorafenib": i % 2, "os_months": 20 + i,
                     "death": 1, "bclc": "ABC"[i % 3], "child_pugh": "A", "afp_ge_400": 0, "tumour_size": "<3cm",
                     "nodules_gt3": 0, "tace_cycles": 1 + i % 3, "imaging_high_risk": i % 2})
    pd.DataFrame(rows).to_csv(tmp_path / "clinical.csv", index=False)
    # P7 (TACE+MWA) has no mRECIST row -> N/A; P6 (TACE) is "NA" (non-measurable) -> N/A
    pd.DataFrame({"patient_id": [f"P{i}" for i in range(7)],
                  "best_response": ["CR", "PR", "PR", "SD", "PD", "PD", "NA"]}).to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "t1" / "table1.csv"
    table1_cli(str(tmp_path / "clinical.csv"), out=str(out), mrecist=str(tmp_path / "m.csv"))
    table = pd.read_csv(out, keep_default_na=False)
    assert _row(table, "mRECIST", "N/A")[["overall", "TACE", "TACE+MWA"]].tolist() == ["2 (25.0)", "1 (25.0)", "1 (25.0)"]
    assert _row(table, "mRECIST", "PR")[["overall", "TACE", "TACE+MWA"]].tolist() == ["2 (25.0)", "1 (25.0)", "1 (25.0)"]
    # cycles 1,2,3,1,2,3,1,2: mean 15/8 = 1.875, SS 4.875 -> SD sqrt(4.875/7) = 0.83
    assert _row(table, "Number of TACE cycles").overall == "1.9 (0.8)"
    summary = json.loads((tmp_path / "t1" / "summary.json").read_text())
    assert summary["groups"] == {"TACE": 4, "TACE+MWA": 4}
    assert any("no result for P7" in n for n in summary["notes"])
    # single Child-Pugh level: shown, no test, reason noted
    assert _row(table, "Child-Pugh").p_value == ""
    assert any(n.startswith("Child-Pugh class at initial diagnosis, n (%): no test") for n in summary["notes"])

    with pytest.raises(ValueError, match=r"group column 'arm' not in the clinical table"):
        table1(pd.DataFrame(rows), group="arm")
    with pytest.raises(ValueError, match=r"mRECIST table lacks column 'best_response'"):
        table1(pd.DataFrame(rows), mrecist=pd.DataFrame({"patient_id": ["P1"], "response": ["CR"]}))


def test_cli_bad_group_is_one_line(tmp_path):
    pd.DataFrame({"patient_id": ["P1"], "age": [60], "os_months": [10], "death": [1],
                  "imaging_high_risk": [0]}).to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(SystemExit, match=r"table1: .*c.csv row 1 \(header\): column 'treatment' not found"):
        table1_cli(str(tmp_path / "c.csv"), out=str(tmp_path / "t.csv"))
    assert not (tmp_path / "t.csv").exists()
