"""The kernels of walk-jump and SMS as pure steps: the adaptive MALA runner (exact identity with the
plain MALA step, adaptation toward 0.574, a stationary Gaussian) and the walks' divergence reset."""

import math

import torch

from diffstat.mcmc.base import init as init_chain
from diffstat.mcmc.mala import MALA_TARGET_ACCEPT, mala_step
from diffstat.smoothing import adaptive_mala
from diffstat.smoothing.walks import ula_walk, underdamped_walk


def gaussian(x):
    return -0.5 * (x**2).sum(-1), -x


def test_runner_without_adaptation_is_plain_mala():
    """With ``num_adapt = 0`` the runner is MALA at a fixed step: the same draws as a loop of
    ``mala_step`` from the same generator state (exact, float64)."""
    x0 = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    state, num_evals = adaptive_mala.run(torch.Generator().manual_seed(1), gaussian, x0, 20, 0.3, 0)
    gen, chain = torch.Generator().manual_seed(1), init_chain(gaussian, x0)
    accept = torch.zeros(50, dtype=torch.float64)
    for _ in range(20):
        chain, info = mala_step(gen, chain, gaussian, torch.tensor(0.3, dtype=torch.float64))
        accept += info.acceptance_rate
    torch.testing.assert_close(state.chain.x, chain.x, rtol=0, atol=0)
    torch.testing.assert_close(adaptive_mala.mean_acceptance(state), accept / 20, rtol=1e-14, atol=0)
    assert num_evals == 50 * 21 and float(state.step_size) == 0.3


def test_runner_adapts_and_keeps_its_states():
    """On N(0, I_10), 2000 chains from the target: after 100 adaptation steps the acceptance of the
    next 100 is within 0.05 of 0.574 (dual averaging on the mean over 2000 chains), the step size no
    longer changes, the draws keep mean 0 and variance 1 within 4 MC sd, and a step leaves the state
    it was given unchanged (the adaptation is copied, not updated in place)."""
    gen = torch.Generator().manual_seed(2)
    n, d = 2000, 10
    x0 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    state = adaptive_mala.init(gaussian, x0, 1.0, num_adapt=100)
    for i in range(200):
        before = (state.step_size.clone(), state.adaptation.t, state.num_adapt)
        new, info = adaptive_mala.step(gen, state, gaussian)
        assert (state.step_size, state.adaptation.t, state.num_adapt) == before
        assert info.adapting == (i < 100)
        if i >= 100:
            assert float(info.step_size) == float(new.step_size)
        state = new
    acc = float(adaptive_mala.mean_acceptance(state).mean())
    assert abs(acc - MALA_TARGET_ACCEPT) < 0.05, acc
    x = state.chain.x
    assert float(x.mean(0).abs().max()) < 4 / math.sqrt(n)
    assert float((x.var(0) - 1).abs().max()) < 4 * math.sqrt(2 / n)


def test_runner_rejects_wrong_target_moments():
    """Negative control: chains started from N(0, 4 I) on N(0, I) with a tiny fixed step have not
    moved, and the same variance check fails."""
    gen = torch.Generator().manual_seed(3)
    n = 2000
    x0 = 2.0 * torch.randn(n, 10, generator=gen, dtype=torch.float64)
    state, _ = adaptive_mala.run(gen, gaussian, x0, 20, 1e-4, 0)
    assert float((state.chain.x.var(0) - 1).abs().max()) > 4 * math.sqrt(2 / n)


def _score_failing_on_walker_0(calls):
    def score(y):
        calls.append(1)
        g = -y.clone()
        if len(calls) > 1:
            g[0] = math.nan
        return g

    return score


def test_walks_reset_divergent_walkers():
    """A walker whose score turns NaN after the first call diverges; with ``reset_divergent`` it is
    put back where it was (underdamped: same position and score, fresh velocity), the others move."""
    y = torch.randn(3, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    for reset in (True, False):
        walk = underdamped_walk(_score_failing_on_walker_0([]), 0.5, 1.0, reset_divergent=reset)
        state = walk.init(gen, y)
        new, info = walk.step(gen, state)
        assert info.diverging.tolist() == [True, False, False]
        assert torch.equal(new.x[0], state.x[0]) == reset and torch.isfinite(new.grad[0]).all() == reset
        assert not torch.equal(new.x[1], state.x[1])
    walk = ula_walk(_score_failing_on_walker_0([None]), 0.1, reset_divergent=True)
    new, info = walk.step(gen, y)
    assert info.diverging.tolist() == [True, False, False]
    assert torch.equal(new[0], y[0]) and not torch.equal(new[1], y[1])
