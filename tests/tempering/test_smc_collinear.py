"""SMC on a collinear regression (issue 13, ``docs/smc_collinear.md``): the particle metric keeps the
conditioning of a posterior whose correlation matrix is nearly singular, and SMC at its defaults gets
the exact posterior and evidence of the 25-coefficient analogue of posteriordb's diamonds."""

import warnings

import torch
from correlated_targets import collinear
from test_smc_correlated import regression_agrees, smc_draws

from diffstat.tempering.core import cloud_metric
from diffstat.tempering.moves import particle_metric, weighted_covariance
from diffstat.tempering.smc import DENSE_RATIO

F64 = torch.float64


def narrowest_widening(metric, cov) -> float:
    """The metric's variance over ``cov``'s along ``cov``'s narrowest eigenvector."""
    _, vecs = torch.linalg.eigh(cov)
    v = vecs[:, 0]
    return float(v @ metric.inv_mass @ v / (v @ cov @ v))


def test_capped_shrinkage_keeps_a_collinear_cloud_conditioned(generator):
    target = collinear()
    cov = target.Vn * target.bn / (target.an - 1)
    x = torch.randn(1000, 25, generator=generator, dtype=F64) @ torch.linalg.cholesky(cov).T
    log_w = 0.3 * torch.randn(1000, generator=generator, dtype=F64)
    s = weighted_covariance(x, torch.softmax(log_w, -1))
    scale = s.diagonal().rsqrt()
    mu = float(torch.linalg.eigvalsh(scale[:, None] * s * scale[None, :]).min())
    n_eff = float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)))
    assert mu < 1e-3 < 25 / n_eff  # the cap binds
    capped = particle_metric(x, log_w, "auto", keep_conditioning=True, dense_ratio=DENSE_RATIO)
    expected = (1 - mu) * s + mu * torch.diag(s.diagonal())
    assert torch.allclose(capped.inv_mass, expected, rtol=1e-9, atol=0)
    assert narrowest_widening(capped, s) < 2.0
    # The plain d / n_eff shrinkage widens the narrowest direction a hundredfold and more.
    assert narrowest_widening(particle_metric(x, log_w, "auto"), s) > 100
    # A well-conditioned cloud is shrunk by d / n_eff as before.
    y = torch.randn(1000, 25, generator=generator, dtype=F64)
    m = particle_metric(y, log_w, "auto", keep_conditioning=True)
    assert torch.equal(m.inv_mass, particle_metric(y, log_w, "auto").inv_mass)


def test_smc_metric_is_dense_from_four_effective_particles_per_dimension(generator):
    x = torch.randn(120, 25, generator=generator, dtype=F64)  # 4.8 per dimension
    ps = type("PS", (), {"x": x})()
    metric, _, _ = cloud_metric("auto", False, dense_ratio=DENSE_RATIO, keep_conditioning=True)(
        generator, 0, ps, torch.zeros(120, dtype=F64)
    )
    assert metric.inv_mass.shape == (25, 25)
    metric, _, _ = cloud_metric("auto", False)(generator, 0, ps, torch.zeros(120, dtype=F64))
    assert metric.shape == (25,)  # the diagonal under the general rule (10 per dimension)


def test_smc_defaults_on_the_collinear_regression():
    """One run of 1,000 particles (about 0.9M evaluations); before the cap the same run's means were
    1.0 sd off, its sds 62%, and it warned that the moves hit max_mcmc_steps."""
    target = collinear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        draws, idata = smc_draws(target, num_chains=1, check_modes=False)
    attrs = idata.posterior.attrs
    assert regression_agrees(draws, target, attrs["log_normalizer"], attrs["log_normalizer_se"])
    wrong = type(target)(target.X, target.y, prior_scale=10.0, a0=target.a0 + 3, b0=target.b0)
    assert not regression_agrees(draws, wrong, attrs["log_normalizer"], attrs["log_normalizer_se"])
