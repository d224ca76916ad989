"""The hospital's privacy ledger: every use of every record, enforced record by record.

A hospital decides how much privacy (epsilon, delta) it will ever spend on each record it holds.
Its node keeps one ledger (a SQLite file, :mod:`fedpriv.privacy.store`) that records every use of
its data as an *event*: a DP-SGD stretch (noise multiplier, Poisson sample rate, steps, accountant,
run, round, time) or a non-private round, together with the set of records it was drawn from
(:mod:`fedpriv.privacy.records`). The budget holds across rounds, runs, restarts, repartitions and
new data, because it belongs to the records:

* **Per-record accounting.** A record's epsilon is the composition of every event whose set held
  it, computed by the accountant (:func:`fedpriv.privacy.accounting.epsilon`), never summed by hand.
  Records with the same history are accounted once. A non-private event has epsilon = infinity.
* **Per-record enforcement, before training.** :meth:`PrivacyLedger.charge` takes the hospital's
  records and the planned round; records the round would take over the cap are left out of it,
  and the sample rate is over the records that remain. Too few records left: the round is refused
  with nothing written. A record is *exhausted* when less than :data:`SPENT_FRACTION` of its
  budget is left, after any non-private use, or when the hospital locked it; it never trains
  again. "Locked" means every record of a dataset is exhausted. New records start with a full
  budget.
* **Write-ahead, fail closed.** The charge is durably committed before the first training step;
  :meth:`PrivacyLedger.confirm` records the steps actually done afterwards. A node killed in
  between keeps the full charge: the ledger may over-count, never under-count. Check and charge
  happen in one ``BEGIN IMMEDIATE`` transaction, so two processes cannot both spend the last of a
  budget.
* **Tamper-evident.** Every entry (the budget and each change to it, every event, every
  confirmation and lock) is one link of a chain keyed with the hospital's secret
  (:mod:`fedpriv.privacy.chain`), with a witness of the head kept next to the key: an edit,
  insertion, deletion, truncation, reordering or an older copy of the file is detected, and the
  hospital refuses to use the ledger. A ledger is never reset.

Budgets only go down: opening a ledger with a lower budget appends that budget; a higher one is
ignored (with a warning). A per-request cap can only lower a request's cap. Delta and the
accountant are fixed when the ledger is created.

**The unit.** A record is one image (``unit="image"``, the default) or one patient
(``unit="patient"``): then the record id is the patient id, so every image of a patient shares one
record and one budget, a patient's epsilon composes every event whose set held the patient, and a
new image of a known patient is charged to that patient. The unit is fixed when the ledger is
created (ledgers written before the unit existed are per image) and opening it with another unit
is refused: the spend of images cannot be turned into the spend of patients, or back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np

from fedpriv.display import format_epsilon
from fedpriv.errors import BudgetExhausted, LedgerError, PrivacyError
from fedpriv.privacy.accounting import PrivacyEvent, check_accountant, epsilon
from fedpriv.privacy.chain import ChainKey, Witness, key_path_for
from fedpriv.privacy.records import (
    MembershipIndex,
    RecordSet,
    all_distinct,
    record_keys,
    signatures,
    sorted_contains,
)
from fedpriv.privacy.store import (
    BUSY_TIMEOUT_S,
    SCHEMA_VERSION,
    LedgerStore,
    LegacyLedger,
    create,
    folder_write_problem,
    now,
    storage_error,
)

log = logging.getLogger(__name__)

__all__ = ["BUSY_TIMEOUT_S", "SCHEMA_VERSION", "SPENT_FRACTION", "BudgetStatus", "Charge", "LegacyLedger",
           "LedgerEvent", "PrivacyLedger", "RecordBudgets", "VerifyReport", "folder_write_problem",
           "read_ledger", "storage_error"]

# A record with less than this fraction of its budget left is exhausted: spending the rest would
# need absurd noise (sigma in the tens) for no useful training, and it is within the calibration's
# own tolerance. This is the hospital's rule, independent of any request, so no request can
# exhaust a record that a smaller, compliant request could still use.
SPENT_FRACTION = 0.01
# max_affordable_steps never searches beyond this many steps (no real round is that long).
MAX_SEARCH_STEPS = 10**7

OPEN, BUDGET, CHARGE, CONFIRM, EXHAUST = "open", "budget", "charge", "confirm", "exhaust"
#: What one record of a ledger is (see the module docstring); a ledger without one in its opening
#: entry predates units and is per image.
UNITS = ("image", "patient")
_KINDS = (OPEN, BUDGET, CHARGE, CONFIRM, EXHAUST)

# Per process: (ledger path, genesis tag) -> (the entries' stored rows, their replayed state). The
# genesis tag depends on the key and the ledger's id, so another key or another file never matches.
_REPLAYS: OrderedDict[tuple[str, str], tuple[list[tuple[int, str, str, str]], _History]] = OrderedDict()
_REPLAYS_SIZE = 16
# Per process: the record keys already in a ledger's records table (id lookup only), so that a
# charge writes the new ones instead of re-inserting every offered record.
_LISTED_KEYS: dict[tuple[str, str], np.ndarray] = {}
_REPLAYS_LOCK = threading.Lock()
# Per process: which record sets (by digest, whatever ledger they are in) hold which record keys.
_INDEX = MembershipIndex()
_INDEX_LOCK = threading.Lock()


@dataclass(frozen=True)
class LedgerEvent:
    """One use of the data: a charge, with the steps confirmed after training (or all it charged)."""

    id: int
    run_id: str
    round: int
    hospital: str
    noise_multiplier: float  # 0 for a non-private round
    sample_rate: float
    steps: int
    charged_steps: int
    accountant: str
    private: bool
    confirmed: bool
    created_at: str
    record_set: str  # digest of the set of records it was drawn from
    set_size: int

    def event(self) -> PrivacyEvent:
        return PrivacyEvent(self.noise_multiplier, self.sample_rate, self.steps)

    @property
    def status(self) -> str:
        return "confirmed" if self.confirmed else "charged"


@dataclass(frozen=True)
class BudgetStatus:
    """Where a set of records stands. ``epsilon_spent`` is the largest epsilon of any of them.

    ``remaining`` is what a compliant round could still spend on the records that are not
    exhausted (the most any of them has left); ``locked`` means every record is exhausted.
    """

    epsilon_spent: float
    delta: float
    budget_epsilon: float
    remaining: float
    locked: bool
    accountant: str
    records: int = 0
    exhausted: int = 0
    epsilon_median: float = 0.0
    epsilon_min: float = 0.0
    chain_length: int = 0
    chain_head: str = ""
    unit: str = "image"  # what a record is: an image or a patient (``records`` counts them)


@dataclass(frozen=True)
class RecordBudgets:
    """Per-record epsilon (same order as the records asked about) and which are exhausted."""

    keys: np.ndarray
    epsilon: np.ndarray
    exhausted: np.ndarray
    budget_epsilon: float
    delta: float
    accountant: str
    chain_length: int
    chain_head: str
    unit: str = "image"

    def status(self) -> BudgetStatus:
        n = len(self.epsilon)
        open_records = ~self.exhausted
        remaining = float(max(0.0, self.budget_epsilon - self.epsilon[open_records].min())) if open_records.any() else 0.0
        return BudgetStatus(
            epsilon_spent=float(self.epsilon.max()) if n else 0.0, delta=self.delta,
            budget_epsilon=self.budget_epsilon, remaining=remaining, locked=bool(n and self.exhausted.all()),
            accountant=self.accountant, records=n, exhausted=int(self.exhausted.sum()),
            epsilon_median=float(np.median(self.epsilon)) if n else 0.0,
            epsilon_min=float(self.epsilon.min()) if n else 0.0,
            chain_length=self.chain_length, chain_head=self.chain_head, unit=self.unit)


@dataclass(frozen=True)
class Charge:
    """A committed charge: which of the offered records the round may use, and at what rate."""

    entry_id: int
    selected: np.ndarray  # boolean mask over the records offered to `charge`
    event: PrivacyEvent
    projected_epsilon: float  # the largest epsilon of a selected record after the whole charge
    private: bool

    @property
    def sample_rate(self) -> float:
        return self.event.sample_rate

    @property
    def num_records(self) -> int:
        return int(self.selected.sum())


@dataclass(frozen=True)
class VerifyReport:
    """Result of :meth:`PrivacyLedger.verify`: ``ok`` iff ``problems`` is empty."""

    ok: bool
    problems: list[str]
    entries: int
    events: int


@dataclass
class _History:
    """The ledger's state, replayed from its entries."""

    budget_epsilon: float = math.nan
    initial_budget_epsilon: float = math.nan
    delta: float = math.nan
    accountant: str = ""
    unit: str = "image"
    created_at: str = ""
    events: dict[int, LedgerEvent] = field(default_factory=dict)
    locks: list[tuple[str, str, str]] = field(default_factory=list)  # (set digest, reason, at)
    length: int = 0
    head: str = ""

    def copy(self) -> _History:
        return dataclasses.replace(self, events=dict(self.events), locks=list(self.locks))

    def status_fields(self) -> dict[str, Any]:
        return {"budget_epsilon": self.budget_epsilon, "delta": self.delta, "accountant": self.accountant,
                "chain_length": self.length, "chain_head": self.head, "unit": self.unit}


