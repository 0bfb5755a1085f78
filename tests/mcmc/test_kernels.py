"""MCMC kernels: invariance of a Gaussian (exactly, and shown to fail for a broken correction),
divergence handling, and the MALA proposal density."""

import math

import pytest
import torch

from diffstat.mcmc import hmc_step, init, mala_step, rwm_step, ula_step, underdamped_init, underdamped_step
from diffstat.mcmc.mala import mala_fixed_step, mala_proposal_log_density
from diffstat.mcmc.metric import DenseMetric

SCALES = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)


def log_prob_and_grad(x):
    return -0.5 * ((x / SCALES) ** 2).sum(-1), -x / SCALES**2


def exact_draws(n, gen):
    return torch.randn(n, 3, generator=gen, dtype=torch.float64) * SCALES


def variance_z_scores(x):
    """z-scores of the sample variances against the truth (the variance of s^2 is 2 sigma^4 / n)."""
    n = x.shape[0]
    var = x.var(0)
    return (var - SCALES**2) / (SCALES**2 * math.sqrt(2.0 / n))


def broken_mala_step(gen, state, lpg, step_size, inv_mass=None):
    """MALA with Du et al.'s slip: the proposal density divided by 2h instead of 4h."""
    x, g = state.x, state.grad
    h = torch.as_tensor(step_size, dtype=x.dtype)
    y = x + h * g + torch.sqrt(2 * h) * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    lp_y, g_y = lpg(y)
    wrong_q = lambda a, b, gb: -((a - b - h * gb) ** 2).sum(-1) / (2 * h)  # noqa: E731
    log_ratio = lp_y - state.log_prob + wrong_q(x, y, g_y) - wrong_q(y, x, g)
    from diffstat.mcmc import metropolis_accept
    from diffstat.mcmc.base import MCMCState

    return metropolis_accept(gen, state, MCMCState(y, lp_y, g_y), log_ratio, x.shape[0])


def run_from_stationarity(step, num_moves, gen, **kwargs):
    state = init(log_prob_and_grad, exact_draws(100_000, gen))
    for _ in range(num_moves):
        state, info = step(gen, state, log_prob_and_grad, **kwargs)
    return state, info


@pytest.mark.parametrize(
    "step, kwargs",
    [
        (mala_step, dict(step_size=0.6)),
        (mala_step, dict(step_size=0.3, inv_mass=SCALES**2)),
        (hmc_step, dict(step_size=0.4, num_steps=5)),
        (rwm_step, dict(step_size=1.5)),
    ],
    ids=["mala", "mala-preconditioned", "hmc", "rwm"],
)
def test_kernel_leaves_gaussian_invariant(step, kwargs):
    gen = torch.Generator().manual_seed(0)
    state, info = run_from_stationarity(step, 5, gen, **kwargs)
    z = variance_z_scores(state.x)
    assert z.abs().max() < 4.5, z
    mean_z = state.x.mean(0) / (SCALES / math.sqrt(state.x.shape[0]))
    assert mean_z.abs().max() < 4.5
    assert 0.05 < float(info.acceptance_rate.mean()) < 0.999  # the step sizes really reject


def test_broken_correction_is_detected():
    """The same test rejects MALA with the proposal density off by a factor of two."""
    gen = torch.Generator().manual_seed(0)
    state, _ = run_from_stationarity(broken_mala_step, 5, gen, step_size=0.6)
    assert variance_z_scores(state.x).abs().max() > 10


def test_mala_fast_ratio_matches_full_proposal_density():
    """mala_step's shortcut log q(y|x) = -|noise|^2/2 agrees with the density written in full."""
    gen = torch.Generator().manual_seed(1)
    x = exact_draws(50, gen)
    _, g = log_prob_and_grad(x)
    h = torch.full((50, 1), 0.3, dtype=torch.float64)
    m_inv = SCALES**2
    noise = torch.randn(50, 3, generator=gen, dtype=torch.float64)
    y = x + h * m_inv * g + torch.sqrt(2 * h * m_inv) * noise
    full = mala_proposal_log_density(y, x, g, h, m_inv)
    torch.testing.assert_close(full, -0.5 * (noise**2).sum(-1))


@pytest.mark.parametrize("step_size", [0.3, torch.linspace(0.1, 0.9, 50, dtype=torch.float64)])
def test_dense_mala_ratio_matches_full_proposal_density(step_size):
    """The dense step's ratio, computed without a triangular solve, is the Metropolis-Hastings
    ratio written in full with mala_proposal_log_density in both directions (float64)."""
    cov = torch.tensor([[1.0, 0.9, 0.0], [0.9, 2.0, 0.5], [0.0, 0.5, 1.5]], dtype=torch.float64)
    metric = DenseMetric.from_covariance(cov)
    gen = torch.Generator().manual_seed(5)
    state = init(log_prob_and_grad, 2 * exact_draws(50, gen))
    proposed = []

    def recording(y):
        proposed.append(y)
        return log_prob_and_grad(y)

    _, info = mala_step(gen, state, recording, step_size, metric)
    (y,) = proposed
    h = torch.as_tensor(step_size, dtype=torch.float64).expand(50).reshape(-1, 1)
    lp_y, g_y = log_prob_and_grad(y)
    log_ratio = (
        lp_y
        - state.log_prob
        + mala_proposal_log_density(state.x, y, g_y, h, metric)
        - mala_proposal_log_density(y, state.x, state.grad, h, metric)
    )
    torch.testing.assert_close(info.acceptance_rate, log_ratio.clamp(max=0).exp(), rtol=1e-12, atol=1e-14)
    assert 0 < int(info.is_accepted.sum()) < 50 and (info.acceptance_rate < 0.99).any()
    # the check sees a backward proposal density whose metric is off by 1%
    wrong = DenseMetric.from_covariance(1.01 * cov)
    off = log_ratio - mala_proposal_log_density(state.x, y, g_y, h, metric)
    off = off + mala_proposal_log_density(state.x, y, g_y, h, wrong)
    assert not torch.allclose(info.acceptance_rate, off.clamp(max=0).exp(), rtol=1e-6)


