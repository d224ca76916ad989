"""What hospitals and the server tell each other about a round: one name for each outcome.

A status travels as its string value in a reply's ``status`` ConfigRecord (``Status`` is a str
enum, so ``Status.TRAINED == "trained"``); the strategy records the last three about a hospital.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    # Said by a hospital.
    TRAINED = "trained"  # it trained the round; the reply carries its weights
    REFUSED = "refused"  # it refused this request (nothing charged), or cannot take part at all
    LOCKED = "locked"  # every one of its records is exhausted: it never trains again
    OPEN = "open"  # (query) it can still train
    IDLE = "idle"  # (query, evaluation) no round was asked for
    EVALUATED = "evaluated"  # it shared metrics on its private validation split (not DP-covered)
    DECLINED = "declined"  # it does not share metrics on private validation data
    # Said by the server about a hospital.
    FAILED = "failed"  # its reply was an error (it crashed, or Flower lost it)
    TIMEOUT = "timeout"  # no reply within strategy.round_timeout
    REJECTED = "rejected"  # its reply failed the server's checks (weights, figures, chain witness)
