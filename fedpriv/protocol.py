"""What hospitals and the server tell each other: the status names, every message key, the reply codecs.

Both sides spell a key only through this module. A status travels as its string value in a reply's
``status`` ConfigRecord (``Status`` is a str enum, so ``Status.TRAINED == "trained"``). No Flower
here: the codecs build plain dicts, and the apps wrap them in Flower's records.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from fedpriv.errors import FedprivError, LedgerError

if TYPE_CHECKING:  # for annotations only: the hospital imports this module, never the reverse at run time
    from fedpriv.hospital import RoundOutcome


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


# The message of every evaluation reply: what it shares, or why it shares nothing.
NOT_COVERED = "computed on the hospital's private validation data: NOT covered by the DP guarantee"
DECLINED = ("validation metrics not shared: they would be computed on private records without noise "
            "(the hospital opts in with share-validation-metrics)")


class Content:
    """The records of a message's content (Flower's conventions, plus the reply's status)."""

    ARRAYS = "arrays"
    METRICS = "metrics"
    CONFIG = "config"
    STATUS = "status"


class Field:
    """The keys of a reply's ``status`` ConfigRecord (text that is not a metric)."""

    HOSPITAL = "hospital"  # the name the node calls itself (its node config's name)
    STATUS = "status"  # a Status value
    MESSAGE = "message"  # why, in one line
    CHAIN_HEAD = "chain-head"  # the head of its ledger's hash chain
    ACCOUNTANT = "accountant"  # the accountant its ledger uses
    DEVICE = "device"  # the torch device it trained on ("" when it did not train)


class Metric:
    """The keys of a reply's MetricRecord, and of the server's own privacy metrics."""

    NUM_EXAMPLES = "num-examples"  # records the round was drawn from (public, as in every DP-SGD accountant)
    STEPS = "steps"
    NOISE_MULTIPLIER = "noise-multiplier"
    EPSILON = "epsilon"  # the largest epsilon of any of the hospital's records
    DELTA = "delta"
    BUDGET_EPSILON = "budget-epsilon"
    REMAINING_EPSILON = "remaining-epsilon"
    LOCKED = "locked"
    TRAINED = "trained"
    RECORDS = "records"
    EXHAUSTED_RECORDS = "exhausted-records"
    EPSILON_MEDIAN = "epsilon-median"
    CHAIN_LENGTH = "chain-length"
    NOISE_SEEDED = "noise-seeded"
    MAX_EPSILON_PER_ROUND = "max-epsilon-per-round"
    MAX_EPSILON_PER_RUN = "max-epsilon-per-run"
    LEDGER_SECONDS = "ledger-seconds"
    TRAIN_SECONDS = "train-seconds"
    PER_PATIENT = "per-patient"  # 1 where a record is a patient (records, epsilon and the sample rate count patients)
    # Evaluation replies (on private validation data: never DP-covered) and the server's test split.
    DP_COVERED = "dp-covered"
    EVAL_SECONDS = "eval-seconds"
    # The server's aggregate: the largest epsilon and each hospital's, never an average.
    EPSILON_MAX = "epsilon-max"
    HOSPITALS_LOCKED = "hospitals-locked"
    EPSILON_OF = "epsilon/"  # + the hospital's name


def outcome_metrics(outcome: RoundOutcome) -> dict[str, float | int]:
    """A round outcome's scalar metrics for the reply's MetricRecord (epsilon = inf after non-private use)."""
    return {
        Metric.NUM_EXAMPLES: outcome.num_examples, Metric.STEPS: outcome.steps,
        Metric.NOISE_MULTIPLIER: outcome.noise_multiplier, Metric.EPSILON: outcome.epsilon,
        Metric.DELTA: outcome.delta, Metric.BUDGET_EPSILON: outcome.budget_epsilon,
        Metric.REMAINING_EPSILON: outcome.remaining, Metric.LOCKED: int(outcome.locked),
        Metric.TRAINED: int(outcome.status == Status.TRAINED), Metric.RECORDS: outcome.records,
        Metric.EXHAUSTED_RECORDS: outcome.exhausted, Metric.EPSILON_MEDIAN: outcome.epsilon_median,
        Metric.CHAIN_LENGTH: outcome.chain_length, Metric.NOISE_SEEDED: int(outcome.noise_seeded),
        Metric.MAX_EPSILON_PER_ROUND: outcome.max_epsilon_per_round,
        Metric.MAX_EPSILON_PER_RUN: outcome.max_epsilon_per_run,
        Metric.LEDGER_SECONDS: outcome.ledger_seconds, Metric.TRAIN_SECONDS: outcome.train_seconds,
        Metric.PER_PATIENT: int(outcome.unit == "patient"),
    }


def outcome_fields(outcome: RoundOutcome, status: str | None = None) -> dict[str, str]:
    """A round outcome's text for the reply's ``status`` record; `status` overrides the outcome's own."""
    return {Field.HOSPITAL: outcome.hospital, Field.STATUS: str(status or outcome.status),
            Field.MESSAGE: outcome.message, Field.CHAIN_HEAD: outcome.chain_head, Field.ACCOUNTANT: outcome.accountant,
            Field.DEVICE: outcome.device}


def evaluation_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """An evaluation reply's metrics: finite floats only, always marked as not DP-covered.

    Validation metrics are computed on private records without noise; every reply says so.
    """
    finite = {key: float(value) for key, value in metrics.items() if not math.isnan(value)}
    return {**finite, Metric.DP_COVERED: 0.0}


def evaluation_fields(hospital: str, status: Status, message: str) -> dict[str, str]:
    """An evaluation reply's ``status`` record."""
    return {Field.HOSPITAL: hospital, Field.STATUS: str(status), Field.MESSAGE: message}


def says_trained(metrics: Any) -> bool:
    """Whether a training reply's metrics say it trained (the one rule both sides read)."""
    return metrics.get(Metric.TRAINED) == 1


def figures_known(metrics: Any) -> bool:
    """False for a reply whose hospital could not read its own ledger (epsilon NaN: unknown)."""
    try:
        return not math.isnan(float(metrics[Metric.EPSILON]))
    except (KeyError, TypeError, ValueError):
        return False


def privacy_metrics(epsilons: dict[str, float], locked: int) -> dict[str, float]:
    """The server's privacy metrics: the largest epsilon and each hospital's, never an average."""
    return {Metric.EPSILON_MAX: max(epsilons.values(), default=0.0), Metric.HOSPITALS_LOCKED: float(locked),
            **{f"{Metric.EPSILON_OF}{name}": value for name, value in epsilons.items()}}


def told_to_server(error: FedprivError) -> str:
    """What the server learns of a hospital's own failure: the cause, not its paths."""
    if isinstance(error, LedgerError):
        return f"refused to train: {error.reason}; nothing was trained (details in the hospital's own log)"
    return str(error)
