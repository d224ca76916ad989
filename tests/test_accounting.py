"""Epsilon from event histories: golden values, composition, monotonicity, calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import comb, logsumexp

from fedpriv.errors import PrivacyError
from fedpriv.privacy import PrivacyEvent, epsilon, noise_multiplier_for


def independent_rdp_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """Sampled-Gaussian RDP at integer orders (Mironov, Talwar & Zhang 2019, eq. for integer alpha),
    converted to (epsilon, delta) with Balle et al. 2020's bound. Written here from the papers,
    independently of Opacus, as the reference for the golden value."""
    best = math.inf
    for alpha in range(2, 257):
        terms = [
            math.log(comb(alpha, k, exact=True)) + (alpha - k) * math.log1p(-q) + k * math.log(q)
            + (k * k - k) / (2 * sigma**2)
            for k in range(alpha + 1)
        ]
        rdp = steps * logsumexp(terms) / (alpha - 1)
        eps = rdp + math.log1p(-1 / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        best = min(best, eps)
    return best


# (sigma, q, steps, delta) -> epsilon, computed once with independent_rdp_epsilon above.
GOLDEN = {(1.1, 256 / 60000, 14063, 1e-5): 2.5971}


@pytest.mark.parametrize(("case", "golden"), GOLDEN.items())
def test_rdp_epsilon_matches_independent_golden_value(case, golden):
    sigma, q, steps, delta = case
    assert independent_rdp_epsilon(sigma, q, steps, delta) == pytest.approx(golden, rel=1e-3)
    # Opacus also searches fractional orders, so it may be (slightly) tighter, never looser.
    opacus = epsilon([PrivacyEvent(sigma, q, steps)], delta, "rdp")
    assert golden * 0.97 <= opacus <= golden * 1.001


def test_prv_is_tighter_than_rdp_but_close():
    events = [PrivacyEvent(1.1, 256 / 60000, 14063)]
    prv, rdp = epsilon(events, 1e-5, "prv"), epsilon(events, 1e-5, "rdp")
    assert 0.7 * rdp < prv <= rdp


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_epsilon_grows_with_steps_and_falls_with_noise(accountant):
    by_steps = [epsilon([PrivacyEvent(1.0, 0.02, s)], 1e-5, accountant) for s in (10, 100, 1000)]
    by_noise = [epsilon([PrivacyEvent(s, 0.02, 500)], 1e-5, accountant) for s in (0.8, 1.5, 3.0)]
    assert by_steps == sorted(by_steps) and len(set(by_steps)) == 3
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == 3


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_composition_is_over_the_whole_history(accountant):
    split = [PrivacyEvent(1.0, 0.02, 300), PrivacyEvent(1.0, 0.02, 200)]
    whole = [PrivacyEvent(1.0, 0.02, 500)]
    assert epsilon(split, 1e-5, accountant) == pytest.approx(epsilon(whole, 1e-5, accountant), rel=1e-6)
    # Composition is sub-additive: never the sum of per-round epsilons.
    parts = sum(epsilon([e], 1e-5, accountant) for e in split)
    assert epsilon(split, 1e-5, accountant) < parts


def test_nothing_spent_is_zero_and_no_noise_is_infinite():
    assert epsilon([], 1e-5) == 0.0
    assert epsilon([PrivacyEvent(0.0, 0.1, 10)], 1e-5) == math.inf


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_calibrated_sigma_spends_the_target(accountant):
    sigma = noise_multiplier_for(target_epsilon=3.0, delta=1e-5, sample_rate=0.05, steps=200,
                                 accountant=accountant)
    spent = epsilon([PrivacyEvent(sigma, 0.05, 200)], 1e-5, accountant)
    assert 2.99 <= spent <= 3.0


# Budgets from strict to loose, hospitals from small (q near 1) to large, short and long runs:
# the root finder must land within its tolerance (0.01) under the target everywhere, never over.
@pytest.mark.parametrize(("target", "sample_rate", "steps"), [
    (0.5, 0.05, 500), (1.0, 0.4, 60), (3.0, 0.04, 625), (3.0, 0.02, 2000), (8.0, 0.1, 250),
    (8.0, 0.9, 30), (20.0, 0.03, 800), (2.0, 1.0, 40),
])
def test_calibration_lands_within_tolerance_under_the_target(target, sample_rate, steps):
    sigma = noise_multiplier_for(target_epsilon=target, delta=1e-5, sample_rate=sample_rate, steps=steps)
    spent = epsilon([PrivacyEvent(sigma, sample_rate, steps)], 1e-5)
    assert target - 0.01 <= spent <= target


def test_calibration_on_top_of_a_history_spends_only_what_remains():
    prior = [PrivacyEvent(2.0, 0.05, 100)]
    sigma = noise_multiplier_for(target_epsilon=3.0, delta=1e-5, sample_rate=0.05, steps=100,
                                 accountant="rdp", prior_events=prior)
    total = epsilon([*prior, PrivacyEvent(sigma, 0.05, 100)], 1e-5, "rdp")
    assert 2.99 <= total <= 3.0
    sigma = noise_multiplier_for(target_epsilon=3.0, delta=1e-5, sample_rate=0.08, steps=100, prior_events=prior)
    total = epsilon([*prior, PrivacyEvent(sigma, 0.08, 100)], 1e-5)
    assert 2.99 <= total <= 3.0
    with pytest.raises(PrivacyError, match="already spent"):
        noise_multiplier_for(target_epsilon=0.1, delta=1e-5, sample_rate=0.05, steps=10,
                             accountant="rdp", prior_events=prior)


def test_bad_accounting_inputs_are_rejected():
    with pytest.raises(PrivacyError, match="accountant"):
        epsilon([PrivacyEvent(1.0, 0.1, 1)], 1e-5, "gdpx")
    with pytest.raises(PrivacyError, match="delta"):
        epsilon([PrivacyEvent(1.0, 0.1, 1)], 1.5)
    with pytest.raises(PrivacyError, match="sample_rate"):
        PrivacyEvent(1.0, 0.0, 1)


HISTORIES = [
    [(1.0, 0.09, 55)],
    [(1.0, 0.09, 55), (0.8, 0.2, 30)],
    [(3.0, 0.5, 10), (1.2, 0.01, 400)],
    [(2.0, 1.0, 40)],  # every record in every batch
    [(2.9, 0.09, 440)],  # one hospital after 40 one-epoch rounds
]


@pytest.mark.parametrize("history", HISTORIES)
def test_cached_accounting_gives_opacuss_epsilon(history):
    # RDP figures must stay exactly Opacus's own (fedpriv caches each (sigma, q)'s curve and sorts
    # the history, so only the floating-point summation order may differ). PRV runs on a grid at
    # least as fine and as wide as Opacus's (rounded up so that rounds share it), which moves the
    # estimate by far less than the eps_error (0.01) both add: measured, under 1e-6.
    from opacus.accountants import PRVAccountant, RDPAccountant

    events = [PrivacyEvent(sigma, q, steps) for sigma, q, steps in history]
    for name, engine, tolerance in (("prv", PRVAccountant(), 1e-5), ("rdp", RDPAccountant(), 1e-12)):
        engine.history = list(history)
        assert epsilon(events, 1e-5, name) == pytest.approx(engine.get_epsilon(1e-5), rel=tolerance, abs=0), name


@pytest.mark.parametrize("history", HISTORIES)
def test_prv_grid_is_at_least_as_fine_and_wide_as_opacuss(history):
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV
    from opacus.accountants.analysis.prv.domain import compute_safe_domain_size

    from fedpriv.privacy.prv import _domain, ledger_grid

    prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history]
    counts = [steps for _, _, steps in history]
    domain = _domain(*ledger_grid(tuple(history), 0.01, 1e-8))
    # Opacus's mesh for this history (PRVAccountant._get_dprv) and its safe half-width (remark 5.6)
    mesh = 0.01 / math.sqrt(sum(counts) * math.log(12 / 1e-8) / 2)
    half_width = compute_safe_domain_size(prvs, counts, eps_error=0.01, delta_error=1e-8)
    assert domain.dt <= mesh * (1 + 1e-9)
    assert domain.t_min <= -half_width and domain.t_max >= half_width
    # an FFT-friendly even size (only small prime factors) that keeps Opacus's alignment
    rest = domain.size
    for prime in (2, 3, 5, 7, 11):
        while rest % prime == 0:
            rest //= prime
    assert domain.size % 2 == 0 and rest == 1, domain.size
    assert domain.t_min / domain.dt == pytest.approx(-(domain.size / 2 - 1))


def test_a_ledgers_rounds_share_one_prv_grid_and_the_caches_change_no_result():
    from fedpriv.privacy import prv

    # 30 rounds of 78 steps after a run of 40 (steps grow by 75%): Opacus's grid changes every
    # round; this one changes only when the rounded-up step count or half-width does
    earlier = (3.4, 0.0128, 3120)
    histories = [(earlier, (3.6, 0.0128, 78 * r)) for r in range(1, 31)]
    grids = {prv.ledger_grid(h, 0.01, 1e-8) for h in histories}
    assert len(grids) <= 3
    prv.clear_caches()
    warm = [prv.prv_epsilon(h, 1e-5) for h in histories]  # each round reuses the last one's powers
    assert all(a < b for a, b in zip(warm, warm[1:]))  # more steps, more epsilon
    for h, value in zip(histories[::7], warm[::7]):
        prv.clear_caches()
        assert prv.prv_epsilon(h, 1e-5) == pytest.approx(value, rel=1e-9)  # cold: the same figure


def test_prv_epsilon_search_over_the_upper_half_is_opacuss_bit_for_bit():
    from fedpriv.privacy.prv import compose, upper_epsilon

    for history in HISTORIES:
        dprv = compose(tuple(sorted(history)), 0.01, 1e-8)
        for delta in (1e-5, 1e-3):
            opacus = dprv.compute_epsilon(delta, delta / 1000, 0.01)[2]
            for guess in (0.0, 0.5, opacus / 2, opacus + 1):  # a guess too high is retried lower
                assert upper_epsilon(dprv, delta, delta / 1000, 0.01, guess) == opacus


def test_the_spectrum_cache_stays_within_its_bound_and_keeps_spectra_longest():
    from fedpriv.privacy import prv

    cache = prv._SpectrumCache(limit_bytes=4 * 8 * 1000)
    cache.put(("spectrum", "a"), (np.zeros(1000), 0.0))
    for i in range(10):
        cache.put(("power", i), (np.zeros(1000),))
    assert cache.size <= cache.limit and len(cache.items) == 4
    # the oldest entry is the spectrum, but powers (cheap to recompute from it) went first
    assert cache.get(("spectrum", "a")) is not None
    assert cache.get(("power", 9)) is not None and cache.get(("power", 6)) is None


@pytest.mark.slow
def test_the_prv_cache_size_is_set_by_environment_and_a_bad_value_says_how_to_fix_it(monkeypatch):
    import os
    import subprocess
    import sys

    from fedpriv.privacy import prv

    # The rule, in this process.
    for value, expected in (("2", 2 * 2**20), ("0.5", 2**19), (None, 1024 * 2**20)):
        if value is None:
            monkeypatch.delenv("FEDPRIV_PRV_CACHE_MB", raising=False)
        else:
            monkeypatch.setenv("FEDPRIV_PRV_CACHE_MB", value)
        assert prv._cache_limit() == expected
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv("FEDPRIV_PRV_CACHE_MB", bad)
        with pytest.raises(PrivacyError, match=f"FEDPRIV_PRV_CACHE_MB='{bad}' is not a size in MiB"):
            prv._cache_limit()
    # The module's cache is built by it at import: one fresh interpreter with a value that is not the default.
    code = "from fedpriv.privacy import prv; print(prv.CACHE.limit)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FEDPRIV_PRV_CACHE_MB": "2"},
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == str(2 * 2**20), out.stderr
