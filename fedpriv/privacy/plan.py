"""A privacy plan: exactly what one hospital's local DP-SGD will do, decided before it starts.

A plan fixes the noise multiplier, clipping bound, Poisson sample rate and number of steps, so the
privacy it will cost is known (and can be charged to the ledger) before any gradient is computed.
Non-private plans exist only through :meth:`PrivacyPlan.non_private`, and are always reported as
epsilon = infinity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from fedpriv.errors import PrivacyError
from fedpriv.privacy.accounting import (
    PrivacyEvent,
    check_accountant,
    noise_multiplier_for,
)

# How Opacus computes per-sample gradients. "auto" lets train_local pick the fastest correct mode
# measured for the model being trained (fedpriv.models.GRAD_SAMPLE_MODE_BY_MODEL); the others are
# Opacus's own modes: "hooks" (its default), "functorch", "ew" (expanded weights) and "ghost"
# (ghost / fast gradient clipping: per-sample norms, then a second, reweighted backward pass).
# The mode changes how clipping is computed, never what is clipped or the noise: privacy is the same.
GRAD_SAMPLE_MODES = ("auto", "hooks", "functorch", "ew", "ghost")


@dataclass(frozen=True)
class PrivacyPlan:
    """What one local training call does. Build it with :func:`plan_local_training` or the constructors."""

    steps: int
    sample_rate: float  # Poisson sampling probability per record and step (expected batch / records)
    noise_multiplier: float | None  # None only for a non-private plan
    max_grad_norm: float | None
    accountant: str = "prv"
    max_physical_batch_size: int = 128
    grad_sample_mode: str = "auto"

    def __post_init__(self) -> None:
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise PrivacyError(f"unknown grad_sample_mode {self.grad_sample_mode!r}; "
                               f"known: {', '.join(GRAD_SAMPLE_MODES)}")
        if self.steps < 1:
            raise PrivacyError(f"a plan needs at least one step, got {self.steps}")
        if not 0 < self.sample_rate <= 1:
            raise PrivacyError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.private:
            if self.max_grad_norm is None or not self.max_grad_norm > 0:
                raise PrivacyError(f"a private plan needs max_grad_norm > 0, got {self.max_grad_norm}")
            if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
                raise PrivacyError(f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}")
            check_accountant(self.accountant)
        if self.max_physical_batch_size < 1:
            raise PrivacyError("max_physical_batch_size must be at least 1")

    @property
    def private(self) -> bool:
        return self.noise_multiplier is not None

    @classmethod
    def non_private(cls, *, steps: int, sample_rate: float, max_physical_batch_size: int = 128) -> PrivacyPlan:
        """A plan without clipping or noise. Explicitly NOT private: epsilon = infinity."""
        return cls(steps, sample_rate, None, None, max_physical_batch_size=max_physical_batch_size)

    def event(self) -> PrivacyEvent | None:
        """The privacy event this plan consumes when run to the end (None if non-private)."""
        if not self.private:
            return None
        return PrivacyEvent(self.noise_multiplier, self.sample_rate, self.steps)

    def expected_batch_size(self, num_records: int) -> int:
        return max(1, round(self.sample_rate * num_records))


def steps_per_epoch(sample_rate: float) -> int:
    """With Poisson sampling, one epoch is 1/q steps in expectation."""
    return max(1, math.ceil(1 / sample_rate))


def plan_local_training(
    *,
    num_records: int,
    batch_size: int,
    local_epochs: int,
    private: bool,
    target_epsilon: float | None = None,
    delta: float | None = None,
    max_grad_norm: float | None = None,
    noise_multiplier: float | None = None,
    planned_rounds: int = 1,
    prior_events: Sequence[PrivacyEvent] = (),
    accountant: str = "prv",
    max_physical_batch_size: int = 128,
    grad_sample_mode: str = "auto",
) -> PrivacyPlan:
    """The plan for one round of local training at a hospital with `num_records` records.

    With `noise_multiplier=None` ("auto") sigma is calibrated so that `planned_rounds` rounds like
    this one, on top of `prior_events`, spend exactly `target_epsilon` at `delta`.
    """
    if batch_size > num_records:
        raise PrivacyError(f"batch size {batch_size} exceeds the {num_records} records")
    sample_rate = batch_size / num_records
    steps = local_epochs * steps_per_epoch(sample_rate)
    if not private:
        return PrivacyPlan.non_private(steps=steps, sample_rate=sample_rate,
                                       max_physical_batch_size=max_physical_batch_size)
    if noise_multiplier is None:
        if target_epsilon is None or delta is None:
            raise PrivacyError("calibrating sigma ('auto') needs a target epsilon and delta")
        noise_multiplier = noise_multiplier_for(
            target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate,
            steps=steps * planned_rounds, accountant=accountant, prior_events=prior_events,
        )
    return PrivacyPlan(steps, sample_rate, float(noise_multiplier), max_grad_norm, accountant,
                       max_physical_batch_size, grad_sample_mode)
