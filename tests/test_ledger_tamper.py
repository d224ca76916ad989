"""A tampered ledger is detected and the hospital refuses to use it.

Each attack is made on the SQLite file directly (or on the files next to it). Detected means: a
LedgerError when the ledger is opened and when an already-open ledger charges, `verify()` reports
a problem, and the hospital's `train_round` refuses (LedgerError, nothing trained, nothing written;
its ClientApp turns that into a "refused" reply). An attacker who rewrites the chain without the
hospital's key (plain sha256, a guessed or a foreign key) is detected too.

Record sets are immutable and cached per process (fedpriv.privacy.store); each test starts with an
empty cache so that what it reads comes from the file, as in a freshly started node.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from ledger_helpers import DELTA, key_file, raw_entries, sql, tiny_model, witness_file

from fedpriv.data.synthetic import make_synthetic
from fedpriv.errors import LedgerError
from fedpriv.hospital import TRAINED, HospitalSettings, RoundRequest, train_round
from fedpriv.privacy import store
from fedpriv.privacy.chain import canonical
from fedpriv.privacy.ledger import PrivacyLedger, read_ledger

BUDGET = 5.0


@pytest.fixture(autouse=True)
def _key_dir_and_fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPRIV_KEY_DIR", str(tmp_path / "keys"))
    store._SET_CACHE.clear()
    yield
    store._SET_CACHE.clear()


@pytest.fixture(scope="module")
def records():
    return make_synthetic(num_samples=100, size=8, seed=1, val_fraction=0.1, test_fraction=0.1).train


def settings_for(tmp_path: Path) -> HospitalSettings:
    return HospitalSettings("A", BUDGET, DELTA, tmp_path / "hospital" / "ledger.db")


def train(settings: HospitalSettings, records, server_round: int, run: str = "run"):
    request = RoundRequest(run_id=run, server_round=server_round, num_rounds=8, batch_size=10, lr=0.1,
                           noise_multiplier=3.0)
    return train_round(tiny_model(), records, settings, request)


def open_again(settings: HospitalSettings) -> PrivacyLedger:
    return PrivacyLedger.open(settings.ledger_path, budget_epsilon=BUDGET, delta=DELTA)


def assert_detected(settings: HospitalSettings, records, held: PrivacyLedger | None = None, *,
                    file_left: bool = True) -> None:
    """Open, charge, verify and the hospital's round all refuse the ledger; nothing is written."""
    path = settings.ledger_path
    before = path.read_bytes() if file_left else None
    with pytest.raises(LedgerError):
        open_again(settings).close()
    if held is not None:  # a node that opened the ledger before the attack refuses its next charge
        with pytest.raises(LedgerError):
            held.charge(records.ids(), noise_multiplier=3.0, batch_size=10, steps=1, run_id="after", round=9)
    if file_left:
        with read_ledger(path) as ledger:
            report = ledger.verify()
        assert not report.ok and report.problems
        if held is not None:
            assert not held.verify().ok
    model = tiny_model()
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(LedgerError) as refusal:
        train_round(model, records, settings, RoundRequest(run_id="after", server_round=1, num_rounds=1,
                                                           batch_size=10, lr=0.1, noise_multiplier=3.0))
    assert refusal.value.reason  # the short cause a ClientApp tells the server
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))  # nothing trained
    if file_left:
        assert path.read_bytes() == before  # nothing written to a ledger that failed its checks
    else:
        assert not path.exists()  # never started afresh


@pytest.fixture
def four_rounds(tmp_path, records):
    """A hospital that trained four rounds, with its ledger held open by a running node."""
    settings = settings_for(tmp_path)
    for server_round in (1, 2, 3, 4):
        assert train(settings, records, server_round).status == TRAINED
    held = open_again(settings)
    assert held.verify().ok
    yield settings, held
    held.close()


def _swap_ids(path: Path, first: int, second: int) -> None:
    sql(path, f"UPDATE entries SET id = -1 WHERE id = {first}", f"UPDATE entries SET id = {first} WHERE id = {second}",
        f"UPDATE entries SET id = {second} WHERE id = -1")


