"""Tests of the hospital privacy ledger: budgets hold across rounds, runs, crashes and processes."""

from __future__ import annotations

import logging
import math
import random
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant

from fedpriv.errors import BudgetExhausted, LedgerError, PrivacyError
from fedpriv.privacy import ledger as ledger_module
from fedpriv.privacy.accounting import PrivacyEvent, epsilon
from fedpriv.privacy.ledger import PrivacyLedger, read_ledger

FINGERPRINT = "3f" * 32
OTHER_FINGERPRINT = "a1" * 32
DELTA = 1e-5
SUBPROCESS_TIMEOUT_S = 180


def open_ledger(path: Path, budget: float = 2.0, **kwargs) -> PrivacyLedger:
    kwargs.setdefault("fingerprint", FINGERPRINT)
    kwargs.setdefault("delta", DELTA)
    return PrivacyLedger.open(path, budget_epsilon=budget, **kwargs)


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "hospital-a" / "ledger.sqlite"


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter (a separate node process)."""
    return subprocess.run(
        [sys.executable, "-W", "ignore", "-c", textwrap.dedent(code), *args],
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
    )


# --------------------------------------------------------------------- the budget holds


round_plans = st.tuples(
    st.sampled_from([0.8, 1.0, 1.5, 2.5]),  # sigma
    st.sampled_from([0.01, 0.03, 0.08]),  # sample rate
)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    budget=st.floats(min_value=0.5, max_value=4.0),
    plans=st.lists(round_plans, min_size=1, max_size=2),
    steps=st.lists(st.integers(min_value=20, max_value=600), min_size=1, max_size=10),
)
def test_budget_never_exceeded_over_many_rounds(accountant, budget, plans, steps):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "ledger.sqlite"
        refused = False
        with open_ledger(path, budget, accountant=accountant) as ledger:
            for round_number, round_steps in enumerate(steps):
                sigma, q = plans[round_number % len(plans)]
                planned = PrivacyEvent(sigma, q, round_steps)
                try:
                    entry = ledger.charge(planned, run_id="run", round=round_number)
                except BudgetExhausted:
                    refused = True
                    break
                assert entry.epsilon_after <= budget
                ledger.confirm(entry, steps_done=round_steps)
            status = ledger.status()
            assert status.epsilon_spent <= budget
            assert status.locked is refused
            if refused:
                with pytest.raises(BudgetExhausted):
                    ledger.charge(PrivacyEvent(50.0, 0.001, 1), run_id="run", round=99)
                assert len(ledger.entries()) == round_number


def test_refusal_message_and_lock_survive_reopen(ledger_path):
    with open_ledger(ledger_path, budget=1.0) as ledger:
        with pytest.raises(BudgetExhausted, match="budget exhausted") as refusal:
            ledger.charge(PrivacyEvent(1.0, 0.05, 500), run_id="first", round=0)
        assert "budget 1" in str(refusal.value) and "spent so far 0" in str(refusal.value)
    with open_ledger(ledger_path, budget=1.0) as reopened:
        assert reopened.locked
        locked_at, reason = reopened.lock_info
        assert locked_at and "first" in reason
        assert reopened.status().locked


def test_locked_ledger_refuses_without_computing(ledger_path, monkeypatch):
    with open_ledger(ledger_path) as ledger:
        ledger.charge(PrivacyEvent(1.0, 0.02, 100), run_id="run", round=0)
        ledger.lock("hospital decided to stop")
    calls = []
    monkeypatch.setattr(ledger_module, "epsilon", lambda *args, **kwargs: calls.append(args) or 0.0)
    with open_ledger(ledger_path) as reopened:
        with pytest.raises(BudgetExhausted, match="LOCKED.*hospital decided to stop"):
            reopened.charge(PrivacyEvent(5.0, 0.001, 1), run_id="other", round=0)
        assert reopened.max_affordable_steps(5.0, 0.001) == 0
    assert calls == []


def test_second_run_is_refused_once_the_first_spent_the_budget(ledger_path):
    with open_ledger(ledger_path, budget=1.5) as first:
        first_round = first.charge(PrivacyEvent(1.0, 0.02, 100), run_id="run-1", round=0)
        first.confirm(first_round, steps_done=100)
    spent = epsilon([PrivacyEvent(1.0, 0.02, 100)], DELTA)
    with open_ledger(ledger_path, budget=1.5) as second:
        with pytest.raises(BudgetExhausted, match="budget exhausted") as refusal:
            second.charge(PrivacyEvent(1.0, 0.02, 100), run_id="run-2", round=0)
        assert f"spent so far {spent:.4g}" in str(refusal.value)
        assert second.locked
    with open_ledger(ledger_path, budget=1.5) as third:
        with pytest.raises(BudgetExhausted, match="budget exhausted"):
            third.charge(PrivacyEvent(20.0, 0.001, 1), run_id="run-3", round=0)
        assert [entry.run_id for entry in third.entries()] == ["run-1"]


def test_charge_is_durable_before_training(ledger_path):
    with open_ledger(ledger_path) as ledger:
        entry = ledger.charge(PrivacyEvent(1.0, 0.02, 100), run_id="run", round=0)
        # A separate connection (another process, or this node after a crash) already sees it.
        with sqlite3.connect(ledger_path) as raw:
            rows = raw.execute("SELECT id, status, steps FROM entries").fetchall()
        assert rows == [(entry.id, "charged", 100)]


def test_killed_node_keeps_its_charge(ledger_path):
    open_ledger(ledger_path, budget=3.0).close()
    result = run_python(
        """
        import os, signal, sys
        from fedpriv.privacy.accounting import PrivacyEvent
        from fedpriv.privacy.ledger import PrivacyLedger
        ledger = PrivacyLedger.open(sys.argv[1], fingerprint=sys.argv[2], budget_epsilon=3.0, delta=1e-5)
        ledger.charge(PrivacyEvent(1.0, 0.02, 100), run_id="crashed", round=0)
        os.kill(os.getpid(), signal.SIGKILL)  # dies mid-training: never confirms
        """,
        str(ledger_path), FINGERPRINT,
    )
    assert result.returncode == -9, result.stderr
    charged = PrivacyEvent(1.0, 0.02, 100)
    with open_ledger(ledger_path, budget=3.0) as ledger:
        (entry,) = ledger.entries()
        assert (entry.run_id, entry.status, entry.steps) == ("crashed", "charged", 100)
        assert ledger.status().epsilon_spent == pytest.approx(epsilon([charged], DELTA))
        following = PrivacyEvent(1.0, 0.02, 50)
        assert ledger.projected_epsilon(following) == pytest.approx(epsilon([charged, following], DELTA))
        nxt = ledger.charge(following, run_id="restarted", round=0)
        assert nxt.epsilon_after == pytest.approx(epsilon([PrivacyEvent(1.0, 0.02, 150)], DELTA))


_CONTENDER = """
import pathlib, sys, time
from fedpriv.errors import BudgetExhausted
from fedpriv.privacy.accounting import PrivacyEvent
from fedpriv.privacy.ledger import PrivacyLedger
path, fingerprint, ready, go = sys.argv[1:5]
ledger = PrivacyLedger.open(path, fingerprint=fingerprint, budget_epsilon=1.6, delta=1e-5)
pathlib.Path(ready).touch()
deadline = time.monotonic() + 120
while not pathlib.Path(go).exists() and time.monotonic() < deadline:
    time.sleep(0.002)