class PrivacyLedger:
    """The privacy ledger of one hospital (see the module docstring).

    Create or open one with :meth:`open`; :func:`read_ledger` opens one for inspection only. Safe to
    share between threads of a process; any number of processes may use the same file.
    """

    def __init__(self, store: LedgerStore, key: ChainKey | None, *, read_only: bool) -> None:
        self._store = store
        self._key = key
        self._read_only = read_only
        self.path = store.path
        self.budget_epsilon = math.nan
        self.delta = math.nan
        self.accountant = ""
        self.unit = "image"

    # ----------------------------------------------------------------- opening and closing

    @classmethod
    def open(
        cls, path: str | Path, *, budget_epsilon: float, delta: float, accountant: str = "prv",
        key_path: str | Path | None = None, unit: str = "image",
    ) -> PrivacyLedger:
        """Open the ledger at ``path``, creating it (and its key) if neither exists.

        A new ledger records this budget, delta, accountant and unit. An existing one keeps its delta
        and accountant and only ever takes the lower of the stored and the given budget; another
        ``unit`` than its own is refused (LedgerError). A ledger whose key is missing, or a missing
        ledger whose key and witness exist, is refused (LedgerError).
        """
        _check_settings(budget_epsilon, delta, accountant)
        _check_unit(unit)
        path = Path(path)
        key_file = Path(key_path) if key_path else key_path_for(path)
        if not path.exists():
            key = _key_for_new_ledger(path, key_file)
            create(path, uuid.uuid4().hex)
        else:
            if not key_file.is_file():
                raise LedgerError(
                    f"ledger {path} exists but its key {key_file} does not; refusing to use a ledger whose "
                    "entries cannot be authenticated. Fix: restore the key file (or point ledger-key at it)",
                    reason="its ledger key is missing")
            key = ChainKey.load(key_file)
        ledger = cls(LedgerStore.open(path), key, read_only=False)
        try:
            # A node never starts on a ledger whose record sets were altered (checked before anything is written).
            ledger._adopt(float(budget_epsilon), float(delta), accountant, unit, check_sets=True)
        except BaseException:
            ledger.close()
            raise
        return ledger

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PrivacyLedger({str(self.path)!r}, budget_epsilon={self.budget_epsilon}, delta={self.delta})"

    def _adopt(self, budget_epsilon: float, delta: float, accountant: str, unit: str = "image",
               check_sets: bool = False) -> None:
        with self._store.transaction() as conn:
            history = self._history(conn)
            if check_sets:
                self._check_sets(conn, history)
            length = history.length
            if history.length == 0:
                body = {"budget_epsilon": budget_epsilon, "delta": delta, "accountant": accountant, "unit": unit}
                history = self._append(conn, history, OPEN, body)
                log.info("created privacy ledger %s (budget epsilon %g per %s at delta %g, %s)",
                         self.path, budget_epsilon, unit, delta, accountant)
            elif history.unit != unit:
                raise LedgerError(
                    f"ledger {self.path} accounts per {history.unit}, and this hospital asks for privacy.unit={unit}; "
                    f"a ledger never mixes units (the epsilon spent per {history.unit} cannot be turned into a spend "
                    f"per {unit}). Fix: keep privacy.unit={history.unit} for this data, or give the {unit}-level "
                    "hospital a ledger of its own (a new ledger starts a new budget: only where the old one's spend "
                    "may be disregarded, e.g. federation.ledger_scope=run for an experiment)",
                    reason=f"its privacy ledger accounts per {history.unit}, not per {unit}")
            elif budget_epsilon < history.budget_epsilon:
                old = history.budget_epsilon
                history = self._append(conn, history, BUDGET, {"budget_epsilon": budget_epsilon})
                log.info("ledger %s: budget epsilon lowered from %g to %g", self.path, old, budget_epsilon)
        if history.length > length:  # nothing written: the witness already covers the chain
            self._after_write(history)
        if budget_epsilon > history.budget_epsilon:
            log.warning("ledger %s: requested budget epsilon %g is higher than the ledger's %g; keeping %g "
                        "(a budget only goes down through its ledger; raising it needs a new ledger)",
                        self.path, budget_epsilon, history.budget_epsilon, history.budget_epsilon)
        if delta != history.delta:
            log.warning("ledger %s: delta is fixed at %g when created; ignoring %g", self.path, history.delta, delta)
        if accountant != history.accountant:
            log.warning("ledger %s: accountant is fixed at %r when created; ignoring %r",
                        self.path, history.accountant, accountant)

    # ----------------------------------------------------------------- reading

    def events(self) -> list[LedgerEvent]:
        """Every use of the data, oldest first (a charged, unconfirmed event counts in full)."""
        with self._store.transaction("DEFERRED") as conn:
            return list(self._history(conn).events.values())

    def budgets(self, record_ids: Sequence[str] | np.ndarray | None = None, *,
                budget: float | None = None) -> RecordBudgets:
        """Per-record epsilon and exhaustion of ``record_ids`` (default: every record the ledger knows).

        ``budget`` is the caller's own budget where it is below the ledger's (several simulated
        hospitals share one ledger, each with its budget): records are exhausted against the lower.
        """
        with self._store.transaction("DEFERRED") as conn:
            history = self._history(conn)
            if record_ids is None:
                keys = self._known_keys(conn)
            else:
                keys = record_keys(record_ids)
            return self._budgets(conn, history, keys, budget=budget)

    def status(self, record_ids: Sequence[str] | np.ndarray | None = None, *,
               budget: float | None = None) -> BudgetStatus:
        """Where ``record_ids`` (default: every known record) stand: largest epsilon, exhausted, locked."""
        return self.budgets(record_ids, budget=budget).status()

    def record_history(self, record_id: str) -> tuple[list[LedgerEvent], float, bool, int | None]:
        """One record's events, its epsilon, whether it is exhausted, and the entry that first saw it."""
        with self._store.transaction("DEFERRED") as conn:
            history = self._history(conn)
            keys = record_keys([record_id])
            budgets = self._budgets(conn, history, keys)
            seen = self._store.record_id(conn, int(keys[0]))
            events = [e for e in history.events.values()
                      if self._store.load_set(conn, e.record_set).contains(keys)[0]]
        return events, float(budgets.epsilon[0]), bool(budgets.exhausted[0]), (seen[1] if seen else None)

    def calibration_history(self, record_ids: Sequence[str] | np.ndarray, *,
                            budget: float | None = None) -> tuple[list[PrivacyEvent], int]:
        """The history of the most-spent record that is not exhausted, and how many are not exhausted.

        "auto" sigma is calibrated on it, so that every record still open fits the planned rounds
        (records with less history keep the difference for later).
        """
        prior, open_records, _ = self.round_start(record_ids, budget=budget)
        return prior, open_records

    def round_start(self, record_ids: Sequence[str] | np.ndarray, *,
                    budget: float | None = None) -> tuple[list[PrivacyEvent], int, list[LedgerEvent]]:
        """`calibration_history` and `events`, read together in one transaction (one replay).

        What a hospital reads before it charges a round. Advice only, like both of them: the charge
        reads the ledger again under its write lock and re-checks every record.
        """
        with self._store.transaction("DEFERRED") as conn:
            history = self._history(conn)
            keys = record_keys(record_ids)
            patterns, inverse, pattern_events = self._patterns(conn, history, keys)
            budgets = self._budgets(conn, history, keys, (patterns, inverse, pattern_events), budget=budget)
        events = list(history.events.values())
        open_records = ~budgets.exhausted
        if not open_records.any():
            return [], 0, events
        worst = int(np.argmax(np.where(open_records, budgets.epsilon, -np.inf)))
        return pattern_events[inverse[worst]], int(open_records.sum()), events

    def max_affordable_steps(
        self, record_ids: Sequence[str] | np.ndarray, *, noise_multiplier: float, batch_size: int,
        max_epsilon: float | None = None, budget: float | None = None,
    ) -> int:
        """The most steps at this sigma that every open record can still afford; 0 if none.

        Advice for "train what still fits, then lock", not a reservation: the charge re-checks.
        """
        _check_max_epsilon(max_epsilon)
        with self._store.transaction("DEFERRED") as conn:
            history = self._history(conn)
            keys = record_keys(record_ids)
            grouping = self._patterns(conn, history, keys)
            budgets = self._budgets(conn, history, keys, grouping, budget=budget)
        _, inverse, pattern_events = grouping
        open_records = ~budgets.exhausted
        if open_records.sum() < batch_size:
            return 0
        sample_rate = batch_size / int(open_records.sum())
        cap = _cap(budgets.budget_epsilon, max_epsilon)
        groups = sorted(set(inverse[open_records].tolist()))

        def fits(steps: int) -> bool:
            planned = PrivacyEvent(noise_multiplier, sample_rate, steps)
            try:
                return all(self._epsilon([*pattern_events[g], planned], history) <= cap for g in groups)
            except PrivacyError:  # an accountant failure counts as "does not fit" (fail closed)
                return False

        return largest_fitting(fits)

    # ----------------------------------------------------------------- spending

    def charge(
        self, record_ids: Sequence[str] | np.ndarray, *, noise_multiplier: float | None, batch_size: int,
        steps: int, run_id: str, round: int, hospital: str = "", max_epsilon: float | None = None,
        min_records: int = 1, budget: float | None = None,
        limit: Callable[[PrivacyEvent], str | None] | None = None,
    ) -> Charge:
        """Durably charge a round on the records of ``record_ids`` that can afford it, before training.

        ``noise_multiplier=None`` is a non-private round: every open record takes part and is
        exhausted by it (epsilon = infinity). A private round leaves out the records it would take
        over the cap (the budget, or ``max_epsilon`` where lower) and samples at
        ``batch_size / records left``. Fewer than ``max(min_records, batch_size)`` records left:
        :class:`BudgetExhausted`, and nothing is written. ``limit`` is the caller's own check of the
        round's final event (a hospital's per-round and per-run caps): a reason it returns refuses the
        charge the same way.
        """
        self._check_writable()
        if not isinstance(run_id, str) or not run_id:
            raise PrivacyError(f"run_id must be a non-empty string, got {run_id!r}")
        round = _non_negative_int("round", round, PrivacyError)
        if steps < 1 or batch_size < 1:
            raise PrivacyError(f"a charge needs at least one step and a batch of one, got {steps} and {batch_size}")
        _check_max_epsilon(max_epsilon)
        ids = np.asarray(record_ids, dtype=str)
        keys = record_keys(ids)
        if not all_distinct(keys):
            # A record offered twice would be sampled twice as often as it is charged for.
            raise PrivacyError("a charge needs distinct records; the same record id (or key) appears twice")
        with self._store.transaction() as conn:
            history = self._history(conn)
            outcome = self._select(conn, history, keys, noise_multiplier, batch_size, steps, max_epsilon,
                                   min_records, budget)
            if limit is not None and not isinstance(outcome, str):
                outcome = limit(outcome[1]) or outcome
            if isinstance(outcome, str):
                refusal = outcome
            else:
                selected, event, projected = outcome
                chosen = RecordSet.of(keys[selected])
                self._store.save_set(conn, chosen)
                body = {"run_id": run_id, "round": round, "hospital": hospital, "private": noise_multiplier is not None,
                        "noise_multiplier": event.noise_multiplier, "sample_rate": event.sample_rate,
                        "steps": event.steps, "accountant": history.accountant, "record_set": chosen.digest,
                        "set_size": len(chosen), "projected_epsilon": projected}
                history = self._append(conn, history, CHARGE, body)
                place = (str(self.path), self._store.ledger_id)
                listed = _LISTED_KEYS.get(place)
                new = np.ones(len(keys), dtype=bool) if listed is None else ~sorted_contains(listed, keys)
                if new.any():
                    self._store.add_records(conn, keys[new], ids[new], history.length)
                refusal = None
        if refusal is not None:
            raise BudgetExhausted(refusal)
        # Committed: these keys are in the records table now (it only ever grows).
        if len(_LISTED_KEYS) > 16 and place not in _LISTED_KEYS:
            _LISTED_KEYS.clear()
        if listed is None:
            _LISTED_KEYS[place] = np.sort(keys)
        elif new.any():
            _LISTED_KEYS[place] = np.union1d(listed, keys[new])
        self._after_write(history)
        log.info("ledger %s: charged run %s round %d (%s): %d steps at sigma %g, q %.4g on %d of %d records; "
                 "largest epsilon now %.4g of %g", self.path, run_id, round, hospital or "-", event.steps,
                 event.noise_multiplier, event.sample_rate, int(selected.sum()), len(keys), projected,
                 history.budget_epsilon)
        return Charge(history.length, selected, event, projected, noise_multiplier is not None)

    def _select(self, conn, history: _History, keys: np.ndarray, sigma: float | None, batch_size: int,
                steps: int, max_epsilon: float | None, min_records: int, budget: float | None):
        """Inside the write transaction: the records that can afford the round, or why none can."""
        grouping = self._patterns(conn, history, keys)
        budgets = self._budgets(conn, history, keys, grouping, budget=budget)
        _, inverse, pattern_events = grouping
        selected = ~budgets.exhausted
        needed = max(min_records, batch_size, 1)
        cap = _cap(budgets.budget_epsilon, max_epsilon)
        while True:
            left = int(selected.sum())
            if left < needed:
                return self._refusal(budgets, left, needed, cap)
            event = PrivacyEvent(0.0 if sigma is None else float(sigma), batch_size / left, steps)
            if sigma is None:
                return selected, event, math.inf
            projected = np.full(len(keys), math.inf)
            for group in set(inverse[selected].tolist()):
                try:
                    value = self._epsilon([*pattern_events[group], event], history)
                except PrivacyError:
                    value = math.inf  # an accountant failure: these records do not fit (fail closed)
                projected[inverse == group] = value
            fits = selected & (projected <= cap)
            if fits.sum() == left:
                return selected, event, float(projected[selected].max())
            selected = fits  # fewer records raise the sample rate: check the rest again

    def _refusal(self, budgets: RecordBudgets, left: int, needed: int, cap: float) -> str:
        status = budgets.status()
        if status.locked:
            return (f"privacy budget exhausted: every one of the {status.records} records is exhausted "
                    f"(largest epsilon {format_epsilon(status.epsilon_spent, status.budget_epsilon)} of budget "
                    f"{status.budget_epsilon:g}, "
                    f"delta {status.delta:g}); the dataset is LOCKED in ledger {self.path}")
        return (f"privacy budget exhausted for this request: only {left} of {status.records} records could afford "
                f"it within epsilon {cap:g} ({status.exhausted} exhausted), and a round needs at least {needed}; "
                f"nothing was charged. The open records could still spend up to {format_epsilon(status.remaining)} "
                "in a smaller round")

    def confirm(self, charge: Charge | int, *, steps_done: int,
                status_of: Sequence[str] | np.ndarray | None = None,
                budget: float | None = None) -> BudgetStatus | None:
        """Record that the charged round trained ``steps_done`` steps (at most the charged steps).

        With ``status_of``: also where those records stand once confirmed (``status(status_of,
        budget=budget)``), read in the same transaction; otherwise None.
        """
        self._check_writable()
        entry_id = charge.entry_id if isinstance(charge, Charge) else _non_negative_int("entry", charge, LedgerError)
        steps_done = _non_negative_int("steps_done", steps_done, LedgerError)
        written = False
        with self._store.transaction() as conn:
            history = self._history(conn)
            event = history.events.get(entry_id)
            if event is None:
                raise LedgerError(f"ledger {self.path} has no charge {entry_id}")
            if event.confirmed:
                if event.steps != steps_done:
                    raise LedgerError(f"charge {entry_id} is already confirmed with {event.steps} steps")
            elif steps_done > event.charged_steps:
                raise LedgerError(f"charge {entry_id} charged {event.charged_steps} steps; cannot confirm "
                                  f"{steps_done} (charge more steps before training them)")
            else:
                history = self._append(conn, history, CONFIRM, {"charge": entry_id, "steps": steps_done})
                written = True
            status = None
            if status_of is not None:
                status = self._budgets(conn, history, record_keys(status_of), budget=budget).status()
        if written:
            self._after_write(history)
        return status

    def lock(self, record_ids: Sequence[str] | np.ndarray, reason: str) -> None:
        """Exhaust these records for good (the hospital's own decision); they never train again."""
        self._check_writable()
        records = RecordSet.of(record_keys(record_ids))
        with self._store.transaction() as conn:
            history = self._history(conn)
            self._store.save_set(conn, records)
            history = self._append(conn, history, EXHAUST, {"record_set": records.digest, "reason": str(reason)})
        self._after_write(history)
        log.warning("ledger %s: %d records LOCKED: %s", self.path, len(records), reason)

    # ----------------------------------------------------------------- integrity

    def verify(self) -> VerifyReport:
        """Check the keyed chain, the witness, every record set and every entry; list the problems."""
        problems: list[str] = []
        try:
            with self._store.transaction("DEFERRED") as conn:
                history = self._history(conn)
                for digest in {e.record_set for e in history.events.values()} | {d for d, _, _ in history.locks}:
                    self._store.load_set(conn, digest, cached=False)
        except LedgerError as exc:
            problems.append(str(exc))
            return VerifyReport(False, problems, 0, 0)
        # The replay read every entry and checked that their ids run 1..n: n entries.
        return VerifyReport(True, [], history.length, len(history.events))

    def _check_sets(self, conn, history: _History) -> None:
        """On opening (the replay has checked the keyed chain, the witness and every entry): the record
        sets this process has not read yet (a set it read was checked against its digest then, and its
        copy is the one it uses).

        A node starting afresh therefore checks every set, as `verify` does; a long-running one (a Ray
        worker that plays many simulated hospitals, each round) checks the new ones, so that opening
        a ledger shared by many hospitals does not re-read every hospital's sets every time.
        """
        try:
            self._store.check_sets(conn, [*{e.record_set for e in history.events.values()},
                                          *{d for d, _, _ in history.locks}])
        except LedgerError as exc:
            raise LedgerError(str(exc), reason="its privacy ledger failed its integrity check") from None

    # ----------------------------------------------------------------- replay

    def _history(self, conn) -> _History:
        """Replay every entry, checking each tag, the witness and the entries' consistency.

        Every entry's stored bytes are read and compared on every call. Entries this process has
        already authenticated (byte for byte the same as then, under the same key) are not
        re-tagged: their replayed state is reused, so a round costs the new entries, not the history.
        """
        rows = self._store.entries(conn)
        if self._key is None:
            raise LedgerError(f"ledger {self.path}: its key was not found, so its entries cannot be authenticated",
                              reason="its ledger key is missing")
        genesis = self._key.genesis(self._store.ledger_id)
        cache_key = (str(self.path), genesis)
        with _REPLAYS_LOCK:
            known = _REPLAYS.get(cache_key)
        if known is not None and len(rows) >= len(known[0]) and rows[:len(known[0])] == known[0]:
            history, start = known[1].copy(), len(known[0])
        else:
            history, start = _History(), 0
        previous = history.head or genesis
        for position, (entry_id, kind, body, tag) in enumerate(rows[start:], start=start + 1):
            where = f"ledger {self.path} failed its integrity check at entry {entry_id}"
            if entry_id != position:
                raise _tampered(f"{where}: expected entry {position} (an entry was removed or inserted)", self.path)
            try:
                values = json.loads(body)
            except ValueError:
                raise _tampered(f"{where}: its body is not JSON", self.path) from None
            expected = self._key.tag(previous, {"id": entry_id, "kind": kind, "body": values})
            if tag != expected:
                raise _tampered(f"{where}: its tag does not match (the entry was altered, reordered, or the chain "
                                "was rewritten without the hospital's key)", self.path)
            try:
                self._apply(history, entry_id, kind, values)
            except (KeyError, TypeError, ValueError, PrivacyError) as exc:
                raise _tampered(f"{where}: inconsistent entry ({exc})", self.path) from None
            previous, history.length, history.head = tag, entry_id, tag
        witness = self._key.witness()
        if witness is not None and witness.length:
            if history.length < witness.length:
                raise _tampered(f"ledger {self.path} holds {history.length} entries but its witness saw "
                                f"{witness.length}: entries were cut off or the file was replaced by an older copy",
                                self.path)
            if rows[witness.length - 1][3] != witness.tag:
                raise _tampered(f"ledger {self.path}: entry {witness.length} differs from the one its witness saw "
                                "(the file was replaced)", self.path)
        if rows and math.isnan(history.budget_epsilon):
            raise _tampered(f"ledger {self.path} has no opening entry", self.path)
        self.budget_epsilon, self.delta, self.accountant = history.budget_epsilon, history.delta, history.accountant
        self.unit = history.unit
        if start < len(rows):
            with _REPLAYS_LOCK:
                _REPLAYS[cache_key] = (rows, history.copy())
                _REPLAYS.move_to_end(cache_key)
                while len(_REPLAYS) > _REPLAYS_SIZE:
                    _REPLAYS.popitem(last=False)
        return history

    def _apply(self, history: _History, entry_id: int, kind: str, body: dict[str, Any]) -> None:
        if kind not in _KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        if (kind == OPEN) != (entry_id == 1):
            raise ValueError("the opening entry must be first and only first")
        if kind == OPEN:
            _check_settings(body["budget_epsilon"], body["delta"], body["accountant"])
            history.budget_epsilon = history.initial_budget_epsilon = float(body["budget_epsilon"])
            history.delta, history.accountant = float(body["delta"]), str(body["accountant"])
            history.unit = str(body.get("unit", "image"))
            _check_unit(history.unit)
            history.created_at = str(body["at"])
        elif kind == BUDGET:
            budget = float(body["budget_epsilon"])
            if not 0 < budget < history.budget_epsilon:
                raise ValueError(f"budget {budget:g} is not below {history.budget_epsilon:g} (a budget only goes down)")
            history.budget_epsilon = budget
        elif kind == CHARGE:
            private = bool(body["private"])
            sigma, rate, steps = float(body["noise_multiplier"]), float(body["sample_rate"]), int(body["steps"])
            PrivacyEvent(sigma, rate, steps)
            if body["accountant"] != history.accountant or (sigma == 0) == private or steps < 1:
                raise ValueError("charge inconsistent with the ledger (accountant, noise or steps)")
            history.events[entry_id] = LedgerEvent(
                entry_id, str(body["run_id"]), int(body["round"]), str(body["hospital"]), sigma, rate, steps, steps,
                str(body["accountant"]), private, False, str(body["at"]), str(body["record_set"]),
                int(body["set_size"]))
        elif kind == CONFIRM:
            target, steps = int(body["charge"]), int(body["steps"])
            event = history.events.get(target)
            if event is None or event.confirmed or not 0 <= steps <= event.charged_steps:
                raise ValueError(f"confirmation of charge {target} does not fit it")
            history.events[target] = _replace(event, steps=steps, confirmed=True)
        else:
            history.locks.append((str(body["record_set"]), str(body["reason"]), str(body["at"])))

    def _append(self, conn, history: _History, kind: str, body: dict[str, Any], at: str | None = None) -> _History:
        """Append one authenticated entry and apply it to ``history`` (``at``: its time, default now;
        a migration keeps the old entry's own)."""
        assert self._key is not None
        entry_id = history.length + 1
        body = {**body, "at": at or now()}
        previous = history.head or self._key.genesis(self._store.ledger_id)
        tag = self._key.tag(previous, {"id": entry_id, "kind": kind, "body": body})
        self._store.append(conn, entry_id, kind, json.dumps(body, sort_keys=True, allow_nan=True), tag)
        self._apply(history, entry_id, kind, body)
        history.length, history.head = entry_id, tag
        return history

    def _after_write(self, history: _History) -> None:
        """Move the witness forward once the entries are committed (a crash before it is harmless)."""
        assert self._key is not None
        self.budget_epsilon, self.delta, self.accountant = history.budget_epsilon, history.delta, history.accountant
        self.unit = history.unit  # a ledger just created knows its unit from its opening entry
        try:
            self._key.write_witness(Witness(history.length, history.head))
        except OSError as exc:
            raise LedgerError(f"cannot write the ledger witness {self._key.witness_path} ({exc})",
                              reason="its ledger witness cannot be written") from exc

    # ----------------------------------------------------------------- per-record accounting

    def _patterns(self, conn, history: _History, keys: np.ndarray):
        """Group ``keys`` by history: (patterns, inverse, the events of each pattern).

        Only the record sets that hold one of ``keys`` shape their history; the others are found by
        the process's membership index (:class:`~fedpriv.privacy.records.MembershipIndex`), so that
        a call's cost does not grow with the sets of other hospitals sharing the ledger.
        """
        events = [e for e in history.events.values() if e.steps > 0]
        digests = self._sets_holding(conn, sorted({e.record_set for e in events}), keys)
        sets = tuple(self._store.load_set(conn, digest) for digest in digests)  # read and checked once a process
        grouping = _remembered_grouping(keys, sets)
        if grouping is None:
            columns = [record_set.contains(keys) for record_set in sets]
            membership = np.column_stack(columns) if columns else np.zeros((len(keys), 0), dtype=bool)
            grouping = signatures(membership)
            _remember_grouping(keys, sets, grouping)
        patterns, inverse = grouping
        by_set: dict[str, list[PrivacyEvent]] = {digest: [] for digest in digests}
        for event in events:
            if event.record_set in by_set:
                by_set[event.record_set].append(event.event())
        pattern_events = [[e for digest, member in zip(digests, row, strict=True) if member for e in by_set[digest]]
                          for row in patterns]
        return patterns, inverse, pattern_events

    def _sets_holding(self, conn, digests: list[str], keys: np.ndarray) -> list[str]:
        """Those of ``digests`` (sorted) whose record set holds at least one of ``keys``, in order.

        A set the index has not seen is read and checked first (`LedgerStore.load_set`). If the sets
        are too many for the index, every one of ``digests`` is returned (each is then tested).
        """
        with _INDEX_LOCK:
            unseen = [digest for digest in digests if digest not in _INDEX]
        for attempt in (unseen, digests):
            if not attempt:
                break
            sets = [self._store.load_set(conn, digest) for digest in attempt]
            with _INDEX_LOCK:
                if not _INDEX.add(sets):
                    return digests
                if all(digest in _INDEX for digest in digests):
                    break
        with _INDEX_LOCK:
            if not all(digest in _INDEX for digest in digests):
                return digests
            held = _INDEX.holding(keys)
        return [digest for digest in digests if digest in held]

    def _budgets(self, conn, history: _History, keys: np.ndarray, grouping=None,
                 budget: float | None = None) -> RecordBudgets:
        patterns, inverse, pattern_events = grouping or self._patterns(conn, history, keys)
        per_pattern = np.array([self._epsilon(events, history) for events in pattern_events], dtype=float)
        values = per_pattern[inverse] if len(keys) else np.zeros(0)
        limit = _cap(history.budget_epsilon, budget)
        exhausted = ~(values < limit * (1 - SPENT_FRACTION))
        for digest, _, _ in history.locks:
            exhausted |= self._store.load_set(conn, digest).contains(keys)
        return RecordBudgets(keys, values, exhausted, **{**history.status_fields(), "budget_epsilon": limit})

    def _known_keys(self, conn) -> np.ndarray:
        rows = conn.execute("SELECT key FROM records").fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64).view(np.uint64)

    def _epsilon(self, history_events: Sequence[PrivacyEvent], history: _History) -> float:
        """Epsilon of ``history_events`` with this ledger's accountant and delta; failures fail closed."""
        try:
            value = epsilon(history_events, history.delta, history.accountant)
        except PrivacyError:
            raise
        except Exception as exc:  # numerical failures inside Opacus must refuse, not crash oddly
            raise PrivacyError(f"the {history.accountant} accountant failed on this history: {exc}") from exc
        if math.isnan(value):
            raise PrivacyError(f"the {history.accountant} accountant returned NaN for this history")
        return value

    def _check_writable(self) -> None:
        if self._read_only:
            raise LedgerError(f"ledger {self.path} was opened read-only; use PrivacyLedger.open to spend")


