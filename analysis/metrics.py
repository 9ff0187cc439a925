"""Classification metrics shared by every part of the project that reports AUC.

The 4-class risk problem is scored one-vs-rest per class (paper Appendix 6) and by the macro
average over the classes that are *present* in ``y_true``. A class with no positive (or no
negative) sample has no defined AUC: it is reported as NaN with a warning naming the class, and
it is left out of the macro average rather than counted as 0 or 0.5.

Confidence intervals are percentile bootstraps over patients (seeded, >= 1000 resamples by
default). Resamples in which a class happens to be absent are skipped for that class only.

The prognosis bundle keeps a self-contained copy of these formulas; both are tested against the
cases in ``tests/data/metrics_cases.json``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.metrics import confusion_matrix as _sk_confusion_matrix
from sklearn.metrics import roc_auc_score

NUM_CLASSES = 4
DEFAULT_N_BOOT = 1000


class AbsentClassWarning(UserWarning):
    """A class has no positive or no negative sample, so its one-vs-rest AUC is undefined."""


# ------------------------------------------------------------------------------------ inputs
def _check(y_true, y_prob, n_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(y_prob, dtype=float)
    if p.ndim != 2:
        raise ValueError(f"y_prob must be a 2-D array (n_samples, n_classes); got shape {p.shape}")
    if n_classes is not None and p.shape[1] != n_classes:
        raise ValueError(f"y_prob has {p.shape[1]} columns; expected {n_classes} (one per class)")
    if y.ndim != 1 or len(y) != len(p):
        raise ValueError(f"y_true has shape {y.shape}; expected ({len(p)},) to match y_prob rows")
    if len(y) and (not np.all(np.isfinite(y.astype(float))) or np.any(y.astype(float) % 1 != 0)):
        raise ValueError("y_true must hold integer class labels without missing values")
    y = y.astype(int)
    bad = sorted(set(y.tolist()) - set(range(p.shape[1])))
    if bad:
        raise ValueError(f"y_true holds labels {bad}; expected classes 0..{p.shape[1] - 1}")
    if not np.all(np.isfinite(p)):
        raise ValueError("y_prob holds NaN or infinite values")
    return y, p


def present_classes(y_true, n_classes: int = NUM_CLASSES) -> list[int]:
    """Classes whose one-vs-rest AUC is defined: at least one positive and one negative."""
    y = np.asarray(y_true).astype(int)
    return [k for k in range(n_classes) if 0 < np.sum(y == k) < len(y)]


# ------------------------------------------------------------------------------- point values
def per_class_auc(y_true, y_prob, warn: bool = True) -> np.ndarray:
    """One-vs-rest AUC per class (sklearn ``roc_auc_score``); NaN where the class is absent."""
    y, p = _check(y_true, y_prob)
    out = np.full(p.shape[1], np.nan)
    present = set(present_classes(y, p.shape[1]))
    for k in range(p.shape[1]):
        if k in present:
            out[k] = roc_auc_score((y == k).astype(int), p[:, k])
        elif warn:
            n_pos = int(np.sum(y == k))
            why = "no sample of it" if n_pos == 0 else "every sample is of it"
            warnings.warn(f"class {k}: one-vs-rest AUC undefined ({why} among {len(y)}); reported as NaN",
                          AbsentClassWarning, stacklevel=2)
    return out


def macro_auc(y_true, y_prob, warn: bool = True) -> float:
    """Unweighted mean of the per-class AUCs of the classes present; NaN when none is."""
    aucs = per_class_auc(y_true, y_prob, warn=warn)
    return float(np.nanmean(aucs)) if np.any(np.isfinite(aucs)) else float("nan")


def predicted_class(y_prob) -> np.ndarray:
    return np.argmax(np.asarray(y_prob, dtype=float), axis=1)


def accuracy(y_true, y_prob) -> float:
    y, p = _check(y_true, y_prob)
    return float(np.mean(predicted_class(p) == y)) if len(y) else float("nan")


def confusion(y_true, y_pred, n_classes: int = NUM_CLASSES) -> pd.DataFrame:
    """Confusion matrix, rows = true class (column ``true_class``), columns ``pred_<k>`` =
    predicted class, every class listed; the bundle's confusion.csv has the same layout."""
    labels = list(range(n_classes))
    cm = _sk_confusion_matrix(np.asarray(y_true).astype(int), np.asarray(y_pred).astype(int), labels=labels)
    frame = pd.DataFrame(cm, columns=[f"pred_{k}" for k in labels])
    frame.insert(0, "true_class", labels)
    return frame


