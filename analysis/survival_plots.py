"""Figures of the survival analyses: Kaplan-Meier panels and the Fig. 6 grid, the Cox forest plot
(Fig. 7) and the scaled Schoenfeld residuals.

One convention, as in lifelines.plotting and the rest of ``analysis``: a single-panel function takes
``ax=None`` (a new figure when None) and returns the Axes it drew on; a multi-panel function takes
``fig=None`` and returns the Figure. Nothing here writes a file or chooses matplotlib's backend:
callers save with ``analysis.io.save_figure(path, fig, data=...)``, the data being the table the
figure shows (:attr:`analysis.km.KMGrid.curves`, :func:`analysis.cox.log_hazard_table`,
:func:`analysis.cox.scaled_schoenfeld`).
"""

from __future__ import annotations

import math

import numpy as np

from analysis.cox import CoxResult, log_hazard_table, scaled_schoenfeld
from analysis.km import MARKER_MONTHS, KMGrid, KMResult

__all__ = ["plot_forest", "plot_km", "plot_km_grid", "plot_schoenfeld"]


def plot_km(result: KMResult, ax=None, title: str = "", marker_months: float | None = MARKER_MONTHS,
            at_risk: bool = True, xlabel: str = "Overall survival (months)"):
    """One Kaplan-Meier panel: curves with CIs, dashed marker line, log-rank p, numbers at risk below.

    Args:
        result: one panel of :func:`analysis.km.kaplan_meier`.
        ax: Axes to draw on; None draws on a new 6 x 5 inch figure.
        title: panel title.
        marker_months: time marked by a dashed vertical line (None: no line).
        at_risk: add lifelines' numbers-at-risk row below the panel.
        xlabel: label of the time axis.

    Returns:
        the Axes.
    """
    import matplotlib.pyplot as plt
    from lifelines.plotting import add_at_risk_counts

    own = ax is None
    if own:
        _, ax = plt.subplots(figsize=(6, 5))
    # one colour per level across every panel, so class 3 keeps its colour where class 2 is empty
    order = list(result.medians["group"])
    for level, kmf in result.fitters.items():
        kmf.plot_survival_function(ax=ax, ci_show=True, ci_alpha=0.12, show_censors=True,
                                   color=f"C{order.index(level) % 10}", censor_styles={"ms": 4, "marker": "|"})
    if marker_months is not None:
        ax.axvline(marker_months, color="0.3", linestyle="--", linewidth=1)
    lr = result.logrank
    text = (f"log-rank p = {lr['p_value']:.3g}" if not lr["skipped_reason"] else f"not tested: {lr['skipped_reason']}")
    if result.empty_groups:
        text += f"\nno patients: {', '.join(map(str, result.empty_groups))}"
    ax.text(0.02, 0.03, text, transform=ax.transAxes, fontsize=7, va="bottom")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("Survival probability", fontsize=8)
    ax.tick_params(labelsize=7)
    if result.fitters:
        ax.legend(fontsize=7, loc="upper right")
        if at_risk:
            add_at_risk_counts(*result.fitters.values(), ax=ax, rows_to_show=["At risk"], fontsize=6)
    else:
        ax.text(0.5, 0.5, "no patients", transform=ax.transAxes, ha="center")
    if own:
        ax.figure.tight_layout()
    return ax


def plot_km_grid(grid: KMGrid, marker_months: float | None = MARKER_MONTHS, fig=None):
    """The Fig. 6 grid: one row per method, one column per subgroup (all, then each ``by`` value),
    panels lettered A, B, ... in reading order.

    Args:
        grid: :func:`analysis.km.km_grid`'s result.
        marker_months: time marked by a dashed vertical line in every panel (None: no line).
        fig: Figure to draw the panels into; None makes one sized to the grid.

    Returns:
        the Figure.
    """
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(m for m, _ in grid.results))
    subgroups = list(dict.fromkeys(s for _, s in grid.results))
    nrow, ncol = len(methods), len(subgroups)
    own = fig is None
    if own:
        fig = plt.figure(figsize=(4.2 * ncol, 4.4 * nrow))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for i, name in enumerate(methods):
        for j, sub_name in enumerate(subgroups):
            res = grid.results[(name, sub_name)]
            label = chr(ord("A") + i * ncol + j) if i * ncol + j < 26 else ""
            plot_km(res, axes[i][j], title=f"{label}  {name} - {sub_name} (n={res.logrank['n']})",
                    marker_months=marker_months)
    if own:
        fig.tight_layout(h_pad=4.0)
    return fig


