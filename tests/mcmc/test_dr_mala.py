"""Delayed-rejection MALA (``diffstat.mcmc.dr_mala``): detailed balance of the stage fluxes checked
exactly, invariance on exact draws of a funnel (and a broken acceptance rule caught by the same
test), the first stage equal to MALA, reproducibility, evaluation counts, and the tempering moves'
recorders merging a later stage's evaluations."""

import math

import pytest
import torch

import diffstat as ds
import diffstat.mcmc.dr_mala as dr_module
from diffstat.mcmc.base import init
from diffstat.mcmc.dr_mala import DelayedRejection, dr_mala_step
from diffstat.mcmc.mala import mala_step
from diffstat.mcmc.metric import DenseMetric
from diffstat.tempering.moves import whitened_move
from diffstat.tempering.path import get_kernel, make_path, move

F64 = torch.float64


def banana_log_prob(x):
    """A non-Gaussian 3-d log-density: a banana in the first two coordinates, a quartic third."""
    return -0.5 * x[:, 0] ** 2 - 2.0 * (x[:, 1] - 0.5 * x[:, 0] ** 2) ** 2 - 0.25 * x[:, 2] ** 4


def banana(x):
    """``(log p (n,), grad (n, 3))`` of :func:`banana_log_prob`."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        lp = banana_log_prob(x)
        (g,) = torch.autograd.grad(lp.sum(), x)
    return lp.detach(), g


def funnel2(x):
    """A 2-d funnel: ``x_1 ~ N(0, 1)``, ``x_2 | x_1 ~ N(0, e^{x_1})``, with its exact gradient."""
    a, b = x[:, 0], x[:, 1]
    lp = -0.5 * a**2 - 0.5 * b**2 * torch.exp(-a) - 0.5 * a
    g = torch.stack([-a + 0.5 * b**2 * torch.exp(-a) - 0.5, -b * torch.exp(-a)], -1)
    return lp, g


def random_paths(stages, metric_kind, seed=0, m=200):
    g = torch.Generator().manual_seed(seed)
    pts = [torch.randn(m, 3, generator=g, dtype=F64) * 1.5 for _ in range(stages + 1)]
    points = [(p, *banana(p)) for p in pts]
    h = 0.05 + torch.rand(m, 1, generator=g, dtype=F64)
    hs = [h / 3.0**i for i in range(stages)]
    if metric_kind == "diag":
        metric = 0.5 + torch.rand(m, 3, generator=g, dtype=F64)
    elif metric_kind == "dense":
        a = torch.randn(3, 3, generator=g, dtype=F64)
        metric = DenseMetric.from_covariance(a @ a.T + torch.eye(3, dtype=F64))
    else:
        metric = None
    return points, hs, metric


@pytest.mark.parametrize("stages,metric_kind", [(2, None), (2, "diag"), (2, "dense"), (3, "diag")])
def test_path_flux_is_symmetric(stages, metric_kind):
    """Detailed balance, exactly: for random points x, y_1, .., y_K (K = 2, 3) of a non-Gaussian
    density, F(x, y_1..y_K) alpha_K(x, y_1..y_K) equals the same for the reversed path (y_K ..
    x), in float64 to 1e-9, with the kernel's own helpers; the same identity fails when the
    (1 - alpha) factors of the rejected stages are left out of the ratio."""
    points, hs, metric = random_paths(stages, metric_kind)
    dr = DelayedRejection(points, hs, metric)
    path = tuple(range(stages + 1))
    fwd = dr.log_flux(path) + dr.log_alpha(path)
    bwd = dr.log_flux(path[::-1]) + dr.log_alpha(path[::-1])
    ok = torch.isfinite(fwd) & torch.isfinite(bwd)
    assert int(ok.sum()) > 150  # most random paths have a positive flux both ways
    assert torch.equal(torch.isfinite(fwd), torch.isfinite(bwd))
    assert float((fwd[ok] - bwd[ok]).abs().max()) < 1e-9

    # the ratio without the rejected stages' (1 - alpha) factors: not symmetric (the test can fail)
    def naive_alpha(p):
        def flux(q):
            return dr.log_prob[q[0]] + sum(dr.log_q(i, q[0], q[i]) for i in range(1, len(q)))

        return (flux(p[::-1]) - flux(p)).clamp(max=0)

    f2 = dr.log_flux(path) + naive_alpha(path)
    b2 = dr.log_flux(path[::-1]) + naive_alpha(path[::-1])
    assert float((f2[ok] - b2[ok]).abs().max()) > 1e-2


class _NoRejectionTerms(DelayedRejection):
    """A wrong rule: the later stages' ratio without the (1 - alpha) factors of the rejected ones."""

    def log_flux(self, path):
        out = self.log_prob[path[0]].clone()
        for i in range(1, len(path)):
            out = out + self.log_q(i, path[0], path[i])
        return torch.nan_to_num(out, nan=-math.inf).masked_fill(self.zero[path[0]], -math.inf)


