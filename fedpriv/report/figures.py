"""The run report's plots: ``*_figure`` builds a matplotlib Figure, the function without it returns PNG bytes.

They use matplotlib's object API (``Figure``, no pyplot), so drawing them inside the ServerApp
neither changes the process's matplotlib backend nor leaks open figures. Every plot stays readable
from 1 to hundreds of rounds and from 1 to thousands of hospitals: round axes get a few integer ticks
(matplotlib picks as many as fit) and never run below the first round; legends with many
hospitals get more columns, and beyond MAX_HOSPITALS_DRAWN hospitals a figure shows their spread
(largest, median, smallest) in a figure of fixed size; a budget line is never drawn on the plot's edge. With ``synthetic``,
each figure says SYNTHETIC in its title, since a PNG file is often seen away from its report.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedpriv.report.calibration import CalibrationMetrics, CalibrationReport
from fedpriv.report.fairness import HOSPITAL_METRICS, HospitalFairness

DPI = 110
MARKERS = "os^vDP*"  # hospitals with equal budgets overlap; their markers still differ
SYNTHETIC = "SYNTHETIC data (generated images, not patients)"
LEGEND_ROWS = 12  # a legend with more entries than this gets another column
MAX_RECORD_PANELS = 12  # more hospitals than this share one per-record panel (as shares of their budgets)
MAX_HOSPITALS_DRAWN = 30  # beyond this, a figure shows the spread over hospitals instead of one mark each


def new_figure(width: float, height: float) -> Figure:
    """A Figure on its own Agg canvas: it can be drawn (``figure.canvas.draw()``) and measured without pyplot."""
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _finish(figure: Figure, synthetic: bool) -> Figure:
    """Mark a synthetic run's figure, then lay it out (legends outside the axes included)."""
    if synthetic:
        figure.suptitle(SYNTHETIC, color="tab:red", fontsize=10, fontweight="bold")
    figure.tight_layout()
    return figure


def _round_axis(axis, rounds: list[int]) -> None:
    """A round axis: integer ticks, only as many as fit, spanning the rounds shown (never below round 0)."""
    axis.xaxis.set_major_locator(MaxNLocator(nbins="auto", integer=True, min_n_ticks=1))
    if rounds:
        first, last = min(rounds), max(rounds)
        pad = max(0.5, (last - first) * 0.03)
        axis.set_xlim(max(first - pad, 0), last + pad)


def _colour(index: int, count: int) -> str | tuple[float, ...]:
    """Ten distinct colours for up to ten hospitals, twenty beyond (the markers differ as well)."""
    return f"C{index}" if count <= 10 else colormaps["tab20"](index % 20)


def _legend_outside(axis, entries: int) -> None:
    """The legend to the right of the axes, in as many columns as its entries need."""
    if entries:
        axis.legend(fontsize=8 if entries <= LEGEND_ROWS else 7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                    ncols=math.ceil(entries / LEGEND_ROWS), borderaxespad=0)


def _value(value: Any) -> float:
    """A metrics.json number ("inf" strings and None included) as a float."""
    return math.nan if value is None else float(value)


def learning_curves_figure(rounds: list[dict[str, Any]], *, synthetic: bool = False) -> Figure:
    """Test AUC, accuracy, sensitivity and specificity (left) and test loss (right) per round."""
    figure = new_figure(10, 3.6)
    scores, losses = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1.35, 1]})
    x = [r["round"] for r in rounds]
    many = len(x) > 30  # markers on every one of hundreds of rounds would hide the lines
    for metric, style in (("auc", "o-"), ("accuracy", "s-"), ("sensitivity", "^--"), ("specificity", "v--")):
        scores.plot(x, [_value(r["server"].get(metric)) for r in rounds], style, label=f"test {metric}",
                    linewidth=2 if metric in ("auc", "accuracy") else 1, markersize=3 if many else 6)
    scores.set(xlabel="round", ylabel="score", ylim=(-0.02, 1.02), title="Global model on the test split")
    scores.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    losses.plot(x, [_value(r["server"].get("loss")) for r in rounds], "o-", color="tab:red",
                markersize=3 if many else 6)
    losses.set(xlabel="round", ylabel="cross-entropy", title="Test loss")
    for axis in (scores, losses):
        axis.grid(alpha=0.3)
        _round_axis(axis, x)
    return _finish(figure, synthetic)


