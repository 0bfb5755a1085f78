r"""Walk-jump sampling (Saremi and Hyvarinen 2019), ``ds.sample(target, "walk_jump", ...)``.

Walk: Langevin dynamics on the smoothed density :math:`q_\sigma = p * \mathcal N(0, \sigma^2 I)`,
which is smoother (log-concave once :math:`\sigma^2` exceeds the squared diameter of the modes).
Jump: each saved walker :math:`y` is denoised by the empirical-Bayes estimator

.. math:: \hat x = y + \sigma^2 \nabla\log q_\sigma(y) = \mathbb E[X \mid Y = y].

The trade-off of the seeds: a small :math:`\sigma` keeps :math:`\hat x` close to a draw of
:math:`p` but the walk mixes slowly between modes; a large one mixes well but the jumps are
posterior means, shrunk toward each other (for a Gaussian mode of variance :math:`\tau^2`, the jumps
have variance :math:`\tau^4/(\tau^2+\sigma^2)`). ``benchmarks/bench_walk_jump_sigma.py`` sweeps it.

The walk is the BAOAB underdamped scheme (:func:`diffstat.mcmc.langevin.underdamped_step`, the
family of Sachs et al. 2017 used by the public code, whose defaults are :math:`\sigma = 1`, step
:math:`0.5\sigma`, friction 1) or ULA; when the smoothed log-density is known up to a constant
(``smoothed_log_prob=``), a Metropolis-adjusted walk (MALA on :math:`q_\sigma`) removes the
discretisation bias. The draws are ``num_chains`` walkers in one batch, jumped every ``thin``
steps after ``num_warmup`` steps.

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
draw of that walker is marked in ``sample_stats["diverging"]``, the counts are in attrs and the
``walk_jump`` group, and a ``RuntimeWarning`` says so: such draws are not to be trusted.
"""

from __future__ import annotations

import math
import warnings

import torch

from diffstat._util import check_positive_int, progress_bar
from diffstat.mcmc.adaptation import DualAveraging
from diffstat.mcmc.base import MCMCState
from diffstat.mcmc.langevin import ula_step, underdamped_init, underdamped_step
from diffstat.mcmc.mala import MALA_TARGET_ACCEPT, mala_step
from diffstat.sampling import SamplerResult, register_sampler
from diffstat.smoothing.correction import posterior_mala
from diffstat.smoothing.fit import learned_score_report
from diffstat.smoothing.learned import LearnedSmoothedScore
from diffstat.smoothing.scores import LaplaceSmoothedScore, SmoothedScore, resolve_smoothed_score

__all__ = ["walk_jump"]


def _smoothed_log_prob_and_grad(smoothed_log_prob, sigma):
    def fn(y):
        with torch.enable_grad():
            yg = y.detach().requires_grad_(True)
            lq = smoothed_log_prob(yg, sigma)
            (g,) = torch.autograd.grad(lq.sum(), yg)
        return lq.detach(), g.detach()

    return fn


#: A walker whose mean squared velocity per coordinate (underdamped; stationary value 1) or whose
#: squared drift over the noise variance per coordinate (ULA) exceeds this has diverged.
_DIVERGENCE_ENERGY = 100.0


#: A jump whose training-free score had an importance ESS fraction below this (about 1.6 of the 8
#: draws: the local Laplace fits do not describe p(x | y)) is marked divergent.
_MIN_FIT_ESS = 0.2


