r"""Delayed-rejection MALA: when a MALA proposal is rejected, try again from the same point with a
smaller step, keeping the chain exactly :math:`\pi`-invariant.

**Algorithm** (Tierney and Mira 1999; Green and Mira 2001; Mira 2001 for any number of stages).
Stage :math:`j = 1, \dots, K` proposes from the current point :math:`x`,

.. math:: y_j = x + h_j M^{-1}\nabla\log\pi(x) + \sqrt{2h_j}\,M^{-1/2}\xi_j, \qquad
   h_j = h / c^{\,j-1},

(:math:`c` the ``step_factor``) only if stages :math:`1..j-1` were all rejected, and accepts it with

.. math:: \alpha_j(x, y_1, \dots, y_j) = \min\left\{1,\;
   \frac{F(y_j, y_{j-1}, \dots, y_1, x)}{F(x, y_1, \dots, y_j)}\right\},
   \qquad F(p_0, \dots, p_j) = \pi(p_0) \prod_{i=1}^{j} q_i(p_0 \to p_i)
   \prod_{i=1}^{j-1}\bigl(1 - \alpha_i(p_0, \dots, p_i)\bigr),

:math:`q_i` the MALA proposal density of step :math:`h_i`
(:func:`~diffstat.mcmc.mala.mala_proposal_log_density`).
Since a MALA proposal depends only on the point it leaves, not on earlier rejected proposals, every
factor is a density or gradient already evaluated at :math:`x, y_1, \dots, y_j`: stage :math:`j`
costs one evaluation per particle that reaches it, and no ghost point (unlike delayed-rejection
HMC, Modi, Barnett and Carpenter 2023). For two stages,

.. math:: \alpha_2 = \min\left\{1, \frac{\pi(y_2)\, q_1(y_2\to y_1)\,[1-\alpha_1(y_2, y_1)]\,
   q_2(y_2\to x)}{\pi(x)\, q_1(x\to y_1)\,[1-\alpha_1(x, y_1)]\, q_2(x \to y_2)}\right\}.

The path flux :math:`F(x, y_1..y_j)\,\alpha_j` is symmetric under reversing the path, which is
detailed balance; everything is computed in log space (:class:`DelayedRejection`).

**Why** (the motivation of Modi, Barnett and Carpenter 2023): on a multiscale target one step size
cannot suit the narrow and the wide regions; a first stage sized for the wide region and smaller
later ones adapt the step to where each particle is, at the cost of the rejected particles only.
The later stages' ratio limits this: it carries :math:`q_1(y_2 \to y_1) / q_1(x \to y_1)`, which
collapses where the gradient changes fast, and from stage 3 on the reversed path needs the bold
:math:`y_1` proposed with a smaller step (measured on Neal's funnel: ``docs/smc_funnel.md``, section 6).

**Points outside the support.** A point whose log-density is not finite (NaN, :math:`\pm\infty`) or
whose gradient or coordinates are not has :math:`\pi = 0` in every flux: it is never accepted, and
moving to it from any point has probability 0 (a property of the point alone, so both directions of
a path agree). A row is divergent as in MALA, when its first stage's log ratio is below
:data:`~diffstat.mcmc.base.DIVERGENCE_THRESHOLD` or not a number, unless a later stage is accepted
(a later stage's ratio is small whenever the first proposal went far, with no numerical failure).

**Evaluations.** The first stage evaluates every row through ``log_prob_and_grad(y)``; a later stage
evaluates only the rows still rejected. When ``log_prob_and_grad`` has a method
``evaluate_rows(y, rows)`` (the tempering moves' recorders do) it is called with those rows'
proposals and their indices ``rows`` into the batch, so a wrapper that remembers the proposals can
merge them (the tempering moves keep the accepted points' evaluations this way); otherwise
``log_prob_and_grad`` is called on the subset.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from diffstat.mcmc.base import DIVERGENCE_THRESHOLD, LogProbAndGrad, MCMCState, as_per_chain, rows_finite
from diffstat.mcmc.mala import mala_proposal_log_density
from diffstat.mcmc.metric import DenseMetric, Metric, scale_noise, velocity

__all__ = [
    "DR_MALA_TARGET_ACCEPT",
    "DR_NUM_STAGES",
    "DR_STEP_FACTOR",
    "DRMALAInfo",
    "DelayedRejection",
    "dr_mala_step",
]

#: Target of the step-size adaptation for the *first* stage's acceptance. Lower than MALA's 0.574:
#: a rejected first proposal is retried with a smaller step instead of wasting the move, so the
#: first stage may be bolder (measurements: ``docs/smc_funnel.md``).
DR_MALA_TARGET_ACCEPT = 0.4
#: Stages: one retry, the cheapest form (a third stage is rarely accepted unless ``c`` is near 1).
DR_NUM_STAGES = 2
#: Each stage's step size is the previous one's divided by this: a retry distinctly smaller than the
#: first step, still close enough for the stage-2 ratio's first-stage factor to stay moderate.
DR_STEP_FACTOR = 4.0


class DRMALAInfo(NamedTuple):
    """A DR-MALA step's diagnostics: the fields of :class:`~diffstat.mcmc.base.MCMCInfo`, with
    ``acceptance_rate`` the *first* stage's acceptance probability (what step-size adaptation aims
    at; ``is_accepted`` is the overall outcome), plus ``stage_acceptance: (n, K)`` each stage's
    acceptance probability (NaN for stages a row did not reach) and ``accepted_stage: (n,)`` the
    stage whose proposal was accepted, 1 to K, or 0."""

    acceptance_rate: torch.Tensor
    is_accepted: torch.Tensor
    diverging: torch.Tensor
    num_evals: int
    stage_acceptance: torch.Tensor
    accepted_stage: torch.Tensor


def _rows_metric(inv_mass: Metric, rows: torch.Tensor) -> Metric:
    """The metric of the batch rows ``rows``: a per-row diagonal ``(n, dim)`` is indexed, a shared
    one is kept."""
    if inv_mass is None or isinstance(inv_mass, DenseMetric) or inv_mass.dim() == 1:
        return inv_mass
    return inv_mass[rows]


class DelayedRejection:
    r"""The fluxes :math:`F` and acceptance probabilities :math:`\alpha` (module docstring) of a batch
    of ``m`` paths through the points ``points[k] = (x, log_prob, grad)`` (``(m, dim)``, ``(m,)``,
    ``(m, dim)``), with stage step sizes ``step_sizes[i-1] = h_i`` (``(m, 1)``) and metric
    ``inv_mass``. A path is a tuple of point indices; results are memoised per path."""

    def __init__(self, points, step_sizes, inv_mass: Metric):
        self.x = [p[0] for p in points]
        self.grad = [p[2] for p in points]
        # pi = 0 at a point whose density, gradient or coordinates are not finite
        self.zero = [~(torch.isfinite(p[1]) & rows_finite(p[2]) & rows_finite(p[0])) for p in points]
        self.log_prob = [p[1].masked_fill(z, -math.inf) for p, z in zip(points, self.zero)]
        self.h, self.inv_mass = list(step_sizes), inv_mass
        self._q, self._alpha = {}, {}

    def log_q(self, stage: int, a: int, b: int) -> torch.Tensor:
        r""":math:`\log q_{stage}(p_a \to p_b)` up to the constant shared by both directions."""
        key = (stage, a, b)
        if key not in self._q:
            h = self.h[stage - 1]
            lq = mala_proposal_log_density(self.x[b], self.x[a], self.grad[a], h, self.inv_mass)
            self._q[key] = torch.nan_to_num(lq, nan=-math.inf)
        return self._q[key]

    def log_flux(self, path: tuple[int, ...]) -> torch.Tensor:
        r""":math:`\log F(p_0, \dots, p_j)`, :math:`-\infty` where :math:`\pi(p_0) = 0`."""
        j, p0 = len(path) - 1, path[0]
        out = self.log_prob[p0].clone()
        for i in range(1, j + 1):
            out = out + self.log_q(i, p0, path[i])
        for i in range(1, j):
            out = out + torch.log(-torch.expm1(self.log_alpha(path[: i + 1])))
        out = torch.nan_to_num(out, nan=-math.inf)
        return out.masked_fill(self.zero[p0], -math.inf)

    def log_ratio(self, path: tuple[int, ...]) -> torch.Tensor:
        """Log of the ratio inside :math:`\\alpha_j`: the reversed path's flux over the path's (NaN
        where both are zero)."""
        return self.log_flux(path[::-1]) - self.log_flux(path)

    def log_alpha(self, path: tuple[int, ...]) -> torch.Tensor:
        r""":math:`\log\alpha_j(p_0, \dots, p_j)`, :math:`-\infty` where the ratio is not a number or
        :math:`\pi(p_j) = 0`."""
        if path not in self._alpha:
            r = torch.nan_to_num(self.log_ratio(path), nan=-math.inf, posinf=-math.inf)
            self._alpha[path] = r.clamp(max=0.0).masked_fill(self.zero[path[-1]], -math.inf)
        return self._alpha[path]


def _evaluate(log_prob_and_grad, y: torch.Tensor, rows: torch.Tensor, full: bool):
    """The density at the proposals ``y`` of the batch rows ``rows`` (module docstring)."""
    hook = getattr(log_prob_and_grad, "evaluate_rows", None)
    if full or hook is None:
        return log_prob_and_grad(y)
    return hook(y, rows)


def _check_stages(num_stages, step_factor) -> tuple[int, float]:
    if isinstance(num_stages, bool) or int(num_stages) != num_stages or int(num_stages) < 1:
        raise ValueError(f"num_stages must be a positive integer, got {num_stages!r}")
    if not 0 < float(step_factor) < math.inf:
        raise ValueError(f"step_factor must be positive and finite, got {step_factor!r}")
    return int(num_stages), float(step_factor)


def dr_mala_step(
    generator: torch.Generator,
    state: MCMCState,
    log_prob_and_grad: LogProbAndGrad,
    step_size,
    inv_mass: Metric = None,
    *,
    num_stages: int = DR_NUM_STAGES,
    step_factor: float = DR_STEP_FACTOR,
) -> tuple[MCMCState, DRMALAInfo]:
    r"""One delayed-rejection MALA step per chain (module docstring).

    Parameters
    ----------
    generator, state, log_prob_and_grad, step_size, inv_mass
        As :func:`~diffstat.mcmc.mala.mala_step`: ``step_size`` is the first stage's :math:`h`
        (scalar or ``(n,)``), ``inv_mass`` the metric :math:`M^{-1}`.
    num_stages : int
        :math:`K \ge 1` proposals at most per step (1 is MALA).
    step_factor : float
        :math:`c`: stage :math:`j` uses the step :math:`h / c^{j-1}`.

    Returns
    -------
    (MCMCState, DRMALAInfo)
    """
    num_stages, step_factor = _check_stages(num_stages, step_factor)
    x = state.x
    n, device = x.shape[0], x.device
    h = as_per_chain(step_size, x)
    new_x, new_lp = x.clone(), state.log_prob.clone()
    new_g = None if state.grad is None else state.grad.clone()
    stage_acc = torch.full((n, num_stages), math.nan, dtype=x.dtype, device=device)
    accepted_stage = torch.zeros(n, dtype=torch.long, device=device)
    rows = torch.arange(n, device=device)
    points = [(x, state.log_prob, state.grad)]
    num_evals = 0
    for j in range(1, num_stages + 1):
        hs = [h[rows] / step_factor ** (i - 1) for i in range(1, j + 1)]
        metric = _rows_metric(inv_mass, rows)
        x0, g0 = points[0][0], points[0][2]
        noise = torch.randn(x0.shape, generator=generator, dtype=x.dtype, device=device)
        y = x0 + hs[-1] * velocity(metric, g0) + torch.sqrt(2 * hs[-1]) * scale_noise(metric, noise)
        lp_y, g_y = _evaluate(log_prob_and_grad, y, rows, full=j == 1)
        num_evals += rows.numel()
        points.append((y, lp_y, g_y))
        dr = DelayedRejection(points, hs, metric)
        path = tuple(range(j + 1))
        log_alpha = dr.log_alpha(path)
        u = torch.rand(rows.shape, generator=generator, dtype=x.dtype, device=device)
        accept = u < torch.exp(log_alpha)
        stage_acc[rows, j - 1] = torch.exp(log_alpha)
        if j == 1:  # MALA's divergence: the first stage's ratio; cleared by a later acceptance
            diverging = torch.nan_to_num(dr.log_ratio(path), nan=-math.inf) < -DIVERGENCE_THRESHOLD
        won = rows[accept]
        new_x[won], new_lp[won], accepted_stage[won] = y[accept], lp_y[accept], j
        if new_g is not None:
            new_g[won] = g_y[accept]
        keep = ~accept
        if not bool(keep.any()):
            break
        rows = rows[keep]
        points = [tuple(t[keep] for t in p) for p in points]
    accepted = accepted_stage > 0
    info = DRMALAInfo(stage_acc[:, 0], accepted, diverging & ~accepted, num_evals, stage_acc, accepted_stage)
    return MCMCState(new_x, new_lp, new_g), info
