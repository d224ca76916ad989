"""A ledger shared by many hospitals: what a round costs does not grow with the other hospitals' sets,
and no shortcut taken for that under-counts a spend.

fedpriv's simulated hospitals share one ledger per data source (fedpriv.site), so with 1,000 of them
it holds thousands of small record sets. A process finds the sets that hold a hospital's records
with its membership index (fedpriv.privacy.records.MembershipIndex), keeps every set it read (the
store's cache is bounded in bytes, not in sets), and on opening checks from the file only the sets
it has not read yet. The ledger's entries (the budget state) are still read from the file on every
call, so a spend written by another process always counts.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from ledger_helpers import DELTA, check_against_dp_accounting, open_ledger, record_ids, sql

from fedpriv.errors import LedgerError
from fedpriv.privacy import ledger as ledger_module
from fedpriv.privacy import store
from fedpriv.privacy.records import MembershipIndex, RecordSet, record_keys

SIGMA, BATCH, STEPS = 2.0, 8, 2


@pytest.fixture(autouse=True)
def _key_dir_and_fresh_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPRIV_KEY_DIR", str(tmp_path / "keys"))
    monkeypatch.setattr(ledger_module, "_INDEX", MembershipIndex())
    store._SET_CACHE.clear()
    yield
    store._SET_CACHE.clear()


def _round(ledger, ids, run="run", round=1, hospital=""):
    made = ledger.charge(ids, noise_multiplier=SIGMA, batch_size=BATCH, steps=STEPS, run_id=run, round=round,
                         hospital=hospital)
    ledger.confirm(made, steps_done=STEPS)
    return made


def _shares(hospitals: int, each: int, shift: int = 0) -> list[np.ndarray]:
    """Hospital h's records: a slice of one pool; `shift` moves every slice (another partition)."""
    pool = record_ids("r", hospitals * each + shift)
    return [pool[h * each + shift:(h + 1) * each + shift] for h in range(hospitals)]


def test_the_index_finds_exactly_the_sets_that_hold_a_key():
    rng = np.random.default_rng(0)
    universe = rng.integers(0, 2**63, size=400, dtype=np.uint64)
    sets = [RecordSet.of(rng.choice(universe, size=int(rng.integers(1, 40)), replace=False)) for _ in range(120)]
    index = MembershipIndex()
    assert index.add(sets[:50]) and index.add(sets[30:])  # in two steps, overlapping: each set once
    assert len(index) == sum(len(s) for s in {s.digest: s for s in sets}.values())
    for _ in range(30):
        keys = rng.choice(universe, size=int(rng.integers(1, 20)), replace=False)
        expected = {s.digest for s in sets if s.contains(keys).any()}
        assert index.holding(keys) == expected
    assert index.holding(np.array([7], dtype=np.uint64) if 7 not in universe else np.zeros(0, np.uint64)) == set()


def test_the_index_starts_again_when_full_and_refuses_what_cannot_fit():
    small = [RecordSet.of(np.arange(start, start + 10, dtype=np.uint64)) for start in range(0, 100, 10)]
    index = MembershipIndex(limit=50)
    assert index.add(small[:5]) and all(s.digest in index for s in small[:5])
    assert index.add(small[5:7])  # 70 > 50: emptied, then only these two
    assert [s.digest in index for s in small[:7]] == [False] * 5 + [True] * 2
    assert index.holding(np.array([3, 55, 61], dtype=np.uint64)) == {small[5].digest, small[6].digest}
    assert not index.add(small)  # 100 keys alone exceed the limit: nothing added
    assert small[0].digest not in index


@pytest.mark.slow
@pytest.mark.parametrize("limit", [4_000_000, 25])  # 25: the index cannot hold them, every set is tested
def test_many_hospitals_sharing_a_ledger_count_every_event_of_every_record(tmp_path, monkeypatch, limit):
    # Three runs with the shares shifted, as when a simulated federation is re-partitioned: every
    # record's spend must follow it into whichever hospital holds it, in a process whose caches
    # hold every set it read.
    monkeypatch.setattr(ledger_module, "_INDEX", MembershipIndex(limit=limit))
    path = tmp_path / "shared.db"
    for run, shift in (("one", 0), ("two", 5), ("three", 0)):
        for hospital, ids in enumerate(_shares(6, 10, shift)):
            with open_ledger(path, budget=50.0, accountant="rdp") as ledger:
                _round(ledger, ids, run=run, hospital=f"h{hospital}")
    pool = record_ids("r", 6 * 10 + 5)
    with open_ledger(path, budget=50.0, accountant="rdp") as ledger:
        expected = check_against_dp_accounting(ledger, pool, history_sample=3)
        budgets = ledger.budgets(pool)
    # Records held by one hospital in every run have three events; the moved ones up to three more.
    assert len(set(np.round(expected, 9))) >= 2
    assert (budgets.epsilon > 0).all()
    store._SET_CACHE.clear()  # a process starting afresh reads the same figures
    with open_ledger(path, budget=50.0, accountant="rdp") as fresh:
        np.testing.assert_array_equal(fresh.budgets(pool).epsilon, budgets.epsilon)


