"""MALA and HMC through ds.sample on a correlated 4-d Gaussian: posterior means within 4 Monte
Carlo standard errors of the truth (4 chains x 2000 draws) and R-hat < 1.01; the same check
rejects a wrong target."""

import arviz as az
import numpy as np
import pytest
import torch

import diffstat as ds

COV = torch.tensor(
    [[1.0, 0.5, 0.0, 0.0], [0.5, 2.0, 0.3, 0.0], [0.0, 0.3, 1.0, 0.2], [0.0, 0.0, 0.2, 0.5]],
    dtype=torch.float64,
)
MEAN = torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64)
PREC = torch.linalg.inv(COV)


def gaussian_target(shift=0.0):
    mu = MEAN + shift

    def log_prob(x):
        d = x - mu
        return -0.5 * ((d @ PREC) * d).sum(-1)

    return ds.Target(log_prob, 4, dtype=torch.float64)


def z_scores(idata):
    mean = idata.posterior["x"].mean(("chain", "draw")).values
    mcse = az.mcse(idata, method="mean")["x"].values
    return (mean - MEAN.numpy()) / mcse


@pytest.mark.parametrize("method", ["mala", "hmc"])
def test_correlated_gaussian_means_and_rhat(method):
    idata = ds.sample(gaussian_target(), method, num_samples=2000, num_chains=4, seed=11, progress=False)
    assert idata.posterior["x"].shape == (4, 2000, 4)
    assert np.abs(z_scores(idata)).max() < 4
    assert float(az.rhat(idata)["x"].max()) < 1.01
    # The variances too, against a loose Monte Carlo band (ESS-based).
    var = idata.posterior["x"].values.reshape(-1, 4).var(0)
    ess = az.ess(idata)["x"].values
    assert np.all(np.abs(var - np.diag(COV.numpy())) < 5 * np.diag(COV.numpy()) * np.sqrt(2 / ess))
    assert not idata.sample_stats["diverging"].values.any()
    rate = float(idata.sample_stats["acceptance_rate"].mean())
    assert abs(rate - {"mala": 0.574, "hmc": 0.8}[method]) < 0.1  # dual averaging hit its target


@pytest.mark.parametrize("method", ["mala", "hmc"])
def test_wrong_target_is_rejected(method):
    # Draws from a target shifted by 0.15 sd fail the same 4-MCSE check.
    idata = ds.sample(
        gaussian_target(shift=0.15), method, num_samples=2000, num_chains=4, seed=11, progress=False
    )
    assert np.abs(z_scores(idata)).max() > 4


def test_same_seed_same_draws_and_init_option():
    target = gaussian_target()
    a = ds.sample(target, "mala", num_samples=30, seed=5, progress=False)
    b = ds.sample(target, "mala", num_samples=30, seed=5, progress=False)
    c = ds.sample(target, "mala", num_samples=30, seed=6, progress=False)
    np.testing.assert_array_equal(a.posterior["x"].values, b.posterior["x"].values)
    assert not np.array_equal(a.posterior["x"].values, c.posterior["x"].values)
    d = ds.sample(
        target, "hmc", num_samples=5, num_warmup=0, step_size=1e-3, seed=0, init=MEAN, progress=False
    )
    assert np.abs(d.posterior["x"].values - MEAN.numpy()).max() < 0.1


def test_evaluations_counted():
    target = gaussian_target()
    # Given starting points (no start phase) and no metric windows (no step-size re-initialisation),
    # every evaluation is a leapfrog step of warm-up or sampling.
    idata = ds.sample(
        target,
        "hmc",
        num_samples=100,
        num_warmup=50,
        num_chains=3,
        num_leapfrog=7,
        step_size=0.1,
        seed=0,
        progress=False,
        init=MEAN,
        adapt_mass=False,
    )
    # validation (3) + initial gradient (3) + 150 steps x 7 leapfrog steps x 3 chains + the mode check
    attrs = idata.posterior.attrs
    assert attrs["mode_check_evals"] > 0
    assert attrs["num_target_evals"] == 3 + 3 + 150 * 7 * 3 + attrs["mode_check_evals"]
    # Jittered lengths: the sampling phase evaluates exactly the recorded leapfrog steps.
    kw = {"num_warmup": 30, "seed": 0, "progress": False, "init": MEAN, "check_modes": False}
    a = ds.sample(target, "hmc", num_samples=40, **kw)
    b = ds.sample(target, "hmc", num_samples=5, **kw)
    extra = a.posterior.attrs["num_target_evals"] - b.posterior.attrs["num_target_evals"]
    steps = a.sample_stats["n_steps"].values
    assert extra == steps[:, 5:].sum()
