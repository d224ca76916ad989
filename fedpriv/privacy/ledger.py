"""The hospital's privacy ledger: every DP-SGD use of one dataset, enforced against its own budget.

A hospital decides how much privacy (epsilon, delta) it will ever spend on a dataset. Its node keeps
one small SQLite database per dataset that records every DP-SGD use of the data, refuses training
that would go over budget, and locks the dataset for good once the budget is spent. The budget
holds across rounds, separate runs, concurrent processes and crashes:

* **Accounting from history.** Epsilon is always recomputed from the whole ledger with an Opacus
  accountant (:func:`fedpriv.privacy.accounting.epsilon`), never added up by hand.
* **Write-ahead, fail closed.** :meth:`PrivacyLedger.charge` durably commits the planned spend as
  ``charged`` *before* the first training step; :meth:`PrivacyLedger.confirm` records the steps
  actually done afterwards. A node killed in between keeps the full charge: the ledger may
  over-count, never under-count.
* **One writer at a time.** The budget check and the insert happen in one ``BEGIN IMMEDIATE``
  transaction, so two processes cannot both spend the last of a budget.
* **Prospective enforcement and locking.** A charge whose projected epsilon exceeds the hospital's
  budget is refused with :class:`~fedpriv.errors.BudgetExhausted` and the dataset is LOCKED
  durably; every later charge is refused at once, without computing anything.
* **Integrity.** Each entry stores a sha256 hash chained over the previous entry's hash and its own
  fields, plus the cumulative epsilon after it. ``open`` and ``charge`` refuse a broken chain;
  :meth:`PrivacyLedger.verify` also recomputes every cumulative epsilon. A corrupt or foreign file
  raises :class:`~fedpriv.errors.LedgerError`; a ledger is never silently reset.

Budgets only go down through a ledger: opening it with a lower budget records the lower one, a
higher budget is ignored (with a warning), and a per-request ``max_epsilon`` (e.g. from the
server) can only lower the cap of that request. Delta and the accountant are fixed when the ledger
is created. A hospital that really wants to raise its own budget must deliberately start a *new*
ledger file for the data (and should document why); nothing in fedpriv does that for it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import operator
import os
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from fedpriv.errors import BudgetExhausted, LedgerError, PrivacyError
from fedpriv.privacy.accounting import PrivacyEvent, check_accountant, epsilon

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# A competing process may hold the write lock while its accountant runs (PRV can take seconds).
BUSY_TIMEOUT_S = 60.0
CHARGED, CONFIRMED = "charged", "confirmed"
# max_affordable_steps never searches beyond this many steps (no real round is that long).
MAX_SEARCH_STEPS = 10**7
# Recorded cumulative epsilons must recompute to within this relative error; the slack only
# absorbs numerical noise between accountant versions (tampered fields break the hash anyway).
EPSILON_REL_TOL = 1e-3

_SCHEMA = """
CREATE TABLE meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    schema_version INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    budget_epsilon REAL NOT NULL,
    initial_budget_epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    accountant TEXT NOT NULL,
    created_at TEXT NOT NULL,
    locked_at TEXT,
    lock_reason TEXT,
    head_hash TEXT NOT NULL,
    entry_count INTEGER NOT NULL
);
CREATE TABLE entries (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    "round" INTEGER NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL CHECK (steps >= 0),
    accountant TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('charged', 'confirmed')),
    created_at TEXT NOT NULL,
    epsilon_after REAL NOT NULL,
    entry_hash TEXT NOT NULL,
    charged_steps INTEGER NOT NULL CHECK (charged_steps >= steps)
);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""
_META_COLUMNS = (
    "schema_version", "fingerprint", "budget_epsilon", "initial_budget_epsilon", "delta",
    "accountant", "created_at", "locked_at", "lock_reason", "head_hash", "entry_count",
)
_AUDIT_COLUMNS = ("id", "at", "kind", "detail")


@dataclass(frozen=True)
class LedgerEntry:
    """One DP-SGD use of the dataset, as stored in the ledger.

    ``status`` is ``'charged'`` (written before training; counts in full) or ``'confirmed'``
    (``steps`` are the steps actually done). ``epsilon_after`` is the cumulative epsilon of this and
    every earlier entry, by the ledger's accountant. ``charged_steps`` keeps the steps originally
    charged, so an audit can see what a confirmation gave back.
    """

    id: int
    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str
    status: str
    created_at: str
    epsilon_after: float
    entry_hash: str
    charged_steps: int

    def event(self) -> PrivacyEvent:
        """The privacy event this entry accounts for."""
        return PrivacyEvent(self.noise_multiplier, self.sample_rate, self.steps)


_ENTRY_COLUMNS = tuple(field.name for field in fields(LedgerEntry))
_ENTRY_TYPES: dict[str, type] = {
    "id": int, "run_id": str, "round": int, "noise_multiplier": float, "sample_rate": float,
    "steps": int, "accountant": str, "status": str, "created_at": str, "epsilon_after": float,
    "entry_hash": str, "charged_steps": int,
}


