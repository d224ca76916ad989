"""Sweep start-up: a six-point Hydra multirun with one SuperLink (and Ray) per job, against one shared.

Runs the same `fedpriv -m privacy.epsilon=1,2,3,4,6,8 ...` sweep (3 hospitals, 10 rounds by default)
once per FEDPRIV_SHARED_RUNTIME mode, one after the other in this one invocation, and reports for each
sweep its wall time and, per job, the job's wall time (Hydra's "#N :" line to fedpriv's "Run finished"
line), the compute inside it (every hospital's local training and validation plus the server's test
evaluation, as bench/federation_overhead.py counts it) and their ratio.

    FEDPRIV_DATA_DIR=../shared/data .venv/bin/python bench/sweep_startup.py [--rounds 10]
        [--modes off,superlink+ray,superlink] [overrides...]

Writes bench/results/sweep_startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from federation_overhead import compute_seconds  # noqa: E402

RESULTS = Path(__file__).parent / "results"
STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def _when(line: str) -> float | None:
    found = STAMP.match(line)
    return datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if found else None


def job_walls(output: str) -> dict[int, float]:
    """Each job's wall time from the sweep's output: its "#N :" launch line to its "Run finished" line."""
    starts, walls, current = {}, {}, None
    for line in output.splitlines():
        when = _when(line)
        launch = re.search(r"\[HYDRA\] \t#(\d+) :", line)
        if launch and when is not None:
            current = int(launch.group(1))
            starts[current] = when
        elif current is not None and when is not None and "Run finished; outputs in" in line:
            walls[current] = when - starts[current]
    return walls


def run_sweep(mode: str, rounds: int, epsilons: str, overrides: list[str]) -> dict:
    sweep_dir = Path(tempfile.mkdtemp(prefix=f"fedpriv-sweep-{mode.replace('+', '-')}-"))
    command = [sys.executable, "-m", "fedpriv.cli.main", "-m", f"privacy.epsilon={epsilons}",
               f"strategy.num_rounds={rounds}", "federation.ledger_scope=run", f"hydra.sweep.dir={sweep_dir}",
               *overrides]
    started = time.perf_counter()
    completed = subprocess.run(command, env={**os.environ, "FEDPRIV_SHARED_RUNTIME": mode},
                               capture_output=True, text=True)
    wall = time.perf_counter() - started
    (sweep_dir / "sweep-output.log").write_text(completed.stdout + completed.stderr)
    if completed.returncode != 0:
        raise SystemExit(f"the {mode} sweep failed ({completed.returncode}): {completed.stderr[-2000:]}")
    return analyse(mode, sweep_dir, wall)


def analyse(mode: str, sweep_dir: Path, wall: float) -> dict:
    """The figures of the sweep in `sweep_dir` (its output in sweep-output.log), which took `wall` s."""
    walls = job_walls((sweep_dir / "sweep-output.log").read_text())
    jobs = []
    for number, job_wall in sorted(walls.items()):
        parts = compute_seconds(sweep_dir / str(number))
        compute = parts["train"] + parts["local_eval"] + parts["server_eval"]
        jobs.append({"job": number, "wall_seconds": job_wall, "compute_seconds": compute,
                     "wall_over_compute": job_wall / compute, "rounds_seconds": parts["rounds"],
                     # the fixed part: start-up, finding the hospitals, final report, shutdown
                     "outside_rounds_seconds": job_wall - parts["rounds"]})
    later = jobs[1:]
    return {"mode": mode, "sweep_wall_seconds": wall, "jobs": jobs,
            "job_wall_sum": sum(job["wall_seconds"] for job in jobs),
            "compute_sum": sum(job["compute_seconds"] for job in jobs),
            "wall_over_compute_all": sum(j["wall_seconds"] for j in jobs) / sum(j["compute_seconds"] for j in jobs),
            "later_jobs_median_wall": statistics.median(j["wall_seconds"] for j in later) if later else None,
            "later_jobs_median_outside_rounds": (statistics.median(j["outside_rounds_seconds"] for j in later)
                                                 if later else None),
            "later_jobs_wall_over_compute": (sum(j["wall_seconds"] for j in later)
                                             / sum(j["compute_seconds"] for j in later)) if later else None,
            "sweep_dir": str(sweep_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epsilons", default="1,2,3,4,6,8")
    parser.add_argument("--modes", default="off,superlink+ray,superlink")
    parser.add_argument("--reanalyse", action="store_true", help="recompute the figures of the last results file")
    parser.add_argument("--quick", action="store_true", help="two 2-round jobs on small synthetic data (smoke)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.epsilons, args.overrides = 2, "1,8", ["experiment=smoke", *args.overrides]
    rows = []
    if args.reanalyse:
        rows = [analyse(row["mode"], Path(row["sweep_dir"]), row["sweep_wall_seconds"])
                for row in json.loads((RESULTS / "sweep_startup.json").read_text())]
    for mode in [] if args.reanalyse else args.modes.split(","):
        row = run_sweep(mode, args.rounds, args.epsilons, args.overrides)
        rows.append(row)
        print(json.dumps({key: value for key, value in row.items() if key != "jobs"}), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sweep_startup.json").write_text(json.dumps(rows, indent=2))
    print("\n| | " + " | ".join(row["mode"] for row in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    print("| sweep wall time (s) | " + " | ".join(f"{row['sweep_wall_seconds']:.1f}" for row in rows) + " |")
    print("| job walls (s) | " + " | ".join(", ".join(f"{j['wall_seconds']:.1f}" for j in row["jobs"])
                                          for row in rows) + " |")
    print("| job time outside its rounds (s) | " + " | ".join(
        ", ".join(f"{j['outside_rounds_seconds']:.1f}" for j in row["jobs"]) for row in rows) + " |")
    print("| job wall / compute, all jobs | "
          + " | ".join(f"{row['wall_over_compute_all']:.2f}" for row in rows) + " |")
    print("| jobs 2-6 wall / compute | " + " | ".join(f"{row['later_jobs_wall_over_compute']:.2f}" for row in rows)
          + " |")


if __name__ == "__main__":
    main()
