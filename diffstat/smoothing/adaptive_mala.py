r"""The one adaptive Langevin runner of :mod:`diffstat.smoothing`: MALA with dual averaging.

Every Metropolis-adjusted Langevin chain of walk-jump and SMS runs here: the walk on
:math:`q_\sigma` of walk-jump (``walk="mala"``) and the final correction on :math:`p(x\mid y)`
of both (:mod:`~diffstat.smoothing.correction`). A run is :func:`init`, then :func:`step` as often
as the caller needs, the first ``num_adapt`` steps tuning one step size shared by all chains:

1. :func:`diffstat.mcmc.mala.mala_step` (per-chain accept) with the current step size and the
   preconditioner given at :func:`init` (none: the identity);
2. while adapting, :class:`diffstat.mcmc.adaptation.DualAveraging` toward
   :data:`~diffstat.mcmc.mala.MALA_TARGET_ACCEPT` (0.574, optimal for MALA in high dimension,
   Roberts and Rosenthal 1998) on the chains' mean acceptance; after the last adaptation step the
   averaged step size is kept;
3. after adaptation, the acceptance of each chain is summed, for the per-chain mean a sampler reports.

One step size for all chains, not one each: the chains of these samplers are independent runs of
one and the same kernel, and the mean over hundreds of chains makes dual averaging converge in a
few dozen steps. :func:`run` is the loop for callers that only need the end point.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch

from diffstat.mcmc.adaptation import DualAveraging
from diffstat.mcmc.base import LogProbAndGrad, MCMCInfo, MCMCState
from diffstat.mcmc.base import init as init_chain
from diffstat.mcmc.mala import MALA_TARGET_ACCEPT, mala_step
from diffstat.mcmc.metric import Metric

__all__ = ["AdaptiveMALAState", "AdaptiveMALAInfo", "init", "step", "run", "mean_acceptance"]


class AdaptiveMALAState(NamedTuple):
    """Chains, step size and adaptation, between two steps.

    chain: the MALA state, ``x: (n, dim)``, ``log_prob: (n,)``, ``grad: (n, dim)``.
    step_size: () tensor, the step size of the next step.
    adaptation: the dual-averaging state (never mutated: :func:`step` updates a copy).
    num_adapt: adaptation steps still to come.
    accept_sum: (n,) summed acceptance probabilities of the steps after adaptation.
    num_kept: steps after adaptation.
    inv_mass: the preconditioner :math:`M^{-1}` (:mod:`diffstat.mcmc.metric`; None: the identity).
    """

    chain: MCMCState
    step_size: torch.Tensor
    adaptation: DualAveraging
    num_adapt: int
    accept_sum: torch.Tensor
    num_kept: int
    inv_mass: Metric = None


class AdaptiveMALAInfo(NamedTuple):
    """What one step did: the MALA step's :class:`~diffstat.mcmc.base.MCMCInfo` (per-chain
    ``acceptance_rate``, ``is_accepted``, ``diverging`` and ``num_evals``, the points at which the
    log-density was evaluated), the step size it used, and whether it was an adaptation step."""

    mcmc: MCMCInfo
    step_size: torch.Tensor
    adapting: bool


def init(
    log_prob_and_grad: LogProbAndGrad,
    x: torch.Tensor,
    step_size: float | torch.Tensor,
    num_adapt: int,
    inv_mass: Metric = None,
) -> AdaptiveMALAState:
    """Start ``x: (n, dim)`` chains at the initial ``step_size``, adapting it over ``num_adapt`` steps
    (0: kept fixed), with the preconditioner ``inv_mass`` (None: the identity). Evaluates the
    log-density and gradient at ``x`` (``n`` evaluations)."""
    h = torch.as_tensor(step_size, dtype=x.dtype, device=x.device)
    adaptation = DualAveraging(h, MALA_TARGET_ACCEPT)
    accept_sum = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    chain = init_chain(log_prob_and_grad, x)
    return AdaptiveMALAState(chain, adaptation.step_size, adaptation, int(num_adapt), accept_sum, 0, inv_mass)


def step(
    generator: torch.Generator, state: AdaptiveMALAState, log_prob_and_grad: LogProbAndGrad
) -> tuple[AdaptiveMALAState, AdaptiveMALAInfo]:
    """One MALA step at ``state.step_size``, then one dual-averaging update while adapting (the
    averaged step size after the last one), or the acceptance added to ``accept_sum`` after."""
    h = state.step_size
    chain, info = mala_step(generator, state.chain, log_prob_and_grad, h, state.inv_mass)
    if state.num_adapt > 0:
        adaptation = copy.copy(state.adaptation)  # DualAveraging.update rebinds, never writes in place
        new_h = adaptation.update(info.acceptance_rate.mean())
        if state.num_adapt == 1:
            new_h = adaptation.final_step_size
        new = state._replace(
            chain=chain, step_size=new_h, adaptation=adaptation, num_adapt=state.num_adapt - 1
        )
        return new, AdaptiveMALAInfo(info, h, True)
    new = state._replace(
        chain=chain, accept_sum=state.accept_sum + info.acceptance_rate, num_kept=state.num_kept + 1
    )
    return new, AdaptiveMALAInfo(info, h, False)


def mean_acceptance(state: AdaptiveMALAState) -> torch.Tensor:
    """``(n,)`` mean acceptance probability per chain over the steps after adaptation (0 if none)."""
    return state.accept_sum / max(state.num_kept, 1)


def run(
    generator: torch.Generator,
    log_prob_and_grad: LogProbAndGrad,
    x: torch.Tensor,
    num_steps: int,
    step_size: float | torch.Tensor,
    num_adapt: int,
    inv_mass: Metric = None,
) -> tuple[AdaptiveMALAState, int]:
    """``num_steps`` steps from ``x: (n, dim)``, the first ``num_adapt`` adapting the step size, with
    the preconditioner ``inv_mass``. Returns the final state and the number of target evaluations
    (``n`` per step, plus ``n`` at the start)."""
    state = init(log_prob_and_grad, x, step_size, num_adapt, inv_mass)
    num_evals = x.shape[0]
    for _ in range(num_steps):
        state, info = step(generator, state, log_prob_and_grad)
        num_evals += info.mcmc.num_evals
    return state, num_evals
