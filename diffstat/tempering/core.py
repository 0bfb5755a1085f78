r"""One stage of sequential Monte Carlo as a pure step, shared by every SMC of the package.

A population of weighted particles is a :class:`TemperedState`. :func:`smc_step` takes it to the
next target, a path object and an inverse temperature :math:`\beta'` on it (what
:func:`~diffstat.tempering.moves.decorrelating_moves` takes):

1. **Reweight**, through a hook ``reweight(generator, particles, log_w) -> (particles, increments)``:
   on the geometric path (:mod:`diffstat.tempering.path`, :func:`tempered_reweight`) the particles
   stay and gain :math:`(\beta' - \beta)\,\delta(x_i)`; on the noised path of PDDS
   (:func:`~diffstat.diffusion.noised_smc.guided_reweight`) they are proposed by the guided reverse
   SDE and weighted by the SMC-sampler ratio. The evidence increment is :math:`\log\sum_i W_i
   e^{\ell_i}` with :math:`W` the normalised weights before the update and :math:`\ell` the
   increments, so the increments sum to :math:`\log\hat Z` (Del Moral, Doucet and Jasra 2006;
   without resampling they telescope to AIS's :math:`\log\frac1n\sum_i w_i`, Neal 2001); the
   conditional ESS of the increments is recorded with it (Zhou, Johansen and Aston 2016).
2. **Precondition**: a metric for the moves, from the weighted cloud *before* resampling duplicates
   particles (:func:`cloud_metric`), or fixed in advance (:func:`fixed_metrics`, from a pilot).
3. **Resample** when the ESS fraction is under ``resample_threshold`` (0: never, as AIS; 1: at
   every stage, as the pilot); the weights are then reset to equal and the Eve indices follow.
4. **Move**: MCMC steps leaving the stage's target invariant
   (:func:`~diffstat.tempering.moves.decorrelating_moves`: a fixed count, or until the particles
   have decorrelated from where the stage started).

:func:`tempered_step` is the stage of the geometric path from :math:`\beta` to :math:`\beta'`. The
drivers (:func:`~diffstat.tempering.smc.adaptive_tempered_smc`, :func:`~diffstat.tempering.ais.ais`,
:func:`~diffstat.tempering.schedules.pilot_run`, :func:`~diffstat.tempering.to_target.temper_to_target`,
:func:`~diffstat.diffusion.noised_smc.noised_smc`, :func:`~diffstat.dnc.annealing.anneal_step`) only
choose the next target and record the stages.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from diffstat._util import check_probability
from diffstat.mcmc.metric import DenseMetric, Metric
from diffstat.tempering.moves import (
    _DENSE_RATIO,
    METRICS,
    cluster_particles,
    decorrelating_moves,
    particle_metric,
)
from diffstat.tempering.path import GeometricPath, PathState, get_kernel, incremental_log_weights
from diffstat.tempering.resampling import SCHEMES, ess, resample

__all__ = [
    "MoveConfig",
    "Reweight",
    "StageInfo",
    "TemperedState",
    "check_betas",
    "check_initial",
    "cloud_metric",
    "fixed_metrics",
    "init_tempered",
    "initial_particles",
    "smc_step",
    "stack_stage_infos",
    "tempered_reweight",
    "tempered_step",
]


@dataclass(frozen=True)
class MoveConfig:
    r"""How particles move at each stage, validated on construction.

    ``kernel`` ``"mala"`` | ``"hmc"`` (``num_leapfrog`` steps) | ``"rwm"``, or a kernel function with
    :func:`~diffstat.mcmc.mala.mala_step`'s signature (PDDS's ``local_mala_step``; its
    ``target_accept`` is then required); ``target_accept`` (None: the named kernel's own, 0.574 /
    0.8 / 0.234); ``num_mcmc_steps`` (None: until decorrelated, at most
    ``max_mcmc_steps``, tolerance ``decorrelation_tol``); ``adapt_rate`` of the Robbins-Monro step
    size rule (0: step sizes fixed in advance); ``step_jitter`` :math:`a \ge 0`: each particle's step
    size at each move is the adapted one times :math:`e^{a u}`, :math:`u \sim U(-1, 1)` (0, the
    default: off; why, :mod:`diffstat.tempering.moves`).
    """

    kernel: str | Callable = "mala"
    num_leapfrog: int = 5
    target_accept: float | None = None
    num_mcmc_steps: int | None = None
    max_mcmc_steps: int = 100
    decorrelation_tol: float = 0.1
    adapt_rate: float = 1.0
    step_jitter: float = 0.0

    def __post_init__(self):
        # get_kernel refuses an unknown name
        default_accept = None if callable(self.kernel) else get_kernel(self.kernel, self.num_leapfrog)[1]
        if default_accept is None and self.target_accept is None:
            raise ValueError("a kernel given as a function needs its target_accept")
        accept = (
            default_accept
            if self.target_accept is None
            else check_probability(self.target_accept, "target_accept")
        )
        object.__setattr__(self, "target_accept", accept)
        if self.num_mcmc_steps is not None and int(self.num_mcmc_steps) < 0:
            raise ValueError(f"num_mcmc_steps must be non-negative, got {self.num_mcmc_steps}")
        if int(self.max_mcmc_steps) < 1 or not self.decorrelation_tol > 0:
            raise ValueError(
                f"need max_mcmc_steps >= 1 and decorrelation_tol > 0, got {self.max_mcmc_steps}, "
                f"{self.decorrelation_tol}"
            )
        if not 0 <= float(self.step_jitter) < math.inf:
            raise ValueError(f"step_jitter must be finite and non-negative, got {self.step_jitter}")

    @property
    def step(self) -> Callable:
        return self.kernel if callable(self.kernel) else get_kernel(self.kernel, self.num_leapfrog)[0]


class TemperedState(NamedTuple):
    """Particles at inverse temperature ``beta`` (0-d) of their stage's path (1 on the noised path,
    whose every level is a path of its own) with log weights ``(n,)``, the shared 0-d
    ``log_step_size`` of the moves, each particle's Eve (initial ancestor) index ``(n,)``, and the
    number of resampling events so far."""

    particles: PathState
    log_weights: torch.Tensor
    beta: torch.Tensor
    log_step_size: torch.Tensor
    eve: torch.Tensor
    num_resampling: int


class StageInfo(NamedTuple):
    """One stage: ``beta``, ``ess`` (fraction, after reweighting), ``log_z_increment``,
    ``step_size`` (of the moves), ``num_mcmc_steps``, ``decorrelation`` (the final mean whitened
    squared distance from the stage's start, per dimension), ``num_clusters`` (of the metric),
    ``acceptance_rate`` (mean), ``resampled``; ``acceptance`` ``(n,)`` each particle's mean over
    the stage's moves; ``cess`` the conditional ESS fraction of the stage's increments (module
    docstring; recorded by PDDS, left out of :func:`stack_stage_infos`)."""

    beta: torch.Tensor
    ess: torch.Tensor
    log_z_increment: torch.Tensor
    step_size: torch.Tensor
    num_mcmc_steps: int
    decorrelation: float
    num_clusters: int
    acceptance_rate: torch.Tensor
    resampled: bool
    acceptance: torch.Tensor
    cess: torch.Tensor


#: ``reweight(generator, particles, log_weights) -> (particles, increments (n,))``: the first half of
#: a stage, bringing the particles to the stage's target (or leaving them where they are) and giving
#: the log ratio of the new target to the old at them (module docstring).
Reweight = Callable[[torch.Generator, PathState, torch.Tensor], tuple[PathState, torch.Tensor]]

#: ``precondition(generator, stage, particles, log_weights) -> (metric, log_step_size or None,
#: num_clusters)``: the metric of the stage's moves, and a step size that replaces the adapted one.
Preconditioner = Callable[
    [torch.Generator, int, PathState, torch.Tensor], tuple[Metric, torch.Tensor | None, int]
]


def cloud_metric(
    metric: str = "auto",
    within_modes: bool = True,
    shrink_until: float | None = None,
    dense_ratio: float = _DENSE_RATIO,
    keep_conditioning: bool = False,
) -> Preconditioner:
    """The weighted particles' covariance (:func:`~diffstat.tempering.moves.particle_metric`, with its
    ``shrink_until``, ``dense_ratio`` and ``keep_conditioning``), pooled within the clusters of
    :func:`~diffstat.tempering.moves.cluster_particles` when ``within_modes``."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")

    def precondition(generator, stage, particles, log_weights):
        labels = cluster_particles(particles.x, log_weights, generator) if within_modes else None
        clusters = 1 if labels is None else int(labels.max()) + 1
        dense = particle_metric(
            particles.x,
            log_weights,
            metric,
            labels,
            shrink_until=shrink_until,
            dense_ratio=dense_ratio,
            keep_conditioning=keep_conditioning,
        )
        return dense, None, clusters

    return precondition


