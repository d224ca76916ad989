"""Differential-privacy bookkeeping: accountants over event histories, and the hospital ledger."""

from fedpriv.privacy.accounting import (
    ACCOUNTANTS,
    PrivacyEvent,
    epsilon,
    merge_events,
    noise_multiplier_for,
)

__all__ = ["ACCOUNTANTS", "PrivacyEvent", "epsilon", "merge_events", "noise_multiplier_for"]