def _funnel_moments(x):
    """z-scores of E x1 = 0, E x1^2 = 1, E z = 0, E z^2 = 1 and E x1 z^2 = 0 for exact draws of
    ``funnel2`` (z = x2 e^{-x1/2} ~ N(0, 1), independent of x1)."""
    n = x.shape[0]
    a, z = x[:, 0], x[:, 1] * torch.exp(-0.5 * x[:, 0])
    stats = [(a, 0.0, 1.0), (a**2, 1.0, 2.0), (z, 0.0, 1.0), (z**2, 1.0, 2.0), (a * z**2, 0.0, 3.0)]
    return torch.tensor([(s.mean() - m) / math.sqrt(v / n) for s, m, v in stats])


@pytest.mark.parametrize("rule", ["exact", "no_rejection_terms"])
def test_moves_keep_exact_funnel_draws_exact(rule, monkeypatch):
    """100,000 exact draws of a 2-d funnel, 10 DR-MALA steps each (3 stages, factor 4, a first step
    too large for the neck, so that half the moves come from later stages): every particle is a
    chain started at stationarity, so five moments stay within 4.5 Monte Carlo s.e. With the wrong
    acceptance rule of :class:`_NoRejectionTerms` the same test fails."""
    if rule != "exact":
        monkeypatch.setattr(dr_module, "DelayedRejection", _NoRejectionTerms)
    n = 100_000
    g = torch.Generator().manual_seed(3)
    a = torch.randn(n, generator=g, dtype=F64)
    x = torch.stack([a, torch.randn(n, generator=g, dtype=F64) * torch.exp(0.5 * a)], -1)
    state = init(funnel2, x)
    later = 0
    for _ in range(10):
        state, info = dr_mala_step(g, state, funnel2, 0.8, num_stages=3, step_factor=4.0)
        later += int((info.accepted_stage > 1).sum())
    z = _funnel_moments(state.x)
    assert later > 0.3 * 10 * n * float(info.is_accepted.double().mean())  # later stages matter
    assert float((state.x - x).abs().mean()) > 0.3  # the particles moved
    if rule == "exact":
        assert float(z.abs().max()) < 4.5, z
    else:
        assert float(z.abs().max()) > 6.0, z


