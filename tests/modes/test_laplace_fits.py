"""Newton ascent, Laplace fits and merging in a fit's own metric (diffstat.modes.laplace): exact on
Gaussians in float64."""

import math

import torch

import diffstat as ds
from diffstat.modes.laplace import (
    damped_newton,
    later_duplicates,
    mahalanobis2,
    merge_within,
    newton_ascent,
    safe_cholesky,
)


def _gaussian(generator, d=3):
    a = torch.randn(d, d, generator=generator, dtype=torch.float64)
    prec = a @ a.T + torch.eye(d, dtype=torch.float64)
    mean = torch.randn(d, generator=generator, dtype=torch.float64)

    def log_prob(x):
        diff = x - mean
        return -0.5 * torch.einsum("nd,de,ne->n", diff, prec, diff)

    return ds.Target(log_prob, d, dtype=torch.float64), mean, prec


def test_proximal_newton_reaches_the_mode_monotonically(generator):
    """Proximal Newton on log p contracts x - m by (P + I/s^2)^{-1} I/s^2 per move, so 30 moves
    reach a Gaussian's mode to 1e-9; a start 100 standard deviations out is capped and still
    climbs (the log-density never falls)."""
    target, mean, prec = _gaussian(generator)
    x0 = mean + torch.tensor([[1.0, -2.0, 0.5], [100.0, 0.0, -80.0]], dtype=torch.float64)
    x, lp, g, hess = newton_ascent(target, x0, 4.0, 30)
    torch.testing.assert_close(x, mean.expand(2, -1), rtol=0, atol=1e-9)
    torch.testing.assert_close(hess, -prec.expand(2, -1, -1), rtol=1e-10, atol=1e-10)
    one, lp1, _, _ = newton_ascent(target, x0, 4.0, 1)
    assert (lp1 >= target.log_prob(x0)).all()
    assert float((one[1] - x0[1]).norm()) <= 4.0 * math.sqrt(4.0 * 3) + 1e-9  # the cap


def test_damped_newton_fits_a_gaussian_posterior_exactly(generator):
    """For a Gaussian target the posterior given y is Gaussian: one Hessian evaluation already gives
    its mean and log-evidence exactly (the quadratic model is f itself)."""
    target, mean, prec = _gaussian(generator)
    s2 = 0.7
    y = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    x0 = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    a = prec + torch.eye(3, dtype=torch.float64) / s2
    post_mean = torch.linalg.solve(a, (prec @ mean)[:, None] + y.T / s2).T
    fit = damped_newton(target, x0, y, s2, 1)
    torch.testing.assert_close(fit.mean, post_mean, rtol=1e-10, atol=1e-10)
    # log of the integral of exp(f), f(x) = log p(x) - |x - y|^2 / (2 s^2), in closed form
    f_at = target.log_prob(post_mean) - ((post_mean - y) ** 2).sum(-1) / (2 * s2)
    exact = f_at + 0.5 * 3 * math.log(2 * math.pi) - 0.5 * torch.logdet(a)
    torch.testing.assert_close(fit.log_evidence, exact, rtol=1e-10, atol=1e-10)
    assert fit.num_hessian_evals == 4
    fit3 = damped_newton(target, x0, y, s2, 3)
    torch.testing.assert_close(fit3.mean, post_mean, rtol=1e-10, atol=1e-10)


def test_duplicates_in_each_fits_own_metric():
    """A point is a duplicate when an earlier one holds it within the radius in the earlier one's
    metric: a narrow earlier fit does not absorb a point that a wide one would, and a chain of
    duplicates is dropped whole."""
    x = torch.tensor([[0.0], [1.5], [3.0]], dtype=torch.float64)
    wide = torch.full((3, 1, 1), 1.0, dtype=torch.float64)
    narrow = torch.tensor([[[100.0]], [[1.0]], [[1.0]]], dtype=torch.float64)
    torch.testing.assert_close(
        mahalanobis2(x, x, narrow)[1], torch.tensor([225.0, 0.0, 2.25], dtype=torch.float64)
    )
    assert later_duplicates(mahalanobis2(x, x, wide), 2.0).tolist() == [False, True, True]
    assert later_duplicates(mahalanobis2(x, x, narrow), 2.0).tolist() == [False, False, True]
    # merge_within: the same through Cholesky factors, by decreasing key, per chain
    chol = torch.linalg.cholesky(narrow)[None]
    keep = merge_within(x[None], torch.tensor([[3.0, 2.0, 1.0]], dtype=torch.float64), chol, 2.0)
    assert keep.tolist() == [[True, True, False]]
    keep = merge_within(x[None], torch.tensor([[1.0, 2.0, -math.inf]], dtype=torch.float64), chol, 2.0)
    assert keep.tolist() == [[False, True, False]]  # by key: point 1 first, point 0 at 1.5 sd of it


def test_safe_cholesky_factors_an_indefinite_precision_whose_eigenvalues_span_17_orders():
    """The saddle-free repair of an indefinite precision, |lambda| floored at 1 / s2, factored from its
    eigen-decomposition: rebuilding the matrix and factoring it fails here (centred Eight Schools'
    Newton step, seed 2, raised LinAlgError)."""
    g = torch.Generator().manual_seed(1)
    vec, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64, generator=g))
    lam = torch.tensor([1e17, 1e-3, -2.0, 3.0, 1e9, -1e16, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    a = torch.stack([vec @ torch.diag(lam) @ vec.T, torch.eye(10, dtype=torch.float64) * 4.0])
    chol = safe_cholesky(a, 1.0)
    assert torch.equal(chol[1], torch.eye(10, dtype=torch.float64) * 2.0)  # a good row is untouched
    repaired = vec @ torch.diag(lam.abs().clamp(min=1.0)) @ vec.T
    assert torch.equal(chol[0], chol[0].tril()) and bool((torch.diagonal(chol[0]) > 0).all())
    err = (chol[0] @ chol[0].T - repaired).abs().max() / repaired.abs().max()
    assert err < 1e-14
