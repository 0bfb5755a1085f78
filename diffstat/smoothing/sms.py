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
draw from :math:`p`, not a posterior mean (with a learned score, preconditioned by its particles'
Fisher information: :mod:`~diffstat.smoothing.correction`).

Per-measurement diagnostics go to the ``sms`` group: the noise level :math:`\sigma/\sqrt m`, the
score estimator's mean spread and number of posterior modes seen, and the cumulative target
evaluations (the walk itself is unadjusted; the final MALA's acceptance is in ``sample_stats``).

Self-check: the training-free (Laplace) score reports, per call, the importance ESS fraction of
its local fits (``fit_ess``: 1 where they are p(x | y) itself, as for Gaussian modes). Its mean over
the run is in attrs (``score_fit_ess``) and per measurement in the ``sms`` group; below 0.9 the
estimate of E[X | y] is biased (the Laplace mean is the mode of a skewed p(x | y), not its mean; on
the ionosphere posterior the check gives 0.4 to 0.5 and the draws' means are off by up to 1.3
posterior sds, while a Gaussian with the same moments gives 1.0 and no bias), so every draw is
marked in ``sample_stats["diverging"]`` (non-finite draws always) and a ``RuntimeWarning`` says so.

Default smoothed score: a network fitted from the log-density (:mod:`diffstat.smoothing.fit`), whose
cost is paid once; a kept score (``smoothed_score=``) draws further batches at the cost of the final
MALA alone (``correction_evals`` in attrs; ``score_*`` attrs report its fit and its check against
this target, and a score fitted to another target marks every draw).

Chains: each SMS run gives one independent draw; ``num_chains * num_samples`` runs are batched
together (they share the training-free estimator's mode bank) and reported as ``(num_chains,
num_samples)``: ``num_samples`` draws per chain, as for every method, each chain ``num_samples``
independent runs (so its draws are uncorrelated and R-hat is about 1 by construction). A
training-free score that spends its budget shortens the runs (fewer measurements), not the draws.

Structure: the measurement steps are :mod:`~diffstat.smoothing.measurements` (``sms_init`` /
``sms_step``, and the joint walk), the noise defaults :mod:`~diffstat.smoothing.geometry`, the final
MALA :mod:`~diffstat.smoothing.correction` on the shared runner
:mod:`~diffstat.smoothing.adaptive_mala`; :func:`sms` validates, drives and reports.

Defaults (reported in ``posterior.attrs``): :math:`\sigma` by the diameter rule of the paper's public
code and :math:`M` by a W2 bound (:mod:`~diffstat.smoothing.geometry`), from the geometry of an exact
mixture passed as ``mixture=``, of a learned score's particles, or of a quick mode exploration.

The joint variant (JMS, ``variant="jms"``) runs underdamped Langevin on all :math:`M` measurements
at once, with :math:`\nabla_{y_i}\log p(y_{1:M}) = \frac1M\nabla\log q_{\sigma/\sqrt M}(\bar y) -
(y_i - \bar y)/\sigma^2`, then jumps and corrects the same way.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch

from diffstat._util import check_positive_int, progress_bar
from diffstat.sampling import SamplerResult, register_sampler
from diffstat.smoothing.correction import check_num_mala, correct, posterior_mala
from diffstat.smoothing.fit import learned_score_report, worded_for
from diffstat.smoothing.geometry import default_noise, noise_levels
from diffstat.smoothing.learned import LearnedSmoothedScore
from diffstat.smoothing.measurements import (
    conditional_score,
    jms_init,
    jms_jump,
    joint_walk,
    sms_init,
    sms_step,
)
from diffstat.smoothing.scores import LaplaceSmoothedScore, SmoothedScore, resolve_smoothed_score
from diffstat.smoothing.walks import ula_walk, underdamped_walk

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

_STATS = ("noise_level", "score_spread", "num_modes", "score_fit_ess", "num_target_evals")


class _Diagnostics:
    """The ``sms`` group, one row per record, and the running mean of the score's ``fit_ess``."""

    def __init__(self, n: int, dtype, device):
        self.rows = {k: [] for k in _STATS}
        self.fit_ess_sum = torch.zeros(n, dtype=dtype, device=device)
        self.fit_ess_count = 0

    def record(self, noise_level: float, info: dict, num_evals: int) -> None:
        fit_ess = info.get("fit_ess")
        if fit_ess is not None and fit_ess.shape == self.fit_ess_sum.shape:
            self.fit_ess_sum = self.fit_ess_sum + fit_ess.to(self.fit_ess_sum)
            self.fit_ess_count += 1
        row = (
            noise_level,
            float(info["spread"].mean()) if "spread" in info else math.nan,
            float(info["num_modes"].mean()) if "num_modes" in info else math.nan,
            float(fit_ess.mean()) if fit_ess is not None else math.nan,
            num_evals,
        )
        for key, value in zip(_STATS, row):
            self.rows[key].append(value)

    def fit_ess(self) -> float:
        """Mean ``fit_ess`` over chains and records (1 when the score reports none)."""
        return float(self.fit_ess_sum.mean()) / self.fit_ess_count if self.fit_ess_count else 1.0


class _Run(NamedTuple):
    """A driver's output: ``ybar`` and the jump ``x_hat`` ``(n, d)``, the measurements made, the
    diagnostics and whether the budget ran out."""

    ybar: torch.Tensor
    x_hat: torch.Tensor
    num_measurements: int
    diagnostics: _Diagnostics
    budget_hit: bool


def _run_sms(generator, target, provider, y0, sigma, big_m, make_walk, steps, max_evals, bar) -> _Run:
    """The sequential driver: :func:`~diffstat.smoothing.measurements.sms_step` for ``m = 1..M``, with
    ``steps = (first_steps, steps_per_measurement)`` walk steps; stops early once ``max_evals`` target
    evaluations per draw are spent (None: no cap)."""
    (n, d), evals = y0.shape, 0
    diag, state = _Diagnostics(n, y0.dtype, y0.device), sms_init(y0)
    for m in range(1, big_m + 1):
        state, info = sms_step(generator, state, provider, sigma, make_walk, steps[m > 1], target)
        evals += info.num_evals
        diag.record(info.noise_level, info.score_info, evals)
        bar.update(1)
        if max_evals is not None and evals > max_evals * n and m < big_m:
            warnings.warn(
                f"SMS: the training-free smoothed score ({type(provider).__name__}) spent its budget of "
                f"{max_evals:g} target evaluations per draw after {m} of {big_m} measurements; "
                f"the run ends there (W2 bound sigma^2 d / m = {sigma**2 * d / m:.3g} instead of "
                f"{sigma**2 * d / big_m:.3g}). Use the learned score (the default) or raise "
                "max_evals_per_draw.",
                RuntimeWarning,
                stacklevel=4,
            )
            return _Run(state.total / m, state.jump, m, diag, True)
    return _Run(state.total / big_m, state.jump, big_m, diag, False)


def _run_jms(generator, target, provider, geometry, sigma, big_m, walk_settings, shape, bar) -> _Run:
    """The joint driver: ``num_steps`` steps of the joint walk (``walk_settings = (step_size, friction,
    num_steps)``), recorded about 50 times, then the jump; ``shape = (n, d)``."""
    (n, d), (step_size, friction, num_steps) = shape, walk_settings
    evals0, center = target.num_target_evals, geometry["center"]
    kernel = joint_walk(provider, sigma, big_m, step_size, friction)
    state = jms_init(generator, kernel, center, geometry["scale"], sigma, (n, big_m, d))
    diag = _Diagnostics(n, center.dtype, center.device)
    for i in range(num_steps):
        state, _ = kernel.step(generator, state)
        if (i + 1) % max(num_steps // 50, 1) == 0 or i == num_steps - 1:
            diag.record(sigma / math.sqrt(big_m), provider.last_info, target.num_target_evals - evals0)
        bar.update(1)
    ybar, x_hat = jms_jump(kernel, state, provider, sigma, big_m)
    return _Run(ybar, x_hat, big_m, diag, False)


@dataclass(frozen=True)
class _Options:
    """The walk options of :func:`sms` (``step_size`` and ``friction`` in units of sigma), validated
    here with the noise options, before any work."""

    variant: str
    walk: str
    steps_per_measurement: int
    first_steps: int
    step_size: float
    friction: float
    jms_steps: int

    def __post_init__(self):
        if self.variant not in ("sms", "jms"):
            raise ValueError(f"variant must be 'sms' or 'jms', got {self.variant!r}")
        if self.walk not in ("underdamped", "ula"):
            raise ValueError(f"walk must be 'underdamped' or 'ula', got {self.walk!r}")
        check_positive_int(self.steps_per_measurement, "steps_per_measurement")
        check_positive_int(self.first_steps, "first_steps")
        if not (self.step_size > 0 and self.friction > 0):
            raise ValueError("step_size and friction must be positive")

    @staticmethod
    def check_noise(sigma, num_measurements) -> None:
        """``sigma`` positive and ``num_measurements`` a positive integer, where given."""
        if sigma is not None and not 0 < float(sigma) < math.inf:
            raise ValueError(f"sigma must be positive and finite, got {sigma}")
        if num_measurements is not None:
            check_positive_int(num_measurements, "num_measurements")

    def drive(self, generator, target, provider, geometry, sigma, big_m, n, max_evals, progress) -> _Run:
        """Start near :math:`q_\\sigma` (centre plus :math:`\\sqrt{\\sigma^2 + s^2}` noise, drawn for
        both variants) and run the variant's driver."""
        h = self.step_size * sigma if self.walk == "underdamped" else self.step_size * 0.1 * sigma**2
        gamma, d, center = self.friction / sigma, target.dim, geometry["center"]
        spread0 = math.sqrt(sigma**2 + geometry["scale"] ** 2)
        y0 = center + spread0 * torch.randn(
            n, d, generator=generator, dtype=center.dtype, device=center.device
        )
        length = big_m if self.variant == "sms" else self.jms_steps
        bar = progress_bar(length, f"{self.variant} (sigma={sigma:.3g}, M={big_m})", progress)
        if self.variant == "sms":
            make_walk = (
                (lambda s: underdamped_walk(s, h, gamma))
                if self.walk == "underdamped"
                else (lambda s: ula_walk(s, h))
            )
            steps = (self.first_steps, self.steps_per_measurement)
            run = _run_sms(generator, target, provider, y0, sigma, big_m, make_walk, steps, max_evals, bar)
        else:
            run = _run_jms(
                generator, target, provider, geometry, sigma, big_m, (h, gamma, self.jms_steps), (n, d), bar
            )
        bar.close()
        return run


def _score(target, smoothed_score, estimator, estimator_options, generator):
    """The smoothed score, reset, and for a learned one
    :func:`~diffstat.smoothing.fit.learned_score_report`'s ``(attrs, rejected)``."""
    evals0 = target.num_target_evals
    with worded_for("sms"):
        provider: SmoothedScore = resolve_smoothed_score(
            target, smoothed_score, estimator=estimator, generator=generator, **(estimator_options or {})
        )
    provider.reset()
    if not isinstance(provider, LearnedSmoothedScore):
        return provider, {}, False
    fitted = target.num_target_evals - evals0 if smoothed_score is None else None
    return provider, *learned_score_report(provider, target, fitted)


def _noise(target, provider, mixture, given: tuple, generator, device):
    """``(geometry, sigma, M, w2_tol)`` from ``given = (sigma, num_measurements, w2_tol)`` and the
    geometry: a learned score's particles', else :func:`~diffstat.smoothing.geometry.default_noise`'s
    (whose explored modes seed a training-free score's mode bank)."""
    learned = isinstance(provider, LearnedSmoothedScore)
    if learned and mixture is None and provider.geometry is not None:
        center = provider.geometry["center"].to(device=device, dtype=target.dtype)
        geometry = dict(provider.geometry, center=center)
    else:
        need_sigma = given[0] is None or given[1] is None
        geometry = default_noise(target, generator, device, need_sigma=need_sigma, mixture=mixture)
    if isinstance(provider, LaplaceSmoothedScore) and "modes" in geometry:
        provider.bank.add(geometry["modes"].modes, geometry["modes"].precisions)
    sigma, big_m, w2_tol = noise_levels(geometry, target.dim, *given, learned)
    return geometry, sigma, check_positive_int(big_m, "num_measurements"), w2_tol


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
    r"""Sequential multimeasurement sampling: ``num_chains * num_samples`` independent runs, one draw
    each, reported as ``num_chains`` chains (default 4) of ``num_samples`` draws (module doc).

    Parameters
    ----------
    sigma, num_measurements, w2_tol : optional
        The noise level and ``M``; defaults from the diameter rule and the W2 bound with tolerance
        ``w2_tol`` (:mod:`~diffstat.smoothing.geometry`).
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
    variant, jms_steps : ``"sms"`` or ``"jms"``; int
        Sequential or joint; Langevin steps of the joint variant.
    mixture : optional
        A Gaussian mixture (``means``, ``covs``, ``mean``, ``cov``) whose exact geometry sets the
        defaults of ``sigma`` and ``num_measurements``; by default the geometry is explored from the
        log-density. Exact information is used only when passed explicitly.
    max_evals_per_draw : float or None
        Budget of a training-free estimator (``"laplace"``, ``"importance"``, ``"mcmc"``), in target
        evaluations per draw (default 1e4, the cost a learned score stays under with its fit): once
        spent, the measurements stop at the current ``m`` (the W2 bound grows to
        :math:`\sigma^2 d/m`, reported) and a ``RuntimeWarning`` says so. None: no cap.
    """
    num_chains = 4 if num_chains is None else num_chains
    n = num_chains * num_samples
    opts = _Options(variant, walk, steps_per_measurement, first_steps, step_size, friction, jms_steps)
    opts.check_noise(sigma, num_measurements)  # bad input refused before any work (a fit, a search)
    provider, score_attrs, rejected = _score(target, smoothed_score, estimator, estimator_options, generator)
    learned = isinstance(provider, LearnedSmoothedScore)
    num_mala = check_num_mala(num_mala, _LEARNED_MALA if learned else _DEFAULT_MALA)
    geometry, sigma, big_m, w2_tol = _noise(
        target, provider, mixture, (sigma, num_measurements, w2_tol), generator, device
    )
    max_evals = max_evals_per_draw if provider.uses_target and not learned else None
    run = opts.drive(generator, target, provider, geometry, sigma, big_m, n, max_evals, progress)
    s2 = sigma**2 / run.num_measurements
    fisher = provider.fisher_information() if learned else None  # the correction's preconditioner
    x, lp, acc, h_mala = correct(generator, target, run.x_hat, run.ybar, s2, num_mala, fisher)
    attrs = {"sigma": sigma, "w2_tol": w2_tol, "noise_source": geometry["source"], "variant": variant}
    attrs.update(num_mala=num_mala, mala_step_size=h_mala, mala_acceptance=float(acc.mean()), **score_attrs)
    return _result(x, lp, acc, (num_chains, num_samples), run, provider, rejected, attrs)


def _result(x, lp, acc, shape, run: _Run, provider, rejected: bool, attrs: dict) -> SamplerResult:
    """Draws ``(num_chains, num_samples, d)`` with their divergence marks: the score's self-check
    (module doc; its bias is systematic and the mode bank shared, so a failed check marks every draw),
    a score fitted to another target, non-finite draws; and the attrs."""
    n, big_m, sigma, num_mala = x.shape[0], run.num_measurements, attrs["sigma"], attrs["num_mala"]
    fit_ess = run.diagnostics.fit_ess()
    score_failed = fit_ess < _MIN_MEAN_FIT_ESS
    diverging = ~torch.isfinite(x).all(-1) | ~torch.isfinite(lp) | score_failed | rejected
    num_div = int(diverging.sum())
    if num_div:
        reason = (
            f"the training-free smoothed score failed its self-check (mean importance ESS fraction of its "
            f"Laplace fits {fit_ess:.2f} < {_MIN_MEAN_FIT_ESS}: p(x | y) is far from Gaussian and its "
            "estimate of E[X | y] biased; pass smoothed_score= or use an MCMC method)"
            if score_failed
            else "the smoothed score passed was fitted to another target"
            if rejected
            else "non-finite draws"
        )
        warnings.warn(
            f"SMS: {num_div} of {n} draws are unreliable (sample_stats 'diverging'): " + reason,
            RuntimeWarning,
            stacklevel=3,
        )
    attrs.update(
        num_measurements=big_m,
        final_noise=math.sqrt(sigma**2 / big_m),
        w2_bound=sigma**2 * x.shape[1] / big_m,
        budget_hit=run.budget_hit,
        smoothed_score=type(provider).__name__,
        num_divergent=num_div,
        score_fit_ess=fit_ess,
        correction_evals=int(n * (num_mala + 1)) if num_mala > 0 else n,
    )
    if isinstance(provider, LaplaceSmoothedScore):
        attrs["num_hessian_evals"] = int(provider.num_hessian_evals)
        attrs["mode_bank_size"] = len(provider.bank)
    stats = {"lp": lp, "acceptance_rate": acc, "step_size": torch.full_like(lp, attrs["mala_step_size"])}
    stats["diverging"] = diverging
    return SamplerResult(
        draws=x.reshape(*shape, x.shape[1]),
        sample_stats={k: v.reshape(shape) for k, v in stats.items()},
        groups={"sms": {k: torch.tensor(v, dtype=torch.float64) for k, v in run.diagnostics.rows.items()}},
        attrs=attrs,
    )
