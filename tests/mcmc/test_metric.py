"""The dense metric: momentum and noise laws, the MALA proposal density against torch's
MultivariateNormal, and invariance of a correlated Gaussian under dense-metric MALA and HMC
(shown to fail when the metric is used inconsistently)."""

import math

import pytest
import torch

from diffstat.mcmc import hmc_step, init, mala_step
from diffstat.mcmc.mala import mala_proposal_log_density
from diffstat.mcmc.metric import DenseMetric, inverse_quadratic, kinetic_energy, sample_momentum, scale_noise

COV = torch.tensor([[1.0, 0.95, 0.2], [0.95, 1.0, 0.1], [0.2, 0.1, 0.5]], dtype=torch.float64)
PREC = torch.linalg.inv(COV)
CHOL = torch.linalg.cholesky(COV)


def log_prob_and_grad(x):
    return -0.5 * ((x @ PREC) * x).sum(-1), -x @ PREC


def exact_draws(n, gen):
    return torch.randn(n, 3, generator=gen, dtype=torch.float64) @ CHOL.T


def test_momentum_and_noise_have_the_metric_covariance():
    gen = torch.Generator().manual_seed(0)
    metric = DenseMetric.from_covariance(COV)
    like = torch.zeros(200_000, 3, dtype=torch.float64)
    p = sample_momentum(gen, metric, like)
    # p ~ N(0, M) with M = COV^{-1}; noise ~ N(0, M^{-1} = COV)
    torch.testing.assert_close(torch.cov(p.T), PREC, atol=0.05 * PREC.abs().max(), rtol=0)
    xi = scale_noise(metric, torch.randn(200_000, 3, generator=gen, dtype=torch.float64))
    torch.testing.assert_close(torch.cov(xi.T), COV, atol=0.02, rtol=0)
    v = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(inverse_quadratic(metric, v), ((v @ PREC) * v).sum(-1))
    torch.testing.assert_close(kinetic_energy(metric, v), 0.5 * ((v @ COV) * v).sum(-1))


def test_dense_mala_proposal_density_matches_multivariate_normal():
    gen = torch.Generator().manual_seed(1)
    metric = DenseMetric.from_covariance(COV)
    x, y = exact_draws(50, gen), exact_draws(50, gen)
    _, g = log_prob_and_grad(x)
    h = torch.full((50, 1), 0.3, dtype=torch.float64)
    mvn = torch.distributions.MultivariateNormal(x + h * (g @ COV), covariance_matrix=2 * 0.3 * COV)
    exact = mvn.log_prob(y)
    ours = mala_proposal_log_density(y, x, g, h, metric)
    const = exact - ours  # equal up to the normalising constant, the same for every pair
    torch.testing.assert_close(const, const[:1].expand(50), rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "step, kwargs",
    [(mala_step, dict(step_size=0.7)), (hmc_step, dict(step_size=0.5, num_steps=4))],
    ids=["mala", "hmc"],
)
def test_dense_metric_kernels_leave_correlated_gaussian_invariant(step, kwargs):
    gen = torch.Generator().manual_seed(2)
    state = init(log_prob_and_grad, exact_draws(100_000, gen))
    metric = DenseMetric.from_covariance(COV)
    for _ in range(5):
        state, info = step(gen, state, log_prob_and_grad, inv_mass=metric, **kwargs)
    n = state.x.shape[0]
    var_z = (state.x.var(0) - COV.diagonal()) / (COV.diagonal() * math.sqrt(2.0 / n))
    assert var_z.abs().max() < 4.5, var_z
    # the correlation of coordinates 0 and 1 (0.95) survives: sd of a sample correlation ~ (1 - r^2)/sqrt(n)
    r = torch.corrcoef(state.x.T)[0, 1]
    assert abs(float(r) - 0.95) < 4.5 * (1 - 0.95**2) / math.sqrt(n)
    assert 0.05 < float(info.acceptance_rate.mean()) < 0.999


def test_inconsistent_metric_is_detected():
    """MALA whose drift uses the dense metric but whose correction assumes the identity is wrong,
    and the same invariance check rejects it."""
    gen = torch.Generator().manual_seed(3)
    metric = DenseMetric.from_covariance(COV)
    state = init(log_prob_and_grad, exact_draws(100_000, gen))
    h = 0.7
    for _ in range(5):
        x, g = state.x, state.grad
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        y = x + h * (g @ COV) + math.sqrt(2 * h) * scale_noise(metric, noise)
        ly, gy = log_prob_and_grad(y)
        hh = torch.full((x.shape[0], 1), h, dtype=x.dtype)
        log_ratio = (
            ly
            - state.log_prob
            + mala_proposal_log_density(x, y, gy, hh, None)
            - mala_proposal_log_density(y, x, g, hh, None)
        )
        from diffstat.mcmc.base import MCMCState, metropolis_accept

        state, _ = metropolis_accept(gen, state, MCMCState(y, ly, gy), log_ratio, x.shape[0])
    n = state.x.shape[0]
    var_z = (state.x.var(0) - COV.diagonal()) / (COV.diagonal() * math.sqrt(2.0 / n))
    assert var_z.abs().max() > 10