@dataclass(frozen=True)
class BudgetStatus:
    """Where a dataset's budget stands: epsilon spent at ``delta`` out of ``budget_epsilon``."""

    epsilon_spent: float
    delta: float
    budget_epsilon: float
    remaining: float
    locked: bool
    accountant: str

    def as_metrics(self) -> dict[str, float | int]:
        """Flat metrics for Flower (``locked`` is the int 0 or 1, as metric values are numbers)."""
        return {
            "epsilon": float(self.epsilon_spent),
            "delta": float(self.delta),
            "budget-epsilon": float(self.budget_epsilon),
            "remaining-epsilon": float(self.remaining),
            "locked": int(self.locked),
        }


@dataclass(frozen=True)
class VerifyReport:
    """Result of :meth:`PrivacyLedger.verify`: ``ok`` iff ``problems`` is empty."""

    ok: bool
    problems: list[str]
    recomputed_epsilon: float
    recorded_epsilon: float


@dataclass(frozen=True)
class _Meta:
    """The ledger's single meta row."""

    schema_version: int
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


class PrivacyLedger:
    """The privacy ledger of one hospital dataset (see the module docstring).

    Create or open one with :meth:`open`; :func:`read_ledger` opens an existing one for inspection
    only. A ledger holds one SQLite connection; it is safe to share between threads of a process,
    and any number of processes may use the same file.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, *, read_only: bool) -> None:
        """Wrap an opened, structurally checked connection; use :meth:`open` or :func:`read_ledger`."""
        self.path = path
        self._conn: sqlite3.Connection | None = conn
        self._read_only = read_only
        self._mutex = threading.RLock()
        self.fingerprint = ""
        self.budget_epsilon = math.nan
        self.delta = math.nan
        self.accountant = ""

    # ----------------------------------------------------------------- opening and closing

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        fingerprint: str,
        budget_epsilon: float,
        delta: float,
        accountant: str = "prv",
    ) -> PrivacyLedger:
        """Open the ledger at ``path`` for the data with ``fingerprint``, creating it if missing.

        A new ledger stores this budget, delta and accountant. An existing one must protect the
        same data (else :class:`LedgerError`), keeps its delta and accountant, and only ever takes
        the lower of the stored and the given budget.
        """
        _check_settings(fingerprint, budget_epsilon, delta, accountant)
        path = Path(path)
        if not path.exists():
            try:
                _create(path, fingerprint, budget_epsilon, delta, accountant)
            except (OSError, sqlite3.Error) as exc:
                raise storage_error(path, exc, "create") from exc
        ledger = cls(path, _connect(path), read_only=False)
        try:
            ledger._adopt(fingerprint, budget_epsilon, delta, accountant)
        except BaseException:
            ledger.close()
            raise
        return ledger

    def close(self) -> None:
        """Close the database connection (idempotent)."""
        with self._mutex:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PrivacyLedger({str(self.path)!r}, budget_epsilon={self.budget_epsilon}, delta={self.delta})"

    def _adopt(self, fingerprint: str, budget_epsilon: float, delta: float, accountant: str) -> None:
        """Check that this ledger protects ``fingerprint``'s data and apply the caller's settings."""
        with self._transaction() as conn:
            meta = self._load_meta(conn)
            if meta.fingerprint != fingerprint:
                raise LedgerError(
                    f"ledger {self.path} protects other data (fingerprint {meta.fingerprint[:16]}..., "
                    f"not {fingerprint[:16]}...); use the ledger of this dataset or a new ledger path",
                    reason="its ledger path holds another dataset's ledger (two datasets cannot share one)",
                )
            self._verified_entries(conn, meta)
            if budget_epsilon < meta.budget_epsilon:
                self._lower_budget(conn, meta.budget_epsilon, budget_epsilon)
                meta = self._load_meta(conn)
        self._warn_on_ignored_settings(meta, budget_epsilon, delta, accountant)

    def _lower_budget(self, conn: sqlite3.Connection, old: float, new: float) -> None:
        conn.execute("UPDATE meta SET budget_epsilon = ? WHERE id = 1", (new,))
        _audit(conn, "budget-lowered", f"budget epsilon lowered from {old:g} to {new:g}")
        log.info("ledger %s: budget epsilon lowered from %g to %g", self.path, old, new)

    def _warn_on_ignored_settings(self, meta: _Meta, budget: float, delta: float, accountant: str) -> None:
        if budget > meta.budget_epsilon:
            log.warning(
                "ledger %s: requested budget epsilon %g is higher than the ledger's %g; keeping %g "
                "(a budget only goes down through its ledger; raising it needs a new ledger)",
                self.path, budget, meta.budget_epsilon, meta.budget_epsilon,
            )
        if delta != meta.delta:
            log.warning(
                "ledger %s: delta is fixed at %g when created; ignoring %g", self.path, meta.delta, delta
            )
        if accountant != meta.accountant:
            log.warning(
                "ledger %s: accountant is fixed at %r when created; ignoring %r",
                self.path, meta.accountant, accountant,
            )

    # ----------------------------------------------------------------- reading

    def entries(self) -> list[LedgerEntry]:
        """Every entry, oldest first."""
        with self._read() as conn:
            return _load_entries(conn)

    def events(self) -> list[PrivacyEvent]:
        """The privacy events of every entry, oldest first (charged entries count in full)."""
        return [entry.event() for entry in self.entries()]

    def status(self) -> BudgetStatus:
        """Epsilon spent so far (recomputed from the whole history), the budget and the lock."""
        with self._read() as conn:
            meta = self._load_meta(conn)
            history = [entry.event() for entry in _load_entries(conn)]
        spent = self._epsilon(history, meta)
        return BudgetStatus(
            epsilon_spent=spent,
            delta=meta.delta,
            budget_epsilon=meta.budget_epsilon,
            remaining=max(0.0, meta.budget_epsilon - spent),
            locked=meta.locked_at is not None,
            accountant=meta.accountant,
        )

    @property
    def locked(self) -> bool:
        """Whether the dataset is locked for good (read from the database, so other processes count)."""
        return self.lock_info is not None

    @property
    def lock_info(self) -> tuple[str, str] | None:
        """``(locked_at, reason)`` if the dataset is locked, else ``None``."""
        with self._read() as conn:
            meta = self._load_meta(conn)
        if meta.locked_at is None:
            return None
        return meta.locked_at, meta.lock_reason or ""

    def projected_epsilon(self, planned: PrivacyEvent) -> float:
        """The epsilon the whole history plus ``planned`` would reach."""
        with self._read() as conn:
            meta = self._load_meta(conn)
            history = [entry.event() for entry in _load_entries(conn)]
        return self._epsilon([*history, planned], meta)

    def max_affordable_steps(
        self, noise_multiplier: float, sample_rate: float, *, max_epsilon: float | None = None
    ) -> int:
        """The largest number of steps at (sigma, q) keeping the total within the cap; 0 if none.

        The cap is the budget, or ``max_epsilon`` where that is lower. Found by bisection over the
        steps count with the accountant; the result is capped at :data:`MAX_SEARCH_STEPS`. A locked
        ledger affords nothing.

        For the "train what still fits, then lock" mode: ``charge`` these steps, train them, then
        ``lock``. It is advice, not a reservation: if another process spends in between, the
        charge is refused (and locks) as usual.
        """
        PrivacyEvent(noise_multiplier, sample_rate, 1)  # validates sigma and q
        _check_max_epsilon(max_epsilon)
        with self._read() as conn:
            meta = self._load_meta(conn)
            history = [entry.event() for entry in _load_entries(conn)]
        if meta.locked_at is not None:
            return 0
        cap = _cap(meta.budget_epsilon, max_epsilon)

        def fits(steps: int) -> bool:
            planned = PrivacyEvent(noise_multiplier, sample_rate, steps)
            try:
                return self._epsilon([*history, planned], meta) <= cap
            except PrivacyError:  # an accountant failure is treated as "does not fit" (fail closed)
                return False

        return _largest_fitting(fits)

    # ----------------------------------------------------------------- spending

    def charge(
        self, planned: PrivacyEvent, *, run_id: str, round: int, max_epsilon: float | None = None
    ) -> LedgerEntry:
        """Durably charge ``planned`` before training it; refuse if it would go over the cap.

        The cap is the hospital's budget, or ``max_epsilon`` where that is lower (a higher
        ``max_epsilon`` is ignored). Going over the budget raises :class:`BudgetExhausted` and locks
        the dataset; going over only a lower ``max_epsilon`` refuses this request without locking.
        A locked ledger refuses at once. A broken hash chain raises :class:`LedgerError`.
        """
        self._check_writable()
        round = _check_request(planned, run_id, round, max_epsilon)
        with self._transaction() as conn:
            outcome = self._charge_in(conn, planned, run_id, round, max_epsilon)
        # Raised only after COMMIT, so a lock decided by this refusal is durable.
        if isinstance(outcome, str):
            raise BudgetExhausted(outcome)
        log.info(
            "ledger %s: charged run %s round %d: %d steps at sigma %g, q %g; epsilon now %.4g of %g",
            self.path, run_id, round, planned.steps, planned.noise_multiplier, planned.sample_rate,
            outcome.epsilon_after, self.budget_epsilon,
        )
        return outcome

    def _charge_in(
        self, conn: sqlite3.Connection, planned: PrivacyEvent, run_id: str, round: int,
        max_epsilon: float | None,
    ) -> LedgerEntry | str:
        """Inside the write transaction: append the charge, or return the refusal message."""
        meta = self._load_meta(conn)
        if meta.locked_at is not None:
            return self._locked_refusal(conn, meta)
        entries = self._verified_entries(conn, meta)
        history = [entry.event() for entry in entries]
        projected = self._epsilon([*history, planned], meta)
        cap = _cap(meta.budget_epsilon, max_epsilon)
        if projected <= cap:
            return self._append(conn, meta, planned, run_id, round, projected)
        spent = self._epsilon(history, meta)
        if projected <= meta.budget_epsilon:
            return (
                f"privacy budget exhausted for this request: run {run_id} round {round} would reach "
                f"epsilon {projected:.4g} > the request's cap {max_epsilon:g}; epsilon spent so far "
                f"{spent:.4g} of the hospital's budget {meta.budget_epsilon:g} (delta {meta.delta:g}); "
                "the ledger stays open"
            )
        reason = (
            f"run {run_id} round {round} would reach epsilon {projected:.4g} "
            f"> budget {meta.budget_epsilon:g}"
        )
        self._set_locked(conn, reason)
        return (
            f"privacy budget exhausted: epsilon spent so far {spent:.4g} of budget "
            f"{meta.budget_epsilon:g} (delta {meta.delta:g}); {planned.steps} more steps would reach "
            f"{projected:.4g}. Dataset {meta.fingerprint[:12]} is now LOCKED in ledger {self.path}"
        )

    def _locked_refusal(self, conn: sqlite3.Connection, meta: _Meta) -> str:
        """The refusal of a locked ledger, from stored values only (nothing is recomputed)."""
        row = conn.execute("SELECT epsilon_after FROM entries ORDER BY id DESC LIMIT 1").fetchone()
        spent = float(row[0]) if row else 0.0
        return (
            f"privacy budget exhausted: dataset {meta.fingerprint[:12]} is LOCKED since "
            f"{meta.locked_at} ({meta.lock_reason}); epsilon spent {spent:.4g} of budget "
            f"{meta.budget_epsilon:g} (delta {meta.delta:g}) per ledger {self.path}"
        )

    def _append(
        self, conn: sqlite3.Connection, meta: _Meta, planned: PrivacyEvent, run_id: str, round: int,
        projected: float,
    ) -> LedgerEntry:
        entry = LedgerEntry(
            id=meta.entry_count + 1, run_id=run_id, round=round,
            noise_multiplier=float(planned.noise_multiplier), sample_rate=float(planned.sample_rate),
            steps=int(planned.steps), accountant=meta.accountant, status=CHARGED, created_at=_now(),
            epsilon_after=float(projected), entry_hash="", charged_steps=int(planned.steps),
        )
        entry = replace(entry, entry_hash=_chain_hash(meta.head_hash, entry))
        placeholders = ", ".join("?" for _ in _ENTRY_COLUMNS)
        conn.execute(
            f"INSERT INTO entries ({_entry_column_list()}) VALUES ({placeholders})", _entry_row(entry)
        )
        conn.execute(
            "UPDATE meta SET head_hash = ?, entry_count = ? WHERE id = 1", (entry.entry_hash, entry.id)
        )
        return entry

    def confirm(self, entry: LedgerEntry | int, *, steps_done: int) -> LedgerEntry:
        """Record that the charged entry trained ``steps_done`` steps (at most the charged steps).

        Confirming fewer steps recomputes the cumulative epsilon of this and every later entry and
        re-chains their hashes. Confirming again with the same steps is a no-op.
        """
        self._check_writable()
        if isinstance(entry, LedgerEntry):
            entry_id = entry.id
        else:
            entry_id = _non_negative_int("entry", entry, LedgerError)
        steps_done = _non_negative_int("steps_done", steps_done, LedgerError)
        with self._transaction() as conn:
            meta = self._load_meta(conn)
            entries = self._verified_entries(conn, meta)
            confirmed = self._confirm_in(conn, meta, entries, entry_id, steps_done)
        log.info("ledger %s: confirmed entry %d with %d steps", self.path, entry_id, steps_done)
        return confirmed

    def _confirm_in(
        self, conn: sqlite3.Connection, meta: _Meta, entries: list[LedgerEntry], entry_id: int,
        steps_done: int,
    ) -> LedgerEntry:
        index = next((i for i, e in enumerate(entries) if e.id == entry_id), None)
        if index is None:
            raise LedgerError(f"ledger {self.path} has no entry {entry_id}")
        target = entries[index]
        if target.status == CONFIRMED:
            if target.steps == steps_done:
                return target
            raise LedgerError(f"entry {entry_id} is already confirmed with {target.steps} steps")
        if steps_done > target.charged_steps:
            raise LedgerError(
                f"entry {entry_id} charged {target.charged_steps} steps; cannot confirm {steps_done} "
                "(charge more steps before training them)"
            )
        entries[index] = replace(target, steps=steps_done, status=CONFIRMED)
        rewritten = self._rechain(meta, entries, index, recompute=steps_done != target.steps)
        for changed in rewritten:
            conn.execute(
                "UPDATE entries SET steps = ?, status = ?, epsilon_after = ?, entry_hash = ? WHERE id = ?",
                (changed.steps, changed.status, changed.epsilon_after, changed.entry_hash, changed.id),
            )
        conn.execute("UPDATE meta SET head_hash = ? WHERE id = 1", (rewritten[-1].entry_hash,))
        return rewritten[0]

    def _rechain(
        self, meta: _Meta, entries: list[LedgerEntry], start: int, *, recompute: bool
    ) -> list[LedgerEntry]:
        """Entries ``start..`` with fresh hashes (and cumulative epsilons if steps changed)."""
        previous = entries[start - 1].entry_hash if start else _genesis_hash(meta.fingerprint)
        history = [entry.event() for entry in entries]
        rewritten = []
        for position in range(start, len(entries)):
            entry = entries[position]
            if recompute:
                entry = replace(entry, epsilon_after=self._epsilon(history[: position + 1], meta))
            entry = replace(entry, entry_hash=_chain_hash(previous, entry))
            rewritten.append(entry)
            previous = entry.entry_hash
        return rewritten

    def lock(self, reason: str) -> None:
        """Lock the dataset for good (durably); later charges are refused. Idempotent."""
        self._check_writable()
        with self._transaction() as conn:
            meta = self._load_meta(conn)
            if meta.locked_at is None:
                self._set_locked(conn, reason)
            else:
                log.info("ledger %s is already locked since %s", self.path, meta.locked_at)

    def _set_locked(self, conn: sqlite3.Connection, reason: str) -> None:
        conn.execute("UPDATE meta SET locked_at = ?, lock_reason = ? WHERE id = 1", (_now(), reason))
        _audit(conn, "locked", reason)
        log.warning("ledger %s: dataset LOCKED: %s", self.path, reason)

    # ----------------------------------------------------------------- integrity

    def verify(self) -> VerifyReport:
        """Recompute the hash chain and the cumulative epsilon after every entry; list mismatches."""
        with self._read() as conn:
            meta = self._load_meta(conn)
            rows = conn.execute(f"SELECT {_entry_column_list()} FROM entries ORDER BY id").fetchall()
        entries, problems = [], []
        for row in rows:
            try:
                entries.append(_entry_from_row(row))
            except LedgerError as exc:
                problems.append(str(exc))
        if problems:
            return VerifyReport(False, problems, math.nan, math.nan)
        problems += _chain_problems(entries, meta) + _entry_problems(entries, meta)
        if meta.budget_epsilon > meta.initial_budget_epsilon:
            problems.append(
                f"budget epsilon {meta.budget_epsilon:g} is above the budget {meta.initial_budget_epsilon:g} "
                "the ledger was created with (a budget can only go down)"
            )
        epsilon_problems, recomputed = self._epsilon_problems(entries, meta)
        recorded = entries[-1].epsilon_after if entries else 0.0
        problems += epsilon_problems
        return VerifyReport(not problems, problems, recomputed, recorded)

    def _epsilon_problems(self, entries: list[LedgerEntry], meta: _Meta) -> tuple[list[str], float]:
        """Mismatches between recorded and recomputed cumulative epsilons, and the final epsilon."""
        problems: list[str] = []
        history: list[PrivacyEvent] = []
        recomputed = 0.0
        for entry in entries:
            try:
                history.append(entry.event())
                recomputed = self._epsilon(history, meta)
            except PrivacyError as exc:
                problems.append(f"entry {entry.id}: cannot recompute epsilon: {exc}")
                return problems, math.nan
            if not math.isclose(recomputed, entry.epsilon_after, rel_tol=EPSILON_REL_TOL, abs_tol=1e-9):
                problems.append(
                    f"entry {entry.id}: recorded cumulative epsilon {entry.epsilon_after:.6g} but the "
                    f"events give {recomputed:.6g}"
                )
        return problems, recomputed

    def _verified_entries(self, conn: sqlite3.Connection, meta: _Meta) -> list[LedgerEntry]:
        """All entries, after the cheap integrity checks (hash chain, head, field sanity)."""
        entries = _load_entries(conn)
        problems = _chain_problems(entries, meta) + _entry_problems(entries, meta)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise LedgerError(
                f"ledger {self.path} failed its integrity check: {problems[0]}{more}; refusing to use it "
                f"(inspect with `fedpriv-ledger verify {self.path}`)"
            )
        return entries

    # ----------------------------------------------------------------- plumbing

    def _epsilon(self, history: Sequence[PrivacyEvent], meta: _Meta) -> float:
        """Epsilon of ``history`` with this ledger's accountant and delta; failures fail closed."""
        try:
            value = epsilon(history, meta.delta, meta.accountant)
        except PrivacyError:
            raise
        except Exception as exc:  # numerical failures inside Opacus must refuse, not crash oddly
            raise PrivacyError(f"the {meta.accountant} accountant failed on this history: {exc}") from exc
        if math.isnan(value):
            raise PrivacyError(f"the {meta.accountant} accountant returned NaN for this history")
        return value

    def _load_meta(self, conn: sqlite3.Connection) -> _Meta:
        meta = _load_meta(conn, self.path)
        self.fingerprint, self.budget_epsilon = meta.fingerprint, meta.budget_epsilon
        self.delta, self.accountant = meta.delta, meta.accountant
        return meta

    def _check_writable(self) -> None:
        if self._read_only:
            raise LedgerError(f"ledger {self.path} was opened read-only; use PrivacyLedger.open to spend")

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise LedgerError(f"ledger {self.path} is closed")
        return self._conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction, so meta and entries come from one consistent snapshot."""
        with self._transaction("DEFERRED") as conn:
            yield conn

    @contextmanager
    def _transaction(self, mode: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
        """BEGIN ``mode`` ... COMMIT, rolled back on any error; SQLite errors become LedgerError."""
        with self._mutex:
            conn = self._connection()
            try:
                conn.execute(f"BEGIN {mode}")
            except sqlite3.Error as exc:
                raise storage_error(self.path, exc, "use") from exc
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                _rollback(conn)
                if isinstance(exc, sqlite3.Error):
                    raise storage_error(self.path, exc, "use") from exc
                raise


def read_ledger(path: str | Path) -> PrivacyLedger:
    """Open an existing ledger for inspection (show, verify) with its stored settings.

    Runs the structural checks only, so :meth:`PrivacyLedger.verify` can report a broken chain.
    The returned ledger refuses to charge, confirm or lock. A missing file raises LedgerError.
    """
    path = Path(path)
    if not path.is_file():
        raise LedgerError(f"no ledger at {path}")
    ledger = PrivacyLedger(path, _connect(path), read_only=True)
    try:
        with ledger._read() as conn:
            ledger._load_meta(conn)
    except BaseException:
        ledger.close()
        raise
    return ledger


# --------------------------------------------------------------------- validation helpers


def _check_settings(fingerprint: str, budget_epsilon: float, delta: float, accountant: str) -> None:
    if not isinstance(fingerprint, str) or not fingerprint.strip():
        raise LedgerError(
            f"a ledger needs the dataset's fingerprint (a non-empty string), got {fingerprint!r}"
        )
    if not (isinstance(budget_epsilon, int | float) and math.isfinite(budget_epsilon) and budget_epsilon > 0):
        raise PrivacyError(f"budget epsilon must be finite and > 0, got {budget_epsilon!r}")
    if not (isinstance(delta, int | float) and 0 < delta < 1):
        raise PrivacyError(f"delta must be in (0, 1), got {delta!r}")
    check_accountant(accountant)


def _check_request(planned: PrivacyEvent, run_id: str, round: int, max_epsilon: float | None) -> int:
    """Validate a charge request; returns the round as a plain int (numpy ints are accepted)."""
    if not isinstance(planned, PrivacyEvent):
        raise PrivacyError(f"charge needs a PrivacyEvent, got {type(planned).__name__}")
    if planned.steps < 1:
        raise PrivacyError(f"a charge needs at least one step, got {planned.steps}")
    if not isinstance(run_id, str) or not run_id:
        raise PrivacyError(f"run_id must be a non-empty string, got {run_id!r}")
    _check_max_epsilon(max_epsilon)
    return _non_negative_int("round", round, PrivacyError)


def _non_negative_int(name: str, value: Any, error: type[PrivacyError]) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        number = -1
    if isinstance(value, bool) or number < 0:
        raise error(f"{name} must be an int >= 0, got {value!r}")
    return number


def _check_max_epsilon(max_epsilon: float | None) -> None:
    if max_epsilon is not None and (not isinstance(max_epsilon, int | float) or math.isnan(max_epsilon)):
        raise PrivacyError(f"max_epsilon must be a number or None, got {max_epsilon!r}")


def _cap(budget_epsilon: float, max_epsilon: float | None) -> float:
    """A request's cap: a server-supplied max_epsilon can only lower the hospital's budget."""
    return budget_epsilon if max_epsilon is None else min(budget_epsilon, max_epsilon)


def _largest_fitting(fits: Callable[[int], bool]) -> int:
    """The largest n in [0, MAX_SEARCH_STEPS] with fits(n), assuming fits is monotone decreasing."""
    if not fits(1):
        return 0
    low, high = 1, 2  # invariant: fits(low); high does not fit (or is beyond the search limit)
    while high <= MAX_SEARCH_STEPS and fits(high):
        low, high = high, high * 2
    high = min(high, MAX_SEARCH_STEPS + 1)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


# --------------------------------------------------------------------- storage helpers


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _entry_column_list() -> str:
    return ", ".join(f'"{name}"' for name in _ENTRY_COLUMNS)


def _entry_row(entry: LedgerEntry) -> tuple[Any, ...]:
    return tuple(getattr(entry, name) for name in _ENTRY_COLUMNS)


def _genesis_hash(fingerprint: str) -> str:
    """The hash the first entry chains from; it binds the whole chain to the dataset."""
    return hashlib.sha256(f"fedpriv-ledger/v{SCHEMA_VERSION}\n{fingerprint}".encode()).hexdigest()


def _chain_hash(previous_hash: str, entry: LedgerEntry) -> str:
    """sha256 over the previous entry's hash and this entry's fields (canonical JSON, exact floats)."""
    values = asdict(entry)
    values.pop("entry_hash")
    payload = json.dumps(values, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{previous_hash}\n{payload}".encode()).hexdigest()


def _chain_problems(entries: list[LedgerEntry], meta: _Meta) -> list[str]:
    """Hash-chain breaks: altered, removed or inserted entries, and a head that does not match."""
    problems = []
    previous = _genesis_hash(meta.fingerprint)
    for position, entry in enumerate(entries, start=1):
        if entry.id != position:
            problems.append(f"entry {entry.id}: expected id {position} (an entry was removed or inserted)")
        if _chain_hash(previous, entry) != entry.entry_hash:
            problems.append(f"entry {entry.id}: hash mismatch (the entry was altered or the chain is broken)")
        previous = entry.entry_hash
    if meta.entry_count != len(entries):
        problems.append(f"the ledger recorded {meta.entry_count} entries but holds {len(entries)}")
    if meta.head_hash != previous:
        problems.append("the ledger's head hash does not match its last entry (entries removed or altered)")
    return problems


def _entry_problems(entries: list[LedgerEntry], meta: _Meta) -> list[str]:
    problems = []
    for entry in entries:
        if entry.accountant != meta.accountant:
            problems.append(
                f"entry {entry.id}: accountant {entry.accountant!r}, ledger uses {meta.accountant!r}"
            )
        if entry.status not in (CHARGED, CONFIRMED):
            problems.append(f"entry {entry.id}: unknown status {entry.status!r}")
        if not 0 <= entry.steps <= entry.charged_steps:
            problems.append(f"entry {entry.id}: steps {entry.steps} outside 0..{entry.charged_steps} charged")
    return problems


def _entry_from_row(row: Sequence[Any]) -> LedgerEntry:
    """A LedgerEntry from a database row, refusing values of the wrong type (tampering, corruption)."""
    values: dict[str, Any] = {}
    for name, value in zip(_ENTRY_COLUMNS, row, strict=True):
        expected = _ENTRY_TYPES[name]
        if expected is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, expected):
            raise LedgerError(f"ledger entry {row[0]!r} has a malformed {name}: {value!r}")
        values[name] = value
    return LedgerEntry(**values)


def _load_entries(conn: sqlite3.Connection) -> list[LedgerEntry]:
    rows = conn.execute(f"SELECT {_entry_column_list()} FROM entries ORDER BY id").fetchall()
    return [_entry_from_row(row) for row in rows]


def _load_meta(conn: sqlite3.Connection, path: Path) -> _Meta:
    rows = conn.execute(f"SELECT {', '.join(_META_COLUMNS)} FROM meta").fetchall()
    if len(rows) != 1:
        raise LedgerError(f"ledger {path} is corrupt: expected one meta row, found {len(rows)}")
    values = dict(zip(_META_COLUMNS, rows[0], strict=True))
    for name in ("budget_epsilon", "initial_budget_epsilon", "delta"):
        if isinstance(values[name], int):
            values[name] = float(values[name])
    meta = _Meta(**values)
    if meta.schema_version != SCHEMA_VERSION:
        raise LedgerError(
            f"ledger {path} has schema version {meta.schema_version!r}; this fedpriv reads {SCHEMA_VERSION}"
        )
    _check_meta_types(meta, path)
    return meta


def _check_meta_types(meta: _Meta, path: Path) -> None:
    text_ok = all(isinstance(v, str) and v for v in (meta.fingerprint, meta.accountant, meta.head_hash))
    numbers_ok = all(
        isinstance(v, float) and v > 0 for v in (meta.budget_epsilon, meta.initial_budget_epsilon, meta.delta)
    )
    if not (text_ok and numbers_ok and isinstance(meta.entry_count, int)):
        raise LedgerError(f"ledger {path} is corrupt: malformed meta row")


def storage_error(path: Path, exc: OSError | sqlite3.Error, action: str) -> LedgerError:
    """One clear LedgerError for a ledger the disk will not let us use (the hospital fails closed).

    SQLite reports a full disk as SQLITE_FULL, other refused writes (a quota, a file-size limit, a
    failing disk) as SQLITE_IOERR_*, and a file or folder it may not write as SQLITE_READONLY or
    SQLITE_CANTOPEN; all come here, as do plain OS errors from creating the ledger.
    """
    text = str(exc).lower()
    code = getattr(exc, "errno", None)
    name = getattr(exc, "sqlite_errorname", "")
    if code in (errno.ENOSPC, errno.EDQUOT) or name == "SQLITE_FULL" or "disk is full" in text:
        reason, fix = "the disk is full", f"free space on the disk holding {path.parent}, or move the ledger"
    elif code == errno.EFBIG or name.startswith("SQLITE_IOERR"):
        reason, fix = ("the disk refused a write (full, over quota or a file-size limit, or failing)",
                       f"free space on the disk holding {path.parent} and check it, or move the ledger")
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS) or name.startswith("SQLITE_READONLY") \
            or "readonly" in text or "read-only" in text:
        reason, fix = "no write permission", (f"let the hospital's user write to {path.parent} (and the ledger file), "
                                              "or choose a writable ledger path")
    elif name == "SQLITE_BUSY" or "locked" in text:
        reason, fix = "another process holds it locked", "retry when the other process has finished"
    elif name == "SQLITE_CANTOPEN" or "unable to open" in text or isinstance(exc, OSError):
        reason, fix = "it cannot be opened", (f"check that {path.parent} exists and is writable by the "
                                              "hospital's user (SQLite also writes a journal file next to the ledger)")
    else:
        reason, fix = "database error", "check the ledger with `fedpriv-ledger verify`"
    return LedgerError(f"cannot {action} privacy ledger {path}: {reason} ({exc}); the hospital trains "
                       f"nothing and sends nothing until it is fixed (fail closed). Fix: {fix}",
                       reason=f"its privacy ledger cannot be used: {reason}")


def folder_write_problem(folder: Path) -> str | None:
    """Why a ledger could not be created or written in ``folder`` (None if it can), found by trying.

    Trying beats checking mode bits: it also catches read-only mounts, a full disk and ACLs.
    """
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fedpriv-write-check-") as probe:
            probe.write(b"x" * 4096)  # a page, as SQLite would write
            probe.flush()
    except OSError as exc:
        return f"cannot write a file there ({exc.strerror or exc})"
    return None


def _audit(conn: sqlite3.Connection, kind: str, detail: str) -> None:
    conn.execute("INSERT INTO audit (at, kind, detail) VALUES (?, ?, ?)", (_now(), kind, detail))


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:  # no transaction left to roll back (SQLite may already have done it)
        log.debug("rollback failed", exc_info=True)


def _configure(conn: sqlite3.Connection) -> None:
    """Durability settings: a rollback journal fsynced on every commit."""
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.execute("PRAGMA synchronous = FULL")


def _connect(path: Path) -> sqlite3.Connection:
    """Open an existing ledger file (never creating one) and check its structure."""
    uri = f"{path.resolve().as_uri()}?mode=rw"
    try:
        conn = sqlite3.connect(
            uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise storage_error(path, exc, "open") from exc
    try:
        _configure(conn)
        _check_structure(conn, path)
    except sqlite3.Error as exc:
        conn.close()
        raise LedgerError(f"ledger {path} is unreadable or not a fedpriv ledger: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _check_structure(conn: sqlite3.Connection, path: Path) -> None:
    """Cheap structural check: SQLite's quick_check, our three tables and their columns, one meta row."""
    (verdict,) = conn.execute("PRAGMA quick_check").fetchone()
    if verdict != "ok":
        raise LedgerError(f"ledger {path} is corrupt: {verdict}")
    expected = {"meta": ("id", *_META_COLUMNS), "entries": _ENTRY_COLUMNS, "audit": _AUDIT_COLUMNS}
    for table, columns in expected.items():
        found = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if found != set(columns):
            problem = "is missing" if not found else "has unexpected columns in"
            raise LedgerError(f"ledger {path} is not a fedpriv ledger: it {problem} table {table!r}")
    _load_meta(conn, path)