try:
    ledger.charge(PrivacyEvent(1.0, 0.02, 100), run_id=ready, round=0)
except BudgetExhausted:
    sys.exit(3)
sys.exit(0)
"""


def test_concurrent_nodes_cannot_overspend(tmp_path, ledger_path):
    single = epsilon([PrivacyEvent(1.0, 0.02, 100)], DELTA)
    double = epsilon([PrivacyEvent(1.0, 0.02, 200)], DELTA)
    assert single <= 1.6 < double  # each charge fits alone, no two fit together
    open_ledger(ledger_path, budget=1.6).close()
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(2)]  # each process imports torch: ~5 s apiece
    contenders = [
        subprocess.Popen(
            [sys.executable, "-W", "ignore", "-c", _CONTENDER,
             str(ledger_path), FINGERPRINT, str(flag), str(go)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for flag in ready
    ]
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    while not all(flag.exists() for flag in ready) and time.monotonic() < deadline:
        assert all(c.poll() is None for c in contenders), [c.communicate() for c in contenders]
        time.sleep(0.01)
    go.touch()
    codes = [c.wait(timeout=SUBPROCESS_TIMEOUT_S) for c in contenders]
    assert sorted(codes) == [0, 3], [c.stderr.read() for c in contenders]
    with open_ledger(ledger_path, budget=1.6) as ledger:
        assert len(ledger.entries()) == 1
        assert ledger.status().epsilon_spent <= 1.6
        assert ledger.locked


def test_concurrent_connections_in_threads_cannot_overspend(ledger_path):
    open_ledger(ledger_path, budget=1.6).close()
    ledgers = [open_ledger(ledger_path, budget=1.6) for _ in range(4)]  # one connection each
    start = threading.Barrier(len(ledgers))
    outcomes: list[str] = []

    def contend(ledger: PrivacyLedger, name: str) -> None:
        start.wait()
        try:
            ledger.charge(PrivacyEvent(1.0, 0.02, 100), run_id=name, round=0)
            outcomes.append("charged")
        except BudgetExhausted:
            outcomes.append("refused")

    threads = [threading.Thread(target=contend, args=(l, f"t{i}")) for i, l in enumerate(ledgers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=SUBPROCESS_TIMEOUT_S)
    assert sorted(outcomes) == ["charged", "refused", "refused", "refused"]
    assert len(ledgers[0].entries()) == 1
    for ledger in ledgers:
        ledger.close()


# --------------------------------------------------------------------- integrity


def test_random_bytes_are_refused_and_left_alone(ledger_path):
    ledger_path.parent.mkdir(parents=True)
    garbage = random.Random(7).randbytes(8192)
    ledger_path.write_bytes(garbage)
    with pytest.raises(LedgerError):
        open_ledger(ledger_path)
    with pytest.raises(LedgerError):
        read_ledger(ledger_path)
    assert ledger_path.read_bytes() == garbage  # never silently reset


@pytest.mark.parametrize(
    "damage",
    [
        "DROP TABLE entries",
        "DELETE FROM meta",
        "UPDATE meta SET schema_version = 99",
        "ALTER TABLE entries ADD COLUMN extra TEXT",
    ],
)
def test_structurally_broken_ledger_is_refused(ledger_path, damage):
    open_ledger(ledger_path).close()
    with sqlite3.connect(ledger_path) as raw:
        raw.execute(damage)
    with pytest.raises(LedgerError):
        open_ledger(ledger_path)
    with pytest.raises(LedgerError):
        read_ledger(ledger_path)


def test_empty_or_foreign_sqlite_file_is_not_a_ledger(tmp_path):
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    with pytest.raises(LedgerError, match="not a fedpriv ledger"):
        open_ledger(empty)
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as raw:
        raw.execute("CREATE TABLE patients (id INTEGER)")
    with pytest.raises(LedgerError, match="not a fedpriv ledger"):
        open_ledger(foreign)


def _two_entries(path: Path) -> PrivacyLedger:
    ledger = open_ledger(path, budget=3.0)
    ledger.confirm(ledger.charge(PrivacyEvent(1.0, 0.02, 100), run_id="run", round=0), steps_done=100)
    ledger.charge(PrivacyEvent(1.5, 0.05, 100), run_id="run", round=1)
    return ledger


def test_tampered_entry_is_reported_and_refused(ledger_path):
    still_open = _two_entries(ledger_path)
    assert still_open.verify().ok
    with sqlite3.connect(ledger_path) as raw:
        raw.execute("UPDATE entries SET steps = 1, charged_steps = 1 WHERE id = 1")
    report = read_ledger(ledger_path).verify()
    assert not report.ok
    assert any("entry 1" in problem and "hash" in problem for problem in report.problems)
    assert report.recomputed_epsilon < report.recorded_epsilon
    with pytest.raises(LedgerError, match="integrity"):
        open_ledger(ledger_path, budget=3.0)
    with pytest.raises(LedgerError, match="integrity"):
        still_open.charge(PrivacyEvent(2.0, 0.01, 10), run_id="run", round=2)
    still_open.close()


def test_tampered_epsilon_and_removed_entry_are_reported(ledger_path):
    _two_entries(ledger_path).close()
    with sqlite3.connect(ledger_path) as raw:
        raw.execute("UPDATE entries SET epsilon_after = 0.01 WHERE id = 2")
    problems = read_ledger(ledger_path).verify().problems
    assert any("entry 2" in p and "epsilon" in p for p in problems)

    other = ledger_path.with_name("other.sqlite")
    _two_entries(other).close()
    with sqlite3.connect(other) as raw:
        raw.execute("DELETE FROM entries WHERE id = 2")  # hide the last use of the data
    assert any("head" in p or "entries" in p for p in read_ledger(other).verify().problems)
    with pytest.raises(LedgerError):
        open_ledger(other, budget=3.0)


def test_fingerprint_mismatch_is_refused(ledger_path):
    open_ledger(ledger_path).close()
    before = ledger_path.read_bytes()
    with pytest.raises(LedgerError, match="other data"):
        open_ledger(ledger_path, fingerprint=OTHER_FINGERPRINT)
    assert ledger_path.read_bytes() == before


# --------------------------------------------------------------------- independent accounting


@pytest.mark.parametrize("accountant, engine", [("prv", PRVAccountant), ("rdp", RDPAccountant)])
def test_epsilon_matches_opacus_fed_the_raw_history(ledger_path, accountant, engine):
    plans = [PrivacyEvent(1.0, 0.02, 80), PrivacyEvent(1.3, 0.04, 60), PrivacyEvent(1.0, 0.02, 40)]
    with open_ledger(ledger_path, budget=8.0, accountant=accountant) as ledger:
        for round_number, plan in enumerate(plans):
            ledger.charge(plan, run_id="run", round=round_number)
        reported = ledger.status().epsilon_spent
        recorded = ledger.entries()[-1].epsilon_after
    independent = engine()
    independent.history = [(p.noise_multiplier, p.sample_rate, p.steps) for p in plans]  # unmerged
    expected = independent.get_epsilon(delta=DELTA)
    assert reported == pytest.approx(expected, rel=0.01)
    assert recorded == pytest.approx(expected, rel=0.01)


def test_prv_and_rdp_ledgers_agree_roughly(tmp_path):
    plan = PrivacyEvent(1.1, 0.03, 200)
    spent = {}
    for accountant in ("prv", "rdp"):
        with open_ledger(tmp_path / f"{accountant}.sqlite", budget=8.0, accountant=accountant) as ledger:
            ledger.charge(plan, run_id="run", round=0)
            spent[accountant] = ledger.status().epsilon_spent
    # RDP is the looser bound; PRV is tighter but of the same order.
    assert spent["prv"] <= spent["rdp"] * 1.01
    assert spent["prv"] > 0.5 * spent["rdp"]


# --------------------------------------------------------------------- whose budget


def test_server_cap_above_the_budget_is_ignored(ledger_path):
    with open_ledger(ledger_path, budget=2.0) as ledger:
        ledger.charge(PrivacyEvent(1.0, 0.02, 100), run_id="run", round=0, max_epsilon=50.0)
        with pytest.raises(BudgetExhausted, match="budget 2"):
            ledger.charge(PrivacyEvent(1.0, 0.02, 300), run_id="run", round=1, max_epsilon=50.0)
        assert ledger.locked
        assert ledger.status().epsilon_spent <= 2.0


def test_server_cap_below_the_budget_is_honoured(ledger_path):
    plan = PrivacyEvent(1.0, 0.02, 100)
    assert 1.0 < epsilon([plan], DELTA) < 2.0
    with open_ledger(ledger_path, budget=2.0) as ledger:
        with pytest.raises(BudgetExhausted, match="request"):
            ledger.charge(plan, run_id="run", round=0, max_epsilon=1.0)
        assert ledger.entries() == [] and not ledger.locked  # only this request was refused
        assert ledger.max_affordable_steps(1.0, 0.02, max_epsilon=1.0) < 100
        ledger.charge(plan, run_id="run", round=0)


def test_reopen_with_higher_budget_keeps_the_lower_one(ledger_path, caplog):
    open_ledger(ledger_path, budget=1.0).close()
    with caplog.at_level(logging.WARNING, logger="fedpriv.privacy.ledger"):
        ledger = open_ledger(ledger_path, budget=5.0)
    assert ledger.budget_epsilon == 1.0
    assert "higher" in caplog.text
    with pytest.raises(BudgetExhausted, match="budget 1"):
        ledger.charge(PrivacyEvent(1.0, 0.02, 100), run_id="run", round=0)
    ledger.close()


def test_reopen_with_lower_budget_lowers_it_for_good(ledger_path):
    open_ledger(ledger_path, budget=3.0).close()
    open_ledger(ledger_path, budget=1.0).close()
    with open_ledger(ledger_path, budget=3.0) as ledger:
        assert ledger.budget_epsilon == 1.0
        assert ledger.status().budget_epsilon == 1.0
    with read_ledger(ledger_path) as stored:
        assert stored.verify().ok


def test_delta_and_accountant_are_fixed_at_creation(ledger_path, caplog):
    open_ledger(ledger_path, delta=1e-5, accountant="rdp").close()
    with caplog.at_level(logging.WARNING, logger="fedpriv.privacy.ledger"):
        ledger = open_ledger(ledger_path, delta=1e-3, accountant="prv")
    assert (ledger.delta, ledger.accountant) == (1e-5, "rdp")
    assert "delta" in caplog.text
    status = ledger.status()
    assert (status.delta, status.accountant) == (1e-5, "rdp")
    ledger.close()


@pytest.mark.parametrize("budget", [0.0, -1.0, math.inf, math.nan])
def test_invalid_budget_is_refused(ledger_path, budget):
    with pytest.raises(PrivacyError):
        open_ledger(ledger_path, budget=budget)
    assert not ledger_path.exists()


# --------------------------------------------------------------------- affordable steps, confirm


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_max_affordable_steps_is_the_largest_that_fits(ledger_path, accountant):
    with open_ledger(ledger_path, budget=2.0, accountant=accountant) as ledger:
        ledger.charge(PrivacyEvent(1.0, 0.02, 50), run_id="run", round=0)
        steps = ledger.max_affordable_steps(1.0, 0.02)
        assert steps > 0
        assert ledger.projected_epsilon(PrivacyEvent(1.0, 0.02, steps)) <= 2.0
        assert ledger.projected_epsilon(PrivacyEvent(1.0, 0.02, steps + 1)) > 2.0
        ledger.charge(PrivacyEvent(1.0, 0.02, steps), run_id="run", round=1)
        assert not ledger.locked
        assert ledger.max_affordable_steps(1.0, 0.02) == 0
        ledger.lock("spent what fits")
        assert ledger.locked


def test_confirming_fewer_steps_gives_budget_back_and_keeps_the_chain(ledger_path):
    with open_ledger(ledger_path, budget=3.0) as ledger:
        first = ledger.charge(PrivacyEvent(1.0, 0.02, 100), run_id="a", round=0)
        second = ledger.charge(PrivacyEvent(1.5, 0.05, 40), run_id="b", round=0)  # concurrent run
        with pytest.raises(LedgerError, match="charged 100"):
            ledger.confirm(first, steps_done=101)
        confirmed = ledger.confirm(first.id, steps_done=30)
        assert (confirmed.status, confirmed.steps, confirmed.charged_steps) == ("confirmed", 30, 100)
        expected = epsilon([PrivacyEvent(1.0, 0.02, 30), second.event()], DELTA)
        assert ledger.status().epsilon_spent == pytest.approx(expected)
        assert ledger.entries()[-1].epsilon_after == pytest.approx(expected)
        assert ledger.confirm(first, steps_done=30) == confirmed  # idempotent
        with pytest.raises(LedgerError, match="already confirmed"):
            ledger.confirm(first, steps_done=20)
        assert ledger.verify().ok


def test_read_ledger_uses_stored_settings_and_never_spends(ledger_path):
    with pytest.raises(LedgerError, match="no ledger"):
        read_ledger(ledger_path)
    _two_entries(ledger_path).close()
    with read_ledger(ledger_path) as stored:
        assert (stored.fingerprint, stored.budget_epsilon, stored.delta) == (FINGERPRINT, 3.0, DELTA)
        assert len(stored.entries()) == 2
        with pytest.raises(LedgerError, match="read-only"):
            stored.charge(PrivacyEvent(1.0, 0.02, 1), run_id="x", round=0)
        with pytest.raises(LedgerError, match="read-only"):
            stored.lock("no")


def test_status_metrics(ledger_path):
    with open_ledger(ledger_path, budget=2.0) as ledger:
        ledger.charge(PrivacyEvent(1.0, 0.02, 100), run_id="run", round=0)
        metrics = ledger.status().as_metrics()
    assert set(metrics) == {"epsilon", "delta", "budget-epsilon", "remaining-epsilon", "locked"}
    assert metrics["locked"] == 0
    assert metrics["remaining-epsilon"] == pytest.approx(2.0 - metrics["epsilon"])
