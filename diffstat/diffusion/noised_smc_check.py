r"""Error bars and reliability checks of the particle denoising diffusion sampler (``method="pdds"``).

Standard error
--------------
Each run's :math:`\log\hat Z_r` carries the genealogy standard error :math:`s_r`
(:func:`~diffstat.tempering.smc.genealogy_variance`, Chan and Lai 2013). With :math:`R \ge 2`
independent runs (``num_chains``) the pooled :math:`\hat Z = \frac1R\sum_r\hat Z_r` also gets the
standard error of the runs' spread, by the delta method
:math:`\mathrm{se} = \mathrm{sd}(\hat Z_r / \hat Z) / \sqrt R`; the reported error bar is the larger
of the two (the genealogy alone misses what no particle saw, the spread of a few runs is itself
noisy).

Checks (each gives one ``RuntimeWarning`` naming the reason)
------------------------------------------------------------
* fewer than :data:`MIN_EVES` distinct initial particles survive in a run (the genealogy estimate
  of the variance then has too few terms), or a log Z that is not finite;
* the runs disagree with their own error bars: Cochran's :math:`Q = \sum_r (\log\hat Z_r -
  \bar\ell)^2 / s_r^2` beyond the :math:`1 - ` :data:`CHI2_ALPHA` quantile of
  :math:`\chi^2_{R-1}` (:func:`~diffstat.tempering.runs.runs_agreement`; runs that each report a
  small error but land far apart have missed different parts of the target);
* at the last :data:`LAST_LEVELS` levels the moves' mean acceptance is under :data:`MIN_ACCEPTANCE`
  (the step size collapsed), or over :data:`MAX_STUCK` of the particles accept fewer than
  :data:`STUCK_ACCEPTANCE` of their moves at a level (on average over those levels): one step size
  shared by the particles cannot move them, as in a funnel's neck, and their placement rests on
  the weights alone, which cannot bring particles into a region none reached. (The moves reaching
  their cap before decorrelating is no such sign: on a narrow-heavy/wide-light mixture, whose log Z
  is right, they reach it at every level, the shared step being small for the wide mode.) A
  particle that a level's independence move (``population="nuts"``) reaches with acceptance
  probability :data:`STUCK_ACCEPTANCE` or more has moved there, whatever its local moves did;
* with ``stein=True`` (the sampler sets it for ``population="nuts"``), the final weighted particles
  fail Stein's identity :math:`\mathbb E[(z_j - \bar z_j)\,\partial_j\log\pi(z)] = -1` in a
  whitened coordinate (:func:`particle_stein`, :mod:`diffstat.diffusion.stein`'s statistic and
  thresholds; the gradients are those the last level holds, no evaluation): particles placed by a
  mixture that misses much of the mass have the spread of the mixture, not of the target. It has
  power for gross failures only (many-well(32) with a population, log Z 7 to 10 too low; not the
  funnel's 10% short sd of x_1, docs/noised_smc.md).
"""

from __future__ import annotations

import numpy as np
import torch

from diffstat.diffusion.stein import cut_off, stein_reason, stein_statistic
from diffstat.tempering.runs import CHI2_ALPHA, pooled_log_z, runs_agreement
from diffstat.tempering.smc import MIN_EVES

__all__ = [
    "CHI2_ALPHA",
    "LAST_LEVELS",
    "MAX_STUCK",
    "MIN_ACCEPTANCE",
    "MIN_EVES",
    "MIN_STEIN_ESS",
    "STUCK_ACCEPTANCE",
    "particle_stein",
    "pooled_log_z",
    "reliability_problems",
]

