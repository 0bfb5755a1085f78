"""AIS on a collinear regression (issue 13, ``docs/ais_pt_errors.md``): the pilot's covariances (its
moves' metric, the preconditioners it hands to AIS, the fitted reference) keep the conditioning of
a posterior whose correlation matrix is nearly singular, and AIS at its defaults gets the exact
posterior means and evidence of the 25-coefficient analogue of posteriordb's diamonds."""

import math
import warnings

import torch
from correlated_targets import collinear

import diffstat as ds
from diffstat.tempering.schedules import pilot_reference

F64 = torch.float64


def test_pilot_reference_keeps_a_collinear_cloud_conditioned(generator):
    """250 exact posterior draws in 26 dimensions (under 10 per dimension, where the pilot's
    covariance is shrunk): the reference is no wider than REFERENCE_SCALE^2 times 2 along the
    posterior's narrowest direction (d / n shrinkage alone widens it about 10^4-fold)."""
    target = collinear()
    cov = target.Vn * target.bn / (target.an - 1)
    x = torch.randn(250, 25, generator=generator, dtype=F64) @ torch.linalg.cholesky(cov).T
    reference = pilot_reference(x, scale=1.0)
    _, vecs = torch.linalg.eigh(cov)
    v = vecs[:, 0]
    assert float(v @ reference.covariance_matrix @ v / (v @ cov @ v)) < 2.0 * 1.5


def ais_agrees(x: torch.Tensor, attrs: dict, exact) -> bool:
    """Means of beta within 4 Monte Carlo sds (``sqrt(1/ESS + 1/n)`` posterior sds: weighted particles
    resampled to ``n`` draws), E sigma likewise, and log Z within 4 of its standard errors."""
    n = x.shape[0]
    tol = 4 * math.sqrt(1 / attrs["ess"] + 1 / n)
    beta, sigma = x[:, :-1], torch.exp(x[:, -1])
    ok = bool(((beta.mean(0) - exact.beta_mean).abs() < tol * exact.beta_sd).all())
    ok &= abs(float(sigma.mean()) - exact.sigma_mean) < tol * exact.sigma_sd
    return ok and abs(attrs["log_normalizer"] - exact.log_evidence) < 4 * attrs["log_normalizer_se"]


def test_ais_defaults_on_the_collinear_regression():
    """One run of 1,000 particles (228,064 evaluations). Before the pilot's shrinkage was capped
    the same run's weights collapsed (ESS 1.5, a warning), means 3.0 sd off and log Z 94 too low."""
    target = collinear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        idata = ds.sample(target, "ais", num_samples=1000, seed=0, progress=False, check_modes=False)
    attrs = idata.posterior.attrs
    x = torch.as_tensor(idata.posterior.x.values).reshape(-1, target.dim)
    assert attrs["log_normalizer_reliable"]
    assert ais_agrees(x, attrs, target)
    wrong = type(target)(target.X, target.y, prior_scale=10.0, a0=target.a0 + 3, b0=target.b0)
    assert not ais_agrees(x, attrs, wrong)