def plot_forest(result: CoxResult, ax=None):
    """Fig. 7 style: one row per covariate / level, diamond at log(HR), line for the 95% CI, the
    numbers at the right; red where p < 0.05, a reference level as a hollow diamond at 0.

    Args:
        result: :func:`analysis.cox.fit_cox`'s result; the rows are :func:`analysis.cox.log_hazard_table`'s.
        ax: Axes to draw on; None draws on a new figure sized to the number of rows.

    Returns:
        the Axes.
    """
    import matplotlib.pyplot as plt

    f = log_hazard_table(result)
    n = len(f)
    own = ax is None
    if own:
        _, ax = plt.subplots(figsize=(7.5, 0.42 * n + 1.4))
    y = np.arange(n)[::-1]
    for yi, (_, r) in zip(y, f.iterrows()):
        if r["is_reference"]:
            ax.plot([0], [yi], marker="D", mfc="white", mec="0.4", ms=6)
            ax.text(1.02, yi, "reference", transform=ax.get_yaxis_transform(), va="center", fontsize=7)
            continue
        ax.plot([r["log_hr_lower_95"], r["log_hr_upper_95"]], [yi, yi], color="0.2", lw=1.2)
        ax.plot([r["log_hr"]], [yi], marker="D", color="tab:red" if r["p"] < 0.05 else "tab:blue", ms=7)
        ax.text(1.02, yi, f"{r['log_hr']:.2f} ({r['log_hr_lower_95']:.2f}, {r['log_hr_upper_95']:.2f})  p={r['p']:.3g}",
                transform=ax.get_yaxis_transform(), va="center", fontsize=7)
    ax.axvline(0, color="0.3", linestyle="--", lw=1)
    labels = [r["covariate"] if not r["level"] else f"{r['variable']} = {r['level']}" for _, r in f.iterrows()]
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel("log(HR) with 95% CI (red: p < 0.05)", fontsize=8)
    cv = f"{result.cv_concordance:.2f}" if result.cv_concordance is not None else "n/a"
    ax.set_title(f"Cox model: n={len(result.design)}, events={int(result.design[result.event].sum())}, "
                 f"C-index {result.concordance:.2f} (cross-validated {cv})", fontsize=9)
    if own:
        ax.figure.tight_layout()
    return ax


def plot_schoenfeld(result: CoxResult, residuals=None, fig=None):
    """Scaled Schoenfeld residuals against rank time, one panel per design column, with the
    coefficient as a line and the proportional-hazards test's p in the title.

    Args:
        result: :func:`analysis.cox.fit_cox`'s result.
        residuals: :func:`analysis.cox.scaled_schoenfeld` of ``result`` when the caller has it
            already (it is also the figure's data); None computes it.
        fig: Figure to draw the panels into; None makes one, up to three panels a row.

    Returns:
        the Figure.
    """
    import matplotlib.pyplot as plt

    resid = scaled_schoenfeld(result) if residuals is None else residuals
    cols = list(result.fitter.params_.index)
    ncol = min(3, len(cols))
    nrow = math.ceil(len(cols) / ncol)
    own = fig is None
    if own:
        fig = plt.figure(figsize=(4 * ncol, 3 * nrow))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    ph = result.ph_test.set_index("covariate")
    for ax, c in zip(axes.ravel(), cols):
        ax.scatter(resid["rank_time"], resid[c], s=8, alpha=0.6)
        ax.axhline(result.fitter.params_[c], color="tab:red", lw=1)
        p = ph.loc[c, "p"] if c in ph.index else np.nan
        violated = bool(ph.loc[c, "violation"]) if c in ph.index else False
        ax.set_title(f"{c}: PH p={p:.3g}{'  VIOLATED' if violated else ''}", fontsize=8)
        ax.set_xlabel("rank of time", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[len(cols):]:
        ax.axis("off")
    if own:
        fig.tight_layout()
    return fig