#: The levels nearest zero noise whose moves are checked (an eighth of the default 64).
LAST_LEVELS = 8
#: Mean acceptance below which the last levels' moves are said not to move (a tuned MALA or HMC
#: runs at 0.57 to 0.65; a tenth of that means the step size collapsed).
MIN_ACCEPTANCE = 0.05
#: A particle whose moves at a level accept less than this on average has not moved there.
STUCK_ACCEPTANCE = 0.05
#: Largest share of stuck particles at the last levels that passes (module docstring): a tenth, the
#: share of the weight that a region may hold unexplored before log Z is off by about 0.1.
MAX_STUCK = 0.1
#: Least Kish ESS of the final weights for Stein's check: from fewer effective points its standard
#: error is itself too uncertain for a bound of 5 of them (and the ESS and Eves checks speak there).
#: The runs of docs/noised_smc.md have 547 to 894 at 900 particles.
MIN_STEIN_ESS = 100


def particle_stein(particles, log_weights: torch.Tensor) -> dict | None:
    r""":func:`~diffstat.diffusion.stein.stein_statistic` on a run's final particles
    (:class:`~diffstat.diffusion.noised_smc_path.GuidedState` at zero noise, whitened) with their
    weights: the score :math:`\nabla\log g(z) - z`, copies from resampling pooled into one point
    with their summed weight, particles of zero weight or a non-finite gradient left out. None where
    the target is cut off at a boundary (:func:`~diffstat.diffusion.stein.cut_off`) or the weights'
    Kish ESS is under :data:`MIN_STEIN_ESS`."""
    w = torch.softmax(log_weights.double(), 0)
    if cut_off(particles.x, particles.target_lp) or not float(1 / (w**2).sum()) >= MIN_STEIN_ESS:
        return None
    ok = (w > 0) & torch.isfinite(particles.grad_g).all(-1)
    x, score, w = particles.x[ok], (particles.grad_g - particles.x)[ok], w[ok]
    uniq, inv = torch.unique(x, dim=0, return_inverse=True)
    pooled = torch.zeros(uniq.shape[0], dtype=w.dtype, device=w.device).index_add_(0, inv, w)
    first = torch.zeros(uniq.shape[0], dtype=torch.long, device=x.device)
    first = first.scatter_(0, inv, torch.arange(inv.shape[0], device=x.device))
    return stein_statistic(uniq, score[first], pooled)


def reliability_problems(runs, log_z: float, stein: bool = False) -> list[str]:
    """The reasons (module docstring) why the runs' estimate is unreliable; empty when none.
    ``runs`` are :class:`~diffstat.diffusion.noised_smc.NoisedSMCOutput`; ``stein``: also check
    Stein's identity on their final particles."""
    problems = []
    num_eves = min(r.num_eves for r in runs)
    if num_eves < MIN_EVES or not np.isfinite(log_z):
        problems.append(f"only {num_eves} distinct initial particles survive")
    lz = np.array([r.log_normalizer for r in runs])
    se = np.array([r.log_normalizer_se for r in runs])
    if runs_agreement(list(lz), list(se)) < CHI2_ALPHA:
        problems.append(
            f"the runs' log Z spread (sd {lz.std(ddof=1):.3f}) disagrees with their genealogy "
            f"standard errors (about {float(np.median(se)):.3f})"
        )
    acc = np.array([float(r.stages["acceptance_rate"][-LAST_LEVELS:].mean()) for r in runs])
    if np.any(acc < MIN_ACCEPTANCE):
        problems.append(f"the moves at the last levels accept {acc.min():.3f} of proposals")
    stuck = np.array([float(r.stages["stuck"][-LAST_LEVELS:].mean()) for r in runs])
    if np.any(stuck > MAX_STUCK):
        problems.append(
            f"{stuck.max():.0%} of the particles did not move at the last {LAST_LEVELS} levels "
            f"(acceptance under {STUCK_ACCEPTANCE}): a region the shared step size cannot enter"
        )
    checks = [particle_stein(r.particles, r.log_weights) for r in runs] if stein else []
    reasons = [
        stein_reason(c, [f"z[{j}] (whitened)" for j in range(c["stat"].shape[0])]) for c in checks if c
    ]
    problems += [r for r in reasons if r][:1]
    return problems
