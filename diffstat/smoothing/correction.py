r"""The final correction against the true target: MALA on :math:`p(x\mid y)`.

If :math:`Y \sim q_s` and :math:`X \mid Y = y \sim p(x\mid y) \propto p(x)\,\mathcal N(x; y, s^2 I)`,
then :math:`X \sim p` exactly. SMS and walk-jump end with the jump :math:`\hat x = \mathbb E[X\mid y]`,
the mean of :math:`p(x\mid y)`, whose within-mode spread is shrunk (variance :math:`\tau^4/(\tau^2 +
s^2)` for a Gaussian mode of variance :math:`\tau^2`); a few MALA steps on :math:`p(x\mid y)` started
at the jump turn that mean into a draw, so the within-mode shape is the target's, whatever
smoothed score (exact, training-free or learned) led there. Each step costs one target evaluation per
chain. With ``s2 = inf`` the steps are MALA on :math:`p` itself (used to move particle populations).
"""

from __future__ import annotations

import math

import torch

from diffstat.mcmc.adaptation import DualAveraging
from diffstat.mcmc.base import MCMCState
from diffstat.mcmc.mala import MALA_TARGET_ACCEPT, mala_step

__all__ = ["posterior_mala"]


def posterior_mala(
    generator,
    target,
    x,
    ybar,
    s2: float,
    num_steps: int,
    step_size: float | None = None,
    scale2: float | None = None,
):
    r"""``num_steps`` MALA steps on :math:`p(x\mid\bar y) \propto p(x)\,\mathcal N(x; \bar y, s^2 I)`
    from ``x: (n, d)``, one step size shared by all chains tuned by dual averaging over the first half.

    The first step size is :math:`0.5\, v\, d^{-1/3}` (the MALA scaling) with :math:`v` = ``s2``,
    an upper bound on the posterior variance per coordinate, or ``scale2`` when given (needed for
    ``s2 = inf``, plain MALA on :math:`p`). Returns ``(x, target log-density at x, mean acceptance
    per chain over the second half, step)``."""
    finite = math.isfinite(s2)

    def log_prob_and_grad(z):
        lp, g = target.log_prob_and_grad(z)
        if not finite:
            return lp, g
        return lp - ((z - ybar) ** 2).sum(-1) / (2 * s2), g - (z - ybar) / s2

    state = MCMCState(x, *log_prob_and_grad(x))
    v = min(s2, scale2) if scale2 is not None else s2
    if not math.isfinite(v):
        raise ValueError("posterior_mala with s2 = inf needs scale2 (a variance scale) or step_size")
    h0 = 0.5 * v * x.shape[1] ** (-1 / 3) if step_size is None else step_size
    adapt = DualAveraging(torch.tensor(h0, dtype=x.dtype, device=x.device), MALA_TARGET_ACCEPT)
    num_adapt = num_steps // 2 if step_size is None else 0
    h = adapt.step_size
    acc = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(num_steps):
        state, info = mala_step(generator, state, log_prob_and_grad, h)
        if i < num_adapt:
            h = adapt.update(info.acceptance_rate.mean())
            if i == num_adapt - 1:
                h = adapt.final_step_size
        else:
            acc = acc + info.acceptance_rate
    acc = acc / max(num_steps - num_adapt, 1)
    lp = state.log_prob + (((state.x - ybar) ** 2).sum(-1) / (2 * s2) if finite else 0.0)
    grad = state.grad + ((state.x - ybar) / s2 if finite else 0.0)
    return state.x, lp, acc, float(h), grad
