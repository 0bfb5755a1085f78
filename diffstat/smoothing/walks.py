r"""The Langevin walks of walk-jump and SMS, as ``init`` / ``step`` pairs on a smoothed density.

A :class:`Walk` bundles ``init(generator, y) -> state``, ``step(generator, state) -> (state,
WalkInfo)`` and ``position(state) -> y``, batched over ``n`` walkers ``y: (n, dim)``:

- :func:`underdamped_walk`: BAOAB underdamped Langevin
  (:func:`diffstat.mcmc.langevin.underdamped_step`; the family of Sachs et al. 2017 that the public
  walk-jump code uses), one score evaluation per step;
- :func:`ula_walk`: the unadjusted overdamped step :math:`y + h s(y) + \sqrt{2h}\,\xi`;
- :func:`mala_walk`: Metropolis-adjusted Langevin on a known log-density, its step size adapted by
  dual averaging over the first steps (:mod:`~diffstat.smoothing.adaptive_mala`).

The unadjusted walks flag a walker as diverging when its position or score is not finite or its
kinetic energy explodes: mean squared velocity per coordinate above :data:`DIVERGENCE_ENERGY`
(stationary value 1), or for ULA the squared drift over the noise variance per coordinate above
it. With ``reset_divergent`` such a walker is put back at its last good point (underdamped: with a
fresh velocity); walk-jump resets, SMS, whose walks are short and restarted at every measurement,
does not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from diffstat.mcmc.base import LogProbAndGrad
from diffstat.mcmc.langevin import Score, ula_step, underdamped_init, underdamped_step
from diffstat.smoothing import adaptive_mala

__all__ = ["Walk", "WalkInfo", "DIVERGENCE_ENERGY", "underdamped_walk", "ula_walk", "mala_walk"]

#: A walker whose mean squared velocity per coordinate (underdamped; stationary value 1) or whose
#: squared drift over the noise variance per coordinate (ULA) exceeds this has diverged.
DIVERGENCE_ENERGY = 100.0


class WalkInfo(NamedTuple):
    """What one walk step did, per walker.

    diverging: (n,) bool (see the module docstring).
    acceptance_rate: (n,) Metropolis acceptance probability; 1 for the unadjusted walks.
    num_evals: points at which the score or log-density was evaluated.
    """

    diverging: torch.Tensor
    acceptance_rate: torch.Tensor
    num_evals: int


class Walk(NamedTuple):
    """A walk as pure functions of its state: ``init(generator, y)``, ``step(generator, state)``,
    ``position(state) -> y (n, dim)``, ``score(state) -> (n, dim)`` (the walk's gradient at the
    position), ``step_size(state)`` (in use) and ``acceptance(state) -> (n,)`` (mean acceptance per
    walker after adaptation; 1 for the unadjusted walks)."""

    init: Callable[[torch.Generator, torch.Tensor], Any]
    step: Callable[[torch.Generator, Any], tuple[Any, WalkInfo]]
    position: Callable[[Any], torch.Tensor]
    score: Callable[[Any], torch.Tensor]
    step_size: Callable[[Any], float]
    acceptance: Callable[[Any], torch.Tensor]


def _ones(y: torch.Tensor) -> torch.Tensor:
    return torch.ones(y.shape[0], dtype=y.dtype, device=y.device)


def divergent(x: torch.Tensor, grad: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """``(n,)`` bool: a walker that left the finite numbers or whose ``energy`` exploded."""
    return ~torch.isfinite(x).all(-1) | ~torch.isfinite(grad).all(-1) | ~(energy <= DIVERGENCE_ENERGY)


def underdamped_walk(score: Score, step_size: float, friction: float, reset_divergent: bool = False) -> Walk:
    """BAOAB steps of size ``step_size`` with friction ``friction`` on ``score: (n, dim) -> (n, dim)``;
    the state is a :class:`~diffstat.mcmc.langevin.UnderdampedState`."""

    def step(generator, state):
        new = underdamped_step(generator, state, score, step_size, friction)
        bad = divergent(new.x, new.grad, (new.v**2).mean(-1))
        if reset_divergent and bad.any():  # back to the last good point, with a fresh velocity
            fresh = torch.randn(new.v.shape, generator=generator, dtype=new.v.dtype, device=new.v.device)
            new = type(new)(
                *(torch.where(bad[:, None], a, b) for a, b in zip((state.x, fresh, state.grad), new))
            )
        return new, WalkInfo(bad, torch.ones_like(bad, dtype=new.x.dtype), new.x.shape[0])

    return Walk(
        lambda generator, y: underdamped_init(generator, y, score),
        step,
        lambda state: state.x,
        lambda state: state.grad,
        lambda state: float(step_size),
        lambda state: _ones(state.x),
    )


def ula_walk(score: Score, step_size: float, reset_divergent: bool = False) -> Walk:
    """Unadjusted Langevin steps of size ``step_size`` on ``score``; the state is ``y: (n, dim)``."""

    def step(generator, y):
        g = score(y)
        y_new = ula_step(generator, y, score, step_size, grad=g)
        bad = divergent(y_new, g, (step_size * g**2).mean(-1) / 2)  # drift^2 / noise variance per coordinate
        if reset_divergent:
            y_new = torch.where(bad[:, None], y, y_new)
        return y_new, WalkInfo(bad, torch.ones_like(bad, dtype=y.dtype), y.shape[0])

    return Walk(lambda generator, y: y, step, lambda y: y, score, lambda y: float(step_size), _ones)


def mala_walk(log_prob_and_grad: LogProbAndGrad, step_size: float, num_adapt: int) -> Walk:
    """MALA on ``log_prob_and_grad``, starting at ``step_size`` and adapting it over the first
    ``num_adapt`` steps; the state is an :class:`~diffstat.smoothing.adaptive_mala.AdaptiveMALAState`
    (rejection keeps every walker finite, so there is nothing to reset)."""

    def step(generator, state):
        state, info = adaptive_mala.step(generator, state, log_prob_and_grad)
        mcmc = info.mcmc
        return state, WalkInfo(mcmc.diverging.to(torch.bool), mcmc.acceptance_rate, mcmc.num_evals)

    return Walk(
        lambda generator, y: adaptive_mala.init(log_prob_and_grad, y, step_size, num_adapt),
        step,
        lambda state: state.chain.x,
        lambda state: state.chain.grad,
        lambda state: float(state.step_size),
        adaptive_mala.mean_acceptance,
    )
