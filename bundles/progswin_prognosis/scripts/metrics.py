"""Classification metrics of the 4-class risk problem, kept inside the bundle on purpose.

The same formulas as the project's ``analysis.metrics`` (the bundle must run alone), tested
against the same reference cases (tests/data/metrics_cases.json):

- one-vs-rest AUC per class (paper Appendix 6); a class with no positive or no negative sample
  has no AUC: NaN plus a warning naming the class, and it is left out of the macro average
  (never counted as 0 or 0.5);
- macro AUC = mean over the classes present; accuracy; per-class sensitivity/specificity;
  confusion matrix; percentile bootstrap 95% CIs over patients (seeded, >= 1000 resamples).
"""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import pandas as pd
import torch
from monai.metrics import CumulativeIterationMetric
from scipy.stats import rankdata
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

log = logging.getLogger(__name__)

NUM_CLASSES = 4
N_BOOT = 1000
PROB_COLUMNS = [f"prob_{k}" for k in range(NUM_CLASSES)]


class AbsentClassWarning(UserWarning):
    """A class has no positive or no negative sample: its one-vs-rest AUC is undefined."""


def _check(y_true, y_prob):
    y = np.asarray(y_true)
    p = np.asarray(y_prob, dtype=float)
    if p.ndim != 2 or y.ndim != 1 or len(y) != len(p):
        raise ValueError(f"expected y_true (n,) and y_prob (n, classes); got {y.shape} and {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("y_prob holds NaN or infinite values")
    y = y.astype(int)
    bad = sorted(set(y.tolist()) - set(range(p.shape[1])))
    if bad:
        raise ValueError(f"y_true holds labels {bad}; expected classes 0..{p.shape[1] - 1}")
    return y, p


def present_classes(y_true, n_classes: int = NUM_CLASSES) -> list[int]:
    y = np.asarray(y_true).astype(int)
    return [k for k in range(n_classes) if 0 < np.sum(y == k) < len(y)]


def per_class_auc(y_true, y_prob, warn: bool = True) -> np.ndarray:
    y, p = _check(y_true, y_prob)
    out = np.full(p.shape[1], np.nan)
    present = set(present_classes(y, p.shape[1]))
    for k in range(p.shape[1]):
        if k in present:
            out[k] = roc_auc_score((y == k).astype(int), p[:, k])
        elif warn:
            why = "no sample of it" if not np.any(y == k) else "every sample is of it"
            warnings.warn(f"class {k}: one-vs-rest AUC undefined ({why} among {len(y)}); reported as NaN",
                          AbsentClassWarning, stacklevel=2)
    return out


def macro_auc(y_true, y_prob, warn: bool = True) -> float:
    aucs = per_class_auc(y_true, y_prob, warn=warn)
    return float(np.nanmean(aucs)) if np.any(np.isfinite(aucs)) else float("nan")


def accuracy(y_true, y_prob) -> float:
    y, p = _check(y_true, y_prob)
    return float(np.mean(np.argmax(p, axis=1) == y)) if len(y) else float("nan")


def confusion(y_true, y_pred, n_classes: int = NUM_CLASSES) -> pd.DataFrame:
    """Rows = true class, columns = predicted class; every class listed even when absent."""
    labels = list(range(n_classes))
    cm = confusion_matrix(np.asarray(y_true).astype(int), np.asarray(y_pred).astype(int), labels=labels)
    frame = pd.DataFrame(cm, columns=[f"pred_{k}" for k in labels])
    frame.insert(0, "true_class", labels)
    return frame


def sensitivity_specificity(y_true, y_pred, n_classes: int = NUM_CLASSES) -> pd.DataFrame:
    cm = confusion(y_true, y_pred, n_classes).drop(columns="true_class").to_numpy()
    total, rows = cm.sum(), []
    for k in range(n_classes):
        tp = cm[k, k]
        fn, fp = cm[k].sum() - tp, cm[:, k].sum() - tp
        tn = total - tp - fn - fp
        rows.append({"class": k, "n_true": int(tp + fn),
                     "sensitivity": tp / (tp + fn) if tp + fn else np.nan,
                     "specificity": tn / (tn + fp) if tn + fp else np.nan})
    return pd.DataFrame(rows)


def _rank_auc(pos: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC per row (ties 1/2) = roc_auc_score, vectorised over resamples."""
    ranks = rankdata(scores, axis=1)
    n_pos = pos.sum(axis=1)
    n_neg = pos.shape[1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (np.where(pos, ranks, 0.0).sum(axis=1) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def bootstrap_aucs(y_true, y_prob, n_boot: int = N_BOOT, seed: int = 0):
    """Per-class (n_boot, C) and macro (n_boot,) AUCs over patient resamples.

    A resample lacking a class skips that class only; a class absent from the full data never
    enters any macro value.
    """
    if n_boot < 1000:
        warnings.warn(f"n_boot={n_boot} < 1000: confidence intervals will be unstable", stacklevel=2)
    y, p = _check(y_true, y_prob)
    idx = np.random.default_rng(seed).integers(0, len(y), size=(n_boot, len(y)))
    per = np.column_stack([_rank_auc(y[idx] == k, p[:, k][idx]) for k in range(p.shape[1])])
    present = present_classes(y, p.shape[1])
    per[:, [k for k in range(p.shape[1]) if k not in present]] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        macro = np.nanmean(per, axis=1) if present else np.full(n_boot, np.nan)
    return per, macro


def percentile_ci(values, level: float = 0.95) -> list[float]:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return [float("nan"), float("nan")]
    a = (1 - level) / 2
    return [float(np.quantile(v, a)), float(np.quantile(v, 1 - a))]


def evaluate(y_true, y_prob, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """metrics.json of docs/contracts.md; absent classes are None (null)."""
    y, p = _check(y_true, y_prob)
    aucs = per_class_auc(y, p)
    per_b, macro_b = bootstrap_aucs(y, p, n_boot=n_boot, seed=seed)
    m = macro_auc(y, p, warn=False)
    ok = [bool(np.isfinite(a)) for a in aucs]
    return {
        "auc_per_class": {str(k): float(aucs[k]) if ok[k] else None for k in range(p.shape[1])},
        "auc_ci": {str(k): percentile_ci(per_b[:, k]) if ok[k] else None for k in range(p.shape[1])},
        "macro_auc": m if np.isfinite(m) else None,
        "macro_auc_ci": percentile_ci(macro_b) if np.isfinite(m) else None,
        "accuracy": accuracy(y, p),
        "n": len(y),
        "n_boot": int(n_boot),
    }


def read_predictions(path: str) -> pd.DataFrame:
    frame = pd.read_csv(path, dtype={"patient_id": str})
    missing = [c for c in ["patient_id", "fold", *PROB_COLUMNS, "pred_class"] if c not in frame]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected the predictions.csv layout")
    return frame


def write_evaluation(predictions: str | pd.DataFrame, out_dir: str, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """metrics.json, per_class.csv, confusion.csv, roc.png (+ roc.csv) for labelled rows."""
    from scripts.io import save_figure, write_csv, write_json

    frame = read_predictions(predictions) if isinstance(predictions, str) else predictions
    if "label" not in frame:
        raise ValueError("predictions have no 'label' column: nothing to evaluate against")
    labelled = frame[frame["label"].notna() & (frame["label"] >= 0)]
    if len(labelled) < len(frame):
        log.warning("evaluation: %d row(s) without a label left out: %s", len(frame) - len(labelled),
                    ", ".join(frame.loc[~frame.index.isin(labelled.index), "patient_id"].astype(str)))
    y = labelled["label"].astype(int).to_numpy()
    p = labelled[PROB_COLUMNS].to_numpy(float)
    metrics = evaluate(y, p, n_boot=n_boot, seed=seed)
    pred = np.argmax(p, axis=1)
    per_class = sensitivity_specificity(y, pred)
    per_class["auc"] = [metrics["auc_per_class"][str(k)] for k in range(NUM_CLASSES)]
    per_class["auc_ci_lower"] = [(metrics["auc_ci"][str(k)] or [None])[0] for k in range(NUM_CLASSES)]
    per_class["auc_ci_upper"] = [(metrics["auc_ci"][str(k)] or [None, None])[1] for k in range(NUM_CLASSES)]
    metrics["sensitivity"] = {str(r["class"]): r["sensitivity"] for r in per_class.to_dict("records")}
    metrics["specificity"] = {str(r["class"]): r["specificity"] for r in per_class.to_dict("records")}
    os.makedirs(out_dir, exist_ok=True)
    write_csv(os.path.join(out_dir, "per_class.csv"), per_class)
    write_csv(os.path.join(out_dir, "confusion.csv"), confusion(y, pred))
    fig, roc = _roc_figure(y, p, metrics)
    save_figure(os.path.join(out_dir, "roc.png"), fig, data=roc)
    write_json(os.path.join(out_dir, "metrics.json"), metrics)
    return metrics


def _roc_figure(y, p, metrics):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    rows = []
    for k in range(p.shape[1]):
        auc = metrics["auc_per_class"][str(k)]
        if auc is None:
            continue
        fpr, tpr, thr = roc_curve((y == k).astype(int), p[:, k])
        ax.plot(fpr, tpr, label=f"class {k} (AUC {auc:.2f})")
        rows += [{"class": k, "fpr": a, "tpr": b, "threshold": min(c, 1.0)} for a, b, c in zip(fpr, tpr, thr)]
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    macro = metrics["macro_auc"]
    ax.set(xlabel="false positive rate", ylabel="true positive rate",
           title="one-vs-rest ROC" + (f", macro AUC {macro:.2f}" if macro is not None else ""))
    ax.legend(loc="lower right")
    return fig, pd.DataFrame(rows, columns=["class", "fpr", "tpr", "threshold"])


class RiskMetric(CumulativeIterationMetric):
    """Validation metric for the ignite evaluator: ``macro_auc`` (classes present) or ``accuracy``.

    MONAI's ROCAUCMetric averages NaN in when a class is missing from a small validation fold,
    which leaves the best-checkpoint selection comparing NaNs; this one follows the rule above.
    """

    def __init__(self, metric: str = "macro_auc") -> None:
        super().__init__()
        if metric not in ("macro_auc", "accuracy"):
            raise ValueError(f"metric must be 'macro_auc' or 'accuracy'; got {metric!r}")
        self.metric = metric

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor):  # type: ignore[override]
        return y_pred.detach().float(), y.detach().reshape(-1).long()

    def aggregate(self):  # type: ignore[override]
        y_pred, y = self.get_buffer()
        p, t = y_pred.cpu().numpy(), y.cpu().numpy()
        if self.metric == "accuracy":
            return accuracy(t, p)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AbsentClassWarning)
            return macro_auc(t, p)
