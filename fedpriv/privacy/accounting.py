"""Privacy accounting as data: epsilon is a pure function of a history of DP-SGD events.

An event is one stretch of DP-SGD with a fixed noise multiplier and Poisson sample rate. Opacus's
accountants (PRV by default, RDP selectable) turn a whole history into (epsilon, delta); fedpriv
never adds epsilons by hand, so composition over rounds, runs and restarts is always exact for the
chosen accountant.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from fedpriv.errors import PrivacyError
from fedpriv.privacy.rdp import QUICK_ORDERS, rdp_epsilon

# Opacus is imported where it is used, not here: it takes ~1.4 s, and the processes that only read
# configs or ledgers' stored values (the CLI, the ServerApp) should not pay it.

ACCOUNTANTS = ("prv", "rdp")

# PRV is tight but slow when epsilon is huge (seconds to a minute past ~100), and such values are far
# past any budget: above this RDP bound (a valid, looser upper bound) is reported instead.
_PRV_SHORTCUT_EPSILON = 64.0

_MAX_USEFUL_SIGMA = 128.0

# PRV needs a non-trivial noise multiplier to build its discretisation domain; below this
# sigma the bound is astronomically large anyway, so report infinity instead of failing.
_MIN_ACCOUNTABLE_SIGMA = 0.3


@dataclass(frozen=True)
class PrivacyEvent:
    """`steps` DP-SGD steps with Gaussian noise `noise_multiplier` and Poisson rate `sample_rate`."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise PrivacyError(f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise PrivacyError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 0:
            raise PrivacyError(f"steps must be >= 0, got {self.steps}")

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def check_accountant(name: str) -> str:
    if name not in ACCOUNTANTS:
        raise PrivacyError(f"unknown accountant {name!r}; choose one of {', '.join(ACCOUNTANTS)}")
    return name


def merge_events(events: Iterable[PrivacyEvent]) -> list[PrivacyEvent]:
    """Merge consecutive events with the same (sigma, q); composition does not depend on order."""
    merged: dict[tuple[float, float], int] = {}
    for event in events:
        if event.steps:
            key = (event.noise_multiplier, event.sample_rate)
            merged[key] = merged.get(key, 0) + event.steps
    return [PrivacyEvent(sigma, q, steps) for (sigma, q), steps in merged.items()]


def epsilon(events: Sequence[PrivacyEvent], delta: float, accountant: str = "prv") -> float:
    """Epsilon of the composition of all `events` at `delta`, computed by an Opacus accountant.

    No events means nothing was spent: 0. A zero or tiny noise multiplier means infinity.
    """
    check_accountant(accountant)
    if not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta}")
    history = tuple(sorted((e.noise_multiplier, e.sample_rate, e.steps) for e in merge_events(events)))
    return _epsilon_of_history(history, float(delta), accountant)


