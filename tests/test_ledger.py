"""The hospital privacy ledger accounts and enforces the budget per record.

- per-record epsilon, recomputed independently from the file's raw events with dp_accounting;
- enforcement record by record: over-cap records are left out, new records start full, exhausted
  records never train again, non-private use is infinity;
- a refusal charges nothing and locks nothing;
- the budget's settings: only ever lowered, delta and accountant fixed, corrupt files refused;
- the hospital level: a bad or unaffordable request costs nothing.
"""

from __future__ import annotations

import logging
import math
import random
import sqlite3
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ledger_helpers import (
    DELTA,
    chain_length,
    check_against_dp_accounting,
    open_ledger,
    raw_entries,
    record_ids,
    tiny_model,
)

from fedpriv.data.synthetic import make_synthetic
from fedpriv.errors import BudgetExhausted, ConfigError, FedprivError, LedgerError, PrivacyError
from fedpriv.hospital import LOCKED, REFUSED, TRAINED, HospitalSettings, RoundRequest, train_round
from fedpriv.privacy.accounting import PrivacyEvent, epsilon
from fedpriv.privacy.ledger import LegacyLedger, PrivacyLedger, RecordBudgets, read_ledger


@pytest.fixture(autouse=True)
def _key_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPRIV_KEY_DIR", str(tmp_path / "keys"))


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "hospital-a" / "ledger.sqlite"


def charge(ledger: PrivacyLedger, ids, sigma: float | None, batch_size: int, steps: int, *, run="run", round=1,
           confirm: int | None = -1, **kwargs):
    """Charge a round and confirm it (all its steps by default; `confirm=None` leaves it unconfirmed)."""
    made = ledger.charge(ids, noise_multiplier=sigma, batch_size=batch_size, steps=steps, run_id=run, round=round,
                         **kwargs)
    if confirm is not None:
        ledger.confirm(made, steps_done=steps if confirm == -1 else confirm)
    return made


def snapshot(ledger: PrivacyLedger, ids) -> tuple:
    """Everything a refusal must leave alone."""
    budgets = ledger.budgets(ids)
    return (ledger.status(ids), ledger.status(), budgets.epsilon.tolist(), budgets.exhausted.tolist(),
            ledger.events(), raw_entries(ledger.path))


# --------------------------------------------------------------------- 1. per-record accounting


@pytest.mark.slow
@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_mixed_histories_match_dp_accounting_record_by_record(ledger_path, accountant):
    first, added, late = record_ids("a", 60), record_ids("b", 40), record_ids("c", 20)
    budget = {"prv": 3.0, "rdp": 3.34}[accountant]  # RDP's bound is looser: the same story needs more
    with open_ledger(ledger_path, budget=budget, accountant=accountant) as ledger:
        charge(ledger, first, 2.0, 10, 12, round=1)  # q = 1/6
        charge(ledger, np.concatenate([first, added]), 1.5, 10, 20, round=2)  # records added: q = 0.1
        charge(ledger, first[:30], 2.0, 6, 18, round=3, confirm=15)  # the set shrinks; 15 of 18 steps trained
        charge(ledger, added, 2.5, 8, 15, run="crashed", confirm=None)  # never confirmed: counts in full
        charge(ledger, late, None, 5, 4, run="plain")  # non-private: infinity
        ledger.lock(first[50:], "consent withdrawn")  # a lock changes no epsilon
        everyone = np.concatenate([first, added, late, record_ids("never", 5)])
        assert not ledger.budgets(first[:30]).exhausted.any()  # the most spent are still open ...
        over = charge(ledger, everyone, 2.5, 10, 30, run="big", round=4)  # ... but this round would take them over
        expected = check_against_dp_accounting(ledger, everyone, history_sample=8)
        budgets = ledger.budgets(everyone)
    # Left out: the 30 most spent (over the cap at q = 10/95), the locked 10 and the 20 non-private.
    assert over.selected.tolist() == [False] * 30 + [True] * 20 + [False] * 10 + [True] * 40 + [False] * 20 + [True] * 5
    assert over.sample_rate == pytest.approx(10 / 65)
    assert np.isinf(expected[100:120]).all() and (expected[:30] <= budget * 1.03).all()
    assert budgets.exhausted[50:60].all() and budgets.exhausted[100:120].all()
    assert len({round(v, 9) for v in expected[np.isfinite(expected)]}) >= 5  # the histories really differ


