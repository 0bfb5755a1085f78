"""The lag check of AIS's final particles (diffstat.tempering.lag): the weighted shift against exact
values, its noise under weights that ignore the positions, and the rule that flags a run."""

import math
import warnings

import numpy as np
import torch
from ar1_target import AR1

import diffstat as ds
from diffstat.tempering.lag import MAX_LAG, is_lagging, run_shifts, weighted_shift

F64 = torch.float64


def test_weighted_shift_of_importance_weights_is_the_exact_shift():
    """Particles from q = N(0, 1) weighted to pi = N(mu, 1): the shift of l = log pi is
    (E_pi l - E_q l) / sd_pi(l) = (mu^2 / 2) / sqrt(1/2) exactly (l = -(x - mu)^2 / 2 + c, whose
    variance under pi is 1/2)."""
    g = torch.Generator().manual_seed(0)
    mu, n = 0.6, 200_000
    x = torch.randn(n, generator=g, dtype=F64)
    log_pi = -0.5 * (x - mu) ** 2
    shift, noise = weighted_shift(log_pi + 0.5 * x**2, log_pi)
    exact = mu**2 / 2 / math.sqrt(0.5)  # 0.2546
    # its error over seeds 0-3: sd 0.006 (with the sd of l unweighted, 0.93, it would be 0.19)
    assert abs(shift - exact) < 0.025, (shift, exact)
    assert 0.001 < noise < 0.002, noise  # sqrt(1 / ESS - 1 / n), ESS / n = exp(-mu^2)
    # the wrong direction (particles from pi weighted to q) is a negative shift
    assert weighted_shift(-(log_pi + 0.5 * x**2), log_pi)[0] < -0.2


def test_weighted_shift_is_noise_of_the_stated_sd_when_the_weights_ignore_the_positions():
    """Weights independent of the values: shift / noise over 400 replicates has mean 0 and sd 1 (the
    noise sqrt(1/ESS - 1/n); with sqrt(1/ESS) instead the sd would be 0.79 here)."""
    g = torch.Generator().manual_seed(1)
    z = []
    for _ in range(400):
        log_w, values = torch.randn(2, 1000, generator=g, dtype=F64)
        shift, noise = weighted_shift(log_w, values)
        z.append(shift / noise)
    z = torch.tensor(z)
    assert abs(float(z.mean())) < 0.2, float(z.mean())  # se 0.05
    assert 0.88 < float(z.std()) < 1.12, float(z.std())  # se 0.035


def test_weighted_shift_skips_non_finite_particles_and_degenerate_values():
    log_w = torch.tensor([0.0, 0.0, -math.inf, 1.0], dtype=F64)
    values = torch.tensor([1.0, 2.0, 5.0, math.nan], dtype=F64)
    shift, noise = weighted_shift(log_w, values)  # the first two only: even weights
    assert abs(shift) < 1e-12 and noise == 0.0
    assert all(math.isnan(v) for v in weighted_shift(log_w, torch.ones(4, dtype=F64)))
    assert all(math.isnan(v) for v in weighted_shift(log_w[:1], values[:1]))


def test_a_correction_of_the_modes_shares_is_no_lag_within_the_modes():
    """Two modes 10 sds apart, 500 particles each, the one of higher log-density weighted 4 to 1 per
    particle: the weights only restore the modes' shares (0.8, 0.2), constant within each mode, so
    the shift within the modes is exactly 0, while over all particles it is large;
    ``run_shifts`` finds the two modes."""
    g = torch.Generator().manual_seed(2)
    narrow = 0.5 * torch.randn(500, 2, generator=g, dtype=F64)
    wide = torch.tensor([10.0, 0.0], dtype=F64) + torch.randn(500, 2, generator=g, dtype=F64)
    x = torch.cat([narrow, wide])
    log_density = torch.cat([3 - 2 * (narrow**2).sum(-1), -0.5 * ((wide - wide.mean(0)) ** 2).sum(-1)])
    log_w = torch.cat([torch.full((500,), math.log(4.0)), torch.zeros(500)]).to(F64)
    labels = (x[:, 0] > 5).long()
    assert abs(weighted_shift(log_w, log_density, labels)[0]) < 1e-12
    assert weighted_shift(log_w, log_density)[0] > 0.3  # between the modes
    lag, accept = run_shifts(x, log_w, log_density, torch.rand(1000, generator=g, dtype=F64))
    assert abs(lag[0]) < 1e-12, lag


def test_a_run_is_flagged_only_when_it_lags_and_the_moves_reject_where_the_weights_are_large():
    lagging = (2 * MAX_LAG, 0.01)
    rejecting = (-0.2, 0.05)  # 4 noise sds
    assert is_lagging(lagging, rejecting)
    assert not is_lagging(lagging, (0.2, 0.05))  # the moves accept as much where the weights are large
    assert not is_lagging((0.5 * MAX_LAG, 0.001), rejecting)  # a small lag
    assert not is_lagging((2 * MAX_LAG, 0.2), rejecting)  # a lag within its noise
    assert not is_lagging((-2 * MAX_LAG, 0.01), rejecting)  # particles above the posterior
    assert not is_lagging((math.nan, math.nan), rejecting)


def test_ais_flags_a_run_whose_particles_lag_the_ar1_funnel():
    """The audit's latent AR(1) model (tests/tempering/ar1_target.py): at defaults the moves, whose
    step sizes the pilot fixed, do not follow the particles into the sigma/state funnel, the weights
    favour the few that got there, and the run is off (seed 5: log Z 3 standard errors low, sigma
    0.28 posterior sd high) with ESS 121 and no collapse. The check flags it."""
    target = AR1()
    log_z, sigma_mean = target.exact()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = ds.sample(target, "ais", num_samples=1000, seed=5, progress=False, check_modes=False)
    attrs = idata.posterior.attrs
    sigma = np.exp(idata.posterior["x"].values[..., 1]).ravel()
    # the run is wrong: log Z low by more than 2 of its standard errors, sigma high
    assert log_z - attrs["log_normalizer"] > 2 * attrs["log_normalizer_se"], (attrs["log_normalizer"], log_z)
    assert sigma.mean() > sigma_mean + 0.02, (sigma.mean(), sigma_mean)  # posterior sd 0.11
    assert attrs["ess"] >= 100 and attrs["pareto_k"] < 0.7  # the weights' checks are silent
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("lag the path" in m for m in messages), messages
    assert attrs["log_normalizer_reliable"] == 0
    assert attrs["log_density_lag"] > MAX_LAG


def test_ais_does_not_flag_a_gaussian():
    """A correlated Gaussian from N(0, I) (AIS at defaults, three seeds): no lag flagged, the lag
    within 4 noise sds."""
    cov = torch.tensor([[1.0, 0.8, 0.0], [0.8, 1.0, 0.3], [0.0, 0.3, 0.5]], dtype=F64)
    normal = torch.distributions.MultivariateNormal(torch.tensor([1.0, -2.0, 0.5], dtype=F64), cov)
    target = ds.Target(normal.log_prob, 3, dtype=F64)
    for seed in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            idata = ds.sample(target, "ais", num_samples=1000, seed=seed, progress=False, check_modes=False)
        attrs = idata.posterior.attrs
        assert abs(attrs["log_density_lag"]) < 4 * attrs["log_density_lag_noise"], attrs["log_density_lag"]
        assert attrs["log_normalizer_reliable"] == 1
