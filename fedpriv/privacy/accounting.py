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

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.analysis.prv import DiscretePRV, PoissonSubsampledGaussianPRV
from opacus.accountants.analysis.prv.compose import _compose_convolution_tree
from opacus.accountants.analysis.prv.domain import Domain
from scipy import integrate
from scipy.fft import irfft, next_fast_len, rfft

from fedpriv.errors import PrivacyError

ACCOUNTANTS = ("prv", "rdp")

# PRV is tight but slow when epsilon is huge (seconds to a minute past ~100), and such values are far
# past any budget: above this RDP bound (a valid, looser upper bound) is reported instead.
_PRV_SHORTCUT_EPSILON = 64.0

_MAX_USEFUL_SIGMA = 128.0
_QUICK_RDP_ORDERS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)

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
        return _rdp_epsilon(history, delta, tuple(RDPAccountant.DEFAULT_ALPHAS))
    # A cheap RDP bound over a few integer orders (valid, looser) spots the huge-epsilon histories
    # on which PRV would take seconds to minutes.
    upper = _rdp_epsilon(history, delta, _QUICK_RDP_ORDERS)
    if upper > _PRV_SHORTCUT_EPSILON:
        return upper
    return _opacus_epsilon(history, delta, accountant)


def _rdp_epsilon(history, delta: float, orders: tuple[float, ...]) -> float:
    """What Opacus's RDPAccountant computes for `history`, with each (sigma, q)'s RDP curve cached.

    RDP composes by addition and is linear in the number of steps, so a history's curve is the sum
    of steps x the one-step curve of each (sigma, q). A ledger's events mostly share one (sigma, q)
    per run, so the expensive part (Opacus's per-order series) runs once per run, not per charge.
    """
    curve = sum(steps * _one_step_rdp(sample_rate, sigma, orders) for sigma, sample_rate, steps in history)
    with warnings.catch_warnings():
        # RDP's "optimal order is the largest alpha" only means the bound could be tighter.
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=curve, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=4096)
def _one_step_rdp(sample_rate: float, sigma: float, orders: tuple[float, ...]) -> np.ndarray:
    curve = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=1, orders=list(orders))
    curve.setflags(write=False)  # shared by the cache: nobody may change it in place
    return curve