round_plans = st.tuples(
    st.sampled_from([0.9, 1.3, 2.0, 4.0]),  # sigma
    st.sampled_from([5, 10, 20]),  # batch size
    st.integers(min_value=1, max_value=80),  # steps
    st.integers(min_value=0, max_value=2**16),  # which records
)


@pytest.mark.slow
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(budget=st.floats(min_value=0.5, max_value=4.0), plans=st.lists(round_plans, min_size=1, max_size=7))
def test_random_histories_never_exceed_the_budget_and_match_dp_accounting(budget, plans):
    pool = record_ids("r", 120)
    with tempfile.TemporaryDirectory() as directory:
        with open_ledger(Path(directory) / "ledger.sqlite", budget, accountant="rdp") as ledger:
            for number, (sigma, batch_size, steps, choice) in enumerate(plans):
                chooser = random.Random(choice)
                start = chooser.randrange(0, 60)
                offered = pool[start:start + chooser.randrange(30, 61)]  # overlapping, growing, shrinking
                before = raw_entries(ledger.path)
                try:
                    made = charge(ledger, offered, sigma, batch_size, steps, round=number)
                except BudgetExhausted:
                    assert raw_entries(ledger.path) == before  # a refusal writes nothing
                    continue
                assert made.projected_epsilon <= budget
                assert made.sample_rate == pytest.approx(batch_size / made.num_records)
            check_against_dp_accounting(ledger, pool, history_sample=3)


def test_the_budget_holds_across_runs_and_reopening(ledger_path):
    ids = record_ids("r", 100)
    with open_ledger(ledger_path, budget=1.6) as first:
        charge(first, ids, 2.0, 10, 40, run="run-1")
    spent = epsilon([PrivacyEvent(2.0, 0.1, 40)], DELTA)
    with open_ledger(ledger_path, budget=1.6) as second:
        assert second.status(ids).epsilon_spent == pytest.approx(spent)
        with pytest.raises(BudgetExhausted, match="nothing was charged"):
            charge(second, ids, 2.0, 10, 40, run="run-2")  # alone it fits; on top of run 1 it does not
    with read_ledger(ledger_path) as third:
        assert [e.run_id for e in third.events()] == ["run-1"]
        assert not third.status(ids).locked
        check_against_dp_accounting(third, ids)


# --------------------------------------------------------------------- 2. enforcement per record


def test_records_that_would_go_over_are_left_out_and_the_rest_train_at_their_rate(ledger_path):
    old, new = record_ids("old", 100), record_ids("new", 50)
    with open_ledger(ledger_path, budget=2.0) as ledger:
        charge(ledger, old, 2.0, 10, 70)  # epsilon ~1.96: still open, but nearly spent
        before = ledger.budgets(old).epsilon.copy()
        assert not ledger.budgets(old).exhausted.any()
        made = charge(ledger, np.concatenate([old, new]), 3.0, 10, 30, round=2)
        assert made.selected.tolist() == [False] * 100 + [True] * 50
        assert made.sample_rate == pytest.approx(10 / 50)  # over the records that remain, not all 150
        assert made.projected_epsilon == pytest.approx(epsilon([PrivacyEvent(3.0, 0.2, 30)], DELTA))
        after = ledger.budgets(np.concatenate([old, new]))
        assert after.epsilon[:100].tolist() == before.tolist()
        assert (after.epsilon <= 2.0).all()
        check_against_dp_accounting(ledger, np.concatenate([old, new]))


