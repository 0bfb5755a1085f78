r"""Walk-jump sampling (Saremi and Hyvarinen 2019), ``ds.sample(target, "walk_jump", ...)``.

Walk: Langevin dynamics on the smoothed density :math:`q_\sigma = p * \mathcal N(0, \sigma^2 I)`,
which is smoother (log-concave once :math:`\sigma^2` exceeds the squared diameter of the modes).
Jump: each saved walker :math:`y` is denoised by the empirical-Bayes estimator

.. math:: \hat x = y + \sigma^2 \nabla\log q_\sigma(y) = \mathbb E[X \mid Y = y].

The trade-off of the seeds: a small :math:`\sigma` keeps :math:`\hat x` close to a draw of
:math:`p` but the walk mixes slowly between modes; a large one mixes well but the jumps are
posterior means, shrunk toward each other (for a Gaussian mode of variance :math:`\tau^2`, the jumps
have variance :math:`\tau^4/(\tau^2+\sigma^2)`). ``benchmarks/bench_walk_jump_sigma.py`` sweeps it.
A learned score's network that failed its check and moves its walkers' spread at 1 hands the walk to
the score's kernel noise (:func:`~diffstat.smoothing.walk_jump_setup.kernel_noise`).

The walk is the BAOAB underdamped scheme (:func:`diffstat.mcmc.langevin.underdamped_step`, the
family of Sachs et al. 2017 used by the public code, whose defaults are :math:`\sigma = 1`, step
:math:`0.5\sigma`, friction 1) or ULA; when the smoothed log-density is known up to a constant
(``smoothed_log_prob=``), a Metropolis-adjusted walk (MALA on :math:`q_\sigma`) removes the
discretisation bias (:mod:`~diffstat.smoothing.walks`; its step size is tuned by the dual-averaging
runner that SMS's final correction also uses, :mod:`~diffstat.smoothing.adaptive_mala`).

Chains: a chain is an independent run of ``walkers_per_chain`` walkers :math:`W`, and its
``num_samples`` draws are their jumps in turn (draw :math:`j` is jump :math:`\lfloor j/W\rfloor` of
walker :math:`j \bmod W`), each walker jumped every ``thin`` steps after ``num_warmup`` steps; all
``num_chains * W`` walkers run in one batch and the draws are ``(num_chains, num_samples)``, as for
every method. With :math:`W = 1` (the default unless the score is learned) a chain is the classic
single walker, autocorrelated as an MCMC chain is. A walk at small :math:`\sigma` does not cross
between separated modes, so a chain of one walker holds one mode: with a learned score the walkers
start at draws of :math:`q_\sigma` with the population's mode weights and the default is :math:`W`
= ``num_samples``, one jump per walker, independent draws (as SMS's chains are), and the mode weights
come from where the walkers start, not from one walker crossing. Chains of one walker are Markov
chains and are diagnosed as MCMC chains (:mod:`~diffstat.diagnostics`: R-hat, bulk and tail ESS, stuck
and low-lp chains, on the draws and ``lp``), so chains that sit in different modes are called
unreliable; with :math:`W > 1` a chain interleaves walkers, whose draws R-hat and ESS do not describe.
Only a training-free score that
spends its evaluation budget ends the run early, with fewer draws per chain (``budget_hit`` in
attrs, and a warning).

The algorithm as steps: :func:`init` (walkers and their divergence marks), :func:`step` (one walk
step, with divergence checks) and :func:`jump` (the denoiser at the walkers); :func:`walk_jump` is
the driver.

Divergences: the walk is unadjusted, so an unstable step (a step too large for the curvature of
:math:`\log q_\sigma`, or a training-free score estimate that fails far in the tails, e.g. in the
neck of a funnel) sends a walker off. After each step a walker is divergent when its position or
score is not finite or its kinetic energy explodes (mean squared velocity per coordinate above
100, for a stationary value of 1; for ULA the squared drift over the noise variance); it is put
back at its last good point with a fresh velocity. A walker is also divergent when its
training-free (Laplace) score fails its own check at a step or a jump (importance ESS of the local
fits under 20%: p(x | y) is far from the Gaussian the estimate assumes and the score is biased, as
in a funnel's neck, where the estimate follows the joint mode, not the mass, and walkers drift
down the neck), or when its jump is not finite. From its first divergence after warm-up on, every
draw of that walker is marked in ``sample_stats["diverging"]``. A walker can also be lost without
a divergent step, drifting where the smoothed score no longer holds (a learned score beyond its
particles): a corrected draw whose log-density falls far below the target's own draws' (the held-out
particles of a score fitted in the run, else the run's other draws) is marked too
(:mod:`~diffstat.smoothing.walk_jump_checks`; ``num_low_log_prob`` and ``log_prob_floor`` in
attrs). The counts are in attrs and the ``walk_jump`` group, and a ``RuntimeWarning`` gives them by
reason: such draws are not to be trusted, and with a tenth of the draws or more marked it calls the
run as a whole unreliable.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import torch

from diffstat._util import progress_bar
from diffstat.sampling import SamplerResult, register_sampler
from diffstat.smoothing.correction import check_num_mala, correct_jumps
from diffstat.smoothing.learned import LearnedSmoothedScore
from diffstat.smoothing.scores import LaplaceSmoothedScore
from diffstat.smoothing.walk_jump_checks import divergence_message, draw_floor
from diffstat.smoothing.walk_jump_setup import (
    check_options,
    in_chains,
    initial_walkers,
    jump_schedule,
    kernel_noise,
    make_walk,
    resolve_provider,
    walk_sigma,
)
from diffstat.smoothing.walks import Walk

__all__ = ["walk_jump", "WalkJumpState", "WalkJumpInfo", "init", "step", "jump"]

#: A jump whose training-free score had an importance ESS fraction below this (about 1.6 of the 8
#: draws: the local Laplace fits do not describe p(x | y)) is marked divergent.
_MIN_FIT_ESS = 0.2

#: MALA steps on p(x | y) after each jump with a learned score (``num_mala``): 20 gave the target's
#: within-mode variance on the two-mode target (docs/sms.md); 30 are used by SMS, whose final noise is larger.
_LEARNED_MALA = 20


class WalkJumpState(NamedTuple):
    """The walkers between two steps.

    walk: the walk's state (:mod:`~diffstat.smoothing.walks`), positions ``(n, dim)``.
    suspect: (n,) bool, walkers that diverged after warm-up (their later draws are marked).
    num_div_steps: () tensor, walk steps that diverged so far.
    iteration: walk steps taken.
    """

    walk: Any
    suspect: torch.Tensor
    num_div_steps: torch.Tensor
    iteration: int


class WalkJumpInfo(NamedTuple):
    """One walk step: ``diverging (n,)`` (the walk step), ``bad_score (n,)`` (the training-free
    score failed its check), ``acceptance_rate (n,)`` and ``num_evals``, the target evaluations
    (those of a training-free score; 0 for a learned or exact one)."""

    diverging: torch.Tensor
    bad_score: torch.Tensor
    acceptance_rate: torch.Tensor
    num_evals: int


def _failed_check(provider, like: torch.Tensor) -> torch.Tensor:
    """``(n,)`` bool: the provider's last call failed its own check (Laplace fits' ESS fraction)."""
    fit_ess = provider.last_info.get("fit_ess") if provider is not None else None
    if fit_ess is not None and fit_ess.shape == like.shape:
        return fit_ess < _MIN_FIT_ESS
    return torch.zeros_like(like, dtype=torch.bool)


def init(generator: torch.Generator, walk: Walk, y: torch.Tensor) -> WalkJumpState:
    """Walkers at ``y: (n, dim)``, none suspect."""
    n = y.shape[0]
    suspect = torch.zeros(n, dtype=torch.bool, device=y.device)
    return WalkJumpState(walk.init(generator, y), suspect, torch.zeros((), dtype=torch.long), 0)


def step(
    generator: torch.Generator, state: WalkJumpState, walk: Walk, provider, num_warmup: int, target
) -> tuple[WalkJumpState, WalkJumpInfo]:
    """One walk step; after warm-up, a walker whose step diverged or whose score failed its check
    becomes suspect."""
    evals0 = target.num_target_evals
    walk_state, info = walk.step(generator, state.walk)
    bad = info.diverging
    bad_score = _failed_check(provider, bad)
    suspect = state.suspect | bad | bad_score if state.iteration >= num_warmup else state.suspect
    new = WalkJumpState(walk_state, suspect, state.num_div_steps + bad.sum(), state.iteration + 1)
    return new, WalkJumpInfo(bad, bad_score, info.acceptance_rate, target.num_target_evals - evals0)


def jump(
    state: WalkJumpState, walk: Walk, sigma: float, provider=None, score=None
) -> tuple[torch.Tensor, torch.Tensor, WalkJumpState]:
    r"""The empirical-Bayes jump :math:`\hat x = y + \sigma^2 \nabla\log q_\sigma(y)` at the walkers
    ``y``, with the walk's own gradient or ``score: (n, dim) -> (n, dim)`` when given (a Metropolis
    walk on ``smoothed_log_prob`` jumps with the provider's score when there is one). Returns
    ``(x (n, dim), y (n, dim), state)``, a walker whose jump is not finite or whose training-free
    score failed its check marked suspect."""
    y = walk.position(state.walk)
    g = walk.score(state.walk) if score is None else score(y)
    x = y + sigma**2 * g
    bad_jump = ~torch.isfinite(x).all(-1)
    bad_jump = bad_jump | _failed_check(provider, bad_jump)
    return x, y, state._replace(suspect=state.suspect | bad_jump)


class _Run(NamedTuple):
    """A driver's output: ``draws``, ``walkers`` and ``acceptance`` ``(n, k, ...)``, ``suspect (n, k)``,
    the ``walk_jump`` group's ``stats`` (one row per jump round), the final state and whether the
    budget ran out."""

    draws: torch.Tensor
    walkers: torch.Tensor
    acceptance: torch.Tensor
    suspect: torch.Tensor
    stats: dict
    state: WalkJumpState
    budget_hit: bool


#: The last line of the diagnostics' warning on chains of one walker each.
_ONE_WALKER_ADVICE = (
    "walk-jump: each chain is one walker, which stays in the mode it starts in unless sigma is comparable "
    "to the distance between modes; raise sigma, or use the learned score (the default), whose walkers "
    "start with the modes' weights."
)

_STATS = ("score_spread", "num_modes", "acceptance_rate", "num_target_evals", "num_divergent")


def _stats(provider, acceptance: torch.Tensor, num_evals: int, suspect: torch.Tensor) -> tuple:
    """One row of the ``walk_jump`` group, in the order of ``_STATS``."""
    info = provider.last_info if provider is not None else {}
    spread = float(info["spread"].mean()) if "spread" in info else 0.0
    modes = float(info["num_modes"].mean()) if "num_modes" in info else math.nan
    return spread, modes, float(acceptance.mean()), num_evals, float(suspect.sum())


def _run(generator, target, walk, y, provider, sigma, mala: bool, schedule, progress) -> _Run:
    """The driver: ``num_warmup + num_jumps * thin`` walk steps from ``y``, a jump every ``thin``
    steps after warm-up (a Metropolis walk jumps with the provider's score when there is one); a run
    whose training-free score spends ``max_evals_per_draw`` target evaluations per draw (None: no
    cap; a learned score, or none, is not capped) jumps once more and stops. ``schedule``:
    ``(num_warmup, num_jumps, thin, max_evals_per_draw)``."""
    jump_score = (lambda z: provider(z, sigma)) if mala and provider is not None else None
    num_warmup, num_samples, thin, max_evals_per_draw = schedule
    # a training-free estimator: the one kind of score that evaluates the target as the walk goes
    capped = provider is not None and provider.uses_target and not isinstance(provider, LearnedSmoothedScore)
    max_evals = max_evals_per_draw if capped else None
    budget = None if max_evals is None else max_evals * y.shape[0] * num_samples
    evals0 = target.num_target_evals
    state, total, rows = init(generator, walk, y), num_warmup + num_samples * thin, []
    bar = progress_bar(total, f"walk-jump (sigma={sigma:.3g})", progress)
    for i in range(total):
        state, _ = step(generator, state, walk, provider, num_warmup, target)
        bar.update(1)
        over = budget is not None and target.num_target_evals - evals0 > budget
        if (i >= num_warmup and (i - num_warmup + 1) % thin == 0) or over:
            x, yj, state = jump(state, walk, sigma, provider, jump_score)
            acc = walk.acceptance(state.walk)
            stats = _stats(provider, acc, target.num_target_evals - evals0, state.suspect)
            rows.append((x, yj, acc, state.suspect.clone(), stats))
        if over:
            warnings.warn(
                f"walk-jump: the training-free smoothed score ({type(provider).__name__}) spent its "
                f"budget of {max_evals:g} target evaluations per draw after {i + 1} of {total} walk steps; "
                f"the run ends with {len(rows)} of {num_samples} jumps per walker. Use the learned score "
                "(the default) or raise max_evals_per_draw.",
                RuntimeWarning,
                stacklevel=3,
            )
            break
    bar.close()
    x, yj, acc, suspect, stats = zip(*rows)
    columns = {k: list(v) for k, v in zip(_STATS, zip(*stats))}
    stack = (torch.stack(t, 1) for t in (x, yj, acc, suspect))
    return _Run(*stack, columns, state, bool(over))


def _walk(generator, target, provider, init_x, sigma: float, rule: str, setup: tuple, schedule: tuple):
    """The walkers at ``sigma`` (:func:`~diffstat.smoothing.walk_jump_setup.initial_walkers`), walked and
    jumped (:func:`_run`); under the rule ``"check"`` once more at the score's kernel noise when the walk
    moved their spread (:func:`~diffstat.smoothing.walk_jump_setup.kernel_noise`). ``setup``: ``((num_chains,
    W), (walk, smoothed_log_prob, step_size, friction), score_attrs, device, progress)``. Returns ``(walk
    kernel, run, sigma, rule)``."""
    shape, (walk, log_q, step_size, friction), score_attrs, device, progress = setup
    y = initial_walkers(target, provider, init_x, shape, sigma, generator, device)
    kernel = make_walk(walk, provider, log_q, sigma, step_size, friction, schedule[0])
    run = _run(generator, target, kernel, y, provider, sigma, walk == "mala", schedule, progress)
    if rule == "check":
        sigma, rule = kernel_noise(provider, score_attrs, y, run.walkers)
        if rule == "kernel":
            return _walk(generator, target, provider, init_x, sigma, rule, setup, schedule)
    return kernel, run, sigma, rule


@register_sampler("walk_jump")
def walk_jump(
    target,
    *,
    num_samples: int,
    num_chains: int | None = None,
    generator: torch.Generator,
    progress: bool = False,
    device=None,
    sigma: float | None = None,
    smoothed_score=None,
    estimator: str = "auto",
    estimator_options: dict | None = None,
    smoothed_log_prob=None,
    walk: str | None = None,
    step_size: float = 0.5,
    friction: float = 1.0,
    num_warmup: int | None = None,
    thin: int = 1,
    init=None,
    num_mala: int | None = None,
    max_evals_per_draw: float | None = 1e4,
    walkers_per_chain: int | None = None,
) -> SamplerResult:
    r"""Walk-jump sampling: ``num_chains`` independent chains (default 4) of ``num_samples`` jumps, each
    chain ``walkers_per_chain`` walkers (module doc).

    Parameters
    ----------
    sigma, smoothed_score, estimator, estimator_options : float; as for SMS
        Noise of :math:`q_\sigma`, default 1 or more (:func:`.walk_jump_setup.walk_sigma`); score as SMS's.
    smoothed_log_prob : callable, optional
        ``(y, sigma) -> log q_sigma(y) + const``, ``(n,)``, differentiable; enables the
        Metropolis-adjusted walk (``walk="mala"``, the default when it is given).
    walk, step_size, friction : ``"underdamped"`` (default), ``"ula"`` or ``"mala"``; floats
        Underdamped: step ``step_size * sigma``, friction ``friction / sigma`` (public defaults 0.5
        and 1 at sigma = 1). ULA: step ``step_size * 0.1 * sigma**2``. MALA: dual averaging in warm-up.
    num_warmup, thin : int
        Walk steps before the first jump (default ``max(J, 100)``, ``J`` the jumps per walker,
        ``ceil(num_samples / walkers_per_chain)``) and between jumps (1).
    init : (num_chains, dim) or (dim,), optional
        Starting walkers; default: a learned score's kept particles (with replacement), else reference
        draws, plus :math:`\sigma` noise (with a learned score: draws of :math:`q_\sigma`, module doc).
    num_mala : int, optional
        MALA steps on :math:`p(x\mid y)` from each jump (:mod:`~diffstat.smoothing.correction`: a draw of
        :math:`p` instead of the posterior mean). Default 20 with a learned score (its within-mode shape
        is approximate; the target's is restored at 21 evaluations per draw, the steps preconditioned by
        the score's Fisher information), else 0 (the classic jump).
    max_evals_per_draw : float or None
        Budget of a training-free estimator in target evaluations per requested draw (default 1e4; None:
        no cap): once spent, the walk stops with the draws made so far and a ``RuntimeWarning``.
    walkers_per_chain : int, optional
        Walkers whose jumps, taken in turn, make a chain's draws. Default ``num_samples`` with a learned
        score and no ``init`` (one jump per walker: independent draws whose mode weights are the
        population's, module doc), else 1 (one walker per chain, the classic walk-jump).

    Returns draws ``(num_chains, num_samples, dim)`` (fewer per chain only when the budget runs out), ``lp``,
    ``acceptance_rate``, ``diverging`` in sample_stats, the ``walk_jump`` group (a row per jump round);
    attrs include ``num_divergent``, ``num_low_log_prob`` (of them, marked for their log-density) and
    ``log_prob_floor`` (NaN when ``num_mala`` is 0: uncorrected jumps are not held to it).
    """
    num_chains = 4 if num_chains is None else num_chains
    sigma, walk, thin, num_warmup, init = check_options(
        target, (num_chains, num_samples, walkers_per_chain), device, sigma, walk, smoothed_log_prob, thin,
        num_warmup, step_size, friction, init,
    )  # fmt: skip
    provider, score_attrs, rejected = resolve_provider(
        target, smoothed_score, estimator, estimator_options, walk, generator
    )
    sigma, sigma_rule = walk_sigma(sigma, provider, score_attrs, init)
    learned = isinstance(provider, LearnedSmoothedScore)
    num_mala = check_num_mala(num_mala, _LEARNED_MALA if learned else 0)
    walkers, num_jumps, num_warmup = jump_schedule(num_samples, walkers_per_chain, num_warmup, learned, init)
    setup = ((num_chains, walkers), (walk, smoothed_log_prob, step_size, friction), score_attrs,
             device, progress)  # fmt: skip
    schedule = (num_warmup, num_jumps, thin, max_evals_per_draw)
    kernel, run, sigma, rule = _walk(generator, target, provider, init, sigma, sigma_rule, setup, schedule)
    run = in_chains(run, num_chains, walkers, num_samples)
    attrs = {"walk": walk, "walk_step_size": kernel.step_size(run.state.walk), "num_mala": num_mala,
             "walkers_per_chain": walkers, "sigma_rule": rule}  # fmt: skip
    return _result(generator, target, run, provider, sigma, rejected, attrs, score_attrs)


def _result(generator, target, run: _Run, provider, sigma, rejected, attrs, score_attrs) -> SamplerResult:
    """The jumps of ``run`` (in chains) corrected by ``attrs["num_mala"]`` MALA steps on p(x | y)
    (:func:`~diffstat.smoothing.correction.correct_jumps`, preconditioned by a learned score's Fisher
    information), with their divergence marks (the walk's, a non-finite log-density, and one below
    :func:`~diffstat.smoothing.walk_jump_checks.draw_floor`) and warning, and the attrs: the run's
    ``attrs``, the correction's step size, then ``score_attrs`` (the learned score's report)."""
    learned = isinstance(provider, LearnedSmoothedScore)
    fisher = provider.fisher_information() if learned else None  # the correction's preconditioner
    x, lp, h_corr = correct_jumps(
        generator, target, run.draws, run.walkers, sigma**2, attrs["num_mala"], fisher
    )
    attrs = dict(attrs, mala_step_size=h_corr, **score_attrs)
    walk_marks = run.suspect | ~torch.isfinite(lp)
    # a kept score's held-out log-densities may differ from this target's by a constant (its check allows one)
    held = provider.particles.get("held_lp") if attrs.get("score_fitted_here") else None
    floor, reference = draw_floor(lp, walk_marks, attrs["num_mala"], held)
    low = (lp < floor) & ~walk_marks & (not rejected)  # a rejected score's particles are another target's
    diverging = walk_marks | low | rejected
    num_div, num_div_steps = int(diverging.sum()), int(run.state.num_div_steps)
    if num_div:
        n = diverging.numel()
        counts = (int(walk_marks.sum()), int(low.sum()), num_div_steps)
        warnings.warn(
            divergence_message(num_div, n, counts, floor, reference, rejected),
            RuntimeWarning,
            stacklevel=3,
        )
    attrs = {
        "sigma": sigma,
        "num_divergent": num_div,
        "num_divergent_steps": num_div_steps,
        "num_low_log_prob": int(low.sum()),
        "log_prob_floor": floor,
        "smoothed_score": type(provider).__name__ if provider is not None else "grad smoothed_log_prob",
        "budget_hit": run.budget_hit,
        "correction_evals": int(diverging.numel() * (attrs["num_mala"] + 1)),
        **attrs,
    }
    if isinstance(provider, LaplaceSmoothedScore):
        attrs["num_hessian_evals"] = int(provider.num_hessian_evals)
        attrs["mode_bank_size"] = len(provider.bank)
    return SamplerResult(
        draws=x,
        sample_stats={"lp": lp, "acceptance_rate": run.acceptance, "diverging": diverging},
        groups={"walk_jump": {k: torch.tensor(v, dtype=torch.float64) for k, v in run.stats.items()}},
        attrs=attrs,
        diagnose=attrs["walkers_per_chain"] == 1,
        diagnose_stats=("lp", "acceptance_rate"),  # its marks are warned about above
        diagnose_advice=_ONE_WALKER_ADVICE,
    )