def learning_curves(rounds: list[dict[str, Any]], *, synthetic: bool = False) -> bytes:
    """:func:`learning_curves_figure` as PNG bytes."""
    return _png(learning_curves_figure(rounds, synthetic=synthetic))


def privacy_spend_figure(rounds: list[dict[str, Any]], *, synthetic: bool = False) -> Figure | None:
    """Each hospital's cumulative epsilon after every round, its budget (dashed) and when it locked.

    None when no hospital has a finite epsilon (a non-private run: epsilon = infinity). The y axis
    runs from 0 to above the highest budget and epsilon, so a budget line (and a locked hospital's
    last point, on it) is never drawn on the plot's edge. Beyond MAX_HOSPITALS_DRAWN hospitals: the
    largest, median and smallest epsilon over them, and how many are locked.
    """
    names = list(dict.fromkeys(p["hospital"] for r in rounds for p in r["privacy"]))
    series = {name: [(r["round"], p) for r in rounds for p in r["privacy"] if p["hospital"] == name] for name in names}
    if not any(math.isfinite(_value(p["epsilon"])) for points in series.values() for _, p in points):
        return None
    if len(names) > MAX_HOSPITALS_DRAWN:
        return _privacy_spread_figure(rounds, len(names), synthetic)
    entries = len(names) + sum(any(p["locked"] for _, p in points) for points in series.values())
    columns = math.ceil(entries / LEGEND_ROWS)
    figure = new_figure(9 + 1.6 * (columns - 1), max(3.8, 0.2 * min(entries, LEGEND_ROWS) + 1.5))
    axis = figure.subplots()
    top = 0.0
    for index, (name, points) in enumerate(series.items()):
        color = _colour(index, len(names))
        spent = [_value(p["epsilon"]) for _, p in points]
        axis.plot([x for x, _ in points], spent, color=color, label=name,
                  marker=MARKERS[index % len(MARKERS)], markersize=(9 - 2 * (index % 3)) if len(points) <= 30 else 3,
                  alpha=0.85)
        budget = _value(points[-1][1]["budget_epsilon"])
        if math.isfinite(budget):
            axis.axhline(budget, color=color, linestyle="--", linewidth=1, alpha=0.8)
        top = max([top, *(v for v in (budget, *spent) if math.isfinite(v))])
        locked = next(((x, p) for x, p in points if p["locked"]), None)
        if locked:
            axis.plot(locked[0], _value(locked[1]["epsilon"]), "X", color=color, markersize=12,
                      markeredgecolor="black", label=f"{name} locked (round {locked[0]})")
    axis.set(xlabel="round", ylabel="cumulative epsilon", ylim=(0, (top or 1.0) * 1.1),
             title="Epsilon spent per hospital (dashed: its budget)")
    _round_axis(axis, [r["round"] for r in rounds])
    axis.grid(alpha=0.3)
    _legend_outside(axis, entries)
    return _finish(figure, synthetic)


def _privacy_spread_figure(rounds: list[dict[str, Any]], hospitals: int, synthetic: bool) -> Figure:
    """Many hospitals: the largest, median and smallest cumulative epsilon over the hospitals after
    every round, their budgets (dashed; the lowest and highest when they differ) and, on the right
    axis, how many hospitals are locked."""
    figure = new_figure(9.5, 4.2)
    axis = figure.subplots()
    xs, spread, locked, budgets = [], {"largest": [], "median": [], "smallest": []}, [], set()
    for record in rounds:
        spent = [v for v in (_value(p["epsilon"]) for p in record["privacy"]) if math.isfinite(v)]
        budgets |= {v for v in (_value(p["budget_epsilon"]) for p in record["privacy"]) if math.isfinite(v)}
        xs.append(record["round"])
        locked.append(sum(bool(p["locked"]) for p in record["privacy"]))
        for key, value in zip(spread, (max, np.median, min), strict=True):
            spread[key].append(float(value(spent)) if spent else math.nan)
    for (key, values), style in zip(spread.items(), ("-", "--", ":"), strict=True):
        axis.plot(xs, values, style, color="tab:blue", marker="o" if len(xs) <= 30 else None, markersize=4,
                  label=f"{key} epsilon of a hospital")
    shown = sorted(budgets) if len(budgets) <= 2 else [min(budgets), max(budgets)]
    for budget in shown:
        axis.axhline(budget, color="tab:red", linestyle="--", linewidth=1, label=f"budget {budget:g}")
    top = max([*shown, *(v for v in spread["largest"] if math.isfinite(v))] or [1.0])
    axis.set(xlabel="round", ylabel="cumulative epsilon", ylim=(0, top * 1.1),
             title=f"Epsilon spent by {hospitals} hospitals: the largest, median and smallest after each round")
    axis.title.set_fontsize(10)
    _round_axis(axis, xs)
    axis.grid(alpha=0.3)
    right = axis.twinx()
    right.plot(xs, locked, color="grey", alpha=0.7, marker="s" if len(xs) <= 30 else None, markersize=4,
               label="hospitals locked (right axis)")
    right.set(ylabel="hospitals locked", ylim=(0, hospitals * 1.05))
    handles = axis.get_legend_handles_labels()
    extra = right.get_legend_handles_labels()
    axis.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8, loc="upper left",
                bbox_to_anchor=(1.1, 1.0), borderaxespad=0)
    return _finish(figure, synthetic)


