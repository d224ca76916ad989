"""Migrating a privacy ledger of fedpriv's first format (schema version 1) to the per-record ledger.

The first format kept one budget for one whole record set: the records whose
:func:`fedpriv.data.dataset_fingerprint` equals the ledger's fingerprint (a hospital's train
split), with one row per DP-SGD use (``entries``: sigma, sample rate, steps charged and confirmed,
run, round, time, the cumulative epsilon after it), a sha256 chain over those rows starting from a
genesis hash of the fingerprint, and the budget and lock in a ``meta`` row.

:func:`read_old_ledger` reads such a file read-only; :func:`old_chain_problems` recomputes its
sha256 chain by the first format's rules. :func:`migrate_ledger` writes a NEW ledger (never over an
existing file; the old one is left untouched) holding the same history as per-record events: the
old budget (as created, then lowered to the current one where it was), delta and accountant; every
old entry as a charge on ALL those records with the exact old noise multiplier, sample rate and
steps, its run, round and time (and its old id and hash, under ``migrated_from``), confirmed with the
old steps where it was confirmed; and the old lock as a lock of every record. Each record's epsilon
in the new ledger is then exactly the old ledger's cumulative epsilon.

The entries are appended through the ledger's own replay (:meth:`PrivacyLedger._apply`) and keyed
chain, but with the old values as they are: :meth:`PrivacyLedger.charge` would re-derive the sample
rate from a batch size and stamp the migration's time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sqlite3
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from fedpriv.errors import LedgerError, PrivacyError
from fedpriv.privacy.accounting import PrivacyEvent, epsilon
from fedpriv.privacy.chain import ChainKey, Witness, key_path_for
from fedpriv.privacy.ledger import BUDGET, CHARGE, CONFIRM, EXHAUST, OPEN, PrivacyLedger, _key_for_new_ledger
from fedpriv.privacy.records import RecordSet, record_keys
from fedpriv.privacy.store import LedgerStore, create, now

log = logging.getLogger(__name__)

OLD_SCHEMA_VERSION = 1
#: The suffix of a migrated ledger next to its old file (``ledger.db`` -> ``ledger.v2.db``).
MIGRATED_SUFFIX = ".v2.db"

_OLD_META_COLUMNS = (
    "schema_version", "fingerprint", "budget_epsilon", "initial_budget_epsilon", "delta",
    "accountant", "created_at", "locked_at", "lock_reason", "head_hash", "entry_count",
)
_OLD_AUDIT_COLUMNS = ("id", "at", "kind", "detail")


@dataclass(frozen=True)
class OldEntry:
    """One row of a first-format ledger's ``entries`` table (the field order of its hash)."""

    id: int
    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str
    status: str  # "charged" or "confirmed"
    created_at: str
    epsilon_after: float
    entry_hash: str
    charged_steps: int

    def event(self) -> PrivacyEvent:
        return PrivacyEvent(self.noise_multiplier, self.sample_rate, self.steps)


_OLD_ENTRY_COLUMNS = tuple(f.name for f in fields(OldEntry))
_OLD_ENTRY_TYPES: dict[str, type] = {
    "id": int, "run_id": str, "round": int, "noise_multiplier": float, "sample_rate": float, "steps": int,
    "accountant": str, "status": str, "created_at": str, "epsilon_after": float, "entry_hash": str,
    "charged_steps": int,
}


@dataclass(frozen=True)
class OldLedger:
    """A first-format ledger as read from its file."""

    path: Path
    fingerprint: str
    budget_epsilon: float
    initial_budget_epsilon: float
    delta: float
    accountant: str
    created_at: str
    locked_at: str | None
    lock_reason: str | None
    head_hash: str
    entry_count: int
    entries: tuple[OldEntry, ...]
    budget_lowered_at: str | None  # the time of the last lowering, from the audit table

    @property
    def recorded_epsilon(self) -> float:
        """The cumulative epsilon the old ledger recorded after its last entry (0 without entries)."""
        return self.entries[-1].epsilon_after if self.entries else 0.0

    def cumulative_epsilon(self) -> float:
        """The old ledger's cumulative epsilon, recomputed from its entries with its accountant."""
        return epsilon([entry.event() for entry in self.entries], self.delta, self.accountant)


