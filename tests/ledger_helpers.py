"""Helpers of the ledger tests: raw access to a ledger file and per-record accounting by dp_accounting.

The independent accounting reads the ledger's SQLite file directly (the charge and confirmation
entries' JSON bodies and the stored record sets), recomputes each record's 64-bit key from its id
with hashlib, and composes every event whose set held the record with Google's dp_accounting: PLD
for PRV ledgers, RDP for RDP ledgers. Nothing of fedpriv's own accounting (Opacus) or grouping is
used, so a test can compare the ledger's per-record figures with these.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from dp_accounting import dp_event, pld, rdp
from torch import nn

from fedpriv.privacy.chain import key_path_for
from fedpriv.privacy.ledger import PrivacyLedger

DELTA = 1e-5


def tiny_model() -> nn.Module:
    """A model for 8x8 single-channel records, the same weights every call."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 2))


def record_ids(prefix: str, count: int) -> np.ndarray:
    return np.array([f"{prefix}-{index:04d}" for index in range(count)])


def open_ledger(path: Path, budget: float = 2.0, **kwargs) -> PrivacyLedger:
    kwargs.setdefault("delta", DELTA)
    return PrivacyLedger.open(path, budget_epsilon=budget, **kwargs)


def key_file(path: Path) -> Path:
    """The ledger's key file under $FEDPRIV_KEY_DIR (set per test)."""
    return key_path_for(Path(path))


def witness_file(path: Path) -> Path:
    return key_file(path).with_suffix(".head")


# --------------------------------------------------------------------- raw file access


def sql(path: Path, *statements: str | tuple[str, tuple]) -> None:
    """Run statements on the ledger file directly (as an attacker or a broken tool would)."""
    with sqlite3.connect(path) as raw:
        for statement in statements:
            if isinstance(statement, tuple):
                raw.execute(*statement)
            else:
                raw.execute(statement)
    raw.close()


def raw_entries(path: Path) -> list[tuple[int, str, dict, str]]:
    raw = sqlite3.connect(path)
    try:
        rows = raw.execute("SELECT id, kind, body, tag FROM entries ORDER BY id").fetchall()
    finally:
        raw.close()
    return [(entry_id, kind, json.loads(body), tag) for entry_id, kind, body, tag in rows]


def chain_length(path: Path) -> int:
    return len(raw_entries(path))


@dataclass
class RawEvent:
    id: int
    noise_multiplier: float
    sample_rate: float
    steps: int  # the confirmed steps, or every charged step while unconfirmed
    private: bool
    record_set: str


def raw_events(path: Path) -> list[RawEvent]:
    """Every charge of the file, with the steps its confirmation recorded (if any)."""
    events: dict[int, RawEvent] = {}
    for entry_id, kind, body, _ in raw_entries(path):
        if kind == "charge":
            events[entry_id] = RawEvent(entry_id, float(body["noise_multiplier"]), float(body["sample_rate"]),
                                        int(body["steps"]), bool(body["private"]), str(body["record_set"]))
        elif kind == "confirm":
            events[int(body["charge"])].steps = int(body["steps"])
    return list(events.values())


def raw_sets(path: Path) -> dict[str, frozenset[int]]:
    raw = sqlite3.connect(path)
    try:
        rows = raw.execute("SELECT digest, keys FROM sets").fetchall()
    finally:
        raw.close()
    return {digest: frozenset(np.frombuffer(blob, dtype="<u8").tolist()) for digest, blob in rows}


def raw_key(record_id: str) -> int:
    """A record's ledger key as documented: the first 8 bytes of sha256 of its id, little-endian."""
    return int.from_bytes(hashlib.sha256(str(record_id).encode()).digest()[:8], "little")


# --------------------------------------------------------------------- independent accounting


def dp_accounting_epsilon(events: list[RawEvent], delta: float, accountant: str) -> float:
    """Epsilon of one record's events by dp_accounting; a non-private event is infinity."""
    events = [e for e in events if e.steps > 0]
    if not events:
        return 0.0
    if any(not e.private for e in events):
        return math.inf
    engine = pld.PLDAccountant() if accountant == "prv" else rdp.RdpAccountant()
    for e in events:
        step = dp_event.PoissonSampledDpEvent(e.sample_rate, dp_event.GaussianDpEvent(e.noise_multiplier))
        engine.compose(dp_event.SelfComposedDpEvent(step, e.steps))
    return float(engine.get_epsilon(delta))


def memberships(path: Path, ids: np.ndarray) -> tuple[list[RawEvent], list[tuple[int, ...]]]:
    """The file's events and, for each record, the ids of the events whose set held it."""
    events, sets = raw_events(path), raw_sets(path)
    history = [tuple(e.id for e in events if raw_key(i) in sets[e.record_set]) for i in ids]
    return events, history


def check_against_dp_accounting(ledger: PrivacyLedger, ids, *, history_sample: int = 5) -> np.ndarray:
    """Assert each record's ledger epsilon is within 3% of dp_accounting's and never above the budget.

    Also checks that the ledger's events and per-record histories are the file's. Returns the
    independent per-record epsilons.
    """
    ids = np.asarray(ids, dtype=str)
    budgets = ledger.budgets(ids)
    events, history = memberships(ledger.path, ids)
    assert [(e.id, e.noise_multiplier, e.sample_rate, e.steps, e.private, e.record_set) for e in ledger.events()] \
        == [(e.id, e.noise_multiplier, e.sample_rate, e.steps, e.private, e.record_set) for e in events]
    by_id = {e.id: e for e in events}
    cache: dict[tuple[int, ...], float] = {}
    expected = np.empty(len(ids))
    for position, signature in enumerate(history):
        if signature not in cache:
            cache[signature] = dp_accounting_epsilon([by_id[i] for i in signature], budgets.delta, budgets.accountant)
        expected[position] = cache[signature]
    for position in np.linspace(0, len(ids) - 1, min(history_sample, len(ids))).astype(int):
        seen, value, _, _ = ledger.record_history(str(ids[position]))
        assert tuple(e.id for e in seen) == history[position], ids[position]
        assert value == budgets.epsilon[position]
    infinite = np.isinf(expected)
    assert (np.isinf(budgets.epsilon) == infinite).all(), "non-private use must be infinity, and only it"
    assert budgets.epsilon[~infinite] == pytest.approx(expected[~infinite], rel=0.03, abs=1e-9)
    assert (budgets.epsilon[~infinite] <= budgets.budget_epsilon).all()
    assert (expected[~infinite] <= budgets.budget_epsilon * 1.03).all()
    return expected
