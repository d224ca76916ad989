"""Figures and tables a person reads: epsilons shown by one rule, SYNTHETIC said everywhere, readable axes.

The figure tests draw each figure and read what matplotlib rendered (tick labels, axis limits, where
the legend and the labels landed), at 1 to 200 rounds and 1 to 20 hospitals (issue 24, item 6).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpriv import rundir
from fedpriv.app_config import compose_config
from fedpriv.cli.main import absolute_paths
from fedpriv.outputs import RunRecorder
from fedpriv.report import figures
from fedpriv.report.fairness import HospitalFairness
from fedpriv.report.run_report import write_run_report
from fedpriv.report.sweep import collect_results, privacy_utility_figure, write_sweep_report
from fedpriv.roster import HospitalState, Roster, RoundRecord
from fedpriv.rundir import format_epsilon

TINY = ["dataset=synthetic", "dataset.num_samples=240", "federation=iid", "train.batch_size=16", "model.width=4",
        "federation.ledger_scope=run"]
REAL = "pneumoniamnist: 4708/524/624 train/val/test images, 1x28x28, 2 classes (normal, pneumonia), from test"
SYNTHETIC = "SYNTHETIC data (not patient images) - synthetic: 216/24/100 train/val/test images"


# ------------------------------------------------------------------ the one rule for an epsilon


@pytest.mark.parametrize(("value", "budget", "shown"), [
    (2.995, 3.0, "2.995"),       # issue 24: sweep.md showed "3"
    (7.996, 8.0, "7.996"),       # and "8"
    (2.99996, 3.0, "2.99996"),   # four digits would round it onto the budget: more digits
    (3.00004, 3.0, "3.00004"),   # past the budget: never shown as the budget (or below it)
    (3.0, 3.0, "3"),             # exactly the budget reads as the budget
    (1.23456, 3.0, "1.235"),     # far from it: four significant digits
    (0.000123456, 1.0, "0.0001235"),
    (math.inf, 3.0, "inf"),
    (math.nan, 3.0, "nan"),
    ("inf", None, "inf"),        # a run directory's JSON encoding reads too
    (None, 3.0, "nan"),
    (2.99996, None, "3"),        # no budget to compare with: four significant digits
    (2.99996, "inf", "3"),       # no finite budget either
])
def test_an_epsilon_is_never_shown_on_the_other_side_of_its_budget(value, budget, shown):
    assert format_epsilon(value, budget) == shown


@pytest.mark.parametrize("value", [0.5, 2.9951, 2.99999999, 3.0, 3.000000001, 7.99949, 12.0])
def test_the_shown_epsilon_compares_with_the_budget_as_the_true_one_does(value):
    budget = 3.0 if value < 5 else 8.0
    shown = float(format_epsilon(value, budget))
    assert (shown < budget, shown == budget, shown > budget) == (value < budget, value == budget, value > budget)


# ------------------------------------------------------------------ sweep.md, sweep.csv, privacy_utility.png


def _finished_run(run_dir: Path, budget: float, spent: list[float], dataset: str, auc: float = 0.8) -> None:
    """A finished run directory (result.json, metrics) with hospitals at the given epsilons spent."""
    cfg = absolute_paths(compose_config([*TINY, f"privacy.epsilon={budget}"]), run_dir)
    hospitals = [HospitalState(node_id=i, name=f"hospital-{i}", epsilon=e, delta=1e-5, budget_epsilon=budget)
                 for i, e in enumerate(spent, start=1)]
    recorder = RunRecorder(run_dir, cfg, run_dir.name, dataset)
    state = torch.nn.Linear(2, 2).state_dict()
    trained = RoundRecord(1, {h.name: {"status": "trained"} for h in hospitals}, [h.name for h in hospitals],
                          {"auc": auc, "accuracy": 0.7})
    recorder.round_end(trained, state, hospitals)
    recorder.finish(state, hospitals, "all rounds run")


def _sweep(tmp_path: Path, dataset: str) -> Path:
    sweep = tmp_path / "sweep"
    _finished_run(sweep / "0", 3.0, [2.995, 3.00004], dataset, auc=0.7)
    _finished_run(sweep / "1", 8.0, [7.996, 7.5], dataset, auc=0.8)
    return sweep


def test_the_sweep_table_shows_every_epsilon_spent_by_the_one_rule(tmp_path):
    sweep = _sweep(tmp_path, REAL)
    text = write_sweep_report(sweep).read_text()
    assert "| 3 | parallel |" in text and "| 2.995, 3.00004 |" in text  # not "3, 3" (nor "2.9950, 3.0000")
    assert "| 7.996, 7.5 |" in text  # not "8"
    assert "SYNTHETIC" not in text  # a run on real data is not marked
    csv_rows = (sweep / "sweep.csv").read_text().splitlines()
    assert csv_rows[0].endswith(",synthetic") and all(row.endswith(",no") for row in csv_rows[1:])
    assert "2.995 3.00004" in csv_rows[1]  # the CSV keeps every digit


def test_a_synthetic_sweep_says_so_in_its_table_csv_and_plot(tmp_path):
    sweep = _sweep(tmp_path, SYNTHETIC)
    lines = write_sweep_report(sweep).read_text().splitlines()
    assert lines[0] == "# Sweep: privacy against utility (SYNTHETIC data)"
    assert any(line.startswith("**SYNTHETIC data (generated images, not patients)") for line in lines)
    assert all(row.endswith(",SYNTHETIC") for row in (sweep / "sweep.csv").read_text().splitlines()[1:])
    figure = privacy_utility_figure(collect_results(sweep))
    figure.canvas.draw()
    [axis] = figure.axes
    assert "SYNTHETIC" in axis.get_title()
    assert (sweep / "privacy_utility.png").read_bytes().startswith(b"\x89PNG")


def test_a_mixed_sweep_names_its_synthetic_runs(tmp_path):
    sweep = tmp_path / "sweep"
    _finished_run(sweep / "real", 3.0, [2.5], REAL)
    _finished_run(sweep / "generated", 8.0, [7.5], SYNTHETIC)
    text = write_sweep_report(sweep).read_text()
    assert "runs generated trained on generated images" in text
    assert "| generated (SYNTHETIC) |" in text and "| real |" in text


def test_the_privacy_utility_plot_labels_each_point_by_the_one_rule_and_starts_at_zero(tmp_path):
    figure = privacy_utility_figure(collect_results(_sweep(tmp_path, REAL)))
    figure.canvas.draw()
    [axis] = figure.axes
    labels = {text.get_text() for text in axis.texts}
    assert {"3.00004 of 3", "7.996 of 8"} <= labels  # the max over hospitals, never rounded onto its budget
    assert axis.get_xlim()[0] == 0 and axis.get_xlim()[1] > 7.996
    assert "SYNTHETIC" not in axis.get_title()


# ------------------------------------------------------------------ the run's summary (printed on the console)


def test_the_run_summary_never_rounds_an_epsilon_onto_the_budget(tmp_path):
    _finished_run(tmp_path / "run", 3.0, [2.99996, 1.5], REAL)
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "| hospital-1 | 0 | 2.99996 |" in summary and "| hospital-2 | 0 | 1.5 |" in summary


def test_the_round_log_never_rounds_an_epsilon_onto_the_budget():
    roster = Roster()
    roster.admit([HospitalState(node_id=1, name="hospital-1", epsilon=2.9996, delta=1e-5, budget_epsilon=3.0),
                  HospitalState(node_id=2, name="hospital-2", epsilon=7.996, delta=1e-5, budget_epsilon=8.0)])
    assert roster.spent() == "hospital-1 2.9996/3, hospital-2 7.996/8"  # was "3.00/3, 8.00/8"
    assert "epsilon 2.9996/3" in roster.describe() and "epsilon 7.996/8" in roster.describe()


def test_the_round_log_says_each_hospitals_privacy_unit_as_it_reported_it():
    roster = Roster()
    roster.admit([HospitalState(node_id=1, name="hospital-1", epsilon=1.0, delta=1e-5, budget_epsilon=3.0,
                                unit="patient"),
                  HospitalState(node_id=2, name="hospital-2", epsilon=2.0, delta=1e-5, budget_epsilon=3.0,
                                unit="image", locked=True)])
    assert roster.spent() == "hospital-1 1/3 per patient, hospital-2 2/3 per image LOCKED"
    assert "epsilon 1/3 per patient" in roster.describe() and "epsilon 2/3 per image" in roster.describe()


# ------------------------------------------------------------------ the run report's figures, read as rendered


def _rounds(count: int, hospitals: int, *, lock_at: int | None = None, budget: float = 3.0) -> list[dict]:
    """metrics.json's rounds: every hospital spends evenly up to its budget, reached at `lock_at` (locked there)."""
    end = lock_at or count + 1
    return [{"round": r,
             "server": {"auc": 0.5 + 0.4 * r / count, "accuracy": 0.6, "sensitivity": 0.7, "specificity": 0.5,
                        "loss": 1.0 / r},
             "privacy": [{"hospital": f"hospital-{h}", "epsilon": budget * min(r, end) / end,
                          "budget_epsilon": budget, "locked": lock_at is not None and r >= lock_at}
                         for h in range(1, hospitals + 1)]}
            for r in range(1, count + 1)]


