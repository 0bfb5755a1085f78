r"""Sequential Monte Carlo sampler with adaptive tempering: ``ds.sample(target, "smc", ...)``.

Particles start as exact draws from the reference :math:`\pi_0 = \rho` and move along the geometric
path :math:`\pi_\beta \propto \rho^{1-\beta}\tilde\pi^\beta` (:mod:`diffstat.tempering.path`). At
each stage, from :math:`\beta` with normalised weights :math:`W_i`:

1. **Temperature.** :math:`\beta'` is found by bisection so that the conditional ESS of the
   increments :math:`g_i = \exp\{(\beta'-\beta)\delta(x_i)\}` is ``target_ess`` times ``n``
   (Zhou, Johansen and Aston 2016); or 1 if that is reached first. With ``max_pareto_k``
   :math:`k^\star` (off by default) the step is then shortened, by bisection, until the Pareto
   :math:`\hat k` (PSIS, Vehtari et al. 2024) of the updated weights is at most :math:`k^\star`:
   the CESS is a variance and means nothing when the weights have none (:math:`\hat k > 0.5`),
   which is what a target with heavier tails than the reference gives, and where one step of
   infinite-variance weights makes :math:`\log\hat Z` low. Off by default because it shortens
   the bias there without removing it (the last step to a heavier-tailed target has such weights
   at any length) and costs stages elsewhere (figures in ``docs/smc_banana.md``).
2. **Reweight.** :math:`\log w_i \mathrel{+}= \log g_i`, and the evidence increment is
   :math:`\log \hat Z_{\beta'} - \log \hat Z_\beta = \log \sum_i W_i g_i`.
3. **Resample** (multinomial, stratified or systematic) only if the ESS fraction falls below
   ``resample_threshold``; weights are then reset to equal.
4. **Move.** MALA (or HMC, RWM) steps leaving :math:`\pi_{\beta'}` invariant
   (:mod:`diffstat.tempering.moves`), preconditioned by the weighted particle covariance (``metric``:
   dense when there are at least :data:`DENSE_RATIO` (4) effective particles per dimension, else
   diagonal, its shrinkage capped as below), pooled
   within clusters of the particles (``within_modes``) so that each mode of a multimodal stage
   is moved at its own scale; repeated until the particles have decorrelated from where the
   stage started (the mean whitened squared distance from the start stops growing), at most
   ``max_mcmc_steps`` (100) times, or exactly ``num_mcmc_steps`` times when given; the step size
   is adapted toward the kernel's target acceptance after every move.

Why 5 moves per stage (the earlier default) lost mode weight on 6-d three-mode mixtures from
N(0, 36 I): the incremental weights carry each mode's share from stage to stage only if the
particles inside each mode are at equilibrium for the current temperature (and, where the modes
separate, enough of them still change modes); 5 moves at a scale set by the distances between the
modes do neither, and the narrow heavy mode's share and log Z come out low. Measured figures are
in :mod:`diffstat.tempering.moves`.

**Known limitation** (``docs/smc_banana.md``): on a curved target the geometric path from a Gaussian
reference can hold a direction in at intermediate temperatures and release it only in the last
stages (on a banana, where the other coordinates' mean grows with the square of the first, the first
coordinate's spread opens up between :math:`\beta = 0.9` and 1). The moves must then carry the
particles out along the curve within a few stages, where local moves (MALA, HMC) are slow: the draws
come out too narrow and :math:`\log\hat Z` low, the runs agree with each other, and no check here
sees it. More moves or stages narrow the gap only at a high cost; ``"nuts"`` and ``"pt"`` at least
warn there (R-hat across chains).

**Metric on a collinear posterior** (``docs/smc_collinear.md``). The metric is dense from 4 (not 10)
effective particles per dimension, and its shrinkage toward the diagonal, :math:`\lambda = d/n_{\text{eff}}`,
is capped at the least eigenvalue :math:`\mu` of the weighted correlation matrix. A regression on
collinear predictors has a posterior whose correlation matrix is nearly singular (the data pin down
sums of collinear coefficients, the prior their differences): a diagonal part
:math:`\lambda\,\mathrm{diag}(S)` widens the metric along the narrow directions by about
:math:`1 + \lambda/\mu` in variance, MALA's step size falls by its square root and the moves stop
mixing; the cap bounds that factor by 2. The diagonal metric, below the dense threshold, is the
extreme case. The sample covariance of :math:`n_{\text{eff}} \ge 4d` particles is well determined
(whitened eigenvalues within :math:`(1 \pm \sqrt{d/n_{\text{eff}}})^2`), and with the default 50%
CESS steps the weighted cloud keeps about a quarter of the particles effective, so 1,000 particles
are dense at every stage up to about 60 dimensions.

:math:`\log\hat Z = \sum_{\text{stages}} \log\sum_i W_i g_i` is the standard unbiased (on the
natural scale) SMC estimate of :math:`\log Z` (Del Moral, Doucet and Jasra 2006).

Standard error of :math:`\log \hat Z`
-------------------------------------
From the genealogy: with :math:`E_i` the index of the initial particle ("Eve") that particle
:math:`i` descends from and :math:`S_j = \sum_{i: E_i = j} W_i` the final weight of Eve
:math:`j`'s family, after :math:`R` resampling events,

* ``multinomial``: Lee and Whiteley (2018), unbiased for :math:`\mathrm{Var}(\hat Z)/Z^2` up to
  the factor :math:`\hat Z^2`:
  :math:`\hat v = 1 - \left(\tfrac{n}{n-1}\right)^{R+1}\left(1 - \sum_j S_j^2\right)`
  (stages without resampling merged into the next, as for any adaptive schedule fixed in advance);
* ``stratified``/``systematic``: the Chan and Lai (2013) form
  :math:`\hat v = \sum_j S_j^2 - 1/n`, which treats Eve families as independent; these schemes
  add less noise than multinomial, so it is conservative (it is exactly 0 when nothing varies).

The reported standard error is the delta-method :math:`\sqrt{\hat v}`. It needs many distinct Eves:
``num_eves`` is reported, and under :data:`MIN_EVES` (20) ``ds.sample`` warns that log Z, its error
bar and the draws (descendants of so few initial particles) are unreliable.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

from diffstat._util import check_options, check_positive_int, check_probability, pareto_k, progress_bar
from diffstat.tempering.core import (
    MoveConfig,
    StageInfo,
    check_betas,
    check_resampling,
    cloud_metric,
    identity_metric,
    init_tempered,
    initial_particles,
    stack_stage_infos,
    tempered_step,
)
from diffstat.tempering.auto_reference import stages_advice
from diffstat.tempering.path import GeometricPath, PathState, default_step_size
from diffstat.tempering.resampling import conditional_ess, ess

__all__ = [
    "DENSE_RATIO",
    "MIN_EVES",
    "SMCOutput",
    "adaptive_tempered_smc",
    "genealogy_variance",
    "initial_particles",
    "next_beta",
    "tail_limited_beta",
]

#: Fewer distinct initial ancestors (Eves) than this and the genealogy standard error of log Z is
#: unreliable (its variance estimate sums over Eve families: too few terms); PDDS uses the same.
MIN_EVES = 20
#: Effective particles per dimension from which the particle metric is dense (module docstring, "Metric
#: on a collinear posterior"): the sample covariance's whitened eigenvalues then lie within
#: :math:`(1 \pm 1/2)^2`, while a diagonal metric ruins an ill-conditioned posterior.
DENSE_RATIO = 4.0
#: Bisection halvings for the next temperature: 2^-60 is below float64 resolution on [0, 1].
_NUM_BISECTION = 60


class SMCOutput(NamedTuple):
    """Result of one SMC run.

    particles: the final :class:`PathState` (``n`` particles, before any final resampling).
    log_weights: (n,) their unnormalised log weights.
    log_normalizer, log_normalizer_se: :math:`\\log\\hat Z` and its standard error (floats).
    stages: per-stage tensors ``beta``, ``ess`` (fraction, after reweighting), ``log_z_increment``,
        ``acceptance_rate`` (mean over particles and moves), ``step_size``, ``resampled``,
        ``num_mcmc_steps`` (moves made), ``decorrelation`` (the final mean whitened squared
        distance from the stage's start, per dimension), ``num_clusters``.
    acceptance: (n,) each particle's mean acceptance over the last stage's moves.
    num_resampling, num_eves: resampling events and distinct surviving Eves.
    """

    particles: PathState
    log_weights: torch.Tensor
    log_normalizer: float
    log_normalizer_se: float
    stages: dict[str, torch.Tensor]
    acceptance: torch.Tensor
    num_resampling: int
    num_eves: int


def _increments(delta: torch.Tensor, beta, new_beta) -> torch.Tensor:
    r""":math:`\log g_i = (\beta' - \beta)\,\delta(x_i)`, ``-inf`` where :math:`\delta` is (never NaN)."""
    return torch.where(delta == -math.inf, -math.inf, (new_beta - beta) * delta)


def next_beta(
    log_w: torch.Tensor, delta: torch.Tensor, beta: torch.Tensor, target_ess: float, criterion: str = "cess"
) -> torch.Tensor:
    r"""The next inverse temperature :math:`\beta' \in (\beta, 1]`, by bisection.

    ``criterion="cess"``: :math:`\mathrm{CESS}(\beta') = ` ``target_ess`` :math:`\cdot n`;
    ``"ess"``: the ESS of the updated weights is ``target_ess`` times the current ESS. Returns 1 if
    the criterion still holds at 1, else the upper end of the final bisection bracket (so the step
    is always positive). A 0-d tensor; no host synchronisation.
    """
    n = log_w.shape[-1]
    if criterion == "cess":
        goal = target_ess * n

        def crit(b):
            return conditional_ess(log_w, _increments(delta, beta, b))

    elif criterion == "ess":
        goal = target_ess * ess(log_w)

        def crit(b):
            return ess(log_w + _increments(delta, beta, b))

    else:
        raise ValueError(f"criterion must be 'cess' or 'ess', got {criterion!r}")
    one = torch.ones_like(beta)
    lo, hi = beta.clone(), one
    for _ in range(_NUM_BISECTION):
        mid = 0.5 * (lo + hi)
        ok = crit(mid) >= goal
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    return torch.where(crit(one) >= goal, one, hi)


def tail_limited_beta(log_w, delta, beta, new_beta, max_k: float, halvings: int = 12):
    r"""``new_beta``, or a smaller step: the largest :math:`\beta'` (by ``halvings`` bisections of
    :math:`(\beta, \beta']`) at which the updated weights' Pareto :math:`\hat k` is at most
    ``max_k`` (module docstring); never less than :math:`2^{-\text{halvings}}` of the step asked, so
    the run always advances. A :math:`\hat k` that cannot be fitted (NaN) counts as 0."""

    def k_at(b):
        k = pareto_k(log_w + _increments(delta, beta, b))
        return k if math.isfinite(k) else 0.0

    if k_at(new_beta) <= max_k:
        return new_beta
    lo, hi = beta, new_beta
    for _ in range(halvings):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if k_at(mid) <= max_k else (lo, mid)
    return lo if float(lo) > float(beta) else hi


def genealogy_variance(
    log_w: torch.Tensor, eve: torch.Tensor, num_resampling: int, scheme: str
) -> tuple[float, int]:
    r"""Estimate of :math:`\mathrm{Var}(\hat Z)/Z^2` from the Eve indices (module docstring) and
    the number of distinct Eves with positive weight."""
    n = log_w.shape[0]
    w = torch.softmax(log_w, -1)
    s = torch.zeros(n, dtype=w.dtype, device=w.device).scatter_add_(0, eve, w)
    sum_s2 = float((s**2).sum())
    if scheme == "multinomial":
        v = 1.0 - (n / (n - 1)) ** (num_resampling + 1) * (1.0 - sum_s2)
    else:
        v = sum_s2 - 1.0 / n
    return max(v, 0.0), int((s > 0).sum())


@dataclass(frozen=True)
class SMCConfig:
    r"""The options of adaptive tempered SMC, validated on construction (a ``ValueError`` naming the bad
    one). ``target_ess`` (0.5) and ``criterion`` (``"cess"``) set the next temperature;
    ``resample_threshold`` (0.5: resample when the ESS fraction falls under it; 0 never, 1 always) and
    ``resampling`` (``"systematic"``, the least noisy of the three schemes); the moves: ``kernel``,
    ``num_leapfrog``, ``target_accept``, ``num_mcmc_steps`` (None: until decorrelated),
    ``max_mcmc_steps`` (100), ``decorrelation_tol`` (0.1), as :class:`~diffstat.tempering.core.MoveConfig`;
    ``metric`` (``"auto"``) and ``within_modes`` (True) of the particle metric, or ``adapt_scale=False``
    for none; ``step_size`` (None: :func:`~diffstat.tempering.path.default_step_size`); ``step_jitter``
    (0: each particle's step size at each move randomised by :math:`e^{a u}`, :math:`u \sim U(-1, 1)`,
    when positive, :mod:`diffstat.tempering.moves`); ``max_pareto_k`` (None: each step's weights'
    Pareto :math:`\hat k` at most this, module docstring); ``betas`` (a
    fixed schedule instead of the adaptive one); ``max_stages`` (1000)."""

    target_ess: float = 0.5
    criterion: str = "cess"
    resample_threshold: float = 0.5
    resampling: str = "systematic"
    kernel: str = "mala"
    num_mcmc_steps: int | None = None
    max_mcmc_steps: int = 100
    decorrelation_tol: float = 0.1
    metric: str = "auto"
    within_modes: bool = True
    num_leapfrog: int = 5
    step_size: float | None = None
    target_accept: float | None = None
    adapt_scale: bool = True
    step_jitter: float = 0.0
    max_pareto_k: float | None = None
    betas: object = None
    max_stages: int = 1000

    def __post_init__(self):
        object.__setattr__(self, "target_ess", check_probability(self.target_ess, "target_ess"))
        if self.criterion not in ("cess", "ess"):
            raise ValueError(f"criterion must be 'cess' or 'ess', got {self.criterion!r}")
        threshold = check_resampling(self.resampling, self.resample_threshold)
        object.__setattr__(self, "resample_threshold", threshold)
        object.__setattr__(self, "max_stages", check_positive_int(self.max_stages, "max_stages"))
        self.moves  # noqa: B018 (validates the move options)
        cloud_metric(self.metric, self.within_modes)  # validates the metric
        if self.max_pareto_k is not None and not 0 < float(self.max_pareto_k) < 1:
            raise ValueError(f"max_pareto_k must lie in (0, 1) or be None, got {self.max_pareto_k}")
        if self.step_size is not None and not float(self.step_size) > 0:
            raise ValueError(f"step_size must be positive, got {self.step_size}")

    @property
    def moves(self) -> MoveConfig:
        return MoveConfig(
            self.kernel,
            self.num_leapfrog,
            self.target_accept,
            self.num_mcmc_steps,
            self.max_mcmc_steps,
            self.decorrelation_tol,
            step_jitter=self.step_jitter,
        )

    @classmethod
    def from_options(cls, options: dict, method: str = "smc") -> SMCConfig:
        """From keyword options; an unknown one is a ``ValueError`` listing the valid ones."""
        check_options(options, {f.name for f in fields(cls)}, method)
        return cls(**options)


def adaptive_tempered_smc(
    generator: torch.Generator,
    path: GeometricPath,
    x0: torch.Tensor,
    *,
    progress: bool = False,
    bar=None,
    **options,
) -> SMCOutput:
    """Run adaptive tempered SMC from the particles ``x0: (n, dim)`` (draws from the reference), with
    the options of :class:`SMCConfig`; each stage is :func:`~diffstat.tempering.core.tempered_step`.

    ``num_mcmc_steps=None`` (default) moves each stage until decorrelated (``decorrelation_tol``,
    at most ``max_mcmc_steps``; a ``RuntimeWarning`` when the cap is hit at the last stages);
    ``num_mcmc_steps=0`` leaves the particles where they are (reweighting and resampling only).
    ``bar``: a tqdm bar to advance by 1,000 over the run (else one of its own when ``progress``).
    """
    config = SMCConfig.from_options(options)
    schedule = None if config.betas is None else check_betas(config.betas, x0)
    if x0.shape[0] < 2:
        raise ValueError(f"SMC needs at least 2 particles, got {x0.shape[0]}")
    precondition = (
        cloud_metric(config.metric, config.within_modes, dense_ratio=DENSE_RATIO, keep_conditioning=True)
        if config.adapt_scale
        else identity_metric
    )
    h0 = default_step_size(config.kernel, path.dim) if config.step_size is None else config.step_size
    state, infos = init_tempered(path, x0, h0), []
    step = functools.partial(
        tempered_step,
        path=path,
        moves=config.moves,
        precondition=precondition,
        resample_threshold=config.resample_threshold,
        scheme=config.resampling,
    )
    with progress_bar(1000, "smc", progress) if bar is None else contextlib.nullcontext(bar) as bar:
        done = 0
        for k in range(config.max_stages if schedule is None else len(schedule)):
            if schedule is None:
                args = (
                    state.log_weights,
                    state.particles.delta,
                    state.beta,
                    config.target_ess,
                    config.criterion,
                )
                new_beta = next_beta(*args)
                if config.max_pareto_k is not None:
                    new_beta = tail_limited_beta(*args[:3], new_beta, config.max_pareto_k)
            else:
                new_beta = schedule[k]
            state, info = step(generator, state, new_beta, stage=k)
            infos.append(info)
            bar.update(int(1000 * float(state.beta)) - done)
            done = int(1000 * float(state.beta))
            bar.set_postfix(stage=k + 1, beta=f"{float(state.beta):.3g}")
            if bool(state.beta >= 1.0):
                break
        else:
            if schedule is None:
                raise RuntimeError(
                    f"SMC did not reach beta = 1 in {config.max_stages} stages "
                    f"(beta = {float(state.beta):.3g}); {stages_advice(path)}"
                )
    if config.num_mcmc_steps is None:
        _warn_if_capped(infos, int(config.max_mcmc_steps), config.decorrelation_tol)
    return _output(state, infos, config.resampling, x0)


def _output(state, infos, scheme: str, x0) -> SMCOutput:
    v, num_eves = genealogy_variance(state.log_weights, state.eve, state.num_resampling, scheme)
    stages = stack_stage_infos(infos)
    log_z = float(stages["log_z_increment"].sum()) if infos else 0.0
    acceptance = infos[-1].acceptance if infos else torch.full((x0.shape[0],), math.nan, dtype=x0.dtype)
    return SMCOutput(
        state.particles,
        state.log_weights,
        log_z,
        math.sqrt(v),
        stages,
        acceptance,
        state.num_resampling,
        num_eves,
    )


def _warn_if_capped(infos: list[StageInfo], cap: int, tol: float) -> None:
    r"""A ``RuntimeWarning`` when one of the last tenth of the stages hit ``max_mcmc_steps`` with the
    whitened distance from its start short of :math:`2(1-\epsilon)` (independent draws give 2): the
    draws may still remember where the tempering put them. (Beyond 2 it is particles changing modes.)"""
    last = infos[-max(1, len(infos) // 10) :]
    if any(i.num_mcmc_steps >= cap and i.decorrelation < 2 * (1 - tol) for i in last):
        warnings.warn(
            f"SMC moves hit max_mcmc_steps = {cap} at the last stages before the particles decorrelated; "
            "the draws may be biased: raise max_mcmc_steps, use kernel='hmc', or reparametrise the target",
            RuntimeWarning,
            stacklevel=3,
        )
