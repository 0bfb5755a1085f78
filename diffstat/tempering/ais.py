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
Particles that lag the path where the moves cannot follow are reported too
(:mod:`diffstat.tempering.lag`): where the final particles' mean log-density is well below the
weighted one and the moves accept less where the weights are larger, the weights' correction misses
a region the particles never filled, which no statistic of the weights alone sees; a
``RuntimeWarning`` says so, ``log_normalizer_reliable`` is False, and both shifts are in attrs
(``log_density_lag``, ``acceptance_shift``).
Measurements behind the defaults (schedules compared, standard-error calibration): ``docs/ais.md``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import NamedTuple

import torch

from diffstat._util import (
    check_bool,
    check_options,
    check_positive_int,
    log_normalizer_estimate,
    pareto_k,
    progress_bar,
)
from diffstat.sampling import SamplerResult, register_sampler
from diffstat.tempering.auto_reference import reference_attrs
from diffstat.tempering.mode_check import check_missed_modes, check_reference_width, pop_check_modes
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
from diffstat.tempering.lag import is_lagging, lag_message, run_shifts
from diffstat.tempering.path import GeometricPath, PathState, default_step_size, make_path
from diffstat.tempering.resampling import ess, resample
from diffstat.tempering.runs import stack_stages
from diffstat.tempering.ais_plan import (  # noqa: F401 (constants re-exported: ais.LENGTH_FACTOR ...)
    LENGTH_FACTOR,
    MAX_REFITS,
    MAX_TEMPERATURES,
    MIN_TEMPERATURES,
    REFIT_GAIN,
    SETTLED_SHIFT,
    plan_schedule,
)
from diffstat.tempering.schedules import PilotRun, pilot_run, schedule, thermodynamic_schedule

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

#: Below this final ESS (or above Pareto k 0.7) the result is flagged as collapsed: with ESS 100 the
#: draws' Monte Carlo error is 0.1 posterior sd in a mean and about 7% in an sd (a Gaussian
#: marginal), what an answer right to 0.15 sd and 15% needs (30 let posteriordb's arma11 through with
#: an sd 20% off: 37 effective draws).
MIN_ESS = 100.0
_MAX_PARETO_K = 0.7
#: Weights with an ESS of at least this fraction of the particles are not collapsed, however few the
#: particles: for log-normal weights Kish's ESS is about n exp(-Var log w), so half means a log-weight
#: variance near log 2, even weights. A run with fewer than ``2 * min_ess`` particles that misses
#: ``min_ess`` with such weights is flagged for too few particles, not for collapsed weights.
_EVEN_FRACTION = 0.5


