r"""Gradient ascent to the local maxima of a log-density, batched over points: the climbs before
points are grouped by mode (:mod:`diffstat.modes.barriers`).

:func:`hill_climb` adapts a step size per point and only takes steps that raise :math:`\log p`
(the diffusion sampler's mode search, where the target is exact and an evaluation is the cost);
:func:`ascend` takes a fixed number of fixed steps (divide and conquer's basins of a learned
product, where every point must end in a basin and a step is one network evaluation). Newton
ascent with Hessians is in :mod:`diffstat.modes.laplace`; :func:`finish_climbs` applies it to the
climbs :func:`hill_climb_unfinished` cut off while still rising (the missed-mode check's starts,
:mod:`diffstat.modes.coverage`), within a box (:class:`BoxedTarget`).
"""

from __future__ import annotations

import math

import torch

from diffstat.mcmc.base import LogProbAndGrad
from diffstat.modes.laplace import newton_ascent

__all__ = ["BoxedTarget", "hill_climb", "hill_climb_unfinished", "finish_climbs", "ascend"]


def hill_climb(
    log_prob_and_grad: LogProbAndGrad,
    x: torch.Tensor,
    log_prob: torch.Tensor,
    grad: torch.Tensor,
    num_steps: int,
    step_size: torch.Tensor,
    rtol: float = 1e-3,
    metric: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    r"""Gradient ascent toward each point's local maximum, batched, with a per-point step size:
    :math:`y = x + h M \nabla\log p(x)` is kept (and :math:`h \leftarrow 1.5h`) if it raises
    :math:`\log p`, else :math:`h \leftarrow h/2`. A point stops once its gain falls below ``rtol``
    nats with an accepted step; only active points are evaluated. :math:`M` is ``metric (dim, dim)``
    (symmetric positive definite), the identity when None: with :math:`M` the posterior's covariance
    a step of :math:`h = 1` is Newton's step on a Gaussian, so a correlated, badly scaled peak is
    climbed in a few steps where isotropic steps, limited by its narrowest direction, take hundreds.

    Returns the climbed points ``(n, dim)``, their log-densities ``(n,)`` and the evaluations spent.
    Mode centres compare far better than samples: in high dimension typical points lie about
    :math:`d/2` nats below their peak, under the saddle between nearby modes, so a segment between
    two samples of different modes need not cross a barrier, while one between their peaks does.
    """
    x, lp, evals, _ = hill_climb_unfinished(
        log_prob_and_grad, x, log_prob, grad, num_steps, step_size, rtol, metric
    )
    return x, lp, evals


def hill_climb_unfinished(
    log_prob_and_grad: LogProbAndGrad,
    x: torch.Tensor,
    log_prob: torch.Tensor,
    grad: torch.Tensor,
    num_steps: int,
    step_size: torch.Tensor,
    rtol: float = 1e-3,
    metric: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """:func:`hill_climb`, and the mask ``(n,)`` of the points whose climb was cut off by ``num_steps``
    while still rising (no accepted step with a gain under ``rtol`` yet)."""
    x, lp, g, h = x.clone(), log_prob.clone(), grad.clone(), step_size.clone()
    active = torch.isfinite(lp)
    evals = 0
    for _ in range(num_steps):
        idx = torch.nonzero(active).flatten()
        if idx.numel() == 0:
            break
        step = g[idx] if metric is None else g[idx] @ metric
        y = x[idx] + h[idx, None] * step
        lp_y, g_y = log_prob_and_grad(y)
        evals += idx.numel()
        up = torch.isfinite(lp_y) & torch.isfinite(g_y).all(-1) & (lp_y > lp[idx])
        gain = torch.where(up, lp_y - lp[idx], torch.zeros_like(lp_y))
        x[idx[up]], lp[idx[up]], g[idx[up]] = y[up], lp_y[up], g_y[up]
        h[idx] = torch.where(up, 1.5 * h[idx], 0.5 * h[idx])
        active[idx[up & (gain < rtol)]] = False
    return x, lp, evals, active


class BoxedTarget:
    r"""The target's ``log_prob`` and ``log_prob_and_grad`` within the box that spans ``x: (n, dim)``
    and as much again on each side, :math:`-\infty` outside without an evaluation: a climb (or a
    Newton step) that runs off along a direction where the log-density keeps rising (or overflows)
    is refused its step instead of reaching points where the model's own checks fail."""

    def __init__(self, target, x: torch.Tensor):
        lo, hi = x.min(0).values, x.max(0).values
        self.target, self.lo, self.hi = target, lo - (hi - lo), hi + (hi - lo)

    def _inside(self, y: torch.Tensor) -> torch.Tensor:
        return ((y >= self.lo) & (y <= self.hi)).all(-1)

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        inside = self._inside(y)
        lp = torch.full(y.shape[:1], -math.inf, dtype=y.dtype, device=y.device)
        if bool(inside.any()):
            lp = lp.index_put((inside,), self.target.log_prob(y[inside]))
        return lp

    def log_prob_and_grad(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inside = self._inside(y)
        lp = torch.full(y.shape[:1], -math.inf, dtype=y.dtype, device=y.device)
        grad = torch.zeros_like(y)
        if bool(inside.any()):
            lp[inside], grad[inside] = self.target.log_prob_and_grad(y[inside])
        return lp, grad


def finish_climbs(target, x: torch.Tensor, s2: float, num_moves: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Climbs cut off while still rising, ``x (n, dim)``, moved on by ``num_moves`` monotone, capped,
    saddle-free Newton steps (:func:`~diffstat.modes.laplace.newton_ascent`, proximal scale
    :math:`s^2` = ``s2``; ``num_moves + 1`` Hessians a point): where a gradient climb's metric is
    wrong for the basin it is in, it crawls along the basin's narrow directions, while on a Gaussian
    basin one Newton step lands on the mode. Returns the end points and their log-densities; where
    the log-density has no second derivative (autograd raises a RuntimeError) the points as they
    were, so the climbs are judged as without the moves."""
    if x.shape[0] == 0:
        return x, x.new_empty(0)
    try:
        with torch.no_grad():
            y, lp, _, _ = newton_ascent(target, x, s2, num_moves)
    except RuntimeError:
        with torch.no_grad():
            return x, target.log_prob(x)
    return y, lp


def ascend(
    grad_fn: LogProbAndGrad, w: torch.Tensor, step: torch.Tensor | float, num_iters: int
) -> torch.Tensor:
    r"""Gradient ascent :math:`w \leftarrow w + \text{step}\,\nabla\log\pi(w)`, ``num_iters`` times,
    batched over the rows of ``w (n, dim)``; returns the end points ``(n, dim)``. ``grad_fn(w)``
    returns ``(log_prob, grad)``. A step that makes a row non-finite leaves it where it was.
    Unlike :func:`hill_climb` no step is refused: every point moves the same way each time, so
    that the end point is a deterministic function of the start (a basin map)."""
    for _ in range(num_iters):
        _, g = grad_fn(w)
        new = w + step * g
        ok = torch.isfinite(new).all(-1, keepdim=True)
        w = torch.where(ok, new, w)
    return w
