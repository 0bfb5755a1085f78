r"""Annealed importance sampling (Neal 2001): ``ds.sample(target, "ais", ...)``.

Independent particles :math:`x_0 \sim \rho` follow a fixed schedule
:math:`0 = \beta_0 < \beta_1 < \dots < \beta_K = 1` along the geometric path
(:mod:`diffstat.tempering.path`). At temperature :math:`k` each particle's log weight gains
:math:`(\beta_k - \beta_{k-1})\,\delta(x_{k-1})` and the particle then makes ``num_mcmc_steps``
MCMC moves leaving :math:`\pi_{\beta_k}` invariant:

.. math::
    \log w = \sum_{k=1}^K (\beta_k - \beta_{k-1})\, \delta(x_{k-1}),
    \qquad \mathbb E[w] = Z,

so :math:`\hat Z = \frac1n\sum_i w_i`, with the importance-sampling (delta-method) standard error of
:func:`diffstat._util.log_normalizer_estimate` (the particles are independent). Without moves the
weights telescope to :math:`\delta(x_0) = \log\tilde\pi(x_0) - \log\rho(x_0)`: plain importance
sampling from the reference.

Fixed schedules: geometric, :math:`\beta_k = \beta_{\min}^{1 - k/K}` (:math:`\beta_{\min} =
10^{-4}`, :math:`\beta_0 = 0`), dense at small :math:`\beta` where a concentrated likelihood
changes the density fastest; ``schedule="sigmoid"`` is the schedule of Grosse, Maddison and
Salakhutdinov (2013), :math:`\tilde\beta_k = \sigma(\kappa (2k/K - 1))` rescaled to run from 0
to 1 (:math:`\kappa = 4`), dense at both ends; ``"linear"`` equal steps; ``betas=`` any increasing
sequence ending at 1. Measured here (K = 200, 500 particles, 5 to 8 seeds): on a conjugate normal
model whose posterior is 18 times narrower than the prior, geometric errs by at most 0.12 nats and
sigmoid by up to 0.25; on 2- and 10-d Gaussian mixtures from N(0, I), sigmoid has RMSE 0.01 to 0.03
and geometric 0.03 to 0.05.

Default schedule (``schedule="adaptive"``): by **thermodynamic length** from a pilot. Under exact
transitions the AIS log weight is a sum of independent terms, :math:`\mathrm{Var}\log w \approx
\sum_k (\beta_k - \beta_{k-1})^2\,\mathrm{Var}_{\pi_{\beta_k}}(\delta)`, which for a fixed number
of temperatures :math:`K` is smallest when every step has the same length
:math:`\int_{\beta_{k-1}}^{\beta_k} \mathrm{sd}_{\pi_\beta}(\delta)\,d\beta = \Lambda / K`, with
:math:`\Lambda = \int_0^1 \mathrm{sd}_{\pi_\beta}(\delta)\,d\beta` the thermodynamic length of the
path (Gelman and Meng 1998; Grosse, Maddison and Salakhutdinov 2013); the variance is then about
:math:`\Lambda^2/K` (``expected_log_weight_variance`` in attrs; imperfect mixing multiplies it by
the autocorrelation time of :math:`\delta` under the moves). A pilot run of adaptive SMC
(:func:`pilot_run`: ``num_pilot`` particles, resampled at every stage, the next temperature by the
conditional ESS as in :mod:`~diffstat.tempering.smc`) measures :math:`\mathrm{sd}_{\pi_\beta}(\delta)`
and the particle covariance at its stages; the :math:`K` temperatures are placed at equal length
(:func:`thermodynamic_schedule`), and each move at :math:`\beta_k` is preconditioned by the pilot's
covariance at the first pilot stage at or above :math:`\beta_k` (dense, shrunk toward its diagonal
by :math:`\min(1, d/n_{\text{pilot}})` and pooled within the clusters of
:func:`~diffstat.tempering.moves.cluster_particles`, so that each mode of a multimodal stage is
moved at its own scale, applied as a linear change of variables; the proposal
stays exactly reversible). The pilot is independent of the main run, so the schedule is fixed in
advance and :math:`\hat Z` stays unbiased; its evaluations are counted (``pilot_evals``).

Step sizes are per temperature. With the adaptive schedule each move uses the step size the pilot
adapted (from its mean acceptance) at that pilot stage, fixed before the run: no quantity shared by
the particles is adapted during the run, so they stay independent and the standard error is that
of independent weights. Measured (20 seeds, 500 particles, K = 200, the 3-mode mixtures of
``tests/tempering/test_ais.py``): the root mean square of error / SE is 1.27 (d = 2) and 1.30
(d = 10) for the default against 0.97 to 0.98 for the geometric schedule, whose errors are 1.4 to
1.8 times larger (sd of the error 0.025 / 0.027 against 0.035 / 0.050): the small delta-method SE
misses part of the variance of the share of particles per mode. With a fixed schedule, one step size
is carried from temperature to temperature and
adapted after every move from the mean acceptance probability, with (``adapt_scale``) the metric of
:func:`~diffstat.tempering.moves.particle_metric` from the weighted particles (``metric="auto"``: the
shrunk dense covariance while the ESS is at least 10 per dimension, else the diagonal variance;
``"diag"`` the earlier default; using the
unweighted variance once the ESS fell below 10% made the geometric schedule worse on ionosphere:
log Z errors -3.6 to -5.1 against +1.0, -3.1, -1.9, seeds 0-2).

Collapse is reported, never silent: the final ESS, its fraction and the Pareto :math:`\hat k` of the
log weights (Vehtari et al. 2024) are in attrs, the per-temperature ESS in the ``tempering`` group,
and a ``RuntimeWarning`` is issued when ESS < ``min_ess`` (30) or :math:`\hat k > 0.7`: then the
delta-method standard error is itself unreliable (it is computed from the few particles that carry
the weight), and ``log_normalizer_reliable`` is False.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

from diffstat._util import (
    check_options,
    check_positive_int,
    check_probability,
    log_normalizer_estimate,
    pareto_k,
    progress_bar,
)
from diffstat.mcmc.base import MCMCState
from diffstat.sampling import SamplerResult, register_sampler
from diffstat.tempering.moves import METRICS, cluster_particles, particle_metric
from diffstat.tempering.path import (
    GeometricPath,
    PathState,
    adaptive_moves,
    default_step_size,
    get_kernel,
    incremental_log_weights,
    make_path,
)
from diffstat.tempering.resampling import ess, resample
from diffstat.tempering.smc import (
    _check_betas,
    _check_initial,
    initial_particles,
    next_beta,
)

__all__ = [
    "AISOutput",
    "PilotRun",
    "ais",
    "ais_sampler",
    "dense_kernel",
    "pareto_k",
    "pilot_run",
    "schedule",
    "thermodynamic_schedule",
]

#: Steepness of the sigmoid schedule (Grosse et al. 2013 use 4).
_SIGMOID_STEEPNESS = 4.0
#: Smallest positive temperature of the geometric schedule.
_GEOMETRIC_BETA_MIN = 1e-4
#: Below this final ESS (or above Pareto k 0.7) the estimate is flagged as collapsed.
_MIN_ESS = 30.0
_MAX_PARETO_K = 0.7


class AISOutput(NamedTuple):
    """Result of AIS: the final particles (a :class:`PathState`), their log weights ``(n,)``,
    per-temperature tensors ``stages`` (``beta``, ``ess`` fraction, ``log_z_increment``,
    ``acceptance_rate``, ``step_size``) and each particle's acceptance at the last temperature."""

    particles: PathState
    log_weights: torch.Tensor
    stages: dict[str, torch.Tensor]
    acceptance: torch.Tensor


