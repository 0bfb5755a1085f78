r"""Annealed importance sampling (Neal 2001): ``ds.sample(target, "ais", ...)``.

Independent particles :math:`x_0 \sim \rho` follow a fixed schedule
:math:`0 = \beta_0 < \beta_1 < \dots < \beta_K = 1` along the geometric path
(:mod:`diffstat.tempering.path`). At temperature :math:`k` each particle's log weight gains
:math:`(\beta_k - \beta_{k-1})\,\delta(x_{k-1})` and the particle then makes ``num_mcmc_steps``
MCMC moves leaving :math:`\pi_{\beta_k}` invariant (each temperature one
:func:`~diffstat.tempering.core.tempered_step` without resampling):

.. math::
    \log w = \sum_{k=1}^K (\beta_k - \beta_{k-1})\, \delta(x_{k-1}),
    \qquad \mathbb E[w] = Z,

so :math:`\hat Z = \frac1n\sum_i w_i`, with the importance-sampling (delta-method) standard error of
:func:`diffstat._util.log_normalizer_estimate` (the particles are independent). Without moves the
weights telescope to :math:`\delta(x_0) = \log\tilde\pi(x_0) - \log\rho(x_0)`: plain importance
sampling from the reference.

Reference and schedule (:mod:`diffstat.tempering.schedules`): by default (``fit_reference``, with
the ``"adaptive"`` schedule and no ``reference=``) AIS starts not from the prior but from a Gaussian
fitted to the particles of a pilot, :math:`\mathcal N(\bar x, 1.5^2\hat\Sigma)`, refitted to the
particles of a pilot along the path from each fit until the fit settles (``_fit_reference``). The
variance of :math:`\log w` grows with the squared thermodynamic length :math:`\Lambda^2` of the path:
from a diffuse prior :math:`\Lambda` is 10 to 26 on posteriordb's regressions, where the moves cannot
keep the particles on the path; from the fitted Gaussian it is 0.7 to 3.7 (docs/ais.md). The
temperatures are at equal thermodynamic length measured by the pilot along the path AIS follows,
whose covariances precondition the moves (dense, pooled within clusters, so each mode is moved at
its own scale) and whose adapted step sizes are used, all fixed before the run: no quantity shared
by the particles is adapted during it, so they stay independent and :math:`\hat Z` unbiased (the
pilots are independent of the run and the reference is normalised), its standard error that of
independent weights. The pilots' evaluations are counted (``pilot_evals``). With a fixed schedule
(``"geometric"``, ``"sigmoid"``, ``"linear"`` or ``betas=``), AIS starts from the prior, one step
size is carried from temperature to temperature and adapted after every move from the mean
acceptance, with the metric of :func:`~diffstat.tempering.moves.particle_metric` from the weighted
particles (``metric="auto"``).

Collapse is reported, never silent: the final ESS, its fraction and the Pareto :math:`\hat k` of the
log weights (Vehtari et al. 2024) are in attrs, the per-temperature ESS in the ``tempering`` group,
and a ``RuntimeWarning`` is issued when ESS < ``min_ess`` (100: the draws, a resample of the
weighted particles, then carry Monte Carlo errors above 0.1 sd in a mean) or :math:`\hat k > 0.7`:
then the delta-method standard error is itself unreliable, and ``log_normalizer_reliable`` is False.
Measurements behind the defaults (schedules compared, standard-error calibration): ``docs/ais.md``.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch

from diffstat._util import check_options, log_normalizer_estimate, pareto_k, progress_bar
from diffstat.sampling import SamplerResult, register_sampler
from diffstat.tempering.core import (
    MoveConfig,
    check_betas,
    cloud_metric,
    fixed_metrics,
    identity_metric,
    init_tempered,
    initial_particles,
    stack_stage_infos,
    tempered_step,
)
from diffstat.tempering.path import GeometricPath, PathState, default_step_size, make_path
from diffstat.tempering.resampling import ess, resample
from diffstat.tempering.smc import stack_stages
from diffstat.tempering.schedules import (
    PilotRun,
    pilot_reference,
    pilot_run,
    schedule,
    thermodynamic_schedule,
)

__all__ = [
    "AISOutput",
    "PilotRun",
    "ais",
    "ais_sampler",
    "pareto_k",
    "pilot_run",
    "schedule",
    "thermodynamic_schedule",
]

#: The adaptive schedule's number of temperatures is this times the squared thermodynamic length
#: (clipped to [MIN_TEMPERATURES, MAX_TEMPERATURES]): with exact moves the log-weight variance is
#: about Lambda^2 / K, and one MALA move per temperature leaves the particles lagging the path by an
#: autocorrelation time of a few moves, which multiplies it by about 1 + 2 tau (5 to 10 on the
#: posteriordb suite); K = 8 Lambda^2 keeps the variance near 1 (docs/ais.md).
LENGTH_FACTOR = 8.0
MIN_TEMPERATURES = 200
MAX_TEMPERATURES = 2000
#: The pilot's reference is refitted (each time to the particles of a pilot along the path from the
#: last fit) until a refit moves no mean by more than SETTLED_SHIFT of its (widened) sd and shortens
#: the path by less than 1 - REFIT_GAIN, at most MAX_REFITS times with 3 moves per stage, then as
#: many with decorrelating moves (``_fit_reference``). Half an sd of the widened fit is within the
#: noise of a 256-particle fit's mean by far in few dimensions (0.1 sd), and the path shortens by a
#: few percent between fits that agree.
MAX_REFITS = 3
REFIT_GAIN = 0.8
SETTLED_SHIFT = 0.5
#: Below this final ESS (or above Pareto k 0.7) the result is flagged as collapsed: with ESS 100 the
#: draws' Monte Carlo error is 0.1 posterior sd in a mean and about 7% in an sd (a Gaussian
#: marginal), what an answer right to 0.15 sd and 15% needs (30 let posteriordb's arma11 through with
#: an sd 20% off: 37 effective draws).
MIN_ESS = 100.0
_MAX_PARETO_K = 0.7


class AISOutput(NamedTuple):
    """Result of AIS: the final particles (a :class:`PathState`), their log weights ``(n,)``,
    per-temperature tensors ``stages`` (those of :class:`~diffstat.tempering.core.StageInfo`) and each
    particle's acceptance at the last temperature."""

    particles: PathState
    log_weights: torch.Tensor
    stages: dict[str, torch.Tensor]
    acceptance: torch.Tensor


