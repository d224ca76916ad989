"""Opacus's PRV accountant (Gopi et al. 2021), computed so that a ledger's rounds reuse each other's work.

Used by :mod:`fedpriv.privacy.accounting` for every PRV epsilon; kept in a module of its own because
it builds on Opacus's internals, which take ~1.4 s to import.

A PRV epsilon discretises each (sigma, q) of a history on a grid, composes them in Fourier space
and reads epsilon off the result (Opacus's `PRVAccountant.get_epsilon`, step by step). Opacus
derives the grid from the exact history, so every new round changes the grid and everything is
computed again. A ledger asks for the epsilon of one history plus one more round, every round, for
every group of records; here the grid is chosen from the history rounded *up*:

- the mesh is Opacus's for the total step count rounded up to a power of sqrt(2), so it is at most
  as coarse as Opacus's (Gopi et al.'s error bound needs it at most this coarse; finer is safe);
- the half-width is Opacus's safe domain size (remark 5.6 of Gopi et al., computed from the same
  RDP bound, with the single-step term taken at the rounded-up step count) rounded up to a multiple
  of 1/2, then widened to an FFT-friendly length: at least as wide as Opacus's (wider truncates
  less).

So the grid stays the same for many rounds, and what depends only on (sigma, q, grid) is cached:
the discretised PRV's spectrum, and its n-fold powers (a later round's power is the last one
times the spectrum to the difference). A round then costs, per group of records, a product of
cached spectra, one inverse FFT and Opacus's own epsilon search. Epsilon is Opacus's upper bound
(estimate + eps_error) on a grid that satisfies the same conditions; it differs from Opacus's
figure on Opacus's own grid by far less than eps_error (tests/test_accounting.py bounds it; the
ledger tests recompute every record's epsilon with Google's dp_accounting).

The caches hold at most `FEDPRIV_PRV_CACHE_MB` (default 1024) MiB of spectra per process: a hospital
of 100,000 records whose records changed 10 times in 200 rounds needs about 700 MiB; one of the
default federation's hospitals a few MiB.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
import warnings
from collections import OrderedDict

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.prv import DiscretePRV, PoissonSubsampledGaussianPRV
from opacus.accountants.analysis.prv.domain import Domain
from scipy import integrate
from scipy.fft import irfft, next_fast_len, rfft

from fedpriv.errors import PrivacyError
from fedpriv.privacy.rdp import QUICK_ORDERS, rdp_epsilon

EPS_ERROR = 0.01  # Opacus's default: the reported epsilon is the estimate plus this


def prv_epsilon(history: tuple[tuple[float, float, int], ...], delta: float, eps_error: float = EPS_ERROR,
                delta_error: float | None = None) -> float:
    """Opacus's PRV upper bound on epsilon for ``history`` ((sigma, q, steps), ...) at ``delta``."""
    delta_error = delta / 1000 if delta_error is None else delta_error
    history = tuple((float(s), float(q), int(n)) for s, q, n in history if n > 0)
    if not history:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # RDP's "optimal order is the largest alpha"
        # Half a valid RDP bound at this delta (PRV is tighter, but not by half) starts the search.
        guess = 0.5 * rdp_epsilon(history, delta, QUICK_ORDERS)
        return upper_epsilon(compose(history, eps_error, delta_error), delta, delta_error, eps_error, guess)


def upper_epsilon(dprv: DiscretePRV, delta: float, delta_error: float, eps_error: float,
                  above: float = 0.0) -> float:
    """Opacus's `DiscretePRV.compute_epsilon(...)[2]`, over the top of the grid where it can be.

    Opacus computes tail sums of the pmf over the whole grid and takes the first point where the
    privacy profile falls to delta - delta_error. Tail sums from a point depend only on the grid
    beyond it, so when that point lies above ``above`` (a guess under the answer; 0 is under every
    history worth accounting), the same sums over the grid from there give the same answer, bit for
    bit, for a fraction of the cost. A guess that was too high is retried from 0, then over the
    whole grid, as Opacus does.
    """
    domain, pmf = dprv.domain, dprv.pmf
    target = delta - delta_error
    if np.finfo(np.longdouble).eps * domain.size <= target:
        step = (domain.t_max - domain.t_min) / (domain.size - 1)  # np.linspace's own step
        for lowest in dict.fromkeys((max(above, 0.0), 0.0)):
            start = max(0, math.ceil((lowest - domain.t_min) / step))
            if not 0 < start < domain.size - 1:
                continue
            t = np.arange(start, domain.size) * step + domain.t_min  # = domain.ts[start:], as linspace makes it
            t[-1] = domain.t_max
            p = pmf[start:]
            d1 = np.flip(np.flip(p).cumsum())
            d2 = np.flip(np.flip(p * np.exp(-t)).cumsum())
            ndelta = np.exp(t) * d2 - d1
            i = int(np.searchsorted(ndelta, -target, side="left"))
            if 0 < i < len(t):
                return float(np.log((d1[i] - target) / d2[i]) + eps_error)
    return float(dprv.compute_epsilon(delta, delta_error, eps_error)[2])