def _create(path: Path, fingerprint: str, budget_epsilon: float, delta: float, accountant: str) -> None:
    """Create a complete new ledger at ``path`` atomically.

    The database is built in a temporary file and hard-linked into place, so ``path`` either does
    not exist or is a complete ledger; an existing file is therefore never treated as new (a
    half-initialised or truncated ledger fails closed), and two processes creating the same ledger
    at once end up sharing whichever was linked first.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".new", dir=path.parent)
    os.close(handle)
    try:
        _initialise(Path(temporary), fingerprint, budget_epsilon, delta, accountant)
        _publish(Path(temporary), path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    log.info(
        "created privacy ledger %s (budget epsilon %g at delta %g, %s)",
        path, budget_epsilon, delta, accountant,
    )


def _initialise(path: Path, fingerprint: str, budget_epsilon: float, delta: float, accountant: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        _configure(conn)
        conn.execute("BEGIN IMMEDIATE")
        for statement in filter(str.strip, _SCHEMA.split(";")):
            conn.execute(statement)
        placeholders = ", ".join("?" * len(_META_COLUMNS))
        conn.execute(
            f"INSERT INTO meta (id, {', '.join(_META_COLUMNS)}) VALUES (1, {placeholders})",
            (
                SCHEMA_VERSION, fingerprint, float(budget_epsilon), float(budget_epsilon), float(delta),
                accountant, _now(), None, None, _genesis_hash(fingerprint), 0,
            ),
        )
        detail = f"budget epsilon {budget_epsilon:g} at delta {delta:g}, accountant {accountant}"
        _audit(conn, "created", detail)
        conn.execute("COMMIT")
    finally:
        conn.close()


def _publish(temporary: Path, path: Path) -> None:
    """Move the finished ledger into place without ever replacing an existing file."""
    try:
        os.link(temporary, path)
    except FileExistsError:
        log.info("ledger %s was created concurrently; using that one", path)
        return
    except OSError:
        # No hard links on this filesystem: fall back to a rename (a tiny race, never a reset).
        if path.exists():
            return
        os.replace(temporary, path)
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the new directory entry durable (POSIX); not available everywhere, hence best effort."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        log.debug("fsync of %s failed", directory, exc_info=True)
    finally:
        os.close(handle)