def sensitivity_specificity(y_true, y_pred, n_classes: int = NUM_CLASSES) -> pd.DataFrame:
    """Per class (one-vs-rest): n_true, sensitivity = TP/(TP+FN), specificity = TN/(TN+FP).

    NaN where the denominator is zero (no positive, or no negative, sample of the class).
    """
    cm = confusion(y_true, y_pred, n_classes).drop(columns="true_class").to_numpy()
    rows = []
    total = cm.sum()
    for k in range(n_classes):
        tp = cm[k, k]
        fn = cm[k].sum() - tp
        fp = cm[:, k].sum() - tp
        tn = total - tp - fn - fp
        rows.append({
            "class": k,
            "n_true": int(tp + fn),
            "sensitivity": tp / (tp + fn) if tp + fn else np.nan,
            "specificity": tn / (tn + fp) if tn + fp else np.nan,
        })
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------- bootstrap
def _rank_auc(pos_mask: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC for each row (ties count 1/2), equal to ``roc_auc_score``.

    ``pos_mask`` and ``scores`` are (n_boot, n). Rows without a positive or a negative give NaN.
    Vectorised over resamples so 1000 bootstrap draws take milliseconds.
    """
    ranks = rankdata(scores, axis=1)  # average ranks for ties
    n_pos = pos_mask.sum(axis=1)
    n_neg = pos_mask.shape[1] - n_pos
    sum_pos = np.where(pos_mask, ranks, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (sum_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def bootstrap_indices(n: int, n_boot: int = DEFAULT_N_BOOT, seed: int = 0) -> np.ndarray:
    """(n_boot, n) indices of patient resamples with replacement, reproducible from ``seed``."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1; got {n_boot}")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_aucs(y_true, y_prob, n_boot: int = DEFAULT_N_BOOT, seed: int = 0,
                   indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-class AUCs (n_boot, n_classes) and macro AUCs (n_boot,) over bootstrap resamples.

    The macro AUC of a resample averages the classes defined in that resample *and* in the full
    sample, so a class absent from the data never enters any resample's macro value.
    """
    y, p = _check(y_true, y_prob)
    idx = bootstrap_indices(len(y), n_boot, seed) if indices is None else np.asarray(indices)
    yb = y[idx]
    per = np.column_stack([_rank_auc(yb == k, p[:, k][idx]) for k in range(p.shape[1])])
    present = present_classes(y, p.shape[1])
    per[:, [k for k in range(p.shape[1]) if k not in present]] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        macro = np.nanmean(per, axis=1) if present else np.full(len(idx), np.nan)
    return per, macro


def percentile_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return (float("nan"), float("nan"))
    a = (1 - level) / 2
    return (float(np.quantile(v, a)), float(np.quantile(v, 1 - a)))


def evaluate(y_true, y_prob, n_boot: int = DEFAULT_N_BOOT, seed: int = 0, level: float = 0.95) -> dict:
    """Headline numbers in the ``metrics.json`` layout of docs/contracts.md.

    ``{"auc_per_class": {"0": x|None, ...}, "auc_ci": {"0": [lo, hi]|None, ...}, "macro_auc": x,
    "macro_auc_ci": [lo, hi], "accuracy": x, "n": n}``; absent classes are ``None``.
    """
    y, p = _check(y_true, y_prob)
    aucs = per_class_auc(y, p)
    per_b, macro_b = bootstrap_aucs(y, p, n_boot=n_boot, seed=seed)
    out: dict = {"auc_per_class": {}, "auc_ci": {}}
    for k in range(p.shape[1]):
        if np.isfinite(aucs[k]):
            out["auc_per_class"][str(k)] = float(aucs[k])
            out["auc_ci"][str(k)] = list(percentile_ci(per_b[:, k], level))
        else:
            out["auc_per_class"][str(k)] = None
            out["auc_ci"][str(k)] = None
    m = macro_auc(y, p, warn=False)
    out["macro_auc"] = m if np.isfinite(m) else None
    out["macro_auc_ci"] = list(percentile_ci(macro_b, level)) if np.isfinite(m) else None
    out["accuracy"] = accuracy(y, p)
    out["n"] = len(y)
    return out


def paired_bootstrap_test(y_true, prob_a, prob_b, n_boot: int = DEFAULT_N_BOOT, seed: int = 0,
                          level: float = 0.95) -> pd.DataFrame:
    """Compare two models' AUCs on the same patients by a paired bootstrap.

    Both models are scored on the *same* resamples; the two-sided p-value is twice the smaller
    tail of the bootstrap distribution of AUC(a) - AUC(b) around 0, with the +1 correction so it
    is never exactly 0 (p >= 2/(n_boot+1)). One row per class and one for ``macro``.
    """
    y, pa = _check(y_true, prob_a)
    _, pb = _check(y_true, prob_b, n_classes=pa.shape[1])
    idx = bootstrap_indices(len(y), n_boot, seed)
    per_a, mac_a = bootstrap_aucs(y, pa, indices=idx)
    per_b, mac_b = bootstrap_aucs(y, pb, indices=idx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AbsentClassWarning)
        auc_a = np.append(per_class_auc(y, pa), macro_auc(y, pa))
        auc_b = np.append(per_class_auc(y, pb), macro_auc(y, pb))
    diffs = np.column_stack([per_a - per_b, mac_a - mac_b])
    names: list[str] = [str(k) for k in range(pa.shape[1])] + ["macro"]
    rows = []
    for j, name in enumerate(names):
        d = diffs[:, j]
        d = d[np.isfinite(d)]
        if not np.isfinite(auc_a[j]) or len(d) == 0:
            p_value, lo, hi = np.nan, np.nan, np.nan
        else:
            tail = min(np.sum(d <= 0), np.sum(d >= 0))
            p_value = min(1.0, 2 * (tail + 1) / (len(d) + 1))
            lo, hi = percentile_ci(d, level)
        rows.append({"auc": name, "auc_a": auc_a[j], "auc_b": auc_b[j], "difference": auc_a[j] - auc_b[j],
                     "diff_ci_lower": lo, "diff_ci_upper": hi, "p_value": p_value, "n_boot": len(d)})
    return pd.DataFrame(rows)


def metrics_table(y_true, y_prob, n_boot: int = DEFAULT_N_BOOT, seed: int = 0,
                  result: dict | None = None) -> pd.DataFrame:
    """Long table: one row per class plus ``macro``, with AUC, CI, sensitivity, specificity.

    ``result``: an :func:`evaluate` output for the same data, to avoid bootstrapping twice.
    """
    res = result if result is not None else evaluate(y_true, y_prob, n_boot=n_boot, seed=seed)
    ss = sensitivity_specificity(y_true, predicted_class(y_prob), np.asarray(y_prob).shape[1])
    rows = []
    for k in range(np.asarray(y_prob).shape[1]):
        ci = res["auc_ci"][str(k)] or [np.nan, np.nan]
        auc = res["auc_per_class"][str(k)]
        rows.append({"class": str(k), "auc": np.nan if auc is None else auc, "auc_ci_lower": ci[0],
                     "auc_ci_upper": ci[1], "sensitivity": ss.loc[k, "sensitivity"],
                     "specificity": ss.loc[k, "specificity"], "n_true": ss.loc[k, "n_true"]})
    ci = res["macro_auc_ci"] or [np.nan, np.nan]
    rows.append({"class": "macro", "auc": np.nan if res["macro_auc"] is None else res["macro_auc"],
                 "auc_ci_lower": ci[0], "auc_ci_upper": ci[1],
                 "sensitivity": float(np.nanmean(ss["sensitivity"])) if ss["sensitivity"].notna().any() else np.nan,
                 "specificity": float(np.nanmean(ss["specificity"])) if ss["specificity"].notna().any() else np.nan,
                 "n_true": len(np.asarray(y_true))})
    out = pd.DataFrame(rows)
    out["accuracy"] = res["accuracy"]
    return out


def to_jsonable(values: Sequence[float]) -> list:
    """NaN -> None, so JSON files carry ``null`` for undefined numbers."""
    return [None if v is None or not np.isfinite(v) else float(v) for v in values]