def test_new_records_start_with_a_full_budget_while_old_ones_stay_exhausted(ledger_path):
    old, new = record_ids("old", 100), record_ids("new", 40)
    budget = epsilon([PrivacyEvent(2.0, 0.1, 70)], DELTA) * 1.001
    with open_ledger(ledger_path, budget=budget) as ledger:
        charge(ledger, old, 2.0, 10, 70)
        assert ledger.status(old).locked and ledger.status(old).exhausted == 100
        both = np.concatenate([old, new])
        assert ledger.budgets(new).epsilon.tolist() == [0.0] * 40 and not ledger.budgets(new).exhausted.any()
        status = ledger.status(both)
        assert not status.locked and status.exhausted == 100 and status.remaining == pytest.approx(budget)
        made = charge(ledger, both, 3.0, 10, 10, round=2)
        assert made.selected.tolist() == [False] * 100 + [True] * 40
        assert made.sample_rate == pytest.approx(10 / 40)
        for sigma in (2.0, 50.0, None):  # the old records never train again, private or not
            with pytest.raises(BudgetExhausted, match="LOCKED"):
                charge(ledger, old, sigma, 10, 1, round=3)
        check_against_dp_accounting(ledger, both)


def test_locked_means_every_record_exhausted_and_a_lock_is_for_good(ledger_path):
    ids = record_ids("r", 60)
    with open_ledger(ledger_path, budget=3.0) as ledger:
        charge(ledger, ids, 2.0, 10, 10)
        ledger.lock(ids[:20], "withdrawn")
        budgets = ledger.budgets(ids)
        assert budgets.exhausted.tolist() == [True] * 20 + [False] * 40
        assert not ledger.status(ids).locked and ledger.status(ids[:20]).locked
        made = charge(ledger, ids, 2.0, 10, 10, round=2)
        assert made.selected.tolist() == [False] * 20 + [True] * 40 and made.sample_rate == pytest.approx(0.25)
        with pytest.raises(BudgetExhausted):
            charge(ledger, ids[:20], 10.0, 1, 1, round=3, min_records=1)
        with pytest.raises(BudgetExhausted):
            charge(ledger, ids[:20], None, 1, 1, round=3, min_records=1)
        ledger.lock(ids[20:], "hospital decided to stop")
    with open_ledger(ledger_path, budget=3.0) as reopened:
        assert reopened.status(ids).locked and reopened.status().locked  # every known record
        with pytest.raises(BudgetExhausted, match="LOCKED"):
            charge(reopened, ids, 10.0, 1, 1, round=4)
        assert reopened.max_affordable_steps(ids, noise_multiplier=10.0, batch_size=1) == 0
        fresh = record_ids("fresh", 10)
        assert not reopened.status(fresh).locked  # records the ledger never saw are not locked


def test_non_private_use_is_infinity_and_exhausts_exactly_those_records(ledger_path):
    ids = record_ids("r", 80)
    with open_ledger(ledger_path, budget=3.0) as ledger:
        made = charge(ledger, ids[:40], None, 10, 5)
        assert not made.private and math.isinf(made.projected_epsilon) and made.selected.all()
        budgets = ledger.budgets(ids)
        assert np.isinf(budgets.epsilon[:40]).all() and (budgets.epsilon[40:] == 0).all()
        assert budgets.exhausted.tolist() == [True] * 40 + [False] * 40
        assert ledger.status(ids[:40]).locked and math.isinf(ledger.status(ids).epsilon_spent)
        with pytest.raises(BudgetExhausted):
            charge(ledger, ids[:40], None, 10, 1, round=2)
        with pytest.raises(BudgetExhausted):
            charge(ledger, ids[:40], 20.0, 10, 1, round=2)
        private = charge(ledger, ids, 2.0, 10, 10, round=2)  # the others still train, privately
        assert private.selected.tolist() == [False] * 40 + [True] * 40
        check_against_dp_accounting(ledger, ids)


