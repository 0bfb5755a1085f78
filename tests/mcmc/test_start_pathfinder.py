"""The start chosen along each chain's path by the ELBO of local Gaussians (diffstat.mcmc.pathfinder)."""

import math

import torch

from diffstat.mcmc.base import init
from diffstat.mcmc.pathfinder import PathChoice, candidates, local_gaussians
from diffstat.mcmc.start import find_start
from diffstat.targets.funnel import Funnel

F64 = torch.float64


def _gaussian(dim: int = 4, log_z: float = 1.5):
    """An unnormalised Gaussian target Z N(m, S): its lpg, mean, precision and log Z."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(dim, dim, generator=gen, dtype=F64)
    prec = a @ a.T + 0.5 * torch.eye(dim, dtype=F64)
    m = torch.randn(dim, generator=gen, dtype=F64)
    dist = torch.distributions.MultivariateNormal(m, precision_matrix=prec)

    def lpg(x):
        return dist.log_prob(x) + log_z, -(x - m) @ prec

    return lpg, m, prec, log_z


def test_local_gaussian_log_density_and_draws_are_exact():
    gen = torch.Generator().manual_seed(0)
    _, m, prec, _ = _gaussian()
    z = torch.randn(1, 5, 4, generator=gen, dtype=F64)
    draws, log_q, ok = local_gaussians(m[None], prec[None], z)
    assert bool(ok.all())
    dist = torch.distributions.MultivariateNormal(m, precision_matrix=prec)
    torch.testing.assert_close(log_q[0], dist.log_prob(draws[0]), rtol=1e-12, atol=1e-12)
    # draws = m + L^{-T} z with P = L L^T: (draw - m)^T P (draw - m) = |z|^2
    d = draws[0] - m
    torch.testing.assert_close(((d @ prec) * d).sum(-1), (z[0] ** 2).sum(-1), rtol=1e-10, atol=1e-12)
    # an indefinite precision has no Cholesky factor: no draws
    bad = torch.diag(torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=F64))[None]
    draws, _, ok = local_gaussians(m[None], bad, z)
    assert not bool(ok.any()) and bool(draws.isnan().all())


def test_on_a_gaussian_the_candidate_is_the_posterior_and_its_elbo_is_log_z():
    # at any point, Pathfinder's Gaussian N(x + H^{-1} g, H^{-1}) of a Gaussian target is the target
    # itself, so every draw's log-weight log pi - log q is log Z exactly
    lpg, m, prec, log_z = _gaussian()
    x = torch.tensor([[3.0, -2.0, 0.5, 7.0], [0.0, 0.0, 0.0, 0.0]], dtype=F64)
    _, g = lpg(x)
    hess = prec.expand(2, 4, 4)
    (rows, mean, p, laplace), *rest = candidates(x, g, hess)
    assert not rest and rows.tolist() == [0, 1] and laplace
    torch.testing.assert_close(mean, m.expand(2, 4), rtol=1e-10, atol=1e-10)
    choice = PathChoice(torch.Generator().manual_seed(0), lpg, x)
    choice.visit(torch.arange(2), x, g, hess)
    torch.testing.assert_close(choice.elbo, torch.full((2,), log_z, dtype=F64), rtol=0, atol=1e-10)
    torch.testing.assert_close(choice.covariance(), torch.linalg.inv(prec), rtol=1e-10, atol=1e-12)
    x, lp, g, ok = choice.starts()
    assert bool(ok.all())
    torch.testing.assert_close((lp, g), lpg(x))
    # the starts are two distinct draws of the four (all four have the weight Z): resampled apart
    assert not torch.equal(x[0], x[1])


def test_an_indefinite_hessian_gives_two_gaussians_and_the_better_one_is_kept():
    # where H is indefinite: N(x + D^{-1} g, D^{-1}) (D = |diag H|) and N(x, |H|^{-1}); a worse
    # candidate visited later does not replace a chain's best
    lpg, m, prec, log_z = _gaussian()
    x = torch.zeros(1, 4, dtype=F64)
    _, g = lpg(x)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=F64))
    hess = (q @ torch.diag(torch.tensor([-2.0, 1.0, 3.0, 4.0], dtype=F64)) @ q.T)[None]
    found = candidates(x, g, hess)
    assert len(found) == 2
    (_, mean_d, p_d, lap_d), (_, mean_abs, p_abs, lap_abs) = found
    assert not lap_d and not lap_abs
    d = hess[0].diagonal().abs()
    torch.testing.assert_close(mean_d[0], x[0] + g[0] / d)
    torch.testing.assert_close(p_d[0], torch.diag(d))
    torch.testing.assert_close(mean_abs, x)
    torch.testing.assert_close(p_abs[0], q @ torch.diag(torch.tensor([2.0, 1.0, 3.0, 4.0], dtype=F64)) @ q.T)
    choice = PathChoice(torch.Generator().manual_seed(0), lpg, x)
    choice.visit(torch.arange(1), x, g, prec[None])  # the exact one: ELBO log Z
    choice.visit(torch.arange(1), x, g, hess)
    assert abs(float(choice.elbo[0]) - log_z) < 1e-10  # no Gaussian beats the target itself


def test_start_on_neals_funnel_is_in_the_bulk_not_down_the_neck():
    """Neal's funnel(10) in float64 from 64 exact draws (x_1 ~ N(0, 3)): the climb and Newton steps run
    down the neck (before: start x_1 mean -8.2, min -32.5, sd 12.6). The chosen starts' x_1 must look
    like the posterior's: mean within 3 standard errors (3 sd / 8) of 0, none below -10 (posterior
    P(x_1 < -10) = 4e-4), sd within a factor 1.5 of 3. The default start (main's) fails it."""
    funnel = Funnel(10)
    target = funnel.as_target(dtype=F64)
    gen = torch.Generator().manual_seed(0)
    state = init(target.log_prob_and_grad, funnel.sample(64, gen))
    out, cov = find_start(gen, state, target.log_prob_and_grad, typical=True)
    x1 = out.x[:, 0]
    assert abs(float(x1.mean())) < 3 * 3 / math.sqrt(64), x1
    assert float(x1.min()) > -10, x1
    assert 2 < float(x1.std()) < 4.5, x1
    assert bool(torch.isfinite(out.log_prob).all())
    assert cov is None  # no chain chose a Laplace fit (the Hessians in the bulk are indefinite)
    torch.testing.assert_close(out.log_prob, target.log_prob_and_grad(out.x)[0])


def test_the_default_start_is_mains_and_fails_the_funnel_check():
    # typical=False (ds.sample's default) keeps the Laplace jitter: on the same funnel the chains
    # start down the neck, which the test above rejects
    funnel = Funnel(10)
    target = funnel.as_target(dtype=F64)
    gen = torch.Generator().manual_seed(0)
    state = init(target.log_prob_and_grad, funnel.sample(64, gen))
    out, _ = find_start(gen, state, target.log_prob_and_grad)
    assert float(out.x[:, 0].mean()) < -3 * 3 / math.sqrt(64)


def test_typical_start_on_a_gaussian_is_the_laplace_fit():
    # on a Gaussian every positive definite candidate is the target itself (ELBO log Z), so the
    # handed covariance is the target's (finite-difference Hessians: to 1e-5) and the starts are
    # draws of it, all distinct
    lpg, m, prec, _ = _gaussian()
    gen = torch.Generator().manual_seed(0)
    x0 = m + 10 * torch.randn(6, 4, generator=gen, dtype=F64)
    out, cov = find_start(gen, init(lpg, x0), lpg, typical=True)
    torch.testing.assert_close(cov, torch.linalg.inv(prec), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.log_prob, lpg(out.x)[0])
    assert len({tuple(r) for r in out.x.tolist()}) == 6
