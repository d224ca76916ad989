"""fedpriv's error hierarchy.

Every error a user can cause (a bad config value, a missing or broken data file, a spent budget)
is a :class:`FedprivError` whose message is one line: what is wrong, where, and how to fix it.
The CLI prints that line and exits non-zero; it never shows a traceback for these.
"""

from __future__ import annotations

from typing import Any


class FedprivError(Exception):
    """Base class of every error fedpriv raises on purpose. Its message is one readable line."""


class ConfigError(FedprivError):
    """Raised when a configuration value is invalid, before any data is read or budget spent."""

    def __init__(self, key: str, value: Any, problem: str, fix: str) -> None:
        self.key, self.value, self.problem, self.fix = key, value, problem, fix
        super().__init__(f"{key}={value!r}: {problem}. Fix: {fix}")


class DataError(FedprivError):
    """Raised when a data file or folder is missing, unreadable, corrupt or unusable."""


class RunFilesError(FedprivError):
    """Raised when a run directory lacks a file the command needs, or holds one it cannot read."""


class NothingTrained(FedprivError):
    """Raised when a run ended without any hospital training in any round (each refused or was locked).

    Its model is the untrained initial one; the CLI exits with its own code so a script cannot take
    the run for a result.
    """


class ModelNotPrivateError(FedprivError):
    """Raised when a model cannot be trained with DP-SGD (Opacus's ModuleValidator rejected it)."""


class PrivacyError(FedprivError):
    """Raised when a privacy plan or accounting request is impossible (e.g. budget too small)."""


class BudgetExhausted(PrivacyError):
    """Raised when a hospital's ledger refuses training because the budget is (or would be) spent."""


class LedgerError(PrivacyError):
    """Raised when a privacy ledger is corrupt, unreadable or belongs to other data.

    A hospital refuses to train rather than reset such a ledger (fail closed). ``reason`` is a
    short cause that may be told to the server (e.g. "the disk is full"); the message itself names
    paths that stay in the hospital's log.
    """

    def __init__(self, message: str, reason: str = "its privacy ledger cannot be used") -> None:
        super().__init__(message)
        self.reason = reason
