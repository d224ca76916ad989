"""Scale: 3, 10, 30 and 100 simulated hospitals on one machine.

For each size, one `fedpriv` run (IID shares of PneumoniaMNIST, 2 rounds by default): time per
round, peak memory of the whole process tree (sampled), and whether every hospital's reported
epsilon equals the one recomputed from its ledger's events.

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

from fedpriv.privacy.ledger import read_ledger
from fedpriv.simulation import descendants

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
               "privacy.accountant=rdp", f"hydra.run.dir={run_dir}"]
    started, peak = time.perf_counter(), 0.0
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None:
        peak = max(peak, tree_rss_mb(process.pid))
        time.sleep(0.5)
    wall = time.perf_counter() - started
    metrics = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    result = json.loads((run_dir / "result.json").read_text())
    mismatches = 0
    for ledger_path in (run_dir / "ledgers").glob("*.db"):
        ledger = read_ledger(ledger_path)
        if not ledger.verify().ok:
            mismatches += 1
    reported = {h["hospital"]: h["epsilon"] for h in result["hospitals"]}
    return {"hospitals": hospitals, "rounds": rounds, "exit_code": process.returncode, "wall_seconds": wall,
            "seconds_per_round": [r["seconds"] for r in metrics], "peak_rss_mb": peak,
            "ledgers": len(list((run_dir / "ledgers").glob("*.db"))), "ledger_verify_failures": mismatches,
            "max_epsilon": max(float(e) for e in reported.values()), "test_auc": result["test"].get("auc"),
            "records_per_hospital": 4708 // hospitals}


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
