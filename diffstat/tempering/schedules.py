r"""Temperature schedules for AIS: fixed (geometric, sigmoid, linear) and by thermodynamic length.

Fixed schedules (:func:`schedule`): geometric, :math:`\beta_k = \beta_{\min}^{1 - k/K}`
(:math:`\beta_{\min} = 10^{-4}`, :math:`\beta_0 = 0`), dense at small :math:`\beta` where a
concentrated likelihood changes the density fastest; ``"sigmoid"``, the schedule of Grosse, Maddison and
Salakhutdinov (2013), :math:`\tilde\beta_k = \sigma(\kappa (2k/K - 1))` rescaled to run from 0 to 1
(:math:`\kappa = 4`), dense at both ends; ``"linear"``, equal steps.

By **thermodynamic length** (:func:`thermodynamic_schedule`, AIS's default). Under exact transitions the
AIS log weight is a sum of independent terms, :math:`\mathrm{Var}\log w \approx \sum_k (\beta_k -
\beta_{k-1})^2\,\mathrm{Var}_{\pi_{\beta_k}}(\delta)`, which for a fixed number of temperatures
:math:`K` is smallest when every step has the same length :math:`\int_{\beta_{k-1}}^{\beta_k}
\mathrm{sd}_{\pi_\beta}(\delta)\,d\beta = \Lambda / K`, :math:`\Lambda` the thermodynamic length of
the path (Gelman and Meng 1998; Grosse et al. 2013); the variance is then about :math:`\Lambda^2/K`.
A pilot (:func:`pilot_run`: adaptive tempered SMC resampled at every stage, each stage
:func:`~diffstat.tempering.core.tempered_step`) measures each stage's length from the ESS of its
reweighting (:func:`thermodynamic_length`), the particle covariance (pooled within clusters, so
each mode of a multimodal stage is moved at its own scale) and the adapted step size at its stages;
AIS then uses them, fixed in advance. The pilot's final particles also fit AIS's default reference
(:func:`pilot_reference`), a widened Gaussian from which the path to the posterior is short.
Measurements behind the defaults: ``docs/ais.md``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from diffstat._util import check_positive_int
from diffstat.mcmc.metric import DenseMetric
from diffstat.tempering.core import (
    MoveConfig,
    cloud_metric,
    init_tempered,
    initial_particles,
    tempered_step,
)
from diffstat.tempering.moves import particle_metric
from diffstat.tempering.path import GeometricPath, default_step_size
from diffstat.tempering.smc import DENSE_RATIO, next_beta

__all__ = [
    "REFERENCE_SCALE",
    "PilotRun",
    "pilot_reference",
    "pilot_run",
    "schedule",
    "thermodynamic_length",
    "thermodynamic_schedule",
]

#: Steepness of the sigmoid schedule (Grosse et al. 2013 use 4).
_SIGMOID_STEEPNESS = 4.0
#: Smallest positive temperature of the geometric schedule.
_GEOMETRIC_BETA_MIN = 1e-4
#: The reference fitted to a pilot's particles is widened by this factor in every direction: the
#: geometric path between two Gaussians whose covariances differ by a factor s^2 has length
#: sqrt(2d) log s (0.57 sqrt(d) for 1.5), while a reference narrower than the target in some
#: direction (a pilot of 256 particles underestimates a heavy tail) makes the weights heavy-tailed.
REFERENCE_SCALE = 1.5
#: Effective particles per dimension from which the pilot's covariances (its moves' metric, the
#: preconditioners it hands to AIS, the fitted reference) are not shrunk toward their diagonal: the
#: sample covariance's eigenvalues are then within (1 +- sqrt(1/10))^2 of the truth. Below it the
#: shrinkage is SMC's: capped from ``smc.DENSE_RATIO`` (4) per dimension at the least eigenvalue of
#: the correlation matrix (``particle_metric``'s ``keep_conditioning``), since an uncapped shrinkage
#: of d / n (0.1 for the default 250-particle pilot in 26 dimensions) widens the narrow directions of
#: a collinear posterior 10^4-fold (``docs/ais_pt_errors.md``).
_DENSE_RATIO = 10
#: The keyword arguments of ``particle_metric`` for the pilot's moves' metric and preconditioners
#: (the rule above).
_SHRINKAGE = dict(shrink_until=_DENSE_RATIO, dense_ratio=DENSE_RATIO, keep_conditioning=True)
#: The same for the fitted reference, capped only from (s / (s - 1))^2 = 9 particles per dimension
#: (s = REFERENCE_SCALE): from there the sample covariance's least eigenvalues, (1 - sqrt(d/n))^2 of
#: the truth's, times s^2 still cover the target, while below it the d / n shrinkage is what keeps
#: the widened fit from being narrower than the target along the directions that noise shrank.
_REFERENCE_SHRINKAGE = _SHRINKAGE | {"dense_ratio": (REFERENCE_SCALE / (REFERENCE_SCALE - 1)) ** 2}


class PilotRun(NamedTuple):
    r"""What the pilot measured at its ``S + 1`` stages (the first at :math:`\beta = 0`).

    betas: (S+1,) from 0 to 1. sd: (S+1,) :math:`\mathrm{sd}_{\pi_\beta}(\delta)` of its particles.
    length: (S+1,) cumulative thermodynamic length (trapezoid rule). chol: (S+1, d, d) lower
    Cholesky factors of the shrunk particle covariances. log_step_size: (S+1,) the step size adapted
    by the end of each stage (the first: the default). num_evals: target evaluations spent.
    particles: (n, d) the final, equally weighted particles at :math:`\beta = 1` (None when not kept).
    """

    betas: torch.Tensor
    sd: torch.Tensor
    length: torch.Tensor
    chol: torch.Tensor
    log_step_size: torch.Tensor
    num_evals: int
    particles: torch.Tensor | None = None


def schedule(
    num_temperatures: int, kind: str = "geometric", *, dtype=torch.float64, device=None
) -> torch.Tensor:
    """``num_temperatures`` inverse temperatures ``(K,)`` in (0, 1], increasing, the last 1 (the
    starting 0 is implicit), for the fixed kinds ``"geometric"``, ``"sigmoid"``, ``"linear"``."""
    k_total = check_positive_int(num_temperatures, "num_temperatures")
    k = torch.arange(k_total + 1, dtype=dtype, device=device) / k_total
    if kind == "sigmoid":
        s = torch.sigmoid(_SIGMOID_STEEPNESS * (2 * k - 1))
        b = (s - s[0]) / (s[-1] - s[0])
    elif kind == "geometric":
        b = _GEOMETRIC_BETA_MIN ** (1 - k)
        b[0] = 0.0
    elif kind == "linear":
        b = k
    else:
        raise ValueError(f"schedule must be 'adaptive', 'sigmoid', 'geometric' or 'linear', got {kind!r}")
    b[-1] = 1.0
    return b[1:]


def pilot_run(
    generator: torch.Generator,
    path: GeometricPath,
    num_particles: int,
    *,
    kernel: str = "mala",
    num_mcmc_steps: int = 3,
    num_leapfrog: int = 5,
    target_cess: float = 0.5,
    target_accept: float | None = None,
    device=None,
    max_stages: int = 1000,
) -> PilotRun:
    r"""Adaptive tempered SMC with ``num_particles`` particles, resampled (systematic) at every
    stage, the next temperature by bisection on the conditional ESS (``target_cess``), each stage
    moved by ``num_mcmc_steps`` dense-preconditioned moves (covariance pooled within clusters).
    Records :math:`\mathrm{sd}_{\pi_\beta}(\delta)` and the particle covariance after the moves."""
    n = check_positive_int(num_particles, "num_pilot")
    if n < 4:
        raise ValueError(f"num_pilot must be at least 4, got {n}")
    before = path.target.num_target_evals
    moves = MoveConfig(
        kernel, num_leapfrog, target_accept, None if num_mcmc_steps is None else int(num_mcmc_steps)
    )
    state = init_tempered(
        path, initial_particles(path, n, generator, device), default_step_size(kernel, path.dim)
    )
    records, seg_ess = [_pilot_record(state, generator)], []
    for k in range(max_stages):
        new_beta = next_beta(state.log_weights, state.particles.delta, state.beta, target_cess)
        state, info = tempered_step(
            generator,
            state,
            new_beta,
            path=path,
            moves=moves,
            precondition=_pilot_metric,
            stage=k,
            resample_threshold=1.0,
        )
        records.append(_pilot_record(state, generator))
        seg_ess.append(info.ess)
        if bool(state.beta >= 1.0):
            break
    else:
        raise RuntimeError(
            f"the AIS pilot did not reach beta = 1 in {max_stages} stages; pass betas= or schedule="
        )
    b, sd, chol, log_h = (torch.stack(r) for r in zip(*records))
    length = thermodynamic_length(torch.stack(seg_ess).to(b))
    evals = path.target.num_target_evals - before
    return PilotRun(b, sd, length, chol, log_h, evals, state.particles.x)


def pilot_reference(x: torch.Tensor, scale: float = REFERENCE_SCALE):
    r"""A Gaussian reference for AIS fitted to a pilot's equally weighted particles ``x: (n, d)``:
    :math:`\mathcal N(\bar x, s^2 \hat\Sigma)` with ``scale`` :math:`s` (:data:`REFERENCE_SCALE`),
    :math:`\hat\Sigma` the particles' covariance (over all of them, not pooled within clusters: the
    reference must cover every mode), shrunk toward its diagonal by :math:`\min(1, d/n)` only when
    :math:`n < 10 d`, and from :math:`9 d` by at most the least eigenvalue of its correlation
    matrix (:data:`_REFERENCE_SHRINKAGE`): shrinking by 1% where two coordinates correlate at
    0.9999 (posteriordb's kilpisjarvi, a regression on the year) makes the narrow direction 906
    times too wide in variance, and the path from there 3 to 4 long instead of 0.75. None when the
    particles are not finite or have no spread.

    The path from the prior of a diffuse model to its posterior is long (thermodynamic length 10
    to 26 on posteriordb's regressions, whose priors are far wider than their posteriors), the path from
    this reference short (that between two Gaussians, :math:`\sqrt{2d}\log s`, plus the target's
    departure from a Gaussian and the fit's error); the reference is normalised and fixed before
    the run, so AIS's :math:`\hat Z` stays unbiased (Neal 2001 allows any normalised initial
    distribution)."""
    if x.shape[0] < 2 or not bool(torch.isfinite(x).all()):
        return None
    metric = particle_metric(x, None, "dense", **_REFERENCE_SHRINKAGE)
    if not isinstance(metric, DenseMetric):  # no spread: particle_metric's unit diagonal
        return None
    return torch.distributions.MultivariateNormal(x.mean(0), scale_tril=scale * metric.chol)


def thermodynamic_length(ess_fraction: torch.Tensor) -> torch.Tensor:
    r"""Cumulative thermodynamic length ``(S+1,)`` at the pilot's stages from the ESS fraction
    ``(S,)`` of each stage's reweighting (the pilot resamples every stage, so each starts from equal
    weights): a stage's length is :math:`\sqrt{-\log \mathrm{ESS}/n}`, the standard deviation of
    log-normal incremental weights with that ESS, and equals
    :math:`\int \mathrm{sd}_{\pi_\beta}(\delta)\,d\beta` over the stage when the step is small.
    The ESS is read instead of the particles' spread of :math:`\delta` because at small
    :math:`\beta` a diffuse prior's far tail puts :math:`\delta` at :math:`-10^{10}` and beyond: the
    spread is then that of a few particles which carry no weight (it made the first stage of a
    3-parameter regression 798 of its 822 units of length), while the ESS sees the weights."""
    ess_fraction = ess_fraction.clamp(min=1e-300, max=1.0)
    seg = torch.sqrt(-torch.log(ess_fraction)).nan_to_num(0.0)
    return torch.cat([torch.zeros(1, dtype=seg.dtype, device=seg.device), torch.cumsum(seg, 0)])


def _pilot_record(state, generator) -> tuple[torch.Tensor, ...]:
    """``(beta, sd of delta, Cholesky factor of the clustered covariance, log step size)``."""
    d = state.particles.delta[torch.isfinite(state.particles.delta)]
    sd = d.std() if d.numel() > 1 else torch.zeros_like(state.beta)
    return state.beta, sd, _pilot_cholesky(state.particles, generator), state.log_step_size


#: The pilot's moves' preconditioner: the dense covariance of the weighted particles pooled within
#: their clusters, as SMC's, but shrunk toward its diagonal only below ``_DENSE_RATIO`` effective
#: particles per dimension (capped as SMC's, :data:`_SHRINKAGE`).
_pilot_metric = cloud_metric("dense", **_SHRINKAGE)


def _pilot_cholesky(particles, generator: torch.Generator) -> torch.Tensor:
    """Lower Cholesky factor ``(d, d)`` of :data:`_pilot_metric` for equally weighted particles
    (``particles.x: (n, d)``; a mixture's modes each moved at their own scale)."""
    x = particles.x
    metric = _pilot_metric(
        generator, None, particles, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    )[0]
    return metric.chol if isinstance(metric, DenseMetric) else torch.diag(metric.sqrt())


def thermodynamic_schedule(pilot: PilotRun, num_temperatures: int) -> torch.Tensor:
    r"""``num_temperatures`` inverse temperatures ``(K,)`` at equal thermodynamic length along the
    pilot's path: :math:`\Lambda(\beta_k) = k\Lambda/K`, :math:`\Lambda` interpolated linearly
    within each of the pilot's stages, along :math:`\log\beta` (along :math:`\beta` for the first
    stage, from 0); where it does not grow, the pilot's own betas are spread evenly."""
    k_total = check_positive_int(num_temperatures, "num_temperatures")
    b, length = pilot.betas, pilot.length
    if not float(length[-1]) > 0:  # delta constant along the path: any schedule is exact
        return torch.arange(1, k_total + 1, dtype=b.dtype, device=b.device) / k_total
    # a small share of each stage's beta-step keeps the map strictly increasing
    s = torch.arange(len(b), dtype=b.dtype, device=b.device) / (len(b) - 1)
    pos = length / length[-1] + 1e-6 * s
    pos = pos / pos[-1]
    q = torch.arange(1, k_total + 1, dtype=b.dtype, device=b.device) / k_total
    j = torch.searchsorted(pos, q).clamp(1, len(b) - 1)
    t = ((q - pos[j - 1]) / (pos[j] - pos[j - 1])).clamp(0.0, 1.0)
    lo, hi = b[j - 1], b[j]
    # within a stage that starts above 0, geometrically (sd(delta) ~ c / beta once the likelihood
    # dominates, so equal length is equal ratio); from beta = 0, linearly
    geometric = lo > 0
    ratio = hi / torch.where(geometric, lo, hi)  # 1 (unused) in the first stage
    betas = torch.where(geometric, lo * ratio**t, lo + t * (hi - lo))
    betas[-1] = 1.0
    betas = torch.cummax(betas, 0).values
    tiny = torch.finfo(b.dtype).eps
    # strictly increasing and positive (ties only when K far exceeds the resolution of float64)
    betas = torch.maximum(betas, torch.arange(1, k_total + 1, dtype=b.dtype, device=b.device) * tiny)
    return betas
