"""One plotting convention for every public ``plot_*`` function of ``analysis`` (issue 14, item 6).

A single-panel function takes ``ax=None`` and returns the Axes it drew on; a multi-panel one takes
``fig=None`` and returns the Figure. None of them writes a file: callers save through
``analysis.io.save_figure``. The functions are found by reading the modules, so a new ``plot_*``
function is checked as soon as it exists (and fails until it has a tiny input below).
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a test process chooses its own backend; library code never does

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

ANALYSIS = Path(__file__).resolve().parents[1] / "analysis"


def _plot_functions() -> list[str]:
    """``module.function`` of every top-level ``def plot_*`` in analysis/*.py."""
    found = []
    for path in sorted(ANALYSIS.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found += [f"analysis.{path.stem}.{node.name}" for node in tree.body
                  if isinstance(node, ast.FunctionDef) and node.name.startswith("plot_")]
    return found


# ------------------------------------------------------------------------- tiny inputs
def _survival_table(n: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"patient_id": [f"P{i:02d}" for i in range(n)],
                         "os_months": rng.uniform(1, 60, n).round(1), "death": rng.integers(0, 2, n),
                         "age": rng.normal(65, 10, n).round(),
                         "sorafenib": rng.integers(0, 2, n), "g": np.arange(n) % 3,
                         "treatment": np.where(np.arange(n) % 2, "TACE", "TACE+MWA")})


def _cox():
    from analysis.cox import fit_cox

    return fit_cox(_survival_table(), covariates=["age", "sorafenib"], cv_folds=0)


def _km_panel():
    from analysis.km import kaplan_meier

    return kaplan_meier(_survival_table(), group="g")


def _km_grid():
    from analysis.km import km_grid

    return km_grid(_survival_table(), [("groups", "g")], by="treatment")


def _nomogram():
    from analysis.nomogram import build_nomogram

    return build_nomogram(_cox(), times=(12, 24))


def _predictions(n: int = 16, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(4), n)
    return pd.DataFrame({"patient_id": [f"P{i}" for i in range(n)], "label": np.arange(n) % 4,
                         **{f"prob_{k}": p[:, k] for k in range(4)}})


def _features(n: int = 12, k: int = 4, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.normal(size=(n, k)), columns=[f"f{j}" for j in range(k)],
                        index=[f"P{i}" for i in range(n)])


#: ``module.function`` -> positional arguments (built lazily: each is a small fit or table)
CASES = {
    "analysis.survival_plots.plot_km": lambda: (_km_panel(),),
    "analysis.survival_plots.plot_km_grid": lambda: (_km_grid(),),
    "analysis.survival_plots.plot_forest": lambda: (_cox(),),
    "analysis.survival_plots.plot_schoenfeld": lambda: (_cox(),),
    "analysis.nomogram.plot_nomogram": lambda: (_nomogram(),),
    "analysis.nomogram.plot_calibration": lambda: (pd.DataFrame({
        "predicted_survival": [0.2, 0.5, 0.8], "observed_km_survival": [0.25, 0.45, 0.85],
        "corrected_observed_survival": [0.27, 0.47, 0.8]}), 36.0),
    "analysis.nomogram.plot_decision_curve": lambda: (pd.DataFrame({
        "threshold": [0.1, 0.5, 0.9], "net_benefit_model": [0.3, 0.1, 0.0],
        "net_benefit_treat_all": [0.35, -0.2, -3.0], "net_benefit_treat_none": [0.0, 0.0, 0.0]}), 36.0),
    "analysis.models.plot_roc": lambda: ({"naive_bayes": _predictions(), "svm": _predictions(seed=1)}, "ROC"),
    "analysis.models.plot_pca": lambda: (_features(), pd.Series(np.arange(12) % 4)),
    "analysis.models.plot_confusion": lambda: (pd.DataFrame({
        "model": ["svm"] * 4, "true_class": [0, 1, 2, 3],
        **{f"pred_{k}": [3 if i == k else 1 for i in range(4)] for k in range(4)}}), "confusion"),
    "analysis.models.plot_correlation": lambda: (_features(k=3),),
    "analysis.mrecist.plot_waterfall": lambda: (pd.DataFrame({
        "patient_id": ["A", "B", "C"], "sum_mm_t0": [40.0, 50.0, 30.0], "sum_mm_t1": [40.0, 35.0, 12.0],
        "sum_mm_t2": [44.0, 40.0, 30.0], "best_response": ["SD", "PR", "PR"]}),),
}

PLOT_FUNCTIONS = _plot_functions()


def test_every_plot_function_is_checked():
    """A new plot_* function fails here until CASES gives it a tiny input (and then is checked)."""
    assert len(PLOT_FUNCTIONS) >= 12
    assert sorted(PLOT_FUNCTIONS) == sorted(CASES)


@pytest.fixture
def saved(tmp_path, monkeypatch) -> list:
    """An empty working directory, and Figure.savefig recording its calls instead of writing."""
    calls = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: calls.append(a[:1]))
    monkeypatch.chdir(tmp_path)
    return calls


@pytest.mark.parametrize("qualified", PLOT_FUNCTIONS)
def test_plot_function_takes_ax_or_fig_none_returns_it_and_writes_nothing(qualified, saved, tmp_path):
    module, name = qualified.rsplit(".", 1)
    func = getattr(importlib.import_module(module), name)
    params = inspect.signature(func).parameters
    kinds = [k for k in ("ax", "fig") if k in params]
    assert len(kinds) == 1, f"{qualified}: expected a parameter ax=None (one panel) or fig=None (several)"
    kind = kinds[0]
    assert params[kind].default is None, f"{qualified}: {kind} must default to None"
    args = CASES[qualified]()
    try:
        drawn = func(*args)
        if kind == "ax":
            assert isinstance(drawn, Axes), f"{qualified} returned {type(drawn).__name__}, expected the Axes"
            # given an Axes, it draws there and returns that Axes
            target = plt.figure().add_subplot(projection="3d" if name == "plot_pca" else None)
            assert func(*args, ax=target) is target
            assert target.has_data() or target.texts or target.lines
        else:
            assert isinstance(drawn, Figure), f"{qualified} returned {type(drawn).__name__}, expected the Figure"
            assert drawn.axes, f"{qualified}: an empty Figure"
            target = plt.figure()
            assert func(*args, fig=target) is target and target.axes
    finally:
        plt.close("all")
    assert saved == [], f"{qualified} saved a figure: {saved}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [], f"{qualified} wrote a file"
