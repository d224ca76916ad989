"""One hospital's side of a round, without Flower: its own settings, its ledger, its training.

The hospital is sovereign. Its budget, delta, limits, ledger and data come from its own settings
(:class:`HospitalSettings`); the server's request (:class:`RoundRequest`) says how to train and may
ask the hospital to spend *less*, never more. Every field of a request is checked against the
hospital's limits before the ledger is touched, so a bad request charges nothing. Every round,
private or not, is charged to the ledger before the first step, on the records that can afford it
(:meth:`fedpriv.privacy.ledger.PrivacyLedger.charge`), and confirmed afterwards. A round the budget
cannot afford is refused with nothing charged and nothing locked.

The hospital also decides what one record of its guarantee is (``HospitalSettings.unit``): an
image, or a patient. Per patient, the ledger's records are the patients (all of a patient's images
share one record), a round samples patients, and training clips each patient's gradient
(:func:`fedpriv.training.train_local` with ``groups``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedpriv.data import LabeledImages
from fedpriv.display import format_epsilon
from fedpriv.errors import BudgetExhausted, ConfigError, PrivacyError
from fedpriv.privacy.accounting import PrivacyEvent, check_accountant, epsilon, noise_multiplier_for
from fedpriv.privacy.ledger import UNITS, BudgetStatus, LedgerEvent, PrivacyLedger, largest_fitting
from fedpriv.privacy.plan import PrivacyPlan, steps_per_epoch
from fedpriv.protocol import Status, outcome_metrics
from fedpriv.training import train_local

log = logging.getLogger(__name__)

TRAINED, LOCKED, REFUSED = Status.TRAINED, Status.LOCKED, Status.REFUSED

# The hospital's own limits on what a server may ask (HospitalSettings can tighten them).
MAX_LOCAL_EPOCHS = 20
MIN_NOISE_MULTIPLIER = 0.3  # below it the accountant's bound is astronomically large anyway
MAX_NOISE_MULTIPLIER = 100.0
MIN_RECORDS = 10  # a round needs at least this many open records (and at least one batch of them)


@dataclass(frozen=True)
class HospitalSettings:
    """A hospital's own settings. In deployment they come from its node config, never the server."""

    name: str
    budget_epsilon: float  # per record, over every use of it
    delta: float
    ledger_path: Path
    accountant: str = "prv"
    allow_non_private: bool = False  # accept non-private rounds (those records' epsilon becomes infinity)
    # Where a private round's randomness (Poisson sampling and the Gaussian noise) comes from. None:
    # fresh entropy from the operating system every round, known to nobody, so the noise cannot be
    # regenerated and subtracted. An integer makes simulated experiments repeatable, and whoever
    # knows it can regenerate the noise: never set it where DP must hold against that party.
    noise_seed: int | None = None
    ledger_key: Path | None = None  # None: the default key folder (fedpriv.privacy.chain)
    # Simulated hospitals share one ledger per data source (a record's spend follows it into any
    # partition); it is created with the highest of their budgets and each hospital enforces its own.
    ledger_budget_epsilon: float | None = None
    min_records: int = MIN_RECORDS
    max_local_epochs: int = MAX_LOCAL_EPOCHS
    min_noise_multiplier: float = MIN_NOISE_MULTIPLIER
    # The hospital's own caps on what one round, and one run, may cost (None: only the budget). A
    # round's cost is the epsilon of its event alone; a run's is that of all its events at this
    # hospital composed. They bound what a cooperating server takes per run; a server that starts
    # many runs is still held by the budget, which is per record over every use.
    max_epsilon_per_round: float | None = None
    max_epsilon_per_run: float | None = None
    # Answer evaluation requests with metrics on the private validation split. Off by default: those
    # metrics are computed from private records without noise and are NOT covered by epsilon.
    share_validation_metrics: bool = False
    # What one record is: "image", or "patient" (user-level DP-SGD over the images' patient ids).
    # Fixed per ledger: the ledger refuses another unit than the one it was created with.
    unit: str = "image"
    # unit=patient: at most this many of a sampled patient's images per step (None: all of them).
    max_images_per_patient: int | None = None
    # The torch device it trains on, already resolved ("cpu", "cuda", "cuda:N": fedpriv.devices.resolve_device).
    # Its own hardware choice: the mechanism and its accounting are the same on every device.
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_accountant(self.accountant)
        if self.unit not in UNITS:
            raise PrivacyError(f"hospital {self.name}: privacy unit must be one of {', '.join(UNITS)}, "
                               f"got {self.unit!r}")
        if self.max_images_per_patient is not None and not (_whole(self.max_images_per_patient)
                                                            and self.max_images_per_patient >= 1):
            raise PrivacyError(f"hospital {self.name}: max_images_per_patient must be a whole number >= 1 or "
                               f"None, got {self.max_images_per_patient!r}")
        if not (isinstance(self.budget_epsilon, int | float) and self.budget_epsilon > 0):
            raise PrivacyError(f"hospital {self.name}: a privacy budget must be a positive number")
        for label, cap in (("per-round", self.max_epsilon_per_round), ("per-run", self.max_epsilon_per_run)):
            if cap is not None and not (_finite(cap) and cap > 0):
                raise PrivacyError(f"hospital {self.name}: its {label} epsilon cap must be a number above 0, "
                                   f"got {cap!r}")
        if self.ledger_path is None:
            raise PrivacyError(f"hospital {self.name}: every hospital needs a ledger path")


