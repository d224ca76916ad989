"""One hospital's side of a round, without Flower: its own settings, its ledger, its training.

The hospital is sovereign. Its budget, delta, ledger and data come from its own settings
(:class:`HospitalSettings`); the server's request (:class:`RoundRequest`) says how to train and may
ask the hospital to spend *less*, never more. Every private round is charged to the ledger before
the first step and confirmed afterwards; a round the budget cannot afford is refused without
touching the data, and the dataset is locked.
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

import torch
from torch import nn
from torch.utils.data import Dataset

from fedpriv.errors import BudgetExhausted, ConfigError, PrivacyError
from fedpriv.privacy.accounting import (
    PrivacyEvent,
    check_accountant,
    noise_multiplier_for,
)
from fedpriv.privacy.ledger import BudgetStatus, PrivacyLedger
from fedpriv.privacy.plan import PrivacyPlan, steps_per_epoch
from fedpriv.training import train_local

log = logging.getLogger(__name__)

TRAINED, LOCKED, REFUSED = "trained", "locked", "refused"

# With "auto" sigma, a budget with less than this fraction left counts as spent (see _noise_multiplier).
SPENT_FRACTION = 0.01


@dataclass(frozen=True)
class HospitalSettings:
    """A hospital's own settings. In deployment they come from its node config, never the server."""

    name: str
    budget_epsilon: float | None  # None: no DP budget at all (explicitly non-private simulations)
    delta: float
    ledger_path: Path | None
    accountant: str = "prv"
    allow_non_private: bool = False  # a hospital with a budget refuses non-private rounds unless set
    # Where a private round's randomness (Poisson sampling and the Gaussian noise) comes from. None:
    # fresh entropy from the operating system every round, known to nobody, so the noise cannot be
    # regenerated and subtracted. An integer makes simulated experiments repeatable, and whoever
    # knows it can regenerate the noise: never set it where DP must hold against that party.
    noise_seed: int | None = None

    def __post_init__(self) -> None:
        check_accountant(self.accountant)
        if self.budget_epsilon is not None and self.ledger_path is None:
            raise PrivacyError(f"hospital {self.name}: a privacy budget needs a ledger path")