def identity_metric(generator, stage, particles, log_weights):
    """No preconditioning (unit metric), the step size adapted as usual."""
    return None, None, 1


def fixed_metrics(chol: torch.Tensor, log_step_size: torch.Tensor, which: torch.Tensor) -> Preconditioner:
    """Metrics and step sizes fixed in advance: stage ``k`` uses the dense metric with lower
    Cholesky factor ``chol[which[k]]`` (``chol: (S, d, d)``) and the step size
    ``exp(log_step_size[which[k]])``, so no quantity shared by the particles depends on them."""

    def precondition(generator, stage, particles, log_weights):
        factor = chol[which[stage]]
        return DenseMetric(factor @ factor.T, factor), log_step_size[which[stage]], 1

    return precondition


def init_tempered(path: GeometricPath, x0: torch.Tensor, step_size: float) -> TemperedState:
    """Equal-weight particles at :math:`\\beta = 0` from reference draws ``x0: (n, dim)``."""
    if not step_size > 0:
        raise ValueError(f"step_size must be positive, got {step_size}")
    n, dtype, device = x0.shape[0], x0.dtype, x0.device
    particles = path.evaluate(x0)
    check_initial(particles)
    zero = torch.zeros((), dtype=dtype, device=device)
    log_h = torch.log(torch.tensor(float(step_size), dtype=dtype, device=device))
    return TemperedState(
        particles, torch.zeros(n, dtype=dtype, device=device), zero, log_h, torch.arange(n, device=device), 0
    )