def test_a_request_cap_below_the_budget_is_honoured_and_one_above_is_ignored(ledger_path):
    ids = record_ids("r", 100)
    one = epsilon([PrivacyEvent(2.0, 0.1, 40)], DELTA)
    assert 1.0 < one < 2.0
    with open_ledger(ledger_path, budget=2.0) as ledger:
        with pytest.raises(BudgetExhausted, match="within epsilon 1"):
            charge(ledger, ids, 2.0, 10, 40, max_epsilon=1.0)
        charge(ledger, ids, 2.0, 10, 40, max_epsilon=50.0)
        with pytest.raises(BudgetExhausted, match="within epsilon 2"):
            charge(ledger, ids, 2.0, 10, 40, round=2, max_epsilon=50.0)
        assert ledger.status(ids).epsilon_spent <= 2.0 and not ledger.status(ids).locked


def test_too_few_records_left_is_refused_with_nothing_written(ledger_path):
    ids = record_ids("r", 30)
    with open_ledger(ledger_path, budget=3.0) as ledger:
        charge(ledger, ids, 2.0, 10, 5)
        ledger.lock(ids[:25], "withdrawn")
        before = snapshot(ledger, ids)
        with pytest.raises(BudgetExhausted, match="at least 10"):
            charge(ledger, ids, 2.0, 4, 5, round=2, min_records=10)  # 5 open, 10 needed
        with pytest.raises(BudgetExhausted, match="at least 8"):
            charge(ledger, ids, 2.0, 8, 5, round=2)  # 5 open, a batch of 8 needed
        assert snapshot(ledger, ids) == before
        assert charge(ledger, ids, 20.0, 5, 1, round=2, min_records=5).num_records == 5


def test_duplicate_record_ids_are_refused(ledger_path):
    # A record listed twice is sampled twice per pass but would be charged once at batch / (listed):
    # an under-count. The ledger must refuse such a list rather than charge it.
    ids = np.concatenate([np.repeat(["twice"], 50), record_ids("r", 50)])
    with open_ledger(ledger_path, budget=5.0) as ledger:
        length = chain_length(ledger_path)
        with pytest.raises(PrivacyError):
            charge(ledger, ids, 2.0, 10, 10)
        assert chain_length(ledger_path) == length


# --------------------------------------------------------------------- 3. a refusal charges nothing


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize("request_kind", ["too many steps", "too small sigma", "sigma below accountable",
                                          "zero sigma"])
def test_a_refused_request_charges_nothing_locks_nothing_and_a_compliant_one_trains(
        ledger_path, accountant, request_kind):
    ids = record_ids("r", 100)
    sigma, steps = {"too many steps": (2.0, 5000), "too small sigma": (0.5, 40),
                    "sigma below accountable": (0.1, 2), "zero sigma": (0.0, 1)}[request_kind]
    with open_ledger(ledger_path, budget=2.0, accountant=accountant) as ledger:
        charge(ledger, ids, 3.0, 10, 20)
        before = snapshot(ledger, ids)
        for _ in range(2):  # refusing twice still writes nothing
            with pytest.raises(BudgetExhausted, match="nothing was charged"):
                charge(ledger, ids, sigma, 10, steps, round=2)
        assert snapshot(ledger, ids) == before
        assert not ledger.status(ids).locked and ledger.status(ids).exhausted == 0
    with open_ledger(ledger_path, budget=2.0, accountant=accountant) as reopened:
        assert snapshot(reopened, ids) == before
        made = charge(reopened, ids, 3.0, 10, 20, round=2)
        assert made.selected.all() and made.projected_epsilon <= 2.0


# --------------------------------------------------------------------- settings, steps, confirmation