class PilotRun(NamedTuple):
    r"""What the pilot measured at its ``S + 1`` stages (the first at :math:`\beta = 0`).

    betas: (S+1,) from 0 to 1. sd: (S+1,) :math:`\mathrm{sd}_{\pi_\beta}(\delta)` of its particles.
    length: (S+1,) cumulative thermodynamic length (trapezoid rule). chol: (S+1, d, d) lower
    Cholesky factors of the shrunk particle covariances. log_step_size: (S+1,) the step size adapted
    by the end of each stage (the first: the default). num_evals: target evaluations spent.
    """

    betas: torch.Tensor
    sd: torch.Tensor
    length: torch.Tensor
    chol: torch.Tensor
    log_step_size: torch.Tensor
    num_evals: int


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


def dense_kernel(kernel: Callable, chol: torch.Tensor) -> Callable:
    r"""``kernel`` run in the coordinates :math:`z = L^{-1}x` (``chol`` :math:`= L`, lower,
    :math:`LL^\top` the preconditioning covariance): a dense mass matrix for any kernel of
    :mod:`diffstat.mcmc`. The map is linear, so the acceptance ratio is unchanged and the move is
    reversible with respect to the same :math:`\pi_\beta`; its last density evaluation is still the
    proposal's (as :func:`~diffstat.tempering.path.move` needs)."""
    lt = chol.T

    def step(generator, state, log_prob_and_grad, step_size, inv_mass=None, **options):
        z = torch.linalg.solve_triangular(chol, state.x.T, upper=False).T

        def in_z(zz):
            lp, g = log_prob_and_grad(zz @ lt)
            return lp, g @ chol

        new, info = kernel(
            generator, MCMCState(z, state.log_prob, state.grad @ chol), in_z, step_size, None, **options
        )
        grad_x = torch.linalg.solve_triangular(lt, new.grad.T, upper=True).T
        return MCMCState(new.x @ lt, new.log_prob, grad_x), info

    return step


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
    moved by ``num_mcmc_steps`` dense-preconditioned moves. Records
    :math:`\mathrm{sd}_{\pi_\beta}(\delta)` and the particle covariance after the moves."""
    n = check_positive_int(num_particles, "num_pilot")
    if n < 4:
        raise ValueError(f"num_pilot must be at least 4, got {n}")
    before = path.target.num_target_evals
    step, default_accept = get_kernel(kernel, num_leapfrog)
    target_accept = default_accept if target_accept is None else target_accept
    ps = path.evaluate(initial_particles(path, n, generator, device))
    _check_initial(ps)
    dtype = ps.x.dtype
    log_h = torch.tensor(math.log(default_step_size(kernel, path.dim)), dtype=dtype, device=ps.x.device)
    beta = torch.zeros((), dtype=dtype, device=ps.x.device)
    zeros = torch.zeros(n, dtype=dtype, device=ps.x.device)

    def spread(p):
        d = p.delta[torch.isfinite(p.delta)]
        return d.std() if d.numel() > 1 else torch.zeros((), dtype=dtype, device=p.x.device)

    betas, sds, chols, log_hs = [beta], [spread(ps)], [_pilot_cholesky(ps.x, generator)], [log_h]
    for _ in range(max_stages):
        new_beta = next_beta(zeros, ps.delta, beta, target_cess)
        ps = ps.index(resample(generator, incremental_log_weights(ps, beta, new_beta), "systematic"))
        chol = _pilot_cholesky(ps.x, generator)
        ps, log_h, _ = adaptive_moves(
            dense_kernel(step, chol),
            generator,
            ps,
            path,
            new_beta,
            log_h,
            int(num_mcmc_steps),
            target_accept=target_accept,
        )
        beta = new_beta
        betas.append(beta)
        sds.append(spread(ps))
        chols.append(_pilot_cholesky(ps.x, generator))
        log_hs.append(log_h)
        if bool(beta >= 1.0):
            break
    else:
        raise RuntimeError(
            f"the AIS pilot did not reach beta = 1 in {max_stages} stages; pass betas= or schedule="
        )
    b, sd = torch.stack(betas), torch.stack(sds)
    length = torch.cat(
        [
            torch.zeros(1, dtype=dtype, device=b.device),
            torch.cumsum(0.5 * (sd[1:] + sd[:-1]) * (b[1:] - b[:-1]), 0),
        ]
    )
    return PilotRun(
        b, sd, length, torch.stack(chols), torch.stack(log_hs), path.target.num_target_evals - before
    )


def _pilot_cholesky(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Lower Cholesky factor ``(d, d)`` of the dense metric of
    :func:`~diffstat.tempering.moves.particle_metric` (the covariance pooled within the particles'
    clusters, shrunk toward its diagonal by ``min(1, d/n)``): a mixture's modes each moved at their
    own scale."""
    labels = cluster_particles(x, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device), generator)
    return particle_metric(x, None, "dense", labels).chol