def privacy_spend(rounds: list[dict[str, Any]], *, synthetic: bool = False) -> bytes | None:
    """:func:`privacy_spend_figure` as PNG bytes (None when there is nothing finite to plot)."""
    figure = privacy_spend_figure(rounds, synthetic=synthetic)
    return None if figure is None else _png(figure)


def record_epsilon_figure(hospitals: list[tuple[str, np.ndarray, float]], *,
                         synthetic: bool = False) -> Figure | None:
    """One panel per hospital: its records' epsilon, sorted, against its budget (dashed). Beyond
    MAX_RECORD_PANELS hospitals, one panel of every hospital's records as shares of its own budget.

    ``hospitals`` holds (name, per-record epsilon, budget). Records at infinity (non-private use)
    cannot be drawn on the axis; each panel says how many there are. None when no record of any
    hospital has a finite epsilon (a non-private run: nothing to plot).
    """
    if not any(np.isfinite(epsilon).any() for _, epsilon, _ in hospitals):
        return None
    if len(hospitals) > MAX_RECORD_PANELS:
        return _record_budget_shares_figure(hospitals, synthetic)
    columns = min(len(hospitals), 3)
    rows = math.ceil(len(hospitals) / columns)
    figure = new_figure(3.4 * columns + 0.6, 2.9 * rows)
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
    return _finish(figure, synthetic)


def _record_budget_shares_figure(hospitals: list[tuple[str, np.ndarray, float]], synthetic: bool) -> Figure:
    """Every hospital's records in one panel: each record's epsilon as a share of its hospital's own
    budget, sorted, against the share 1 (dashed). A panel per hospital would grow the figure without
    bound (at 1,000 hospitals 1,188 x 106,546 pixels, two minutes to draw); the shares put every budget
    on one line."""
    figure = new_figure(8.0, 4.4)
    axis = figure.subplots()
    top, infinite, unbudgeted, records = 1.0, 0, [], 0
    for name, epsilon, budget in hospitals:
        records += len(epsilon)
        finite = np.sort(epsilon[np.isfinite(epsilon)])
        infinite += len(epsilon) - len(finite)
        if not (math.isfinite(budget) and budget > 0):
            unbudgeted.append(name)
            continue
        if len(finite):
            share = finite / budget
            axis.plot(np.arange(1, len(share) + 1) / len(share), share, color="tab:blue", linewidth=0.8,
                      alpha=0.35, drawstyle="steps-post")
            top = max(top, float(share[-1]))
    axis.axhline(1.0, color="tab:red", linestyle="--", linewidth=1.2, label="the hospital's budget")
    axis.plot([], [], color="tab:blue", label="one hospital's records")
    axis.set(xlim=(0, 1), ylim=(0, top * 1.15), xlabel="share of the hospital's records, sorted by epsilon",
             ylabel="epsilon / budget",
             title=f"{len(hospitals)} hospitals, {records} records: each record's epsilon as a share of its "
                   "hospital's budget")
    axis.title.set_fontsize(10)
    notes = [f"{infinite} records: epsilon = infinity (not private)"] if infinite else []
    if unbudgeted:
        notes.append(f"not drawn, no finite budget: {', '.join(unbudgeted[:3])}{' ...' if len(unbudgeted) > 3 else ''}")
    if notes:  # off the axis: say it in the panel rather than clip them to its top
        axis.text(0.5, 0.5, "\n".join(notes), ha="center", va="center", transform=axis.transAxes, fontsize=9,
                  color="tab:red", bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "tab:red"})
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    return _finish(figure, synthetic)


