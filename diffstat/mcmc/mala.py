"""Metropolis-adjusted Langevin algorithm (MALA), batched over chains."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from diffstat.mcmc.base import LogProbAndGrad, MCMCInfo, MCMCState, as_per_chain, metropolis_accept
from diffstat.mcmc.metric import DenseMetric, Metric, inverse_quadratic, velocity

__all__ = ["mala_step", "mala_fixed_step", "mala_proposal_log_density", "MALA_TARGET_ACCEPT"]

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


def _diagonal_drift(step_size, inv_mass: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    r""":math:`h M^{-1}` for a diagonal (or identity) metric: ``(dim,)`` when the step size is a scalar
    and the metric shared, else ``(n, dim)``."""
    h = torch.as_tensor(step_size, dtype=x.dtype, device=x.device)
    if h.dim():
        h = h.reshape(-1, 1)
    if inv_mass is None:
        return h * torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
    return h * inv_mass


def mala_step(
    generator: torch.Generator,
    state: MCMCState,
    log_prob_and_grad: LogProbAndGrad,
    step_size,
    inv_mass: Metric = None,
) -> tuple[MCMCState, MCMCInfo]:
    r"""One MALA step with per-chain accept/reject.

    Proposal :math:`y = x + h M^{-1} \nabla\log\pi(x) + \sqrt{2h}\, M^{-1/2} \xi`, accepted with
    probability :math:`\min\{1, \pi(y) q(x\mid y) / (\pi(x) q(y \mid x))\}`. Since
    :math:`\log q(y \mid x) = -\lVert\xi\rVert^2/2` exactly and :math:`x - y - h M^{-1} \nabla\log\pi(y)
    = -(y - x + h M^{-1} \nabla\log\pi(y))`, the ratio needs one quadratic form
    (:func:`mala_proposal_log_density` states it in full).

    Parameters
    ----------
    generator : torch.Generator
        The source of the proposal noise and the accept draws.
    state : MCMCState
        Current points ``x: (n, dim)`` with their log-densities ``(n,)`` and gradients ``(n, dim)``.
    log_prob_and_grad : callable
        ``(n, dim) -> ((n,), (n, dim))``.
    step_size : float or (n,) tensor
        ``h``; the proposal variance is ``2 h M^{-1}``.
    inv_mass : metric, optional
        :math:`M^{-1}`: None, a diagonal ``(dim,)``/``(n, dim)`` or a
        :class:`~diffstat.mcmc.metric.DenseMetric` (a preconditioner; the posterior covariance is a
        good choice).

    Returns
    -------
    (MCMCState, MCMCInfo)
        The new points and, per chain, the acceptance probability, acceptance and divergence.
    """
    return _step(generator, state, log_prob_and_grad, inv_mass, _constants(step_size, inv_mass, state.x))


def mala_fixed_step(step_size, inv_mass: Metric, like: torch.Tensor) -> Callable:
    r""":func:`mala_step` with the step size and metric fixed, as in the sampling phase: the per-step
    constants (:math:`h M^{-1}`, :math:`\sqrt{2 h M^{-1}}`, :math:`-1/(4 h M^{-1})`) are computed once
    here, not at every step. Returns ``step(generator, state, log_prob_and_grad) -> (state, info)``,
    whose draws equal :func:`mala_step`'s bit for bit; ``like: (n, dim)`` gives dtype and device."""
    constants = _constants(step_size, inv_mass, like)
    return lambda generator, state, log_prob_and_grad: _step(
        generator, state, log_prob_and_grad, inv_mass, constants
    )


class _Constants(NamedTuple):
    r"""What a step needs of ``h`` and :math:`M^{-1}`. Diagonal metric: ``drift`` :math:`h M^{-1}`
    (``(dim,)`` shared or ``(n, dim)``), ``scale`` :math:`\sqrt{2 h M^{-1}}`, ``precision``
    :math:`-1/(4 h M^{-1})` (the weight of the backward quadratic) and ``halves`` (0.5 per
    coordinate, shared case only). Dense metric: ``drift`` is :math:`h` ``(n, 1)``, ``scale``
    :math:`\sqrt{2h}` and ``precision`` the quadratic's divisor :math:`4h` ``(n,)``."""

    drift: torch.Tensor
    scale: torch.Tensor
    precision: torch.Tensor
    halves: torch.Tensor | None


def _constants(step_size, inv_mass: Metric, x: torch.Tensor) -> _Constants:
    if isinstance(inv_mass, DenseMetric):
        h = as_per_chain(step_size, x)
        return _Constants(h, torch.sqrt(2 * h), 4 * h.squeeze(-1), None)
    # the diagonal metric is folded into the step once: drift = h M^{-1}, elementwise
    drift = _diagonal_drift(step_size, inv_mass, x)
    halves = torch.full_like(drift, 0.5) if drift.dim() == 1 else None
    return _Constants(drift, (2 * drift).sqrt_(), drift.reciprocal().mul_(-0.25), halves)


def _step(generator, state: MCMCState, log_prob_and_grad, inv_mass: Metric, c: _Constants):
    """One MALA step (:func:`mala_step`) from precomputed constants."""
    x, g = state.x, state.grad
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if isinstance(inv_mass, DenseMetric):
        # M^{-1} = L L^T: y - x = L u with u = h L^T grad(x) + sqrt(2h) xi, so the backward
        # quadratic's L^{-1}(y - x + h M^{-1} grad(y)) = u + h L^T grad(y): three products with L
        # (rows times L, or L^T), no triangular solve (which cost 4 to 5 times a product at 1000 x 34)
        h, chol = c.drift, inv_mass.chol
        u = torch.addcmul(c.scale * noise, h, g @ chol)
        y = x + u @ chol.T
        lp_y, g_y = log_prob_and_grad(y)
        backward = u.addcmul_(h, g_y @ chol).square_().sum(-1)  # |L^{-1}(y - x + h M^{-1} grad(y))|^2
        log_ratio = lp_y - state.log_prob - backward / c.precision + 0.5 * noise.square_().sum(-1)
    else:
        drift = c.drift
        forward = torch.addcmul(drift * g, c.scale, noise)  # y - x
        y = x + forward
        lp_y, g_y = log_prob_and_grad(y)
        backward = forward.addcmul_(drift, g_y).square_()  # (y - x + h M^{-1} grad(y))^2, in place
        log_ratio = lp_y - state.log_prob  # log q(x | y) = sum(backward * precision)
        if c.halves is not None:  # shared: both row sums as matrix-vector products, the cheapest
            log_ratio = log_ratio.addmv_(noise.square_(), c.halves).addmv_(backward, c.precision)
        else:
            log_ratio = log_ratio + noise.square_().mul_(0.5).addcmul_(backward, c.precision).sum(-1)
    return metropolis_accept(generator, state, MCMCState(y, lp_y, g_y), log_ratio, x.shape[0])