@dataclass(frozen=True)
class RoundRequest:
    """How the server asks a hospital to train one round (carried in the message's ConfigRecord).

    The defaults are those of fedpriv's config (``train`` and ``privacy`` sections).
    """

    run_id: str
    server_round: int
    num_rounds: int  # planned rounds of this run: "auto" sigma spreads the budget over them
    local_epochs: int = 1
    batch_size: int = 128
    lr: float = 1.0
    momentum: float = 0.0
    private: bool = True
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None  # None: "auto", calibrated by the hospital
    max_epsilon: float | None = None  # a server-side cap; it can only lower the hospital's budget
    spend_remaining: bool = False  # train only the steps that still fit
    max_physical_batch_size: int = 128
    seed: int = 0
    logit_shift: tuple[float, ...] = ()  # added to the logits in the training loss (logit adjustment)
    lr_final: float = 0.3  # the learning rate falls linearly over the planned rounds to lr * lr_final

    def check(self, num_classes: int, settings: HospitalSettings | None = None) -> None:
        """Refuse a request this hospital will not train, BEFORE its ledger is touched.

        The server is not trusted: every field is checked against the hospital's limits, so a
        request that would fail inside training (or that the hospital does not allow) costs nothing.
        """
        limits = settings or _DEFAULT_LIMITS
        sigma = self.noise_multiplier
        problems = [(key, value, rule) for key, value, ok, rule in [
            ("train.lr", self.lr, _finite(self.lr) and self.lr > 0, "must be above 0"),
            ("train.lr_final", self.lr_final, _finite(self.lr_final) and 0 < self.lr_final <= 1, "must be in (0, 1]"),
            ("train.momentum", self.momentum, _finite(self.momentum) and 0 <= self.momentum < 1, "must be in [0, 1)"),
            ("train.batch_size", self.batch_size, _whole(self.batch_size) and self.batch_size >= 1,
             "must be a whole number >= 1"),
            ("train.local_epochs", self.local_epochs,
             _whole(self.local_epochs) and 1 <= self.local_epochs <= limits.max_local_epochs,
             f"must be a whole number in 1..{limits.max_local_epochs} (the hospital's limit)"),
            ("train.max_physical_batch_size", self.max_physical_batch_size,
             _whole(self.max_physical_batch_size) and self.max_physical_batch_size >= 1, "must be a whole number >= 1"),
            ("privacy.max_grad_norm", self.max_grad_norm, _finite(self.max_grad_norm) and self.max_grad_norm > 0,
             "must be a finite number above 0"),
            ("privacy.noise_multiplier", sigma,
             sigma is None or (_finite(sigma) and limits.min_noise_multiplier <= sigma <= MAX_NOISE_MULTIPLIER),
             f"must be 'auto' or in [{limits.min_noise_multiplier:g}, {MAX_NOISE_MULTIPLIER:g}] (the hospital's range)"),
            ("privacy.max_epsilon", self.max_epsilon,
             self.max_epsilon is None or (_finite(self.max_epsilon) and self.max_epsilon > 0), "must be above 0"),
            ("strategy.num_rounds", self.num_rounds, _whole(self.num_rounds) and self.num_rounds >= 1,
             "must be a whole number >= 1"),
            ("server_round", self.server_round, _whole(self.server_round) and self.server_round >= 1,
             "must be a whole number >= 1"),
            ("dataset.class_prior", list(self.logit_shift),
             not self.logit_shift or (len(self.logit_shift) == num_classes
                                      and all(_finite(v) for v in self.logit_shift)),
             f"the server's logit shift must hold {num_classes} finite numbers, one per class"),
        ] if not ok]
        if problems:
            key, value, rule = problems[0]
            raise ConfigError(key, value, f"{rule} (sent by the server; nothing was trained or charged)",
                              "fix the federation's config on the server")

    def round_lr(self) -> float:
        """This round's learning rate: `lr` in round 1, falling linearly to `lr * lr_final` in the last."""
        progress = min(max(self.server_round - 1, 0) / max(self.num_rounds - 1, 1), 1.0)
        return self.lr * (1 - (1 - self.lr_final) * progress)

    def to_record(self) -> dict[str, Any]:
        """Flat scalars for a Flower ConfigRecord (None is encoded as -1)."""
        return {key: (-1 if value is None else list(value) if isinstance(value, tuple) else value)
                for key, value in asdict(self).items()}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> RoundRequest:
        """Parse a ConfigRecord; unknown keys are ignored, -1 means unset for optional numbers."""
        values = {key: record[key] for key in cls.__dataclass_fields__ if key in record}
        for key in ("noise_multiplier", "max_epsilon"):
            if key in values and values[key] is not None and float(values[key]) < 0:
                values[key] = None
        if "logit_shift" in values:
            values["logit_shift"] = tuple(float(v) for v in values["logit_shift"])
        return cls(**values)