@dataclass(frozen=True)
class MigrationResult:
    """What :func:`migrate_ledger` wrote."""

    old_path: Path
    new_path: Path
    key_path: Path
    records: int
    events: int
    confirmed: int
    locked: bool
    budget_epsilon: float
    initial_budget_epsilon: float
    delta: float
    accountant: str
    epsilon: float  # every record's epsilon in the new ledger
    old_epsilon: float  # the old ledger's cumulative epsilon, recomputed from its entries
    entries: int  # entries of the new ledger


def default_output(old_path: Path) -> Path:
    """Where a migrated ledger goes by default: the old path with the suffix ``.v2.db``."""
    return Path(old_path).with_suffix(MIGRATED_SUFFIX)


# --------------------------------------------------------------------- reading the old format


def read_old_ledger(path: str | Path) -> OldLedger:
    """Read a first-format ledger read-only (the file is never written); LedgerError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise LedgerError(f"no ledger at {path}")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot open ledger {path}: {exc}") from exc
    try:
        return _read_old(conn, path)
    except sqlite3.Error as exc:
        raise LedgerError(f"ledger {path} is unreadable or not a fedpriv ledger: {exc}") from exc
    finally:
        conn.close()


def _read_old(conn: sqlite3.Connection, path: Path) -> OldLedger:
    (verdict,) = conn.execute("PRAGMA quick_check").fetchone()
    if verdict != "ok":
        raise LedgerError(f"ledger {path} is corrupt: {verdict}")
    meta_columns = {row[1] for row in conn.execute("PRAGMA table_info(meta)")}
    if "schema_version" not in meta_columns:
        raise LedgerError(f"{path} is not a fedpriv ledger (it has no meta table with a format version)")
    versions = conn.execute("SELECT schema_version FROM meta").fetchall()
    if len(versions) != 1:
        raise LedgerError(f"ledger {path} is corrupt: expected one meta row, found {len(versions)}")
    if versions[0][0] != OLD_SCHEMA_VERSION:
        raise LedgerError(f"ledger {path} has format version {versions[0][0]!r}, not fedpriv's first format "
                          f"({OLD_SCHEMA_VERSION}); only a first-format ledger can be migrated")
    expected = {"meta": ("id", *_OLD_META_COLUMNS), "entries": _OLD_ENTRY_COLUMNS, "audit": _OLD_AUDIT_COLUMNS}
    for table, columns in expected.items():
        found = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if found != set(columns):
            raise LedgerError(f"ledger {path} is not a first-format fedpriv ledger: table {table!r} is missing "
                              "or altered")
    row = conn.execute(f"SELECT {', '.join(_OLD_META_COLUMNS)} FROM meta").fetchone()
    meta = dict(zip(_OLD_META_COLUMNS, row, strict=True))
    for name in ("budget_epsilon", "initial_budget_epsilon", "delta"):
        if isinstance(meta[name], int):
            meta[name] = float(meta[name])
    texts = ("fingerprint", "accountant", "head_hash", "created_at")
    text_ok = all(isinstance(meta[n], str) and meta[n] for n in texts)
    numbers_ok = all(isinstance(meta[n], float) and math.isfinite(meta[n]) and meta[n] > 0
                     for n in ("budget_epsilon", "initial_budget_epsilon", "delta"))
    if not (text_ok and numbers_ok and isinstance(meta["entry_count"], int) and meta["delta"] < 1):
        raise LedgerError(f"ledger {path} is corrupt: malformed meta row")
    columns = ", ".join(f'"{name}"' for name in _OLD_ENTRY_COLUMNS)
    entries = tuple(_old_entry(row) for row in conn.execute(f"SELECT {columns} FROM entries ORDER BY id"))
    lowered = conn.execute("SELECT at FROM audit WHERE kind = 'budget-lowered' ORDER BY id DESC LIMIT 1").fetchone()
    del meta["schema_version"]
    return OldLedger(path=path, entries=entries, budget_lowered_at=str(lowered[0]) if lowered else None, **meta)


def _old_entry(row: tuple[Any, ...]) -> OldEntry:
    values: dict[str, Any] = {}
    for name, value in zip(_OLD_ENTRY_COLUMNS, row, strict=True):
        expected = _OLD_ENTRY_TYPES[name]
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected):
            raise LedgerError(f"old ledger entry {row[0]!r} has a malformed {name}: {value!r}")
        values[name] = value
    return OldEntry(**values)


def old_genesis_hash(fingerprint: str) -> str:
    """The hash a first-format chain starts from (it binds the chain to the dataset's fingerprint)."""
    return hashlib.sha256(f"fedpriv-ledger/v{OLD_SCHEMA_VERSION}\n{fingerprint}".encode()).hexdigest()


def old_entry_hash(previous_hash: str, entry: OldEntry) -> str:
    """sha256 over the previous hash and the entry's fields but its hash (sorted-key JSON, exact floats)."""
    values = asdict(entry)
    values.pop("entry_hash")
    payload = json.dumps(values, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{previous_hash}\n{payload}".encode()).hexdigest()


def old_chain_problems(old: OldLedger) -> list[str]:
    """What is wrong with the old ledger's sha256 chain and entries (empty when it is intact)."""
    problems = []
    previous = old_genesis_hash(old.fingerprint)
    for position, entry in enumerate(old.entries, start=1):
        if entry.id != position:
            problems.append(f"entry {entry.id}: expected id {position} (an entry was removed or inserted)")
        if old_entry_hash(previous, entry) != entry.entry_hash:
            problems.append(f"entry {entry.id}: hash mismatch (the entry was altered or the chain is broken)")
        previous = entry.entry_hash
        if entry.accountant != old.accountant:
            problems.append(f"entry {entry.id}: accountant {entry.accountant!r}, the ledger uses {old.accountant!r}")
        if entry.status not in ("charged", "confirmed"):
            problems.append(f"entry {entry.id}: unknown status {entry.status!r}")
        if not 0 <= entry.steps <= entry.charged_steps or entry.charged_steps < 1:
            problems.append(f"entry {entry.id}: steps {entry.steps} outside 0..{entry.charged_steps} charged")
        if entry.status == "charged" and entry.steps != entry.charged_steps:
            problems.append(f"entry {entry.id}: unconfirmed, yet {entry.steps} of {entry.charged_steps} steps")
        if not entry.run_id or entry.round < 0:
            problems.append(f"entry {entry.id}: malformed run or round")
        try:
            entry.event()
        except PrivacyError as exc:
            problems.append(f"entry {entry.id}: {exc}")
    if old.entry_count != len(old.entries):
        problems.append(f"the ledger recorded {old.entry_count} entries but holds {len(old.entries)}")
    if old.head_hash != previous:
        problems.append("the ledger's head hash does not match its last entry (entries removed or altered)")
    if old.budget_epsilon > old.initial_budget_epsilon:
        problems.append(f"budget epsilon {old.budget_epsilon:g} is above the budget {old.initial_budget_epsilon:g} "
                        "the ledger was created with (a budget can only go down)")
    return problems


# --------------------------------------------------------------------- writing the new ledger


def migrate_ledger(
    old: OldLedger, record_ids: np.ndarray, out: str | Path, *, key_path: str | Path | None = None,
) -> MigrationResult:
    """Write ``old``'s history to a NEW per-record ledger at ``out``, charged to every one of ``record_ids``.

    ``record_ids`` are the ids of the records the old ledger protected (the caller checked the data's
    fingerprint). Refuses (LedgerError, nothing written) a broken old chain, an existing ``out``, or
    a key at ``key_path`` (default: the key folder's file for ``out``) that already saw entries. On
    any failure the new file (and a key it created) is removed again.
    """
    problems = old_chain_problems(old)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise LedgerError(f"old ledger {old.path} failed its integrity check: {problems[0]}{more}; "
                          "refusing to migrate it")
    out = Path(out)
    if out.exists():
        raise LedgerError(f"{out} already exists; a migration never overwrites a file (choose another --out)")
    ids = np.asarray(record_ids, dtype=str)
    if len(ids) == 0:
        raise LedgerError("no records to charge the old ledger's events to")
    if len(np.unique(ids)) != len(ids):
        raise LedgerError("the record ids are not unique; each record must be charged once")
    key_file = Path(key_path) if key_path else key_path_for(out)
    key_existed, witness_existed = key_file.is_file(), key_file.with_suffix(".head").is_file()
    key = _key_for_new_ledger(out, key_file)
    ledger_id = uuid.uuid4().hex
    create(out, ledger_id)
    store = LedgerStore.open(out)
    if store.ledger_id != ledger_id:  # another process created a ledger there first: it is not ours to touch
        store.close()
        raise LedgerError(f"{out} was created by another process meanwhile; a migration never writes into a ledger")
    try:
        ledger = PrivacyLedger(store, key, read_only=False)
        try:
            result = _write(ledger, old, ids, key)
        finally:
            ledger.close()
    except BaseException:
        _remove_new(out, key, key_existed, witness_existed)
        raise
    log.info("migrated first-format ledger %s to %s (%d events on %d records)", old.path, out, result.events,
             result.records)
    return result


def _write(ledger: PrivacyLedger, old: OldLedger, ids: np.ndarray, key: ChainKey) -> MigrationResult:
    keys = record_keys(ids)
    records = RecordSet.of(keys)
    migrated_at = now()
    source = {"path": str(old.path.resolve()), "format": OLD_SCHEMA_VERSION, "fingerprint": old.fingerprint,
              "migrated_at": migrated_at}
    with ledger._store.transaction() as conn:
        history = ledger._history(conn)
        history = ledger._append(conn, history, OPEN, {
            "budget_epsilon": old.initial_budget_epsilon, "delta": old.delta, "accountant": old.accountant,
            "migrated_from": source}, at=old.created_at)
        ledger._store.save_set(conn, records)
        first_use = None
        for entry in old.entries:
            history = ledger._append(conn, history, CHARGE, {
                "run_id": entry.run_id, "round": entry.round, "hospital": "",
                "private": entry.noise_multiplier != 0, "noise_multiplier": entry.noise_multiplier,
                "sample_rate": entry.sample_rate, "steps": entry.charged_steps, "accountant": old.accountant,
                "record_set": records.digest, "set_size": len(records), "projected_epsilon": entry.epsilon_after,
                "migrated_from": {"entry": entry.id, "entry_hash": entry.entry_hash, "status": entry.status}}, at=entry.created_at)
            charge_id = history.length
            first_use = first_use or charge_id
            if entry.status == "confirmed":
                history = ledger._append(conn, history, CONFIRM, {
                    "charge": charge_id, "steps": entry.steps, "migrated_from": {"entry": entry.id}}, at=migrated_at)
        if old.budget_epsilon < old.initial_budget_epsilon:
            history = ledger._append(conn, history, BUDGET, {
                "budget_epsilon": old.budget_epsilon, "migrated_from": {"budget": "lowered in the old ledger"}}, at=old.budget_lowered_at or migrated_at)
        if old.locked_at is not None:
            reason = f"{old.lock_reason or 'locked'} (carried over from the first-format ledger {old.path})"
            history = ledger._append(conn, history, EXHAUST, {
                "record_set": records.digest, "reason": reason}, at=old.locked_at)
            first_use = first_use or history.length
        ledger._store.add_records(conn, keys, ids, first_use or 1)
    ledger._after_write(history)
    report = ledger.verify()
    if not report.ok:
        raise LedgerError(f"the migrated ledger {ledger.path} failed its own check: {'; '.join(report.problems)}")
    status = ledger.status(ids)
    return MigrationResult(
        old_path=old.path, new_path=ledger.path, key_path=key.path, records=len(records), events=len(old.entries),
        confirmed=sum(entry.status == "confirmed" for entry in old.entries), locked=status.locked,
        budget_epsilon=status.budget_epsilon, initial_budget_epsilon=old.initial_budget_epsilon, delta=old.delta,
        accountant=old.accountant, epsilon=status.epsilon_spent, old_epsilon=old.cumulative_epsilon(),
        entries=report.entries)


def _remove_new(out: Path, key: ChainKey, key_existed: bool, witness_existed: bool) -> None:
    """Undo a failed migration: the new file is ours alone, and so is a key or witness it created."""
    for path in (out, Path(f"{out}-journal")):
        path.unlink(missing_ok=True)
    if not witness_existed:
        key.witness_path.unlink(missing_ok=True)
    else:
        key.write_witness(Witness(0, ""))
    if not key_existed:
        key.path.unlink(missing_ok=True)
