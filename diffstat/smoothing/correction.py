r"""The final correction against the true target: MALA on :math:`p(x\mid y)`.

If :math:`Y \sim q_s` and :math:`X \mid Y = y \sim p(x\mid y) \propto p(x)\,\mathcal N(x; y, s^2 I)`,
then :math:`X \sim p` exactly. SMS and walk-jump end with the jump :math:`\hat x = \mathbb E[X\mid y]`,
the mean of :math:`p(x\mid y)`, whose within-mode spread is shrunk (variance :math:`\tau^4/(\tau^2 +
s^2)` for a Gaussian mode of variance :math:`\tau^2`); a few MALA steps on :math:`p(x\mid y)` started
at the jump turn that mean into a draw, so the within-mode shape is the target's, whatever
smoothed score (exact, training-free or learned) led there. Each step costs one target evaluation per
chain. With ``s2 = inf`` the steps are MALA on :math:`p` itself (used to move particle populations).

The steps start at the posterior mean, so they must restore the spread the jump removed, within a
few steps: along a direction of posterior sd :math:`\tau` the jumps keep :math:`\tau/\sqrt{\tau^2 +
s^2}` of it. Unpreconditioned MALA's step is set by the narrowest direction and barely moves the wide
ones: on ionosphere (walk-jump at :math:`s = 1`, 34-d, posterior sds 0.08 to 0.74 along the principal
axes) the jumps' marginal sds were 45 to 61% short and still 11 to 24% short after 20 steps (5% after
100). With a learned score the
steps are preconditioned by :math:`C = (F + I/s^2)^{-1}` (:func:`posterior_metric`, :math:`F` the
target's Fisher information over the score's particles), the covariance of :math:`p(x\mid y)` for a
Gaussian mode: after 20 steps the sds were within 5% (docs/sms.md).
"""

from __future__ import annotations

import math

import torch

from diffstat.mcmc.metric import DenseMetric
from diffstat.smoothing import adaptive_mala

__all__ = ["posterior_mala", "posterior_metric", "correct", "correct_jumps", "check_num_mala"]


def posterior_mala(
    generator,
    target,
    x,
    ybar,
    s2: float,
    num_steps: int,
    step_size: float | None = None,
    scale2: float | None = None,
    inv_mass=None,
):
    r"""``num_steps`` MALA steps on :math:`p(x\mid\bar y) \propto p(x)\,\mathcal N(x; \bar y, s^2 I)`
    from ``x: (n, d)``, one step size shared by all chains tuned by dual averaging over the first half.

    The first step size is :math:`0.5\, v\, d^{-1/3}` (the MALA scaling) with :math:`v` = ``s2``,
    an upper bound on the posterior variance per coordinate, or ``scale2`` when given (needed for
    ``s2 = inf``, plain MALA on :math:`p`), or 1 with a preconditioner ``inv_mass`` (a
    :class:`~diffstat.mcmc.metric.DenseMetric` in the units of the posterior's covariance, e.g.
    :func:`posterior_metric`). The chains run on :mod:`~diffstat.smoothing.adaptive_mala`.
    Returns ``(x (n, d), the target's log-density at x (n,), mean acceptance per chain over the
    second half (n,), step size, the target's score at x (n, d))``."""
    finite = math.isfinite(s2)

    def log_prob_and_grad(z):
        lp, g = target.log_prob_and_grad(z)
        if not finite:
            return lp, g
        return lp - ((z - ybar) ** 2).sum(-1) / (2 * s2), g - (z - ybar) / s2

    v = 1.0 if inv_mass is not None else min(s2, scale2) if scale2 is not None else s2
    if not math.isfinite(v):
        raise ValueError("posterior_mala with s2 = inf needs scale2 (a variance scale) or step_size")
    h0 = 0.5 * v * x.shape[1] ** (-1 / 3) if step_size is None else step_size
    num_adapt = num_steps // 2 if step_size is None else 0
    state, _ = adaptive_mala.run(generator, log_prob_and_grad, x, num_steps, h0, num_adapt, inv_mass)
    chain = state.chain
    lp = chain.log_prob + (((chain.x - ybar) ** 2).sum(-1) / (2 * s2) if finite else 0.0)
    grad = chain.grad + ((chain.x - ybar) / s2 if finite else 0.0)
    return chain.x, lp, adaptive_mala.mean_acceptance(state), float(state.step_size), grad


