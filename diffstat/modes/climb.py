r"""Gradient ascent to the local maxima of a log-density, batched over points: the climbs before
points are grouped by mode (:mod:`diffstat.modes.barriers`).

:func:`hill_climb` adapts a step size per point and only takes steps that raise :math:`\log p`
(the diffusion sampler's mode search, where the target is exact and an evaluation is the cost);
:func:`ascend` takes a fixed number of fixed steps (divide and conquer's basins of a learned
product, where every point must end in a basin and a step is one network evaluation). Newton
ascent with Hessians is in :mod:`diffstat.modes.laplace`.
"""

from __future__ import annotations

import torch

from diffstat.mcmc.base import LogProbAndGrad

__all__ = ["hill_climb", "lbfgs_climb", "ascend"]


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
    return x, lp, evals


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


def lbfgs_climb(
    log_prob_and_grad: LogProbAndGrad,
    x: torch.Tensor,
    log_prob: torch.Tensor,
    grad: torch.Tensor,
    num_steps: int,
    step_size: torch.Tensor,
    metric: torch.Tensor | None = None,
    memory: int = 8,
    rtol: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    r"""Limited-memory BFGS ascent toward each point's local maximum, batched (Nocedal and Wright 2006,
    Algorithm 7.4), with a backtracking line search: the direction :math:`H_k\nabla\log p(x_k)` from the
    last ``memory`` pairs :math:`(s, y) = (x_{k+1} - x_k, \nabla\log p(x_k) - \nabla\log p(x_{k+1}))`
    (those with :math:`s^\top y > 0`), :math:`H^0 = \gamma M` with
    :math:`\gamma = s^\top y / y^\top M y` of the newest pair, or ``step_size`` (per point) before the
    first; the trial :math:`x + t\,d` is kept if it raises :math:`\log p` by at least
    :math:`10^{-4}\,t\,\nabla\log p^\top d` (Armijo), else :math:`t` is halved and the point tries again
    at its next iteration (one evaluation per active point and iteration, as :func:`hill_climb`). A
    point stops once an accepted step gains less than ``rtol`` nats. ``metric (dim, dim)`` is
    :math:`M`, the identity when None.

    The curvature pairs learn each point's local scales: far from a posterior's peak they differ from
    the peak's (a regression's coefficients are as loosely curved as the noise scale there is large),
    which a fixed preconditioner with one step size per point cannot follow. Returns the climbed
    points ``(n, dim)``, their log-densities ``(n,)`` and the evaluations spent."""
    n, dim = x.shape
    x, lp, g = x.clone(), log_prob.clone(), grad.clone()
    like = {"dtype": x.dtype, "device": x.device}
    s_mem, y_mem = torch.zeros(n, memory, dim, **like), torch.zeros(n, memory, dim, **like)
    rho = torch.zeros(n, memory, **like)  # 0 marks an empty slot
    t = torch.ones(n, **like)
    h0 = step_size.to(**like).clone()
    active = torch.isfinite(lp)
    evals = 0
    for _ in range(num_steps):
        idx = torch.nonzero(active).flatten()
        if idx.numel() == 0:
            break
        d = _two_loop(g[idx], s_mem[idx], y_mem[idx], rho[idx], h0[idx], metric)
        slope = (g[idx] * d).sum(-1)
        y = x[idx] + t[idx, None] * d
        lp_y, g_y = log_prob_and_grad(y)
        evals += idx.numel()
        fine = torch.isfinite(lp_y) & torch.isfinite(g_y).all(-1)
        up = fine & (lp_y > lp[idx]) & (lp_y >= lp[idx] + 1e-4 * t[idx] * slope)
        i = idx[up]
        s, yy = y[up] - x[i], g[i] - g_y[up]
        sy = (s * yy).sum(-1)
        keep = sy > 1e-12 * s.norm(dim=-1) * yy.norm(dim=-1)
        j = i[keep]
        s_mem[j] = torch.cat([s_mem[j, 1:], s[keep, None]], 1)
        y_mem[j] = torch.cat([y_mem[j, 1:], yy[keep, None]], 1)
        rho[j] = torch.cat([rho[j, 1:], 1.0 / sy[keep, None]], 1)
        gain = lp_y[up] - lp[i]
        x[i], lp[i], g[i] = y[up], lp_y[up], g_y[up]
        t[i] = 1.0
        t[idx[~up]] *= 0.5
        active[i[gain < rtol]] = False
        active[idx[~up][t[idx[~up]] < 1e-10]] = False  # no step raises log p: a maximum to precision
    return x, lp, evals


def _two_loop(g, s_mem, y_mem, rho, h0, metric):
    """The L-BFGS direction ``(n, dim)`` from the gradients ``g (n, dim)`` and the pairs ``(n, m, dim)``
    (oldest first; ``rho`` 0 for an empty slot)."""
    q = g.clone()
    alpha = torch.zeros_like(rho)
    for k in range(rho.shape[1] - 1, -1, -1):
        alpha[:, k] = rho[:, k] * (s_mem[:, k] * q).sum(-1)
        q = q - alpha[:, k, None] * y_mem[:, k]
    newest = y_mem[:, -1]
    my = newest if metric is None else newest @ metric
    yMy = (newest * my).sum(-1)
    gamma = torch.where(rho[:, -1] > 0, 1.0 / (rho[:, -1] * yMy.clamp_min(1e-300)), h0)
    r = gamma[:, None] * (q if metric is None else q @ metric)
    for k in range(rho.shape[1]):
        beta = rho[:, k] * (y_mem[:, k] * r).sum(-1)
        r = r + (alpha[:, k] - beta)[:, None] * s_mem[:, k]
    return r
