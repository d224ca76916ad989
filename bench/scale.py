"""Scale: 3, 10, 30 and 100 simulated hospitals on one machine.

For each size, one `fedpriv` run (IID shares of PneumoniaMNIST, 2 rounds by default): time per
round, peak memory of the whole process tree (sampled), whether the hospitals' shared ledger
verifies, and whether every hospital's reported epsilon equals the one its ledger gives for its
records. Each run uses a throw-away ledger in its own folder (`federation.ledger_scope=run`).

    FEDPRIV_DATA_DIR=../shared/data .venv/bin/python bench/scale.py [--sizes 3 10 30 100] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedpriv.process_tree import descendants
from simulated_ledgers import run_ledgers

RESULTS = Path(__file__).parent / "results"


def tree_rss_mb(root: int) -> float:
    total = 0
    for pid in [root, *descendants(root)]:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def run_size(hospitals: int, rounds: int) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"fedpriv-scale-{hospitals}-"))
    command = [sys.executable, "-m", "fedpriv.cli.main", f"federation.num_hospitals={hospitals}", "federation=iid",
               f"strategy.num_rounds={rounds}", "train.batch_size=16", "strategy.client_evaluate=false",
               "privacy.accountant=rdp", "federation.ledger_scope=run", f"hydra.run.dir={run_dir}"]
    started, peak = time.perf_counter(), 0.0
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None:
        peak = max(peak, tree_rss_mb(process.pid))
        time.sleep(0.5)
    wall = time.perf_counter() - started
    metrics = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    result = json.loads((run_dir / "result.json").read_text())
    ledgers = run_ledgers(run_dir)
    reported = {h["hospital"]: float(h["epsilon"]) for h in result["hospitals"]}
    mismatches = sum(abs(epsilon - ledgers["hospitals"][name]["epsilon"]) > 1e-9 * max(1.0, epsilon)
                     for name, epsilon in reported.items())
    return {"hospitals": hospitals, "rounds": rounds, "exit_code": process.returncode, "wall_seconds": wall,
            "seconds_per_round": [r["seconds"] for r in metrics], "peak_rss_mb": peak,
            "ledger_files": ledgers["ledger_files"], "ledger_verified": ledgers["verified"],
            "ledger_events": ledgers["events"], "ledger_bytes": ledgers["bytes"],
            "reported_epsilon_mismatches": mismatches,
            "max_epsilon": max(reported.values()), "test_auc": result["test"].get("auc"),
            "records_per_hospital_min_max": [min(h["records"] for h in ledgers["hospitals"].values()),
                                              max(h["records"] for h in ledgers["hospitals"].values())]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3, 10, 30, 100])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 and 10 hospitals, 1 round (smoke)")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.rounds = [3, 10], 1
    rows = []
    for size in args.sizes:
        rows.append(run_size(size, args.rounds))
        print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
