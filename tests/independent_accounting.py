"""Per-record epsilon recomputed from a ledger's raw events with Google's dp_accounting.

Independent of fedpriv's own accounting (which uses Opacus): PLD for PRV ledgers, RDP for RDP
ledgers. A test compares the two record by record.
"""

from __future__ import annotations

import math

import numpy as np
from dp_accounting import dp_event, pld, rdp

from fedpriv.privacy.ledger import PrivacyLedger


def events_epsilon(events, delta: float, accountant: str) -> float:
    """Epsilon of a list of LedgerEvents (all drawn on one record) by dp_accounting."""
    if not events:
        return 0.0
    if any(not e.private for e in events):
        return math.inf
    engine = pld.PLDAccountant(value_discretization_interval=1e-4) if accountant == "prv" else rdp.RdpAccountant()
    for e in events:
        if e.steps:
            step = dp_event.PoissonSampledDpEvent(e.sample_rate, dp_event.GaussianDpEvent(e.noise_multiplier))
            engine.compose(dp_event.SelfComposedDpEvent(step, e.steps))
    return float(engine.get_epsilon(delta))


def check_records(ledger: PrivacyLedger, record_ids, budget: float, *, sample: int | None = None) -> np.ndarray:
    """Assert every record's ledger epsilon is within 3% of dp_accounting's and never above the budget.

    Records with the same history are recomputed once; returns the ledger's per-record epsilons.
    """
    record_ids = np.asarray(record_ids, dtype=str)
    budgets = ledger.budgets(record_ids)
    assert (budgets.epsilon[np.isfinite(budgets.epsilon)] <= budget + 1e-9).all()
    done: dict[tuple[int, ...], float] = {}
    for position, record_id in enumerate(record_ids[:sample]):
        events, value, _, _ = ledger.record_history(str(record_id))
        assert value == budgets.epsilon[position]
        signature = tuple(e.id for e in events)
        if signature not in done:
            done[signature] = events_epsilon(events, ledger.delta, ledger.accountant)
        expected = done[signature]
        if math.isinf(expected):
            assert math.isinf(value), record_id
        else:
            assert value == __import__("pytest").approx(expected, rel=0.03, abs=1e-6), record_id
    return budgets.epsilon
