"""Load with injected faults: 12 hospitals x 10 rounds, ~10% of hospital rounds crashing, ~10% poisoned.

In process (the real strategy and ClientApp; no SuperLink) so that it fits in the test suite;
bench/reliability.py runs the larger load of RELIABILITY.md (30 x 20) through Flower's simulation
engine. Each injected crash
happens right after the hospital's ledger charge, the worst moment: budget spent, nothing returned;
each poisoned update (NaN weights from a hospital that did train) must be rejected before aggregation.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_federation import federate, hospital_records, ledger_of

from fedpriv.faults import fault_drawn
from fedpriv.privacy.ledger import read_ledger

pytestmark = pytest.mark.slow  # a federation of 12 hospitals x 10 rounds, in process

HOSPITALS, ROUNDS, RATE, CORRUPT, BUDGET = 12, 10, 0.1, 0.1, 10.0
LOAD = [f"federation.num_hospitals={HOSPITALS}", "dataset.num_samples=600", f"strategy.num_rounds={ROUNDS}",
        f"faults.train_failure_rate={RATE}", f"faults.corrupt_update_rate={CORRUPT}", "train.batch_size=8", "privacy.noise_multiplier=1.5",
        f"privacy.epsilon={BUDGET}",
        "strategy.max_in_flight=5"]  # requests go out a few at a time while replies crash or are rejected


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def _child_processes() -> list[str]:
    children = []
    for task in Path("/proc/self/task").iterdir():
        children += (task / "children").read_text().split()
    return children


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("load")
    # First-use imports open their files; its own ledgers, so that the load run's records are fresh.
    federate(tmp_path, "strategy.num_rounds=1", run="warm-up", ledger_dir=tmp_path / "warm-up-ledgers")
    descriptors = _open_descriptors()
    strategy, grid, run_dir = federate(tmp_path, *LOAD, run="load")
    return strategy, run_dir, descriptors, _open_descriptors()


def test_the_run_completes_and_exactly_the_injected_rounds_fail(loaded):
    strategy, _, _, _ = loaded
    assert strategy.stop_reason == f"completed all {ROUNDS} rounds"
    failed = {(name, record.round) for record in strategy.history
              for name, row in record.hospitals.items() if row["status"] == "failed"}
    drawn = {(f"hospital-{i + 1}", r) for i in range(HOSPITALS) for r in range(1, ROUNDS + 1)
             if fault_drawn(0, i, r, RATE)}
    assert failed == drawn and 0.05 < len(failed) / (HOSPITALS * ROUNDS) < 0.15
    rejected = {(name, record.round) for record in strategy.history
                for name, row in record.hospitals.items() if row["status"] == "rejected"}
    poisoned = {(f"hospital-{i + 1}", r) for i in range(HOSPITALS) for r in range(1, ROUNDS + 1)
                if fault_drawn(0, i, r, CORRUPT, kind="corrupt")} - failed
    assert rejected == poisoned and len(rejected) > 10
    assert all("NaN or Inf" in strategy.history[r - 1].hospitals[name]["message"] for name, r in rejected)
    for record in strategy.history:  # everyone else trained in every round, and was aggregated
        lost_here = {name for name, r in failed | rejected if r == record.round}
        assert sorted(record.trained) == sorted(set(record.hospitals) - lost_here)


def test_the_ledger_is_intact_and_keeps_the_crashed_rounds_charges(loaded):
    strategy, run_dir, _, _ = loaded
    crashed = {(name, record.round) for record in strategy.history
               for name, row in record.hospitals.items() if row["status"] == "failed"}
    with read_ledger(ledger_of(run_dir)) as ledger:
        report = ledger.verify()
        assert report.ok, report.problems
        events = ledger.events()
        for index, hospital in enumerate(strategy.hospitals):
            own = [e for e in events if e.hospital == hospital.name]
            assert [e.round for e in own] == list(range(1, ROUNDS + 1))  # every round charged, crashed or not
            # A crash after the charge leaves it unconfirmed, counted in full; nothing else is.
            assert {e.round for e in own if not e.confirmed} == {r for n, r in crashed if n == hospital.name}
            status = ledger.status(hospital_records(run_dir, index))
            assert status.epsilon_spent <= BUDGET  # no over-spend
            assert hospital.epsilon == pytest.approx(status.epsilon_spent, rel=1e-9)


def test_no_file_handle_or_process_is_left_behind(loaded):
    _, _, before, after = loaded
    assert after <= before
    assert _child_processes() == []


def test_a_crash_in_the_last_round_is_still_counted_in_the_reported_epsilon(tmp_path):
    # With seed 0 and rate 0.3 the draw crashes hospital-2 in round 2, after its charge.
    assert fault_drawn(0, 1, 2, 0.3) and not any(fault_drawn(0, i, r, 0.3) for i, r in ((0, 1), (0, 2), (1, 1)))
    strategy, _, run_dir = federate(tmp_path, "faults.train_failure_rate=0.3", "privacy.noise_multiplier=1.5",
                                    "privacy.epsilon=10")
    assert strategy.history[1].hospitals["hospital-2"]["status"] == "failed"
    by_name = {h.name: h for h in strategy.hospitals}
    with read_ledger(ledger_of(run_dir)) as ledger:
        epsilons = {ledger.status(hospital_records(run_dir, i)).epsilon_spent for i in range(3)}
    # Everyone's ledger holds two charges, so every reported figure must be a two-round epsilon.
    assert len(epsilons) == 1 and by_name["hospital-2"].epsilon == pytest.approx(epsilons.pop(), rel=1e-9)
    assert by_name["hospital-2"].epsilon > strategy.history[0].hospitals["hospital-2"]["epsilon"]