def test_detailed_balance_of_mala_transition_density():
    """pi(x) q(y|x) a(x,y) = pi(y) q(x|y) a(y,x) for the MALA transition density (float64)."""
    gen = torch.Generator().manual_seed(2)
    x, y = exact_draws(200, gen), exact_draws(200, gen)
    h = torch.full((200, 1), 0.4, dtype=torch.float64)
    lx, gx = log_prob_and_grad(x)
    ly, gy = log_prob_and_grad(y)
    q_xy = mala_proposal_log_density(y, x, gx, h, None)
    q_yx = mala_proposal_log_density(x, y, gy, h, None)
    a_xy = torch.clamp(ly + q_yx - lx - q_xy, max=0)
    a_yx = torch.clamp(lx + q_xy - ly - q_yx, max=0)
    torch.testing.assert_close(lx + q_xy + a_xy, ly + q_yx + a_yx, rtol=0, atol=1e-10)


def test_nan_proposals_rejected_and_counted():
    def lpg(x):
        lp = torch.where(x[:, 0] > 1.0, torch.nan, -0.5 * (x**2).sum(-1))
        return lp, torch.where(x[:, :1] > 1.0, torch.nan, -x)

    gen = torch.Generator().manual_seed(3)
    state = init(lpg, torch.zeros(2000, 2, dtype=torch.float64))
    diverged = 0
    for _ in range(20):
        state, info = mala_step(gen, state, lpg, 1.0)
        diverged += int(info.diverging.sum())
        assert torch.isfinite(state.x).all() and torch.isfinite(state.log_prob).all()
        assert not info.is_accepted[info.diverging].any()
    assert diverged > 0
    assert (state.x[:, 0] <= 1.0).all()


def test_ula_and_underdamped_sample_gaussian_for_small_steps():
    gen = torch.Generator().manual_seed(4)
    score = lambda x: log_prob_and_grad(x)[1]  # noqa: E731
    x = torch.zeros(20_000, 3, dtype=torch.float64)
    for _ in range(400):
        x = ula_step(gen, x, score, 0.02)
    # ULA's bias on a Gaussian is known: the stationary variance is s^2 / (1 - h / (2 s^2)).
    expected = SCALES**2 / (1 - 0.02 / (2 * SCALES**2))
    assert ((x.var(0) - expected) / (expected * math.sqrt(2 / 20_000))).abs().max() < 5
    state = underdamped_init(gen, torch.zeros(20_000, 3, dtype=torch.float64), score)
    for _ in range(300):
        state = underdamped_step(gen, state, score, 0.1, friction=1.0)
    rel = (state.x.var(0) - SCALES**2) / SCALES**2
    assert rel.abs().max() < 0.1


@pytest.mark.parametrize(
    "step_size, inv_mass",
    [
        (0.3, None),  # identity metric, scalar step
        (0.3, torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)),  # shared diagonal metric
        (torch.linspace(0.1, 0.5, 8, dtype=torch.float64), SCALES**2),  # per-chain step sizes
        (0.3, DenseMetric.from_covariance(torch.tensor([[1.0, 0.3, 0.0], [0.3, 2.0, 0.5], [0.0, 0.5, 1.5]]))),
    ],
)
def test_mala_fixed_step_is_mala_step_bit_for_bit(step_size, inv_mass):
    # the sampling phase computes the step's constants once: the chain must not change by one bit
    if isinstance(inv_mass, DenseMetric):
        inv_mass = inv_mass.to(torch.float64)
    x0 = torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3

    def run(step):
        gen, state = torch.Generator().manual_seed(2), init(log_prob_and_grad, x0)
        out = []
        for _ in range(20):
            state, info = step(gen, state)
            out += [state.x, state.log_prob, state.grad, info.acceptance_rate]
        return torch.cat([t.reshape(-1) for t in out])

    fixed = mala_fixed_step(step_size, inv_mass, x0)
    reference = run(lambda gen, s: mala_step(gen, s, log_prob_and_grad, step_size, inv_mass))
    assert torch.equal(run(lambda gen, s: fixed(gen, s, log_prob_and_grad)), reference)
    # the comparison sees a change in the last bits of the step size
    nudged = mala_fixed_step(torch.as_tensor(step_size, dtype=torch.float64) * (1 + 1e-15), inv_mass, x0)
    assert not torch.equal(run(lambda gen, s: nudged(gen, s, log_prob_and_grad)), reference)
