"""Scale: 3, 30, 100 and 1,000 simulated hospitals on one machine, side by side in one invocation.

For each size, one `fedpriv` run (IID shares, batch 16, RDP accountant, one local epoch a round, 3
rounds by default): time per round, time per round per 1,000 training records (every size trains
the same records each round, so the ideal is a flat line), peak memory of the whole process tree
(RSS sum and PSS sum, sampled every 0.5 s), whether the hospitals' shared ledger verifies, whether
every hospital's reported epsilon equals the one its ledger gives for its records, and whether any
hospital went over its budget. Each run uses a throw-away ledger in its own folder
(`federation.ledger_scope=run`).

PneumoniaMNIST's training split (4,708 images) is too small for 1,000 hospitals: a share of 4-5
images is below what a hospital accepts for a round (`fedpriv.hospital.MIN_RECORDS`, and at least
one batch). The default is therefore fedpriv's synthetic dataset with 50,000 images (35,000 for
training; 31-32 training records a hospital at 1,000 hospitals, a sample rate of about 0.5 at batch
16), the same data at every size. `--dataset pneumoniamnist` runs the earlier measurement.

    FEDPRIV_DATA_DIR=../shared/data nice -n 10 .venv/bin/python bench/scale.py \
        [--sizes 3 30 100 1000] [--rounds 3] [--dataset synthetic] [--num-samples 50000]

`--profile` runs a size in one process under cProfile; `--ledger-only --sizes 300 --rounds 2` times a
round's ledger work alone (alternate it with `PYTHONPATH=<the tree before a change>` for a before/after).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedpriv.process_tree import descendants
from simulated_ledgers import run_ledgers

RESULTS = Path(__file__).parent / "results"


def tree_memory_mb(root: int) -> tuple[float, float]:
    """(RSS sum, PSS sum) of `root` and its descendants, in MB; PSS shares shared pages out."""
    rss = pss = 0
    for pid in [root, *descendants(root)]:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss / 1024, pss / 1024


def load() -> str:
    return Path("/proc/loadavg").read_text().split(" 1/")[0].rsplit(" ", 1)[0]


def run_size(hospitals: int, rounds: int, dataset: str, num_samples: int, timeout: float,
             variant: str = "") -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"fedpriv-scale-{hospitals}-"))
    data = ([f"dataset={dataset}", f"dataset.num_samples={num_samples}"] if dataset == "synthetic"
            else [f"dataset={dataset}"])
    command = [sys.executable, "-m", "fedpriv.cli.main", f"federation.num_hospitals={hospitals}", "federation=iid",
               *data, f"strategy.num_rounds={rounds}", "train.batch_size=16", "strategy.client_evaluate=false",
               "privacy.accountant=rdp", "federation.ledger_scope=run", f"hydra.run.dir={run_dir}",
               *variant.split()]
    load_before = load()
    started, peak_rss, peak_pss = time.perf_counter(), 0.0, 0.0
    # Its own session, so that a run past `timeout` can be ended with everything it started (by its PID).
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while process.poll() is None:
        rss, pss = tree_memory_mb(process.pid)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        if time.perf_counter() - started > timeout:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(60)
            break
        time.sleep(0.5)
    wall = time.perf_counter() - started
    row = {"hospitals": hospitals, "variant": variant, "rounds": rounds, "dataset": dataset, "command": " ".join(command[1:]),
           "run_dir": str(run_dir), "exit_code": process.returncode, "wall_seconds": wall,
           "peak_rss_mb": peak_rss, "peak_pss_mb": peak_pss, "load_before": load_before, "load_after": load()}
    if process.returncode != 0:
        return row
    metrics = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    result = json.loads((run_dir / "result.json").read_text())
    ledgers = run_ledgers(run_dir)
    reported = {h["hospital"]: float(h["epsilon"]) for h in result["hospitals"]}
    mismatches = sum(abs(epsilon - ledgers["hospitals"][name]["epsilon"]) > 1e-9 * max(1.0, epsilon)
                     for name, epsilon in reported.items())
    seconds = [r["seconds"] for r in metrics]
    later = seconds[1:] or seconds
    records = sum(h["records"] for h in ledgers["hospitals"].values())
    row.update({
        "seconds_per_round": seconds, "rounds_done": len(seconds),
        "later_rounds_mean_seconds": sum(later) / len(later),
        "training_records": records,
        "seconds_per_round_per_1000_records": sum(later) / len(later) / records * 1000,
        "ledger_files": ledgers["ledger_files"], "ledger_verified": ledgers["verified"],
        "ledger_events": ledgers["events"], "ledger_bytes": ledgers["bytes"],
        "reported_epsilon_mismatches": mismatches,
        "hospitals_reported": len(reported),
        "hospitals_trained_every_round": sum(h["events"] == len(seconds) and h["unconfirmed"] == 0
                                             for h in ledgers["hospitals"].values()),
        "max_epsilon": max(reported.values()),
        "over_budget": sum(h["epsilon"] > h["budget"] for h in ledgers["hospitals"].values()),
        "test_auc": result["test"].get("auc"),
        "records_per_hospital_min_max": [min(h["records"] for h in ledgers["hospitals"].values()),
                                          max(h["records"] for h in ledgers["hospitals"].values())]})
    return row


def profile(hospitals: int, rounds: int, dataset: str, num_samples: int, top: int = 45) -> None:
    """The same federation in this one process (tests/inprocess_grid.py: real ClientApp handlers, no
    SuperLink, no Ray) under cProfile: where a hospital's per-message time goes, server side included."""
    import cProfile
    import io
    import pstats

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from inprocess_grid import InProcessGrid

    from fedpriv.app_config import CONFIG_KEY, RUN_DIR_KEY, compose_config, config_to_json
    from fedpriv.server_app import run_federation

    run_dir = Path(tempfile.mkdtemp(prefix=f"fedpriv-scale-profile-{hospitals}-"))
    data = [f"dataset={dataset}", f"dataset.num_samples={num_samples}"] if dataset == "synthetic" else [f"dataset={dataset}"]
    cfg = compose_config([f"federation.num_hospitals={hospitals}", "federation=iid", *data,
                          f"strategy.num_rounds={rounds}", "train.batch_size=16", "strategy.client_evaluate=false",
                          "privacy.accountant=rdp", "federation.ledger_scope=run"])
    grid = InProcessGrid(hospitals, {CONFIG_KEY: config_to_json(cfg), RUN_DIR_KEY: str(run_dir)})
    profiler = cProfile.Profile()
    started = time.perf_counter()
    strategy = profiler.runcall(run_federation, grid, cfg, run_dir, run_id="profile")
    wall = time.perf_counter() - started
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"scale-profile-{hospitals}.txt"
    out.write_text(f"{hospitals} hospitals, {rounds} rounds, {dataset}: wall {wall:.1f} s under cProfile; "
                   f"round seconds {[round(r.seconds, 2) for r in strategy.history]}; messages {len(grid.sent)}\n"
                   + text.getvalue())
    print(out.read_text()[:6000])