def _shown_ticks(axis) -> list:
    """The x tick labels matplotlib drew inside the axis's view, after a draw."""
    axis.figure.canvas.draw()
    low, high = sorted(axis.get_xlim())
    return [label for label, tick in zip(axis.get_xticklabels(), axis.get_xticks(), strict=True)
            if low <= tick <= high and label.get_visible() and label.get_text()]


def _assert_readable(axis) -> list[str]:
    """The shown x tick labels are distinct, do not touch each other and lie inside the figure; returns them."""
    labels = _shown_ticks(axis)
    renderer = axis.figure.canvas.get_renderer()
    boxes = sorted((label.get_window_extent(renderer) for label in labels), key=lambda box: box.x0)
    texts = [label.get_text() for label in labels]
    assert labels and len(set(texts)) == len(texts), texts
    for left, right in zip(boxes, boxes[1:]):
        assert left.x1 < right.x0, f"tick labels run together: {texts}"
    _assert_inside(axis.figure, boxes)
    return texts


def _assert_inside(figure, boxes) -> None:
    outer = figure.bbox
    for box in boxes:
        assert outer.x0 - 1 <= box.x0 and box.x1 <= outer.x1 + 1 and outer.y0 - 1 <= box.y0 and box.y1 <= outer.y1 + 1