def ais(
    generator: torch.Generator,
    path: GeometricPath,
    x0: torch.Tensor,
    betas: torch.Tensor,
    *,
    kernel: str = "mala",
    num_mcmc_steps: int = 1,
    num_leapfrog: int = 5,
    step_size: float | None = None,
    target_accept: float | None = None,
    adapt_scale: bool = True,
    metric: str = "auto",
    preconditioners: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    progress: bool = False,
) -> AISOutput:
    """Run AIS from the reference draws ``x0: (n, dim)`` through ``betas: (K,)`` (ending at 1).

    ``num_mcmc_steps=0`` replaces the moves by the identity (plain importance sampling, whose
    weights are ``log target(x0) - log reference(x0)``). ``preconditioners=(pilot_betas (S,),
    chol (S, d, d), log_step_size (S,))``: the dense preconditioners and step sizes of a pilot; the
    move at ``beta`` uses those of the first pilot stage at or above it, fixed in advance (no
    adaptation in the run, so the particles stay independent and the standard error is that of
    independent weights; ``step_size`` and ``adapt_scale`` are then ignored).
    """
    betas = check_betas(betas, x0)
    fixed = preconditioners is not None
    moves = MoveConfig(
        kernel, num_leapfrog, target_accept, int(num_mcmc_steps), adapt_rate=0.0 if fixed else 1.0
    )
    cloud = cloud_metric(metric, within_modes=False)
    precondition = cloud if adapt_scale and num_mcmc_steps else identity_metric
    if fixed:
        pilot_betas, pilot_chol, pilot_log_h = preconditioners
        which = torch.searchsorted(pilot_betas.to(betas), betas).clamp(max=len(pilot_betas) - 1)
        precondition = fixed_metrics(pilot_chol, pilot_log_h, which)
    state = init_tempered(path, x0, default_step_size(kernel, path.dim) if step_size is None else step_size)
    infos = []
    with progress_bar(len(betas), "ais", progress) as bar:
        for k, new_beta in enumerate(betas):
            state, info = tempered_step(
                generator,
                state,
                new_beta,
                path=path,
                moves=moves,
                precondition=precondition,
                stage=k,
                resample_threshold=0.0,
            )
            infos.append(info)
            bar.update()
    return AISOutput(state.particles, state.log_weights, stack_stage_infos(infos), infos[-1].acceptance)


