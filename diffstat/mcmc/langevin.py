"""Unadjusted Langevin steps, overdamped and underdamped, that walk-jump, SMS and the annealed
samplers reuse. Neither is Metropolis-corrected: they sample the target only as the step size
goes to zero (or are corrected by the caller).
"""

from __future__ import annotations

from typing import NamedTuple
from collections.abc import Callable

import torch

from diffstat.mcmc.base import as_per_chain

__all__ = ["ula_step", "UnderdampedState", "underdamped_init", "underdamped_step"]

Score = Callable[[torch.Tensor], torch.Tensor]


def ula_step(generator: torch.Generator, x: torch.Tensor, score: Score, step_size, grad=None) -> torch.Tensor:
    r"""One unadjusted Langevin step :math:`x + h \nabla\log\pi(x) + \sqrt{2h}\,\xi`.

    ``score`` maps ``(n, dim)`` to ``(n, dim)``; pass ``grad`` to reuse a gradient already known.
    """
    h = as_per_chain(step_size, x)
    g = score(x) if grad is None else grad
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return x + h * g + torch.sqrt(2 * h) * noise


class UnderdampedState(NamedTuple):
    """Position ``x: (n, dim)``, velocity ``v: (n, dim)`` and the score at ``x``."""

    x: torch.Tensor
    v: torch.Tensor
    grad: torch.Tensor


def underdamped_init(generator: torch.Generator, x: torch.Tensor, score: Score) -> UnderdampedState:
    """Start at ``x`` with a velocity drawn from N(0, I)."""
    v = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return UnderdampedState(x, v, score(x))


def underdamped_step(
    generator: torch.Generator,
    state: UnderdampedState,
    score: Score,
    step_size,
    friction: float = 1.0,
) -> UnderdampedState:
    r"""One BAOAB step of underdamped Langevin dynamics with unit mass,

    .. math:: dx = v\,dt,\qquad dv = \nabla\log\pi(x)\,dt - \gamma v\,dt + \sqrt{2\gamma}\,dW,

    whose stationary law is :math:`\pi(x)\,\mathcal N(v; 0, I)`: half kick (B), half drift (A),
    the exact Ornstein-Uhlenbeck velocity update :math:`v \leftarrow e^{-\gamma h} v +
    \sqrt{1 - e^{-2\gamma h}}\,\xi` (O), half drift, half kick. One score evaluation per step; the
    splitting of the public walk-jump code (Sachs et al. 2017) is of this family.
    """
    h = as_per_chain(step_size, state.x)
    v = state.v + 0.5 * h * state.grad
    x = state.x + 0.5 * h * v
    c = torch.exp(-friction * h)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    v = c * v + torch.sqrt(1 - c**2) * noise
    x = x + 0.5 * h * v
    g = score(x)
    v = v + 0.5 * h * g
    return UnderdampedState(x, v, g)
