"""Warm-up that reaches the posterior from far-away starts at defaults: a collinear linear regression
(exact Gaussian posterior) and a Poisson model started where log pi is about -4e4 (exact
log-gamma posterior); Stan's window schedule; the automatic metric choice; option checks."""

import math

import arviz as az
import numpy as np
import pytest
import torch

import diffstat as ds
from diffstat.mcmc.adaptation import choose_metric, stan_windows
from diffstat.mcmc.sampler import KERNELS

GRADIENT_METHODS = ["hmc", "nuts"]


def regression_problem(rho=0.9, n=100, d=5, seed=0):
    """y = X beta + N(0, 1) with predictors equicorrelated at ``rho``; flat prior, known noise sd,
    so the posterior is exactly N(beta_hat, (X^T X)^{-1})."""
    gen = torch.Generator().manual_seed(seed)
    corr = (1 - rho) * torch.eye(d, dtype=torch.float64) + rho
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(corr).T
    beta = torch.tensor([3.0, -2.0, 1.0, 4.0, -3.0], dtype=torch.float64)[:d]
    y = x @ beta + torch.randn(n, generator=gen, dtype=torch.float64)
    cov = torch.linalg.inv(x.T @ x)
    mean = cov @ x.T @ y

    def log_prob(b):
        return -0.5 * ((y - b @ x.T) ** 2).sum(-1)

    return ds.Target(log_prob, d, dtype=torch.float64), mean.numpy(), cov.numpy()


def z_and_sd_error(idata, mean, cov):
    post = idata.posterior["x"]
    est_mean = post.mean(("chain", "draw")).values
    mcse = az.mcse(idata, method="mean")["x"].values
    sd = post.values.reshape(-1, len(mean)).std(0)
    return np.abs(est_mean - mean) / mcse, np.abs(sd / np.sqrt(np.diag(cov)) - 1)


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_collinear_regression_from_prior_draws(method):
    target, mean, cov = regression_problem()
    idata = ds.sample(target, method, num_samples=1000, num_chains=4, seed=1, progress=False)
    z, sd_err = z_and_sd_error(idata, mean, cov)
    assert z.max() < 4, z
    assert sd_err.max() < 0.15, sd_err
    assert idata.posterior.attrs["metric"] == "dense"
    assert float(az.rhat(idata)["x"].max()) < 1.01


def test_regression_check_rejects_a_wrong_posterior():
    # The same check fails against a posterior mean shifted by one posterior sd in one coordinate.
    target, mean, cov = regression_problem()
    idata = ds.sample(target, "hmc", num_samples=1000, num_chains=4, seed=1, progress=False)
    shifted = mean.copy()
    shifted[0] += math.sqrt(cov[0, 0])
    assert z_and_sd_error(idata, shifted, cov)[0].max() > 4


def poisson_groups(start=6.0):
    """Three groups of 20 Poisson counts with rate exp(theta_j) and a Gamma(2, 1) prior on each rate
    (with the Jacobian of lambda = exp(theta)): theta_j | y ~ log Gamma(2 + S_j, 1 + 20), so
    E theta_j = digamma(2 + S_j) - log 21 and Var theta_j = trigamma(2 + S_j). The reference the
    chains start from is N(start, 1): at start=6 the log-density there is about -4e4."""
    gen = torch.Generator().manual_seed(3)
    rates = torch.tensor([0.5, 3.0, 10.0], dtype=torch.float64)
    counts = torch.poisson(rates.expand(20, 3), generator=gen)
    shape, n = 2.0 + counts.sum(0), 20.0

    def log_prob(theta):
        return (shape * theta - (1.0 + n) * torch.exp(theta)).sum(-1)

    reference = torch.distributions.Independent(
        torch.distributions.Normal(torch.full((3,), start, dtype=torch.float64), 1.0), 1
    )
    target = ds.Target(log_prob, 3, dtype=torch.float64, reference=reference)
    mean = (torch.special.digamma(shape) - math.log(1.0 + n)).numpy()
    sd = torch.special.polygamma(1, shape).sqrt().numpy()
    return target, mean, sd, log_prob


