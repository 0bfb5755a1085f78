r"""Parallel tempering (replica exchange): ``ds.sample(target, "pt", ...)``.

Each of ``num_chains`` independent runs holds :math:`R` replicas at inverse temperatures
:math:`0 = \beta_0 < \beta_1 < \dots < \beta_{R-1} = 1` on the geometric path
(:mod:`diffstat.tempering.path`); all :math:`C R` replicas move in one batch. One iteration:

1. **Local moves.** ``num_mcmc_steps`` MALA (or HMC, RWM) steps per replica, with one step size and
   one preconditioner per temperature: the replicas' covariance at that temperature (dense up to
   ``dim = 200``, as MCMC's metric, else diagonal), re-estimated at the ends of warm-up rounds.
   The :math:`\beta_0 = 0` replica is the reference
   itself and gets a fresh exact draw instead (``reference_draws``; Syed et al. 2021).
2. **Swaps**, deterministic even-odd (DEO): at even iterations the pairs :math:`(0,1), (2,3),
   \dots`, at odd ones :math:`(1,2), (3,4), \dots` propose to exchange states, accepted with
   probability :math:`\min\{1, \exp[(\beta_{r+1} - \beta_r)(\delta(x_r) - \delta(x_{r+1}))]\}`,
   :math:`\delta = \log\tilde\pi - \log\rho` (the reference terms cancel). The alternation makes
   the index process non-reversible, so states cross the ladder in :math:`O(R)` rather than
   :math:`O(R^2)` iterations (Okabe et al. 2001; Syed, Bouchard-Cote, Deligiannidis and Doucet 2021).

**Ladder adaptation** (warm-up). With :math:`r_i` the mean rejection probability of the pair
:math:`(i, i+1)` over a round, the communication barrier :math:`\Lambda(\beta_k) = \sum_{i<k} r_i`
is interpolated linearly and the new ladder equalises it, :math:`\beta_k = \Lambda^{-1}(k\,\Lambda(1)
/ (R-1))` (Syed et al. 2021, algorithm 4): the optimal swap rates are equal. Rounds double in length
(the last ladder update halfway through warm-up); step sizes (dual averaging per temperature) and
preconditioners (per-temperature variances) are carried to the new ladder by interpolation in
:math:`\beta` and tuned again. :math:`\Lambda = \Lambda(1)` (``global_barrier``) is reported;
Syed et al. suggest about :math:`2\Lambda` temperatures.

**Evidence** by stepping stones over the ladder (Xie et al. 2011), from the post-warm-up states:
:math:`\log\hat Z = \sum_{r} \log \overline{\exp\{(\beta_{r+1}-\beta_r)\,\delta(x_r)\}}`,
pooled over chains; its standard error is that of an MCMC mean (delta method; the multi-chain
ESS of split chains, so the chains' autocorrelation and disagreement count), or the spread of the
per-chain estimates over :math:`\sqrt C` where larger (:func:`~diffstat.tempering.pt_phases.stepping_stones`).
A ``RuntimeWarning`` (and ``log_normalizer_reliable`` False) says when the chains' estimates
disagree beyond their own errors or a pair's weights are heavy-tailed. The draws are the cold
replicas' states after warm-up.

**Diagnosis.** The ``C`` runs are independent, so their cold chains are diagnosed as MCMC chains
(:func:`diffstat.diagnostics.mcmc_diagnostics`: R-hat, bulk and tail ESS, stuck chains, the lp
gap, divergences of the cold chain's moves): runs that sit in different modes because the swaps
cannot carry states between them disagree, and R-hat says so. ``sample_stats`` hold, per draw, the
cold replica's local acceptance probability (``acceptance_rate``, what the stuck-chain rule reads),
whether one of its moves diverged, and the acceptance probability of the swap between the two
coldest replicas (``swap_acceptance``, NaN at the iterations whose DEO parity does not propose it).

**Dense moves**: all temperatures' factors in one product (:func:`~diffstat.tempering.moves.whitened_move`).

Here are the state, one iteration (:func:`pt_step`), the run and the front door; the loops of the
warm-up and recorded phases, with the evidence, are in :mod:`diffstat.tempering.pt_phases`.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import NamedTuple

import torch

from diffstat._util import (
    check_nonnegative_int,
    check_options,
    check_positive_int,
    check_probability,
    progress_bar,
)
from diffstat.mcmc.adaptation import AUTO_DENSE_MAX_DIM as DENSE_MAX_DIM
from diffstat.mcmc.adaptation import DualAveraging
from diffstat.sampling import SamplerResult, register_sampler
from diffstat.tempering.auto_reference import reference_attrs
from diffstat.tempering.path import (
    GeometricPath,
    PathState,
    default_step_size,
    get_kernel,
    make_path,
    move,
)
from diffstat.tempering.mode_check import after_checks, pop_check_modes
from diffstat.tempering.core import check_initial, initial_particles
from diffstat.tempering.ladder import (
    BETA_MIN,
    check_ladder,
    equalize_ladder,
    geometric_ladder,
    swap_step,
    with_factors,
)
from diffstat.tempering.moves import whitened_move
from diffstat.tempering.pt_phases import PTOutput, evidence_problems, record, warmup

__all__ = [
    "PTOutput",
    "parallel_tempering",
    "whitened_move",
    "geometric_ladder",
    "equalize_ladder",
    "swap_step",
    "pt_sampler",
]


def _scatter(ps: PathState, rows: torch.Tensor, sub: PathState) -> PathState:
    return PathState(*(t.index_copy(0, rows, s) for t, s in zip(ps, sub)))


class PTState(NamedTuple):
    """``C`` runs of ``R`` replicas: ``particles`` (``C R`` rows, replica ``t`` of run ``c`` at row
    ``c R + t``), the ladder ``betas: (R,)``, per-temperature ``step_size: (R,)`` and diagonal
    ``inv_mass: (R, dim)`` or dense ``(R, dim, dim)`` (or None); for a dense one its lower Cholesky
    factors ``chol: (R, dim, dim)``, computed once per warm-up round."""

    particles: PathState
    betas: torch.Tensor
    step_size: torch.Tensor
    inv_mass: torch.Tensor | None
    chol: torch.Tensor | None = None


class PTInfo(NamedTuple):
    """One iteration: each replica's local acceptance and whether one of its moves diverged ``(C R,)``
    (1 and False for exact reference draws), the swap probabilities ``(C, R-1)`` (0 for pairs not
    proposed) and the proposed pairs ``(R-1,)``."""

    acceptance: torch.Tensor
    diverging: torch.Tensor
    swap_prob: torch.Tensor
    proposed: torch.Tensor


class _Layout(NamedTuple):
    """Which rows hold which temperature: ``temp_of_row (C R,)``, the rows refreshed by exact
    reference draws, those moved by MCMC, the cold rows ``(C,)``, and ``C``."""

    temp_of_row: torch.Tensor
    ref_rows: torch.Tensor
    mcmc_rows: torch.Tensor
    cold_rows: torch.Tensor
    num_chains: int


def _layout(c: int, r: int, exact: bool, device) -> _Layout:
    temp_of_row = torch.arange(r, device=device).repeat(c)
    none = torch.empty(0, dtype=torch.long, device=device)
    ref_rows = torch.nonzero(temp_of_row == 0).flatten() if exact else none
    mcmc_rows = torch.nonzero(temp_of_row > 0 if exact else temp_of_row >= 0).flatten()
    return _Layout(temp_of_row, ref_rows, mcmc_rows, torch.arange(c, device=device) * r + (r - 1), c)


def pt_step(
    generator: torch.Generator,
    state: PTState,
    parity: int,
    *,
    path: GeometricPath,
    layout: _Layout,
    kernel,
    num_mcmc_steps: int,
    reference_x: torch.Tensor | None = None,
) -> tuple[PTState, PTInfo]:
    """One PT iteration: fresh reference draws ``reference_x: (C, dim)`` at the ``beta = 0`` rows
    (if any), ``num_mcmc_steps`` local moves of the other replicas, then the DEO swaps of parity
    ``parity`` (module docstring)."""
    ps, betas = state.particles, state.betas
    acc = torch.ones(ps.x.shape[0], dtype=ps.x.dtype, device=ps.x.device)
    diverging = torch.zeros(ps.x.shape[0], dtype=torch.bool, device=ps.x.device)
    if reference_x is not None:
        ps = _scatter(ps, layout.ref_rows, path.evaluate(reference_x))
    rows = layout.mcmc_rows
    sub, t_sub = ps.index(rows), layout.temp_of_row[rows]
    beta, h = betas[t_sub], state.step_size[t_sub]
    sub_acc = torch.zeros(len(rows), dtype=acc.dtype, device=acc.device)
    sub_div = torch.zeros(len(rows), dtype=torch.bool, device=acc.device)
    # every run's rows hold the same temperatures in the same order: the first run's factors (R', dim, dim)
    chol = state.chol[t_sub[: len(rows) // layout.num_chains]] if state.chol is not None else None
    inv_mass = None if state.inv_mass is None or chol is not None else state.inv_mass[t_sub]
    for _ in range(num_mcmc_steps):
        if chol is not None:
            sub, info = whitened_move(kernel, generator, sub, path, beta, h, chol)
        else:
            sub, info = move(kernel, generator, sub, path, beta, h, inv_mass)
        sub_acc, sub_div = sub_acc + info.acceptance_rate / num_mcmc_steps, sub_div | info.diverging
    if num_mcmc_steps:
        ps, acc = _scatter(ps, rows, sub), acc.index_copy(0, rows, sub_acc)
        diverging = diverging.index_copy(0, rows, sub_div)
    r = betas.numel()
    prob = torch.zeros(layout.num_chains, r - 1, dtype=acc.dtype, device=acc.device)
    proposed = torch.zeros(r - 1, dtype=torch.bool, device=acc.device)
    if r > 1:
        ps, prob, proposed = swap_step(generator, ps, betas, layout.num_chains, parity)
    return state._replace(particles=ps), PTInfo(acc, diverging, prob, proposed)


#: The settings of :func:`parallel_tempering` that :func:`check_settings` checks, in its order.
_CHECKED_SETTINGS = (
    "num_warmup",
    "num_temperatures",
    "betas",
    "beta_min",
    "kernel",
    "num_leapfrog",
    "step_size",
    "target_accept",
)


def check_settings(
    num_samples,
    num_warmup,
    num_temperatures,
    betas,
    beta_min,
    kernel,
    num_leapfrog,
    step_size,
    target_accept,
    *,
    dtype=torch.float64,
    device=None,
) -> tuple[torch.Tensor, int, float]:
    """``(betas (R,), num_warmup, target_accept)`` checked and resolved from PT's settings, or a
    ``ValueError`` naming the bad one: no target evaluation is needed, so ``ds.sample`` checks
    them before it draws the starting points."""
    betas = check_ladder(betas, num_temperatures, beta_min, dtype, device)
    num_samples = check_positive_int(num_samples, "num_samples")
    num_warmup = check_nonnegative_int(num_samples if num_warmup is None else num_warmup, "num_warmup")
    if target_accept is None:
        target_accept = get_kernel(kernel, num_leapfrog)[1]  # also refuses an unknown kernel
    else:
        get_kernel(kernel, num_leapfrog)
    target_accept = check_probability(target_accept, "target_accept")
    if step_size is not None and not float(step_size) > 0:
        raise ValueError(f"step_size must be positive, got {step_size}")
    return betas, int(num_warmup), target_accept


def parallel_tempering(
    generator: torch.Generator,
    path: GeometricPath,
    x0: torch.Tensor,
    num_chains: int,
    *,
    num_samples: int,
    num_warmup: int | None = None,
    num_temperatures: int = 10,
    betas=None,
    beta_min: float = BETA_MIN,
    adapt_ladder: bool = True,
    kernel: str = "mala",
    num_mcmc_steps: int = 1,
    num_leapfrog: int = 5,
    step_size: float | None = None,
    target_accept: float | None = None,
    adapt_mass: bool = True,
    reference_draws: bool = True,
    progress: bool = False,
) -> PTOutput:
    """Run ``num_chains`` PT runs of ``R`` replicas from ``x0: (num_chains * R, dim)`` (see the
    module docstring); ``num_warmup`` (default ``num_samples``) iterations of adaptation, then
    ``num_samples`` recorded iterations. ``betas`` (increasing, from 0 to 1) sets the initial
    ladder, otherwise :func:`geometric_ladder`."""
    dtype, device = x0.dtype, x0.device
    betas, num_warmup, target_accept = check_settings(
        num_samples, num_warmup, num_temperatures, betas, beta_min, kernel, num_leapfrog, step_size,
        target_accept, dtype=dtype, device=device,
    )  # fmt: skip
    r, c = betas.numel(), check_positive_int(num_chains, "num_chains")
    if x0.shape[0] != c * r:
        raise ValueError(f"x0 must hold num_chains * num_temperatures = {c * r} points, got {x0.shape[0]}")
    step = get_kernel(kernel, num_leapfrog)[0]
    h0 = default_step_size(kernel, path.dim) if step_size is None else float(step_size)
    ps = path.evaluate(x0)
    check_initial(ps)
    exact = reference_draws and float(betas[0]) == 0.0
    layout = _layout(c, r, exact, device)
    # The reference's scale sets the first preconditioner (a wide reference, a narrow target).
    inv_mass = torch.var_mean(ps.x, 0)[0].clamp_min(1e-12).expand(r, -1).clone() if adapt_mass else None
    if inv_mass is not None and path.dim <= DENSE_MAX_DIM:  # dense per temperature, as MCMC's metric
        inv_mass = torch.diag_embed(inv_mass)
    adapt = DualAveraging(torch.full((r,), h0, dtype=dtype, device=device), target_accept)
    state = with_factors(PTState(ps, betas, adapt.step_size, inv_mass))
    step_fn = functools.partial(pt_step, path=path, layout=layout, kernel=step, num_mcmc_steps=num_mcmc_steps)
    with progress_bar(num_warmup + num_samples, "pt warm-up", progress) as bar:
        adapt_what = (adapt_ladder, adapt_mass)
        state, block = warmup(
            generator, state, step_fn, adapt, num_warmup, adapt_what, exact, path, layout, bar
        )
        bar.set_description("pt")
        return record(generator, state, step_fn, num_samples, num_warmup, (exact, block), path, layout, bar)


#: The options of ``ds.sample(target, "pt", ...)``: the reference, and the keywords of
#: :func:`parallel_tempering` that the front door does not set itself.
_OPTIONS = {"reference", "check_modes"} | {
    name
    for name, p in inspect.signature(parallel_tempering).parameters.items()
    if p.kind is p.KEYWORD_ONLY and name not in ("num_samples", "progress")
}


@register_sampler("pt", typed_by=parallel_tempering)
def pt_sampler(target, *, num_samples, num_chains, generator, progress, device, **options) -> SamplerResult:
    """``ds.sample(target, "pt", num_samples=T, num_chains=C, ...)``: ``C`` (default 4) independent
    parallel-tempering runs batched together; ``T`` draws each from the cold replica, diagnosed as
    ``C`` MCMC chains (module docstring).

    Options (see :func:`parallel_tempering`): ``reference``, ``num_warmup`` (``T``),
    ``num_temperatures`` (10), ``betas``, ``beta_min`` (1e-3), ``adapt_ladder`` (True), ``kernel``
    (``"mala"``), ``num_mcmc_steps`` (1), ``num_leapfrog`` (5), ``step_size``, ``target_accept``,
    ``adapt_mass`` (True), ``reference_draws`` (True); ``check_modes`` (True): after the run, look for
    modes that it missed (:mod:`diffstat.tempering.mode_check`).
    """
    check_options(options, _OPTIONS, "pt")
    check_modes = pop_check_modes(options)
    evals0 = target.num_target_evals
    num_chains = 4 if num_chains is None else num_chains
    path = make_path(target, options.pop("reference", None))
    defaults = inspect.signature(parallel_tempering).parameters  # the run's own defaults, stated once
    settings = [options.get(name, defaults[name].default) for name in _CHECKED_SETTINGS]
    betas = check_settings(num_samples, *settings)[0]
    x0 = initial_particles(path, num_chains * betas.numel(), generator, device)
    out = parallel_tempering(
        generator, path, x0, num_chains, num_samples=num_samples, progress=progress, **options
    )
    sample_stats = {
        "lp": out.lp,
        "acceptance_rate": out.acceptance,
        "diverging": out.diverging,
        "swap_acceptance": out.swap_acceptance,
    }
    attrs = {
        "log_normalizer": out.log_normalizer,
        "log_normalizer_se": out.log_normalizer_se,
        "log_normalizer_agreement_p": out.evidence.agreement_p,
        "log_normalizer_pareto_k": out.evidence.pareto_k,
        "log_normalizer_reliable": not evidence_problems(out.evidence),
        "num_stages": int(out.temperatures["beta"].numel()),
        "global_barrier": out.global_barrier,
        "num_warmup": num_samples if options.get("num_warmup") is None else int(options["num_warmup"]),
        "path": path.kind,
        **reference_attrs(path),
    }
    if problems := evidence_problems(out.evidence):
        warnings.warn(problems, RuntimeWarning, stacklevel=3)
    attrs.update(
        after_checks(
            "PT", check_modes, target, path, out.draws, out.log_normalizer, generator, device, evals0
        )
    )
    return SamplerResult(out.draws, sample_stats, {"tempering": out.temperatures}, attrs, diagnose=True)