_OPTIONS = {
    "reference",
    "fit_reference",
    "betas",
    "num_temperatures",
    "schedule",
    "kernel",
    "num_mcmc_steps",
    "num_leapfrog",
    "step_size",
    "target_accept",
    "adapt_scale",
    "metric",
    "resampling",
    "num_pilot",
    "min_ess",
}


@register_sampler("ais")
def ais_sampler(target, *, num_samples, num_chains, generator, progress, device, **options) -> SamplerResult:
    r"""``ds.sample(target, "ais", num_samples=n, ...)``: AIS with ``n`` particles per chain.

    Options: ``reference``, a distribution on R^dim to start from (default: the target's own
    reference, or the prior of a model with ``log_prior`` and ``log_likelihood``, whose likelihood
    is then tempered); ``fit_reference`` (True): with the adaptive schedule and no ``reference``,
    start instead from a Gaussian fitted by a pilot along the prior's path
    (:func:`~diffstat.tempering.schedules.pilot_reference`); ``betas`` or ``num_temperatures`` with
    ``schedule`` (``"adaptive"``: a pilot of ``num_pilot`` particles, default
    ``min(256, max(64, n // 4))``, along the path AIS follows measures its thermodynamic length
    :math:`\Lambda`, and by default
    ``LENGTH_FACTOR`` :math:`\Lambda^2` temperatures within [``MIN_TEMPERATURES``,
    ``MAX_TEMPERATURES``] = [200, 2000]; or the fixed ``"geometric"``, ``"sigmoid"``, ``"linear"`` with
    200 by default); ``kernel`` (``"mala"``), ``num_mcmc_steps`` (1), ``num_leapfrog`` (5),
    ``step_size``, ``target_accept``, ``adapt_scale`` (True), ``metric`` (``"auto"``, fixed
    schedules); ``resampling`` (``"systematic"``), the scheme of the final resampling; ``min_ess``
    (``MIN_ESS`` = 100), below which the result is flagged as collapsed (a ``RuntimeWarning``).
    ``num_chains`` (default 1) independent runs, each with its own pilots, one after another (so
    R-hat across chains also sees a pilot that missed part of the posterior); ``log_normalizer``
    pools the particles of all runs (each run's weights are unbiased for :math:`Z`).

    The draws are resampled to equal weights, per run; ``log_weight`` in ``sample_stats`` is each
    draw's AIS log weight (that of the particle it was resampled from), and attrs'
    ``num_distinct`` counts the distinct particles among the draws.
    """
    check_options(options, _OPTIONS, "ais")
    num_chains = 1 if num_chains is None else num_chains
    reference = options.pop("reference", None)
    fit = bool(options.pop("fit_reference", True)) and reference is None
    path = make_path(target, reference)
    scheme = options.pop("resampling", "systematic")
    min_ess = float(options.pop("min_ess", MIN_ESS))
    runs, pilots, used = [], [], None
    for _ in range(num_chains):
        run_options = dict(options)
        plans, used, pilot_attrs = _schedule(
            generator, path, run_options, num_samples, device, target.dtype, fit
        )
        for i, plan in enumerate(plans):
            try:
                x0 = initial_particles(plan.path, num_samples, generator, device)
                run_options |= plan.options
                out = ais(generator, plan.path, x0, plan.betas, progress=progress, **run_options)
                break
            except ValueError as err:  # the target NaN or +inf at a draw of the fitted reference
                if i == len(plans) - 1:
                    raise
                pilot_attrs["reference_fallback"] = str(err)
        pilot_attrs |= plan.attrs
        runs.append((out, resample(generator, out.log_weights, scheme), plan.path))
        pilots.append(pilot_attrs)
    log_w = torch.cat([out.log_weights for out, _, _ in runs])
    log_z, se = log_normalizer_estimate(log_w)
    sample_stats = {
        "lp": torch.stack([out.particles.target_log_prob[idx] for out, idx, _ in runs]),
        "acceptance_rate": torch.stack([out.acceptance[idx] for out, idx, _ in runs]),
        "log_weight": torch.stack([out.log_weights[idx] for out, idx, _ in runs]),
    }
    draws = torch.stack([out.particles.x[idx] for out, idx, _ in runs])
    final_ess = float(ess(log_w))
    khat = pareto_k(log_w)
    reliable = final_ess >= min_ess and not khat > _MAX_PARETO_K
    ref_kind = "given" if reference is not None else "pilot" if runs[0][2] is not path else "prior"
    distinct = sum(int(torch.unique(idx).numel()) for _, idx, _ in runs)
    attrs = {
        "log_normalizer": log_z,
        "log_normalizer_se": se,
        "log_normalizer_reliable": bool(reliable),
        "num_stages": max(len(out.stages["beta"]) for out, _, _ in runs),
        "ess": final_ess,
        "ess_fraction": final_ess / log_w.numel(),
        "num_distinct": distinct,
        "pareto_k": khat,
        "log_weight_variance": float(log_w[torch.isfinite(log_w)].var()),
        "schedule": used,
        "path": runs[0][2].kind,
        "reference": ref_kind,
        **_pooled_pilot_attrs(pilots),
    }
    if not reliable:
        warnings.warn(
            f"AIS weights collapsed: ESS {final_ess:.1f} of {log_w.numel()} particles, Pareto k {khat:.2f} "
            f"(log-weight variance {attrs['log_weight_variance']:.3g}); log Z = {log_z:.3f} and its standard "
            f"error {se:.3g} are unreliable, and the draws, a resample of {distinct} distinct particles, "
            f"carry Monte Carlo errors of about 1/sqrt(ESS) = {1 / math.sqrt(max(final_ess, 1.0)):.2f} "
            "posterior sd in a mean. Raise num_temperatures (or num_mcmc_steps), or use method='smc'.",
            RuntimeWarning,
            stacklevel=2,
        )
    groups = {"tempering": stack_stages([out.stages for out, _, _ in runs])}
    return SamplerResult(draws, sample_stats, groups, attrs)


