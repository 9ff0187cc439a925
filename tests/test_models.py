"""analysis.models: selection transformer, no leakage, the classify outputs and their contracts."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.naive_bayes import GaussianNB

from analysis import metrics
from analysis import models as M


def _signal_data(n=48, p=30, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    X = rng.normal(size=(n, p))
    for k in range(3):
        X[:, k] += 2.0 * (y == k)
    X[:, 3] = X[:, 0] + 0.05 * rng.normal(size=n)  # near-duplicate of f0 (|r| ~ 0.999)
    ids = [f"P{i:03d}" for i in range(n)]
    feats = pd.DataFrame(X, columns=[f"f{j}" for j in range(p)])
    feats.insert(0, "patient_id", ids)
    return feats, y, ids


def _clinical(ids, classes):
    """clinical.csv rows whose os_months / death / imaging_high_risk give ``classes`` by the rule.

    None -> censored at 20 months (risk class undefined).
    """
    rows = []
    for pid, c in zip(ids, classes):
        if c is None:
            rows.append((pid, 20.0, 0, 1))
        else:
            rows.append((pid, 20.0 if c < 2 else 48.0, 1, int(c in (0, 2))))
    return pd.DataFrame(rows, columns=["patient_id", "os_months", "death", "imaging_high_risk"])


def test_selector_keeps_signal_and_prunes_correlated_pair():
    feats, y, _ = _signal_data()
    X = feats.drop(columns="patient_id").to_numpy()
    sel = M.RadiomicsSelector().fit(X, y)
    kept = set(sel.support_.tolist())
    assert {1, 2} <= kept and len(kept & {0, 3}) == 1  # one of the duplicated pair survives
    assert not sel.fallback_ and sel.best_C_ in sel.Cs
    (dropped, kept_for, r), = [d for d in sel.dropped_ if d[0] in (0, 3)]
    assert {dropped, kept_for} == {0, 3} and abs(r) > 0.99
    assert sel.transform(X).shape == (len(y), len(kept))
    with pytest.raises(ValueError, match="X has 5 features; the selector was fitted on 30"):
        sel.transform(X[:, :5])
    loose = M.RadiomicsSelector(corr_threshold=0.9999).fit(X, y)
    assert {0, 3} <= set(loose.support_.tolist()) or 3 not in loose.lasso_support_


def test_shared_selection_equals_separate_pipelines():
    feats, y, _ = _signal_data(n=40, p=12, seed=3)
    X = feats.drop(columns="patient_id")
    shared = M.fit_models(X, y, ["naive_bayes", "svm"])
    for m in ("naive_bayes", "svm"):
        alone = M.make_model(m).fit(X, y)
        assert np.allclose(alone.predict_proba(X), shared[m].predict_proba(X), atol=1e-12)


def test_no_leakage_noise_features_random_labels():
    """Pure noise, random labels: cross-validated macro AUC must stay near 0.5.

    Under the null, the AUC of one class (20 positives, 60 negatives) has SD
    sqrt((n+1)/(12 n1 n0)) = 0.075; the macro over 4 classes ~0.04; so each model must lie within
    0.5 +/- 0.15 (~3.5 SD) and the mean of the five within 0.5 +/- 0.08 (~2 SD of one model).
    The same selection fitted on all patients before the CV (leakage) lifts naive Bayes to
    ~0.65-0.75 on this data, beyond the tolerance: the test would catch it.
    """
    rng = np.random.default_rng(0)
    n, p = 80, 200
    y = pd.Series(rng.permutation(np.arange(n) % 4), index=[f"P{i}" for i in range(n)])
    X = pd.DataFrame(rng.normal(size=(n, p)), index=y.index, columns=[f"f{j}" for j in range(p)])
    preds, selected = M.predict_design(X, y, "cv4", seed=0)
    aucs = {m: metrics.macro_auc(pr["label"], pr[M.PROB_COLUMNS].to_numpy()) for m, pr in preds.items()}
    assert all(abs(a - 0.5) < 0.15 for a in aucs.values()), aucs
    assert abs(np.mean(list(aucs.values())) - 0.5) < 0.08, aucs
    assert sorted(selected["fold"].unique()) == [0, 1, 2, 3]
    # the leaky counterpart, to show the tolerance separates honest from leaky
    sel = M.RadiomicsSelector().fit(X.to_numpy(), y.to_numpy())
    leak = cross_val_predict(GaussianNB(), X.to_numpy()[:, sel.support_], y,
                             cv=StratifiedKFold(4, shuffle=True, random_state=0), method="predict_proba")
    assert metrics.macro_auc(y, leak) > 0.5 + 0.15


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    feats, y, ids = _signal_data()
    tmp = tmp_path_factory.mktemp("classify")
    extra = feats.iloc[:2].copy()
    extra["patient_id"] = ["ORPHAN", "CENSORED"]  # no clinical row; undefined risk class
    pd.concat([feats, extra]).to_csv(tmp / "features.csv", index=False)
    clin = _clinical([*ids, "CENSORED", "NOFEAT"], [*y, None, 1])
    clin.to_csv(tmp / "clinical.csv", index=False)
    # a deep model that is nearly right, missing 4 patients
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(len(y), 4)) + 4 * np.eye(4)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    dl = pd.DataFrame(probs, columns=M.PROB_COLUMNS)
    dl.insert(0, "fold", np.arange(len(y)) % 4)
    dl.insert(0, "patient_id", ids)
    dl["pred_class"] = probs.argmax(1)
    dl.iloc[4:].to_csv(tmp / "oof.csv", index=False)
    out = tmp / "out"
    msg = M.classify_cli(str(tmp / "features.csv"), str(tmp / "clinical.csv"), str(out),
                         dl_predictions=str(tmp / "oof.csv"), n_boot=300)
    return out, msg, y, ids


def test_classify_outputs_and_summary_contract(run):
    out, msg, _, _ = run
    assert msg.startswith("48 patients (3 excluded)")
    s = json.loads((out / "summary.json").read_text())
    assert s["design"] == "cv4" and s["score_model"] == "naive_bayes"
    assert list(s["models"]) == list(M.MODEL_NAMES)
    for res in s["models"].values():
        assert set(res) >= {"macro_auc", "macro_auc_ci", "auc_per_class", "accuracy"}
        assert res["macro_auc_ci"][0] <= res["macro_auc"] <= res["macro_auc_ci"][1]
        assert set(res["auc_per_class"]) == {"0", "1", "2", "3"}
    # three informative classes: the best model must find them
    assert max(r["macro_auc"] for r in s["models"].values()) > 0.75
    assert set(s["other_designs"]["split75"]) == set(M.MODEL_NAMES)
    assert s["other_designs"]["split75"]["naive_bayes"]["n"] == 12  # 25 % of 48
    for f in ("figures/roc_cv4.png", "figures/roc_split75.png", "figures/confusion_cv4.png", "tables/confusion_cv4.csv", "figures/pca_3d.png",
              "figures/correlation_heatmap.png", "tables/roc_cv4.csv", "tables/pca_3d.csv",
              "tables/correlation_heatmap.csv", "tables/metrics.csv", "tables/confusion.csv",
              "tables/selected_features.csv", "tables/selected_features_per_split.csv"):
        assert (out / f).is_file(), f
    roc = pd.read_csv(out / "tables" / "roc_cv4.csv")
    assert set(roc["model"]) == {"dl", *M.MODEL_NAMES}
    conf = pd.read_csv(out / "tables" / "confusion.csv")
    cv_nb = conf[(conf.design == "cv4") & (conf.model == "naive_bayes")]
    assert cv_nb[[f"pred_{k}" for k in range(4)]].to_numpy().sum() == 48


def test_predictions_cover_every_patient_once(run):
    out, _, _, ids = run
    for m in M.MODEL_NAMES:
        pr = pd.read_csv(out / "predictions" / f"cv4_{m}.csv")
        assert list(pr.columns[:7]) == ["patient_id", "fold", "prob_0", "prob_1", "prob_2", "prob_3", "pred_class"]
        assert sorted(pr["patient_id"]) == sorted(ids)
        assert np.allclose(pr[M.PROB_COLUMNS].sum(1), 1.0)
        assert set(pr["fold"]) == {0, 1, 2, 3}
        assert (pr["pred_class"] == pr[M.PROB_COLUMNS].to_numpy().argmax(1)).all()
        test = pd.read_csv(out / "predictions" / f"split75_{m}.csv")
        assert len(test) == 12 and sorted(test["label"].value_counts()) == [3, 3, 3, 3]


def test_radiomic_score_is_naive_bayes_oof_short_survival_probability(run):
    out, *_ = run
    score = pd.read_csv(out / "radiomic_score.csv")
    nb = pd.read_csv(out / "predictions" / "cv4_naive_bayes.csv")
    assert list(score.columns[:3]) == ["patient_id", "radiomic_score", "pred_class"]
    merged = score.merge(nb, on="patient_id", suffixes=("", "_nb"))
    assert len(merged) == 48
    assert np.allclose(merged["radiomic_score"], merged["prob_0_nb"] + merged["prob_1_nb"])
    assert (score["radiomic_score"].between(0, 1)).all()


def test_excluded_patients_listed_with_reason(run):
    out, *_ = run
    exc = pd.read_csv(out / "tables" / "excluded.csv").set_index("patient_id")["reason"]
    assert exc.to_dict() == {
        "ORPHAN": "in features but not in clinical.csv",
        "NOFEAT": "no radiomic features (see features_errors.csv)",
        "CENSORED": "risk_class undefined (censored before 36 months)",
    }


def test_dl_comparison_paired_bootstrap(run):
    out, *_ = run
    comp = pd.read_csv(out / "tables" / "dl_comparison.csv")
    assert set(comp["model"]) == set(M.MODEL_NAMES) and set(comp["design"]) == {"cv4", "split75"}
    cv_macro = comp[(comp.design == "cv4") & (comp.auc == "macro")]
    assert (cv_macro["n"] == 44).all()  # 4 patients have no deep-model prediction
    assert (cv_macro["auc_dl"] > 0.95).all() and (cv_macro["difference"] < 0).all()
    assert ((cv_macro["p_value"] > 0) & (cv_macro["p_value"] <= 1)).all()
    s = json.loads((out / "summary.json").read_text())
    assert s["dl"]["cv4"]["n"] == 44
    assert set(s["dl_comparison"]) == set(M.MODEL_NAMES)


def test_absent_class_gives_null_auc(tmp_path, caplog):
    feats, y, ids = _signal_data(n=36, p=10)
    keep = y != 3
    f = feats[keep]
    clin = pd.DataFrame({"patient_id": np.array(ids)[keep], "risk_class": y[keep]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = M.evaluate_models(f, clin, design="cv4", models=["naive_bayes"], n_boot=100)
    nb = res["summary"]["models"]["naive_bayes"]
    assert nb["auc_per_class"]["3"] is None and nb["auc_ci"]["3"] is None
    assert nb["macro_auc"] == pytest.approx(np.mean([nb["auc_per_class"][k] for k in "012"]))
    assert "class 3 has no patient: its AUC is reported as null" in caplog.text


def test_bad_inputs(tmp_path):
    feats, y, ids = _signal_data(n=16, p=5)
    clin = pd.DataFrame({"patient_id": ids, "risk_class": y})
    with pytest.raises(ValueError, match="model 'lasso' is not known; expected one of naive_bayes"):
        M.evaluate_models(feats, clin, models=["lasso"])
    with pytest.raises(ValueError, match="--design 'cv5'"):
        M.evaluate_models(feats, clin, design="cv5")
    with pytest.raises(ValueError, match=r"--features: patient_id repeated: \['P000'\]"):
        M.evaluate_models(pd.concat([feats, feats.iloc[:1]]), clin)
    with pytest.raises(ValueError, match="--features: no patient_id column"):
        M.evaluate_models(feats.drop(columns="patient_id"), clin)
    bad = tmp_path / "oof.csv"
    pd.DataFrame({"patient_id": ids, "prob_0": 1.0}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match=r"oof.csv: missing columns \['prob_1', 'prob_2', 'prob_3'\]"):
        M.read_dl_predictions(bad)
    pd.DataFrame({"patient_id": ids, **{c: 0.5 for c in M.PROB_COLUMNS}}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match=r"rows of \['P000', .* do not sum to 1"):
        M.read_dl_predictions(bad)
    with pytest.raises(ValueError, match="only 6 labelled patients"):
        M.evaluate_models(feats.iloc[:6], clin)


def test_cli_bad_input_is_one_line_exit(tmp_path):
    with pytest.raises(SystemExit, match=r"^classify: --features .*nope.csv: no such file"):
        M.classify_cli(str(tmp_path / "nope.csv"), str(tmp_path / "clinical.csv"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