def _scale_sigmas(path: Path) -> None:
    for entry_id, kind, body, _ in raw_entries(path):
        if kind == "charge":
            body["noise_multiplier"] *= 10
            sql(path, ("UPDATE entries SET body = ? WHERE id = ?", (json.dumps(body, sort_keys=True), entry_id)))


def _flip_a_set_bit(path: Path) -> None:
    raw = sqlite3.connect(path)
    digest, blob = raw.execute("SELECT digest, keys FROM sets").fetchone()
    raw.close()
    altered = bytearray(blob)
    altered[3] ^= 0x10
    sql(path, ("UPDATE sets SET keys = ? WHERE digest = ?", (bytes(altered), digest)))


def _drop_half_a_set(path: Path) -> None:
    raw = sqlite3.connect(path)
    digest, blob = raw.execute("SELECT digest, keys FROM sets").fetchone()
    raw.close()
    half = blob[: len(blob) // 2 // 8 * 8]  # half the records escape every event of this set
    sql(path, ("UPDATE sets SET keys = ?, size = ? WHERE digest = ?", (half, len(half) // 8, digest)))


ATTACKS: dict[str, Callable[[Path], None]] = {
    "delete every entry after the first (unlock)": lambda p: sql(p, "DELETE FROM entries WHERE id > 1"),
    "delete the last entry": lambda p: sql(p, "DELETE FROM entries WHERE id = (SELECT MAX(id) FROM entries)"),
    "delete a middle entry": lambda p: sql(p, "DELETE FROM entries WHERE id = 4"),
    "truncate to 0 entries": lambda p: sql(p, "DELETE FROM entries"),
    "truncate to 3 entries": lambda p: sql(p, "DELETE FROM entries WHERE id > 3"),
    "truncate to 6 entries": lambda p: sql(p, "DELETE FROM entries WHERE id > 6"),
    "every sigma times 10": _scale_sigmas,
    "swap two entries' ids": lambda p: _swap_ids(p, 2, 4),
    "swap two charges' ids": lambda p: _swap_ids(p, 2, 6),
    "change the ledger id": lambda p: sql(p, "UPDATE meta SET ledger_id = 'someone-else'"),
    "turn a charge into a confirmation": lambda p: sql(p, "UPDATE entries SET kind = 'confirm' WHERE id = 2"),
    "flip a bit of a record set": _flip_a_set_bit,
    "drop half of a record set": _drop_half_a_set,
    "delete a record set": lambda p: sql(p, "DELETE FROM sets"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_an_edited_ledger_is_detected_and_refused(four_rounds, records, attack):
    settings, held = four_rounds
    ATTACKS[attack](settings.ledger_path)
    store._SET_CACHE.clear()  # what a node (re)started after the attack reads: the file
    # A node that read the meta row before it was changed keeps the true ledger id, and its entries
    # stay correctly chained; the changed file is refused by every node that opens it afterwards.
    assert_detected(settings, records, None if attack == "change the ledger id" else held)


def test_an_older_copy_of_the_file_is_detected(tmp_path, records):
    settings = settings_for(tmp_path)
    for server_round in (1, 2):
        assert train(settings, records, server_round).status == TRAINED
    saved = tmp_path / "after-two-rounds.db"
    shutil.copyfile(settings.ledger_path, saved)
    held = open_again(settings)
    for server_round in (3, 4):
        assert train(settings, records, server_round).status == TRAINED
    shutil.copyfile(saved, settings.ledger_path)  # the spend of rounds 3 and 4 "never happened"
    try:
        assert_detected(settings, records, held)
    finally:
        held.close()


def test_a_deleted_ledger_is_not_started_afresh_while_its_key_remembers_it(four_rounds, records):
    settings, held = four_rounds
    held.close()
    assert key_file(settings.ledger_path).is_file() and witness_file(settings.ledger_path).is_file()
    os.remove(settings.ledger_path)
    with pytest.raises(LedgerError, match="deleted"):
        open_again(settings)
    assert not settings.ledger_path.exists()
    assert_detected(settings, records, file_left=False)


def test_a_ledger_whose_key_was_deleted_is_refused(four_rounds, records):
    settings, held = four_rounds
    os.remove(key_file(settings.ledger_path))
    with pytest.raises(LedgerError, match="key"):
        open_again(settings)
    with read_ledger(settings.ledger_path) as ledger:
        assert not ledger.verify().ok
    assert_detected(settings, records)
    assert not key_file(settings.ledger_path).exists()  # no new key is made for an existing ledger


def test_a_deleted_ledger_and_key_are_not_started_afresh_while_the_witness_remains(four_rounds, records):
    settings, held = four_rounds
    held.close()
    os.remove(settings.ledger_path)
    os.remove(key_file(settings.ledger_path))
    with pytest.raises(LedgerError):
        open_again(settings).close()


def _retag(path: Path, genesis: str, tag: Callable[[str, dict], str]) -> None:
    previous = genesis
    for entry_id, kind, body, _ in raw_entries(path):
        previous = tag(previous, {"id": entry_id, "kind": kind, "body": body})
        sql(path, ("UPDATE entries SET tag = ? WHERE id = ?", (previous, entry_id)))


def _ledger_id(path: Path) -> str:
    raw = sqlite3.connect(path)
    (ledger_id,) = raw.execute("SELECT ledger_id FROM meta").fetchone()
    raw.close()
    return ledger_id


def _keyed(secret: bytes) -> tuple[Callable[[str], str], Callable[[str, dict], str]]:
    def genesis(ledger_id: str) -> str:
        return hmac.new(secret, b"fedpriv-ledger/v2\n" + ledger_id.encode(), hashlib.sha256).hexdigest()

    def tag(previous: str, entry: dict) -> str:
        return hmac.new(secret, previous.encode() + b"\n" + canonical(entry), hashlib.sha256).hexdigest()

    return genesis, tag


def _unkeyed() -> tuple[Callable[[str], str], Callable[[str, dict], str]]:
    def genesis(ledger_id: str) -> str:
        return hashlib.sha256(b"fedpriv-ledger/v2\n" + ledger_id.encode()).hexdigest()

    def tag(previous: str, entry: dict) -> str:
        return hashlib.sha256(previous.encode() + b"\n" + canonical(entry)).hexdigest()

    return genesis, tag


@pytest.mark.parametrize("forger", ["unkeyed sha256", "guessed key", "another ledger's key"])
def test_an_attacker_without_the_key_cannot_rewrite_the_chain(four_rounds, records, tmp_path, forger):
    settings, held = four_rounds
    path = settings.ledger_path
    if forger == "unkeyed sha256":
        genesis, tag = _unkeyed()
    elif forger == "guessed key":
        genesis, tag = _keyed(bytes(32))
    else:  # the attacker runs a hospital too, and uses the key of their own ledger
        other = HospitalSettings("B", BUDGET, DELTA, tmp_path / "attacker" / "ledger.db")
        assert train(other, records, 1).status == TRAINED
        genesis, tag = _keyed(bytes.fromhex(key_file(other.ledger_path).read_text().strip()))
    # Undo rounds 3 and 4 and lower every sigma's cost, then re-chain what is left consistently.
    sql(path, "DELETE FROM entries WHERE id > 5")
    _scale_sigmas(path)
    _retag(path, genesis(_ledger_id(path)), tag)
    assert_detected(settings, records, held)


def test_an_untouched_ledger_passes_every_check(four_rounds, records):
    settings, held = four_rounds
    assert held.verify().ok
    with read_ledger(settings.ledger_path) as ledger:
        report = ledger.verify()
        assert report.ok and report.events == 4 and report.entries == len(raw_entries(settings.ledger_path))
    assert train(settings, records, 5).status == TRAINED


def test_verify_rereads_the_record_sets_in_a_process_that_already_read_them(four_rounds, records):
    # The process-wide set cache is filled by the rounds above. `verify` promises to check every
    # record set: it must check the file, not what this process remembers of it.
    settings, held = four_rounds
    _drop_half_a_set(settings.ledger_path)
    assert not held.verify().ok
    with read_ledger(settings.ledger_path) as ledger:
        assert not ledger.verify().ok
