r"""Sequential multimeasurement sampling (SMS; Saremi, Park and Bach, "Chain of log-concave Markov
chains", ICLR 2024), ``ds.sample(target, "sms", ...)``.

Measurements :math:`Y_i = X + \sigma \varepsilon_i`, :math:`i = 1..M`, are drawn one after another:
:math:`y_1` from :math:`q_\sigma`, then each :math:`y_m` from :math:`p(y_m \mid y_{1:m-1})` by
Langevin dynamics with the conditional score

.. math::
    \nabla_{y_m} \log p(y_m \mid y_{1:m-1}) = \frac{1}{\sigma^2}\Big[\bar y_m - y_m
    + \frac{\sigma^2}{m}\nabla\log q_{\sigma/\sqrt m}(\bar y_m)\Big],\qquad
    \bar y_m = \frac1m \sum_{i\le m} y_i,

warm-started at :math:`\hat x_{m-1} + \sigma\varepsilon` (:math:`\hat x_{m-1}` the previous jump).
With :math:`\sigma` large enough every conditional is log-concave. The jump
:math:`\hat x = \bar y_M + (\sigma^2/M)\nabla\log q_{\sigma/\sqrt M}(\bar y_M) = \mathbb E[X\mid
y_{1:M}]` is a posterior mean, whose within-mode variance shrinks to :math:`\tau^4/(\tau^2 +
\sigma^2/M)`; so the output is the end of ``num_mala`` MALA steps on
:math:`p(x\mid \bar y_M) \propto p(x)\,\mathcal N(x; \bar y_M, \sigma^2/M\, I)` started at the jump: a
draw from :math:`p`, not a posterior mean.

Per-measurement diagnostics go to the ``sms`` group: the noise level :math:`\sigma/\sqrt m`, the
score estimator's mean spread and number of posterior modes seen, and the cumulative target
evaluations (the walk itself is unadjusted; the final MALA's acceptance is in ``sample_stats``).

Self-check: the training-free (Laplace) score reports, per call, the importance ESS fraction of
its local fits (``fit_ess``: 1 where they are p(x | y) itself, as for Gaussian modes). Its mean over
the run is in attrs (``score_fit_ess``) and per measurement in the ``sms`` group; below 0.9 the
estimate of E[X | y] is biased (the Laplace mean is the mode of a skewed p(x | y), not its mean; on
the ionosphere posterior the check gives 0.4 to 0.5 and the draws' means are off by up to 1.3
posterior sds, while a Gaussian with the same moments gives 1.0 and no bias), so every draw is marked in
``sample_stats["diverging"]`` (non-finite draws
are marked in any case) and a ``RuntimeWarning`` says so.

Default smoothed score: a network fitted from the log-density (:mod:`diffstat.smoothing.fit`), whose
cost is paid once; a kept score (``smoothed_score=``) draws further batches at the cost of the final
MALA alone (``correction_evals`` in attrs; ``score_*`` attrs report its fit and its check against
this target, and a score fitted to another target marks every draw).

Each SMS run gives one draw; ``num_chains * num_samples`` independent runs are batched together
(they share the training-free estimator's mode bank) and reported as ``(num_chains, num_samples)``.

Defaults (reported in ``posterior.attrs``): :math:`\sigma = \sqrt{\max(R^2 - \tau^2, \tau^2)}` with
:math:`R` the largest distance between modes and :math:`\tau` the largest component standard
deviation (the diameter rule of the paper's public code), taken from the target's exact mixture
when it carries one, else from a quick mode exploration; :math:`M` from the W2 bound
:math:`W_2^2 \le \sigma^2 d / M \le` ``w2_tol``, with default ``w2_tol`` :math:`= d\,(s/2)^2`,
:math:`s^2` the target's mean variance per coordinate (the bound's noise per coordinate at most
half the target's spread; the final MALA removes the rest).

The joint variant (JMS, ``variant="jms"``) runs underdamped Langevin on all :math:`M` measurements
at once, with :math:`\nabla_{y_i}\log p(y_{1:M}) = \frac1M\nabla\log q_{\sigma/\sqrt M}(\bar y) -
(y_i - \bar y)/\sigma^2`, then jumps and corrects the same way.
"""

from __future__ import annotations

import math
import warnings

import torch

