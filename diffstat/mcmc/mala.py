"""Metropolis-adjusted Langevin algorithm (MALA), batched over chains."""

from __future__ import annotations

import torch

from diffstat.mcmc.base import LogProbAndGrad, MCMCInfo, MCMCState, as_per_chain, metropolis_accept
from diffstat.mcmc.metric import Metric, inverse_quadratic, scale_noise, velocity

__all__ = ["mala_step", "mala_proposal_log_density", "MALA_TARGET_ACCEPT"]

#: Acceptance rate that optimises MALA's efficiency in high dimension (Roberts and Rosenthal 1998);
#: every step-size adaptation of a MALA kernel in diffstat aims at it.
MALA_TARGET_ACCEPT = 0.574


def mala_proposal_log_density(
    y: torch.Tensor, x: torch.Tensor, grad_x: torch.Tensor, h: torch.Tensor, inv_mass: Metric
) -> torch.Tensor:
    r"""Log-density of the MALA proposal :math:`q(y \mid x)`, up to a constant common to both
    directions: :math:`y \sim \mathcal N(x + h M^{-1} \nabla \log\pi(x),\; 2 h M^{-1})`, so
    :math:`\log q = -\lVert y - x - h M^{-1} g \rVert^2_{M} / (4h)`.
    """
    diff = y - x - h * velocity(inv_mass, grad_x)
    return -inverse_quadratic(inv_mass, diff) / (4 * h.squeeze(-1))


def mala_step(
    generator: torch.Generator,
    state: MCMCState,
    log_prob_and_grad: LogProbAndGrad,
    step_size,
    inv_mass: Metric = None,
) -> tuple[MCMCState, MCMCInfo]:
    r"""One MALA step with per-chain accept/reject.

    Proposal :math:`y = x + h M^{-1} \nabla\log\pi(x) + \sqrt{2h}\, M^{-1/2} \xi`, accepted with
    probability :math:`\min\{1, \pi(y) q(x\mid y) / (\pi(x) q(y \mid x))\}`.

    Parameters
    ----------
    step_size : float or (n,) tensor
        ``h``; the proposal variance is ``2 h M^{-1}``.
    inv_mass : metric, optional
        :math:`M^{-1}`: None, a diagonal ``(dim,)``/``(n, dim)`` or a
        :class:`~diffstat.mcmc.metric.DenseMetric` (a preconditioner; the posterior covariance is a
        good choice).
    """
    x, g = state.x, state.grad
    h = as_per_chain(step_size, x)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    forward_step = h * velocity(inv_mass, g) + torch.sqrt(2 * h) * scale_noise(inv_mass, noise)  # y - x
    y = x + forward_step
    lp_y, g_y = log_prob_and_grad(y)
    # log q(y | x) = -|noise|^2 / 2 exactly, and x - y - h M^{-1} g_y = -(forward_step + h M^{-1} g_y),
    # so the ratio needs one quadratic form (mala_proposal_log_density states it in full).
    backward = forward_step + h * velocity(inv_mass, g_y)
    log_q_backward = -inverse_quadratic(inv_mass, backward) / (4 * h.squeeze(-1))
    log_ratio = lp_y - state.log_prob + log_q_backward + 0.5 * (noise**2).sum(-1)
    return metropolis_accept(generator, state, MCMCState(y, lp_y, g_y), log_ratio, x.shape[0])