def _integers(texts: list[str]) -> list[int]:
    return [int(text.replace("\N{MINUS SIGN}", "-")) for text in texts]


@pytest.mark.parametrize("count", [1, 5, 40, 200])
def test_the_learning_curves_round_axis_is_readable_at_any_number_of_rounds(count):
    figure = figures.learning_curves_figure(_rounds(count, 3))
    for axis in figure.axes:
        ticks = _integers(_assert_readable(axis))
        assert 1 <= len(ticks) <= 12 and min(ticks) >= 0 and max(ticks) <= count + 1
        low, high = axis.get_xlim()
        assert 0 <= low <= 1 and count <= high < count + 0.1 * count + 1  # the rounds run, not -5 to 45
    legend = figure.axes[0].get_legend()
    _assert_inside(figure, [legend.get_window_extent(figure.canvas.get_renderer())])


@pytest.mark.parametrize("count", [1, 5, 40, 200])
@pytest.mark.parametrize("hospitals", [1, 3, 20])
def test_the_privacy_plot_is_readable_at_any_number_of_rounds_and_hospitals(count, hospitals):
    figure = figures.privacy_spend_figure(_rounds(count, hospitals, lock_at=max(1, count // 2)))
    [axis] = figure.axes
    ticks = _integers(_assert_readable(axis))
    low, high = axis.get_xlim()
    assert 0 <= low <= 1 and count <= high < count + 0.1 * count + 1 and min(ticks) >= 0
    # Every hospital locked on its budget: the budget line and the last points sit below the top edge.
    bottom, top = axis.get_ylim()
    assert bottom == 0 and top >= 3.0 * 1.05
    renderer = figure.canvas.get_renderer()
    legend = axis.get_legend()
    names = [text.get_text() for text in legend.get_texts()]
    assert names[:1] == ["hospital-1"] and len(names) == 2 * hospitals  # a name and its lock for each
    box = legend.get_window_extent(renderer)
    _assert_inside(figure, [box])
    assert box.x0 >= axis.get_window_extent(renderer).x1  # beside the plot, never over the curves


def test_a_locked_hospitals_budget_line_is_not_on_the_plots_edge():
    """The issue's case: 40 rounds, locked in round 30, its epsilon at the budget from then on."""
    figure = figures.privacy_spend_figure(_rounds(40, 3, lock_at=30))
    [axis] = figure.axes
    figure.canvas.draw()
    budgets = [line for line in axis.get_lines() if line.get_linestyle() == "--"]
    assert budgets and all(line.get_ydata()[0] == 3.0 for line in budgets)
    assert axis.get_ylim()[1] > 3.0 * 1.05  # a margin above the dashed line


@pytest.mark.parametrize("hospitals", [1, 3, 20])
def test_the_per_hospital_bars_name_every_hospital_readably(hospitals):
    rows = [{"hospital": f"hospital-{h}", "num-examples": 50, "auc": 0.8, "accuracy": 0.7, "sensitivity": 0.6,
             "specificity": math.nan} for h in range(1, hospitals + 1)]
    figure = figures.hospital_bars_figure(HospitalFairness(round=3, rows=rows, gaps=[]))
    [axis] = figure.axes
    labels = _shown_ticks(axis)
    assert [label.get_text() for label in labels] == [row["hospital"] for row in rows]
    renderer = figure.canvas.get_renderer()
    boxes = sorted((label.get_window_extent(renderer) for label in labels), key=lambda box: box.x0)
    for left, right in zip(boxes, boxes[1:]):
        assert not left.overlaps(right), [label.get_text() for label in labels]
    _assert_inside(figure, boxes)


@pytest.mark.parametrize("hospitals", [1, 3, pytest.param(figures.MAX_RECORD_PANELS, marks=pytest.mark.slow)])
def test_the_per_record_panels_show_each_budget_below_the_top(hospitals):
    rng = np.random.default_rng(0)
    spreads = [(f"hospital-{h}", np.append(rng.uniform(0, 2.0, 30), 2.0), 2.0) for h in range(1, hospitals + 1)]
    figure = figures.record_epsilon_figure(spreads)
    figure.canvas.draw()
    shown = [axis for axis in figure.axes if axis.get_visible()]
    assert [axis.get_title() for axis in shown] == [f"hospital-{h} (31 records)" for h in range(1, hospitals + 1)]
    assert all(axis.get_ylim()[1] > 2.0 * 1.05 for axis in shown)
    renderer = figure.canvas.get_renderer()
    titles = [axis.title.get_window_extent(renderer) for axis in shown]
    _assert_inside(figure, titles)
    assert not any(a.overlaps(b) for i, a in enumerate(titles) for b in titles[i + 1:])


@pytest.mark.parametrize("hospitals", [figures.MAX_RECORD_PANELS + 1, pytest.param(1000, marks=pytest.mark.slow)])
def test_many_hospitals_share_one_panel_of_their_records_budget_shares(hospitals):
    """A panel per hospital grew the figure without bound (1,188 x 106,546 pixels at 1,000 hospitals)."""
    rng = np.random.default_rng(1)
    spreads = [(f"hospital-{h}", np.append(rng.uniform(0, 2.0, 30), 2.0), 2.0) for h in range(1, hospitals)]
    spreads.append(("last", np.array([1.0, np.inf]), 4.0))  # a record used non-privately, a budget of 4
    figure = figures.record_epsilon_figure(spreads)
    [axis] = [a for a in figure.axes if a.get_visible()]
    assert f"{hospitals} hospitals, {31 * (hospitals - 1) + 2} records" in axis.get_title()
    drawn = [line for line in axis.get_lines() if line.get_color() == "tab:blue" and len(line.get_xdata())]
    assert len(drawn) == hospitals
    shares = sorted(max(line.get_ydata()) for line in drawn)
    assert shares[0] == pytest.approx(0.25) and shares[-1] == pytest.approx(1.0)  # 1.0 of 4; 2.0 of 2
    assert axis.get_ylim()[1] > 1.05  # the budget line (share 1) is never on the edge
    assert "1 records: epsilon = infinity" in " ".join(text.get_text() for text in axis.texts)
    width, height = _png_size(figures.record_epsilon(spreads))
    assert width * height < 1500 * 1000, (width, height)  # the same size whatever the number of hospitals


def _png_size(png: bytes) -> tuple[int, int]:
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


@pytest.mark.parametrize("hospitals", [figures.MAX_HOSPITALS_DRAWN + 1, 1000])
def test_with_many_hospitals_the_privacy_figure_shows_their_spread_and_how_many_locked(hospitals):
    rounds = [{"round": r, "privacy": [{"hospital": f"hospital-{h}", "epsilon": r * (1 + h % 3) / 3, "budget_epsilon": 3.0,
                                        "locked": r == 3 and h % 2 == 0} for h in range(hospitals)]} for r in (1, 2, 3)]
    figure = figures.privacy_spend_figure(rounds)
    left, right = figure.axes
    lines = {line.get_label(): list(line.get_ydata()) for line in left.get_lines()}
    assert lines["largest epsilon of a hospital"] == pytest.approx([1, 2, 3])
    assert lines["median epsilon of a hospital"] == pytest.approx([2 / 3, 4 / 3, 2])
    assert lines["smallest epsilon of a hospital"] == pytest.approx([1 / 3, 2 / 3, 1])
    assert "budget 3" in lines and left.get_ylim()[1] > 3.0 * 1.05  # the budget is not on the plot's edge
    assert list(right.get_lines()[0].get_ydata()) == [0, 0, math.ceil(hospitals / 2)]  # locked after round 3
    assert f"by {hospitals} hospitals" in left.get_title()
    assert (figures.MAX_HOSPITALS_DRAWN, figures.MAX_RECORD_PANELS) == (30, 12)  # as the README says
    width, height = _png_size(figures.privacy_spend(rounds))
    assert width < 1500 and height < 700  # one size, whatever the number of hospitals


@pytest.mark.parametrize("hospitals", [figures.MAX_HOSPITALS_DRAWN + 1, 1000])
def test_with_many_hospitals_the_validation_figure_shows_each_metrics_spread(hospitals):
    rows = [{"hospital": f"hospital-{h}", "num-examples": 30, "auc": h / hospitals, "accuracy": 0.5,
             "sensitivity": math.nan if h % 4 == 0 else 0.7, "specificity": 0.6} for h in range(hospitals)]
    fairness = HospitalFairness(round=3, rows=rows, gaps=[])
    [axis] = figures.hospital_bars_figure(fairness).axes
    labels = [label.get_text() for label in axis.get_xticklabels()]
    assert labels == ["auc", "accuracy", f"sensitivity\n(n/a: {math.ceil(hospitals / 4)})", "specificity"]
    medians = [line.get_ydata()[0] for line in axis.get_lines() if line.get_color() in ("C1", "#ff7f0e")]
    assert medians == pytest.approx([np.median([h / hospitals for h in range(hospitals)]), 0.5, 0.7, 0.6])
    assert f"at {hospitals} hospitals" in axis.get_title() and "not DP-covered" in axis.get_title()
    width, height = _png_size(figures.hospital_bars(fairness))
    assert width < 1500 and height < 700


def test_every_figure_of_a_synthetic_run_says_synthetic():
    rounds = _rounds(5, 2)
    fairness = HospitalFairness(round=5, rows=[{"hospital": "hospital-1", "num-examples": 5, "auc": 0.8,
                                                 "accuracy": 0.7, "sensitivity": 0.6, "specificity": 0.5}], gaps=[])
    spreads = [("hospital-1", np.array([1.0, 2.0]), 3.0)]
    for synthetic in (True, False):
        built = [figures.learning_curves_figure(rounds, synthetic=synthetic),
                 figures.privacy_spend_figure(rounds, synthetic=synthetic),
                 figures.hospital_bars_figure(fairness, synthetic=synthetic),
                 figures.record_epsilon_figure(spreads, synthetic=synthetic)]
        for figure in built:
            assert ("SYNTHETIC" in figure.get_suptitle()) is synthetic


@pytest.mark.slow  # writes a whole run report (calibration included)
def test_the_figures_of_a_synthetic_runs_report_say_synthetic(tmp_path):
    """The figures/ PNGs of a run report are files of their own: a synthetic run's say so in their pixels too."""
    run = tmp_path / "run"
    _finished_run(run, 3.0, [2.5, 1.0], SYNTHETIC)
    rendered = {}
    for synthetic in (False, True):
        rendered[synthetic] = figures.learning_curves(rundir.read_metrics(run)["rounds"], synthetic=synthetic)
    write_run_report(run)
    assert (run / "figures" / "learning_curves.png").read_bytes() == rendered[True] != rendered[False]