from diffstat._util import check_positive_int, progress_bar
from diffstat.mcmc.langevin import ula_step, underdamped_init, underdamped_step
from diffstat.sampling import SamplerResult, register_sampler
from diffstat.smoothing.correction import posterior_mala
from diffstat.smoothing.fit import learned_score_report
from diffstat.smoothing.laplace import explore_modes
from diffstat.smoothing.learned import LearnedSmoothedScore
from diffstat.smoothing.scores import LaplaceSmoothedScore, SmoothedScore, resolve_smoothed_score

__all__ = ["conditional_score", "default_noise", "posterior_mala", "sms"]

#: A run whose training-free score had a mean importance ESS fraction (over chains and
#: measurements) below this is flagged. Gaussian modes give 0.999 or more; ionosphere at sigma 0.5
#: gives 0.39 to 0.49 with means off by up to 1.3 posterior sds (benchmarks/bench_robustness.py);
#: log-gamma coordinates (d = 4, sigma 1, M 4) give 0.74 with means off by 0.34 sd (z = 6.8 at 400
#: draws): any visible departure from Gaussian local posteriors biases the estimate.
_MIN_MEAN_FIT_ESS = 0.9

#: Final MALA steps on p(x | ybar_M) after the jump: 100 where the score is exact or training-free (the
#: measured within-mode variance was then the target's, REFERENCES.md); 30 with a learned score, so
#: that draws from a kept score cost about 31 target evaluations each (measured in docs/sms.md).
_DEFAULT_MALA = 100
_LEARNED_MALA = 30


