"""Randomised step sizes of the SMC moves (``step_jitter``): off, they are today's moves bit for bit;
on, each move still leaves the tempered target invariant and SMC's log Z stays exact."""

import math

import pytest
import torch

import diffstat as ds
from diffstat.mcmc.mala import MALA_TARGET_ACCEPT, mala_step
from diffstat.tempering.core import MoveConfig
from diffstat.tempering.moves import decorrelating_moves
from diffstat.tempering.path import make_path, move

D = torch.distributions
F64 = torch.float64
LOG_Z = 2.3
#: Coordinate sds 25 times apart: one step size cannot suit them all, the case jitter is for.
SCALES = torch.tensor([0.2, 1.0, 5.0], dtype=F64)


def gaussian(scales=SCALES, log_z=LOG_Z):
    return ds.Target(lambda x: D.Normal(0.0, scales).log_prob(x).sum(-1) + log_z, len(scales), dtype=F64)


def test_zero_jitter_is_todays_moves_bit_for_bit():
    path = make_path(gaussian())
    ps = path.evaluate(torch.randn(300, 3, generator=torch.Generator().manual_seed(0), dtype=F64))
    beta, log_h, metric = torch.tensor(0.7, dtype=F64), torch.tensor(-1.0, dtype=F64), SCALES**2
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    res = decorrelating_moves(mala_step, g1, ps, path, beta, log_h, inv_mass=metric, step_jitter=0.0)
    # today's loop, written out: one shared step size, Robbins-Monro on the mean acceptance
    for _ in range(res.num_steps):
        ps, info = move(mala_step, g2, ps, path, beta, torch.exp(log_h), metric)
        log_h = log_h + (info.acceptance_rate.mean() - MALA_TARGET_ACCEPT)
    assert res.num_steps >= 2
    assert torch.equal(res.particles.x, ps.x) and torch.equal(res.log_step_size, log_h)
    assert torch.equal(g1.get_state(), g2.get_state())  # no extra random numbers drawn


def test_zero_jitter_leaves_smc_unchanged_and_a_positive_one_changes_it():
    target = gaussian()

    def run(**options):
        idata = ds.sample(target, "smc", num_samples=200, seed=3, progress=False, **options)
        return torch.as_tensor(idata.posterior.x.values), idata.posterior.attrs["log_normalizer"]

    x, log_z = run()
    x0, log_z0 = run(step_jitter=0.0)
    assert torch.equal(x, x0) and log_z == log_z0
    x1, _ = run(step_jitter=1.0)  # the comparison can fail: jitter changes the draws
    assert not torch.equal(x, x1)


def test_jittered_moves_keep_the_target_invariant():
    """Exact draws of N(0, diag(SCALES^2)) moved 30 times at steps 0.05 e^{3 U(-1, 1)} (identity
    metric, the centre fixed) are still exact draws: each particle is an independent chain started at
    stationarity, so the means and variances are within their Monte Carlo error (z < 4)."""
    n = 4000
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(n, 3, generator=g, dtype=F64) * SCALES
    path = make_path(gaussian())
    res = decorrelating_moves(
        mala_step,
        g,
        path.evaluate(x0),
        path,
        torch.tensor(1.0, dtype=F64),
        torch.tensor(math.log(0.05), dtype=F64),
        num_steps=30,
        adapt_rate=0.0,
        step_jitter=3.0,
    )
    x = res.particles.x
    assert float(res.acceptance.mean()) > 0.3  # the particles moved:
    assert float((x[:, 0] - x0[:, 0]).abs().median()) > 0.5 * SCALES[0]  # about 1 sd on the narrow axis
    z_mean = (x.mean(0) / (SCALES / math.sqrt(n))).abs()
    z_var = ((x.var(0) / SCALES**2 - 1) / math.sqrt(2 / n)).abs()
    assert bool((z_mean < 4).all()) and bool((z_var < 4).all())


def log_z_agrees(estimates, ses, truth, tol) -> bool:
    """Mean error over seeds within ``tol`` nats, and each error within 3 reported standard errors."""
    err = torch.tensor(estimates, dtype=F64) - truth
    return bool(err.mean().abs() < tol and (err.abs() <= 3 * torch.tensor(ses, dtype=F64)).all())


def test_smc_log_normalizer_with_jitter_on():
    target = gaussian(torch.tensor([0.2, 1.0, 3.0], dtype=F64))
    runs = [
        ds.sample(
            target, "smc", num_samples=1000, num_chains=1, seed=s, progress=False, step_jitter=2.0
        ).posterior.attrs
        for s in range(3)
    ]
    est, ses = [a["log_normalizer"] for a in runs], [a["log_normalizer_se"] for a in runs]
    assert log_z_agrees(est, ses, LOG_Z, tol=0.1)
    # A wrong target, log Z larger by 0.3, is rejected by the same rule.
    assert not log_z_agrees(est, ses, LOG_Z + 0.3, tol=0.1)


@pytest.mark.parametrize("bad", [-0.5, math.inf, math.nan])
def test_move_config_refuses_a_bad_jitter(bad):
    with pytest.raises(ValueError, match="step_jitter"):
        MoveConfig(step_jitter=bad)