class AISOutput(NamedTuple):
    """Result of AIS: the final particles (a :class:`PathState`), their log weights ``(n,)``,
    per-temperature tensors ``stages`` (those of :class:`~diffstat.tempering.core.StageInfo`) and each
    particle's acceptance at the last temperature, and its mean over the last tenth of them
    (``recent_acceptance``, at least one; :mod:`diffstat.tempering.lag`)."""

    particles: PathState
    log_weights: torch.Tensor
    stages: dict[str, torch.Tensor]
    acceptance: torch.Tensor
    recent_acceptance: torch.Tensor | None = None


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
    bar=None,
) -> AISOutput:
    """Run AIS from the reference draws ``x0: (n, dim)`` through ``betas: (K,)`` (ending at 1).

    ``num_mcmc_steps=0`` replaces the moves by the identity (plain importance sampling, whose
    weights are ``log target(x0) - log reference(x0)``). ``preconditioners=(pilot_betas (S,),
    chol (S, d, d), log_step_size (S,))``: the dense preconditioners and step sizes of a pilot; the
    move at ``beta`` uses those of the first pilot stage at or above it, fixed in advance (no
    adaptation in the run, so the particles stay independent and the standard error is that of
    independent weights; ``step_size`` and ``adapt_scale`` are then ignored). ``bar``: a tqdm bar
    to advance by one per temperature (its total raised by ``K``), else one of its own when
    ``progress``.
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
    if bar is not None:
        bar.total += len(betas)
        bar.refresh()
    infos = []
    with progress_bar(len(betas), "ais", progress) if bar is None else contextlib.nullcontext(bar) as bar:
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
    recent = torch.stack([info.acceptance for info in infos[-max(1, len(infos) // 10) :]]).mean(0)
    return AISOutput(
        state.particles, state.log_weights, stack_stage_infos(infos), infos[-1].acceptance, recent
    )


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
    "check_modes",
}


@register_sampler("ais", typed_by=ais)
def ais_sampler(target, *, num_samples, num_chains, generator, progress, device, **options) -> SamplerResult:
    r"""``ds.sample(target, "ais", num_samples=n, ...)``: AIS with ``n`` particles per chain.

    Options: ``reference``, a distribution on R^dim to start from (default: the target's own
    reference, or the prior of a model with ``log_prior`` and ``log_likelihood``, whose likelihood
    is then tempered); ``fit_reference`` (True): with the adaptive schedule and no ``reference``,
    start instead from a Gaussian fitted by a pilot along the prior's path
    (:func:`~diffstat.tempering.schedules.pilot_reference`); ``betas`` or ``num_temperatures`` with
    ``schedule`` (``"adaptive"``: a pilot of ``num_pilot`` particles, default
    ``min(256, max(64, n // 4))``, along the path AIS follows measures its thermodynamic length
    :math:`\Lambda`, and by default ``LENGTH_FACTOR`` :math:`\Lambda^2` temperatures within
    [``MIN_TEMPERATURES``, ``MAX_TEMPERATURES``] = [200, 2000]; or the fixed ``"geometric"``,
    ``"sigmoid"``, ``"linear"`` with 200 by default); ``kernel`` (``"mala"``), ``num_mcmc_steps``
    (1), ``num_leapfrog`` (5), ``step_size``, ``target_accept``, ``adapt_scale`` (True), ``metric``
    (``"auto"``, fixed schedules); ``resampling`` (``"systematic"``), the scheme of the final
    resampling; ``min_ess`` (``MIN_ESS`` = 100), below which the result is flagged unreliable (a
    ``RuntimeWarning``): its weights collapsed, or with even weights too few particles.
    ``num_chains`` (default 1) independent runs, each with its own pilots, one after another (so
    R-hat across chains also sees a pilot that missed part of the posterior); ``log_normalizer``
    pools the particles of all runs (each run's weights are unbiased for :math:`Z`).

    The draws are resampled to equal weights, per run; ``log_weight`` in ``sample_stats`` is each
    draw's AIS log weight, attrs' ``num_distinct`` the distinct particles among them. ``check_modes``
    (True): look for modes that the runs missed (:mod:`diffstat.tempering.mode_check`).
    """
    check_options(options, _OPTIONS, "ais")
    check_modes = pop_check_modes(options)
    evals0 = target.num_target_evals
    _check_settings(options)
    num_chains = 1 if num_chains is None else num_chains
    reference = options.pop("reference", None)
    fit = check_bool(options.pop("fit_reference", True), "fit_reference") and reference is None
    path = make_path(target, reference)
    scheme = options.pop("resampling", "systematic")
    min_ess = float(options.pop("min_ess", MIN_ESS))
    runs, pilots, used = [], [], None
    with progress_bar(0, "ais", progress) as bar:  # one bar for every run's temperatures
        for _ in range(num_chains):
            out, run_path, used, pilot_attrs = _one_run(
                generator, path, dict(options), num_samples, device, target.dtype, fit, bar
            )
            runs.append((out, resample(generator, out.log_weights, scheme), run_path))
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
    ref_kind = "given" if reference is not None else "pilot" if runs[0][2] is not path else "prior"
    distinct = sum(int(torch.unique(idx).numel()) for _, idx, _ in runs)
    attrs = {
        "log_normalizer": log_z,
        "log_normalizer_se": se,
        "num_stages": max(len(out.stages["beta"]) for out, _, _ in runs),
        "ess": final_ess,
        "ess_fraction": final_ess / log_w.numel(),
        "num_distinct": distinct,
        "pareto_k": khat,
        "log_weight_variance": _variance(log_w[torch.isfinite(log_w)]),
        "schedule": used,
        "path": runs[0][2].kind,
        "reference": ref_kind,
        **reference_attrs(path),
        **_pooled_pilot_attrs(pilots),
    }
    attrs.update(_reliability(runs, attrs, log_w.numel(), min_ess))
    # the modes' climbs start from the prior's (or given) reference, the width is the run's reference's
    checks = {}
    if check_modes:
        checks = check_missed_modes("AIS", target, path, draws, log_z, generator, device, evals0)
    attrs.update(checks | check_reference_width("AIS", runs[0][2], draws, log_z, generator, device))
    groups = {"tempering": stack_stages([out.stages for out, _, _ in runs])}
    return SamplerResult(draws, sample_stats, groups, attrs)


def _reliability(runs, attrs: dict, num_particles: int, min_ess: float) -> dict:
    """``log_normalizer_reliable`` and the log-density lag and acceptance shift (each with its noise)
    of the run that lags most (:mod:`diffstat.tempering.lag`) as attrs, after the warning of a run
    flagged unreliable: its weights collapsed (ESS under ``min_ess`` or k above 0.7), else its
    particles lag the path where the moves cannot follow."""
    shifts = [
        run_shifts(out.particles.x, out.log_weights, out.particles.target_log_prob, out.recent_acceptance)
        for out, _, _ in runs
    ]
    flagged = [is_lagging(*s) for s in shifts]
    lag, accept = shifts[flagged.index(True)] if any(flagged) else max(shifts, key=lambda s: _finite(s[0][0]))
    collapsed = not attrs["ess"] >= min_ess or attrs["pareto_k"] > _MAX_PARETO_K
    if collapsed:
        warnings.warn(_collapse_message(attrs, num_particles, min_ess), RuntimeWarning, stacklevel=4)
    elif any(flagged):
        message = lag_message("AIS", lag, accept, attrs["log_normalizer"], attrs["num_stages"])
        warnings.warn(message, RuntimeWarning, stacklevel=4)
    return {
        "log_normalizer_reliable": not collapsed and not any(flagged),
        "log_density_lag": lag[0],
        "log_density_lag_noise": lag[1],
        "acceptance_shift": accept[0],
        "acceptance_shift_noise": accept[1],
    }


def _finite(value: float) -> float:
    """``value``, or minus infinity where it is NaN (the last in a ``max``)."""
    return value if math.isfinite(value) else -math.inf


def _variance(values: torch.Tensor) -> float:
    """The sample variance of ``values: (n,)``; NaN for fewer than two (no spread to estimate)."""
    return float(values.var()) if values.numel() > 1 else math.nan


def _check_settings(options: dict) -> None:
    """``ValueError`` for a bad value among the options the pilot and the run check where they use
    them (the moves, the schedule, the step size), raised before the pilot's first evaluation."""
    MoveConfig(
        options.get("kernel", "mala"),
        options.get("num_leapfrog", 5),
        options.get("target_accept"),
        options.get("num_mcmc_steps", 1),
    )
    for name in ("num_temperatures", "num_pilot"):
        if options.get(name) is not None:
            check_positive_int(options[name], name)
    step_size = options.get("step_size")
    if step_size is not None and not float(step_size) > 0:
        raise ValueError(f"step_size must be positive, got {step_size}")


def _pooled_pilot_attrs(pilots: list[dict]) -> dict:
    """The runs' pilot attrs: evaluations summed, the rest from the first run (one run: as they are)."""
    if not pilots or not pilots[0]:
        return {}
    return {**pilots[0], "pilot_evals": sum(p["pilot_evals"] for p in pilots)}


def _one_run(generator, path, options: dict, num_samples: int, device, dtype, fit: bool, bar):
    """One AIS run from its plan (:func:`~diffstat.tempering.ais_plan.plan_schedule`): along the
    path from the fitted reference, or the prior's where the target is NaN or +inf at a draw of the
    fitted reference. Returns the output, the path run, the kind of schedule and the pilots' attrs."""
    plans, used, pilot_attrs = plan_schedule(generator, path, options, num_samples, device, dtype, fit)
    for i, plan in enumerate(plans):
        try:
            x0 = initial_particles(plan.path, num_samples, generator, device)
            out = ais(generator, plan.path, x0, plan.betas, bar=bar, **(options | plan.options))
            break
        except ValueError as err:  # the target NaN or +inf at a draw of the fitted reference
            if i == len(plans) - 1:
                raise
            pilot_attrs["reference_fallback"] = str(err)
    return out, plan.path, used, pilot_attrs | plan.attrs


def _collapse_message(attrs: dict, num_particles: int, min_ess: float) -> str:
    """The warning text of a run flagged unreliable (ESS under ``min_ess`` or k above 0.7): its weights
    collapsed, or they are even (ESS at least ``_EVEN_FRACTION`` of the particles, k fine) and there are
    too few particles to reach ``min_ess``."""
    final_ess = attrs["ess"]
    if final_ess >= _EVEN_FRACTION * num_particles and not attrs["pareto_k"] > _MAX_PARETO_K:
        return (
            f"AIS with too few particles: ESS {final_ess:.1f} of {num_particles} particles (the weights are "
            f"even) is below min_ess = {min_ess:g}; log Z = {attrs['log_normalizer']:.3f} +- "
            f"{attrs['log_normalizer_se']:.3g} and the draws carry Monte Carlo errors of about 1/sqrt(ESS) = "
            f"{1 / math.sqrt(max(final_ess, 1.0)):.2f} posterior sd in a mean. Raise num_samples: about "
            f"{math.ceil(min_ess * num_particles / final_ess)} particles in all would reach it."
        )
    return (
        f"AIS weights collapsed: ESS {final_ess:.1f} of {num_particles} particles, Pareto k "
        f"{attrs['pareto_k']:.2f} (log-weight variance {attrs['log_weight_variance']:.3g}); log Z = "
        f"{attrs['log_normalizer']:.3f} and its standard error {attrs['log_normalizer_se']:.3g} are "
        f"unreliable, and the draws, a resample of {attrs['num_distinct']} distinct particles, carry "
        f"Monte Carlo errors of about 1/sqrt(ESS) = {1 / math.sqrt(max(final_ess, 1.0)):.2f} posterior "
        "sd in a mean. Raise num_temperatures (or num_mcmc_steps), or use method='smc'."
    )
