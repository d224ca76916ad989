"""Reliability under load: many simulated hospitals, many rounds, injected crashes, through Flower.

One `fedpriv` run on PneumoniaMNIST (IID shares) with `faults.train_failure_rate` making a share
of hospital rounds crash right after their ledger charge, and `faults.corrupt_update_rate` making
a share of the hospitals that trained send NaN-poisoned weights (which the server must reject). Afterwards it counts what happened and
checks what must hold: the run completes; the hospitals' shared ledger verifies (its keyed chain and
every record set); no hospital's records spent more than its budget (per record, by the ledger); the
epsilon each hospital reported equals the one its ledger gives for its records (at least the
reported figure where the server marked it a lower bound, after a crash it did not hear about);
the process tree's open files do not grow with the rounds; no process outlives the run. The run
uses a throw-away ledger in its own folder (`federation.ledger_scope=run`).

    FEDPRIV_DATA_DIR=../shared/data .venv/bin/python bench/reliability.py [--hospitals 30] [--rounds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedpriv.process_tree import descendants, processes_mentioning
from simulated_ledgers import run_ledgers

RESULTS = Path(__file__).parent / "results"


def open_files(root: int) -> int:
    """Open file descriptors of `root` and all its descendants (0 for processes that just ended)."""
    total = 0
    for pid in [root, *descendants(root)]:
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
    return total


def completed_rounds(run_dir: Path) -> int:
    try:
        return len(json.loads((run_dir / "metrics.json").read_text())["rounds"])
    except (OSError, ValueError, KeyError):
        return 0


def run(hospitals: int, rounds: int, rate: float, budget: float, corrupt: float) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"fedpriv-reliability-{hospitals}-"))
    command = [sys.executable, "-m", "fedpriv.cli.main", f"federation.num_hospitals={hospitals}", "federation=iid",
               f"strategy.num_rounds={rounds}", "train.batch_size=16", "train.local_epochs=1",
               "strategy.client_evaluate=false", "privacy.accountant=rdp", f"privacy.epsilon={budget}",
               "federation.ledger_scope=run",
               f"faults.train_failure_rate={rate}", f"faults.corrupt_update_rate={corrupt}", f"hydra.run.dir={run_dir}"]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(run_dir / "stderr.log", "w"))
    files_by_round: dict[int, int] = {}
    while process.poll() is None:
        done = completed_rounds(run_dir)
        if done and done not in files_by_round:
            files_by_round[done] = open_files(process.pid)
        time.sleep(0.5)
    wall = time.perf_counter() - started
    left = processes_mentioning(str(run_dir))

    metrics = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    result = json.loads((run_dir / "result.json").read_text())
    statuses: dict[str, int] = {}
    for record in metrics:
        for row in record["hospitals"].values():
            statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    reported = {h["hospital"]: h for h in result["hospitals"]}
    ledgers = run_ledgers(run_dir)
    spent = ledgers["hospitals"]
    overspend = max(h["epsilon"] - h["budget"] for h in spent.values())
    unconfirmed = sum(h["unconfirmed"] for h in spent.values())

    def matches(name: str) -> bool:
        told, held = float(reported[name]["epsilon"]), spent[name]["epsilon"]
        if reported[name].get("epsilon_is_lower_bound"):
            return told <= held * (1 + 1e-9)
        return abs(told - held) <= 1e-9 * max(1.0, held)

    mismatched = sorted(name for name in reported if not matches(name))
    rounds_seen = sorted(files_by_round)
    return {
        "hospitals": hospitals, "rounds_planned": rounds, "rounds_run": len(metrics), "exit_code": process.returncode,
        "stop_reason": result["stop_reason"], "failure_rate": rate, "corrupt_update_rate": corrupt,
        "wall_seconds": round(wall, 1),
        "hospital_rounds": sum(statuses.values()), "statuses": statuses,
        "injected_crashes": statuses.get("failed", 0), "updates_rejected": statuses.get("rejected", 0),
        "charges_kept_unconfirmed": unconfirmed, "ledger_files": ledgers["ledger_files"],
        "ledger_verified": ledgers["verified"], "ledger_events": ledgers["events"], "ledger_bytes": ledgers["bytes"],
        "hospitals_in_ledger": sum(h["events"] > 0 for h in spent.values()),
        "max_overspend_epsilon": max(overspend, 0.0), "reported_equals_ledger": not mismatched,
        "reported_mismatches": mismatched,
        "reported_lower_bounds": sum(bool(h.get("epsilon_is_lower_bound")) for h in reported.values()),
        "open_files_first_round": files_by_round.get(rounds_seen[0]) if rounds_seen else None,
        "open_files_last_round": files_by_round.get(rounds_seen[-1]) if rounds_seen else None,
        "processes_left": left, "test_auc": result["test"].get("auc"), "run_dir": str(run_dir),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hospitals", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--rate", type=float, default=0.1, help="share of hospital rounds that crash")
    parser.add_argument("--corrupt", type=float, default=0.05, help="share of trained updates sent poisoned (NaN)")
    parser.add_argument("--budget", type=float, default=8.0, help="epsilon per hospital")
    parser.add_argument("--quick", action="store_true", help="10 hospitals, 4 rounds (smoke)")
    args = parser.parse_args()
    if args.quick:
        args.hospitals, args.rounds = 10, 4
    row = run(args.hospitals, args.rounds, args.rate, args.budget, args.corrupt)
    print(json.dumps(row, indent=2), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "reliability.json").write_text(json.dumps(row, indent=2))
    for pid in row["processes_left"]:  # a leak is reported above; still, stop what the run left (by PID)
        subprocess.run(["kill", str(pid)], check=False)


if __name__ == "__main__":
    main()