class _CachedDomainPRVAccountant(PRVAccountant):
    """Opacus's PRV accountant (Gopi et al. 2021), computed the same way, only faster.

    Opacus sizes the PRV domain with an RDP accountant (remark 5.6 of Gopi et al., in
    `compute_safe_domain_size`), and that RDP computation is ~80% of a PRV call. Here the same
    bound is computed from the cached one-step RDP curves (`_one_step_rdp`), so a ledger whose
    (sigma, q) repeat every round pays it once.

    The composition is one FFT over the domain's grid, and the grid's size falls where it may:
    often a number with a large prime factor (e.g. 180,798 = 2 x 3 x 30,133), on which the FFT is
    ~10x slower than on a nearby product of small primes. The grid is therefore widened, by whole
    mesh steps on both sides, to the next such size. A wider domain truncates less of the privacy
    loss distribution, so the bound stays valid (Gopi et al. need the domain at least this wide),
    and epsilon matches Opacus's to ~1e-8 relative (tests/test_accounting.py checks it).

    Discretisation and composition follow Opacus's `discretize` and `_compose_fourier` step by step,
    with three savings that change results only at floating-point level: the CDF is evaluated once
    per grid edge instead of twice, the integrals behind the truncated mean are cached per (sigma, q)
    and interval (a ledger evaluates one (sigma, q) every round), and the n-fold power of the
    spectrum is taken by repeated squaring.
    """

    def _get_dprv(self, eps_error, delta_error):
        prvs = [PoissonSubsampledGaussianPRV(sample_rate, sigma) for sigma, sample_rate, _ in self.history]
        counts = [steps for _, _, steps in self.history]
        domain = self._get_domain(prvs=prvs, num_self_compositions=counts, eps_error=eps_error,
                                  delta_error=delta_error)
        return _compose_convolution_tree([_self_compose(_discretize(prv, domain), n) for prv, n in zip(prvs, counts)])

    def _get_domain(self, prvs, num_self_compositions, eps_error, delta_error):
        total = sum(num_self_compositions)
        alphas = tuple(RDPAccountant.DEFAULT_ALPHAS)
        history = [(prv.noise_multiplier, prv.sample_rate, steps) for prv, steps in zip(prvs, num_self_compositions)]
        bound = _rdp_epsilon(history, delta_error / 4, alphas)
        for prv in prvs:
            bound = max(bound, _rdp_epsilon([(prv.noise_multiplier, prv.sample_rate, 1)],
                                            delta_error / (8 * total), alphas))
        half_width = max(bound, eps_error) + 3
        mesh_size = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
        domain = Domain.create_aligned(-half_width, half_width, mesh_size)
        size = _fast_even_length(domain.size)
        extra, dt = size - domain.size, domain.dt
        return Domain(domain.t_min - (extra // 2) * dt, domain.t_max + (extra - extra // 2) * dt, size)


def _discretize(prv: PoissonSubsampledGaussianPRV, domain: Domain) -> DiscretePRV:
    """Opacus's `discretize` of `prv` truncated to the domain: mass per grid cell, mean-corrected."""
    t_min, t_max = domain.t_min, domain.t_max
    cdf_min = float(prv.cdf(t_min))
    mass = float(prv.cdf(t_max)) - cdf_min
    ts = domain.ts
    # The cell edges; the first lies below t_min (truncated CDF 0), the last above t_max (1).
    inner = ts[1:] - domain.dt / 2
    truncated_cdf = np.concatenate([[0.0], (prv.cdf(inner) - cdf_min) / mass, [1.0]])
    pmf = np.diff(truncated_cdf)
    mean_shift = _truncated_mean(prv, t_min, t_max, cdf_min, mass) - np.dot(ts, pmf)
    if np.abs(mean_shift) >= domain.dt / 2:
        raise RuntimeError("Discrete mean differs significantly from continuous mean.")
    return DiscretePRV(pmf=pmf, domain=domain.shift_right(mean_shift))


def _truncated_mean(prv: PoissonSubsampledGaussianPRV, t_min: float, t_max: float, cdf_min: float,
                    mass: float) -> float:
    """Mean of the truncated PRV, integrated over Opacus's own sub-intervals (integration by parts)."""
    lower, upper = int(np.log10(np.abs(t_min))), int(np.log10(t_max))
    points = np.concatenate([[t_min], -np.logspace(lower, -5, num=10), [0], np.logspace(-5, upper, num=10),
                             [t_max]])

    def truncated_cdf(t: float) -> float:
        return 0.0 if t < t_min else (float(prv.cdf(t)) - cdf_min) / mass if t < t_max else 1.0

    mean = 0.0
    for left, right in zip(points[:-1], points[1:]):
        integral = _cdf_integral(prv.sample_rate, prv.noise_multiplier, float(left), float(right))
        integral = (integral - (right - left) * cdf_min) / mass
        mean += right * truncated_cdf(right) - left * truncated_cdf(left) - integral
    return mean


@functools.lru_cache(maxsize=8192)
def _cdf_integral(sample_rate: float, sigma: float, left: float, right: float) -> float:
    value, _ = integrate.quad(PoissonSubsampledGaussianPRV(sample_rate, sigma).cdf, left, right, limit=500)
    return value


def _self_compose(dprv: DiscretePRV, count: int) -> DiscretePRV:
    """Opacus's `_compose_fourier`: the `count`-fold composition of `dprv` with itself, by FFT."""
    if len(dprv) % 2 != 0:
        raise ValueError("Can only compose evenly sized discrete PRVs")
    spectrum, power = rfft(dprv.pmf), None
    base, exponent = spectrum, count
    while exponent:  # repeated squaring: ~2 log2(count) products instead of a complex power
        if exponent & 1:
            power = base if power is None else power * base
        exponent >>= 1
        if exponent:
            base = base * base
    composed = irfft(power, len(dprv.pmf))
    shift = count - 1 + (len(composed) // 2 if count % 2 == 0 else 0)
    domain = dprv.domain.shift_right(dprv.domain.shifts * (count - 1))
    return DiscretePRV(pmf=np.roll(composed, shift), domain=domain)


def _fast_even_length(n: int) -> int:
    """The smallest even n' >= n whose prime factors are all small (fast for the FFT)."""
    size = next_fast_len(n, real=True)
    while size % 2:
        size = next_fast_len(size + 1, real=True)
    return size


def _opacus_epsilon(history, delta: float, accountant: str, **kwargs) -> float:
    engine = _CachedDomainPRVAccountant() if accountant == "prv" else create_accountant(mechanism=accountant)
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
        return _rdp_epsilon([*prior, (sigma, sample_rate, steps)], delta, _QUICK_RDP_ORDERS)

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
