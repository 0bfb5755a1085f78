r"""Particle denoising diffusion sampler: SMC along the noising path, ``ds.sample(target, "pdds", ...)``.

Algorithm (Phillips, Zhao, Deligiannidis and Doucet 2024, "Particle Denoising Diffusion Sampler")
-------------------------------------------------------------------------------------------------
In whitened coordinates with reference :math:`\mathcal N(0, I)` and targets
:math:`\gamma_k = \mathcal N(0, I)\,\hat g_k` on noise levels :math:`\lambda_K \approx 1 > \dots >
\lambda_0 = 0` (:mod:`diffstat.diffusion.noised_smc_path`):

1. **Start.** :math:`x^i \sim \mathcal N(0, I)`, log weight :math:`\log\hat g_K(x^i)`.
2. **Propose** by the guided reverse SDE, exponential integrator over one step: with
   :math:`c = a_k / a_{k+1}` and :math:`\lambda = 1 - c^2`,
   :math:`x' \sim q = \mathcal N(c\,x + \lambda \nabla\log\hat g_{k+1}(x),\ \lambda I)`.
3. **Reweight** by

   .. math:: \log w' = \log w + \log p(x' \mid x) - \log q(x' \mid x) + \log\hat g_k(x') -
             \log\hat g_{k+1}(x),

   with :math:`p(x' \mid x) = \mathcal N(x'; c\,x, \lambda I)` the reverse transition of the
   stationary reference process. Since :math:`\mathcal N(x; 0, I)\, p(x' \mid x) = \mathcal N(x'; 0,
   I)\, p(x \mid x')`, this is the SMC-sampler weight with the forward noising kernel as backward
   kernel (Del Moral, Doucet and Jasra 2006): the estimate is exact for any guidance with
   :math:`\hat g_0 = g`, and the guidance only sets its variance. :math:`\log\hat Z
   \mathrel{+}= \log\sum_i W_i w'_i/w_i`.
4. **Resample** (systematic by default) when the ESS fraction falls below ``resample_threshold``.
5. **Move** the particles by MCMC leaving :math:`\gamma_k` invariant, with the tempering samplers'
   machinery (:mod:`diffstat.tempering.moves`): the metric is the weighted particles' covariance
   pooled within clusters, taken before resampling duplicates them
   (:func:`~diffstat.tempering.core.cloud_metric`, so the distance between modes does not set the
   step inside them), the step size is adapted toward the kernel's acceptance
   (Robbins-Monro on its logarithm, carried across levels), and the moves number ``num_mcmc_steps``
   or, with ``num_mcmc_steps=None``, repeat until the particles decorrelate from the level's start
   (:func:`~diffstat.tempering.moves.decorrelating_moves`, at most ``max_mcmc_steps``). Kernels:
   ``"mala"``, ``"hmc"``, or ``"local_mala"``
   (:func:`~diffstat.diffusion.noised_smc_path.local_mala_step`, a step that shrinks where the
   target is locally narrower than the metric).

Each level is one :func:`~diffstat.tempering.core.smc_step`, the step of the tempering samplers,
on the particles as a :class:`~diffstat.tempering.path.PathState` with ``base`` :math:`\log\mathcal
N(x; 0, I)` and ``delta`` :math:`\log\hat g_k(x)`, so that the level's target is that path at
:math:`\beta = 1`: the first level's reweighting is the tempered one from :math:`\beta = 0` (the
reference) to 1, the others' is :func:`guided_reweight` (steps 2 and 3).

:math:`\hat Z` is unbiased on the natural scale. Its standard error comes from the genealogy
(:func:`diffstat.tempering.smc.genealogy_variance`, Chan and Lai 2013 for systematic resampling)
and, with ``num_chains`` independent runs, from their spread; a warning names what makes a run
unreliable (:mod:`diffstat.diffusion.noised_smc_check`).

Guidance and pilot
------------------
The pilot (:func:`~diffstat.diffusion.noised_smc_path.pilot_whitening`) runs short MALA chains
from reference draws shrunk by 0.25, 0.5 and 1; their end points give the whitening (mean and
covariance) and a bank of Laplace modes (:mod:`diffstat.diffusion.noised_smc_bank`). The default
guidance is the bank's exact noised :math:`g_t` times the power guidance of the residual
:math:`g / g^{\rm bank}_0`: exact for a Gaussian mixture whose modes the pilot found, and the
SMC weights correct the rest. Without a bank (no settled mode) it is the power guidance
:math:`g(a x)^{\beta_t}` alone; ``guidance="simple"`` is PDDS's :math:`g(a x)`.

Defaults: 64 noise levels (log-uniform in relative noise; fewer raise the weight variance, more
cost evaluations linearly); 4 MALA moves per level (enough to decorrelate resampled copies within
a mode at modest cost; the decorrelating rule reaches its cap of 20 at every level on a mixture of
a narrow and a wide mode, tripling the cost, with the shared step set by the narrow mode);
resampling at ESS 0.5 (the usual adaptive rule); a pilot of 2048 chains of 25 steps (on the 10-d
narrow-heavy/wide-light mixture 8 to 14 of them reach the heavy mode, which must be in the bank:
with 256 chains none did and the mode was lost).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import NamedTuple

import torch

from diffstat._util import check_options, progress_bar
from diffstat.diffusion.noised_smc_learned import refine_path
from diffstat.diffusion.noised_smc_check import STUCK_ACCEPTANCE, pooled_log_z, reliability_problems
from diffstat.diffusion.noised_smc_path import GuidedState, NoisedPath, local_mala_step, noise_schedule
from diffstat.diffusion.noised_smc_mixture import independence_moves, population_defaults, population_path
from diffstat.diffusion.noised_smc_setup import OPTIONS, check_settings, setup_path
from diffstat.mcmc.mala import MALA_TARGET_ACCEPT
from diffstat.sampling import SamplerResult, register_sampler
from diffstat.tempering.core import (
    MoveConfig,
    Reweight,
    StageInfo,
    TemperedState,
    cloud_metric,
    identity_metric,
    smc_step,
    tempered_reweight,
)
from diffstat.tempering.path import PathState, default_step_size
from diffstat.tempering.resampling import resample
from diffstat.tempering.runs import stack_stages
from diffstat.tempering.smc import genealogy_variance

__all__ = [
    "NoisedSMCOutput",
    "guided_proposal",
    "guided_reweight",
    "incremental_log_weight",
    "noised_smc",
    "pdds_sampler",
]


#: Per-level records of a run (the ``diffusion`` group of the output).
STAGE_KEYS = (
    "noise",
    "guidance_power",
    "ess",
    "cess",
    "log_z_increment",
    "num_moves",
    "decorrelation",
    "acceptance_rate",
    "stuck",
    "step_size",
    "resampled",
    "mixture_acceptance",
)


class NoisedSMCOutput(NamedTuple):
    """One run: final ``particles`` (whitened, before final resampling), their ``log_weights (n,)``,
    ``log_normalizer`` and its ``log_normalizer_se``, per-stage ``stages`` tensors, the number of
    resampling events and of distinct surviving initial ancestors."""

    particles: GuidedState
    log_weights: torch.Tensor
    log_normalizer: float
    log_normalizer_se: float
    stages: dict[str, torch.Tensor]
    num_resampling: int
    num_eves: int


def guided_proposal(generator, gs: GuidedState, c, lam) -> torch.Tensor:
    r"""Draw :math:`x' \sim \mathcal N(c\,x + \lambda\nabla\log\hat g(x), \lambda I)`, ``(n, dim)``."""
    noise = torch.randn(gs.x.shape, generator=generator, dtype=gs.x.dtype, device=gs.x.device)
    return c * gs.x + lam * gs.grad_g + torch.sqrt(lam) * noise


def incremental_log_weight(old: GuidedState, new: GuidedState, c, lam) -> torch.Tensor:
    r""":math:`\log p(x'|x) - \log q(x'|x) + \log\hat g_k(x') - \log\hat g_{k+1}(x)`, ``(n,)``.

    With :math:`e = x' - c\,x` and :math:`v = \nabla\log\hat g_{k+1}(x)`, the Gaussian ratio is
    :math:`(\lVert e - \lambda v\rVert^2 - \lVert e\rVert^2) / (2\lambda) = -e\cdot v + \lambda\lVert
    v\rVert^2/2`, written so that it holds for any :math:`x'`, not only the proposal's draws."""
    e = new.x - c * old.x
    v = old.grad_g
    return -(e * v).sum(-1) + 0.5 * lam * (v**2).sum(-1) + new.log_g - old.log_g


