"""Hamiltonian Monte Carlo with a leapfrog integrator and a diagonal or dense metric."""

from __future__ import annotations

import torch

from diffstat.mcmc.base import LogProbAndGrad, MCMCInfo, MCMCState, as_per_chain, metropolis_accept
from diffstat.mcmc.metric import Metric, kinetic_energy, sample_momentum, velocity

__all__ = ["HMC_TARGET_ACCEPT", "hmc_step", "leapfrog"]

#: Stan's target acceptance for HMC and NUTS (Betancourt, Byrne and Girolami 2014 give 0.6 to 0.9 as
#: the efficient range; 0.8 leaves room for the tails of a heavier-tailed posterior).
HMC_TARGET_ACCEPT = 0.8


def leapfrog(
    x: torch.Tensor,
    p: torch.Tensor,
    grad: torch.Tensor,
    log_prob_and_grad: LogProbAndGrad,
    h: torch.Tensor,
    inv_mass: Metric,
    num_steps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""``num_steps`` leapfrog steps of size ``h: (n, 1)`` for :math:`H = -\log\pi(x) + \tfrac12
    p^\top M^{-1} p`. Returns the end point, momentum, log-density and gradient.
    """
    p = p + 0.5 * h * grad
    lp = None
    for i in range(num_steps):
        x = x + h * velocity(inv_mass, p)
        lp, grad = log_prob_and_grad(x)
        p = p + (h if i < num_steps - 1 else 0.5 * h) * grad
    return x, p, lp, grad


def hmc_step(
    generator: torch.Generator,
    state: MCMCState,
    log_prob_and_grad: LogProbAndGrad,
    step_size,
    inv_mass: Metric = None,
    num_steps: int = 10,
) -> tuple[MCMCState, MCMCInfo]:
    r"""One HMC step: momentum :math:`p \sim \mathcal N(0, M)`, ``num_steps`` leapfrog steps,
    accept per chain with probability :math:`\min(1, e^{-\Delta H})`.

    Non-finite trajectories and energy errors above 1000 nats are rejected and flagged divergent.
    """
    x = state.x
    h = as_per_chain(step_size, x)
    p0 = sample_momentum(generator, inv_mass, x)
    y, p1, lp_y, g_y = leapfrog(x, p0, state.grad, log_prob_and_grad, h, inv_mass, num_steps)
    kinetic0 = kinetic_energy(inv_mass, p0)
    kinetic1 = kinetic_energy(inv_mass, p1)
    log_ratio = (lp_y - kinetic1) - (state.log_prob - kinetic0)
    return metropolis_accept(generator, state, MCMCState(y, lp_y, g_y), log_ratio, x.shape[0] * num_steps)
