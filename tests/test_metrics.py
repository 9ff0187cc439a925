"""analysis.metrics against hand-computed / sklearn reference cases and bootstrap invariants."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from analysis import metrics

CASES = json.loads((Path(__file__).parent / "data" / "metrics_cases.json").read_text())


def _same(a, b, tol=1e-12):
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)):
        return (a is None or math.isnan(a)) and (b is None or math.isnan(b))
    return abs(a - b) <= tol


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_reference_cases(case):
    y, p, exp = case["y_true"], case["y_prob"], case["expected"]
    absent = [k for k, v in enumerate(exp["auc_per_class"]) if v is None]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        per = metrics.per_class_auc(y, p)
    for k in range(4):
        assert _same(float(per[k]), exp["auc_per_class"][k]), (k, per[k], exp["auc_per_class"][k])
    warned = [str(w.message) for w in caught if issubclass(w.category, metrics.AbsentClassWarning)]
    assert len(warned) == len(absent)
    for k, msg in zip(absent, warned):
        assert msg.startswith(f"class {k}:")
    assert _same(metrics.macro_auc(y, p, warn=False), exp["macro_auc"])
    assert _same(metrics.accuracy(y, p), exp["accuracy"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.AbsentClassWarning)  # asserted above
        res = metrics.evaluate(y, p, n_boot=200, seed=0)
    assert [res["auc_per_class"][str(k)] for k in range(4)] == [
        None if v is None else pytest.approx(v, abs=1e-12) for v in exp["auc_per_class"]]


def test_hand_case_numbers():
    case = next(c for c in CASES if c["name"] == "hand_tiny")
    assert case["expected"]["auc_per_class"] == [0.875, 0.8125, 0.8, 1.0]
    assert case["expected"]["macro_auc"] == pytest.approx(0.871875)
    assert case["expected"]["accuracy"] == pytest.approx(4 / 6)


def test_absent_class_is_nan_never_zero_in_macro():
    y = [0, 0, 1, 1, 2, 2]
    p = np.array([[.7, .1, .1, .1], [.6, .2, .1, .1], [.1, .7, .1, .1],
                  [.2, .6, .1, .1], [.1, .1, .7, .1], [.1, .1, .6, .2]])
    with pytest.warns(metrics.AbsentClassWarning, match=r"class 3: one-vs-rest AUC undefined \(no sample"):
        per = metrics.per_class_auc(y, p)
    assert np.isnan(per[3]) and np.allclose(per[:3], 1.0)
    assert metrics.macro_auc(y, p, warn=False) == 1.0  # (1+1+1)/3, not (1+1+1+0)/4 = 0.75
    with pytest.warns(metrics.AbsentClassWarning, match="class 3"):
        res = metrics.evaluate(y, p, n_boot=100)
    assert res["auc_per_class"]["3"] is None and res["auc_ci"]["3"] is None
    json.dumps(res)  # JSON-clean: null, never NaN


def test_rank_auc_equals_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(50, 30)).astype(bool)
    s = np.round(rng.random((50, 30)), 1)  # heavy ties
    fast = metrics._rank_auc(y, s)
    ref = [roc_auc_score(y[i], s[i]) for i in range(50)]
    assert np.allclose(fast, ref, atol=1e-12)


def test_bootstrap_ci_brackets_point_and_narrows_with_n():
    rng = np.random.default_rng(1)

    def sample(n):
        y = np.arange(n) % 4
        logits = rng.normal(size=(n, 4)) + 1.5 * np.eye(4)[y]
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        return y, p

    widths = []
    for n in (40, 400):
        y, p = sample(n)
        res = metrics.evaluate(y, p, n_boot=1000, seed=0)
        lo, hi = res["macro_auc_ci"]
        assert lo < res["macro_auc"] < hi
        for k in range(4):
            clo, chi = res["auc_ci"][str(k)]
            assert clo <= res["auc_per_class"][str(k)] <= chi
        widths.append(hi - lo)
    # CI width scales ~ 1/sqrt(n): 10x the patients -> about 0.32x the width; allow up to 0.6x
    assert widths[1] < 0.6 * widths[0], widths


def test_bootstrap_is_seeded():
    case = CASES[0]
    a = metrics.evaluate(case["y_true"], case["y_prob"], n_boot=300, seed=7)
    b = metrics.evaluate(case["y_true"], case["y_prob"], n_boot=300, seed=7)
    c = metrics.evaluate(case["y_true"], case["y_prob"], n_boot=300, seed=8)
    assert a == b and a["macro_auc_ci"] != c["macro_auc_ci"]


def test_sensitivity_specificity_and_confusion_by_hand():
    y = [0, 0, 1, 2, 3, 3]
    pred = [0, 1, 1, 2, 3, 0]
    cm = metrics.confusion(y, pred)
    assert cm["true_class"].tolist() == [0, 1, 2, 3]
    assert cm.drop(columns="true_class").to_numpy().tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]]
    ss = metrics.sensitivity_specificity(y, pred)
    # class 0: TP 1, FN 1, FP 1 (a class-3 patient), TN 3 -> sens 0.5, spec 0.75
    assert ss.loc[0, "sensitivity"] == 0.5 and ss.loc[0, "specificity"] == 0.75
    # class 1: TP 1, FN 0, FP 1, TN 4 -> sens 1, spec 0.8
    assert ss.loc[1, "sensitivity"] == 1.0 and ss.loc[1, "specificity"] == 0.8


def test_paired_bootstrap_detects_better_model_and_not_identical():
    rng = np.random.default_rng(2)
    n = 120
    y = np.arange(n) % 4
    good = np.exp(rng.normal(size=(n, 4)) + 3 * np.eye(4)[y])
    good /= good.sum(1, keepdims=True)
    noise = rng.dirichlet(np.ones(4), size=n)
    cmp = metrics.paired_bootstrap_test(y, good, noise, n_boot=1000, seed=0).set_index("auc")
    assert cmp.loc["macro", "difference"] > 0.3
    assert cmp.loc["macro", "p_value"] < 0.01
    same = metrics.paired_bootstrap_test(y, good, good, n_boot=200).set_index("auc")
    assert (same["difference"] == 0).all() and (same["p_value"] == 1.0).all()


@pytest.mark.parametrize("y,p,msg", [
    ([0, 1], [[0.5, 0.5, 0, 0]], "y_true has shape"),
    ([0, 5], [[1, 0, 0, 0], [0, 1, 0, 0]], r"y_true holds labels \[5\]"),
    ([0, 1], [0.2, 0.8], "y_prob must be a 2-D array"),
    ([0, 1], [[np.nan, 1, 0, 0], [0, 1, 0, 0]], "NaN or infinite"),
])
def test_bad_input_messages(y, p, msg):
    with pytest.raises(ValueError, match=msg):
        metrics.per_class_auc(y, p)