def _path_state(gs: GuidedState) -> PathState:
    r"""A level's particles as the tempering moves take them: ``base`` :math:`\log\mathcal N(x; 0,
    I)`, ``delta`` :math:`\log\hat g_k(x)`."""
    return PathState(gs.x, NoisedPath.log_reference(gs.x), -gs.x, gs.log_g, gs.grad_g)


def _guided_state(ps: PathState) -> GuidedState:
    """Back from :func:`_path_state`; the target log-density, not carried, is NaN."""
    return GuidedState(ps.x, ps.delta, ps.delta_grad, torch.full_like(ps.delta, math.nan))


class _StagePath:
    r"""The stage target :math:`\gamma_k` in the form the tempering moves take
    (:func:`~diffstat.tempering.path.move` at ``beta = 1``): ``base`` is :math:`\log\mathcal N(x; 0,
    I)` and ``delta`` is :math:`\log\hat g_k(x)`."""

    def __init__(self, path: NoisedPath, rho: torch.Tensor):
        self.path, self.rho = path, rho

    def evaluate(self, x: torch.Tensor) -> PathState:
        return _path_state(self.path.evaluate(x, self.rho))


def guided_reweight(path: NoisedPath, rho_from: torch.Tensor, rho_to: torch.Tensor) -> Reweight:
    r"""The reweighting hook of :func:`~diffstat.tempering.core.smc_step` from the level at signal
    fraction ``rho_from`` down to ``rho_to``: propose by :func:`guided_proposal` with :math:`c =
    \sqrt{\rho_{k+1}/\rho_k}`, :math:`\lambda = 1 - c^2`, and weight by
    :func:`incremental_log_weight` (a NaN or :math:`+\infty` increment, from a proposal that
    overflowed, counts as :math:`-\infty`)."""
    c = torch.sqrt(rho_from / rho_to)
    lam = 1.0 - c**2

    def reweight(generator, particles, log_weights):
        old = _guided_state(particles)
        new = path.evaluate(guided_proposal(generator, old, c, lam), rho_to)
        incr = incremental_log_weight(old, new, c, lam)
        return _path_state(new), torch.nan_to_num(incr, nan=-math.inf, posinf=-math.inf)

    return reweight


