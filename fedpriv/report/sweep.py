"""Sweep report: one table and a privacy-utility plot over the runs of a Hydra multirun.

Each run directory holds `result.json` (written by the ServerApp when the run ends). The report
reads them all, so it can be regenerated at any time with `fedpriv-sweep-report DIR`.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from matplotlib.figure import Figure

from fedpriv import rundir
from fedpriv.errors import FedprivError
from fedpriv.report.figures import new_figure
from fedpriv.report.run_report import write_run_report
from fedpriv.rundir import format_epsilon, number

log = logging.getLogger("fedpriv")


def collect_results(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every finished run below `sweep_dir`, sorted by mode and epsilon budget."""
    rows = []
    for path in rundir.result_files(sweep_dir):
        result = rundir.read_json(path)
        spent = [number(h["epsilon"]) for h in result["hospitals"]]
        rows.append({
            "run": str(path.parent.relative_to(sweep_dir)) or ".",
            "mode": result["mode"],
            "epsilon_budget": number(result["epsilon_budget"]),
            "auc": number(result["test"].get("auc")),
            "accuracy": number(result["test"].get("accuracy")),
            "epsilon_spent_max": max(spent, default=math.nan),
            "epsilon_spent": spent,
            "rounds_run": result["rounds_run"],
            "untrained": result.get("rounds_trained") == 0,  # no hospital trained: no test metric
            "stop_reason": result["stop_reason"],
            "seed": result.get("seed", 0),
            "ledger_scope": result.get("ledger_scope", "persistent"),  # "run": a throw-away ledger
            # The data description of a run on generated images starts with SYNTHETIC (fedpriv.data).
            "synthetic": str(result.get("dataset", "")).startswith("SYNTHETIC"),
        })
    return sorted(rows, key=lambda r: (r["mode"], r["epsilon_budget"], r["seed"]))


SYNTHETIC = ("SYNTHETIC data (generated images, not patients): these results say nothing clinical.")


def _fmt(value: float) -> str:
    return "inf (not private)" if math.isinf(value) else f"{value:g}"


def _spent(value: float, budget: float) -> str:
    """An epsilon spent, by the one rule (never shown at or past its budget when it is not, nor the reverse)."""
    return "inf (not private)" if math.isinf(value) else format_epsilon(value, budget)


def _synthetic_runs(rows: list[dict[str, Any]]) -> str:
    """"" when every run trained on real data; else which runs used synthetic data (all, or their names)."""
    synthetic = [r["run"] for r in rows if r["synthetic"]]
    if not synthetic:
        return ""
    return "every run" if len(synthetic) == len(rows) else "runs " + ", ".join(synthetic)


def write_sweep_report(sweep_dir: str | Path) -> Path:
    """Write sweep.md, sweep.csv and privacy_utility.png into `sweep_dir`; returns the Markdown path."""
    sweep_dir = Path(sweep_dir)
    rows = collect_results(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"no finished runs ({rundir.RESULT}) under {sweep_dir}")
    with open(sweep_dir / rundir.SWEEP_CSV, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "mode", "epsilon_budget", "test_auc", "test_accuracy", "epsilon_spent_max",
                         "epsilon_spent_per_hospital", "rounds_run", "seed", "synthetic"])
        for r in rows:  # every digit here (repr of the float): the CSV is for programs
            writer.writerow([r["run"], r["mode"], r["epsilon_budget"], r["auc"], r["accuracy"],
                             r["epsilon_spent_max"], " ".join(str(e) for e in r["epsilon_spent"]),
                             r["rounds_run"], r["seed"], "SYNTHETIC" if r["synthetic"] else "no"])
    synthetic = _synthetic_runs(rows)
    lines = ["# Sweep: privacy against utility" + (" (SYNTHETIC data)" if synthetic else ""), "",
             *([f"**{SYNTHETIC}** ({synthetic} trained on generated images.)", ""] if synthetic else []),
             "| epsilon budget | mode | test AUC | test accuracy | epsilon spent per hospital | rounds | run |",
             "|---:|---|---:|---:|---|---:|---|"]
    for r in rows:
        spent = ", ".join(_spent(e, r["epsilon_budget"]) for e in r["epsilon_spent"])
        auc, accuracy = ("UNTRAINED", "UNTRAINED") if r["untrained"] else (f"{r['auc']:.4f}", f"{r['accuracy']:.4f}")
        run = f"{r['run']} (SYNTHETIC)" if r["synthetic"] and synthetic != "every run" else r["run"]
        lines.append(f"| {_fmt(r['epsilon_budget'])} | {r['mode']} | {auc} | {accuracy} | "
                     f"{spent} | {r['rounds_run']} | {run} |")
    lines += ["", *_ledger_sentences(rows), f"![privacy-utility]({rundir.SWEEP_PLOT})", ""]
    plot_privacy_utility(rows, sweep_dir / rundir.SWEEP_PLOT)
    report = sweep_dir / rundir.SWEEP_MD
    report.write_text("\n".join(lines))
    log.info("sweep report written to %s", report)
    return report


