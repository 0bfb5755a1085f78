"""SMC moves on correlated and multimodal posteriors: the dense particle metric, the clusters it is
pooled over, moves repeated until the particles decorrelate, and SMC at its defaults against exact
posteriors (a conjugate regression with 5 correlated predictors, an AR(5) model, a 6-d mixture)."""

import warnings

import numpy as np
import pytest
import torch
from correlated_targets import ar5, mixture6, regression

import diffstat as ds
from diffstat.mcmc.metric import DenseMetric
from diffstat.tempering.moves import (
    cluster_particles,
    particle_metric,
    weighted_covariance,
)

F64 = torch.float64
#: The settings SMC had before the adaptive moves: 5 MALA moves per stage, diagonal metric.
OLD = {"num_mcmc_steps": 5, "metric": "diag", "within_modes": False}


def smc_draws(target, seed=0, n=1000, **options):
    """The draws of every run (chain) pooled, and the InferenceData."""
    idata = ds.sample(target, "smc", num_samples=n, seed=seed, progress=False, **options)
    x = torch.as_tensor(idata.posterior.x.values)
    return x.reshape(-1, x.shape[-1]), idata


def regression_agrees(draws, exact, log_z=None, log_z_se=0.0, *, sigma_only=False) -> bool:
    """Posterior means within 0.15 sd and sds within 15% for beta and sigma (from ``(beta, log
    sigma)`` draws), and log Z within max(3 se, 0.15). With 1000 draws of effective size about 500
    the Monte Carlo sd of a mean is about 0.045 posterior sd and of an sd about 3%, so 0.15 and
    15% are over 3 Monte Carlo errors."""
    sigma = torch.exp(draws[:, -1])
    ok = abs(float(sigma.mean()) - exact.sigma_mean) < 0.15 * exact.sigma_sd
    if sigma_only:
        return ok
    ok &= abs(float(sigma.std()) / exact.sigma_sd - 1) < 0.15
    beta = draws[:, :-1]
    ok &= bool(((beta.mean(0) - exact.beta_mean).abs() < 0.15 * exact.beta_sd).all())
    ok &= bool(((beta.std(0) / exact.beta_sd - 1).abs() < 0.15).all())
    if log_z is not None:
        ok &= abs(log_z - exact.log_evidence) < max(3 * log_z_se, 0.15)
    return ok


