"""Gradient ascents to a mode (diffstat.modes.climb), against the exact peaks of Gaussians."""

import torch

from diffstat.modes.climb import ascend, hill_climb
from diffstat.targets import GaussianMixture


def _two_gaussians():
    return GaussianMixture(torch.tensor([[-3.0, 0.0], [3.0, 0.0]]), [0.5, 0.5], scales=[0.5, 0.5]).as_target(
        dtype=torch.float64
    )


def test_hill_climb_reaches_the_peaks():
    target = _two_gaussians()
    x = torch.tensor([[-2.0, 0.7], [4.1, -0.6]], dtype=torch.float64)
    lp, grad = target.log_prob_and_grad(x)
    peak, peak_lp, evals = hill_climb(
        target.log_prob_and_grad, x, lp, grad, 60, torch.full((2,), 0.05, dtype=torch.float64)
    )
    assert torch.allclose(peak, torch.tensor([[-3.0, 0.0], [3.0, 0.0]], dtype=torch.float64), atol=0.02)
    assert (peak_lp >= lp).all() and 0 < evals <= 120


def test_ascend_is_a_contraction_to_the_peak():
    """On N(m, diag(v)) a fixed step h maps x - m to (1 - h / v) (x - m): exact after k steps; a
    step that would make a row non-finite leaves it in place."""
    m, v = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.5, 2.0], dtype=torch.float64)

    def grad_fn(w):
        return -0.5 * ((w - m) ** 2 / v).sum(-1), -(w - m) / v

    w0 = torch.tensor([[3.0, 0.0], [-1.0, 5.0]], dtype=torch.float64)
    end = ascend(grad_fn, w0, 0.1, 7)
    torch.testing.assert_close(end, m + (1 - 0.1 / v) ** 7 * (w0 - m), rtol=1e-12, atol=1e-12)
    blown = ascend(grad_fn, torch.tensor([[1e308, 0.0]], dtype=torch.float64), -1e10, 1)
    assert blown.tolist() == [[1e308, 0.0]]


def test_a_climb_preconditioned_by_the_covariance_takes_newton_steps():
    """On N(m, S) the step x + h S grad log p(x) with h = 1 is Newton's: it lands on m from anywhere,
    however badly scaled and correlated S is; isotropic steps of the same budget stay far off."""
    sd = torch.logspace(-3, 0, 4, dtype=torch.float64)
    cov = sd[:, None] * (0.95 * torch.ones(4, 4, dtype=torch.float64) + 0.05 * torch.eye(4)) * sd[None]
    m = torch.tensor([5.0, -3.0, 2.0, 10.0], dtype=torch.float64)
    gauss = torch.distributions.MultivariateNormal(m, cov)

    def lpg(x):
        x = x.detach().requires_grad_(True)
        lp = gauss.log_prob(x)
        return lp.detach(), torch.autograd.grad(lp.sum(), x)[0]

    x0 = torch.zeros(3, 4, dtype=torch.float64)
    x0[1], x0[2] = 20.0, torch.tensor([-7.0, 1.0, 0.0, 4.0])
    lp, g = lpg(x0)
    one = torch.ones(3, dtype=torch.float64)
    peak, _, evals = hill_climb(lpg, x0, lp, g, 3, one, metric=cov)
    torch.testing.assert_close(peak, m.expand(3, 4), rtol=0, atol=1e-9)
    assert evals <= 9
    flat, _, _ = hill_climb(lpg, x0, lp, g, 3, one * 1e-6)  # the isotropic default, same budget
    assert ((flat - m).abs().max(-1).values > 1.0).all()
