"""Federation overhead: wall time of a whole simulated federation over the compute it contains.

Runs `fedpriv` (3 hospitals, 10 rounds by default) as a user would, measures its wall time, and
divides by the compute measured inside the same run: every hospital's local training and
validation time plus the server's test evaluation. Start-up (SuperLink, Ray, app submission) is
reported separately: wall time minus the ServerApp's own lifetime; so is the ServerApp's time outside
its rounds (finding the hospitals, whose workers start and import fedpriv then, and the final report).

    FEDPRIV_DATA_DIR=../shared/data .venv/bin/python bench/federation_overhead.py [--rounds 10] [overrides...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def compute_seconds(run_dir: Path) -> dict[str, float]:
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    train = sum(float(h.get("train-seconds") or 0) for r in rounds for h in r["hospitals"].values())
    local_eval = sum(float(m.get("eval-seconds") or 0) for r in rounds for m in r["client_evaluation"].values())
    server_eval = sum(float(r["server"].get("eval-seconds") or 0) for r in rounds)
    ledger = sum(float(h.get("ledger-seconds") or 0) for r in rounds for h in r["hospitals"].values())
    return {"train": train, "local_eval": local_eval, "server_eval": server_eval, "ledger": ledger,
            "rounds": sum(r["seconds"] for r in rounds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="2 rounds on small synthetic data (smoke)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 2
        args.overrides = ["experiment=smoke", *args.overrides]
    run_dir = Path(tempfile.mkdtemp(prefix="fedpriv-overhead-"))
    command = [sys.executable, "-m", "fedpriv.cli.main", f"strategy.num_rounds={args.rounds}",
               f"hydra.run.dir={run_dir}", "federation.ledger_scope=run", *args.overrides]  # a throw-away ledger
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    parts = compute_seconds(run_dir)
    server = json.loads((run_dir / "result.json").read_text())["server_seconds"]
    compute = parts["train"] + parts["local_eval"] + parts["server_eval"]
    row = {"rounds": args.rounds, "overrides": args.overrides, "wall_seconds": wall, "compute_seconds": compute,
           "wall_over_compute": wall / compute, "startup_seconds": wall - server,
           # inside the ServerApp but outside its rounds: finding the hospitals (their workers start,
           # import fedpriv and load their data) and, at the end, calibration and the run report
           "server_outside_rounds_seconds": server - parts["rounds"],
           "rounds_over_compute": parts["rounds"] / compute,
           "ledger_fraction_of_round_time": parts["ledger"] / parts["rounds"], **parts, "run_dir": str(run_dir)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "federation_overhead.json").write_text(json.dumps(row, indent=2))
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
