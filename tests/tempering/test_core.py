"""The one SMC step (``tempering.core.smc_step``): with the geometric path's reweighting it is
``tempered_step`` exactly, its conditional ESS is the resampling module's, and a kernel given as a
function moves as the same kernel named."""

import pytest
import torch

from diffstat.mcmc.mala import MALA_TARGET_ACCEPT, mala_step
from diffstat.targets import GaussianMixture
from diffstat.tempering.core import (
    MoveConfig,
    cloud_metric,
    init_tempered,
    smc_step,
    tempered_reweight,
    tempered_step,
)
from diffstat.tempering.path import GeometricPath
from diffstat.tempering.resampling import conditional_ess

F64 = torch.float64
MIXTURE = GaussianMixture(
    [[-2.0, 0.0, 1.0], [2.0, 1.0, 0.0]], [0.7, 0.3], scales=[0.5, 0.8], log_normalizer=1.3
)


def start(seed=0, n=256):
    path = GeometricPath(MIXTURE.as_target(dtype=F64))
    gen = torch.Generator().manual_seed(seed)
    return path, init_tempered(path, path.sample_reference(n, gen), 0.5)


def same(a, b) -> bool:
    """Equal exactly, NaN where the other is NaN; tuples field by field."""
    if isinstance(a, tuple):
        return len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
    if torch.is_tensor(a):
        return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())
    return a == b


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("num_mcmc_steps", [0, 3, None])
def test_the_step_with_the_tempered_reweighting_is_tempered_step_exactly(threshold, num_mcmc_steps):
    path, state = start()
    moves = MoveConfig(num_mcmc_steps=num_mcmc_steps, max_mcmc_steps=10)
    precondition = cloud_metric()
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = b = state
    for stage, beta in enumerate(torch.tensor([0.05, 0.2, 0.6, 1.0], dtype=F64)):
        opts = dict(moves=moves, precondition=precondition, stage=stage, resample_threshold=threshold)
        a, info_a = tempered_step(g1, a, beta, path=path, **opts)
        b, info_b = smc_step(g2, b, tempered_reweight(b.beta, beta), path=path, beta=beta, **opts)
        assert same(tuple(a), tuple(b)) and same(tuple(info_a), tuple(info_b)), stage
    assert same(g1.get_state(), g2.get_state())  # the same random numbers were drawn
    assert float(a.beta) == 1.0 and (threshold < 1.0 or a.num_resampling == 4)
    assert threshold > 0.0 or a.num_resampling == 0


def test_the_conditional_ess_is_that_of_the_incremental_weights():
    path, state = start(n=300)
    gen = torch.Generator().manual_seed(2)
    state, _ = tempered_step(
        gen, state, torch.tensor(0.1, dtype=F64), path=path, moves=MoveConfig(num_mcmc_steps=0)
    )
    beta = torch.tensor(0.3, dtype=F64)
    reweight = tempered_reweight(state.beta, beta)
    _, info = smc_step(gen, state, reweight, path=path, beta=beta, moves=MoveConfig(num_mcmc_steps=0))
    _, incr = reweight(gen, state.particles, state.log_weights)
    expected = conditional_ess(state.log_weights, incr) / incr.shape[0]
    torch.testing.assert_close(info.cess, expected, rtol=1e-12, atol=0)
    assert 0 < float(info.cess) < 1


def test_a_kernel_given_as_a_function_moves_as_the_named_kernel():
    path, state = start()
    beta = torch.tensor(0.4, dtype=F64)
    runs = []
    for moves in (
        MoveConfig("mala", num_mcmc_steps=4),
        MoveConfig(mala_step, target_accept=MALA_TARGET_ACCEPT, num_mcmc_steps=4),
    ):
        gen = torch.Generator().manual_seed(3)
        runs.append(
            smc_step(gen, state, tempered_reweight(state.beta, beta), path=path, beta=beta, moves=moves)
        )
    assert same(tuple(runs[0][0]), tuple(runs[1][0])) and same(tuple(runs[0][1]), tuple(runs[1][1]))
    with pytest.raises(ValueError, match="target_accept"):
        MoveConfig(mala_step)
