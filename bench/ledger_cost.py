"""Ledger and accounting cost of the simulated hospitals, round by round, without the training in between.

It replays what `fedpriv.hospital.train_round` does around training, for each hospital size, on
one fresh on-disk ledger that the hospitals share (as simulated hospitals share one ledger per data
source, `fedpriv.site.simulation_ledger_path`; each hospital charges its own records, with
`hospital=` its name): round 1 calibrates sigma for the whole run (PRV accountant by default), then
every round each hospital opens the ledger, reads the calibration history of its records, charges
them (the prospective per-record budget check and its durable write), confirms the steps and reads
the status. It reports seconds per part, and compares the calibration side by side with plain
bisection (the method fedpriv used before, kept here as the reference): accountant calls and time.
Divide by the round time of bench/federation_overhead.py for the share of a round. The cost per
record at larger sizes and longer histories: bench/record_ledger_cost.py.

    .venv/bin/python bench/ledger_cost.py [--records 1300 1600 1900] [--rounds 40] [--epochs 1] [--epsilon 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from fedpriv.privacy import accounting, rdp
from fedpriv.privacy.accounting import PrivacyEvent, epsilon, noise_multiplier_for
from fedpriv.privacy.ledger import PrivacyLedger, read_ledger
from fedpriv.privacy.plan import steps_per_epoch

RESULTS = Path(__file__).parent / "results"


def bisection_reference(*, target_epsilon, delta, sample_rate, steps, accountant="prv", tolerance=0.01):
    """The previous calibration: the same cheap RDP bracket, then bisection on the accountant."""
    def total(sigma):
        return epsilon([PrivacyEvent(sigma, sample_rate, steps)], delta, accountant)

    def quick(sigma):
        return rdp.rdp_epsilon([(sigma, sample_rate, steps)], delta, rdp.QUICK_ORDERS)

    high = 1.0
    while quick(high) > target_epsilon:
        high *= 2
    low = high / 2
    while quick(low) <= target_epsilon and low > 1e-3:
        high, low = low, low / 2
    while total(low) <= target_epsilon and low > 1e-3:
        high, low = low, low / 2
    while high - low > 1e-3 and target_epsilon - total(high) > tolerance:
        middle = (low + high) / 2
        if total(middle) > target_epsilon:
            low = middle
        else:
            high = middle
    return high


def counted(function, **kwargs):
    """(result, seconds, accountant calls) of one calibration from cold caches."""
    accounting._epsilon_of_history.cache_clear()
    rdp.one_step_rdp.cache_clear()
    calls = 0
    original = accounting._opacus_epsilon

    def counting(*args, **kw):
        nonlocal calls
        calls += 1
        return original(*args, **kw)

    accounting._opacus_epsilon = counting
    try:
        started = time.perf_counter()
        result = function(**kwargs)
        return result, time.perf_counter() - started, calls
    finally:
        accounting._opacus_epsilon = original


def record_ids(hospital: str, records: int) -> np.ndarray:
    """Synthetic record ids shaped like fedpriv's content ids (32 hex digits), distinct per hospital."""
    return np.array([hashlib.sha256(f"{hospital}/{i}".encode()).hexdigest()[:32] for i in range(records)])


def calibrate(records: int, args) -> dict:
    """Round 1's calibration of sigma for the whole run, new method against the bisection reference."""
    sample_rate = args.batch / records
    steps = args.epochs * steps_per_epoch(sample_rate)
    problem = dict(target_epsilon=args.epsilon, delta=args.delta, sample_rate=sample_rate, steps=steps * args.rounds)
    sigma, new_seconds, new_calls = counted(noise_multiplier_for, **problem)
    reference, old_seconds, old_calls = counted(bisection_reference, **problem)
    return {"records": records, "sample_rate": sample_rate, "steps_per_round": steps, "sigma": sigma,
            "calibration": {"seconds": new_seconds, "accountant_calls": new_calls},
            "calibration_bisection_reference": {"seconds": old_seconds, "accountant_calls": old_calls,
                                                "sigma": reference}}


