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


def per_chain_values(n, low, high, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)


# step sizes below the leapfrog's stability limit, twice the smallest standard deviation of the
# preconditioned target (0.15, 0.23 and 1 for the identity, diagonal and dense metrics)
METRICS = {
    "identity, one step size per chain": {
        "step_size": per_chain_values(20_000, 0.08, 0.22),
        "inv_mass": None,
    },
    "diagonal": {"step_size": 0.25, "inv_mass": SCALES**2},
    "diagonal, one per chain": {
        "step_size": 0.2,
        "inv_mass": SCALES**2 * per_chain_values(20_000, 0.7, 1.3, 6)[:, None],
    },
    "dense": {"step_size": 0.9, "inv_mass": DenseMetric.from_covariance(COV)},
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


def uniform_weights(h0, log_prob, twice_kinetic):
    """A broken leaf weight: every point of the trajectory weighs 1 (uniform sampling)."""
    return torch.zeros_like(log_prob)


def test_uniform_sampling_breaks_invariance(monkeypatch):
    """The same test rejects NUTS that draws from the trajectory uniformly (weights e^{H0-H}
    replaced by 1): the multinomial weights are what makes the kernel exact."""
    monkeypatch.setattr(nuts_module, "_leaf_log_weight", uniform_weights)
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
    for value in (new.x, new.log_prob, new.grad, info.energy):
        assert torch.isfinite(value).all()
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


# ---------------------------------------------------------------- a one-chain recursive reference
REF_SCALES = np.array([1.0, 3.0])


def ref_log_prob_and_grad(x):
    return -0.5 * np.sum((x / REF_SCALES) ** 2), -x / REF_SCALES**2


def _criterion(p_sharp_minus, p_sharp_plus, rho):
    return p_sharp_plus @ rho > 0 and p_sharp_minus @ rho > 0


class RecursiveNUTS:
    """Stan's ``base_nuts.hpp`` transition for one chain, identity metric, written recursively."""

    def __init__(self, rng, h, max_depth=10):
        self.rng, self.h, self.max_depth = rng, h, max_depth

    def momentum(self, x):
        return self.rng.standard_normal(x.shape)

    def forward(self):
        return self.rng.uniform() > 0.5

    def leaf(self, z, sign):
        x, p, g, _ = z
        p = p + 0.5 * sign * self.h * g
        x = x + sign * self.h * p
        lp, g = ref_log_prob_and_grad(x)
        return (x, p + 0.5 * sign * self.h * g, g, lp)

    def build_tree(self, depth, z, sign):
        """Returns (valid, z at the far end, proposal, log weight, rho, p at the near end, p far)."""
        if depth == 0:
            z = self.leaf(z, sign)
            self.n_leapfrog += 1
            energy = -z[3] + 0.5 * z[1] @ z[1]
            energy = math.inf if math.isnan(energy) else energy
            self.divergent = energy - self.h0 > 1000
            self.sum_metro += min(1.0, math.exp(self.h0 - energy))
            return not self.divergent, z, z, self.h0 - energy, z[1].copy(), z[1], z[1]
        valid, z, prop, lw_init, rho_init, p_beg, p_init_end = self.build_tree(depth - 1, z, sign)
        if not valid:
            return (False,) + (None,) * 6
        valid, z, prop_final, lw_final, rho_final, p_final_beg, p_end = self.build_tree(depth - 1, z, sign)
        if not valid:
            return (False,) + (None,) * 6
        lw = np.logaddexp(lw_init, lw_final)
        if self.rng.uniform() < math.exp(lw_final - lw):
            prop = prop_final
        rho = rho_init + rho_final
        persist = (
            _criterion(p_beg, p_end, rho)
            and _criterion(p_beg, p_final_beg, rho_init + p_final_beg)
            and _criterion(p_init_end, p_end, rho_final + p_init_end)
        )
        return persist, z, prop, lw, rho, p_beg, p_end

    def transition(self, x):
        lp, g = ref_log_prob_and_grad(x)
        p = self.momentum(x)
        self.h0, self.n_leapfrog, self.sum_metro = -lp + 0.5 * p @ p, 0, 0.0
        z_fwd = z_bck = sample = (x, p, g, lp)
        p_fwd_fwd = p_fwd_bck = p_bck_fwd = p_bck_bck = rho = p
        log_weight, depth = 0.0, 0
        while depth < self.max_depth:
            if self.forward():
                rho_bck, p_bck_fwd = rho, p_fwd_fwd
                valid, z_fwd, prop, lw, rho_fwd, p_fwd_bck, p_fwd_fwd = self.build_tree(depth, z_fwd, 1)
            else:
                rho_fwd, p_fwd_bck = rho, p_bck_bck
                valid, z_bck, prop, lw, rho_bck, p_bck_fwd, p_bck_bck = self.build_tree(depth, z_bck, -1)
            if not valid:
                break
            depth += 1
            if self.rng.uniform() < math.exp(lw - log_weight):  # biased progressive sampling
                sample = prop
            log_weight = np.logaddexp(log_weight, lw)
            rho = rho_bck + rho_fwd
            if not (
                _criterion(p_bck_bck, p_fwd_fwd, rho)
                and _criterion(p_bck_bck, p_fwd_bck, rho_bck + p_fwd_bck)
                and _criterion(p_bck_fwd, p_fwd_fwd, rho_fwd + p_bck_fwd)
            ):
                break
        energy = -sample[3] + 0.5 * sample[1] @ sample[1]
        return sample[0], depth, self.n_leapfrog, self.sum_metro / self.n_leapfrog, energy


def transition_statistics(x0, x1, depth, n_leapfrog, accept, energy):
    return {
        "depth": np.asarray(depth),
        "n_leapfrog": np.asarray(n_leapfrog),
        "accept": np.asarray(accept),
        "energy": np.asarray(energy),
        "jump": np.sum((np.asarray(x1) - np.asarray(x0)) ** 2, -1),
    }


def reference_statistics(num, seed, step_size):
    rng = np.random.default_rng(seed)
    nuts = RecursiveNUTS(rng, step_size)
    x0 = rng.standard_normal((num, 2)) * REF_SCALES
    out = [nuts.transition(x) for x in x0]
    return transition_statistics(x0, *[np.array(v) for v in zip(*out)])


def batched_statistics(num, seed, step_size):
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor(REF_SCALES)

    def lpg(x):
        return -0.5 * ((x / scales) ** 2).sum(-1), -x / scales**2

    x0 = torch.randn(num, 2, generator=gen, dtype=torch.float64) * scales
    new, info = nuts_step(gen, init(lpg, x0), lpg, step_size)
    return transition_statistics(
        x0.numpy(),
        new.x.numpy(),
        info.tree_depth.numpy(),
        info.num_leapfrog.numpy(),
        info.acceptance_rate.numpy(),
        info.energy.numpy(),
    )


def two_sample_p_values(a, b):
    """Chi-square test of the tree-depth tables and Kolmogorov-Smirnov tests of the continuous
    statistics of one transition from a stationary start, reference ``a`` against ``b``."""
    depths = np.arange(1 + max(a["depth"].max(), b["depth"].max()))
    table = np.array([[np.sum(s["depth"] == d) for d in depths] for s in (a, b)])
    table = table[:, table.min(0) >= 5]
    p = {"depth": stats.chi2_contingency(table)[1]}
    for key in ("n_leapfrog", "accept", "energy", "jump"):
        p[key] = stats.ks_2samp(a[key], b[key]).pvalue
    return p


def test_matches_recursive_reference(monkeypatch):
    """One transition from exact draws of a 2-d Gaussian (scales 1 and 3, step 1.6): tree depth,
    number of steps, acceptance statistic, energy and squared jump of the batched kernel and of
    Stan's recursive transition agree (5 two-sample tests, each p > 1e-3); the energy and jump
    tests tell apart a batched kernel that samples the trajectory uniformly (p < 1e-6)."""
    reference = reference_statistics(3000, 0, 1.6)
    p = two_sample_p_values(reference, batched_statistics(20_000, 1, 1.6))
    assert min(p.values()) > 1e-3, p
    monkeypatch.setattr(nuts_module, "_leaf_log_weight", uniform_weights)
    p = two_sample_p_values(reference, batched_statistics(20_000, 1, 1.6))
    assert min(p["energy"], p["jump"]) < 1e-6, p


@pytest.mark.parametrize(
    "sync_free, stack_limit",
    [(True, 8192), (True, 0), (False, 8192)],
    ids=["cpu-path", "cpu-path-large-batch", "accelerator-path"],
)
def test_same_trees_as_recursive_reference(monkeypatch, sync_free, stack_limit):
    """Exact: 500 chains given the momenta and the directions of the reference's doublings build
    trees of the same depth and number of steps, with the same acceptance statistic (it does not
    depend on the multinomial draws), as Stan's recursive transition run chain by chain; on the
    accelerator path, which evaluates every chain of a doubling, num_evals counts the extra points.
    Small and large batches (the stacked and the per-pair U-turn checks) are both run."""
    monkeypatch.setattr(nuts_module, "_sync_is_free", lambda device: sync_free)
    monkeypatch.setattr(nuts_module, "_STACK_LIMIT", stack_limit)
    num, step = 500, 1.3
    rng = np.random.default_rng(7)
    x0 = rng.standard_normal((num, 2)) * REF_SCALES
    p0 = rng.standard_normal((num, 2))
    forward = rng.uniform(size=(num, 10)) < 0.5
    expected = []
    for i in range(num):
        nuts = RecursiveNUTS(rng, step)
        nuts.momentum = lambda x, i=i: p0[i]
        steps = iter(forward[i])
        nuts.forward = lambda steps=steps: next(steps)
        expected.append(nuts.transition(x0[i])[1:4])
    depth, n_leapfrog, accept = (np.array(v) for v in zip(*expected))

    calls = iter(range(10))
    monkeypatch.setattr(nuts_module, "sample_momentum", lambda gen, inv_mass, like: torch.tensor(p0))
    preset = torch.tensor(forward).long()
    monkeypatch.setattr(nuts_module, "_directions", lambda gen, rows, like: preset[rows, next(calls)])
    scales = torch.tensor(REF_SCALES)

    def lpg(x):
        return -0.5 * ((x / scales) ** 2).sum(-1), -x / scales**2

    _, info = nuts_step(torch.Generator().manual_seed(0), init(lpg, torch.tensor(x0)), lpg, step)
    assert len(np.unique(depth)) >= 3  # a mix of trees, so the lockstep masking is exercised
    np.testing.assert_array_equal(info.tree_depth.numpy(), depth)
    np.testing.assert_array_equal(info.num_leapfrog.numpy(), n_leapfrog)
    np.testing.assert_allclose(info.acceptance_rate.numpy(), accept, rtol=1e-12)
    if sync_free:
        assert info.num_evals == n_leapfrog.sum()
    else:  # a chain stopped inside a subtree of 2^j steps is evaluated to its end
        assert n_leapfrog.sum() < info.num_evals <= (2 ** (depth + 1) - 1).sum()
