"""The final correction (MALA on p(x | y) from the jump) on an anisotropic Gaussian, where its
closed form is known: X ~ N(0, Sigma), Y = X + s Z, the jump E[X | y] = C y / s^2 with
C = (Sigma^-1 + I/s^2)^-1. Twenty steps preconditioned by C (from the Fisher information Sigma^-1)
restore Var(X) = Sigma along every principal axis; unpreconditioned, the step is set by the narrowest
axis and the widest stays short (the ionosphere failure of docs/sms.md)."""

import math

import torch

from diffstat.smoothing.correction import correct_jumps, posterior_metric
from diffstat.targets import GaussianMixture

DIM, N, S2, STEPS = 16, 2000, 1.0, 20


def problem():
    """Sigma with principal sds 0.1 to 1 on random axes; ``(target, Sigma, axes, jumps, walkers)``."""
    gen = torch.Generator().manual_seed(0)
    axes, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=gen, dtype=torch.float64))
    sds = torch.logspace(-1, 0, DIM, dtype=torch.float64)
    sigma = axes @ torch.diag(sds**2) @ axes.T
    target = GaussianMixture(torch.zeros(1, DIM), torch.ones(1), covs=sigma[None]).as_target(
        dtype=torch.float64
    )
    x = torch.randn(N, DIM, generator=gen, dtype=torch.float64) @ (axes * sds).T
    y = x + math.sqrt(S2) * torch.randn(N, DIM, generator=gen, dtype=torch.float64)
    cov = torch.linalg.inv(torch.linalg.inv(sigma) + torch.eye(DIM, dtype=torch.float64) / S2)
    jumps = y @ cov / S2  # C symmetric
    return target, sigma, axes, sds, jumps[None], y[None]


def axis_variance_ratio(x, axes, sds) -> torch.Tensor:
    """Var(u_i' X) / sd_i^2 along each principal axis u_i, ``(DIM,)``."""
    return (x.reshape(-1, DIM) @ axes).var(0) / sds**2


def test_metric_is_the_posterior_covariance():
    """posterior_metric(F, s^2) is (F + I/s^2)^-1, and the identity (None) without F."""
    target, sigma, *_ = problem()
    fisher = torch.linalg.inv(sigma)
    metric = posterior_metric(fisher, S2, sigma)
    expected = torch.linalg.inv(fisher + torch.eye(DIM, dtype=torch.float64) / S2)
    torch.testing.assert_close(metric.inv_mass, expected, rtol=1e-8, atol=1e-12)
    assert posterior_metric(None, S2, sigma) is None


def test_preconditioned_correction_restores_the_spread():
    """Each axis's variance within 4 MC sd (sqrt(2/N) relative, 3.2%) of Sigma's after 20 preconditioned
    steps; the jumps alone keep at most s_i^2/(s_i^2 + s^2) of it (a half on the widest axis), and 20
    unpreconditioned steps leave the widest axis more than 20% short: the check can fail."""
    target, sigma, axes, sds, jumps, y = problem()
    assert float(axis_variance_ratio(jumps, axes, sds)[-1]) < 0.6
    gen = torch.Generator().manual_seed(1)
    x, lp, _ = correct_jumps(gen, target, jumps, y, S2, STEPS, torch.linalg.inv(sigma))
    ratio = axis_variance_ratio(x, axes, sds)
    assert float((ratio - 1).abs().max()) < 4 * math.sqrt(2 / N), ratio
    assert torch.isfinite(lp).all()
    plain, _, _ = correct_jumps(torch.Generator().manual_seed(1), target, jumps, y, S2, STEPS)
    assert float(axis_variance_ratio(plain, axes, sds)[-1]) < 0.8