def record_epsilon(hospitals: list[tuple[str, np.ndarray, float]], *, synthetic: bool = False) -> bytes | None:
    """:func:`record_epsilon_figure` as PNG bytes (None when there is nothing finite to plot)."""
    figure = record_epsilon_figure(hospitals, synthetic=synthetic)
    return None if figure is None else _png(figure)


def reliability_diagram_figure(report: CalibrationReport, *, synthetic: bool = False) -> Figure:
    """Accuracy against confidence per bin, before and after temperature scaling, with bin counts."""
    figure = new_figure(9, 5)
    axes = figure.subplots(2, 2, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    after = (f"After temperature scaling (T = {report.fitted_temperature:.2f})" if report.applied
             else f"With the fitted T = {report.fitted_temperature:.2f} (NOT applied)")
    panels = ((report.before, "Before (T = 1)"), (report.after, after))
    for column, (metrics, title) in enumerate(panels):
        _reliability_panel(axes[0][column], axes[1][column], metrics, title)
    axes[0][0].set_ylabel("accuracy in bin")
    axes[1][0].set_ylabel("share of images")
    return _finish(figure, synthetic)


def reliability_diagram(report: CalibrationReport, *, synthetic: bool = False) -> bytes:
    """:func:`reliability_diagram_figure` as PNG bytes."""
    return _png(reliability_diagram_figure(report, synthetic=synthetic))


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


def hospital_bars_figure(fairness: HospitalFairness, *, synthetic: bool = False) -> Figure:
    """Grouped bars: each hospital's AUC, accuracy, sensitivity and specificity (private validation).

    The figure widens with the number of hospitals, and beyond six their names are set sideways so
    that they do not run into each other; beyond MAX_HOSPITALS_DRAWN, each metric's spread over them.
    """
    count = len(fairness.rows)
    if count > MAX_HOSPITALS_DRAWN:
        return _hospital_spread_figure(fairness, synthetic)
    figure = new_figure(max(9.0, 2.0 + 0.45 * count), 3.6 if count <= 6 else 4.4)
    axis = figure.subplots()
    width = 0.8 / len(HOSPITAL_METRICS)
    for offset, metric in enumerate(HOSPITAL_METRICS):
        xs = [i + (offset - (len(HOSPITAL_METRICS) - 1) / 2) * width for i in range(count)]
        values = [row[metric] for row in fairness.rows]
        axis.bar(xs, values, width=width, label=metric, color=f"C{offset}")
        for x, value in zip(xs, values, strict=True):
            if math.isnan(value):  # undefined (e.g. one class in that split): say so, not a zero bar
                axis.text(x, 0.02, "n/a", ha="center", fontsize=7, rotation=90, color=f"C{offset}")
    if count > 6:  # upright names of many hospitals would run into each other: read them sideways
        axis.set_xticks(range(count), [row["hospital"] for row in fairness.rows], rotation=90, ha="right",
                        va="center", rotation_mode="anchor")
    else:
        axis.set_xticks(range(count), [row["hospital"] for row in fairness.rows])
    axis.set(ylim=(0, 1.05), ylabel="score",
             title="Final model per hospital (each on its own private validation split; not DP-covered)")
    axis.title.set_fontsize(10)
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _finish(figure, synthetic)


def _hospital_spread_figure(fairness: HospitalFairness, synthetic: bool) -> Figure:
    """Many hospitals: each metric's spread over the hospitals (a box: quartiles and median; whiskers:
    the rest but outliers, drawn as points), with how many hospitals it is undefined for."""
    figure = new_figure(9.0, 4.0)
    axis = figure.subplots()
    values = [[row[m] for row in fairness.rows if not math.isnan(row[m])] for m in HOSPITAL_METRICS]
    undefined = [len(fairness.rows) - len(v) for v in values]
    axis.boxplot([v or [math.nan] for v in values], tick_labels=[
        f"{m}\n(n/a: {n})" if n else m for m, n in zip(HOSPITAL_METRICS, undefined, strict=True)])
    axis.set(ylim=(0, 1.05), ylabel="score",
             title=f"Final model at {len(fairness.rows)} hospitals, the spread over them (each on its own private "
                   "validation split; not DP-covered)")
    axis.title.set_fontsize(10)
    axis.grid(alpha=0.3, axis="y")
    return _finish(figure, synthetic)


def hospital_bars(fairness: HospitalFairness, *, synthetic: bool = False) -> bytes:
    """:func:`hospital_bars_figure` as PNG bytes."""
    return _png(hospital_bars_figure(fairness, synthetic=synthetic))