def test_reopen_with_a_higher_budget_keeps_the_lower_one(ledger_path, caplog):
    ids = record_ids("r", 100)
    open_ledger(ledger_path, budget=1.0).close()
    with caplog.at_level(logging.WARNING, logger="fedpriv.privacy.ledger"):
        ledger = open_ledger(ledger_path, budget=5.0)
    assert ledger.budget_epsilon == 1.0 and "higher" in caplog.text
    assert ledger.status(ids).budget_epsilon == 1.0
    with pytest.raises(BudgetExhausted, match="within epsilon 1"):
        charge(ledger, ids, 2.0, 10, 40)  # ~1.5: would fit 5, not 1
    ledger.close()


def test_reopen_with_a_lower_budget_lowers_it_for_good(ledger_path):
    ids = record_ids("r", 100)
    with open_ledger(ledger_path, budget=3.0) as ledger:
        charge(ledger, ids, 2.0, 10, 40)  # ~1.49
    with open_ledger(ledger_path, budget=1.5) as lowered:
        assert lowered.status(ids).budget_epsilon == 1.5
        assert lowered.status(ids).locked  # 1.49 is within 1% of the new 1.5
    kinds = [kind for _, kind, _, _ in raw_entries(ledger_path)]
    assert kinds == ["open", "charge", "confirm", "budget"]
    with open_ledger(ledger_path, budget=3.0) as again:
        assert again.status().budget_epsilon == 1.5
        with pytest.raises(BudgetExhausted):
            charge(again, ids, 2.0, 10, 1, round=2)
    with read_ledger(ledger_path) as stored:
        assert stored.verify().ok and stored.budgets(ids).budget_epsilon == 1.5


def test_delta_and_accountant_are_fixed_at_creation(ledger_path, caplog):
    ids = record_ids("r", 100)
    open_ledger(ledger_path, delta=1e-5, accountant="rdp").close()
    with caplog.at_level(logging.WARNING, logger="fedpriv.privacy.ledger"):
        ledger = open_ledger(ledger_path, delta=1e-3, accountant="prv")
    assert (ledger.delta, ledger.accountant) == (1e-5, "rdp")
    assert "delta" in caplog.text and "accountant" in caplog.text
    made = charge(ledger, ids, 2.0, 10, 20)
    assert made.projected_epsilon == pytest.approx(epsilon([PrivacyEvent(2.0, 0.1, 20)], 1e-5, "rdp"))
    assert [e.accountant for e in ledger.events()] == ["rdp"]
    status = ledger.status(ids)
    assert (status.delta, status.accountant) == (1e-5, "rdp")
    ledger.close()


def test_the_ledgers_settings_are_its_stored_ones_right_after_open(ledger_path):
    # `budget_epsilon`, `delta` and `accountant` are public attributes (the hospital's "auto" sigma
    # reads them); right after open they must be the ledger's, not NaN or a superseded budget.
    with open_ledger(ledger_path, budget=2.0, accountant="rdp") as created:
        assert (created.budget_epsilon, created.delta, created.accountant) == (2.0, DELTA, "rdp")
    with open_ledger(ledger_path, budget=1.0, delta=1e-3, accountant="prv") as lowered:
        assert (lowered.budget_epsilon, lowered.delta, lowered.accountant) == (1.0, DELTA, "rdp")


@pytest.mark.parametrize("budget", [0.0, -1.0, math.inf, math.nan])
def test_an_invalid_budget_is_refused_and_creates_nothing(ledger_path, budget):
    with pytest.raises(PrivacyError):
        open_ledger(ledger_path, budget=budget)
    assert not ledger_path.exists()


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_max_affordable_steps_is_the_largest_charge_that_fits(ledger_path, accountant):
    ids = record_ids("r", 100)
    with open_ledger(ledger_path, budget=2.0, accountant=accountant) as ledger:
        charge(ledger, ids, 2.0, 10, 10)
        steps = ledger.max_affordable_steps(ids, noise_multiplier=2.0, batch_size=10)
        assert steps > 0
        with pytest.raises(BudgetExhausted):
            charge(ledger, ids, 2.0, 10, steps + 1, round=2)
        made = charge(ledger, ids, 2.0, 10, steps, round=2)
        assert made.selected.all() and made.projected_epsilon <= 2.0
        assert ledger.max_affordable_steps(ids, noise_multiplier=2.0, batch_size=10) == 0
        assert ledger.max_affordable_steps(ids, noise_multiplier=2.0, batch_size=200) == 0  # too few records


