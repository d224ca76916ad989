"""Ledger and accounting cost of one hospital, round by round, without the training in between.

For each hospital size it replays what `fedpriv.hospital.train_round` does around training, on a
fresh on-disk ledger: round 1 calibrates sigma for the whole run (PRV accountant by default), then
every round charges the ledger (the prospective budget check), confirms the steps and reads the
status. It reports seconds per part, and compares the calibration side by side with plain
bisection (the method fedpriv used before, kept here as the reference): accountant calls and time.
Divide by the round time of bench/federation_overhead.py for the share of a round.

    .venv/bin/python bench/ledger_cost.py [--records 1300 1600 1900] [--rounds 40] [--epochs 1] [--epsilon 3]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

from fedpriv.privacy import accounting
from fedpriv.privacy.accounting import PrivacyEvent, epsilon, noise_multiplier_for
from fedpriv.privacy.ledger import PrivacyLedger
from fedpriv.privacy.plan import steps_per_epoch

RESULTS = Path(__file__).parent / "results"


def bisection_reference(*, target_epsilon, delta, sample_rate, steps, accountant="prv", tolerance=0.01):
    """The previous calibration: the same cheap RDP bracket, then bisection on the accountant."""
    def total(sigma):
        return epsilon([PrivacyEvent(sigma, sample_rate, steps)], delta, accountant)

    def quick(sigma):
        return accounting._rdp_epsilon([(sigma, sample_rate, steps)], delta, accounting._QUICK_RDP_ORDERS)

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
    accounting._one_step_rdp.cache_clear()
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


def replay(records: int, args, folder: Path) -> dict:
    sample_rate = args.batch / records
    steps = args.epochs * steps_per_epoch(sample_rate)
    problem = dict(target_epsilon=args.epsilon, delta=args.delta, sample_rate=sample_rate, steps=steps * args.rounds)
    sigma, new_seconds, new_calls = counted(noise_multiplier_for, **problem)
    reference, old_seconds, old_calls = counted(bisection_reference, **problem)
    accounting._epsilon_of_history.cache_clear()
    rounds = []
    with PrivacyLedger.open(folder / f"h{records}.sqlite", fingerprint=f"bench-{records}",
                            budget_epsilon=args.epsilon, delta=args.delta) as ledger:
        for round_number in range(1, args.rounds + 1):
            started = time.perf_counter()
            entry = ledger.charge(PrivacyEvent(sigma, sample_rate, steps), run_id="bench", round=round_number)
            charged = time.perf_counter()
            ledger.confirm(entry, steps_done=steps)
            ledger.status()
            rounds.append({"charge": charged - started, "confirm_and_status": time.perf_counter() - charged})
        spent = ledger.status().epsilon_spent
    return {
        "records": records, "sample_rate": sample_rate, "steps_per_round": steps, "sigma": sigma,
        "epsilon_spent": spent,
        "calibration": {"seconds": new_seconds, "accountant_calls": new_calls},
        "calibration_bisection_reference": {"seconds": old_seconds, "accountant_calls": old_calls,
                                            "sigma": reference},
        "per_round_seconds": [r["charge"] + r["confirm_and_status"] for r in rounds],
        "charge_seconds_median": statistics.median(r["charge"] for r in rounds),
        "confirm_and_status_seconds_median": statistics.median(r["confirm_and_status"] for r in rounds),
    }


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
        hospitals = [replay(records, args, Path(folder)) for records in args.records]
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
    }
    row = {"args": vars(args), "summary": summary, "hospitals": hospitals}
    assert all(math.isfinite(h["epsilon_spent"]) and h["epsilon_spent"] <= args.epsilon for h in hospitals)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ledger_cost.json").write_text(json.dumps(row, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
