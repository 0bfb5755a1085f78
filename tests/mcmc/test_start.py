"""The start phase: ascent, Newton refinement, Laplace jitter (diffstat.mcmc.start)."""

import torch

from diffstat.mcmc.base import init
from diffstat.mcmc.start import find_start


def _regression_like():
    """log pi(b, s) = -n s - r(b) exp(-2 s) / 2 with r(b) = 1 + (b - 50)^2 * 100: a coefficient b
    whose curvature vanishes as the scale exp(s) grows (the geometry of a flat-prior regression)."""
    n = 400.0

    def lpg(x):
        x = x.detach().requires_grad_(True)
        b, s = x[:, 0], x[:, 1]
        lp = -n * s - (1 + 100 * (b - 50) ** 2) * torch.exp(-2 * s) / 2
        (g,) = torch.autograd.grad(lp.sum(), x)
        return lp.detach(), g

    return lpg


def test_start_reaches_the_mode_region_of_a_flat_valley(generator):
    lpg = _regression_like()
    x0 = torch.tensor([[0.0, 6.0], [200.0, 8.0], [-100.0, 5.0], [10.0, 7.0]], dtype=torch.float64)
    state, cov = find_start(generator, init(lpg, x0), lpg)
    # mode: b = 50, exp(-2 s) = n, s = -log(n) / 2; the Laplace jitter puts lp within ~chi2_2 / 2 of it
    s_mode = -0.5 * torch.log(torch.tensor(400.0, dtype=torch.float64))
    lp_mode = lpg(torch.tensor([[50.0, float(s_mode)]], dtype=torch.float64))[0]
    assert bool((state.log_prob > lp_mode - 10).all()), (state.log_prob, lp_mode)
    assert cov is not None
    # Laplace variance of b at the mode: exp(2 s) / 100 = 1 / (100 n)
    assert abs(float(cov[0, 0]) * 100 * 400 - 1) < 0.05


def test_hessian_in_batches_of_the_chains_equals_one_call(monkeypatch):
    # 3,000 chains of a 3-d target: the 9,000 shifted points go in batches of 3,000 (at least
    # MIN_BATCH); the Hessians are those of one call on all points, bit for bit (the target is
    # elementwise), and every point is evaluated once
    from diffstat.mcmc import start

    scales = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    sizes = []

    def lpg(x):
        sizes.append(x.shape[0])
        return -0.5 * ((x / scales) ** 2).sum(-1) - (x**4).sum(-1), -x / scales**2 - 4 * x**3

    x = torch.randn(3000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = lpg(x)[1]
    sizes.clear()
    batched = start._hessian(lpg, x, g)
    assert sizes == [3000, 3000, 3000]
    monkeypatch.setattr(start, "MIN_BATCH", 10**6)
    sizes.clear()
    assert torch.equal(start._hessian(lpg, x, g), batched) and sizes == [9000]
    exact = torch.diag_embed(1 / scales**2 + 12 * x**2)
    torch.testing.assert_close(batched, exact, rtol=1e-6, atol=1e-6)


def test_newton_direction_by_cholesky_equals_the_eigendecomposition():
    # positive definite Hessians take the Cholesky path and agree with |H|^{-1} g to rounding; an
    # indefinite one and one with an eigenvalue under EIGEN_FLOOR of the largest (where |H| is not H)
    # take the eigendecomposition, and equal it exactly
    from diffstat.mcmc import start

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 5, 5, generator=gen, dtype=torch.float64)
    hess = a @ a.transpose(1, 2) + 0.5 * torch.eye(5, dtype=torch.float64)
    q, _ = torch.linalg.qr(a[4])
    hess[4] = q @ torch.diag(torch.tensor([1.0, 2.0, -3.0, 4.0, 5.0], dtype=torch.float64)) @ q.T
    hess[5] = q @ torch.diag(torch.tensor([1e-14, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)) @ q.T
    g = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    fast, exact = start._newton_direction(hess, g), start._eigen_direction(hess, g)
    torch.testing.assert_close(fast[:4], exact[:4], rtol=1e-10, atol=1e-12)
    assert torch.equal(fast[4:], exact[4:])
    # the Cholesky direction would have ignored the floor: 1e14 times longer along q[:, 0]
    assert not torch.allclose(torch.linalg.solve(hess[5], g[5]), exact[5])


def _centred_eight_schools():
    """The centred Eight Schools posterior in (mu, log tau, theta_1..8), with the log-Jacobian:
    mu ~ N(0, 5), tau ~ HalfCauchy(5), theta_j ~ N(mu, tau), y_j ~ N(theta_j, sigma_j). Its density
    is unbounded above as tau -> 0 with theta_j = mu (a funnel's neck), far below its bulk."""
    y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], dtype=torch.float64)
    sigma = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], dtype=torch.float64)

    def lpg(x):
        x = x.detach().requires_grad_(True)
        mu, log_tau, theta = x[:, 0], x[:, 1], x[:, 2:]
        tau = log_tau.exp()
        lp = -0.5 * (mu / 5) ** 2 - torch.log1p((tau / 5) ** 2) + log_tau
        lp = lp - 8 * log_tau - 0.5 * (((theta - mu[:, None]) / tau[:, None]) ** 2).sum(-1)
        lp = lp - 0.5 * (((y - theta) / sigma) ** 2).sum(-1)
        (g,) = torch.autograd.grad(lp.sum(), x)
        return lp.detach(), g

    return lpg