def test_confirming_fewer_steps_gives_budget_back_and_a_confirmation_is_final(ledger_path):
    ids = record_ids("r", 100)
    with open_ledger(ledger_path, budget=5.0) as ledger:
        first = charge(ledger, ids, 2.0, 10, 100, run="a", confirm=None)
        second = charge(ledger, ids[:50], 3.0, 10, 40, run="b", confirm=None)  # a concurrent run
        with pytest.raises(LedgerError, match="charged 100"):
            ledger.confirm(first, steps_done=101)
        ledger.confirm(first.entry_id, steps_done=30)
        expected = epsilon([PrivacyEvent(2.0, 0.1, 30), second.event], DELTA)
        assert ledger.status(ids).epsilon_spent == pytest.approx(expected)
        assert ledger.budgets(ids[50:]).epsilon[0] == pytest.approx(epsilon([PrivacyEvent(2.0, 0.1, 30)], DELTA))
        ledger.confirm(first, steps_done=30)  # idempotent
        with pytest.raises(LedgerError, match="already confirmed"):
            ledger.confirm(first, steps_done=20)
        with pytest.raises(LedgerError, match="no charge"):
            ledger.confirm(999, steps_done=1)
        assert [(e.status, e.steps, e.charged_steps) for e in ledger.events()] == [
            ("confirmed", 30, 100), ("charged", 40, 40)]
        assert ledger.verify().ok


def test_read_ledger_never_spends(ledger_path):
    ids = record_ids("r", 40)
    with pytest.raises(LedgerError, match="no ledger"):
        read_ledger(ledger_path)
    with open_ledger(ledger_path, budget=3.0) as ledger:
        made = charge(ledger, ids, 2.0, 10, 10, confirm=None)
    with read_ledger(ledger_path) as stored:
        assert (stored.status(ids).budget_epsilon, stored.delta) == (3.0, DELTA)
        before = raw_entries(ledger_path)
        for action in (lambda: stored.charge(ids, noise_multiplier=2.0, batch_size=10, steps=1, run_id="x", round=0),
                       lambda: stored.confirm(made, steps_done=10), lambda: stored.lock(ids, "no")):
            with pytest.raises(LedgerError, match="read-only"):
                action()
        assert raw_entries(ledger_path) == before


# --------------------------------------------------------------------- corrupt files are refused, never reset


def test_random_bytes_are_refused_and_left_alone(ledger_path):
    ledger_path.parent.mkdir(parents=True)
    garbage = random.Random(7).randbytes(8192)
    ledger_path.write_bytes(garbage)
    with pytest.raises(LedgerError):
        open_ledger(ledger_path)
    with pytest.raises(LedgerError):
        read_ledger(ledger_path)
    assert ledger_path.read_bytes() == garbage  # never silently reset


@pytest.mark.parametrize("damage", [
    "DROP TABLE entries", "DROP TABLE sets", "DELETE FROM meta", "UPDATE meta SET schema_version = 99",
    "ALTER TABLE entries ADD COLUMN extra TEXT",
])
def test_a_structurally_broken_ledger_is_refused_and_left_alone(ledger_path, damage):
    with open_ledger(ledger_path) as ledger:
        charge(ledger, record_ids("r", 50), 2.0, 10, 5)
    with sqlite3.connect(ledger_path) as raw:
        raw.execute(damage)
    raw.close()
    before = ledger_path.read_bytes()
    with pytest.raises(LedgerError):
        open_ledger(ledger_path)
    with pytest.raises(LedgerError):
        read_ledger(ledger_path)
    assert ledger_path.read_bytes() == before