def tempered_reweight(beta_from, beta_to) -> Reweight:
    r"""The geometric path's reweighting: the particles stay and gain
    :math:`(\beta' - \beta)\,\delta(x)` (:func:`~diffstat.tempering.path.incremental_log_weights`)."""

    def reweight(generator, particles, log_weights):
        return particles, incremental_log_weights(particles, beta_from, beta_to)

    return reweight


def smc_step(
    generator: torch.Generator,
    state: TemperedState,
    reweight: Reweight,
    *,
    path: GeometricPath,
    beta: torch.Tensor,
    moves: MoveConfig,
    precondition: Preconditioner = identity_metric,
    stage: int = 0,
    resample_threshold: float = 0.5,
    scheme: str = "systematic",
) -> tuple[TemperedState, StageInfo]:
    """One stage of SMC (module docstring): reweight, evidence increment and ESS, metric,
    resampling on the ESS, moves.

    Parameters
    ----------
    state : TemperedState
        Particles ``(n, dim)`` with log weights ``(n,)``, at the last stage's target.
    reweight : Reweight
        Brings the particles to this stage's target; returns them and the increments ``(n,)``.
    path, beta
        The stage's target for the moves: ``path.evaluate(x) -> PathState`` at ``beta`` (0-d).
    moves, precondition, stage
        The moves' kernel and counts; their metric, given the stage's index ``stage``.
    resample_threshold, scheme
        Resample when the ESS fraction is under the threshold (always at 1), by ``scheme``.

    Returns
    -------
    (TemperedState, StageInfo)
    """
    ps, incr = reweight(generator, state.particles, state.log_weights)
    log_w0 = torch.log_softmax(state.log_weights, -1)
    log_z_increment = torch.logsumexp(log_w0 + incr, -1)
    cess = torch.exp(2 * log_z_increment - torch.logsumexp(log_w0 + 2 * incr, -1))
    log_w = state.log_weights + incr
    ess_frac = ess(log_w) / log_w.shape[0]
    inv_mass, log_h, clusters = precondition(generator, stage, ps, log_w)
    log_h = state.log_step_size if log_h is None else log_h.to(state.log_step_size)
    eve, num_resampling = state.eve, state.num_resampling
    resampled = resample_threshold >= 1.0 or bool(ess_frac < resample_threshold)
    if resampled:
        idx = resample(generator, log_w, scheme)
        ps, eve, log_w, num_resampling = ps.index(idx), eve[idx], torch.zeros_like(log_w), num_resampling + 1
    moved = decorrelating_moves(
        moves.step,
        generator,
        ps,
        path,
        beta,
        log_h,
        inv_mass=inv_mass,
        target_accept=moves.target_accept,
        num_steps=moves.num_mcmc_steps,
        max_steps=int(moves.max_mcmc_steps),
        decorrelation_tol=moves.decorrelation_tol,
        adapt_rate=moves.adapt_rate,
        step_jitter=float(moves.step_jitter),
    )
    info = StageInfo(
        beta,
        ess_frac,
        log_z_increment,
        torch.exp(log_h),
        moved.num_steps,
        moved.distance,
        clusters,
        moved.acceptance.mean(),
        resampled,
        moved.acceptance,
        cess,
    )
    new = TemperedState(moved.particles, log_w, beta, moved.log_step_size, eve, num_resampling)
    return new, info