def test_start_does_not_chase_a_funnel_neck():
    """On the centred Eight Schools the climb and Newton steps ran down the neck to log tau = -10
    and the Laplace jitter there, where the curvature changes within one of its own standard
    deviations, left the chains at log-densities -3e4 to -7e5 (the prior draws: -60 to -2,700);
    NUTS then spent 1,023 leapfrog steps per iteration (an hour at defaults). A jitter that falls
    more than 10 + 2 dim nats sends the chain back to the ascent's end (or its initial point)."""
    lpg = _centred_eight_schools()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.cat(
        [
            5 * torch.randn(4, 1, generator=gen),
            torch.randn(4, 1, generator=gen),
            10 * torch.randn(4, 8, generator=gen),
        ],
        1,
    )
    start = init(lpg, x0.double())
    state, cov = find_start(torch.Generator().manual_seed(0), start, lpg)
    assert bool((state.log_prob >= start.log_prob.min()).all()), (state.log_prob, start.log_prob)
    assert bool((state.x[:, 1] > -6).all()), state.x[:, 1]  # posterior P(log tau < -6) < 1e-3


def _centred_ar1(steps: int = 60, obs_sd: float = 0.7):
    """The audit's latent AR(1) posterior (``benchmarks/audit_cases_pyro.py``, ``ar1_latent``) in
    Pyro's unconstrained coordinates (u, log sigma, x_1..x_60), phi = 2 sigmoid(u) - 1 ~ U(-1, 1),
    sigma ~ HalfNormal(1), x stationary AR(1), y_t ~ N(x_t, 0.7), with the log-Jacobians. Unbounded
    above as sigma -> 0 with x_t = phi x_{t-1}; the prior draws' log-densities are about -150 to -220."""
    import numpy as np

    rng = np.random.default_rng(32)
    x = np.zeros(steps)
    x[0] = 0.5 / np.sqrt(1 - 0.64) * rng.standard_normal()
    for t in range(1, steps):
        x[t] = 0.8 * x[t - 1] + 0.5 * rng.standard_normal()
    y = torch.tensor(x + obs_sd * rng.standard_normal(steps))

    def lpg(z):
        z = z.detach().requires_grad_(True)
        s, log_sigma, x = torch.sigmoid(z[:, 0]), z[:, 1], z[:, 2:]
        phi, sigma = 2 * s - 1, log_sigma.exp()
        q = (1 - phi**2) * x[:, 0] ** 2 + ((x[:, 1:] - phi[:, None] * x[:, :-1]) ** 2).sum(-1)
        lp = torch.log(2 * s * (1 - s)) - sigma**2 / 2 + log_sigma
        lp = lp - steps * log_sigma + 0.5 * torch.log1p(-(phi**2)) - q / (2 * sigma**2)
        lp = lp - 0.5 * (((y - x) / obs_sd) ** 2).sum(-1)
        (g,) = torch.autograd.grad(lp.sum(), z)
        return lp.detach(), g

    return lpg


def test_start_does_not_stay_on_a_neck_the_ascent_ran_down():
    """On the latent AR(1) model the ascent itself ran down the neck (sigma 0.003 to 0.007, phi
    -0.75 to -0.97; the posterior: sigma 0.39 +- 0.11, phi 0.72 +- 0.15), Newton went on to sigma
    1e-8 (lp +590 to +860) and the Laplace jitter failed there; the fall-back to the ascent's end kept
    the chains in the neck (lp +135 to +188) and NUTS spent 1 to 2 s per warm-up iteration. A chain
    whose Newton steps climb more than 10 + 2 dim nats above the ascent's end goes back to its
    initial point instead."""
    lpg = _centred_ar1()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.cat([torch.randn(4, 1, generator=gen), 0.5 * torch.randn(4, 1, generator=gen)], 1).double()
    x0 = torch.cat([x0, x0[:, 1:].exp() * torch.randn(4, 60, generator=gen).double()], 1)
    start = init(lpg, x0)
    state, _ = find_start(torch.Generator().manual_seed(0), start, lpg)
    sigma = state.x[:, 1].exp()
    # the exact posterior (quadrature over phi and log sigma in [-8, 0.5]): P(sigma < 0.05) = 2.3e-4
    assert bool((sigma > 0.05).all()), sigma


def test_a_laplace_jitter_whose_one_positive_definite_hessian_is_singular_gives_no_metric():
    """One chain on a ring's crest (radius 5, width 0.2): its Hessian of -log p is 25 u u^T, flat along
    the ring, and passes Cholesky by a rounded pivot; the others are indefinite. The mean of the one
    is singular: no first metric (warm-up starts from the identity), where ``linalg.inv`` raised
    (``ds.sample(ring, "nuts", seed=7)`` crashed). A regular Hessian still gives its inverse."""
    from diffstat.mcmc.start import _laplace_jitter

    h = [["0x1.387a4b7117cd6p+4", "-0x1.4abfcd33e273cp+3"], ["-0x1.4abfcd33e273cp+3", "0x1.5e16d0fba0caap+2"]]
    crest = torch.tensor([[float.fromhex(v) for v in row] for row in h], dtype=torch.float64)  # the run's
    hess = torch.stack([-torch.eye(2, dtype=torch.float64), crest, -torch.eye(2, dtype=torch.float64)])
    noise, a_min = torch.ones(3, 2, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    _, cov = _laplace_jitter(hess, noise, a_min)
    assert cov is None
    _, cov = _laplace_jitter(torch.stack([torch.eye(2) * 4.0, -torch.eye(2)]).double(), noise[:2], a_min[:2])
    assert torch.allclose(cov, torch.eye(2, dtype=torch.float64) / 4.0)
