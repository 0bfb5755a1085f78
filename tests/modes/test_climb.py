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