def tempered_step(
    generator: torch.Generator,
    state: TemperedState,
    new_beta: torch.Tensor,
    *,
    path: GeometricPath,
    moves: MoveConfig,
    precondition: Preconditioner = identity_metric,
    stage: int = 0,
    resample_threshold: float = 0.5,
    scheme: str = "systematic",
) -> tuple[TemperedState, StageInfo]:
    """One stage of the geometric path from ``state.beta`` to ``new_beta``: :func:`smc_step` with
    :func:`tempered_reweight`; ``stage`` is its index, passed to ``precondition``."""
    return smc_step(
        generator,
        state,
        tempered_reweight(state.beta, new_beta),
        path=path,
        beta=new_beta,
        moves=moves,
        precondition=precondition,
        stage=stage,
        resample_threshold=resample_threshold,
        scheme=scheme,
    )


def stack_stage_infos(infos: list[StageInfo]) -> dict[str, torch.Tensor]:
    """Per-stage tensors ``(stages,)`` of every :class:`StageInfo` field but ``acceptance`` and
    ``cess``."""
    fields = [f for f in StageInfo._fields if f not in ("acceptance", "cess")]
    if not infos:
        return {f: torch.empty(0) for f in fields}
    device = infos[0].ess.device
    return {f: torch.stack([torch.as_tensor(getattr(i, f), device=device) for i in infos]) for f in fields}


def check_resampling(scheme: str, resample_threshold: float) -> float:
    """Refuse an unknown resampling scheme or a threshold outside [0, 1]; the threshold as a float."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown resampling scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    threshold = float(resample_threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"resample_threshold must lie in [0, 1], got {resample_threshold}")
    return threshold


def check_betas(betas, like: torch.Tensor) -> torch.Tensor:
    """A fixed schedule as a tensor ``(K,)``: strictly increasing, positive, ending at 1."""
    b = torch.as_tensor(betas, dtype=like.dtype, device=like.device).flatten()
    if b.numel() == 0 or not bool((b > 0).all()) or not bool((b[1:] > b[:-1]).all()) or float(b[-1]) != 1.0:
        raise ValueError("betas must be strictly increasing, positive, and end at 1")
    return b


def check_initial(ps: PathState) -> None:
    """Refuse reference draws where the target is NaN or +inf, or -inf at every one of them."""
    lp = ps.target_log_prob
    if torch.isnan(lp).any() or torch.isposinf(lp).any():
        bad = int((torch.isnan(lp) | torch.isposinf(lp)).sum())
        raise ValueError(f"the target's log-density is NaN or +inf at {bad} of {lp.numel()} reference draws")
    if torch.isneginf(lp).all():
        raise ValueError(
            "the target's log-density is -inf at every reference draw: the reference misses its support"
        )


def initial_particles(path: GeometricPath, n: int, generator: torch.Generator, device) -> torch.Tensor:
    """``n`` reference draws, with the target checked (``target.validate``) on up to 16 of them."""
    x0 = path.sample_reference(n, generator, device)
    path.target.validate(x0[:16])
    return x0