def _divergent(x: torch.Tensor, grad: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """``(n,)`` bool: a walker that left the finite numbers or whose ``energy`` exploded."""
    return ~torch.isfinite(x).all(-1) | ~torch.isfinite(grad).all(-1) | ~(energy <= _DIVERGENCE_ENERGY)


#: MALA steps on p(x | y) after each jump with a learned score (``num_mala``): 20 gave the target's
#: within-mode variance on the two-mode target (docs/sms.md); 30 are used by SMS, whose final noise is larger.
_LEARNED_MALA = 20


def _correct(generator, target, x, y, sigma: float, num_mala: int):
    """The final correction of every jump ``x: (chains, draws, d)`` at its walker ``y``: ``num_mala``
    MALA steps on p(x | y) (none: the jumps themselves). Returns ``(x, lp (chains, draws), step)``."""
    shape = x.shape
    flat, yf = x.reshape(-1, shape[-1]), y.reshape(-1, shape[-1])
    if num_mala == 0:
        return x, target.log_prob(flat).detach().reshape(shape[:2]), math.nan
    ok = torch.isfinite(flat).all(-1)
    flat = torch.where(ok[:, None], flat, yf)
    out, lp, _, h, _ = posterior_mala(generator, target, flat, yf, sigma**2, num_mala)
    out = torch.where(ok[:, None], out, torch.full_like(out, math.nan))
    lp = torch.where(ok, lp.detach(), torch.full_like(lp, math.nan))
    return out.reshape(shape), lp.reshape(shape[:2]), h


@register_sampler("walk_jump")
def walk_jump(
    target,
    *,
    num_samples: int,
    num_chains: int | None = None,
    generator: torch.Generator,
    progress: bool = False,
    device=None,
    sigma: float = 1.0,
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
) -> SamplerResult:
    r"""Walk-jump sampling: ``num_chains`` walkers, ``num_samples`` jumps each.

    Parameters
    ----------
    sigma : float
        Noise level of :math:`q_\sigma` (default 1, the public code's).
    smoothed_score, estimator, estimator_options :
        The smoothed score, as for SMS (:func:`diffstat.smoothing.scores.resolve_smoothed_score`).
    smoothed_log_prob : callable, optional
        ``(y, sigma) -> log q_sigma(y) + const``, ``(n,)``, differentiable; enables the
        Metropolis-adjusted walk (``walk="mala"``, the default when it is given).
    walk : ``"underdamped"`` (default), ``"ula"`` or ``"mala"``
    step_size, friction : float
        Underdamped: step ``step_size * sigma``, friction ``friction / sigma`` (public defaults 0.5
        and 1 at sigma = 1). ULA: step ``step_size * 0.1 * sigma**2``. MALA: tuned by dual averaging
        during warm-up.
    num_warmup : int, optional
        Walk steps before the first jump (default ``max(num_samples, 100)``).
    thin : int
        Walk steps between jumps.
    init : (num_chains, dim) or (dim,), optional
        Starting walkers; default: with a learned score, its kept particles (drawn with replacement)
        plus :math:`\sigma` noise, i.e. draws of :math:`q_\sigma` with the population's mode weights
        (the walk need not cross between modes); else reference draws plus :math:`\sigma` noise.
    num_mala : int, optional
        MALA steps on :math:`p(x\mid y)` from each jump (:mod:`~diffstat.smoothing.correction`: a draw of
        :math:`p` instead of the posterior mean). Default 20 with a learned score (its within-mode shape
        is approximate; the target's is restored at 21 evaluations per draw), else 0 (the classic jump).
    max_evals_per_draw : float or None
        Budget of a training-free estimator in target evaluations per requested draw (default 1e4):
        once spent, the walk stops with the draws made so far (at least one jump per walker) and a
        ``RuntimeWarning`` says so. None: no cap.
    """
    num_chains = 4 if num_chains is None else num_chains
    d = target.dim
    sigma = float(sigma)
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    walk = ("mala" if smoothed_log_prob is not None else "underdamped") if walk is None else walk
    if walk not in ("underdamped", "ula", "mala"):
        raise ValueError(f"walk must be 'underdamped', 'ula' or 'mala', got {walk!r}")
    if walk == "mala" and smoothed_log_prob is None:
        raise ValueError("walk='mala' needs smoothed_log_prob=(y, sigma) -> log q_sigma(y) + const")
    thin = check_positive_int(thin, "thin")
    num_warmup = max(num_samples, 100) if num_warmup is None else int(num_warmup)
    if num_warmup < 0 or step_size <= 0 or friction <= 0:
        raise ValueError("num_warmup must be non-negative, step_size and friction positive")
    dtype = target.dtype
    if init is not None:  # checked before any work (a learned default would fit a score first)
        init = torch.as_tensor(init, dtype=dtype, device=device)
        init = init.expand(num_chains, d).clone() if tuple(init.shape) == (d,) else init
        if tuple(init.shape) != (num_chains, d):
            raise ValueError(f"init must have shape ({num_chains}, {d}) or ({d},), got {tuple(init.shape)}")
    evals_fit = target.num_target_evals
    if walk == "mala" and smoothed_score is None:
        provider = None  # the jump uses the gradient of smoothed_log_prob
    else:
        options = dict(estimator_options or {})
        if smoothed_score is None and estimator == "laplace":
            # the walk does not settle as SMS's shrinking noise does: never drop to one start
            options.setdefault("cheap_fraction", 0.0)
        provider: SmoothedScore | None = resolve_smoothed_score(
            target, smoothed_score, estimator=estimator, generator=generator, **options
        )
        provider.reset()
    learned = isinstance(provider, LearnedSmoothedScore)
    num_mala = (_LEARNED_MALA if learned else 0) if num_mala is None else num_mala
    if isinstance(num_mala, bool) or not isinstance(num_mala, int) or num_mala < 0:
        raise ValueError(f"num_mala must be a non-negative integer, got {num_mala!r}")
    score_attrs, rejected = {}, False
    if learned:
        fitted_here = smoothed_score is None
        score_attrs, rejected = learned_score_report(
            provider, target, target.num_target_evals - evals_fit if fitted_here else None
        )
    if init is None and learned and "x" in provider.particles:
        pool = provider.particles["x"]
        idx = torch.randint(0, pool.shape[0], (num_chains,), generator=generator, device=generator.device)
        y = pool[idx.cpu()].to(device=device, dtype=dtype)
        y = y + sigma * torch.randn(y.shape, generator=generator, dtype=dtype, device=y.device)
    elif init is None:
        y = target.sample_reference(num_chains, generator, device)
        target.validate(y[:16])  # a log-density that is -inf (or bad) everywhere is refused before any work
        y = y + sigma * torch.randn(y.shape, generator=generator, dtype=dtype, device=y.device)
    else:
        y = init

    def score(z):
        return provider(z, sigma)

    evals0 = target.num_target_evals
    budget_hit = False
    budget = None
    if max_evals_per_draw is not None and provider is not None and provider.uses_target and not learned:
        budget = max_evals_per_draw * num_chains * num_samples
    if walk == "underdamped":
        state = underdamped_init(generator, y, score)
        h = step_size * sigma
    elif walk == "ula":
        h = step_size * 0.1 * sigma**2
    else:
        lqg = _smoothed_log_prob_and_grad(smoothed_log_prob, sigma)
        state = MCMCState(y, *lqg(y))
        adapt = DualAveraging(torch.tensor(0.25 * sigma**2, dtype=dtype, device=y.device), MALA_TARGET_ACCEPT)
        h = adapt.step_size
    draws, walkers, accs, divs = [], [], [], []
    stats = {
        k: [] for k in ("score_spread", "num_modes", "acceptance_rate", "num_target_evals", "num_divergent")
    }
    total = num_warmup + num_samples * thin
    bar = progress_bar(total, f"walk-jump (sigma={sigma:.3g})", progress)
    acc_sum = torch.zeros(num_chains, dtype=dtype, device=y.device)
    # walkers that have diverged since warm-up (module docstring, "Divergences")
    suspect = torch.zeros(num_chains, dtype=torch.bool, device=y.device)
    num_div_steps = 0
    for i in range(total):
        if walk == "underdamped":
            new = underdamped_step(generator, state, score, h, friction / sigma)
            bad = _divergent(new.x, new.grad, (new.v**2).mean(-1))
            if bad.any():  # back to the last good point, with a fresh velocity
                fresh = torch.randn(new.v.shape, generator=generator, dtype=dtype, device=y.device)
                new = type(new)(
                    *(torch.where(bad[:, None], a, b) for a, b in zip((state.x, fresh, state.grad), new))
                )
            state = new
        elif walk == "ula":
            g = score(y)
            y_new = ula_step(generator, y, score, h, grad=g)
            bad = _divergent(y_new, g, (h * g**2).mean(-1) / 2)  # drift^2 / noise variance per coordinate
            y = torch.where(bad[:, None], y, y_new)
        else:
            state, info = mala_step(generator, state, lqg, h)
            bad = info.diverging.to(torch.bool)
        if (
            provider is not None
            and "fit_ess" in provider.last_info
            and provider.last_info["fit_ess"].shape == bad.shape
        ):
            bad_score = (
                provider.last_info["fit_ess"] < _MIN_FIT_ESS
            )  # the score at the new point failed its check
        else:
            bad_score = torch.zeros_like(bad)
        suspect = suspect | bad | bad_score if i >= num_warmup else suspect
        num_div_steps = num_div_steps + bad.sum()
        if walk == "mala":
            if i < num_warmup:
                h = adapt.update(info.acceptance_rate.mean())
                if i == num_warmup - 1:
                    h = adapt.final_step_size
            else:
                acc_sum = acc_sum + info.acceptance_rate
        bar.update(1)
        over = budget is not None and target.num_target_evals - evals0 > budget
        if (i >= num_warmup and (i - num_warmup + 1) % thin == 0) or over:
            if walk == "underdamped":
                yj, g = state.x, state.grad
            elif walk == "ula":
                yj, g = y, score(y)
            else:
                yj = state.x
                g = state.grad if provider is None else score(yj)
            x = yj + sigma**2 * g
            bad_jump = ~torch.isfinite(x).all(-1)
            fit_ess = provider.last_info.get("fit_ess") if provider is not None else None
            if fit_ess is not None and fit_ess.shape == bad_jump.shape:
                bad_jump = bad_jump | (fit_ess < _MIN_FIT_ESS)
            # a walker that went wrong once stays suspect: its later draws are marked too
            suspect = suspect | bad_jump
            divs.append(suspect.clone())
            draws.append(x)
            walkers.append(yj)
            done = max(i - num_warmup + 1, 1)
            accs.append(
                acc_sum / done if walk == "mala" else torch.ones(num_chains, dtype=dtype, device=y.device)
            )
            info = provider.last_info if provider is not None else {}
            stats["score_spread"].append(float(info["spread"].mean()) if "spread" in info else 0.0)
            stats["num_modes"].append(float(info["num_modes"].mean()) if "num_modes" in info else math.nan)
            stats["acceptance_rate"].append(float(accs[-1].mean()))
            stats["num_target_evals"].append(target.num_target_evals - evals0)
            stats["num_divergent"].append(float(divs[-1].sum()))
        if over:
            warnings.warn(
                f"walk-jump: the training-free smoothed score ({type(provider).__name__}) spent its "
                "budget of "
                f"{max_evals_per_draw:g} target evaluations per draw after {i + 1} of {total} walk steps; "
                "the run "
                f"ends with {len(draws)} of {num_samples} draws per walker. Use the learned score (the "
                "default) or "
                "raise max_evals_per_draw.",
                RuntimeWarning,
                stacklevel=2,
            )
            budget_hit = True
            break
    bar.close()
    x_all, lp, h_corr = _correct(
        generator, target, torch.stack(draws, 1), torch.stack(walkers, 1), sigma, num_mala
    )
    diverging = torch.stack(divs, 1) | ~torch.isfinite(lp) | rejected
    num_div = int(diverging.sum())
    if num_div:
        warnings.warn(
            ("the smoothed score passed was fitted to another target; " if rejected else "")
            + f"walk-jump diverged: {num_div} of {diverging.numel()} draws follow a divergent walk step "
            "or have a "
            f"non-finite or unreliable jump ({int(num_div_steps)} walk steps reset; sample_stats "
            "'diverging' marks the draws). The "
            "smoothed score is unreliable there (training-free estimate far in the tails) or the step is too "
            "large for its curvature: lower step_size, raise sigma, or pass smoothed_score=.",
            RuntimeWarning,
            stacklevel=2,
        )
    attrs = {
        "sigma": sigma,
        "num_divergent": num_div,
        "num_divergent_steps": int(num_div_steps),
        "walk": walk,
        "walk_step_size": float(h),
        "smoothed_score": type(provider).__name__ if provider is not None else "grad smoothed_log_prob",
        "num_mala": int(num_mala),
        "mala_step_size": h_corr,
        "budget_hit": budget_hit,
        "correction_evals": int(diverging.numel() * (num_mala + 1))
        if num_mala > 0
        else int(diverging.numel()),
        **score_attrs,
    }
    if isinstance(provider, LaplaceSmoothedScore):
        attrs["num_hessian_evals"] = int(provider.num_hessian_evals)
        attrs["mode_bank_size"] = len(provider.bank)
    return SamplerResult(
        draws=x_all,
        sample_stats={"lp": lp, "acceptance_rate": torch.stack(accs, 1), "diverging": diverging},
        groups={"walk_jump": {k: torch.tensor(v, dtype=torch.float64) for k, v in stats.items()}},
        attrs=attrs,
    )