@pytest.mark.parametrize("method", ["hmc", "nuts", "mala"])
def test_chains_started_in_a_far_tail_reach_the_posterior(method):
    target, mean, sd, log_prob = poisson_groups()
    start = target.sample_reference(4, torch.Generator().manual_seed(0))
    assert float(log_prob(start).max()) < -1e4  # the starts are far out in the tail
    idata = ds.sample(target, method, num_samples=1000, num_chains=4, seed=2, progress=False)
    est = idata.posterior["x"].mean(("chain", "draw")).values
    mcse = az.mcse(idata, method="mean")["x"].values
    assert (np.abs(est - mean) / mcse).max() < 4
    est_sd = idata.posterior["x"].values.reshape(-1, 3).std(0)
    assert np.abs(est_sd / sd - 1).max() < 0.15
    assert float(idata.sample_stats["acceptance_rate"].mean(("draw",)).min()) > 0.4  # every chain moves


def test_chains_left_in_the_tail_are_flagged():
    # Without start phase and warm-up, MALA at step 0.01 from the tail (gradients of order 1e5) rejects
    # every proposal: the draws are wrong and the sampler warns.
    target, mean, _, _ = poisson_groups(start=9.0)
    with pytest.warns(RuntimeWarning, match="stuck"):
        idata = ds.sample(
            target, "mala", num_samples=50, num_warmup=0, step_size=0.01, num_chains=4, seed=2, progress=False
        )
    est = idata.posterior["x"].mean(("chain", "draw")).values
    assert np.abs(est - mean).max() > 1.0


def test_stan_windows():
    assert stan_windows(1000) == (75, [(75, 100), (100, 150), (150, 250), (250, 450), (450, 950)], 50)
    # too short for 75 + 25 + 50: Stan's 15% / 75% / 10%
    assert stan_windows(100) == (15, [(15, 90)], 10)
    assert stan_windows(10) == (10, [], 0)


def test_choose_metric():
    eye = torch.eye(5, dtype=torch.float64)
    assert choose_metric("auto", eye, 1000) == "diag"
    corr = 0.4 * eye + 0.6
    assert choose_metric("auto", corr, 1000) == "dense"  # |correlation| 0.6 > 0.5
    big = torch.eye(300, dtype=torch.float64) * 0.4 + 0.6
    assert choose_metric("auto", big, 10**5) == "diag"  # too many dimensions for a dense metric
    assert choose_metric("dense", eye, 10) == "dense"


def test_options_are_validated():
    target, _, _ = regression_problem()
    with pytest.raises(ValueError, match="metric"):
        ds.sample(target, "hmc", num_samples=10, seed=0, metric="full", progress=False)
    with pytest.raises(ValueError, match="known:.*init_iters"):
        ds.sample(target, "mala", num_samples=10, seed=0, num_leapfrog=3, progress=False)
    with pytest.raises(ValueError, match="init_iters"):
        ds.sample(target, "hmc", num_samples=10, seed=0, init_iters=-1, progress=False)
    assert set(KERNELS) >= {"hmc", "nuts", "mala", "rwm"}