def _ledger_sentences(rows: list[dict[str, Any]]) -> list[str]:
    """What "epsilon spent" counts: every use of the data, or (throw-away ledgers) that run only."""
    throwaway = [r["run"] for r in rows if r["ledger_scope"] == "run"]
    if not throwaway:
        return ["Epsilon spent is each hospital's cumulative epsilon from its own ledger."]
    if len(throwaway) == len(rows):
        return ["Epsilon spent is what each run spent on each hospital's data: every run of this sweep charged a "
                "throw-away ledger (federation.ledger_scope=run), so each budget was enforced within that run "
                "only, not over the sweep or any other use of the data."]
    return ["Epsilon spent is each hospital's cumulative epsilon from its own ledger, except in runs "
            f"{', '.join(throwaway)}: they charged a throw-away ledger (federation.ledger_scope=run), so their "
            "budget was enforced within that run only."]


def privacy_utility_figure(rows: list[dict[str, Any]]) -> Figure:
    """Test AUC against the epsilon actually spent (max over hospitals), one line per mode.

    Each point is labelled with that epsilon (by the one rule) and its budget; a non-private run is a
    dashed line at its AUC; a run that trained nothing has no AUC and no point. The title says
    SYNTHETIC when any run trained on generated images. matplotlib's object API (no pyplot): the
    sweep callback runs inside Hydra's process, whose backend this must not change.
    """
    figure = new_figure(6.4, 4.2)
    axis = figure.subplots()
    for index, mode in enumerate(sorted({r["mode"] for r in rows})):
        color = f"C{index % 10}"
        trained = [r for r in rows if r["mode"] == mode and not r["untrained"] and math.isfinite(r["auc"])]
        private = sorted((r for r in trained if math.isfinite(r["epsilon_spent_max"])),
                         key=lambda r: (r["epsilon_spent_max"], r["epsilon_budget"]))
        if private:
            axis.plot([r["epsilon_spent_max"] for r in private], [r["auc"] for r in private], marker="o",
                      color=color, label=f"{mode}, DP")
            for r in private:
                axis.annotate(f"{format_epsilon(r['epsilon_spent_max'], r['epsilon_budget'])} of "
                              f"{_fmt(r['epsilon_budget'])}", (r["epsilon_spent_max"], r["auc"]),
                              textcoords="offset points", xytext=(4, 6), fontsize=7, color=color)
        for r in trained:
            if not math.isfinite(r["epsilon_spent_max"]):
                axis.axhline(r["auc"], color=color, linestyle="--", linewidth=1, label=f"{mode}, not private")
    axis.set_xlim(left=0)  # epsilon is never negative: no axis running below zero
    axis.set_xlabel("epsilon spent (max over hospitals)")
    axis.set_ylabel("test ROC-AUC")
    synthetic = _synthetic_runs(rows)
    axis.set_title("Privacy-utility trade-off" + (f"\nSYNTHETIC data ({synthetic}): says nothing clinical"
                                                  if synthetic else ""),
                   color="tab:red" if synthetic else "black", fontsize=10 if synthetic else 12)
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def plot_privacy_utility(rows: list[dict[str, Any]], path: Path) -> None:
    """Save :func:`privacy_utility_figure` as a PNG."""
    privacy_utility_figure(rows).savefig(path, dpi=120)


class SweepReportCallback(Callback):
    """Hydra callback: write the sweep report when a multirun ends."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        try:
            write_sweep_report(config.hydra.sweep.dir)
        except (FileNotFoundError, FedprivError) as error:
            log.warning("no sweep report: %s", error)
            return
        # Each run's report was written before the sweep plot existed: refresh them to embed it.
        for result in rundir.result_files(config.hydra.sweep.dir):
            write_run_report(result.parent)
