"""Metrics against brute-force formulas, analytic values and independent implementations;
the two-sample statistics are shown to accept equal laws and reject a 0.3 sd shift."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.spatial.distance import cdist, pdist

import diffstat.metrics as metrics
from diffstat.metrics import (
    d_iad,
    d_mah,
    d_skew,
    energy_distance,
    median_bandwidth,
    mmd,
    mode_weights,
    permutation_test,
    sliced_wasserstein,
    tv_distance,
)


def normal_pair(n=500, dim=2, shift=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    y = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    y[:, 0] += shift
    return x, y


def quantile_points(n: int) -> np.ndarray:
    """n evenly spread N(0, 1) quantiles: a sample with no Monte Carlo error."""
    return stats.norm.ppf((np.arange(n) + 0.5) / n)


# ------------------------------------------------------------------------ MMD and energy distance
def test_mmd_and_energy_match_brute_force(monkeypatch):
    x, y = normal_pair(n=60, dim=3, shift=0.5)
    y = y[:45]  # unequal sizes
    xn, yn = x.numpy(), y.numpy()
    h = float(np.median(pdist(np.vstack([xn, yn]))))
    assert median_bandwidth(x, y) == pytest.approx(h, rel=1e-12)
    k = lambda a, b: np.exp(-cdist(a, b, "sqeuclidean") / (2 * h * h))  # noqa: E731
    n, m = len(xn), len(yn)
    mmd2 = (
        (k(xn, xn).sum() - n) / (n * (n - 1)) + (k(yn, yn).sum() - m) / (m * (m - 1)) - 2 * k(xn, yn).mean()
    )
    energy = (
        2 * cdist(xn, yn).mean() - cdist(xn, xn).sum() / (n * (n - 1)) - cdist(yn, yn).sum() / (m * (m - 1))
    )
    monkeypatch.setattr(metrics, "_BLOCK", 7)  # exercise the blocked sums
    assert mmd(x, yn, squared=True) == pytest.approx(mmd2, rel=1e-9)  # torch and numpy inputs mix
    assert mmd(xn, y) == pytest.approx(math.sqrt(mmd2), rel=1e-9)
    assert energy_distance(x, y) == pytest.approx(energy, rel=1e-9)


def test_two_sample_tests_accept_equal_laws_and_reject_a_small_shift():
    same = normal_pair(n=1000, shift=0.0, seed=1)
    shifted = normal_pair(n=1000, shift=0.3, seed=1)  # 0.3 standard deviations along one axis
    for statistic in ("mmd", "energy"):
        assert permutation_test(*same, statistic, num_permutations=200) > 0.05
        assert permutation_test(*shifted, statistic, num_permutations=200) < 0.01
    assert abs(mmd(*same, squared=True)) < 0.2 * mmd(*shifted, squared=True)
    assert abs(energy_distance(*same)) < 0.2 * energy_distance(*shifted)


def test_permutation_p_values_are_calibrated():
    """Under the null the p-value is uniform: over 40 seeds about 5% fall below 0.05 (at most 6
    of 40 has probability 0.97 for Binomial(40, 0.05))."""
    p = [permutation_test(*normal_pair(n=100, seed=s), "energy", num_permutations=99) for s in range(40)]
    assert sum(v < 0.05 for v in p) <= 6
    assert 0.3 < np.mean(p) < 0.7


# ------------------------------------------------------------------------ sliced Wasserstein
def test_sliced_wasserstein_of_a_translation_is_analytic():
    """For y = x + delta every projection is shifted by theta' delta, so
    SW_2^2 = E[(theta' delta)^2] = |delta|^2 / d; (theta' e)^2 ~ Beta(1/2, (d-1)/2)."""
    d, L = 3, 5_000
    x, _ = normal_pair(n=200, dim=d, seed=2)
    delta = torch.tensor([0.6, -0.3, 0.2], dtype=torch.float64)
    sw2 = sliced_wasserstein(x, x + delta, num_projections=L) ** 2
    a, b = 0.5, (d - 1) / 2
    se = float(delta.norm() ** 2) * math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)) / L)
    assert abs(sw2 - float(delta.norm() ** 2) / d) < 4 * se
    assert abs(sw2 - 1.1**2 * float(delta.norm() ** 2) / d) > 4 * se  # a 10% larger shift: rejected
    assert sliced_wasserstein(x, x) == 0.0


def test_sliced_wasserstein_one_dimensional_matches_scipy():
    rng = np.random.default_rng(3)
    for n, m in [(7, 5), (40, 40), (13, 29)]:
        a, b = rng.normal(size=n), rng.normal(1.0, 2.0, size=m)
        ours = sliced_wasserstein(a, b, num_projections=3, p=1)  # in 1-d every direction is +-1
        assert ours == pytest.approx(stats.wasserstein_distance(a, b), rel=1e-12)
    assert sliced_wasserstein([0.0, 1.0, 2.0], [0.0, 2.0], num_projections=1, p=1) == pytest.approx(1 / 3)


# ------------------------------------------------------------------------ mode weights
def test_mode_weights_and_total_variation_are_exact():
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.tensor([[0.1, 0.0], [9.0, 1.0], [8.0, -1.0], [1.0, 9.0], [-0.5, 0.2], [0.3, 0.3]])
    w = mode_weights(x, centres)
    np.testing.assert_allclose(w, [3 / 6, 2 / 6, 1 / 6])
    w2 = mode_weights(x, classifier=lambda t: (t[:, 0] > 5).long(), num_modes=3)
    np.testing.assert_allclose(w2, [4 / 6, 2 / 6, 0.0])
    assert tv_distance(w, w2) == pytest.approx(1 / 6)
    assert tv_distance([1, 0], [0.5, 0.5]) == 0.5
    assert tv_distance(torch.tensor([2.0, 2.0]), [0.5, 0.5]) == 0.0  # normalised first
    with pytest.raises(ValueError, match="same length"):
        tv_distance([1.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="exactly one"):
        mode_weights(x)


# ------------------------------------------------------------------------ divide-and-conquer metrics
def test_d_mah_identity_and_known_shift():
    gen = torch.Generator().manual_seed(4)
    cov = torch.tensor([[2.0, 0.6], [0.6, 0.5]], dtype=torch.float64)
    chol = torch.linalg.cholesky(cov)
    z = torch.randn(5000, 2, generator=gen, dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T  # sample mean 0, covariance I exactly
    ref = z @ chol.T  # sample covariance exactly cov
    delta = torch.tensor([0.5, -0.4], dtype=torch.float64)
    truth = math.sqrt(float(delta @ torch.linalg.solve(cov, delta)))
    assert d_mah(ref, ref) == 0.0
    assert d_mah(ref + delta, ref) == pytest.approx(truth, rel=1e-10)
    assert d_mah((ref + delta).numpy(), torch.zeros(2), cov=cov) == pytest.approx(truth, rel=1e-10)
    # with random draws the error is |noise| / sqrt(n), noise ~ N(0, I_2)
    x = delta + torch.randn(20_000, 2, generator=gen, dtype=torch.float64) @ chol.T
    assert abs(d_mah(x, torch.zeros(2), cov=cov) - truth) < 4 * math.sqrt(2 / 20_000)
    with pytest.raises(ValueError, match="cov"):
        d_mah(x, torch.zeros(2))


def test_d_iad_identity_and_known_shift():
    """KDE of N(0, 1) quantile points is close to N(0, 1 + h^2) with Scott's h = n^(-1/5), so a
    shift delta gives IAD / 2 = TV = 2 Phi(delta / (2 sqrt(1 + h^2))) - 1 in that coordinate."""
    n = 4000
    q = quantile_points(n)
    x = np.column_stack([q, q])
    shifts = np.array([0.3, 1.0])
    h2 = n ** (-2 / 5)
    truth = np.mean(2 * stats.norm.cdf(shifts / (2 * np.sqrt(1 + h2))) - 1)
    assert d_iad(x, x) == 0.0
    assert d_iad(x + shifts, x) == pytest.approx(truth, abs=2e-3)
    # two independent samples of the same law sit well below a 0.3 sd shift
    a, b = normal_pair(n=2000, dim=1, seed=5)
    assert d_iad(a, b) < 0.5 * d_iad(a + 0.3, b)


def test_d_skew_identity_and_known_value():
    gen = np.random.default_rng(6)
    e = gen.exponential(size=(100_000, 2))
    g = gen.normal(size=(100_000, 2))
    assert d_skew(e, e) == 0.0
    expected = np.mean(np.abs(stats.skew(e, axis=0) - stats.skew(g, axis=0)))  # biased moments
    assert d_skew(torch.as_tensor(e), g) == pytest.approx(expected, rel=1e-10)
    assert d_skew(e, g) == pytest.approx(2.0, abs=0.15)  # skewness of Exp(1) is 2, of N(0, 1) 0
    assert d_skew(e + 3.0, 2.0 * e) == pytest.approx(0.0, abs=1e-10)  # location-scale invariant