def compose(history: tuple[tuple[float, float, int], ...], eps_error: float, delta_error: float) -> DiscretePRV:
    """The discrete PRV of the whole ``history`` on its rounded-up grid (see the module's docstring)."""
    grid = ledger_grid(history, eps_error, delta_error)
    domain = _domain(*grid)
    product, total, shift = None, 0, 0.0
    for sigma, sample_rate, steps in history:
        power = _power(sigma, sample_rate, grid, steps)
        product = power if product is None else product * power
        total += steps
        shift += steps * _spectrum(sigma, sample_rate, grid)[1]
    pmf = irfft(product, domain.size)
    # Index k of the composed pmf is the sum of the factors' indices (mod size); this roll puts it
    # back on the grid (Opacus's `_compose_fourier` does the same for one (sigma, q)).
    roll = total - 1 + (domain.size // 2 if total % 2 == 0 else 0)
    return DiscretePRV(pmf=np.roll(pmf, roll), domain=domain.shift_right(shift))


def ledger_grid(history, eps_error: float, delta_error: float) -> tuple[float, int, float, float]:
    """(half-width, step count) rounded up, with the errors: what the grid is built from."""
    total = sum(steps for _, _, steps in history)
    rounded_total = max(1, math.ceil(2 ** (math.ceil(2 * math.log2(total)) / 2))) if total > 1 else 1
    bound = rdp_epsilon(history, delta_error / 4, _ALPHAS)
    for sigma, sample_rate, _ in history:
        bound = max(bound, _one_step_bound(sigma, sample_rate, delta_error / (8 * rounded_total)))
    half_width = math.ceil(2 * (max(bound, eps_error) + 3)) / 2
    return half_width, rounded_total, eps_error, delta_error


_ALPHAS = tuple(RDPAccountant.DEFAULT_ALPHAS)


@functools.lru_cache(maxsize=4096)
def _one_step_bound(sigma: float, sample_rate: float, delta: float) -> float:
    return rdp_epsilon([(sigma, sample_rate, 1)], delta, _ALPHAS)


@functools.lru_cache(maxsize=64)
def _domain(half_width: float, total: int, eps_error: float, delta_error: float) -> Domain:
    """Opacus's aligned grid for this half-width and step count, widened to an FFT-friendly size.

    Widened by whole mesh steps on both sides, so the grid keeps its alignment (t_min = -(n/2 - 1) dt)
    and truncates less: an FFT of a size with a large prime factor is ~10x slower.
    """
    mesh_size = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
    domain = Domain.create_aligned(-half_width, half_width, mesh_size)
    size = _fast_even_length(domain.size)
    extra, dt = size - domain.size, domain.dt
    return Domain(domain.t_min - (extra // 2) * dt, domain.t_max + (extra - extra // 2) * dt, size)


class _SpectrumCache:
    """Cached spectra and powers (numpy arrays), bounded by their total size in bytes.

    When full, the least recently used *power* goes first: a power is recomputed from its spectrum
    by a few products, while a spectrum needs the PRV discretised again (the expensive part).
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.items: OrderedDict[tuple, tuple] = OrderedDict()
        self.size = 0
        self.lock = threading.Lock()

    def get(self, key: tuple):
        with self.lock:
            value = self.items.get(key)
            if value is not None:
                self.items.move_to_end(key)
            return value

    def put(self, key: tuple, value: tuple) -> None:
        with self.lock:
            if key in self.items:
                return
            self.items[key] = value
            self.size += _nbytes(value)
            while self.size > self.limit and len(self.items) > 1:
                victim = next((k for k in self.items if k[0] == "power"), None) or next(iter(self.items))
                if victim == key:
                    break
                self.size -= _nbytes(self.items.pop(victim))

    def pop(self, key: tuple) -> None:
        with self.lock:
            value = self.items.pop(key, None)
            if value is not None:
                self.size -= _nbytes(value)

    def largest_power_below(self, sigma: float, sample_rate: float, grid: tuple, steps: int):
        """The cached (count, power) of this (sigma, q, grid) with the largest count <= ``steps``."""
        with self.lock:
            best = None
            for key, value in self.items.items():
                if (key[0] == "power" and key[1:4] == (sigma, sample_rate, grid) and key[4] <= steps
                        and (best is None or key[4] > best[0])):
                    best = (key[4], value[0])
            return best

    def clear(self) -> None:
        with self.lock:
            self.items.clear()
            self.size = 0


def _nbytes(value: tuple) -> int:
    return sum(v.nbytes for v in value if isinstance(v, np.ndarray))


def _cache_limit() -> int:
    text = os.environ.get("FEDPRIV_PRV_CACHE_MB", "1024")
    try:
        megabytes = float(text)
    except ValueError:
        megabytes = math.nan
    if not (math.isfinite(megabytes) and megabytes >= 0):
        raise PrivacyError(f"FEDPRIV_PRV_CACHE_MB={text!r} is not a size in MiB; set it to a number such as "
                           "1024 (smaller caches less and recomputes more), or unset it")
    return int(megabytes * 2**20)


CACHE = _SpectrumCache(_cache_limit())


def _spectrum(sigma: float, sample_rate: float, grid: tuple) -> tuple[np.ndarray, float]:
    """(the spectrum of the discretised PRV of one step, its mean-correction shift), cached."""
    key = ("spectrum", sigma, sample_rate, grid)
    cached = CACHE.get(key)
    if cached is None:
        dprv = _discretize(PoissonSubsampledGaussianPRV(sample_rate, sigma), _domain(*grid))
        spectrum = rfft(dprv.pmf)
        spectrum.setflags(write=False)
        cached = (spectrum, float(dprv.domain.shifts))
        CACHE.put(key, cached)
    return cached


def _power(sigma: float, sample_rate: float, grid: tuple, steps: int) -> np.ndarray:
    """The spectrum to the power ``steps``, cached.

    A ledger's next round asks for the power of this round's count plus one round's steps: that is
    the cached power times the (also cached) power of the difference, one product per round.
    """
    key = ("power", sigma, sample_rate, grid, steps)
    cached = CACHE.get(key)
    if cached is not None:
        return cached[0]
    spectrum = _spectrum(sigma, sample_rate, grid)[0]
    if steps == 1:
        return spectrum
    start = CACHE.largest_power_below(sigma, sample_rate, grid, steps)
    if start is not None and 2 * start[0] >= steps:
        done, below = start
        result = below * _power(sigma, sample_rate, grid, steps - done)
        # a run's count only grows: the last round's power is rarely asked for again
        CACHE.pop(("power", sigma, sample_rate, grid, done))
    else:
        result, base, exponent = None, spectrum, steps
        while exponent:  # repeated squaring: ~2 log2(steps) products
            if exponent & 1:
                result = base if result is None else result * base
            exponent >>= 1
            if exponent:
                base = base * base
    result.setflags(write=False)
    CACHE.put(key, (result,))
    return result


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
    for left, right in itertools.pairwise(points):
        integral = _cdf_integral(prv.sample_rate, prv.noise_multiplier, float(left), float(right))
        integral = (integral - (right - left) * cdf_min) / mass
        mean += right * truncated_cdf(right) - left * truncated_cdf(left) - integral
    return mean


@functools.lru_cache(maxsize=8192)
def _cdf_integral(sample_rate: float, sigma: float, left: float, right: float) -> float:
    value, _ = integrate.quad(PoissonSubsampledGaussianPRV(sample_rate, sigma).cdf, left, right, limit=500)
    return value


def _fast_even_length(n: int) -> int:
    """The smallest even n' >= n whose prime factors are all small (fast for the FFT)."""
    size = next_fast_len(n, real=True)
    while size % 2:
        size = next_fast_len(size + 1, real=True)
    return size


def clear_caches() -> None:
    """Forget every cached grid, spectrum and integral (tests and benchmarks of a cold process)."""
    CACHE.clear()
    _domain.cache_clear()
    _one_step_bound.cache_clear()
    _cdf_integral.cache_clear()