def test_a_first_format_ledger_is_kept_and_asks_for_migration(ledger_path):
    open_ledger(ledger_path).close()
    with sqlite3.connect(ledger_path) as raw:
        raw.execute("UPDATE meta SET schema_version = 1")
    raw.close()
    before = ledger_path.read_bytes()
    with pytest.raises(LegacyLedger, match="migrate"):
        open_ledger(ledger_path)
    assert ledger_path.read_bytes() == before


def test_an_empty_or_foreign_sqlite_file_is_not_a_ledger(tmp_path):
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    with pytest.raises(LedgerError):
        open_ledger(empty)  # an existing file without its key is refused first
    with pytest.raises(LedgerError, match="not a fedpriv ledger"):
        read_ledger(empty)
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as raw:
        raw.execute("CREATE TABLE patients (id INTEGER)")
    raw.close()
    with pytest.raises(LedgerError):
        open_ledger(foreign)
    with pytest.raises(LedgerError, match="not a fedpriv ledger"):
        read_ledger(foreign)
    assert empty.read_bytes() == b""


# --------------------------------------------------------------------- 4. the hospital level


@pytest.fixture(scope="module")
def hospital_records():
    return make_synthetic(num_samples=120, size=8, seed=0, val_fraction=0.1, test_fraction=0.1).train


def hospital(tmp_path, budget: float = 1.2, **kwargs) -> HospitalSettings:
    kwargs = {"min_noise_multiplier": 2.5, "max_local_epochs": 4, **kwargs}
    return HospitalSettings("A", budget, DELTA, tmp_path / "hospital.db", **kwargs)


def round_request(**kwargs) -> RoundRequest:
    return RoundRequest(**{"run_id": "run", "server_round": 1, "num_rounds": 4, "batch_size": 10, "lr": 0.1,
                           "noise_multiplier": 3.0, **kwargs})


def ledger_state(settings: HospitalSettings, records) -> tuple:
    with read_ledger(settings.ledger_path) as ledger:
        return ledger.status().chain_length, ledger.budgets(records.ids()).epsilon.tolist(), ledger.events()


BAD_REQUESTS = {
    "max_grad_norm=0": {"max_grad_norm": 0.0},
    "max_physical_batch_size=0": {"max_physical_batch_size": 0},
    "batch_size=0": {"batch_size": 0},
    "local_epochs above the limit": {"local_epochs": 5},  # affordable, but not allowed
    "sigma below the hospital's minimum": {"noise_multiplier": 2.0},  # affordable, but not allowed
    "lr=NaN": {"lr": math.nan},
}


@pytest.fixture
def hospital_after_one_round(tmp_path, hospital_records):
    settings = hospital(tmp_path)
    assert train_round(tiny_model(), hospital_records, settings, round_request()).status == TRAINED
    return settings


@pytest.mark.parametrize("bad", list(BAD_REQUESTS))
def test_a_bad_request_is_refused_before_the_ledger(hospital_after_one_round, hospital_records, bad):
    settings = hospital_after_one_round
    before = ledger_state(settings, hospital_records)
    request = round_request(server_round=2, **BAD_REQUESTS[bad])
    with pytest.raises(ConfigError, match="nothing was trained or charged"):
        request.check(2, settings)
    assert ledger_state(settings, hospital_records) == before
    assert train_round(tiny_model(), hospital_records, settings, round_request(server_round=2)).status == TRAINED


