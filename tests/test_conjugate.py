"""Tests of the conjugate models (diffstat/targets/conjugate.py): closed-form posterior moments and
evidence against quadrature and Chib's identity, exact draws against their moments, bad input."""

import math

import pytest
import torch

from diffstat.targets import GammaPrecision, NormalNormal

F64 = torch.float64


def _quadrature(log_prob, grid):
    """log Z, E[g], E[g^2] by the trapezoid rule, ``g`` the grid point (or a map of it)."""
    lp = log_prob(grid[:, None])
    w = (lp - lp.max()).exp()
    z = torch.trapezoid(w, grid)
    return float(torch.log(z) + lp.max()), w / z


def test_normal_normal_against_quadrature():
    x = 1.5 + 0.8 * torch.randn(15, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = NormalNormal(x, prior_mean=-1.0, prior_sd=3.0, sd=0.8)
    grid = torch.linspace(-5.0, 8.0, 40001, dtype=F64)
    log_z, density = _quadrature(exact.log_prob, grid)
    mean = torch.trapezoid(density * grid, grid)
    var = torch.trapezoid(density * (grid - mean) ** 2, grid)
    assert abs(log_z - exact.log_marginal_likelihood()) < 1e-8
    assert abs(float(mean - exact.posterior_mean())) < 1e-8
    assert abs(float(var - exact.posterior_var())) < 1e-8
    # the same quadrature tells a wrong evidence apart (data sd 10% off)
    wrong = NormalNormal(x, prior_mean=-1.0, prior_sd=3.0, sd=0.88)
    assert abs(log_z - wrong.log_marginal_likelihood()) > 1e-3


def test_normal_normal_vector_chib_identity():
    """log p(x) = log p(x | mu) + log p(mu) - log p(mu | x) at any mu, exactly, per coordinate."""
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    exact = NormalNormal(x, prior_mean=0.3, prior_sd=1.7, sd=1.1)
    assert exact.shape == (3,) and exact.dim == 3
    mu = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    posterior = torch.distributions.Normal(exact.posterior_mean(), exact.posterior_var().sqrt())
    chib = exact.log_prob(mu) - posterior.log_prob(mu).sum(-1)
    assert torch.allclose(
        chib, torch.full((5,), exact.log_marginal_likelihood(), dtype=F64), rtol=0, atol=1e-10
    )
    per_column = sum(NormalNormal(x[:, j], 0.3, 1.7, 1.1).log_marginal_likelihood() for j in range(3))
    assert abs(per_column - exact.log_marginal_likelihood()) < 1e-10
    target = exact.as_target()
    assert target.dim == 3 and target.log_normalizer == exact.log_marginal_likelihood()


def test_gamma_precision_against_quadrature():
    x = 0.4 + torch.randn(25, generator=torch.Generator().manual_seed(3), dtype=F64) / 1.5
    exact = GammaPrecision(x, concentration=1.5, rate=0.7, mean=0.4)
    a_n, b_n = exact.posterior_params()
    assert a_n == 1.5 + 12.5 and abs(b_n - (0.7 + 0.5 * float(((x - 0.4) ** 2).sum()))) < 1e-12
    grid = torch.linspace(-8.0, 6.0, 40001, dtype=F64)
    log_z, density = _quadrature(exact.log_prob, grid)
    tau = grid.exp()
    mean = torch.trapezoid(density * tau, grid)
    var = torch.trapezoid(density * (tau - mean) ** 2, grid)
    assert abs(log_z - exact.log_marginal_likelihood()) < 1e-8
    assert abs(float(mean) / exact.posterior_mean() - 1) < 1e-8
    assert abs(float(var) / exact.posterior_var() - 1) < 1e-7
    wrong = GammaPrecision(x, concentration=1.5, rate=0.7, mean=0.5)
    assert abs(log_z - wrong.log_marginal_likelihood()) > 1e-3


@pytest.mark.parametrize("kind", ["normal", "gamma"])
def test_exact_draws(kind):
    x = torch.randn(10, generator=torch.Generator().manual_seed(4), dtype=F64)
    exact = NormalNormal(x, 0.0, 2.0, 1.0) if kind == "normal" else GammaPrecision(x, 2.0, 1.0)
    n = 20000
    draws = exact.sample_posterior(n, torch.Generator().manual_seed(5))
    again = exact.sample_posterior(n, torch.Generator().manual_seed(5))
    assert torch.equal(draws, again) and draws.shape == (n,)
    mean, var = float(exact.posterior_mean()), float(exact.posterior_var())
    assert abs(float(draws.mean()) - mean) < 4 * math.sqrt(var / n)
    # the variance: sd of the sample variance is about var * sqrt(2 / n) (normal), wider for gamma
    assert abs(float(draws.var()) / var - 1) < 4 * math.sqrt(2 / n) * (1 if kind == "normal" else 1.5)


def test_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        NormalNormal(torch.zeros(0))
    with pytest.raises(ValueError, match="finite"):
        GammaPrecision(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="sd must be a positive"):
        NormalNormal(torch.zeros(3), sd=-1.0)
    with pytest.raises(ValueError, match="rate must be a positive"):
        GammaPrecision(torch.zeros(3), rate=0.0)
    with pytest.raises(ValueError, match="shape"):
        NormalNormal(torch.zeros(2, 2, 2))