def ledger_round_cost(hospitals: int, rounds: int, timed: int = 50) -> dict:
    """The ledger work of a round alone (the calls fedpriv.hospital makes), `hospitals` sharing one ledger.

    `rounds` rounds of every hospital fill the ledger (32 records each, RDP); then `timed` hospitals'
    next round is timed. Runs on whatever fedpriv comes first on sys.path, so that
    `PYTHONPATH=<an older tree>` measures the code before a change, alternating with this one.
    """
    import numpy as np

    import fedpriv.privacy.ledger as ledger_module
    from fedpriv.hospital import HospitalSettings, open_ledger

    folder = Path(tempfile.mkdtemp(prefix="fedpriv-scale-ledger-"))
    ids = [np.array([f"r{h}-{i}" for i in range(32)]) for h in range(hospitals)]

    def settings(h: int) -> HospitalSettings:
        return HospitalSettings(name=f"h{h}", budget_epsilon=30.0, delta=1e-5, ledger_path=folder / "l.db",
                                accountant="rdp", ledger_key=folder / "keys" / "l.key", ledger_budget_epsilon=30.0)

    new = hasattr(ledger_module.PrivacyLedger, "round_start")

    def message(h: int, server_round: int) -> None:
        with open_ledger(settings(h)) as ledger:
            if new:
                ledger.round_start(ids[h], budget=30.0)
            else:
                ledger.calibration_history(ids[h], budget=30.0)
                ledger.events()
            charge = ledger.charge(ids[h], noise_multiplier=3.0, batch_size=16, steps=2, run_id="x",
                                   round=server_round, hospital=f"h{h}")
            if new:
                ledger.confirm(charge, steps_done=2, status_of=ids[h], budget=30.0)
            else:
                ledger.confirm(charge, steps_done=2)
                ledger.status(ids[h], budget=30.0)

    fill = []
    for server_round in range(1, rounds + 1):
        started = time.perf_counter()
        for h in range(hospitals):
            message(h, server_round)
        fill.append(time.perf_counter() - started)
    timed = min(timed, hospitals)
    started = time.perf_counter()
    for h in range(timed):
        message(h, rounds + 1)
    return {"code": ledger_module.__file__, "index": new, "hospitals": hospitals, "rounds_before": rounds,
            "fill_round_seconds": fill, "ms_per_hospital_next_round": (time.perf_counter() - started) / timed * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3, 30, 100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dataset", default="synthetic", choices=["synthetic", "pneumoniamnist"])
    parser.add_argument("--num-samples", type=int, default=50_000, help="synthetic images in all (train 70%%)")
    parser.add_argument("--timeout", type=float, default=5400,
                        help="seconds a run may take before it is stopped (1,000 hospitals took over 30 minutes)")
    parser.add_argument("--output", default="scale.json", help="file name under bench/results/")
    parser.add_argument("--profile", action="store_true",
                        help="run each size in this process under cProfile instead (bench/results/scale-profile-N.txt)")
    parser.add_argument("--ledger-only", action="store_true",
                        help="time a round's ledger work alone at each size (--rounds rounds first), no Flower")
    parser.add_argument("--quick", action="store_true", help="3 and 10 hospitals, 1 round, 2,000 images (smoke)")
    parser.add_argument("--variants", nargs="+", default=[""],
                        help="run every size once per variant, in turn: each a string of extra overrides, e.g. "
                             "'strategy.max_in_flight=0' '' (before/after side by side)")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.rounds, args.num_samples = [3, 10], 1, 2_000
    if args.ledger_only:
        for size in args.sizes:
            print(json.dumps(ledger_round_cost(size, args.rounds)), flush=True)
        return
    if args.profile:
        for size in args.sizes:
            profile(size, args.rounds, args.dataset, args.num_samples)
        return
    rows = []
    for size in args.sizes:
        for variant in args.variants:
            rows.append(run_size(size, args.rounds, args.dataset, args.num_samples, args.timeout, variant))
            print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        base = next((r for r in rows if r["hospitals"] == min(args.sizes) and r["variant"] == row["variant"]
                     and "training_records" in r), None)
        if base is not None and "training_records" in row:
            row["per_record_ratio_to_smallest"] = (row["seconds_per_round_per_1000_records"]
                                                   / base["seconds_per_round_per_1000_records"])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.output).write_text(json.dumps(rows, indent=2))
    for row in rows:
        print(row["hospitals"], repr(row["variant"]), row.get("seconds_per_round"), round(row.get("per_record_ratio_to_smallest", 0), 2),
              round(row["peak_pss_mb"]), row.get("ledger_verified"), row.get("max_epsilon"), flush=True)


if __name__ == "__main__":
    main()
