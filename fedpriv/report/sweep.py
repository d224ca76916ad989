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

from fedpriv import rundir
from fedpriv.errors import FedprivError
from fedpriv.rundir import number

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
        })
    return sorted(rows, key=lambda r: (r["mode"], r["epsilon_budget"], r["seed"]))


def _fmt(value: float) -> str:
    return "inf (not private)" if math.isinf(value) else f"{value:g}"


def _spent(value: float) -> str:
    """An epsilon spent, to 4 decimals and never rounded up (2.9951 of 3 must not read "3")."""
    if math.isinf(value) or math.isnan(value):
        return _fmt(value)
    return f"{math.floor(value * 1e4) / 1e4:.4f}"


def write_sweep_report(sweep_dir: str | Path) -> Path:
    """Write sweep.md, sweep.csv and privacy_utility.png into `sweep_dir`; returns the Markdown path."""
    sweep_dir = Path(sweep_dir)
    rows = collect_results(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"no finished runs ({rundir.RESULT}) under {sweep_dir}")
    with open(sweep_dir / rundir.SWEEP_CSV, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "mode", "epsilon_budget", "test_auc", "test_accuracy", "epsilon_spent_max",
                         "epsilon_spent_per_hospital", "rounds_run", "seed"])
        for r in rows:
            writer.writerow([r["run"], r["mode"], r["epsilon_budget"], r["auc"], r["accuracy"],
                             r["epsilon_spent_max"], " ".join(str(e) for e in r["epsilon_spent"]),
                             r["rounds_run"], r["seed"]])
    lines = ["# Sweep: privacy against utility", "",
             "| epsilon budget | mode | test AUC | test accuracy | epsilon spent per hospital | rounds | run |",
             "|---:|---|---:|---:|---|---:|---|"]
    for r in rows:
        spent = ", ".join(_spent(e) for e in r["epsilon_spent"])
        auc, accuracy = ("UNTRAINED", "UNTRAINED") if r["untrained"] else (f"{r['auc']:.4f}", f"{r['accuracy']:.4f}")
        lines.append(f"| {_fmt(r['epsilon_budget'])} | {r['mode']} | {auc} | {accuracy} | "
                     f"{spent} | {r['rounds_run']} | {r['run']} |")
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


def plot_privacy_utility(rows: list[dict[str, Any]], path: Path) -> None:
    """Test AUC against the epsilon actually spent (max over hospitals), one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for mode in sorted({r["mode"] for r in rows}):
        private = sorted((r["epsilon_spent_max"], r["auc"]) for r in rows
                         if r["mode"] == mode and math.isfinite(r["epsilon_spent_max"]))
        if private:
            axis.plot([p[0] for p in private], [p[1] for p in private], marker="o", label=f"{mode}, DP")
        for r in rows:
            if r["mode"] == mode and not math.isfinite(r["epsilon_spent_max"]):
                axis.axhline(r["auc"], linestyle="--", linewidth=1, label=f"{mode}, not private")
    axis.set_xlabel("epsilon spent (max over hospitals)")
    axis.set_ylabel("test ROC-AUC")
    axis.set_title("Privacy-utility trade-off")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


class SweepReportCallback(Callback):
    """Hydra callback: write the sweep report when a multirun ends."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from fedpriv.report.run_report import write_run_report

        try:
            write_sweep_report(config.hydra.sweep.dir)
        except (FileNotFoundError, FedprivError) as error:
            log.warning("no sweep report: %s", error)
            return
        # Each run's report was written before the sweep plot existed: refresh them to embed it.
        for result in rundir.result_files(config.hydra.sweep.dir):
            write_run_report(result.parent)