def conditional_score(
    y: torch.Tensor, sum_prev: torch.Tensor, m: int, sigma: float, smoothed_score
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The score of :math:`p(y_m \mid y_{1:m-1})` at ``y: (n, d)``, given the sum of the previous
    measurements ``sum_prev: (n, d)`` (zero for ``m = 1``, where this is the score of
    :math:`q_\sigma`). Returns ``(score, ybar, psi)`` with :math:`\psi = \nabla\log
    q_{\sigma/\sqrt m}(\bar y_m)`."""
    ybar = (sum_prev + y) / m
    psi = smoothed_score(ybar, sigma / math.sqrt(m))
    return (ybar - y + (sigma**2 / m) * psi) / sigma**2, ybar, psi


def default_noise(
    target,
    generator: torch.Generator,
    device=None,
    *,
    num_explore: int = 256,
    need_sigma: bool = True,
    mixture=None,
) -> dict:
    r"""The target's geometry for the defaults: ``sigma`` (diameter rule), ``scale`` (root mean
    variance per coordinate), ``center`` ``(d,)``, ``diameter``, ``tau`` and ``source``
    (``"exact"`` from ``mixture``, an object with ``means``, ``covs``, ``mean`` and ``cov`` such as
    a :class:`~diffstat.targets.GaussianMixture` passed explicitly, or ``"explored"``: damped Newton from
    ``num_explore``
    reference draws, the modes' Laplace mixture giving the moments). The explored modes are returned
    under ``"modes"`` to seed a mode bank. If no mode is found and ``need_sigma`` is False (the
    caller gave ``sigma`` and ``num_measurements``), the reference draws' mean and spread stand in
    for the centre and scale (``source="reference"``)."""
    out: dict = {}
    if mixture is not None:
        means, covs = mixture.means, mixture.covs
        center, cov = mixture.mean, mixture.cov
        out["source"] = "exact"
    else:
        x0 = target.sample_reference(num_explore, generator, device)
        target.validate(x0[:16])  # a log-density that is -inf (or bad) everywhere is refused before any work
        modes = explore_modes(target, x0)
        if modes.modes.shape[0] == 0:
            if need_sigma:
                raise ValueError(
                    "SMS could not find a mode of the target from its reference; pass sigma= and "
                    "num_measurements="
                )
            return dict(
                source="reference",
                scale=math.sqrt(float(x0.var(0).mean())),
                center=x0.mean(0).to(device=device, dtype=target.dtype),
                diameter=math.nan,
                tau=math.nan,
            )
        means, covs = modes.modes, torch.linalg.inv(modes.precisions)
        center, cov = modes.mixture_moments()
        out["source"] = "explored"
        out["modes"] = modes
    diameter = float(torch.cdist(means, means).max()) if means.shape[0] > 1 else 0.0
    tau2 = float(torch.linalg.eigvalsh(covs).max())
    out.update(
        sigma=math.sqrt(max(diameter**2 - tau2, tau2)),
        scale=math.sqrt(float(torch.diagonal(cov).mean())),
        center=center.to(device=device, dtype=target.dtype),
        diameter=diameter,
        tau=math.sqrt(tau2),
    )
    return out


def _walk(generator, y, score, num_steps, step_size, friction, walk):
    """``num_steps`` Langevin steps on ``score`` from ``y``; returns the end point."""
    if walk == "underdamped":
        state = underdamped_init(generator, y, score)
        for _ in range(num_steps):
            state = underdamped_step(generator, state, score, step_size, friction)
        return state.x
    for _ in range(num_steps):
        y = ula_step(generator, y, score, step_size)
    return y


@register_sampler("sms")
def sms(
    target,
    *,
    num_samples: int,
    num_chains: int | None = None,
    generator: torch.Generator,
    progress: bool = False,
    device=None,
    sigma: float | None = None,
    num_measurements: int | None = None,
    smoothed_score=None,
    estimator: str = "auto",
    estimator_options: dict | None = None,
    steps_per_measurement: int = 8,
    first_steps: int = 50,
    step_size: float = 0.5,
    friction: float = 1.0,
    walk: str = "underdamped",
    num_mala: int | None = None,
    w2_tol: float | None = None,
    variant: str = "sms",
    jms_steps: int = 500,
    mixture=None,
    max_evals_per_draw: float | None = 1e4,
) -> SamplerResult:
    r"""Sequential multimeasurement sampling; ``num_chains * num_samples`` independent runs.

    Parameters
    ----------
    sigma, num_measurements : optional
        The noise level and ``M``; defaults from the diameter rule and the W2 bound (module doc).
    smoothed_score : callable or SmoothedScore, optional
        ``(y, sigma) -> grad log q_sigma(y)``, or a kept
        :class:`~diffstat.smoothing.learned.LearnedSmoothedScore` (no new target evaluations but
        its check and the final MALA; its particles set the defaults of ``sigma`` and ``M``); else
        the ``estimator``: ``"learned"`` (default, ``"auto"``: fitted here by
        :func:`~diffstat.smoothing.fit.fit_smoothed_score` with ``estimator_options``), or the
        training-free ``"laplace"``, ``"importance"``, ``"mcmc"``.
    steps_per_measurement, first_steps : int
        Langevin steps for each :math:`y_m`, :math:`m \ge 2`, and for :math:`y_1`.
    step_size, friction : float
        In units of :math:`\sigma`: the walk uses :math:`h` = ``step_size`` :math:`\sigma` and
        friction ``friction`` :math:`/\sigma` (the public walk-jump defaults 0.5 and 1 at
        :math:`\sigma = 1`); ULA (``walk="ula"``) uses :math:`h` = ``step_size`` :math:`\cdot 0.1\sigma^2`.
    num_mala : int, optional
        MALA steps on :math:`p(x\mid\bar y_M)` after the jump (0: return the jump itself); default
        30 with a learned score, 100 otherwise.
    w2_tol : float, optional
        Tolerance of the W2 bound that sets ``M``.
    variant : ``"sms"`` or ``"jms"``
    mixture : optional
        A Gaussian mixture (``means``, ``covs``, ``mean``, ``cov``) whose exact geometry sets the
        defaults of ``sigma`` and ``num_measurements``; by default the geometry is explored from the
        log-density. Exact information is used only when passed explicitly.
    jms_steps : int
        Langevin steps of the joint variant.
    max_evals_per_draw : float or None
        Budget of a training-free estimator (``"laplace"``, ``"importance"``, ``"mcmc"``), in target
        evaluations per draw (default 1e4, the cost a learned score stays under with its fit): once
        spent, the measurements stop at the current ``m`` (the W2 bound grows to
        :math:`\sigma^2 d/m`, reported) and a ``RuntimeWarning`` says so. None: no cap.
    """
    num_chains = 4 if num_chains is None else num_chains
    n = num_chains * num_samples
    d = target.dim
    if variant not in ("sms", "jms"):
        raise ValueError(f"variant must be 'sms' or 'jms', got {variant!r}")
    if walk not in ("underdamped", "ula"):
        raise ValueError(f"walk must be 'underdamped' or 'ula', got {walk!r}")
    steps_per_measurement = check_positive_int(steps_per_measurement, "steps_per_measurement")
    first_steps = check_positive_int(first_steps, "first_steps")
    if sigma is not None and not float(sigma) > 0:  # bad input refused before any work (a fit, a search)
        raise ValueError(f"sigma must be positive, got {sigma}")
    if num_measurements is not None:
        check_positive_int(num_measurements, "num_measurements")
    evals_fit = target.num_target_evals
    provider: SmoothedScore = resolve_smoothed_score(
        target, smoothed_score, estimator=estimator, generator=generator, **(estimator_options or {})
    )
    provider.reset()
    learned = isinstance(provider, LearnedSmoothedScore)
    if num_mala is None:
        num_mala = _LEARNED_MALA if learned else _DEFAULT_MALA
    if (
        isinstance(num_mala, bool)
        or not isinstance(num_mala, int)
        or num_mala < 0
        or step_size <= 0
        or friction <= 0
    ):
        raise ValueError("num_mala must be non-negative, step_size and friction positive")
    score_attrs, rejected = {}, False
    if learned:
        fitted_here = smoothed_score is None
        score_attrs, rejected = learned_score_report(
            provider, target, target.num_target_evals - evals_fit if fitted_here else None
        )
    if learned and mixture is None and provider.geometry is not None:
        geometry = dict(
            provider.geometry, center=provider.geometry["center"].to(device=device, dtype=target.dtype)
        )
    else:
        geometry = default_noise(
            target, generator, device, need_sigma=sigma is None or num_measurements is None, mixture=mixture
        )
    if isinstance(provider, LaplaceSmoothedScore) and "modes" in geometry:
        provider.bank.add(geometry["modes"].modes, geometry["modes"].precisions)
    if sigma is None:
        sigma = geometry["sigma"]
    sigma = float(sigma)
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if w2_tol is None:
        w2_tol = d * (0.5 * geometry["scale"]) ** 2
        if learned and math.isfinite(geometry.get("tau", math.nan)):
            # measurements cost no target evaluation here: end at a noise of at most twice the within-mode
            # scale, where p(x | ybar) is one mode and the final MALA need not choose between modes (with
            # modes closer than the overall scale, e.g. nine modes 5 apart, overall scale 4.2); at most 4x M
            w2_tol = max(d * min(0.5 * geometry["scale"], 2 * geometry["tau"]) ** 2, w2_tol / 4)
    if num_measurements is None:
        num_measurements = max(1, math.ceil(sigma**2 * d / w2_tol))
    big_m = check_positive_int(num_measurements, "num_measurements")
    dtype = target.dtype
    h = step_size * sigma if walk == "underdamped" else step_size * 0.1 * sigma**2
    gamma = friction / sigma
    evals0 = target.num_target_evals
    budget_hit = False
    budget = (
        None
        if (max_evals_per_draw is None or learned or not provider.uses_target)
        else max_evals_per_draw * n
    )
    stats = {k: [] for k in ("noise_level", "score_spread", "num_modes", "score_fit_ess", "num_target_evals")}
    fit_ess_sum = torch.zeros(n, dtype=target.dtype, device=device)
    fit_ess_count = 0

    def record(m, evals):
        nonlocal fit_ess_sum, fit_ess_count
        info = provider.last_info
        stats["noise_level"].append(sigma / math.sqrt(m))
        stats["score_spread"].append(float(info["spread"].mean()) if "spread" in info else math.nan)
        stats["num_modes"].append(float(info["num_modes"].mean()) if "num_modes" in info else math.nan)
        fit_ess = info.get("fit_ess")
        if fit_ess is not None and fit_ess.shape == (n,):
            fit_ess_sum = fit_ess_sum + fit_ess.to(fit_ess_sum)
            fit_ess_count += 1
        stats["score_fit_ess"].append(float(fit_ess.mean()) if fit_ess is not None else math.nan)
        stats["num_target_evals"].append(evals)

    center = geometry["center"]
    spread0 = math.sqrt(sigma**2 + geometry["scale"] ** 2)
    y0 = center + spread0 * torch.randn(n, d, generator=generator, dtype=dtype, device=device)
    bar = progress_bar(
        big_m if variant == "sms" else jms_steps, f"{variant} (sigma={sigma:.3g}, M={big_m})", progress
    )
    if variant == "sms":
        total = torch.zeros(n, d, dtype=dtype, device=device)
        x_hat = None
        for m in range(1, big_m + 1):

            def score(y, m=m, total=total):
                return conditional_score(y, total, m, sigma, provider)[0]

            start = (
                y0
                if m == 1
                else x_hat + sigma * torch.randn(n, d, generator=generator, dtype=dtype, device=device)
            )
            y = _walk(
                generator, start, score, first_steps if m == 1 else steps_per_measurement, h, gamma, walk
            )
            total = total + y
            ybar = total / m
            x_hat = provider.denoise(ybar, sigma / math.sqrt(m))
            record(m, target.num_target_evals - evals0)
            bar.update(1)
            if budget is not None and target.num_target_evals - evals0 > budget and m < big_m:
                warnings.warn(
                    f"SMS: the training-free smoothed score ({type(provider).__name__}) spent its budget of "
                    f"{max_evals_per_draw:g} target evaluations per draw after {m} of {big_m} measurements; "
                    f"the run ends there (W2 bound sigma^2 d / m = {sigma**2 * d / m:.3g} instead of "
                    f"{sigma**2 * d / big_m:.3g}). Use the learned score (the default) or raise "
                    "max_evals_per_draw.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                big_m, budget_hit = m, True
                break
        ybar = total / big_m
    else:
        x_rough = center + geometry["scale"] * torch.randn(
            n, 1, d, generator=generator, dtype=dtype, device=device
        )
        ys = x_rough + sigma * torch.randn(n, big_m, d, generator=generator, dtype=dtype, device=device)
        s_m = sigma / math.sqrt(big_m)

        def joint_score(flat):
            yy = flat.reshape(n, big_m, d)
            yb = yy.mean(1)
            psi = provider(yb, s_m)
            return (psi[:, None] / big_m - (yy - yb[:, None]) / sigma**2).reshape(n, big_m * d)

        state = underdamped_init(generator, ys.reshape(n, -1), joint_score)
        for i in range(jms_steps):
            state = underdamped_step(generator, state, joint_score, h, gamma)
            if (i + 1) % max(jms_steps // 50, 1) == 0 or i == jms_steps - 1:
                record(big_m, target.num_target_evals - evals0)
            bar.update(1)
        ybar = state.x.reshape(n, big_m, d).mean(1)
        x_hat = provider.denoise(ybar, s_m)
    bar.close()
    s2_final = sigma**2 / big_m
    if num_mala > 0:
        x, lp, acc, h_mala, _ = posterior_mala(generator, target, x_hat, ybar, s2_final, num_mala)
    else:
        x, lp = x_hat, target.log_prob(x_hat).detach()
        acc, h_mala = torch.ones(n, dtype=dtype, device=device), math.nan
    shape = (num_chains, num_samples)
    # the self-check of the training-free score (module docstring): its bias is systematic and the
    # mode bank is shared, so a failed check marks every draw; a non-finite draw is marked anyway
    fit_ess = float(fit_ess_sum.mean()) / fit_ess_count if fit_ess_count else 1.0
    score_failed = fit_ess < _MIN_MEAN_FIT_ESS
    diverging = ~torch.isfinite(x).all(-1) | ~torch.isfinite(lp) | score_failed | rejected
    num_div = int(diverging.sum())
    if num_div:
        warnings.warn(
            f"SMS: {num_div} of {n} draws are unreliable (sample_stats 'diverging'): "
            + (
                "the training-free smoothed score failed its self-check (mean importance ESS fraction of "
                "its "
                f"Laplace fits {fit_ess:.2f} < {_MIN_MEAN_FIT_ESS}: p(x | y) is far from Gaussian and its "
                "estimate of "
                "E[X | y] biased; pass smoothed_score= or use an MCMC method)"
                if score_failed
                else "the smoothed score passed was fitted to another target"
                if rejected
                else "non-finite draws"
            ),
            RuntimeWarning,
            stacklevel=2,
        )
    attrs = {
        "sigma": sigma,
        "num_measurements": big_m,
        "final_noise": math.sqrt(s2_final),
        "w2_bound": sigma**2 * d / big_m,
        "budget_hit": budget_hit,
        "w2_tol": float(w2_tol),
        "noise_source": geometry["source"],
        "smoothed_score": type(provider).__name__,
        "variant": variant,
        "num_mala": int(num_mala),
        "mala_step_size": h_mala,
        "mala_acceptance": float(acc.mean()),
        "num_divergent": num_div,
        "score_fit_ess": fit_ess,
        "correction_evals": int(n * (num_mala + 1)) if num_mala > 0 else n,
        **score_attrs,
    }
    if isinstance(provider, LaplaceSmoothedScore):
        attrs["num_hessian_evals"] = int(provider.num_hessian_evals)
        attrs["mode_bank_size"] = len(provider.bank)
    return SamplerResult(
        draws=x.reshape(*shape, d),
        sample_stats={
            "lp": lp.reshape(shape),
            "acceptance_rate": acc.reshape(shape),
            "step_size": torch.full(shape, h_mala, dtype=dtype),
            "diverging": diverging.reshape(shape),
        },
        groups={"sms": {k: torch.tensor(v, dtype=torch.float64) for k, v in stats.items()}},
        attrs=attrs,
    )