@pytest.mark.parametrize("bad", list(BAD_REQUESTS))
def test_train_round_itself_charges_nothing_for_a_bad_request(hospital_after_one_round, hospital_records, bad):
    # train_round is the hospital's own entry point; its docstring promises that every field is
    # checked against the hospital's limits before the ledger is touched, whoever calls it.
    settings = hospital_after_one_round
    before = ledger_state(settings, hospital_records)
    request = round_request(server_round=2, **BAD_REQUESTS[bad])
    try:
        outcome = train_round(tiny_model(), hospital_records, settings, request)
    except FedprivError:
        outcome = None
    assert outcome is None or outcome.status == REFUSED, "a bad request must not train"
    assert ledger_state(settings, hospital_records) == before, "a bad request must charge nothing"


def test_a_long_request_the_budget_cannot_afford_is_refused_and_the_budget_stays_usable(
        hospital_after_one_round, hospital_records):
    settings = hospital_after_one_round
    before = ledger_state(settings, hospital_records)
    greedy = round_request(server_round=2, local_epochs=4, noise_multiplier=2.5)  # within the limits
    greedy.check(2, settings)
    model = tiny_model()
    weights = [p.detach().clone() for p in model.parameters()]
    outcome = train_round(model, hospital_records, settings, greedy)
    assert outcome.status == REFUSED and outcome.state_dict is None and not outcome.locked
    assert outcome.exhausted == 0 and 0.5 < outcome.remaining < 1.2
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    assert ledger_state(settings, hospital_records) == before
    compliant = train_round(tiny_model(), hospital_records, settings, round_request(server_round=2))
    assert compliant.status == TRAINED and compliant.epsilon <= 1.2


@pytest.mark.slow
def test_a_hospital_locks_once_every_record_is_spent_and_new_records_still_train(tmp_path, hospital_records):
    settings = hospital(tmp_path, budget=3.0, min_noise_multiplier=0.3)
    for server_round in (1, 2):  # "auto" sigma spends the whole budget over the two planned rounds
        outcome = train_round(tiny_model(), hospital_records, settings,
                              round_request(server_round=server_round, num_rounds=2, noise_multiplier=None))
        assert outcome.status == TRAINED
    assert outcome.locked and outcome.epsilon <= 3.0
    again = train_round(tiny_model(), hospital_records, settings, round_request(run_id="again"))
    assert again.status == LOCKED and again.state_dict is None
    extra = make_synthetic(num_samples=40, size=8, seed=5, val_fraction=0.1, test_fraction=0.1).train
    grown = type(hospital_records)(torch.cat([hospital_records.images, extra.images]),
                                   torch.cat([hospital_records.labels, extra.labels]))
    more = train_round(tiny_model(), grown, settings, round_request(run_id="more", num_rounds=1))
    assert more.status == TRAINED and more.num_examples == len(extra)
    with read_ledger(settings.ledger_path) as ledger:
        check_against_dp_accounting(ledger, grown.ids())


@pytest.mark.parametrize("sets", [1, 3, 64, 65, 130])
def test_records_are_grouped_exactly_by_the_sets_that_hold_them(sets):
    from fedpriv.privacy.records import signatures

    rng = np.random.default_rng(sets)
    membership = rng.random((400, sets)) < 0.5
    membership[:200] = membership[0]  # half the records share one history
    patterns, inverse = signatures(membership)
    assert (patterns[inverse] == membership).all()  # every record gets its own row back
    assert len({row.tobytes() for row in patterns}) == len(patterns)  # one pattern per distinct history


def test_a_refusal_never_shows_an_epsilon_rounded_onto_its_budget():
    """2.99996 of a budget of 3 is exhausted (within 1%) but not at the budget: the message says so."""
    budgets = RecordBudgets(keys=np.arange(2, dtype=np.uint64), epsilon=np.array([2.99996, 2.99996]),
                            exhausted=np.array([True, True]), budget_epsilon=3.0, delta=1e-5, accountant="rdp",
                            chain_length=5, chain_head="head")
    message = PrivacyLedger._refusal(SimpleNamespace(path=Path("ledger.db")), budgets, left=0, needed=1, cap=3.0)
    assert "largest epsilon 2.99996 of budget 3" in message and "LOCKED" in message