# ---------------------------------------------------------------------------- the parts
def test_dense_metric_is_the_shrunk_weighted_covariance_and_auto_falls_back_to_the_diagonal(generator):
    cov = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, 0.5], [0.0, 0.5, 2.0]], dtype=F64)
    x = torch.randn(600, 3, generator=generator, dtype=F64) @ torch.linalg.cholesky(cov).T
    log_w = 0.3 * torch.randn(600, generator=generator, dtype=F64)
    m = particle_metric(x, log_w, "dense")
    s = weighted_covariance(x, torch.softmax(log_w, -1))
    n_eff = float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)))
    lam = 3 / n_eff
    expected = (1 - lam) * s + lam * torch.diag(s.diagonal())
    assert isinstance(m, DenseMetric) and torch.allclose(m.inv_mass, expected, rtol=0, atol=1e-12)
    assert torch.allclose(m.chol @ m.chol.T, expected, rtol=0, atol=1e-12)
    # 600 particles in d = 3: auto is dense; 40 particles (4 per dimension... under 10): diagonal.
    assert isinstance(particle_metric(x, log_w, "auto"), DenseMetric)
    diag = particle_metric(x[:20], None, "auto")
    assert torch.allclose(diag, x[:20].var(0, unbiased=False), rtol=0, atol=1e-12)
    assert torch.allclose(particle_metric(x, log_w, "diag"), s.diagonal(), rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        particle_metric(x, log_w, "full")


def test_clusters_split_separated_modes_and_leave_unimodal_clouds_whole(generator):
    means = torch.tensor([[6.0, 0.0, 0.0], [-6.0, 0.0, 0.0], [0.0, 6.0, 0.0]], dtype=F64)
    comp = torch.arange(900) % 3
    x = (
        means[comp]
        + torch.randn(900, 3, generator=generator, dtype=F64) * torch.tensor([1.0, 0.6, 0.8])[comp, None]
    )
    labels = cluster_particles(x, torch.zeros(900, dtype=F64), generator)
    assert int(labels.max()) + 1 == 3
    # Each cluster is one component (labels are a permutation of the truth).
    assert all(len(set(comp[labels == c].tolist())) == 1 for c in range(3))
    # The pooled within-cluster variance is the components' (not the 6^2 between them).
    var = particle_metric(x, None, "diag", labels)
    assert bool((var < 1.2).all())
    # A correlated Gaussian, a skewed (log-normal), a heavy-tailed (t, 3 df) and a uniform cloud
    # stay one cluster.
    z = torch.randn(900, 3, generator=generator, dtype=F64)
    chi2 = (torch.randn(900, 3, generator=generator, dtype=F64) ** 2).sum(-1, keepdim=True)
    corr = torch.tensor([[1.0, 0.0, 0.0], [0.95, 0.3, 0.0], [0.0, 0.0, 3.0]], dtype=F64)
    uniform = torch.rand(900, 3, generator=generator, dtype=F64)
    for cloud in (z @ corr, z.exp(), z / (chi2 / 3).sqrt(), uniform):
        assert int(cluster_particles(cloud, torch.zeros(900, dtype=F64), generator).max()) == 0


def test_moves_stop_when_decorrelated_and_the_cap_warns():
    target = regression()
    _draws, idata = smc_draws(target, n=400, num_chains=1, check_modes=False)  # the run's own evaluations
    steps = idata.tempering.num_mcmc_steps.values[:, 0]
    assert (steps >= 2).all() and (steps < 100).all()
    # The evaluations are the initial particles and one per particle and MALA move.
    assert idata.posterior.attrs["num_target_evals"] == 16 + 400 * (1 + int(steps.sum()))
    with pytest.warns(RuntimeWarning, match="max_mcmc_steps"):
        smc_draws(target, n=400, num_chains=1, max_mcmc_steps=2, kernel="rwm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        smc_draws(target, n=400, num_chains=1, num_mcmc_steps=2)  # a fixed number of moves: no warning


# ---------------------------------------------------------------------------- exact posteriors
@pytest.mark.parametrize("kernel", ["mala", "hmc"])
def test_smc_defaults_on_a_conjugate_regression_with_correlated_predictors(kernel):
    target = regression()
    draws, idata = smc_draws(target, kernel=kernel)
    attrs = idata.posterior.attrs
    assert regression_agrees(draws, target, attrs["log_normalizer"], attrs["log_normalizer_se"])
    # A wrong posterior, the same data under the prior IG(a0 + 3, b0), is rejected by the same check.
    wrong = type(target)(target.X, target.y, a0=target.a0 + 3, b0=target.b0)
    assert not regression_agrees(draws, wrong, attrs["log_normalizer"], attrs["log_normalizer_se"])


def test_smc_defaults_get_sigma_of_an_ar5_model_where_five_diagonal_moves_do_not():
    target = ar5()
    draws, idata = smc_draws(target)
    assert regression_agrees(draws, target, sigma_only=True)
    assert regression_agrees(
        draws, target, idata.posterior.attrs["log_normalizer"], idata.posterior.attrs["log_normalizer_se"]
    )
    old, _ = smc_draws(target, num_chains=1, **OLD)
    assert not regression_agrees(old, target, sigma_only=True)


def mixture_agrees(draws, log_z, gm, weights) -> bool:
    """Mode shares (nearest component) within 0.05 of ``weights`` in total variation, and log Z
    within 0.15 of the mixture's."""
    share = torch.bincount(gm.assign(draws), minlength=3).to(F64) / draws.shape[0]
    tv = 0.5 * float((share - torch.tensor(weights, dtype=F64)).abs().sum())
    return tv < 0.05 and abs(log_z - gm.log_normalizer) < 0.15


def test_smc_defaults_get_the_mode_weights_of_a_6d_mixture_from_a_wide_reference():
    """At the defaults (four runs of 1,000 particles), seeds 0-23: total variation mean 0.026, above
    0.05 on 2 seeds (0.050, 0.059), log Z error at most 0.14 (one run of 1,000: mean 0.053 over seeds
    0-11, 5 above 0.05, log Z error up to 0.17; the shares carry the per-mode evidence noise, which
    four runs halve). Seed 0: 0.015 and -0.055."""
    gm, target = mixture6()
    draws, idata = smc_draws(target)
    log_z = idata.posterior.attrs["log_normalizer"]
    assert mixture_agrees(draws, log_z, gm, (0.5, 0.3, 0.2))
    # The same modes weighted 0.35 / 0.35 / 0.3 are rejected by the same check.
    assert not mixture_agrees(draws, log_z, gm, (0.35, 0.35, 0.3))
    # The clusters found the three modes at the last stage.
    clusters = idata.tempering.num_clusters.values[:, 0]
    assert int(clusters[~np.isnan(clusters)][-1]) >= 3