def test_one_stage_is_mala():
    """``num_stages=1`` is MALA: the same accept decisions and points (to rounding) from the same
    random numbers, with a per-chain diagonal metric."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 3, generator=g, dtype=F64)
    metric = 0.5 + torch.rand(500, 3, generator=g, dtype=F64)
    state = init(banana, x)
    s1, i1 = mala_step(torch.Generator().manual_seed(7), state, banana, 0.3, metric)
    s2, i2 = dr_mala_step(torch.Generator().manual_seed(7), state, banana, 0.3, metric, num_stages=1)
    assert torch.equal(i1.is_accepted, i2.is_accepted)
    assert torch.allclose(s1.x, s2.x, atol=1e-12) and torch.allclose(i1.acceptance_rate, i2.acceptance_rate)
    assert 0.2 < float(i1.is_accepted.double().mean()) < 0.95  # both outcomes occur


def test_reproducible_and_counts_evaluations():
    """The same seed gives the same draws bit for bit, another seed others; ``num_evals`` is the
    number of points the density saw: every row at stage 1, the still-rejected rows after."""
    target = ds.Target(banana_log_prob, 3, dtype=F64)
    x = torch.randn(400, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    state = init(target.log_prob_and_grad, x)

    def step(seed):
        before = target.num_target_evals
        out = dr_mala_step(torch.Generator().manual_seed(seed), state, target.log_prob_and_grad, 1.5,
                           num_stages=3, step_factor=3.0)  # fmt: skip
        return out, target.num_target_evals - before

    (s1, i1), e1 = step(5)
    (s2, i2), _ = step(5)
    (s3, _), _ = step(6)
    assert torch.equal(s1.x, s2.x) and torch.equal(
        i1.stage_acceptance.nan_to_num(-1), i2.stage_acceptance.nan_to_num(-1)
    )
    assert not torch.equal(s1.x, s3.x)
    reached = (~i1.stage_acceptance.isnan()).sum(0)
    assert reached[0] == 400 and 0 < reached[2] < reached[1] < 400
    assert i1.num_evals == e1 == int(reached.sum())
    stage = i1.accepted_stage
    assert torch.equal(stage > 0, i1.is_accepted)
    assert torch.equal(reached[1:], torch.stack([(stage == 0).sum() + (stage >= k).sum() for k in (2, 3)]))


def test_bad_options_and_non_finite_points():
    state = init(banana, torch.zeros(4, 3, dtype=F64))
    for bad in ({"num_stages": 0}, {"num_stages": 1.5}, {"step_factor": 0.0}, {"step_factor": math.inf}):
        with pytest.raises(ValueError):
            dr_mala_step(torch.Generator(), state, banana, 0.1, **bad)

    def half_space(x):  # support x_1 > 0, NaN gradient outside
        lp = torch.where(x[:, 0] > 0, -0.5 * (x**2).sum(-1), -math.inf)
        return lp, torch.where((x[:, :1] > 0), -x, math.nan)

    state = init(half_space, torch.full((2000, 3), 0.05, dtype=F64))
    for _ in range(5):
        state, info = dr_mala_step(torch.Generator().manual_seed(0), state, half_space, 0.5, num_stages=3)
        assert bool((state.x[:, 0] > 0).all()) and bool(torch.isfinite(state.log_prob).all())
    assert float(info.is_accepted.double().mean()) > 0.3


def test_tempering_moves_keep_every_evaluation():
    """Through the tempering moves (``move`` and PT's ``whitened_move``), the moved particles carry
    the path's evaluation at their own points, whichever stage they were accepted at."""
    path = make_path(ds.Target(banana_log_prob, 3, dtype=F64))
    g = torch.Generator().manual_seed(2)
    ps = path.evaluate(torch.randn(600, 3, generator=g, dtype=F64))
    kernel, accept = get_kernel("dr_mala")
    assert accept < 0.574
    beta = torch.rand(600, generator=g, dtype=F64)
    chol = torch.linalg.cholesky(torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.5]], dtype=F64))
    for moved, info in (
        move(kernel, g, ps, path, beta, 1.0, None),
        whitened_move(kernel, g, ps, path, beta, torch.full((600,), 1.0, dtype=F64), chol.expand(3, 3, 3)),
    ):
        assert bool((info.accepted_stage > 1).any())
        fresh = path.evaluate(moved.x)
        for a, b in zip(moved, fresh):
            assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("method", ["smc", "ais", "pt"])
def test_samplers_take_the_dr_mala_kernel(method):
    """``kernel="dr_mala"`` through ``ds.sample``: SMC's and AIS's log Z on a 3-d Gaussian with sds
    0.2, 1, 3 and log Z 1.5, over seeds 0-2, agree with the exact value (mean within 0.1, each
    within 4 reported s.e.) and reject a value 0.3 off (the mean's s.e.); PT's draws have the right
    sds within 15%."""
    scales = torch.tensor([0.2, 1.0, 3.0], dtype=F64)
    target = ds.Target(
        lambda x: torch.distributions.Normal(0.0, scales).log_prob(x).sum(-1) + 1.5, 3, dtype=F64
    )
    if method == "pt":
        idata = ds.sample(
            target, "pt", num_samples=600, num_warmup=300, seed=0, progress=False, kernel="dr_mala"
        )
        x = torch.as_tensor(idata.posterior.x.values).reshape(-1, 3)
        assert float((x.std(0) / scales - 1).abs().max()) < 0.15
        return
    errs, ses = [], []
    for seed in range(3):
        idata = ds.sample(
            target, method, num_samples=600, num_chains=1, seed=seed, progress=False, kernel="dr_mala"
        )
        errs.append(idata.posterior.attrs["log_normalizer"] - 1.5)
        ses.append(idata.posterior.attrs["log_normalizer_se"])
    errs, ses = torch.tensor(errs), torch.tensor(ses)
    mean_se = float(ses.square().sum().sqrt()) / 3
    assert bool((errs.abs() < 4 * ses).all()) and abs(float(errs.mean())) < 0.1
    assert abs(float(errs.mean()) + 0.3) > 4 * mean_se  # a wrong value is rejected