@dataclass(frozen=True)
class _Limits:
    max_local_epochs: int = MAX_LOCAL_EPOCHS
    min_noise_multiplier: float = MIN_NOISE_MULTIPLIER


_DEFAULT_LIMITS = _Limits()


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class RoundOutcome:
    """What a hospital reports after a round: weights (if it trained) and its privacy state.

    Nothing here is computed from the private records without noise except the record counts,
    which DP-SGD's accounting treats as public (the sample rate is batch size / records).
    """

    hospital: str
    status: str  # TRAINED, LOCKED (every record exhausted) or REFUSED (this request only)
    message: str
    state_dict: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    num_examples: int = 0  # the records this round was drawn from
    steps: int = 0
    noise_multiplier: float = math.nan
    epsilon: float = 0.0  # the largest epsilon of any of the hospital's records (images or patients: `unit`)
    delta: float = 0.0
    budget_epsilon: float = math.inf
    remaining: float = 0.0
    locked: bool = False
    records: int = 0
    exhausted: int = 0
    epsilon_median: float = 0.0
    chain_length: int = 0
    chain_head: str = ""
    accountant: str = ""  # the accountant the hospital's ledger uses (not what the run config asked)
    noise_seeded: bool = False  # its noise came from its own noise_seed, not fresh entropy
    max_epsilon_per_round: float = math.inf  # the hospital's own caps (inf: none)
    max_epsilon_per_run: float = math.inf
    ledger_seconds: float = 0.0  # time spent on the budget check and ledger writes
    train_seconds: float = 0.0  # time spent in local training itself
    unit: str = "image"  # what a record is: "image", or "patient" (records, epsilon and the sample rate count patients)
    device: str = ""  # the torch device it trained on ("" when it did not train)

    def metrics(self) -> dict[str, float | int]:
        """Scalar metrics for the reply's MetricRecord (the keys are fedpriv.protocol's)."""
        return outcome_metrics(self)

    def with_status(self, status: BudgetStatus) -> RoundOutcome:
        self.epsilon, self.delta = status.epsilon_spent, status.delta
        self.budget_epsilon, self.locked, self.remaining = status.budget_epsilon, status.locked, status.remaining
        self.records, self.exhausted, self.epsilon_median = status.records, status.exhausted, status.epsilon_median
        self.chain_length, self.chain_head = status.chain_length, status.chain_head
        self.accountant = status.accountant
        self.unit = status.unit
        return self

    def with_caps(self, settings: HospitalSettings) -> RoundOutcome:
        """Carry the hospital's own caps, so the server reports what the hospital enforced."""
        for name in ("max_epsilon_per_round", "max_epsilon_per_run"):
            cap = getattr(settings, name)
            setattr(self, name, math.inf if cap is None else float(cap))
        return self


