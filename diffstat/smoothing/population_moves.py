r"""Long-trajectory HMC moves for a population whose importance weights were not trusted.

The ``"modes"`` population (:mod:`~diffstat.smoothing.populations`) is per-mode Gaussian importance
sampling. Where a mode is far from Gaussian (a curved banana, a heavy tail) the weights are
heavy-tailed (Pareto :math:`\hat k` above 0.7) and the pipeline replaces them by its SMC bridge, whose
short MCMC leaves the particles concentrated where the Gaussian proposal put them: the curved arms of
a banana are cut short, and every draw of a score fitted to such particles inherits that (walk-jump
and SMS on the 2-d banana, docs/walk_jump_banana.md). MALA moves on
:math:`p` repair it only slowly (a diffusive walk along the curve); HMC with trajectories of a few
of the population's standard deviations travels along it (Neal 2011, "MCMC using Hamiltonian
dynamics", section 3.3: the distance moved grows linearly in the trajectory length, not as its
square root).

:func:`hmc_moves`: ``num_iters`` HMC steps from the population, step size :math:`\epsilon = \sqrt{2h}/4`
from the step :math:`h` the MALA moves adapted (a quarter of the MALA proposal's scale: a larger step
is rejected where the curvature is high, in the arms, the very region to be repaired; halved
again after an iteration with mean acceptance under 0.6), the length :math:`L\epsilon` =
``length`` times the population's largest marginal sd, each chain's step jittered uniformly in
:math:`[0.8\epsilon, 1.2\epsilon]` so that no trajectory is periodic (Neal 2011, section 5.4.2.2).
"""

from __future__ import annotations

import math

import torch

from diffstat.mcmc.base import init as init_chain
from diffstat.mcmc.hmc import hmc_step

__all__ = ["hmc_moves"]

#: An iteration whose mean acceptance falls below this halves the step (and doubles the leapfrog steps).
_MIN_ACCEPT = 0.6

#: At most this many leapfrog steps per trajectory (a population of very unequal marginal sds).
_MAX_LEAPFROG = 64


def hmc_moves(target, x, generator, mala_step: float, num_iters: int, length: float = 3.0):
    """``num_iters`` jittered HMC steps on ``p`` from ``x: (n, d)`` (module doc), ``mala_step`` the
    step the MALA moves adapted. Returns ``(x, lp, grad, info)``; ``info`` has ``step_size``,
    ``num_leapfrog``, ``acceptance`` (mean over the last iteration) and ``num_evals``."""
    evals0 = target.num_target_evals
    eps = 0.25 * math.sqrt(2 * mala_step) if math.isfinite(mala_step) and mala_step > 0 else 0.1
    spread = float(x.std(0).max()) if x.shape[0] > 1 else 1.0
    num_leapfrog = min(_MAX_LEAPFROG, max(1, math.ceil(length * spread / eps)))
    state = init_chain(target.log_prob_and_grad, x)
    accept = math.nan
    for _ in range(num_iters):
        u = torch.rand(x.shape[0], generator=generator, dtype=x.dtype, device=generator.device).to(x.device)
        state, info = hmc_step(
            generator, state, target.log_prob_and_grad, eps * (0.8 + 0.4 * u), None, num_leapfrog
        )
        accept = float(info.acceptance_rate.mean())
        if accept < _MIN_ACCEPT and num_leapfrog < _MAX_LEAPFROG:
            eps, num_leapfrog = eps / 2, min(_MAX_LEAPFROG, 2 * num_leapfrog)
    info = {
        "step_size": eps,
        "num_leapfrog": num_leapfrog,
        "acceptance": accept,
        "num_evals": target.num_target_evals - evals0,
    }
    return state.x.detach(), state.log_prob.detach(), state.grad.detach(), info