def _init(generator, path: NoisedPath, n: int, rho, kernel: str, step_size, device) -> TemperedState:
    r"""``n`` reference draws :math:`\mathcal N(0, I)`, equally weighted at :math:`\beta = 0` of the
    noisiest level's path, with the initial step size (``step_size``, else the kernel's default)."""
    dtype = path.target.dtype
    x = torch.randn(n, path.dim, generator=generator, dtype=dtype, device=device)
    h0 = step_size if step_size else default_step_size("mala" if kernel == "local_mala" else kernel, path.dim)
    log_h = torch.tensor(math.log(h0), dtype=dtype, device=device)
    zero = torch.zeros((), dtype=dtype, device=device)
    weights = torch.zeros(n, dtype=dtype, device=device)
    return TemperedState(
        _StagePath(path, rho).evaluate(x), weights, zero, log_h, torch.arange(n, device=device), 0
    )


def _record(
    rec: dict[str, list], info: StageInfo, path: NoisedPath, rho: torch.Tensor, mix_rate, mix_best
) -> None:
    """Append one level's :data:`STAGE_KEYS` to ``rec`` (``decorrelation`` NaN where nothing moved).
    A particle is stuck where its local moves accept under :data:`STUCK_ACCEPTANCE` on average and
    no independence move (largest acceptance probability ``mix_best``, None without them) reaches it."""
    dtype, device = info.ess.dtype, info.ess.device
    stuck = info.acceptance < STUCK_ACCEPTANCE
    if mix_best is not None:
        stuck = stuck & (mix_best < STUCK_ACCEPTANCE)
    for key, val in (
        ("noise", 1 - rho),
        ("guidance_power", path.beta(rho)),
        ("ess", info.ess),
        ("cess", info.cess),
        ("log_z_increment", info.log_z_increment),
        ("num_moves", info.num_mcmc_steps),
        ("decorrelation", info.decorrelation if info.num_mcmc_steps else math.nan),
        ("acceptance_rate", info.acceptance_rate),
        ("stuck", stuck.to(dtype).mean()),
        ("step_size", info.step_size),
        ("resampled", info.resampled),
        ("mixture_acceptance", mix_rate),
    ):
        rec[key].append(torch.as_tensor(val, dtype=dtype, device=device))