# Per process: how the records of a round fall into groups, for the (read-only) key arrays that
# `record_keys` hands out. A round groups the same records against the same record sets three
# times (budget check, charge, status). A grouping is reused only with the very set objects it was
# computed from, as the store hands them out after reading and checking them: a set read again
# from the file (after its cache was emptied) is grouped again.
_GROUPINGS: list[tuple[np.ndarray, tuple[RecordSet, ...], tuple[np.ndarray, np.ndarray]]] = []


def _remembered_grouping(keys: np.ndarray, sets: tuple[RecordSet, ...]):
    with _REPLAYS_LOCK:
        for known, known_sets, grouping in _GROUPINGS:
            if known is keys and len(known_sets) == len(sets) and all(a is b for a, b in zip(known_sets, sets)):
                return grouping
    return None


def _remember_grouping(keys: np.ndarray, sets: tuple[RecordSet, ...], grouping) -> None:
    if keys.flags.writeable:  # an array that may change cannot keep its grouping
        return
    with _REPLAYS_LOCK:
        _GROUPINGS.append((keys, sets, grouping))
        del _GROUPINGS[:-8]


def read_ledger(path: str | Path, *, key_path: str | Path | None = None) -> PrivacyLedger:
    """Open an existing ledger for inspection (show, verify); it refuses to charge, confirm or lock.

    Without its key the entries cannot be authenticated, so reading them fails with LedgerError.
    """
    path = Path(path)
    if not path.is_file():
        raise LedgerError(f"no ledger at {path}")
    key_file = Path(key_path) if key_path else key_path_for(path)
    key = ChainKey.load(key_file) if key_file.is_file() else None
    return PrivacyLedger(LedgerStore.open(path), key, read_only=True)


