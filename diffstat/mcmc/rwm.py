"""Random-walk Metropolis: the simplest Metropolis-Hastings kernel, batched over chains."""

from __future__ import annotations

import torch

from diffstat.mcmc.base import LogProbAndGrad, MCMCInfo, MCMCState, as_per_chain, metropolis_accept
from diffstat.mcmc.metric import Metric, scale_noise

__all__ = ["RWM_TARGET_ACCEPT", "rwm_step"]

#: The optimal acceptance of random-walk Metropolis in high dimension (Roberts, Gelman and Gilks 1997).
RWM_TARGET_ACCEPT = 0.234


def rwm_step(
    generator: torch.Generator,
    state: MCMCState,
    log_prob_and_grad: LogProbAndGrad,
    step_size,
    inv_mass: Metric = None,
) -> tuple[MCMCState, MCMCInfo]:
    r"""One random-walk Metropolis step: :math:`y = x + \sqrt{h\,M^{-1}}\,\xi`, accept with
    probability :math:`\min(1, \pi(y)/\pi(x))` (the proposal is symmetric).

    ``step_size`` is a scalar or ``(n,)``; ``inv_mass`` a metric (:mod:`diffstat.mcmc.metric`).
    """
    x = state.x
    h = as_per_chain(step_size, x)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    y = x + torch.sqrt(h) * scale_noise(inv_mass, noise)
    lp_y, grad_y = log_prob_and_grad(y)
    proposal = MCMCState(y, lp_y, grad_y if state.grad is not None else None)
    return metropolis_accept(generator, state, proposal, lp_y - state.log_prob, x.shape[0])
