"""Resampling schemes and effective sample sizes: exact identities and unbiasedness."""

import math

import pytest
import torch

from diffstat.tempering.resampling import (
    SCHEMES,
    conditional_ess,
    ess,
    multinomial,
    resample,
    stratified,
    systematic,
    weighted_mean_and_variance,
)

LOG_W = torch.log(torch.tensor([0.05, 0.4, 0.1, 0.25, 0.2], dtype=torch.float64)) + 0.3


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("shift", [2000.0, -2000.0])
def test_resampling_is_invariant_to_shifting_log_weights(scheme, shift):
    """Adding a constant to every log weight (even +2000, where exp overflows) changes nothing."""
    log_w = torch.randn(50, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    a = resample(torch.Generator().manual_seed(7), log_w, scheme)
    b = resample(torch.Generator().manual_seed(7), log_w + shift, scheme)
    assert torch.equal(a, b)
    assert not torch.isfinite(torch.exp(log_w + 2000.0)).any()  # a naive exp would have failed


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_zero_weight_particles_are_never_chosen(scheme, generator):
    log_w = torch.tensor([0.0, -math.inf, 1.0, -math.inf], dtype=torch.float64)
    idx = resample(generator, log_w, scheme, 1000)
    assert set(idx.tolist()) <= {0, 2}


def test_systematic_and_stratified_counts_are_within_one_and_two_of_m_times_weight(generator):
    """Systematic resampling gives each particle floor or ceil of m W_j copies (an exact property);
    stratified is within two copies."""
    w = torch.softmax(LOG_W, 0)
    for m in (7, 100, 1001):
        for _ in range(20):
            c_sys = torch.bincount(systematic(generator, LOG_W, m), minlength=5).double()
            c_str = torch.bincount(stratified(generator, LOG_W, m), minlength=5).double()
            assert ((c_sys - m * w).abs() < 1 + 1e-9).all()
            assert ((c_str - m * w).abs() < 2 + 1e-9).all()
            assert c_sys.sum() == m and c_str.sum() == m


def _copies_are_unbiased(sample, log_w, reps=400, m=50) -> bool:
    """Mean number of copies over ``reps`` runs against ``m W_j``, |z| < 4.5 for every particle
    (the variance of one run's count is at most m W (1 - W), the multinomial one)."""
    gen = torch.Generator().manual_seed(11)
    w = torch.softmax(log_w, 0)
    counts = torch.stack(
        [torch.bincount(sample(gen, log_w, m), minlength=w.numel()) for _ in range(reps)]
    ).double()
    se = torch.sqrt(m * w * (1 - w) / reps)
    return bool(((counts.mean(0) - m * w).abs() / se < 4.5).all())


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_each_scheme_is_unbiased(scheme):
    assert _copies_are_unbiased(SCHEMES[scheme], LOG_W)


def test_unbiasedness_check_rejects_a_scheme_that_ignores_the_weights():
    def uniform(gen, log_w, m):
        return torch.randint(0, log_w.numel(), (m,), generator=gen)

    def tempered(gen, log_w, m):  # resamples from the square roots of the weights: wrong
        return multinomial(gen, 0.5 * log_w, m)

    assert not _copies_are_unbiased(uniform, LOG_W)
    assert not _copies_are_unbiased(tempered, LOG_W)


def test_ess_and_conditional_ess_closed_forms():
    n = 8
    assert torch.isclose(ess(torch.zeros(n, dtype=torch.float64)), torch.tensor(8.0, dtype=torch.float64))
    # Two particles with weights 1 and 3: (1 + 3)^2 / (1 + 9) = 1.6.
    assert torch.isclose(
        ess(torch.log(torch.tensor([1.0, 3.0], dtype=torch.float64))), torch.tensor(1.6, dtype=torch.float64)
    )
    # CESS with equal current weights is the ESS of the increments; both ignore constant shifts.
    incr = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.isclose(conditional_ess(torch.zeros(n, dtype=torch.float64), incr), ess(incr))
    log_w = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    c = conditional_ess(log_w, incr)
    assert torch.isclose(conditional_ess(log_w + 2000.0, incr - 2000.0), c)
    w = torch.softmax(log_w, 0)
    g = torch.exp(incr)
    assert torch.isclose(c, n * (w * g).sum() ** 2 / (w * g**2).sum())
    # Constant increments lose nothing.
    assert torch.isclose(
        conditional_ess(log_w, torch.full((n,), 5.0, dtype=torch.float64)),
        torch.tensor(float(n), dtype=torch.float64),
    )


def test_weighted_moments():
    x = torch.tensor([[0.0, 1.0], [2.0, 5.0]], dtype=torch.float64)
    mean, var = weighted_mean_and_variance(x, torch.log(torch.tensor([0.25, 0.75], dtype=torch.float64)))
    assert torch.allclose(mean, torch.tensor([1.5, 4.0], dtype=torch.float64))
    assert torch.allclose(var, torch.tensor([0.75, 3.0], dtype=torch.float64))


def test_bad_log_weights_are_refused(generator):
    with pytest.raises(ValueError, match="NaN"):
        systematic(generator, torch.tensor([0.0, math.nan]))
    with pytest.raises(ValueError, match="-inf"):
        multinomial(generator, torch.full((3,), -math.inf))
    with pytest.raises(ValueError, match="shape"):
        stratified(generator, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="unknown resampling scheme"):
        resample(generator, torch.zeros(3), "residual")
