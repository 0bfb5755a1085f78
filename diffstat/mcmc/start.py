r"""Getting chains to the posterior before warm-up: a batched optimiser from the initial draws,
jittered, and a per-chain initial step size.

Starting points drawn from a prior can lie where the log-density is :math:`-10^4` or lower; an MCMC
kernel there needs a tiny step size and barely moves, and a warm-up that shares one step size across
chains then collapses it for every chain. :func:`find_start` first climbs the log-density by
gradient ascent with Barzilai-Borwein step lengths (Barzilai and Borwein 1988) and an Armijo
backtracking safeguard, every chain its own step length, all chains in one batch. The BB step
:math:`a = s^\top s / s^\top y` (``s`` the last move, ``y`` the change of the negative gradient) is
the inverse of a Rayleigh quotient of the Hessian, so the ascent adapts to the local curvature at
no extra cost: a few tens of iterations cross many orders of magnitude of log-density. The result is
jittered by :math:`\mathcal N(0, a_{\min} I)`, with :math:`a_{\min}` the chain's smallest accepted BB
step (about one over the largest curvature), so the chains leave the mode in different directions
without leaving the typical set along the stiffest direction. Like the first L-BFGS stage of
Pathfinder (Zhang et al. 2022) this aims at the bulk, not at an exact mode: the iterations are
capped (default 200), so a density unbounded above (a funnel's neck) is not chased far.

:func:`initial_step_sizes` is Hoffman and Gelman's (2014) doubling/halving heuristic run per chain:
each chain's step size is doubled (or halved) until its one-step acceptance probability crosses 1/2.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffstat.mcmc.base import LogProbAndGrad, MCMCState

__all__ = ["find_start", "initial_step_sizes"]

#: Armijo constant: a step must gain at least this fraction of the first-order prediction a |g|^2.
ARMIJO = 1e-4
#: A chain stops climbing once an accepted step gains fewer nats than this (near a mode, where the
#: kernel's own warm-up does better than more optimisation).
GAIN_TOL = 1e-2


def find_start(
    generator: torch.Generator,
    state: MCMCState,
    log_prob_and_grad: LogProbAndGrad,
    max_iters: int = 200,
    jitter: bool = True,
) -> tuple[MCMCState, torch.Tensor]:
    """Batched per-chain gradient ascent on the log-density from ``state``, then a jitter.

    Parameters
    ----------
    state : MCMCState
        Starting points ``x: (n, dim)`` with their log-densities and gradients.
    max_iters : int
        Iterations of the ascent (each one evaluation per chain); the loop stops earlier once every
        chain has converged (checked every 10 iterations, to avoid a host synchronisation per step).
    jitter : bool
        Add :math:`\\mathcal N(0, a_{\\min} I)` to each chain (see the module docstring); the jittered
        point is kept only where its log-density is finite.

    Returns
    -------
    (MCMCState, (n,) tensor)
        The new state and each chain's smallest accepted step length (a scale for its curvature).
    """
    x, lp, g = state.x, state.log_prob, state.grad
    gnorm = g.norm(dim=-1).clamp_min(1e-12)
    a = (0.01 / gnorm).clamp(max=0.01)  # a first move of at most 0.01 in norm
    a_min = torch.full_like(lp, float("inf"))
    done = ~torch.isfinite(lp)
    for it in range(max_iters):
        a_col = a.unsqueeze(-1)
        y = x + a_col * g
        lp_y, g_y = log_prob_and_grad(y)
        gain = lp_y - lp
        ok = (
            torch.isfinite(lp_y)
            & torch.isfinite(g_y).all(-1)
            & (gain >= ARMIJO * a * (g * g).sum(-1))
            & ~done
        )
        s = y - x
        curv = -((g_y - g) * s).sum(-1)  # s^T H s along the move, for -log pi
        bb = torch.where(curv > 0, (s * s).sum(-1) / curv.clamp_min(1e-300), 4 * a)
        a_min = torch.where(ok, torch.minimum(a_min, torch.minimum(a, bb)), a_min)
        done = done | (ok & (gain < GAIN_TOL))
        a = torch.where(ok, bb.clamp(max=1e3 * a), torch.where(done, a, 0.25 * a))
        k = ok.unsqueeze(-1)
        x, lp, g = torch.where(k, y, x), torch.where(ok, lp_y, lp), torch.where(k, g_y, g)
        done = done | (a < 1e-300)
        if it % 10 == 9 and bool(done.all()):
            break
    a_min = torch.where(torch.isfinite(a_min), a_min, a)
    if jitter:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        y = x + a_min.sqrt().unsqueeze(-1) * noise
        lp_y, g_y = log_prob_and_grad(y)
        ok = torch.isfinite(lp_y) & torch.isfinite(g_y).all(-1)
        k = ok.unsqueeze(-1)
        x, lp, g = torch.where(k, y, x), torch.where(ok, lp_y, lp), torch.where(k, g_y, g)
    return MCMCState(x, lp, g), a_min


def initial_step_sizes(
    accept_prob: Callable[[torch.Tensor], torch.Tensor],
    h0: torch.Tensor,
    target: float = 0.5,
    max_trials: int = 40,
) -> torch.Tensor:
    """Per-chain step sizes ``(n,)``: each chain's ``h0`` doubled while its one-step acceptance
    probability stays above ``target`` (or halved while below), stopping at the crossing.

    ``accept_prob(h)`` maps step sizes ``(n,)`` to acceptance probabilities ``(n,)`` of one trial
    step from the current state (the chains do not move). At most ``max_trials`` trials.
    """
    h = h0.clone()
    up = accept_prob(h) > target
    done = torch.zeros_like(up)
    for _ in range(max_trials):
        h_new = torch.where(up, 2.0 * h, 0.5 * h)
        acc = accept_prob(h_new)
        crossed = torch.where(up, acc < target, acc > target)
        # going up, keep the last step size that was still accepted often enough
        h = torch.where(done | (crossed & up), h, h_new)
        done = done | crossed
        if bool(done.all()):
            break
    return h
