"""Calibration of predicted class probabilities: do patients given p = 0.3 for a class belong to
it about 30% of the time? One-vs-rest per class, binned with scikit-learn's
``calibration_curve``; the plot is the usual reliability diagram."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.cohort import CLASS_NAMES

__all__ = ["calibration_table", "calibration_plot", "brier_scores"]


def calibration_table(y_true, y_prob, n_bins: int = 5) -> pd.DataFrame:
    """class, bin, mean_predicted, observed_fraction, n: one row per non-empty bin and class.

    ``y_prob`` is (n, k) with rows summing to 1; bins are uniform on [0, 1].
    """
    from sklearn.calibration import calibration_curve

    y_true = np.asarray(y_true, dtype=int)
    y_prob = np.asarray(y_prob, dtype=float)
    if y_prob.ndim != 2 or len(y_prob) != len(y_true):
        raise ValueError(f"y_prob: expected shape (n, k) with n = {len(y_true)}, found {y_prob.shape}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    rows = []
    for k in range(y_prob.shape[1]):
        hit = (y_true == k).astype(int)
        if hit.min() == hit.max():
            continue  # a class absent (or alone) has no one-vs-rest calibration
        observed, predicted = calibration_curve(hit, y_prob[:, k], n_bins=n_bins, strategy="uniform")
        counts = np.histogram(y_prob[:, k], bins=edges)[0]
        counts = counts[counts > 0]
        for b, (o, p, n) in enumerate(zip(observed, predicted, counts)):
            rows.append({"class": k, "bin": b, "mean_predicted": float(p), "observed_fraction": float(o), "n": int(n)})
    return pd.DataFrame(rows, columns=["class", "bin", "mean_predicted", "observed_fraction", "n"])


def brier_scores(y_true, y_prob) -> dict[str, float]:
    """One-vs-rest Brier score per class and the multi-class Brier score (mean over patients of
    the squared distance between the probability vector and the one-hot truth)."""
    y_true = np.asarray(y_true, dtype=int)
    y_prob = np.asarray(y_prob, dtype=float)
    onehot = np.eye(y_prob.shape[1])[y_true]
    scores = {str(k): float(np.mean((y_prob[:, k] - onehot[:, k]) ** 2)) for k in range(y_prob.shape[1])}
    scores["multiclass"] = float(np.mean(np.sum((y_prob - onehot) ** 2, axis=1)))
    return scores


def calibration_plot(table: pd.DataFrame, ax=None):
    """Reliability diagram of :func:`calibration_table`'s output; returns the Axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    for k, part in table.groupby("class"):
        ax.plot(part["mean_predicted"], part["observed_fraction"], marker="o",
                label=f"class {k}: {CLASS_NAMES.get(int(k), k)}")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability", ylabel="observed fraction",
           title="Calibration (one vs rest)")
    ax.legend(fontsize=7, loc="upper left")
    return ax
