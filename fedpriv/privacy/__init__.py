"""Differential-privacy bookkeeping: accountants over event histories, and the hospital's ledger.

- accounting.py: epsilon of a history of DP-SGD events; sigma for a plan (Opacus's accountants)
- plan.py: what one local training call will do and spend
- records.py: record keys and the content-addressed sets of records an event was drawn from
- chain.py: the ledger's keyed, tamper-evident chain and its witness
- store.py: the SQLite file (atomic creation, durable transactions)
- ledger.py: per-record budget policy: charge, confirm, lock, status, verify
"""

from fedpriv.privacy.accounting import (
    ACCOUNTANTS,
    PrivacyEvent,
    epsilon,
    merge_events,
    noise_multiplier_for,
)
from fedpriv.privacy.ledger import (
    BudgetStatus,
    Charge,
    LedgerEvent,
    PrivacyLedger,
    RecordBudgets,
    VerifyReport,
    read_ledger,
)
from fedpriv.privacy.plan import PrivacyPlan, plan_local_training, steps_per_epoch

__all__ = ["ACCOUNTANTS", "PrivacyEvent", "epsilon", "merge_events", "noise_multiplier_for",
           "PrivacyPlan", "plan_local_training", "steps_per_epoch",
           "BudgetStatus", "Charge", "LedgerEvent", "PrivacyLedger", "RecordBudgets", "VerifyReport",
           "read_ledger"]