def _pooled_pilot_attrs(pilots: list[dict]) -> dict:
    """The runs' pilot attrs: evaluations summed, the rest from the first run (one run: as they are)."""
    if not pilots or not pilots[0]:
        return {}
    return {**pilots[0], "pilot_evals": sum(p["pilot_evals"] for p in pilots)}


class _Plan(NamedTuple):
    """A run's path, temperatures ``(K,)``, the options they fix (the pilot's ``preconditioners``)
    and their attrs."""

    path: GeometricPath
    betas: torch.Tensor
    options: dict
    attrs: dict


def _schedule(generator, path, options: dict, total: int, device, dtype, fit: bool):
    """``(plans, kind, attrs)``: the run's :class:`_Plan` (from the pilot's fitted reference when
    ``fit``, then the prior's as a fallback), the kind of schedule, and the pilots' attrs; pops the
    schedule options from ``options``."""
    betas = options.pop("betas", None)
    num_temperatures = options.pop("num_temperatures", None)
    kind = options.pop("schedule", "adaptive")
    num_pilot = options.pop("num_pilot", min(256, max(64, total // 4)))
    if betas is not None:
        return [_Plan(path, betas, {}, {})], "betas", {}
    if kind != "adaptive":
        k = MIN_TEMPERATURES if num_temperatures is None else num_temperatures
        return [_Plan(path, schedule(k, kind, dtype=dtype, device=device), {}, {})], kind, {}
    pilot_options = dict(
        kernel=options.get("kernel", "mala"),
        num_leapfrog=options.get("num_leapfrog", 5),
        target_accept=options.get("target_accept"),
        device=device,
    )
    pilot = pilot_run(generator, path, num_pilot, **pilot_options)
    attrs = {
        "pilot_evals": int(pilot.num_evals),
        "num_pilot": int(num_pilot),
        "pilot_stages_total": len(pilot.betas) - 1,
    }
    plans = [_plan(path, pilot, num_temperatures)]
    if fit:
        fitted, fitted_pilot = _fit_reference(generator, path, pilot, num_pilot, pilot_options, attrs)
        if fitted is not path:
            plans.insert(0, _plan(fitted, fitted_pilot, num_temperatures))
    return plans, kind, attrs


def _plan(path, pilot: PilotRun, num_temperatures: int | None) -> _Plan:
    r"""The temperatures at equal thermodynamic length along the pilot's path, by default
    ``LENGTH_FACTOR`` :math:`\Lambda^2` of them (within [``MIN_TEMPERATURES``, ``MAX_TEMPERATURES``]),
    with the pilot's preconditioners."""
    lam = float(pilot.length[-1])
    if num_temperatures is None:
        num_temperatures = min(max(math.ceil(LENGTH_FACTOR * lam**2), MIN_TEMPERATURES), MAX_TEMPERATURES)
    betas = thermodynamic_schedule(pilot, num_temperatures)
    attrs = {
        "pilot_stages": len(pilot.betas) - 1,
        "thermodynamic_length": lam,
        "expected_log_weight_variance": lam**2 / len(betas),
    }
    return _Plan(path, betas, {"preconditioners": (pilot.betas, pilot.chol, pilot.log_step_size)}, attrs)


def _fit_reference(generator, path, pilot, num_pilot, pilot_options, attrs):
    """The path from a reference fitted to the pilot's particles
    (:func:`~diffstat.tempering.schedules.pilot_reference`), refitted to the particles of the pilot
    along it until the fit settles: the shortest fitted path measured, with its pilot (``attrs``
    are updated), or the prior's path when no fit could be run.

    A pilot along a long path lags it (3 moves per stage) and ends off the posterior
    (posteriordb's mesquite: means 6.2 sd off, sds 1.4 to 3.1 times too wide); along the shorter
    path from its fit it tracks better, and the next fit is close (length 13.7, then 5.2, 1.56,
    1.50, where a fit to Stan's draws gives 1.44; docs/ais.md). The prior's path is not a candidate:
    its length is measured by the pilot that lags it most (mesquite_logvolume: 5.0 measured, a
    log-weight variance of 10^17 run). The fit has settled when a refit moves no mean by more than
    ``SETTLED_SHIFT`` of its sd and shortens the path by less than ``1 - REFIT_GAIN``; where it has
    not after ``MAX_REFITS`` refits, the refits start again with moves until decorrelated
    (:func:`~diffstat.tempering.moves.decorrelating_moves`, as SMC's), which follow a posterior
    that 3 moves a stage do not (earnings-earn_height: a correlation of -0.998 on the dollar
    scale). The refits also stop where the target is NaN or +inf at a draw of the fitted reference
    (a region the pilot's particles did not reach)."""
    attrs |= {"prior_thermodynamic_length": float(pilot.length[-1]), "num_refits": 0}
    best_path, best, previous = path, None, None
    for steps in (3, None):
        options = pilot_options | {"num_mcmc_steps": steps}
        for _ in range(MAX_REFITS):
            reference = pilot_reference(pilot.particles)
            if reference is None:
                return best_path, best or pilot
            fitted = make_path(path.target, reference)
            before = path.target.num_target_evals
            try:
                pilot = pilot_run(generator, fitted, num_pilot, **options)
            except ValueError as err:
                attrs["pilot_evals"] += path.target.num_target_evals - before
                attrs["reference_fallback"] = str(err)
                return best_path, best or pilot
            attrs["pilot_evals"] += int(pilot.num_evals)
            attrs["num_refits"] += 1
            attrs["pilot_stages_total"] += len(pilot.betas) - 1
            attrs["refit_moves"] = "decorrelating" if steps is None else steps
            length = float(pilot.length[-1])
            settled = previous is not None and (
                _mean_shift(reference, previous[0]) < SETTLED_SHIFT and length >= REFIT_GAIN * previous[1]
            )
            if best is None or length < float(best.length[-1]):
                best_path, best = fitted, pilot
            if settled:
                return best_path, best
            previous = (reference, length)
    return best_path, best


def _mean_shift(reference, previous) -> float:
    """The largest change of a mean between two fitted references, in sds of the new one."""
    sd = reference.covariance_matrix.diagonal().sqrt()
    return float(((reference.loc - previous.loc).abs() / sd).max())