def thermodynamic_schedule(pilot: PilotRun, num_temperatures: int) -> torch.Tensor:
    r"""``num_temperatures`` inverse temperatures ``(K,)`` at equal thermodynamic length along the
    pilot's path: :math:`\Lambda(\beta_k) = k\Lambda/K`, :math:`\Lambda` interpolated linearly
    between the pilot's stages (where it does not grow, the pilot's own betas are spread evenly)."""
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
    betas = b[j - 1] + t * (b[j] - b[j - 1])
    betas[-1] = 1.0
    betas = torch.cummax(betas, 0).values
    tiny = torch.finfo(b.dtype).eps
    # strictly increasing and positive (ties only when K far exceeds the resolution of float64)
    betas = torch.maximum(betas, torch.arange(1, k_total + 1, dtype=b.dtype, device=b.device) * tiny)
    return betas


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
    betas = _check_betas(betas, x0)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if int(num_mcmc_steps) < 0:
        raise ValueError(f"num_mcmc_steps must be non-negative, got {num_mcmc_steps}")
    step, default_accept = get_kernel(kernel, num_leapfrog)
    target_accept = (
        default_accept if target_accept is None else check_probability(target_accept, "target_accept")
    )
    h0 = default_step_size(kernel, path.dim) if step_size is None else float(step_size)
    if not h0 > 0:
        raise ValueError(f"step_size must be positive, got {step_size}")
    n, dtype, device = x0.shape[0], x0.dtype, x0.device

    ps = path.evaluate(x0)
    _check_initial(ps)
    log_w = torch.zeros(n, dtype=dtype, device=device)
    log_h = torch.tensor(math.log(h0), dtype=dtype, device=device)
    beta = torch.zeros((), dtype=dtype, device=device)
    records: dict[str, list] = {
        k: [] for k in ("beta", "ess", "log_z_increment", "acceptance_rate", "step_size")
    }
    acc = torch.full((n,), math.nan, dtype=dtype, device=device)
    if preconditioners is not None:
        pilot_betas, pilot_chol, pilot_log_h = preconditioners
        which = torch.searchsorted(pilot_betas.to(betas), betas).clamp(max=len(pilot_betas) - 1)
    with progress_bar(len(betas), "ais", progress) as bar:
        for k, new_beta in enumerate(betas):
            incr = incremental_log_weights(ps, beta, new_beta)
            records["log_z_increment"].append(torch.logsumexp(torch.log_softmax(log_w, -1) + incr, -1))
            log_w = log_w + incr
            ess_frac = ess(log_w) / n
            records["ess"].append(ess_frac)
            records["step_size"].append(torch.exp(log_h))
            inv_mass, kern = None, step
            if preconditioners is not None:
                kern = dense_kernel(step, pilot_chol[which[k]])
                log_h = pilot_log_h[which[k]].to(log_h)
            elif adapt_scale and num_mcmc_steps:
                inv_mass = particle_metric(ps.x, log_w, metric)
            ps, log_h, acc = adaptive_moves(
                kern,
                generator,
                ps,
                path,
                new_beta,
                log_h,
                int(num_mcmc_steps),
                inv_mass=inv_mass,
                target_accept=target_accept,
                adapt_rate=0.0 if preconditioners is not None else 1.0,
            )
            records["beta"].append(new_beta)
            records["acceptance_rate"].append(acc.mean())
            beta = new_beta
            bar.update()
    stages = {key: torch.stack(vals) for key, vals in records.items()}
    return AISOutput(ps, log_w, stages, acc)