# --------------------------------------------------------------------- helpers


def _key_for_new_ledger(path: Path, key_file: Path) -> ChainKey:
    """The key of a ledger about to be created; a key that already saw entries means deletion."""
    if key_file.is_file():
        key = ChainKey.load(key_file)
        witness = key.witness()
        if witness is not None and witness.length > 0:
            raise LedgerError(
                f"ledger {path} is missing, but its key {key_file} has seen {witness.length} entries: the "
                "ledger was deleted or moved. Refusing to start a fresh budget. Fix: restore the ledger file",
                reason="its privacy ledger was deleted")
        return key
    return ChainKey.create(key_file)


def _tampered(message: str, path: Path) -> LedgerError:
    return LedgerError(f"{message}; refusing to use it (inspect with `fedpriv-ledger verify {path}`)",
                       reason="its privacy ledger failed its integrity check")


def _replace(event: LedgerEvent, **changes: Any) -> LedgerEvent:
    from dataclasses import replace

    return replace(event, **changes)


def _check_settings(budget_epsilon: Any, delta: Any, accountant: Any) -> None:
    if not (isinstance(budget_epsilon, int | float) and math.isfinite(budget_epsilon) and budget_epsilon > 0):
        raise PrivacyError(f"budget epsilon must be finite and > 0, got {budget_epsilon!r}")
    if not (isinstance(delta, int | float) and 0 < delta < 1):
        raise PrivacyError(f"delta must be in (0, 1), got {delta!r}")
    check_accountant(accountant)


def _check_unit(unit: Any) -> None:
    if unit not in UNITS:
        raise PrivacyError(f"privacy unit must be one of {', '.join(UNITS)}, got {unit!r}")


def _non_negative_int(name: str, value: Any, error: type[PrivacyError]) -> int:
    import operator

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


def largest_fitting(fits) -> int:
    """The largest n in [0, MAX_SEARCH_STEPS] with fits(n), assuming fits is monotone decreasing."""
    if not fits(1):
        return 0
    low, high = 1, 2
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