def one_round(path: Path, hospital: dict, ids: np.ndarray, round_number: int, args) -> dict:
    """One hospital's ledger work in one round, in train_round's order, timed by part."""
    times = {}
    started = time.perf_counter()
    with PrivacyLedger.open(path, budget_epsilon=args.epsilon, delta=args.delta) as ledger:
        opened = time.perf_counter()
        _, open_records = ledger.calibration_history(ids, budget=args.epsilon)
        checked = time.perf_counter()
        charge = ledger.charge(ids, noise_multiplier=hospital["sigma"], batch_size=args.batch,
                               steps=hospital["steps_per_round"], run_id="bench", round=round_number,
                               hospital=hospital["name"], min_records=args.batch, budget=args.epsilon)
        charged = time.perf_counter()
        ledger.confirm(charge, steps_done=hospital["steps_per_round"])
        status = ledger.status(ids, budget=args.epsilon)
    done = time.perf_counter()
    times.update(open=opened - started, calibration_history=checked - opened, charge=charged - checked,
                 confirm_and_status=done - charged, total=done - started)
    assert open_records == len(ids) and charge.num_records == len(ids)
    return {**times, "epsilon": status.epsilon_spent}


def replay(args, folder: Path) -> list[dict]:
    # Import Opacus and build its accountant once, so that the first calibration does not pay for it.
    epsilon([PrivacyEvent(1.0, 0.01, 10)], args.delta, "prv")
    hospitals = []
    for index, records in enumerate(args.records):
        hospital = calibrate(records, args)
        hospital["name"] = f"hospital_{index}"
        hospitals.append(hospital)
    accounting._epsilon_of_history.cache_clear()
    ids = [record_ids(h["name"], h["records"]) for h in hospitals]
    path = folder / "simulated-bench.db"  # one ledger for every simulated hospital of this data source
    rounds: list[list[dict]] = [[] for _ in hospitals]
    for round_number in range(1, args.rounds + 1):
        for index, hospital in enumerate(hospitals):  # every hospital's round, as the federation runs them
            rounds[index].append(one_round(path, hospital, ids[index], round_number, args))
    with read_ledger(path) as ledger:
        report = ledger.verify()
        events = ledger.events()
        assert report.ok, report.problems
        for index, hospital in enumerate(hospitals):
            hospital["epsilon_spent"] = ledger.status(ids[index], budget=args.epsilon).epsilon_spent
            hospital["events"] = sum(e.hospital == hospital["name"] for e in events)
    for hospital, history in zip(hospitals, rounds, strict=True):
        hospital["per_round_seconds"] = [r["total"] for r in history]
        for part in ("open", "calibration_history", "charge", "confirm_and_status"):
            hospital[f"{part}_seconds_median"] = statistics.median(r[part] for r in history)
    return hospitals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[1300, 1600, 1900])
    parser.add_argument("--rounds", type=int, default=40)  # fedpriv's defaults: 40 rounds of 1 local epoch
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--quick", action="store_true", help="one hospital, 3 rounds (smoke)")
    args = parser.parse_args()
    if args.quick:
        args.records, args.rounds = [1300], 3
    with tempfile.TemporaryDirectory(prefix="fedpriv-ledger-cost-") as folder:
        os.environ["FEDPRIV_KEY_DIR"] = str(Path(folder) / "keys")  # never the user's own key folder
        hospitals = replay(args, Path(folder))
    new = sum(h["calibration"]["seconds"] for h in hospitals)
    old = sum(h["calibration_bisection_reference"]["seconds"] for h in hospitals)
    summary = {
        "calibration_seconds_all_hospitals": new,
        "calibration_seconds_bisection_reference": old,
        "calibration_speedup": old / new,
        "accountant_calls": [h["calibration"]["accountant_calls"] for h in hospitals],
        "accountant_calls_bisection_reference": [h["calibration_bisection_reference"]["accountant_calls"]
                                                 for h in hospitals],
        "per_round_seconds_all_hospitals_after_round_1": sum(
            sum(h["per_round_seconds"][1:]) for h in hospitals) / max(1, args.rounds - 1),
        "whole_run_seconds_all_hospitals": new + sum(sum(h["per_round_seconds"]) for h in hospitals),
        "median_seconds_per_hospital_and_round": {
            part: statistics.median(h[f"{part}_seconds_median"] for h in hospitals)
            for part in ("open", "calibration_history", "charge", "confirm_and_status")},
    }
    row = {"args": vars(args), "summary": summary, "hospitals": hospitals}
    assert all(math.isfinite(h["epsilon_spent"]) and h["epsilon_spent"] <= args.epsilon for h in hospitals)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ledger_cost.json").write_text(json.dumps(row, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