_OPTIONS = {
    "reference",
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
    """``ds.sample(target, "ais", num_samples=n, ...)``: AIS with ``n`` particles per chain.

    Options: ``reference``; ``betas`` or ``num_temperatures`` (200) with ``schedule``
    (``"adaptive"``: thermodynamic length from a pilot of ``num_pilot`` particles, default
    ``min(256, max(64, n_total // 4))``; or the fixed ``"geometric"``, ``"sigmoid"``,
    ``"linear"``); ``kernel`` (``"mala"``), ``num_mcmc_steps`` (1), ``num_leapfrog`` (5),
    ``step_size``, ``target_accept``, ``adapt_scale`` (True), ``metric`` (``"auto"``, fixed schedules);
    ``resampling`` (``"systematic"``), the
    scheme of the final resampling; ``min_ess`` (30), below which the result is flagged as
    collapsed (a ``RuntimeWarning``). ``num_chains`` (default 1) groups of particles run in one
    batch and are resampled separately; ``log_normalizer`` pools all particles.

    The draws are resampled to equal weights; ``log_weight`` in ``sample_stats`` is each draw's
    AIS log weight (that of the particle it was resampled from).
    """
    check_options(options, _OPTIONS, "ais")
    num_chains = 1 if num_chains is None else num_chains
    path = make_path(target, options.pop("reference", None))
    scheme = options.pop("resampling", "systematic")
    betas = options.pop("betas", None)
    num_temperatures = options.pop("num_temperatures", 200)
    kind = options.pop("schedule", "adaptive")
    min_ess = float(options.pop("min_ess", _MIN_ESS))
    total = num_chains * num_samples
    num_pilot = options.pop("num_pilot", min(256, max(64, total // 4)))
    pilot_attrs: dict = {}
    used = "betas" if betas is not None else kind
    if betas is None and kind == "adaptive":
        pilot = pilot_run(
            generator,
            path,
            num_pilot,
            kernel=options.get("kernel", "mala"),
            num_leapfrog=options.get("num_leapfrog", 5),
            target_accept=options.get("target_accept"),
            device=device,
        )
        betas = thermodynamic_schedule(pilot, num_temperatures)
        options["preconditioners"] = (pilot.betas, pilot.chol, pilot.log_step_size)
        lam = float(pilot.length[-1])
        pilot_attrs = {
            "pilot_evals": int(pilot.num_evals),
            "num_pilot": int(num_pilot),
            "pilot_stages": len(pilot.betas) - 1,
            "thermodynamic_length": lam,
            "expected_log_weight_variance": lam**2 / len(betas),
        }
    elif betas is None:
        betas = schedule(num_temperatures, kind, dtype=target.dtype, device=device)
    x0 = initial_particles(path, total, generator, device)
    out = ais(generator, path, x0, betas, progress=progress, **options)
    log_z, se = log_normalizer_estimate(out.log_weights)
    chains = torch.arange(num_chains, device=device).unsqueeze(-1) * num_samples
    idx = torch.stack(
        [resample(generator, lw, scheme) for lw in out.log_weights.reshape(num_chains, num_samples)]
    )
    idx = (idx + chains).flatten()
    ps = out.particles.index(idx)
    shape = (num_chains, num_samples)
    sample_stats = {
        "lp": ps.target_log_prob.reshape(shape),
        "acceptance_rate": out.acceptance[idx].reshape(shape),
        "log_weight": out.log_weights[idx].reshape(shape),
    }
    final_ess = float(ess(out.log_weights))
    khat = pareto_k(out.log_weights)
    reliable = final_ess >= min_ess and not khat > _MAX_PARETO_K
    attrs = {
        "log_normalizer": log_z,
        "log_normalizer_se": se,
        "log_normalizer_reliable": bool(reliable),
        "num_stages": len(out.stages["beta"]),
        "ess": final_ess,
        "ess_fraction": final_ess / total,
        "pareto_k": khat,
        "log_weight_variance": float(out.log_weights[torch.isfinite(out.log_weights)].var()),
        "schedule": used,
        "path": path.kind,
        **pilot_attrs,
    }
    if not reliable:
        warnings.warn(
            f"AIS weights collapsed: ESS {final_ess:.1f} of {total} particles, Pareto k {khat:.2f} "
            f"(log-weight variance {attrs['log_weight_variance']:.3g}); log Z = {log_z:.3f} and its standard "
            f"error {se:.3g} are unreliable. Raise num_temperatures (or num_mcmc_steps), "
            "or use method='smc'.",
            RuntimeWarning,
            stacklevel=2,
        )
    return SamplerResult(ps.x.reshape(*shape, -1), sample_stats, {"tempering": out.stages}, attrs)