@functools.lru_cache(maxsize=4096)
def _epsilon_of_history(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    """Memoised: a round asks for the same history's epsilon several times (charge, confirm, report).

    Pure in its arguments, so caching cannot change a result; `_epsilon_of_history.cache_clear()` resets it.
    """
    if not history:
        return 0.0
    if any(sigma < _MIN_ACCOUNTABLE_SIGMA for sigma, _, _ in history):
        return math.inf
    if accountant == "rdp":
        from opacus.accountants import RDPAccountant

        return rdp_epsilon(history, delta, tuple(RDPAccountant.DEFAULT_ALPHAS))
    # A cheap RDP bound over a few integer orders (valid, looser) spots the huge-epsilon histories
    # on which PRV would take seconds to minutes.
    upper = rdp_epsilon(history, delta, QUICK_ORDERS)
    if upper > _PRV_SHORTCUT_EPSILON:
        return upper
    return _opacus_epsilon(history, delta, accountant)


def _opacus_epsilon(history, delta: float, accountant: str, **kwargs) -> float:
    if accountant == "prv":
        from fedpriv.privacy.prv import prv_epsilon  # deferred: Opacus's PRV internals take ~1.4 s to import

        return prv_epsilon(tuple(history), delta, **kwargs)
    from opacus.accountants import create_accountant

    engine = create_accountant(mechanism=accountant)
    engine.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(engine.get_epsilon(delta=delta, **kwargs))


def noise_multiplier_for(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    prior_events: Sequence[PrivacyEvent] = (),
    tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier whose `steps` new steps keep the total within `target_epsilon`.

    `prior_events` are what the data already spent: the new steps must fit in what remains. The
    result spends at most `target_epsilon` and, unless sigma hits its floor, at least
    `target_epsilon - tolerance`, by the chosen accountant.
    """
    check_accountant(accountant)
    if steps <= 0:
        raise PrivacyError(f"a privacy plan needs at least one step, got {steps}")
    already = epsilon(prior_events, delta, accountant)
    if already >= target_epsilon:
        raise PrivacyError(f"the data already spent epsilon {already:.3f} of {target_epsilon}")
    prior = [(e.noise_multiplier, e.sample_rate, e.steps) for e in merge_events(prior_events)]

    def total(sigma: float) -> float:
        return epsilon([*prior_events, PrivacyEvent(sigma, sample_rate, steps)], delta, accountant)

    def quick_bound(sigma: float) -> float:
        return rdp_epsilon([*prior, (sigma, sample_rate, steps)], delta, QUICK_ORDERS)

    # 1. A bracket from a cheap RDP bound over a few integer orders. It is never below the
    #    accountant's epsilon (RDP over fewer orders is looser; PRV is tighter than RDP), so `high`,
    #    where that bound meets the target, certainly fits; `low` is just under it.
    high = 1.0
    while quick_bound(high) > target_epsilon:
        high *= 2
        if high > _MAX_USEFUL_SIGMA:
            raise PrivacyError(f"the {target_epsilon - already:.3g} epsilon left cannot pay for {steps} more steps")
    low = high / 2
    while quick_bound(low) <= target_epsilon and low > 1e-3:  # cheap narrowing from above
        high, low = low, low / 2
    while high / low > 1.001:  # then to where the loose bound is tight (~0.4 ms a call)
        middle = math.sqrt(low * high)
        if quick_bound(middle) <= target_epsilon:
            high = middle
        else:
            low = middle
    # 2. The accountant's own root finding. log(epsilon) is close to linear in log(sigma), so secant
    #    steps on that scale through the two latest evaluations, aimed a little under the target,
    #    land within the tolerance in a few accountant calls. `high` always fits; `low` comes from
    #    the loose bound, so the accountant may find that it fits too, until it is checked.
    aim = target_epsilon - tolerance / 2
    fits = total(high)
    low_checked = False
    latest = [(high, fits)]
    while target_epsilon - fits > tolerance and (high - low > 1e-3 or not low_checked):
        if len(latest) == 1:  # one point only: use the slope of the cheap RDP bound there
            slope = (math.log(quick_bound(high * 0.97)) - math.log(quick_bound(high))) / math.log(0.97)
        else:
            (s1, e1), (s2, e2) = latest[-2:]
            slope = (math.log(e1) - math.log(e2)) / (math.log(s1) - math.log(s2)) if e1 > 0 and e2 > 0 else 0.0
        sigma, value = latest[-1]
        guess = math.exp(math.log(sigma) + (math.log(aim) - math.log(value)) / slope) if slope < 0 and value > 0 else 0
        if len(latest) > 8:  # secant steps that stall (they should not) give way to bisection
            guess = 0
        if low < guess < high or (not low_checked and 1e-3 < guess < high):
            middle = guess
        else:  # a step out of the bracket: bisect, or first check the unchecked lower end
            middle = (low + high) / 2 if low_checked else low
        value = total(middle)
        latest.append((middle, value))
        if value > target_epsilon:
            low, low_checked = middle, True
        else:
            high, fits = middle, value
            if high <= low:
                low = high / 2
    if fits > target_epsilon:  # cannot happen for a valid bracket; never return an overspend
        raise PrivacyError(f"calibration failed to fit {steps} steps in epsilon {target_epsilon}")
    return high
