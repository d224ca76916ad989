"""model=scatnet through `fedpriv` itself: validation and test AUC / accuracy per mode and seed, with wall time.

Each run is a real Flower simulation (3 hospitals, Dirichlet(0.5) by default, a throw-away ledger).
After it, the run's final model is evaluated on the official **validation** split (what recipes are
chosen on) and the test split (what is reported; never used to choose). One JSON line per run goes to
bench/results/scatnet.jsonl; a table of mean ± sd per (label, mode) is printed at the end.

    FEDPRIV_DATA_DIR=../shared/data nice -n 10 .venv/bin/python bench/scatnet.py --label eps3 \
        --seeds 0 1 2 --modes parallel sequential -- privacy.epsilon=3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def evaluate_run(run_dir: Path) -> dict[str, float]:
    """Validation and test AUC / accuracy of the run's final model (argmax, no temperature: T keeps the ranking)."""
    from fedpriv import rundir
    from fedpriv.data import load_dataset
    from fedpriv.report.evaluation import load_run_model
    from fedpriv.training import evaluate

    loaded = load_run_model(run_dir)
    cfg = rundir.read_config(run_dir)
    dataset = load_dataset(cfg.dataset, cfg.seed)
    out = {}
    for split in ("val", "test"):
        metrics = evaluate(loaded.model, getattr(dataset, split).as_dataset()).metrics()
        out[f"{split}_auc"], out[f"{split}_accuracy"] = metrics["auc"], metrics["accuracy"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="names this setting in the results")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=["parallel", "sequential"], choices=["parallel", "sequential"])
    parser.add_argument("--model", default="scatnet")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for mode in args.modes:
        for seed in args.seeds:
            run_dir = RESULTS / f"scatnet-{stamp}" / f"{args.label}-{mode}-{seed}"
            command = [sys.executable, "-m", "fedpriv.cli.main", f"model={args.model}", f"strategy={mode}",
                       f"seed={seed}", f"hydra.run.dir={run_dir}",
                       # Public benchmark data: a throw-away ledger per run, so runs never exhaust one budget.
                       "federation.ledger_scope=run", *args.overrides]
            started = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - started
            result = json.loads((run_dir / "result.json").read_text())
            row = {"label": args.label, "model": args.model, "mode": mode, "seed": seed, "wall_s": round(wall, 1),
                   "overrides": args.overrides, "run_dir": str(run_dir),
                   "epsilon_spent_max": max(float(h["epsilon"]) for h in result["hospitals"]),
                   **evaluate_run(run_dir)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            RESULTS.mkdir(exist_ok=True)
            with open(RESULTS / "scatnet.jsonl", "a") as handle:
                handle.write(json.dumps(row) + "\n")
    print("\n| setting | mode | val AUC | val acc. | test AUC | test acc. | runs | wall s / run |\n"
          "|---|---|---|---|---|---|---|---|")
    for mode in args.modes:
        mine = [r for r in rows if r["mode"] == mode]
        cells = [_mean_sd([r[key] for r in mine]) for key in ("val_auc", "val_accuracy", "test_auc", "test_accuracy")]
        print(f"| {args.label} | {mode} | {' | '.join(cells)} | {len(mine)} | "
              f"{statistics.mean(r['wall_s'] for r in mine):.0f} |")


def _mean_sd(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


if __name__ == "__main__":
    main()