def open_ledger(settings: HospitalSettings) -> PrivacyLedger:
    budget = max(settings.budget_epsilon, settings.ledger_budget_epsilon or 0.0)
    return PrivacyLedger.open(settings.ledger_path, budget_epsilon=budget, delta=settings.delta,
                              accountant=settings.accountant, key_path=settings.ledger_key, unit=settings.unit)


def unit_records(records: LabeledImages, settings: HospitalSettings) -> np.ndarray:
    """The ledger's record ids of `records` under the hospital's unit: image ids, or the distinct patient ids.

    DataError (before the ledger is touched) when the unit is "patient" and the images have no patient ids.
    """
    if settings.unit == "patient":
        return records.patients(where=f"hospital {settings.name}'s data")[0]
    return records.ids()


def budget_state(settings: HospitalSettings, records: LabeledImages) -> RoundOutcome:
    """The hospital's current privacy state over its records, without training (queries, evaluation)."""
    with open_ledger(settings) as ledger:
        return RoundOutcome(settings.name, Status.IDLE, "", noise_seeded=settings.noise_seed is not None).with_status(
            ledger.status(unit_records(records, settings), budget=settings.budget_epsilon)).with_caps(settings)


def train_round(
    model: nn.Module, records: LabeledImages, settings: HospitalSettings, request: RoundRequest,
    *, num_classes: int | None = None, after_charge: Callable[[], None] | None = None,
) -> RoundOutcome:
    """Run one round of local training under the hospital's budget, or refuse it.

    The request is checked against the hospital's limits first, whoever calls this (ConfigError
    before anything is read or charged). `after_charge` runs once the charge is committed and
    before training (fault injection).
    """
    request.check(num_classes if num_classes is not None else int(records.labels.max()) + 1, settings)
    return _train_round(model, records, settings, request, after_charge).with_caps(settings)


