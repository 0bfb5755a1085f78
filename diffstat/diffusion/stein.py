r"""A check that the sampler's weighted draws have the spread the target's score says they must:
the diagonal of Stein's identity.

For a smooth density :math:`p` whose tails vanish, integration by parts gives, for every
coordinate :math:`j` and any constant :math:`c_j`,

.. math:: \mathbb E_p\big[(x_j - c_j)\,\partial_j \log p(x)\big] = -1

(Stein 1972; the test function :math:`x_j`, as in the kernel Stein discrepancies of Gorham and
Mackey 2015). Importance weights cannot show mass that the proposal never drew: a proposal whose
tails are lighter than the target's along a curve (a banana's arms, a funnel's neck) gives weights
that look fine (Pareto :math:`\hat k` 0.5 to 0.6, Kish ESS 0.5 to 0.9 of the draws, the rounds'
log Z in agreement) while the draws are too narrow. The identity sees it: for a Gaussian
:math:`\mathcal N(0, \sigma^2)` and draws of spread :math:`\tau`, the mean of
:math:`x\,\partial\log p` is :math:`-\tau^2/\sigma^2`, not :math:`-1`; it compares the draws'
spread with the curvature of :math:`\log p` where they lie, which the weights do not.

:func:`stein_check` resamples ``num`` draws systematically from the weighted particles, evaluates
the gradient once at each distinct one (weighted by its count), and returns per coordinate the
statistic :math:`S_j = \overline{(x_j - \bar x_j)\partial_j\log p} + 1` (0 in expectation, up to
:math:`O(1/n)`) with its standard error. A coordinate fails where :math:`|S_j|` exceeds both
``STEIN_Z`` standard errors (a Bonferroni-sized bound over up to a few hundred coordinates) and
``STEIN_TOLERANCE`` (an error that matters: the spread off by about 10% in variance, below the
sd errors the checks are meant to catch).

It needs :math:`p` positive and smooth on all of :math:`\mathbb R^d` (the unconstrained coordinates of
a Pyro or posteriordb model): a density cut off at a boundary (:math:`\log p = -\infty` outside a box)
adds a boundary term and fails it (a half-normal's draws, right to 0.5%, gave z = 42), so the sampler
skips the check where a proposal met :math:`\log p = -\infty` at a finite point (:func:`cut_off`).
Its power is that of the draws: the integrand's variance is
large where the score varies across the draws, so it sees a funnel's missed neck (centred Eight
Schools) but not a banana whose arms are 15 to 20% short (``docs/diffusion_tails.md``).
"""

from __future__ import annotations

import math

import torch

from diffstat.tempering.resampling import systematic

__all__ = [
    "MIN_STEIN_DRAWS",
    "STEIN_DRAWS",
    "STEIN_TOLERANCE",
    "STEIN_Z",
    "cut_off",
    "stein_attrs",
    "stein_check",
    "stein_checked",
    "stein_reason",
    "stein_statistic",
]

#: Draws resampled for the check (gradients at the distinct ones; at most this many evaluations).
STEIN_DRAWS = 4096
#: Fewer draws than this left in the run's budget (``max_evals``): no check.
MIN_STEIN_DRAWS = 256
#: Standard errors a coordinate's statistic must exceed to fail: 5, a two-sided p of 6e-7 per
#: coordinate, so that a run of 100 coordinates raises a false alarm about once in 20,000 runs.
STEIN_Z = 5.0
#: Least |S_j| that fails: 0.1, the draws' variance about 10% off the score's (sd 5%).
STEIN_TOLERANCE = 0.1


def cut_off(x: torch.Tensor, log_prob: torch.Tensor) -> bool:
    """Whether the log-density is ``-inf`` at a point of ``x (n, dim)`` with finite coordinates (its values
    ``log_prob (n,)``): a support with a boundary, where the identity does not hold."""
    return bool((torch.isneginf(log_prob) & torch.isfinite(x).all(-1)).any())


