"""States, infos and the Metropolis-Hastings accept step that every kernel shares.

A kernel is a pair of pure functions, ``init(log_prob_and_grad, x) -> State`` and
``step(generator, state, log_prob_and_grad, ...) -> (State, Info)``, batched over ``n`` chains.
``log_prob_and_grad`` maps ``x: (n, dim)`` to ``(log_prob (n,), grad (n, dim))``: a
:class:`~diffstat.Target`'s bound method, a tempered density, or a conditional density of SMS.
"""

from __future__ import annotations

from typing import NamedTuple
from collections.abc import Callable

import torch

from diffstat._util import rows_finite

LogProbAndGrad = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

__all__ = [
    "MCMCState",
    "MCMCInfo",
    "LogProbAndGrad",
    "init",
    "metropolis_accept",
    "as_per_chain",
    "rows_finite",
]

#: A proposal whose log acceptance ratio is below minus this many nats counts as a divergence
#: (the numerical integrator blew up); it is rejected like any other.
DIVERGENCE_THRESHOLD = 1000.0


class MCMCState(NamedTuple):
    """Current points ``x: (n, dim)``, their log-densities ``(n,)`` and gradients ``(n, dim)``."""

    x: torch.Tensor
    log_prob: torch.Tensor
    grad: torch.Tensor | None


class MCMCInfo(NamedTuple):
    """What one step did, per chain.

    acceptance_rate: (n,) Metropolis acceptance probability min(1, ratio), 0 for NaN proposals.
    is_accepted: (n,) bool.
    diverging: (n,) bool, NaN/inf proposals or log ratio below -DIVERGENCE_THRESHOLD.
    num_evals: points at which the log-density was evaluated.
    """

    acceptance_rate: torch.Tensor
    is_accepted: torch.Tensor
    diverging: torch.Tensor
    num_evals: int


def init(log_prob_and_grad: LogProbAndGrad, x: torch.Tensor) -> MCMCState:
    """Evaluate the log-density and its gradient at the starting points ``x: (n, dim)``."""
    lp, grad = log_prob_and_grad(x)
    return MCMCState(x, lp, grad)


def as_per_chain(value, like: torch.Tensor) -> torch.Tensor:
    """A scalar or ``(n,)`` tensor as ``(n, 1)``, for broadcasting against ``(n, dim)``."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.dim() == 0:
        return value.expand(like.shape[0]).unsqueeze(-1)
    return value.reshape(-1, 1)


def metropolis_accept(
    generator: torch.Generator,
    state: MCMCState,
    proposal: MCMCState,
    log_ratio: torch.Tensor,
    num_evals: int,
) -> tuple[MCMCState, MCMCInfo]:
    """Accept each chain's proposal independently with probability min(1, exp(log_ratio)).

    ``log_ratio`` must be computed from the proposal's log-density and gradient, so that a NaN or
    infinite proposal makes it NaN or infinite: such proposals are rejected and counted as
    divergent (as is a ratio below -DIVERGENCE_THRESHOLD), and nothing non-finite enters the state.
    """
    # NaN (from a non-finite proposal, log-density or gradient) and +inf ratios are rejected;
    # -inf (outside the support) is an ordinary rejection. One fused op instead of a check per input.
    log_ratio = torch.nan_to_num(log_ratio, nan=-torch.inf, posinf=-torch.inf)
    diverging = log_ratio < -DIVERGENCE_THRESHOLD
    accept_prob = torch.exp(torch.clamp(log_ratio, max=0.0))
    u = torch.rand(log_ratio.shape, generator=generator, dtype=log_ratio.dtype, device=log_ratio.device)
    accepted = u < accept_prob
    # a full-size contiguous mask: torch.where with a broadcast (n, 1) mask takes a path about twice
    # as slow on the CPU, and the copy is shared by the points and the gradients
    a = accepted.unsqueeze(-1).expand_as(state.x).contiguous()
    new = MCMCState(
        torch.where(a, proposal.x, state.x),
        torch.where(accepted, proposal.log_prob, state.log_prob),
        None if state.grad is None else torch.where(a, proposal.grad, state.grad),
    )
    return new, MCMCInfo(accept_prob, accepted, diverging, num_evals)
