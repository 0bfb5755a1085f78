"""ChEES trajectory-length adaptation (Hoffman, Radul and Sountsov 2021) and jittered HMC: the
gradient's sign on exact Gaussian dynamics, the adapted length on an ill-conditioned 20-d Gaussian
with 256 chains against the analytic ballpark, and the draws."""

import math

import arviz as az
import numpy as np
import pytest
import torch

import diffstat as ds
from diffstat.mcmc.base import init
from diffstat.mcmc.chees import ChEESAdaptation, HMCInfo, jittered_hmc_step

SD = torch.logspace(-1, 0, 20, dtype=torch.float64)  # condition number 100, largest sd 1


def ill_conditioned(shift=0.0):
    def log_prob(x):
        return -0.5 * (((x - shift) / SD) ** 2).sum(-1)

    return ds.Target(log_prob, 20, dtype=torch.float64)


@pytest.mark.parametrize("length, sign", [(0.3, 1), (2.8, -1)])
def test_chees_gradient_sign_on_exact_dynamics(length, sign):
    # Standard normal, exact Hamiltonian flow x' = x cos t + p sin t: the jittered criterion
    # E_u[sin^2(u T)] = 1/2 - sin(2T) / (4T) rises up to T = 2.25 and falls just after it.
    gen = torch.Generator().manual_seed(0)
    n, u = 20000, 0.7
    x, p = (
        torch.randn(n, 1, generator=gen, dtype=torch.float64),
        torch.randn(n, 1, generator=gen, dtype=torch.float64),
    )
    t = u * length
    prop, vel = x * math.cos(t) + p * math.sin(t), -x * math.sin(t) + p * math.cos(t)
    ones = torch.ones(n, dtype=torch.float64)
    info = HMCInfo(ones, ones.bool(), ~ones.bool(), n, ones, ones, prop, vel)
    chees = ChEESAdaptation(length)
    chees.u = u
    chees.update(x, info)
    assert sign * (chees.length - length) > 0


def test_jittered_steps_per_chain_match_fixed_steps():
    # A chain taking k steps in a mixed batch lands where a batch of k-step chains lands.
    target = ill_conditioned()
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    state = init(target.log_prob_and_grad, x)
    steps = torch.tensor([1, 4, 7])
    _, mixed = jittered_hmc_step(
        torch.Generator().manual_seed(2), state, target.log_prob_and_grad, 0.05, None, steps
    )
    for c, k in enumerate(steps.tolist()):
        _, alone = jittered_hmc_step(
            torch.Generator().manual_seed(2), state, target.log_prob_and_grad, 0.05, None, k
        )
        torch.testing.assert_close(mixed.proposal[c], alone.proposal[c])
        torch.testing.assert_close(mixed.energy[c], alone.energy[c])


def check_draws(idata, shift=0.0):
    x = idata.posterior["x"].values
    z = np.abs(x.mean((0, 1)) - shift) / az.mcse(idata, method="mean")["x"].values
    sd_err = np.abs(x.reshape(-1, 20).std(0) / SD.numpy() - 1)
    return z.max(), sd_err.max()


@pytest.mark.slow
@pytest.mark.parametrize("adapt_mass", [False, True])
def test_chees_length_and_draws_with_256_chains(adapt_mass):
    idata = ds.sample(
        ill_conditioned(),
        "hmc",
        num_samples=1000,
        num_chains=256,
        seed=4,
        progress=False,
        adapt_mass=adapt_mass,
    )
    attrs = idata.posterior.attrs
    # Largest posterior sd in the metric's units: 1 for the identity (SD max 1), and 1 for a diagonal
    # metric estimated from this diagonal target. ChEES should land within a small factor of it.
    assert 0.5 < attrs["trajectory_length"] < 3.0
    z, sd_err = check_draws(idata)
    assert z < 4 and sd_err < 0.05
    assert attrs["metric"] == ("diag" if adapt_mass else "identity")


def test_chees_draw_check_rejects_a_shifted_target():
    idata = ds.sample(
        ill_conditioned(shift=0.02), "hmc", num_samples=300, num_chains=256, seed=4, progress=False
    )
    assert check_draws(idata)[0] > 4
