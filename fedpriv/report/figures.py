"""The run report's plots, each returned as PNG bytes.

They use matplotlib's object API (``Figure``, no pyplot), so drawing them inside the ServerApp
neither changes the process's matplotlib backend nor leaks open figures.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from fedpriv.report.calibration import CalibrationMetrics, CalibrationReport
from fedpriv.report.fairness import HOSPITAL_METRICS, HospitalFairness

DPI = 110
MARKERS = "os^vDP*"  # hospitals with equal budgets overlap; their markers still differ


def _png(figure: Figure) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _value(value: Any) -> float:
    """A metrics.json number ("inf" strings and None included) as a float."""
    return math.nan if value is None else float(value)


def learning_curves(rounds: list[dict[str, Any]]) -> bytes:
    """Test AUC, accuracy, sensitivity and specificity (left) and test loss (right) per round."""
    figure = Figure(figsize=(10, 3.6))
    scores, losses = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1.35, 1]})
    x = [r["round"] for r in rounds]
    for metric, style in (("auc", "o-"), ("accuracy", "s-"), ("sensitivity", "^--"), ("specificity", "v--")):
        scores.plot(x, [_value(r["server"].get(metric)) for r in rounds], style, label=f"test {metric}",
                    linewidth=2 if metric in ("auc", "accuracy") else 1)
    scores.set(xlabel="round", ylabel="score", ylim=(-0.02, 1.02), title="Global model on the test split")
    scores.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    losses.plot(x, [_value(r["server"].get("loss")) for r in rounds], "o-", color="tab:red")
    losses.set(xlabel="round", ylabel="cross-entropy", title="Test loss")
    for axis in (scores, losses):
        axis.grid(alpha=0.3)
        axis.set_xticks(x if len(x) <= 20 else x[:: math.ceil(len(x) / 20)])
    return _png(figure)


def privacy_spend(rounds: list[dict[str, Any]]) -> bytes | None:
    """Each hospital's cumulative epsilon after every round, its budget (dashed) and when it locked.

    None when no hospital has a finite epsilon (a non-private run: epsilon = infinity).
    """
    names = list(dict.fromkeys(p["hospital"] for r in rounds for p in r["privacy"]))
    series = {name: [(r["round"], p) for r in rounds for p in r["privacy"] if p["hospital"] == name] for name in names}
    if not any(math.isfinite(_value(p["epsilon"])) for points in series.values() for _, p in points):
        return None
    figure = Figure(figsize=(9, 3.8))
    axis = figure.subplots()
    for index, (name, points) in enumerate(series.items()):
        color = f"C{index % 10}"
        axis.plot([x for x, _ in points], [_value(p["epsilon"]) for _, p in points], color=color, label=name,
                  marker=MARKERS[index % len(MARKERS)], markersize=9 - 2 * (index % 3), alpha=0.85)
        budget = _value(points[-1][1]["budget_epsilon"])
        if math.isfinite(budget):
            axis.axhline(budget, color=color, linestyle="--", linewidth=1, alpha=0.8)
        locked = next(((x, p) for x, p in points if p["locked"]), None)
        if locked:
            axis.plot(locked[0], _value(locked[1]["epsilon"]), "X", color=color, markersize=12,
                      markeredgecolor="black", label=f"{name} locked (round {locked[0]})")
    axis.set(xlabel="round", ylabel="cumulative epsilon", ylim=(0, None),
             title="Epsilon spent per hospital (dashed: its budget)")
    axis.set_xticks([r["round"] for r in rounds] if len(rounds) <= 20 else axis.get_xticks())
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(figure)


def record_epsilon(hospitals: list[tuple[str, np.ndarray, float]]) -> bytes | None:
    """One panel per hospital: its records' epsilon, sorted, against its budget (dashed).

    ``hospitals`` holds (name, per-record epsilon, budget). Records at infinity (non-private use)
    cannot be drawn on the axis; each panel says how many there are. None when no record of any
    hospital has a finite epsilon (a non-private run: nothing to plot).
    """
    if not any(np.isfinite(epsilon).any() for _, epsilon, _ in hospitals):
        return None
    columns = min(len(hospitals), 3)
    rows = math.ceil(len(hospitals) / columns)
    figure = Figure(figsize=(3.4 * columns + 0.6, 2.9 * rows))
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, (name, epsilon, budget) in zip(axes, hospitals, strict=False):
        finite = np.sort(epsilon[np.isfinite(epsilon)])
        infinite = len(epsilon) - len(finite)
        if len(finite):
            axis.plot(np.arange(1, len(finite) + 1), finite, color="tab:blue", drawstyle="steps-post",
                      marker="o" if len(finite) == 1 else None, label="epsilon per record")
        if math.isfinite(budget):
            axis.axhline(budget, color="tab:red", linestyle="--", linewidth=1.2, label=f"budget {budget:g}")
        top = max([budget if math.isfinite(budget) else 0.0, *finite[-1:]]) or 1.0
        axis.set(ylim=(0, top * 1.15), xlabel="records, sorted by epsilon", ylabel="epsilon",
                 title=f"{name} ({len(epsilon)} records)")
        axis.title.set_fontsize(10)
        if infinite:  # off the axis: say it in the panel rather than clip them to its top
            axis.text(0.5, 0.5, f"{infinite} records: epsilon = infinity\n(not private)", ha="center",
                      va="center", transform=axis.transAxes, fontsize=9, color="tab:red",
                      bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "tab:red"})
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="lower right")
    for axis in axes[len(hospitals):]:
        axis.set_visible(False)
    return _png(figure)


def reliability_diagram(report: CalibrationReport) -> bytes:
    """Accuracy against confidence per bin, before and after temperature scaling, with bin counts."""
    figure = Figure(figsize=(9, 5))
    axes = figure.subplots(2, 2, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    after = (f"After temperature scaling (T = {report.fitted_temperature:.2f})" if report.applied
             else f"With the fitted T = {report.fitted_temperature:.2f} (NOT applied)")
    panels = ((report.before, "Before (T = 1)"), (report.after, after))
    for column, (metrics, title) in enumerate(panels):
        _reliability_panel(axes[0][column], axes[1][column], metrics, title)
    axes[0][0].set_ylabel("accuracy in bin")
    axes[1][0].set_ylabel("share of images")
    return _png(figure)


def _reliability_panel(top, bottom, metrics: CalibrationMetrics, title: str) -> None:
    width = metrics.bins[0].upper - metrics.bins[0].lower
    filled = [b for b in metrics.bins if b.count]
    lefts = [b.lower for b in filled]
    top.bar(lefts, [b.accuracy for b in filled], width=width, align="edge", color="tab:blue", edgecolor="white",
            label="accuracy")
    top.bar(lefts, [b.confidence - b.accuracy for b in filled], bottom=[b.accuracy for b in filled], width=width,
            align="edge", color="none", edgecolor="tab:red", hatch="//", linewidth=0.8, label="gap to confidence")
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1), title=title)
    top.text(0.03, 0.95, f"ECE {metrics.ece:.3f}\nBrier {metrics.brier:.3f}", va="top", fontsize=9,
             bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "grey"})
    top.legend(fontsize=7, loc="lower right")
    total = sum(b.count for b in metrics.bins)
    bottom.bar(lefts, [b.count / total for b in filled], width=width, align="edge", color="grey")
    bottom.set(xlabel="confidence of the predicted class", xlim=(0, 1))
    for axis in (top, bottom):
        axis.grid(alpha=0.3)


def hospital_bars(fairness: HospitalFairness) -> bytes:
    """Grouped bars: each hospital's AUC, accuracy, sensitivity and specificity (private validation)."""
    figure = Figure(figsize=(9, 3.6))
    axis = figure.subplots()
    count = len(fairness.rows)
    width = 0.8 / len(HOSPITAL_METRICS)
    for offset, metric in enumerate(HOSPITAL_METRICS):
        xs = [i + (offset - (len(HOSPITAL_METRICS) - 1) / 2) * width for i in range(count)]
        values = [row[metric] for row in fairness.rows]
        axis.bar(xs, values, width=width, label=metric, color=f"C{offset}")
        for x, value in zip(xs, values, strict=True):
            if math.isnan(value):  # undefined (e.g. one class in that split): say so, not a zero bar
                axis.text(x, 0.02, "n/a", ha="center", fontsize=7, rotation=90, color=f"C{offset}")
    axis.set_xticks(range(count), [row["hospital"] for row in fairness.rows], rotation=20 if count > 6 else 0)
    axis.set(ylim=(0, 1.05), ylabel="score",
             title="Final model per hospital (each on its own private validation split; not DP-covered)")
    axis.title.set_fontsize(10)
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(figure)
