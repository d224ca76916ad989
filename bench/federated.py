"""Federated accuracy under privacy: 3 hospitals, Dirichlet(0.5) label skew, PneumoniaMNIST.

Runs `fedpriv` sweeps (real Flower simulations) over mode x privacy x seed, then prints mean and
spread of test AUC and accuracy, and the epsilon each hospital actually spent. Results go to
bench/results/federated-*.json; the sweep directories stay under bench/results/ for inspection.

    FEDPRIV_DATA_DIR=../shared/data .venv/bin/python bench/federated.py [--seeds 0 1 2] [--quick] [overrides...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fedpriv.report.sweep import collect_results

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--privacy", nargs="+", default=["privacy.epsilon=3", "privacy=none"],
                        help="one sweep entry per privacy setting")
    parser.add_argument("--modes", nargs="+", default=["parallel", "sequential"], choices=["parallel", "sequential"])
    parser.add_argument("--quick", action="store_true", help="one seed, 2 rounds (smoke)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    seeds = [0] if args.quick else args.seeds
    extra = [*args.overrides, *(["strategy.num_rounds=2"] if args.quick else [])]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    summary = []
    for privacy in args.privacy:
        sweep_dir = RESULTS / f"federated-{stamp}" / privacy.replace("=", "-")
        command = [sys.executable, "-m", "fedpriv.cli.main", "-m", privacy, f"strategy={','.join(args.modes)}",
                   f"seed={','.join(map(str, seeds))}", f"hydra.sweep.dir={sweep_dir}",
                   # Public benchmark data, every run an experiment of its own: a throw-away ledger per run, so
                   # that runs never share (and exhaust) one persistent budget for the same records.
                   "federation.ledger_scope=run", *extra]
        started = time.perf_counter()
        subprocess.run(command, check=True)
        wall = time.perf_counter() - started
        for mode in args.modes:
            rows = [r for r in collect_results(sweep_dir) if r["mode"] == mode]
            summary.append(_aggregate(privacy, mode, rows, wall / len(args.modes)))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"federated-{stamp}.json").write_text(json.dumps(summary, indent=2))
    print("\n| setting | mode | test AUC | test accuracy | epsilon spent (max) | runs |\n|---|---|---|---|---|---|")
    for row in summary:
        print(f"| {row['privacy']} | {row['mode']} | {row['auc_mean']:.3f} ± {row['auc_std']:.3f} | "
              f"{row['accuracy_mean']:.3f} ± {row['accuracy_std']:.3f} | {row['epsilon_spent_max']} | {row['runs']} |")


def _aggregate(privacy: str, mode: str, rows: list[dict], seconds: float) -> dict:
    auc = [r["auc"] for r in rows]
    acc = [r["accuracy"] for r in rows]
    spread = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    return {"privacy": privacy, "mode": mode, "runs": len(rows), "seconds_per_mode": seconds,
            "auc_mean": statistics.mean(auc), "auc_std": spread(auc),
            "accuracy_mean": statistics.mean(acc), "accuracy_std": spread(acc),
            "epsilon_spent_max": max(r["epsilon_spent_max"] for r in rows), "per_run": rows}


if __name__ == "__main__":
    main()