def uncentred_regression(n=60, seed=0):
    """y = a + b t + N(0, 0.5^2) with t the years 1952..2011 uncentred (kilpisjarvi's design): the
    posterior of (a, b) is exactly Gaussian, correlation -0.99999, variances 1e2 and 3e-5 apart by
    eight orders of magnitude in its eigenvalues."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(1952.0, 1952.0 + n, dtype=torch.float64)
    design = torch.stack([torch.ones_like(t), t], -1)
    y = -30.0 + 0.02 * t + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    prec = design.T @ design / 0.25
    cov = torch.linalg.inv(prec)
    mean = cov @ design.T @ y / 0.25

    def log_prob(b):
        return -0.5 * ((y - b @ design.T) ** 2).sum(-1) / 0.25

    return ds.Target(log_prob, 2, dtype=torch.float64), mean.numpy(), cov.numpy()


def test_uncentred_regression_is_cheap_and_right():
    # Stan's absolute 1e-3 shrinkage of the window covariance widens the narrowest direction
    # (variance 1e-9) tens of thousands of times: measured with it, 60 leapfrog steps per draw and
    # 318k evaluations, R-hat 1.03; shrinking in the metric's own units, 2.8 steps and 14k.
    target, mean, cov = uncentred_regression()
    idata = ds.sample(target, "nuts", num_samples=500, num_chains=4, seed=0, progress=False)
    z, sd_err = z_and_sd_error(idata, mean, cov)
    assert z.max() < 4, z
    assert sd_err.max() < 0.15, sd_err
    steps = idata.sample_stats["n_steps"].values
    assert steps.mean() < 12, steps.mean()
    attrs = idata.posterior.attrs
    assert int(attrs["num_target_evals"]) - int(attrs["mode_check_evals"]) < 25_000  # the sampler's own


def test_whitening_loss_is_smallest_at_the_posterior_covariance():
    # On a Gaussian, C_g = C_x^{-1}: the loss is sum(lambda + 1/lambda) >= 2d, 2d exactly at the
    # covariance itself, and larger for a metric too wide or too narrow in one direction.
    from diffstat.mcmc.metric import DenseMetric
    from diffstat.mcmc.warmup import whitening_loss

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    cov = a @ a.T + 0.1 * torch.eye(4, dtype=torch.float64)
    prec = torch.linalg.inv(cov)
    best = whitening_loss(DenseMetric.from_covariance(cov), cov, prec)
    assert best == pytest.approx(8.0, rel=1e-10)
    u = torch.linalg.eigh(cov).eigenvectors[:, :1]
    for factor in (0.5, 2.0):
        off = cov + (factor - 1) * u @ u.T * float(u.T @ cov @ u)
        assert whitening_loss(DenseMetric.from_covariance(off), cov, prec) > best + 0.4
    # a diagonal metric on variances: the same sum over coordinates
    var = torch.tensor([1.0, 4.0], dtype=torch.float64)
    assert whitening_loss(var, var, 1 / var) == pytest.approx(4.0)
    assert whitening_loss(None, var, 1 / var) == pytest.approx(5 + 1.25)


def test_a_kept_metric_keeps_the_adapted_step_sizes():
    # A window too short for a dense estimate (10 draws in 3-d, under DENSE_MIN_DRAWS_PER_DIM) keeps
    # the current dense metric: dual averaging then goes on untouched, without the trial steps of a
    # re-initialisation (the probe raises if called); before the terminal window the chains' averaged
    # step sizes are pooled at their median, centred there (mu = log h, not log 10 h).
    from diffstat.mcmc.adaptation import DualAveraging, WelfordCovariance
    from diffstat.mcmc.metric import DenseMetric
    from diffstat.mcmc.warmup import _end_window

    gen = torch.Generator().manual_seed(0)
    acc, acc_g = WelfordCovariance(3), WelfordCovariance(3)
    acc.update(torch.randn(10, 3, generator=gen, dtype=torch.float64))
    acc_g.update(torch.randn(10, 3, generator=gen, dtype=torch.float64))
    current = DenseMetric.from_covariance(torch.eye(3, dtype=torch.float64))

    def probe(state, h, inv_mass):
        raise AssertionError("the step sizes were re-initialised")

    dual = DualAveraging(torch.tensor([0.1, 0.2, 0.4, 0.8], dtype=torch.float64), 0.8)
    for a in (0.9, 0.7, 0.95):
        dual.update(torch.tensor([a, 0.6, 0.85, 0.5], dtype=torch.float64))
    step, averaged, h_bar = dual.step_size.clone(), dual.final_step_size.clone(), dual.h_bar.clone()
    args = (acc, acc_g, "dense", torch.float64, current, None, probe, dual, None)
    inv_mass, kind = _end_window(*args, False, 100)
    assert inv_mass is current and kind == "dense"
    assert dual.t == 3 and torch.equal(dual.step_size, step) and torch.equal(dual.h_bar, h_bar)
    inv_mass, _ = _end_window(*args, True, 50)
    pooled = torch.exp(torch.log(averaged).median())
    assert inv_mass is current and dual.t == 0
    assert torch.allclose(dual.step_size, pooled) and torch.allclose(dual.mu, torch.log(pooled))