def noised_smc(
    generator,
    path: NoisedPath,
    num_particles: int,
    *,
    num_steps: int = 64,
    num_mcmc_steps: int | None = 4,
    max_mcmc_steps: int = 20,
    kernel: str = "mala",
    within_modes: bool = True,
    resample_threshold: float = 0.5,
    resampling: str = "systematic",
    step_size: float | None = None,
    progress: bool = False,
    device=None,
    bar=None,
    mixture=None,
    num_mixture_moves: int = 0,
) -> NoisedSMCOutput:
    """Run the particle denoising diffusion sampler on ``path`` (module docstring). Progress goes to
    ``bar`` (one update per level) where given, else to a bar of its own when ``progress``. With a
    ``mixture`` (:mod:`~diffstat.diffusion.noised_smc_mixture`), ``num_mixture_moves`` independence
    moves from its noised form follow each level's moves."""
    rho = noise_schedule(num_steps, path.mode_scale_sq, dtype=path.target.dtype, device=device)
    state = _init(generator, path, num_particles, rho[-1], kernel, step_size, device)
    one = torch.ones_like(state.beta)
    local = kernel == "local_mala"
    moves = MoveConfig(
        local_mala_step if local else kernel,
        target_accept=MALA_TARGET_ACCEPT if local else None,
        num_mcmc_steps=num_mcmc_steps,
        max_mcmc_steps=max_mcmc_steps,
    )
    precondition = identity_metric if num_mcmc_steps == 0 else cloud_metric("auto", within_modes)
    rec: dict[str, list] = {k: [] for k in STAGE_KEYS}
    with (
        contextlib.nullcontext(bar)
        if bar is not None
        else progress_bar(num_steps + 1, "pdds", progress) as bar
    ):
        for k in range(num_steps, -1, -1):
            first = k == num_steps  # from the reference (beta = 0) to gamma_K (beta = 1)
            reweight = (
                tempered_reweight(state.beta, one) if first else guided_reweight(path, rho[k + 1], rho[k])
            )
            state, info = smc_step(
                generator,
                state,
                reweight,
                path=_StagePath(path, rho[k]),
                beta=one,
                moves=moves,
                precondition=precondition,
                stage=num_steps - k,
                resample_threshold=resample_threshold,
                scheme=resampling,
            )
            moved, rate, best = (
                independence_moves(
                    generator, state.particles, _StagePath(path, rho[k]), mixture, rho[k], num_mixture_moves
                )
                if num_mixture_moves
                else (state.particles, math.nan, None)
            )
            state = state._replace(particles=moved)
            _record(rec, info, path, rho[k], rate, best)
            bar.update(1)
    v, num_eves = genealogy_variance(state.log_weights, state.eve, state.num_resampling, resampling)
    gs = _guided_state(state.particles)
    gs = gs._replace(target_lp=path.target_lp(gs))
    stages = {key: torch.stack(vals) for key, vals in rec.items()}
    log_z = float(stages["log_z_increment"].sum())
    return NoisedSMCOutput(gs, state.log_weights, log_z, math.sqrt(v), stages, state.num_resampling, num_eves)


