"""The server's own time per reply in a parallel round, for two checkouts side by side in one invocation.

What the strategy does with each training reply (checks, the outlier test, FedAvg, the server step)
is the server-side cost that grows with the number of hospitals. This measures it with fedpriv's
real strategy and ClientApp in one process (tests/inprocess_grid.py: no SuperLink, no Ray, so the
figure is the strategy's alone): for every parallel round, the time of the round minus the time
spent inside the grid (the hospitals training), divided by the number of replies.

Each checkout runs in a fresh process (its own PYTHONPATH) on the same synthetic data and settings;
the checkouts alternate (A, B, A, B, ...) so that load on a shared machine falls on both alike.

    .venv/bin/python bench/strategy_server_time.py --before /tmp/fedpriv-old --after . --hospitals 30 100
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

# Run inside the child process, with the checkout under test first on sys.path.
CHILD = r"""
import json, sys, time
from pathlib import Path
checkout, hospitals, rounds, out = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
sys.path[:0] = [str(checkout), str(checkout / "tests")]
from inprocess_grid import InProcessGrid
from fedpriv.app_config import CONFIG_KEY, RUN_DIR_KEY, compose_config, config_to_json
from fedpriv.server_app import run_federation
from fedpriv.strategy import BudgetAwareStrategy

assert Path(sys.modules["fedpriv"].__file__).is_relative_to(checkout), sys.modules["fedpriv"].__file__
cfg = compose_config(["dataset=synthetic", f"dataset.num_samples={hospitals * 60}", "federation=iid",
                      f"federation.num_hospitals={hospitals}", f"strategy.num_rounds={rounds}",
                      "strategy.client_evaluate=false", "strategy.server_lr=1.5", "train.batch_size=16",
                      "privacy.accountant=rdp", "federation.ledger_scope=run", "privacy.epsilon=1000",
                      "privacy.noise_multiplier=1.0"])
grid = InProcessGrid(hospitals, {CONFIG_KEY: config_to_json(cfg), RUN_DIR_KEY: str(out)})
inside_grid = [0.0]
deliver = grid.send_and_receive

def timed_delivery(messages, **kwargs):
    started = time.perf_counter()
    try:
        return deliver(messages, **kwargs)
    finally:
        inside_grid[0] += time.perf_counter() - started

grid.send_and_receive = timed_delivery
server = []
parallel_round = BudgetAwareStrategy._parallel_round

def timed_round(self, *args, **kwargs):
    inside_grid[0], started = 0.0, time.perf_counter()
    arrays = parallel_round(self, *args, **kwargs)
    server.append(time.perf_counter() - started - inside_grid[0])
    return arrays

BudgetAwareStrategy._parallel_round = timed_round
strategy = run_federation(grid, cfg, out, run_id="bench")
trained = [len(record.trained) for record in strategy.history]
problems = sorted({f"{h['status']}: {h.get('message', '')}" for record in strategy.history
                   for h in record.hospitals.values() if h["status"] != "trained"})
print(json.dumps({"server_s": server, "trained": trained, "problems": problems[:5]}))
"""


def measure(checkout: Path, hospitals: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="fedpriv-strategy-bench-") as folder:
        env = {**os.environ, "FEDPRIV_LEDGER_DIR": str(Path(folder) / "ledgers"),
               "FEDPRIV_KEY_DIR": str(Path(folder) / "keys")}
        done = subprocess.run([sys.executable, "-c", CHILD, str(checkout.resolve()), str(hospitals), str(rounds),
                               str(Path(folder) / "run")], capture_output=True, text=True, env=env, cwd=folder,
                              timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{checkout} at {hospitals} hospitals failed:\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(n == hospitals for n in figures["trained"]), figures  # every hospital trained every round
    per_reply = [seconds / hospitals * 1000 for seconds in figures["server_s"]]
    return {"server_s": figures["server_s"], "ms_per_reply": per_reply}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="checkout A (e.g. a git worktree of the old commit)")
    parser.add_argument("--after", type=Path, default=Path("."), help="checkout B")
    parser.add_argument("--hospitals", type=int, nargs="+", default=[30, 100])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=2, help="A/B pairs per size, alternating")
    parser.add_argument("--out", type=Path, default=RESULTS / "strategy_server_time.json")
    args = parser.parse_args()
    rows = []
    for hospitals in args.hospitals:
        for pair in range(args.pairs):
            for label, checkout in (("before", args.before), ("after", args.after)):
                started = time.monotonic()
                figures = measure(checkout, hospitals, args.rounds)
                rows.append({"hospitals": hospitals, "pair": pair + 1, "checkout": label, **figures,
                             "wall_s": time.monotonic() - started})
                print(f"{hospitals:5d} hospitals, pair {pair + 1}, {label:6s}: server ms per reply "
                      f"{', '.join(f'{v:.2f}' for v in figures['ms_per_reply'])}", flush=True)
    print("\n| hospitals | before: ms per reply (median of rounds, each pair) | after | after / before |")
    print("|---:|---|---|---|")
    for hospitals in args.hospitals:
        medians = {label: [statistics.median(r["ms_per_reply"]) for r in rows
                           if r["hospitals"] == hospitals and r["checkout"] == label] for label in ("before", "after")}
        ratios = [a / b for a, b in zip(medians["after"], medians["before"])]
        print(f"| {hospitals} | {', '.join(f'{v:.2f}' for v in medians['before'])} | "
              f"{', '.join(f'{v:.2f}' for v in medians['after'])} | {', '.join(f'{v:.2f}x' for v in ratios)} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