@dataclass(frozen=True)
class RoundRequest:
    """How the server asks a hospital to train one round (carried in the message's ConfigRecord)."""

    run_id: str
    server_round: int
    num_rounds: int  # planned rounds of this run: "auto" sigma spreads the budget over them
    local_epochs: int = 1
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.0
    private: bool = True
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None  # None: "auto", calibrated by the hospital
    max_epsilon: float | None = None  # a server-side cap; it can only lower the hospital's budget
    spend_remaining: bool = False  # train only the steps that still fit, then lock
    max_physical_batch_size: int = 128
    seed: int = 0
    logit_shift: tuple[float, ...] = ()  # added to the logits in the training loss (logit adjustment)
    lr_final: float = 1.0  # the learning rate falls linearly over the planned rounds to lr * lr_final

    def check(self, num_classes: int) -> None:
        """Refuse a request this hospital cannot train, BEFORE its ledger is charged.

        The server is not trusted: a request that would only fail inside the optimizer (a negative
        learning rate, a logit shift for other classes) would otherwise cost budget for nothing.
        """
        problems = [(key, value, rule) for key, value, ok, rule in [
            ("train.lr", self.lr, math.isfinite(self.lr) and self.lr > 0, "must be above 0"),
            ("train.lr_final", self.lr_final, 0 < self.lr_final <= 1, "must be in (0, 1]"),
            ("train.momentum", self.momentum, 0 <= self.momentum < 1, "must be in [0, 1)"),
            ("train.batch_size", self.batch_size, self.batch_size >= 1, "must be at least 1"),
            ("train.local_epochs", self.local_epochs, self.local_epochs >= 1, "must be at least 1"),
            ("dataset.class_prior", list(self.logit_shift),
             not self.logit_shift or (len(self.logit_shift) == num_classes
                                      and all(math.isfinite(v) for v in self.logit_shift)),
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


@dataclass
class RoundOutcome:
    """What a hospital reports after a round: weights (if it trained) and its privacy state."""

    hospital: str
    status: str  # TRAINED, LOCKED (budget spent) or REFUSED (e.g. non-private request)
    message: str
    state_dict: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    num_examples: int = 0
    train_loss: float = math.nan
    steps: int = 0
    noise_multiplier: float = math.nan
    epsilon: float = 0.0
    delta: float = 0.0
    budget_epsilon: float = math.inf
    locked: bool = False
    ledger_seconds: float = 0.0  # time spent on the budget check and ledger writes
    train_seconds: float = 0.0  # time spent in local training itself

    def metrics(self) -> dict[str, float | int]:
        """Scalar metrics for the reply's MetricRecord (epsilon = inf when not private)."""
        return {
            "num-examples": self.num_examples, "train-loss": self.train_loss, "steps": self.steps,
            "noise-multiplier": self.noise_multiplier, "epsilon": self.epsilon, "delta": self.delta,
            "budget-epsilon": self.budget_epsilon,
            "remaining-epsilon": max(0.0, self.budget_epsilon - self.epsilon),
            "locked": int(self.locked), "trained": int(self.status == TRAINED),
            "ledger-seconds": self.ledger_seconds, "train-seconds": self.train_seconds,
        }

    def with_status(self, status: BudgetStatus) -> RoundOutcome:
        self.epsilon, self.delta = status.epsilon_spent, status.delta
        self.budget_epsilon, self.locked = status.budget_epsilon, status.locked
        return self


def open_ledger(settings: HospitalSettings, fingerprint: str) -> PrivacyLedger:
    assert settings.ledger_path is not None and settings.budget_epsilon is not None
    return PrivacyLedger.open(settings.ledger_path, fingerprint=fingerprint,
                              budget_epsilon=settings.budget_epsilon, delta=settings.delta,
                              accountant=settings.accountant)


def budget_state(settings: HospitalSettings, fingerprint: str) -> RoundOutcome:
    """The hospital's current privacy state, without training (for queries and evaluation)."""
    outcome = RoundOutcome(settings.name, "idle", "")
    if settings.budget_epsilon is None:
        outcome.epsilon, outcome.delta = (math.inf if settings.allow_non_private else 0.0), settings.delta
        return outcome
    with open_ledger(settings, fingerprint) as ledger:
        return outcome.with_status(ledger.status())


def train_round(
    model: nn.Module, data: Dataset, settings: HospitalSettings, request: RoundRequest, *, fingerprint: str,
    after_charge: Callable[[], None] | None = None,
) -> RoundOutcome:
    """Run one round of local training under the hospital's budget, or refuse it.

    `after_charge` runs once the charge is committed and before training (fault injection).
    """
    if not request.private:
        return _train_non_private(model, data, settings, request)
    if settings.budget_epsilon is None:
        return RoundOutcome(settings.name, REFUSED, "private training needs a budget and a ledger")
    started = time.perf_counter()
    with open_ledger(settings, fingerprint) as ledger:
        if ledger.locked:
            return _refused(ledger, settings, LOCKED, "dataset locked: privacy budget exhausted", started)
        sample_rate = request.batch_size / len(data)
        steps = request.local_epochs * steps_per_epoch(sample_rate)
        try:
            sigma = _noise_multiplier(ledger, request, sample_rate, steps)
            if request.spend_remaining:
                steps = min(steps, ledger.max_affordable_steps(sigma, sample_rate, max_epsilon=request.max_epsilon))
                if steps == 0:
                    ledger.lock("no further step fits in the budget")
                    return _refused(ledger, settings, LOCKED, "privacy budget exhausted", started)
            entry = ledger.charge(PrivacyEvent(sigma, sample_rate, steps), run_id=request.run_id,
                                  round=request.server_round, max_epsilon=request.max_epsilon)
        except BudgetExhausted as refusal:
            return _refused(ledger, settings, LOCKED if ledger.locked else REFUSED, str(refusal), started)
        ledger_seconds = time.perf_counter() - started
        plan = PrivacyPlan(steps, sample_rate, sigma, request.max_grad_norm, settings.accountant,
                           request.max_physical_batch_size)
        # The charge is committed: if training crashes now, the ledger keeps it (fail closed).
        if after_charge is not None:
            after_charge()
        training_started = time.perf_counter()
        result = train_local(model, data, plan, lr=request.round_lr(), momentum=request.momentum,
                             logit_shift=request.logit_shift, seed=private_round_seed(settings, request))
        train_seconds = time.perf_counter() - training_started
        started = time.perf_counter()
        ledger.confirm(entry, steps_done=result.steps)
        if request.spend_remaining and ledger.max_affordable_steps(sigma, sample_rate) == 0:
            ledger.lock("budget spent (spend_remaining)")
        outcome = RoundOutcome(settings.name, TRAINED, "trained with DP-SGD", result.state_dict, result.num_examples,
                               result.mean_loss, result.steps, sigma).with_status(ledger.status())
        outcome.ledger_seconds = ledger_seconds + time.perf_counter() - started
        outcome.train_seconds = train_seconds
        return outcome


def private_round_seed(settings: HospitalSettings, request: RoundRequest) -> int:
    """The seed of a private round's sampling and noise: never the server's `request.seed`.

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


def _noise_multiplier(ledger: PrivacyLedger, request: RoundRequest, sample_rate: float, steps: int) -> float:
    """The fixed sigma, or for "auto" the sigma fixed at this hospital's first round of the run."""
    if request.noise_multiplier is not None:
        return float(request.noise_multiplier)
    for entry in ledger.entries():
        if entry.run_id == request.run_id:
            return entry.noise_multiplier
    cap = ledger.budget_epsilon if request.max_epsilon is None else min(ledger.budget_epsilon, request.max_epsilon)
    remaining_rounds = max(1, request.num_rounds - request.server_round + 1)
    try:
        spent = ledger.status().epsilon_spent
        if cap - spent < SPENT_FRACTION * cap:
            # What is left is within the calibration's own tolerance: spending it would need absurd
            # noise (sigma in the tens) for no useful training, so the budget counts as spent.
            raise PrivacyError(f"epsilon {spent:.4g} of {cap:g} is already spent")
        return noise_multiplier_for(target_epsilon=cap, delta=ledger.delta, sample_rate=sample_rate,
                                    steps=steps * remaining_rounds, accountant=ledger.accountant,
                                    prior_events=ledger.events())
    except PrivacyError as error:
        if cap == ledger.budget_epsilon:  # the hospital's own budget is what ran out: lock for good
            ledger.lock(f"run {request.run_id} round {request.server_round}: {error}")
        raise BudgetExhausted(f"privacy budget exhausted: {error}") from error


def _refused(ledger: PrivacyLedger, settings: HospitalSettings, status: str, message: str, started: float) -> RoundOutcome:
    # The full reason (ledger path, data fingerprint) stays in the hospital's own log; the server
    # is told only the figures it is entitled to.
    log.warning("hospital %s refused to train: %s", settings.name, message)
    budget = ledger.status()
    told = (f"privacy budget exhausted: epsilon {budget.epsilon_spent:.4g} of budget {budget.budget_epsilon:g} "
            f"spent (delta {budget.delta:g})" + ("; dataset locked" if budget.locked else "; this request refused"))
    outcome = RoundOutcome(settings.name, status, told).with_status(budget)
    outcome.ledger_seconds = time.perf_counter() - started
    return outcome


def _train_non_private(model, data, settings: HospitalSettings, request: RoundRequest) -> RoundOutcome:
    if settings.budget_epsilon is not None and not settings.allow_non_private:
        return RoundOutcome(settings.name, REFUSED,
                            f"non-private training refused: hospital {settings.name} requires DP-SGD",
                            budget_epsilon=settings.budget_epsilon, delta=settings.delta)
    sample_rate = request.batch_size / len(data)
    plan = PrivacyPlan.non_private(steps=request.local_epochs * steps_per_epoch(sample_rate),
                                   sample_rate=sample_rate, max_physical_batch_size=request.max_physical_batch_size)
    started = time.perf_counter()
    result = train_local(model, data, plan, lr=request.round_lr(), momentum=request.momentum,
                         logit_shift=request.logit_shift, seed=request.seed + request.server_round)
    return RoundOutcome(settings.name, TRAINED, "trained WITHOUT differential privacy (epsilon = inf)",
                        result.state_dict, result.num_examples, result.mean_loss, result.steps,
                        epsilon=math.inf, delta=settings.delta, budget_epsilon=math.inf,
                        train_seconds=time.perf_counter() - started)