@register_sampler("pdds", typed_by=noised_smc)
def pdds_sampler(target, *, num_samples, num_chains, generator, progress, device, **options) -> SamplerResult:
    """``ds.sample(target, "pdds", num_samples=n, ...)``: the particle denoising diffusion sampler
    with ``n`` particles per run.

    Options: ``reference`` (where the pilot starts; default the target's, else N(0, I)),
    ``num_steps`` (64), ``num_mcmc_steps`` (4; None: until decorrelated), ``max_mcmc_steps`` (20),
    ``kernel`` (``"mala"``, ``"hmc"``, ``"local_mala"``), ``within_modes`` (True: the metric
    pooled within clusters of the particles), ``resample_threshold`` (0.5), ``resampling``
    (``"systematic"``), ``step_size`` (initial step, default the kernel's), ``mode_scale``
    (the power guidance's :math:`s`, default estimated), ``guidance`` (``"bank"``; ``"power"``,
    ``"simple"``, ``"laplace"``), ``whitening`` (``"pilot"``, ``"reference"`` or ``(mean, cov)``),
    ``pilot_chains`` (2048), ``pilot_steps`` (25), ``num_rounds`` (1; from 2, the guidance refined
    by a network fitted to the previous round, :mod:`diffstat.diffusion.noised_smc_learned`),
    ``population`` (None; ``"nuts"``: a Gaussian mixture fitted to NUTS draws guides the noisy
    levels and proposes independence moves, :mod:`diffstat.diffusion.noised_smc_mixture`) with
    ``population_size`` (4096), ``population_budget`` (140 evaluations per draw),
    ``mixture_components`` (8) and ``num_mixture_moves`` (1; with a population ``num_steps`` defaults
    to 128 and ``num_mcmc_steps`` to 1).
    ``num_chains`` (default 1) independent runs share the pilot; their evidence estimates are pooled
    and, from two runs on, their spread gives the standard error when it exceeds the genealogy's.
    The draws are the final particles resampled to equal weights.
    """
    check_options(options, OPTIONS, "pdds")
    num_chains = 1 if num_chains is None else num_chains
    if num_samples < 2:
        raise ValueError(f"pdds needs at least 2 particles, got {num_samples}")
    check_settings(options)
    population_defaults(options)
    num_rounds, levels = options.pop("num_rounds", 1), options.get("num_steps", 64) + 1
    path, attrs = setup_path(target, generator, device, options)
    path, mixture, mixture_moves, attrs_pop = population_path(target, generator, device, path, options)
    scheme = options.get("resampling", "systematic")
    draws, lps, log_ws, runs = [], [], [], []
    with progress_bar((num_chains + num_rounds - 1) * levels, "pdds", progress) as bar:
        run = functools.partial(
            noised_smc,
            generator,
            num_particles=num_samples,
            device=device,
            bar=bar,
            **options,
            mixture=mixture,
            num_mixture_moves=mixture_moves,
        )
        path, attrs_rounds = refine_path(generator, path, num_rounds, run)
        for _ in range(num_chains):  # each run resampled before the next starts
            out = run(path)
            idx = resample(generator, out.log_weights, scheme)
            draws.append(path.whitening.from_white(out.particles.x[idx]))
            lps.append(out.particles.target_lp[idx])
            log_ws.append(out.log_weights[idx])
            runs.append(out)
    log_z, se, se_method = pooled_log_z([r.log_normalizer for r in runs], [r.log_normalizer_se for r in runs])
    problems = reliability_problems(runs, log_z, stein=mixture is not None)
    if problems:
        warnings.warn(
            "pdds: the log Z estimate and its standard error are unreliable: "
            + "; ".join(problems)
            + " (raise num_samples, num_chains or num_mcmc_steps)",
            RuntimeWarning,
            stacklevel=3,
        )
    stages = stack_stages([{k: v for k, v in r.stages.items()} | {"beta": r.stages["noise"]} for r in runs])
    stages.pop("beta")
    attrs.update(
        {
            "log_normalizer": log_z,
            "log_normalizer_se": se,
            "log_normalizer_se_method": se_method,
            "num_stages": len(runs[0].stages["noise"]),
            "num_resampling": sum(r.num_resampling for r in runs),
            "num_eves": min(r.num_eves for r in runs),
            **attrs_rounds,
            **attrs_pop,
        }
    )
    sample_stats = {"lp": torch.stack(lps), "log_weight": torch.stack(log_ws)}
    return SamplerResult(torch.stack(draws), sample_stats, {"diffusion": stages}, attrs)
