"""Differential-privacy bookkeeping: accountants over event histories, and the hospital ledger."""

from fedpriv.privacy.accounting import (
    ACCOUNTANTS,
    PrivacyEvent,
    epsilon,
    merge_events,
    noise_multiplier_for,
)
from fedpriv.privacy.ledger import (
    BudgetStatus,
    LedgerEntry,
    PrivacyLedger,
    VerifyReport,
    read_ledger,
)
from fedpriv.privacy.plan import PrivacyPlan, plan_local_training, steps_per_epoch

__all__ = ["ACCOUNTANTS", "PrivacyEvent", "epsilon", "merge_events", "noise_multiplier_for",
           "PrivacyPlan", "plan_local_training", "steps_per_epoch",
           "BudgetStatus", "LedgerEntry", "PrivacyLedger", "VerifyReport", "read_ledger"]