def _train_round(model: nn.Module, records: LabeledImages, settings: HospitalSettings, request: RoundRequest,
                 after_charge: Callable[[], None] | None) -> RoundOutcome:
    if not request.private and not settings.allow_non_private:
        return RoundOutcome(settings.name, REFUSED,
                            f"non-private training refused: hospital {settings.name} requires DP-SGD",
                            budget_epsilon=settings.budget_epsilon, delta=settings.delta)
    started = time.perf_counter()
    ids = unit_records(records, settings)  # with unit=patient: one record per patient, below as well
    with open_ledger(settings) as ledger:
        needed = max(settings.min_records, request.batch_size)
        try:
            # One epoch is over the records still open, not over every record the hospital holds.
            prior, open_records, events = ledger.round_start(ids, budget=settings.budget_epsilon)
            if open_records < needed:
                raise BudgetExhausted(f"privacy budget exhausted: {open_records} of {len(ids)} records are still "
                                      f"open and a round needs at least {needed}")
            steps = request.local_epochs * steps_per_epoch(request.batch_size / open_records)
            sigma = (_noise_multiplier(ledger, settings, request, prior, open_records, steps, events)
                     if request.private else None)
            caps = hospital_caps(ledger, settings, request, events)
            if sigma is not None and request.spend_remaining:
                steps = min(steps, ledger.max_affordable_steps(ids, noise_multiplier=sigma,
                                                               batch_size=request.batch_size,
                                                               max_epsilon=request.max_epsilon,
                                                               budget=settings.budget_epsilon))
                if caps is not None and steps > 0:
                    rate, most = request.batch_size / open_records, steps
                    steps = largest_fitting(lambda n: n <= most and caps(PrivacyEvent(sigma, rate, n)) is None)
                if steps == 0:
                    raise BudgetExhausted("privacy budget exhausted for this request: no further step fits")
            charge = ledger.charge(ids, noise_multiplier=sigma, batch_size=request.batch_size, steps=steps,
                                   run_id=request.run_id, round=request.server_round, hospital=settings.name,
                                   max_epsilon=request.max_epsilon, min_records=needed,
                                   budget=settings.budget_epsilon, limit=caps)
        except BudgetExhausted as refusal:
            return _refused(ledger, settings, ids, str(refusal), started)
        ledger_seconds = time.perf_counter() - started
        groups = None
        if settings.unit == "patient":
            # A patient the ledger left out is left out with every image of theirs; a chosen patient's
            # images all take part (and a new image of a known patient is charged to that patient).
            owner = records.patients()[1]
            chosen = records.subset(np.flatnonzero(charge.selected[owner]))
            groups = chosen.patient_ids
        else:
            chosen = records.subset(np.flatnonzero(charge.selected))
        if sigma is None:
            plan = PrivacyPlan.non_private(steps=steps, sample_rate=charge.sample_rate,
                                           max_physical_batch_size=request.max_physical_batch_size)
        else:
            plan = PrivacyPlan(steps, charge.sample_rate, sigma, request.max_grad_norm, settings.accountant,
                               request.max_physical_batch_size)
        # The charge is committed: if training crashes now, the ledger keeps it (fail closed).
        if after_charge is not None:
            after_charge()
        training_started = time.perf_counter()
        result = train_local(model, chosen.as_dataset(), plan, lr=request.round_lr(), momentum=request.momentum,
                             logit_shift=request.logit_shift, seed=private_round_seed(settings, request),
                             device=settings.device, groups=groups,
                             max_images_per_group=settings.max_images_per_patient)
        train_seconds = time.perf_counter() - training_started
        started = time.perf_counter()
        status = ledger.confirm(charge, steps_done=result.steps, status_of=ids, budget=settings.budget_epsilon)
        message = ("trained with DP-SGD" if sigma is not None
                   else "trained WITHOUT differential privacy: these records' epsilon is now infinity")
        outcome = RoundOutcome(settings.name, TRAINED, message, result.state_dict, charge.num_records,
                               result.steps, math.nan if sigma is None else sigma).with_status(status)
        outcome.ledger_seconds = ledger_seconds + time.perf_counter() - started
        outcome.train_seconds = train_seconds
        outcome.noise_seeded = sigma is not None and settings.noise_seed is not None
        outcome.device = settings.device
        return outcome


def private_round_seed(settings: HospitalSettings, request: RoundRequest) -> int:
    """The seed of a round's sampling and noise: never the server's `request.seed`.

    DP-SGD protects records only if no one who sees the update can also reproduce its noise (or
    which records were sampled). The server chooses `request.seed`, so a noise stream seeded from it
    could be regenerated and subtracted. By default the seed is 63 fresh bits from the operating
    system; with the hospital's own `noise_seed` (simulated experiments only) it is derived from that
    seed, the hospital's name, the run and the round, so hospitals and rounds still differ.
    """
    if settings.noise_seed is None:
        return secrets.randbits(63)
    material = f"{settings.noise_seed}|{settings.name}|{request.run_id}|{request.server_round}".encode()
    return int.from_bytes(hashlib.sha256(material).digest()[:8], "big") >> 1