def test_a_hospitals_round_tests_only_the_sets_that_hold_its_records(tmp_path, monkeypatch):
    path = tmp_path / "shared.db"
    shares = _shares(60, 20)
    for hospital, ids in enumerate(shares):
        with open_ledger(path, budget=50.0, accountant="rdp") as ledger:
            _round(ledger, ids, hospital=f"h{hospital}")
    with open_ledger(path, budget=50.0, accountant="rdp") as ledger:
        ledger.status()  # the process has now read every set
    tested, read = [], []
    real_contains, real_load = RecordSet.contains, store.LedgerStore.load_set
    monkeypatch.setattr(RecordSet, "contains", lambda self, keys: tested.append(self.digest) or real_contains(self, keys))
    monkeypatch.setattr(store.LedgerStore, "load_set",
                        lambda self, conn, digest, cached=True: read.append(cached) or real_load(self, conn, digest,
                                                                                               cached=cached))
    with open_ledger(path, budget=50.0, accountant="rdp") as ledger:
        prior, open_records, events = ledger.round_start(shares[7], budget=50.0)
        made = _round(ledger, shares[7], round=2, hospital="h7")
        status = ledger.confirm(made, steps_done=STEPS, status_of=shares[7], budget=50.0)
    # Of 60 sets, only hospital 7's own was tested against its records (round start, charge, status).
    own = RecordSet.of(record_keys(shares[7])).digest
    assert set(tested) == {own} and len(tested) <= 4
    assert False not in read  # no set was re-read from the file for this hospital's round
    assert len(prior) == 1 and open_records == 20 and len(events) == 60
    assert status.epsilon_spent > 0 and status.records == 20


def test_a_set_the_process_has_not_read_is_checked_from_the_file_when_the_ledger_opens(tmp_path):
    path = tmp_path / "shared.db"
    first, second = _shares(2, 20)
    with open_ledger(path) as ledger:
        _round(ledger, first)
        ledger.status()  # this process has read the first hospital's set
    with open_ledger(path) as ledger:
        _round(ledger, second)  # a new set, not read back by this process
    digest = RecordSet.of(record_keys(second)).digest
    store._SET_CACHE.pop(digest, None)
    blob = RecordSet.of(record_keys(second)).to_bytes()
    sql(path, ("UPDATE sets SET keys = ?, size = ? WHERE digest = ?", (blob[:80], 10, digest)))  # half escapes
    with pytest.raises(LedgerError) as refusal:
        open_ledger(path).close()
    assert refusal.value.reason == "its privacy ledger failed its integrity check"


def test_confirm_with_status_and_round_start_read_what_the_separate_calls_read(tmp_path):
    path = tmp_path / "ledger.db"
    ids = record_ids("a", 30)
    with open_ledger(path, budget=20.0, accountant="rdp") as ledger:
        _round(ledger, ids[:20], run="r0")
        made = ledger.charge(ids, noise_multiplier=SIGMA, batch_size=BATCH, steps=STEPS, run_id="r1", round=1)
        assert ledger.round_start(ids, budget=15.0) == (*ledger.calibration_history(ids, budget=15.0), ledger.events())
        status = ledger.confirm(made, steps_done=1, status_of=ids, budget=15.0)
        assert status == ledger.status(ids, budget=15.0)
        assert ledger.confirm(made, steps_done=1) is None  # already confirmed with 1 step: nothing written
        assert ledger.confirm(made, steps_done=1, status_of=ids[:5]) == ledger.status(ids[:5])
        with pytest.raises(LedgerError):
            ledger.confirm(made, steps_done=2, status_of=ids)


@pytest.mark.slow
def test_the_set_cache_is_bounded_in_bytes_not_in_sets(tmp_path, monkeypatch):
    path = tmp_path / "shared.db"
    for hospital, ids in enumerate(_shares(100, BATCH)):
        with open_ledger(path, budget=50.0, accountant="rdp") as ledger:
            _round(ledger, ids, hospital=f"h{hospital}")
    with open_ledger(path, budget=50.0, accountant="rdp") as ledger:
        ledger.status()
    assert len(store._SET_CACHE) == 100 and store._SET_CACHE.nbytes == 100 * BATCH * 8  # all kept (once 64 at most)
    monkeypatch.setattr(store, "_SET_CACHE_BYTES", 40 * BATCH * 8)
    store._SET_CACHE.clear()
    with open_ledger(path, budget=50.0, accountant="rdp") as ledger:
        ledger.status()
    assert len(store._SET_CACHE) == 40 and store._SET_CACHE.nbytes == 40 * BATCH * 8


@pytest.mark.slow
@pytest.mark.processes
def test_a_spend_written_by_another_process_counts_in_a_process_with_warm_caches(tmp_path):
    # The budget state is the file's: a process that has read the ledger (its replay, sets and index
    # are warm) must see, at its next call, what another process charged in between.
    path = tmp_path / "shared.db"
    ids = record_ids("a", 40)
    with open_ledger(path, budget=6.0, accountant="rdp") as ledger:
        _round(ledger, ids)
        before = ledger.status(ids)
        prior_before, _ = ledger.calibration_history(ids)
    other = textwrap.dedent(f"""
        import os
        import numpy as np
        from fedpriv.privacy.ledger import PrivacyLedger
        ids = np.array([f"a-{{i:04d}}" for i in range(40)])
        with PrivacyLedger.open({str(path)!r}, budget_epsilon=6.0, delta={DELTA}, accountant="rdp") as ledger:
            for round in (1, 2):
                made = ledger.charge(ids, noise_multiplier={SIGMA}, batch_size={BATCH}, steps={STEPS},
                                     run_id="other", round=round)
                ledger.confirm(made, steps_done={STEPS})
    """)
    subprocess.run([sys.executable, "-c", other], check=True, timeout=120, env={**__import__("os").environ})
    with open_ledger(path, budget=6.0, accountant="rdp") as ledger:
        after = ledger.status(ids)
        prior_after, _ = ledger.calibration_history(ids)
        assert after.epsilon_spent > before.epsilon_spent and after.chain_length == before.chain_length + 4
        assert len(prior_after) == len(prior_before) + 2
        check_against_dp_accounting(ledger, ids, history_sample=2)