def stein_check(target, x: torch.Tensor, log_w: torch.Tensor, generator, num: int = STEIN_DRAWS) -> dict:
    r"""The statistic of the module docstring on the particles ``x (n, dim)`` with log weights
    ``log_w (n,)``: ``stat (dim,)``, ``se (dim,)``, ``z (dim,)`` (``stat / se``, 0 where both are
    0), ``fails (dim,)`` bool and ``evals``, the gradient evaluations spent. Particles whose
    log-density or gradient is not finite are left out."""
    idx = systematic(generator, log_w.double().to(generator.device), num).to(x.device)
    uniq, counts = torch.unique(idx, return_counts=True)
    before = target.num_target_evals
    lp, grad = target.log_prob_and_grad(x[uniq])
    ok = torch.isfinite(lp) & torch.isfinite(grad).all(-1)
    check = stein_statistic(x[uniq][ok], grad[ok], counts[ok])
    return check | {"evals": target.num_target_evals - before}


def stein_statistic(x: torch.Tensor, grad: torch.Tensor, weights: torch.Tensor) -> dict:
    r"""The statistic of the module docstring from distinct points ``x (n, dim)``, the gradients of
    :math:`\log p` there ``grad (n, dim)`` and nonnegative ``weights (n,)`` (counts or importance
    weights; their sum is normalised away): ``stat``, ``se``, ``z`` and ``fails`` ``(dim,)``, in
    float64. The standard error treats the points as independent draws."""
    xs, gs = x.double(), grad.double()
    w = weights.double()
    w = w / w.sum()
    mean = (w[:, None] * xs).sum(0)
    f = (xs - mean) * gs
    stat = (w[:, None] * f).sum(0) + 1.0
    se = torch.sqrt((w[:, None] ** 2 * (f - (stat - 1.0)) ** 2).sum(0))
    z = torch.where(se > 0, stat.abs() / se.clamp_min(1e-300), torch.where(stat == 0, 0.0, math.inf))
    fails = (z > STEIN_Z) & (stat.abs() > STEIN_TOLERANCE)
    return {"stat": stat, "se": se, "z": z, "fails": fails}


def stein_reason(check: dict, names=None) -> str | None:
    """A sentence naming the coordinates that fail :func:`stein_check` (None where none does)."""
    bad = torch.nonzero(check["fails"]).flatten().tolist()
    if not bad:
        return None
    label = (lambda j: names[j]) if names is not None else (lambda j: f"x[{j}]")
    worst = sorted(bad, key=lambda j: -float(check["z"][j]))[:3]
    figures = ", ".join(
        f"{label(j)}: {float(check['stat'][j]) - 1:+.2f} +- {float(check['se'][j]):.2f}" for j in worst
    )
    return (
        f"the draws fail Stein's identity E[(x_j - mean) d/dx_j log p] = -1 in {len(bad)} of "
        f"{check['stat'].shape[0]} coordinates ({figures}): their spread is not the one the target's "
        "gradient implies, so the proposals missed part of the mass (a curved or heavy tail, a neck)"
    )


def stein_checked(
    generator, target, x: torch.Tensor, log_w: torch.Tensor, budget: int
) -> tuple[dict, str | None]:
    """:func:`stein_check` and :func:`stein_reason` on the particles with at most ``budget``
    evaluations (``STEIN_DRAWS`` at most; below ``MIN_STEIN_DRAWS`` no check: every statistic 0), with
    ``generator``'s state restored afterwards, so the run's draws are those it gives without the check."""
    num = min(STEIN_DRAWS, int(budget))
    if num < MIN_STEIN_DRAWS:
        zero = torch.zeros(x.shape[1], dtype=torch.float64)
        return {"stat": zero, "se": zero, "z": zero, "fails": zero > 0, "evals": 0}, None
    state = generator.get_state()
    try:
        check = stein_check(target, x, log_w, generator, num)
    finally:
        generator.set_state(state)
    return check, stein_reason(check)


def stein_attrs(check: dict) -> dict:
    """The run's attrs of a :func:`stein_check`: the largest |z| and |S_j| over the coordinates and the
    gradient evaluations it spent."""
    return {
        "stein_max_z": float(check["z"].max()),
        "stein_max_error": float(check["stat"].abs().max()),
        "stein_evals": int(check["evals"]),
    }