def _noise_multiplier(ledger: PrivacyLedger, settings: HospitalSettings, request: RoundRequest,
                      prior: list[PrivacyEvent], open_records: int, steps: int,
                      events: list[LedgerEvent]) -> float:
    """The fixed sigma, or for "auto" the sigma fixed at this hospital's first round of the run.

    "auto" calibrates on `prior`, the history of the most-spent record still open, so that every
    open record fits the planned rounds; records with less history keep the difference for later.
    """
    if request.noise_multiplier is not None:
        return float(request.noise_multiplier)
    for event in events:  # the ledger's events, read once before the charge
        if event.run_id == request.run_id and event.hospital == settings.name and event.private:
            return event.noise_multiplier
    budget = min(ledger.budget_epsilon, settings.budget_epsilon)
    cap = budget if request.max_epsilon is None else min(budget, request.max_epsilon)
    sample_rate = request.batch_size / open_records
    remaining_rounds = max(1, request.num_rounds - request.server_round + 1)
    try:
        spent = epsilon(prior, ledger.delta, ledger.accountant)
        if cap - spent < 0.01 * cap:
            raise PrivacyError(f"epsilon {format_epsilon(spent, cap)} of {cap:g} is already spent")
        # The least noise that meets every target: the budget over the rounds left, and the
        # hospital's own caps on one round and on this run (no earlier events: sigma is fixed at
        # the hospital's first round of a run).
        targets = [(cap, steps * remaining_rounds, prior)]
        if settings.max_epsilon_per_round is not None:
            targets.append((settings.max_epsilon_per_round, steps, []))
        if settings.max_epsilon_per_run is not None:
            targets.append((settings.max_epsilon_per_run, steps * remaining_rounds, []))
        return max(noise_multiplier_for(target_epsilon=target, delta=ledger.delta, sample_rate=sample_rate,
                                        steps=planned, accountant=ledger.accountant, prior_events=history)
                   for target, planned, history in targets)
    except PrivacyError as error:
        raise BudgetExhausted(f"privacy budget exhausted for this request: {error}") from error


def hospital_caps(ledger: PrivacyLedger, settings: HospitalSettings, request: RoundRequest,
                  events: list[LedgerEvent]) -> Callable[[PrivacyEvent], str | None] | None:
    """The check of a round's final event against the hospital's per-round and per-run caps.

    Returns the reason a round breaks a cap (nothing is then charged), or None. The run's earlier
    events at this hospital are read once, before the charge (`events`: as just read from the
    ledger).
    """
    per_round, per_run = settings.max_epsilon_per_round, settings.max_epsilon_per_run
    if per_round is None and per_run is None:
        return None
    this_run = [e.event() for e in events
                if e.run_id == request.run_id and e.hospital == settings.name and e.steps > 0]

    def check(event: PrivacyEvent) -> str | None:
        if per_round is not None:
            value = _cost([event], ledger)
            if value > per_round:
                return (f"privacy budget exhausted for this request: this round alone would cost epsilon "
                        f"{format_epsilon(value, per_round)}, over hospital {settings.name}'s per-round cap of {per_round:g}")
        if per_run is not None:
            value = _cost([*this_run, event], ledger)
            if value > per_run:
                return (f"privacy budget exhausted for this request: run {request.run_id} would cost epsilon "
                        f"{format_epsilon(value, per_run)} at hospital {settings.name}, over its per-run cap of {per_run:g}")
        return None

    return check


def _cost(events: list[PrivacyEvent], ledger: PrivacyLedger) -> float:
    """Epsilon of `events` alone with the ledger's accountant; an accountant failure fails closed."""
    try:
        return epsilon(events, ledger.delta, ledger.accountant)
    except PrivacyError:
        return math.inf


def _refused(ledger: PrivacyLedger, settings: HospitalSettings, ids: np.ndarray, message: str,
             started: float) -> RoundOutcome:
    # The full reason (ledger path) stays in the hospital's own log; the server is told the figures.
    log.warning("hospital %s refused to train: %s", settings.name, message)
    budget = ledger.status(ids, budget=settings.budget_epsilon)
    if budget.locked:
        told = (f"privacy budget exhausted: every record is exhausted (largest epsilon "
                f"{format_epsilon(budget.epsilon_spent, budget.budget_epsilon)} "
                f"of budget {budget.budget_epsilon:g}, delta {budget.delta:g}); dataset locked")
    else:
        told = (f"request refused, nothing charged: {message.split(': ', 1)[-1]}" if "for this request" in message
                else message)
    outcome = RoundOutcome(settings.name, LOCKED if budget.locked else REFUSED, told).with_status(budget)
    outcome.ledger_seconds = time.perf_counter() - started
    return outcome