def posterior_metric(fisher: torch.Tensor | None, s2: float, like: torch.Tensor) -> DenseMetric | None:
    r"""The correction's preconditioner :math:`C = (F + I/s^2)^{-1}` (module doc) from the target's
    Fisher information ``fisher: (d, d)`` (:meth:`~diffstat.smoothing.learned.LearnedSmoothedScore.
    fisher_information`); None (the identity) without one. :math:`C \preceq s^2 I` whatever
    :math:`F`, so a poor estimate of :math:`F` costs step size, not correctness. In ``like``'s dtype
    and device."""
    if fisher is None:
        return None
    eye = torch.eye(fisher.shape[0], dtype=torch.float64, device=fisher.device)
    cov = torch.cholesky_inverse(torch.linalg.cholesky(fisher.double() + eye / s2))
    return DenseMetric.from_covariance(cov).to(dtype=like.dtype, device=like.device)


def correct_jumps(generator, target, x: torch.Tensor, y: torch.Tensor, s2: float, num_mala: int, fisher=None):
    """Walk-jump's correction of every jump ``x: (chains, draws, d)`` at its walker ``y`` (same shape):
    ``num_mala`` steps of :func:`posterior_mala` on p(x | y) with noise variance ``s2`` (none: the
    jumps themselves), preconditioned by :func:`posterior_metric` of ``fisher`` when given. A
    non-finite jump stays NaN. Returns ``(x, lp (chains, draws), step size)``."""
    shape = x.shape
    flat, yf = x.reshape(-1, shape[-1]), y.reshape(-1, shape[-1])
    if num_mala == 0:
        return x, target.log_prob(flat).detach().reshape(shape[:2]), math.nan
    ok = torch.isfinite(flat).all(-1)
    flat = torch.where(ok[:, None], flat, yf)
    metric = posterior_metric(fisher, s2, flat)
    out, lp, _, h, _ = posterior_mala(generator, target, flat, yf, s2, num_mala, inv_mass=metric)
    out = torch.where(ok[:, None], out, torch.full_like(out, math.nan))
    lp = torch.where(ok, lp.detach(), torch.full_like(lp, math.nan))
    return out.reshape(shape), lp.reshape(shape[:2]), h


def check_num_mala(num_mala, default: int) -> int:
    """``num_mala`` (correction steps), ``default`` when None; a non-negative integer."""
    num_mala = default if num_mala is None else num_mala
    if isinstance(num_mala, bool) or not isinstance(num_mala, int) or num_mala < 0:
        raise ValueError(f"num_mala must be a non-negative integer, got {num_mala!r}")
    return num_mala


def correct(generator, target, x: torch.Tensor, y: torch.Tensor, s2: float, num_mala: int, fisher=None):
    """SMS's correction of the jumps ``x: (n, d)`` at ``y: (n, d)``: :func:`posterior_mala`
    (preconditioned by :func:`posterior_metric` of ``fisher`` when given), or with ``num_mala = 0`` the
    jumps themselves. Returns ``(x, lp (n,), acceptance (n,), step size)``."""
    if num_mala > 0:
        metric = posterior_metric(fisher, s2, x)
        return posterior_mala(generator, target, x, y, s2, num_mala, inv_mass=metric)[:4]
    return x, target.log_prob(x).detach(), torch.ones(x.shape[0], dtype=x.dtype, device=x.device), math.nan
