r"""``method="diffusion"``: a diffusion sampler trained from the log-density, corrected by
importance weights; and ``method="gaussian_is"``, its per-mode Gaussian baseline.

The pipeline, in rounds (REFERENCES.md, "Diffusion samplers from a log-density"; the measurements
behind each default are in ``docs/diffusion_sampler.md`` beside the benchmarks that reproduce them):

1. **Explore and bank the modes** (:func:`~diffstat.diffusion.modes.explore_modes`): many short
   MALA chains from the reference at several start scales (the survivors of ``screen_ratio`` times
   as many starts screened by a few steps each: a narrow high mode whose basin holds a tiny share
   of the starts is found by many cheap starts), and more from the particles of a short
   adaptive tempered SMC run (``smc_explore`` particles, the ``"smc"`` method's algorithm), grouped
   by mode only where :math:`\log p` has a barrier between their climbed end points. The scaled
   starts find narrow modes that a wide mode hides from tempering; the SMC particles reach the
   posteriors that short chains from a diffuse prior never do (regressions thousands of times
   narrower than the prior and correlated at 0.999: posteriordb's earnings, kidiq, mesquite, nes).
   Where the climbed points cannot list the modes (their Good-Turing unseen mass, the share of
   points alone in their mode, above ``MAX_UNSEEN`` = 0.1: many-well(32) has :math:`2^{16}` modes),
   they are not grouped (a barrier test per pair of modes) and the SMC particles, which visit modes
   in proportion to their mass, form one *pooled* mode; its Gaussian part is then the product of
   per-coordinate two-component mixtures (:class:`~diffstat.diffusion.gaussians.MeanFieldMixture`),
   which covers every combination of the coordinates' components that no list of modes holds.
2. **Balance** (:func:`~diffstat.diffusion.restock.balance_modes`): restock every mode with local
   MALA chains, so each mode has the same number of training particles, with their gradients
   (training on the raw explored particles, a handful in a narrow mode, fails). A bank of more
   than ``MAX_FULL_MODES`` (64) modes shares 64 modes' worth of chains among them
   (:func:`~diffstat.diffusion.rounds.chains_per_mode`, here and at every restock), so the work
   does not grow with the bank.
3. **Importance round with the per-mode Gaussians** (``gaussian_rounds``, default 1): the
   moment-matched Gaussians :math:`q_{\mathrm{gauss}} = \sum_k \pi_k \mathcal N(\mu_k, c^2\Sigma_k)`
   alone; its weighted particles are resampled (``refresh_chains`` per mode) and moved by
   ``refresh_steps`` local MALA steps, a training set that covers each mode's shape.
4. **Fit** score models (:class:`~diffstat.diffusion.networks.ScoreMLP`, VP process with horizon
   ``t_max`` = 0.6, beyond which the linear schedule is pure noise for whitened data) by the mixed
   TSM/DSM loss with the gradients already computed, on whitened particles
   :math:`y = L^{-1}(x - m)`, :math:`\nabla_y \log p = L^\top \nabla_x \log p`: one model per mode
   when there are at most ``max_mode_models`` modes, each whitened by its mode's full covariance.
   The output layer starts at zero and the preconditioned output is the residual to the exact
   score :math:`-y` of the noised :math:`\mathcal N(0, I)`, so every model starts as its mode's
   Gaussian and learns only the departure from it. The banks keep every MALA state of the second
   half of each chain, and with ``train_on_restarts`` the distinct (not repeated) resampled
   importance particles the chains start from: the fits are data-limited.
   **Check** (``gaussian_fallback``): ``held_out`` weighted particles of the last round per mode
   compare each mode's defensive mixture with its Gaussian alone by the held-out cross-entropy
   :math:`\frac1m\sum_i[\log p(x_i) - \log q(x_i)]`
   (:func:`~diffstat.diffusion.proposals.held_out_cross_entropy`, no target evaluations); a mode
   whose model loses proposes from its Gaussian (``model_choice`` = -1). It catches a failed fit,
   not a slightly worse one.
5. **Propose and correct**: the defensive mixture
   :math:`q = w_d q_{\mathrm{diff}} + (1 - w_d) q_{\mathrm{gauss}}`
   (:class:`~diffstat.diffusion.proposals.DefensiveMixture`, :math:`w_d` = ``diffusion_weight``,
   0.9: the weights stay below 10 times the Gaussian importance weights, while the Gaussian draws
   cost 10% of the proposals), :math:`q_{\mathrm{diff}}` the probability-flow pushforward with its
   exact log-density. Self-normalised weights :math:`w_i = p(x_i)/q(x_i)` give mode weights,
   :math:`\log\hat Z = \log \frac1n\sum_i w_i` with a delta-method standard error, the Kish ESS
   overall and per mode, and the Pareto :math:`\hat k` of the weights
   (:func:`~diffstat._util.pareto_smooth`). While the ESS fraction is below ``target_ess``,
   restock from the weighted particles, refit the Gaussians with :math:`\pi` = half the estimated
   mode weights plus half uniform (so no mode is starved), warm-start the score models, and
   propose again; ``final_proposals`` sets the size of the last round.

A round **missed** when its weights say so: Pareto :math:`\hat k > 0.7` (``MAX_PARETO_K``: the
weights' tail is too heavy for the estimate's error to fall at a usable rate, Vehtari et al.
2024), a Kish ESS below 20 (``MIN_ROUND_ESS``: too few points to fit the Pareto tail or to
estimate a variance to within 30%), or a weight of :math:`+\infty`. Every estimate is taken from
the rounds that did not miss, called *used*, on log scales only (real posteriors have
:math:`|\log Z|` in the thousands, beyond the 709 nats a float exponent holds):

* :math:`\log\hat Z = \log\sum_{r\ \mathrm{used}} \lambda_r \hat Z_r` by ``logsumexp``, with
  :math:`\lambda_r \propto` the round's Kish ESS and the delta-method standard error
  :math:`\sqrt{\sum_r \lambda_r^2 \hat Z_r^2 \mathrm{se}_r^2}/\hat Z`. Each :math:`\hat Z_r` is
  unbiased given its proposal, so any convex combination is too; a missed round is left out,
  because its :math:`\hat Z_r` is typically far below :math:`Z` and its standard error is no
  error bar.
* The returned draws are a systematic resample (a mode's share within :math:`O(1/n)` of its weight,
  not a binomial :math:`O(1/\sqrt n)`; Douc, Cappe and Moulines 2005), in random order, in which a
  particle of a used round :math:`r` carries :math:`\mu_r` times its Pareto-smoothed normalised
  weight, :math:`\mu_r \propto` the round's smoothed ESS: smoothing caps the few largest weights of a
  heavy tail at a small bias (Vehtari et al. 2024); :math:`\hat Z` keeps the raw weights (unbiased).

If every round missed, the draws and :math:`\log\hat Z` are those of the round with the largest
Kish ESS alone, ``attrs["reliable"]`` is 0 (else 1), and a ``RuntimeWarning`` gives every round's
:math:`\hat k` and ESS and what to change; the draws and ``log_weight`` are never NaN. The
per-round ``used`` flags are in the ``diffusion`` group.

A proposal that misses part of the mass in every round passes the rule above (no weight there to
be heavy), so three more checks judge the run as a whole, and each makes ``reliable`` 0 with a
``RuntimeWarning``: the used rounds' :math:`\log\hat Z_r` must agree within their errors
(Cochran's Q above the :math:`\chi^2` quantile at ``MIN_AGREEMENT_P``; the reported error is
scaled by the Birge ratio :math:`\max(1, \sqrt{Q/\nu})` in any case), and the last round's ESS
fraction must reach ``MIN_FINAL_ESS_FRACTION`` (0.1; or ``target_ess`` if lower): after every
round of learning, a proposal that still wastes nine in ten draws does not fit the target's shape;
and the last used round's proposal must cover the exploration's SMC particles, draws it did not make
(:mod:`diffstat.diffusion.coverage`): at most 5% of them may lie where :math:`p / (\hat Z q)` exceeds
100 (a funnel's neck missed). A fourth looks past the weights at the draws returned
(:mod:`diffstat.diffusion.stein`, at most 4,096 gradients): they must satisfy Stein's identity
:math:`E[(x_j - \bar x_j)\partial_j\log p] = -1`; its failure warns, but starts no bridge.

**The SMC bridge** (:mod:`diffstat.diffusion.bridge`, ``bridge`` = True). Where those rules make the
rounds unreliable, importance sampling, SMC with one stage, is replaced by many: adaptive tempered SMC on
:math:`q^{1-\beta}p^\beta` from the rounds' Gaussian mixture :math:`q` (the estimated mode weights with
10% uniform; each mode's Gaussian joined by its Laplace fit), or, where the coverage check failed, from
the reference (the ``"smc"`` method's path, which reached the mass :math:`q` misses), whose log Z
(unbiased, genealogy standard error), draws and per-stage records (``bridge_*`` in the ``diffusion``
group) are then returned, with ``attrs["correction"]`` = ``"smc"`` (else ``"importance"``) and the rounds'
own estimate as ``importance_log_normalizer``. It spends what the rounds left of ``max_evals`` (1,000,000,
the run's budget), and the rounds stop early to leave it more (``attrs["rounds_stopped_early"]``,
:func:`~diffstat.diffusion.rounds.hopeless`) once a round missed by far (Pareto k above 1, Kish ESS
below 20) yet by no more than twice what the sampling error of the Gaussians fitted to the next round's
chains gives by itself (:func:`~diffstat.diffusion.bridge.bridge_now`): such a miss is spread thin over
many dimensions (sonar's 61) and a refit of the same size repeats it, where a miss far beyond it (a mode
missed in place or scale, as in 2-d) is what restocking repairs. A bridge that degenerates (too few
particles, collapsed genealogy, moves that do not move or never settle) keeps ``reliable`` 0 and the
warning, which then names its failure too. Runs whose rounds are reliable never start it, and are
unchanged bit for bit.

The code: :func:`~diffstat.diffusion.rounds.init` (steps 1, 2), :func:`~diffstat.diffusion.rounds.step`
(a round), :mod:`diffstat.diffusion.importance` (judging, pooling), the loop :func:`run_diffusion_sampler`.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from diffstat._util import check_options, progress_bar
from diffstat.diffusion.coverage import checked_coverage, coverage_attrs
from diffstat.diffusion.bridge import (
    MIN_PARTICLES,
    ProposalDistribution,
    bridge_reasons,
    bridge_weights,
    smc_bridge,
    with_laplace,
)
from diffstat.diffusion.importance import (
    MAX_PARETO_K,
    MIN_FINAL_ESS_FRACTION,
    MIN_ROUND_ESS,
    importance_summary,
    missed_warning,
    pool_rounds,
    round_agreement,
    round_missed,
    unreliable_reasons,
    unreliable_warning,
)
from diffstat.diffusion.rounds import RoundInfo, RoundState, done, hopeless, init, step
from diffstat.diffusion.sampler_config import DiffusionConfig
from diffstat.diffusion.stein import STEIN_DRAWS, cut_off, stein_attrs, stein_checked
from diffstat.diffusion.sampler_output import (
    bridge_attrs,
    bridge_draws,
    pooled_log_weights,
    round_group,
    stack_runs,
)
from diffstat.sampling import SamplerResult, register_sampler
from diffstat.tempering.resampling import systematic

__all__ = ["run_diffusion_sampler", "importance_summary", "round_missed", "pool_rounds", "round_agreement"]
__all__ += ["MAX_PARETO_K", "MIN_ROUND_ESS", "RUN_OPTIONS"]

#: Appended to the warning of a run whose rounds stopped early (rounds.hopeless) and whose bridge failed.
STOPPED_EARLY = (
    "The rounds stopped after round {}: it missed by what the Gaussian fits' sampling error gives in {} "
    "dimensions, which more rounds repeat; raise max_evals (the bridge's budget) rather than max_rounds."
)

#: Options of the diffusion and gaussian_is methods: the fields of DiffusionConfig.
RUN_OPTIONS = frozenset(f.name for f in dataclasses.fields(DiffusionConfig)) - {"use_diffusion"}


def run_diffusion_sampler(
    target,
    *,
    num_samples: int,
    num_chains: int | None,
    generator: torch.Generator,
    progress: bool,
    device,
    use_diffusion: bool = True,
    **options,
) -> SamplerResult:
    r"""Run the pipeline of the module docstring: ``init``, then rounds of ``step`` until ``done``,
    then pool the rounds and resample ``num_samples`` draws; ``num_chains`` (None: 1) independent runs.
    ``options`` are the fields of :class:`~diffstat.diffusion.sampler_config.DiffusionConfig` (see
    :func:`diffusion`); ``use_diffusion=False`` is ``method="gaussian_is"``. One progress bar
    counts the exploration and the rounds; the inner phases are silent."""
    method = "diffusion" if use_diffusion else "gaussian_is"
    check_options(options, RUN_OPTIONS, method)
    config = DiffusionConfig(use_diffusion=use_diffusion, **options)
    n_chains = 1 if num_chains is None else num_chains
    results = []
    with progress_bar(n_chains * (config.max_rounds + 1), f"{method}: exploring modes", progress) as bar:
        for _ in range(n_chains):
            state, infos = _one_run(generator, target, config, device, bar, method)
            results.append(_result(generator, target, state, infos, num_samples, config))
    return results[0] if n_chains == 1 else stack_runs(results)


def _one_run(generator, target, config: DiffusionConfig, device, bar, method: str):
    """One independent run: ``init``, then rounds of ``step`` until ``done``; the final state and the
    rounds' infos. Updates ``bar`` once for the exploration and once per round."""
    bar.set_description(f"{method}: exploring modes")
    state = init(generator, target, config, device)
    bar.update()
    infos: list[RoundInfo] = []
    for r in range(config.max_rounds):
        bar.set_description(f"{method}: round {r + 1}")
        state, info = step(generator, state, target, config)
        infos.append(info)
        bar.set_postfix(ess=f"{info.summary['ess']:.0f}")
        bar.update()
        if done(state, info, config):
            bar.update(config.max_rounds - r - 1)
            break
    return state, infos


def _result(
    generator, target, state: RoundState, infos: list[RoundInfo], num_samples: int, config: DiffusionConfig
):
    """Pool the rounds; where the run-level checks find them unreliable, bridge from their proposal
    by SMC (:mod:`diffstat.diffusion.bridge`) within the budget left; warn where neither is reliable.
    Resample ``num_samples`` draws from the rounds or take them from the bridge."""
    rounds = [info.summary for info in infos]
    pool = pool_rounds(rounds)
    reasons = unreliable_reasons(rounds, pool, min(MIN_FINAL_ESS_FRACTION, config.target_ess))
    cover, cover_why = checked_coverage(target, state.pilot, infos, pool["used"])
    reasons += [cover_why] if cover_why else []
    pops = [info.population for info in infos]
    log_pool = pooled_log_weights(rounds, pool, [p.log_w for p in pops])
    all_x, all_lw, all_lp = (torch.cat([getattr(p, f) for p in pops]) for f in ("x", "log_w", "log_prob"))
    p = torch.softmax(log_pool.double(), 0)
    g, num_modes = state.gaussians, state.bank.num_modes
    pooled_modes = (g.component_log_prob(all_x) - torch.log(g.weights)).argmax(-1)
    mode_weights = torch.zeros(num_modes, dtype=torch.float64, device=all_x.device).index_add_(
        0, pooled_modes, p.to(all_x.device)
    )
    rounds_reliable = pool["reliable"] and not reasons
    bridge, bridge_why = None, []
    left = lambda: config.max_evals - (target.num_target_evals - state.evals0)  # noqa: E731
    if not rounds_reliable and config.bridge:  # its budget less the check's (diffusion/stein.py)
        budget = left() - min(STEIN_DRAWS, left() // 10)
        start = None if cover_why else (g, mode_weights)  # missed mass: temper from the reference
        bridge, bridge_why = _run_bridge(generator, target, start, budget, config)
    x_s, lw_s = (all_x, log_pool) if bridge is None else (bridge.x, torch.zeros_like(bridge.lp))
    budget = 0 if cut_off(all_x, all_lp) else left()  # no check of a density cut off at a boundary
    stein, stein_why = stein_checked(generator, target, x_s, lw_s, budget)
    bridge_why += [stein_why] if stein_why and bridge is not None else []
    if rounds_reliable and stein_why:
        warnings.warn(unreliable_warning([stein_why]), RuntimeWarning, stacklevel=3)
    early = len(infos) < config.max_rounds and hopeless(state, infos[-1], config)
    if not rounds_reliable and (bridge is None or bridge_why):
        base = missed_warning(rounds, pool) if not pool["reliable"] else unreliable_warning(reasons)
        why, start = "; ".join(bridge_why), "the reference" if cover_why else "their proposal"
        tail = f" The SMC bridge from {start} that replaced them is not reliable either: {why}."
        tail = "" if not bridge_why else f" And {why}." if bridge is None else tail
        tail += f" {STOPPED_EARLY.format(len(infos), target.dim)}" if early else ""
        warnings.warn(base + tail, RuntimeWarning, stacklevel=3)
    groups = {"diffusion": round_group(rounds, pool, state, bridge)}
    ess = groups["diffusion"]["ess"]
    attrs = {
        "log_normalizer": pool["log_z"],
        "log_normalizer_se": pool["log_z_se"],
        "reliable": int(rounds_reliable and not stein_why),
        "round_agreement_p": pool["agreement_p"],
        "num_modes": num_modes,
        "num_rounds": len(rounds),
        "ess": float(ess[pool["used"]].sum()),  # of the rounds the draws come from
        "num_proposals": int(groups["diffusion"]["num_proposals"].sum()),
        "pareto_k": float(rounds[-1]["pareto_k"]),
        "num_nan_exploration": int(state.explore_nan),
        "correction": "importance" if bridge is None else "smc",
        "rounds_stopped_early": int(early),
        **stein_attrs(stein),
        **coverage_attrs(cover),
        "bridge_start": "none" if bridge is None else "proposal" if not cover_why else "reference",
    }
    if bridge is None:
        idx = systematic(generator, torch.log(p).to(generator.device), num_samples)
        idx = idx[torch.randperm(num_samples, generator=generator, device=generator.device)].to(all_x.device)
        draws, lp, log_w = all_x[idx], all_lp[idx], all_lw[idx]
    else:
        draws, lp = bridge_draws(generator, bridge, num_samples)
        log_w = torch.zeros_like(lp)
        modes = (g.component_log_prob(draws) - torch.log(g.weights)).argmax(-1)
        mode_weights = torch.zeros(num_modes, dtype=torch.float64, device=draws.device).index_add_(
            0, modes, torch.full_like(lp, 1.0 / lp.shape[0], dtype=torch.float64)
        )
        attrs.update(bridge_attrs(bridge, bridge_why, pool))
    attrs["mode_weights"] = mode_weights.cpu().numpy()
    sample_stats = {"lp": lp.reshape(1, num_samples), "log_weight": log_w.reshape(1, num_samples)}
    return SamplerResult(draws.reshape(1, num_samples, target.dim), sample_stats, groups, attrs)


def _run_bridge(generator, target, start, budget: int, config: DiffusionConfig):
    """The SMC bridge (:func:`~diffstat.diffusion.bridge.smc_bridge`) within ``budget`` target
    evaluations, from ``start = (gaussians, mode_weights (K,))``, the rounds' Gaussians reweighted by
    :func:`~diffstat.diffusion.bridge.bridge_weights`, each mode's joined by its Laplace Gaussian
    (:func:`~diffstat.diffusion.bridge.with_laplace`), or with ``start`` None from the reference (the
    ``"smc"`` method's path). Returns the bridge (None where the budget is below two bridges' minimum
    particles) and the reasons it is not reliable (a list of sentences, empty where it is)."""
    if budget < 2 * MIN_PARTICLES:
        left = f"{max(budget, 0):,} of max_evals = {config.max_evals:,}"
        return None, [f"no SMC bridge: the rounds left {left} evaluations"]
    before, (gaussians, mode_weights) = target.num_target_evals, start or (None, None)
    mixture = None if start is None else gaussians.with_weights(bridge_weights(mode_weights))
    q = None if start is None else ProposalDistribution(with_laplace(target, mixture, config.inflate))
    size = dict(num_particles=config.bridge_particles, num_moves=config.bridge_moves)
    budget -= target.num_target_evals - before
    bridge = smc_bridge(generator, target, q, budget=budget, reference=config.reference, **size)
    return bridge, bridge_reasons(bridge)


@register_sampler("diffusion", options=RUN_OPTIONS, typed_by=DiffusionConfig)
def diffusion(target, *, num_samples, num_chains, generator, progress, device, **options) -> SamplerResult:
    r"""Diffusion sampler from the log-density with importance correction (module docstring).

    Options (defaults): exploration ``num_explore`` chains (2000) of ``explore_steps`` MALA steps (20)
    from ``reference`` (the target's, else N(0, I)) scaled by each of ``start_scales`` ((0.5, 1, 2, 4)),
    chosen from ``screen_ratio`` (36; 1 for none) times as many starts after ``screen_steps`` (2) steps
    each, half the highest in log-density and half at random (the basin-hit rate per start is fixed by the
    geometry, so discovery is bought with cheap starts; a start in a narrow high mode's basin ranks at
    the top after a step or two, and at equal evaluations many starts screened briefly find such modes
    more often than fewer screened longer: docs/diffusion_sampler.md), and from the ``smc_explore`` (256;
    0 for none) particles of a tempered SMC
    run (also the coverage check's points); restocking ``chains_per_mode`` chains (128) of
    ``restock_steps`` steps (40); ``gaussian_rounds`` (1) rounds of per-mode Gaussian importance sampling
    first; after each round, ``refresh_chains`` (256) particles per mode resampled and moved by
    ``refresh_steps`` (20) MALA steps; score models ``hidden`` (128) x ``depth`` (3), one per mode if
    ``per_mode_models`` (None: when at most ``max_mode_models`` (4) modes are listed; a pooled bank,
    module docstring, has one model), ``train_steps`` (2000) Adam steps
    of the mixed loss (cosine learning rate from ``lr``, 1e-3;
    ``batch_size`` 256), ``refit_steps`` (500) in later rounds; ``num_proposals`` (4096) per round
    (``final_proposals`` in the last of ``max_rounds``; None: the same; the rounds before it only adapt,
    so a larger last round buys a better answer at one target evaluation per draw), ``diffusion_weight``
    (0.9) of them by the probability-flow ODE with ``ode_steps`` (50) RK4 steps, the rest from the
    per-mode Gaussians with covariances inflated by ``inflate`` (1.2); at most ``max_rounds`` (3) rounds,
    stopping once a diffusion round's ESS fraction reaches ``target_ess`` (0.3). ``num_chains`` (default
    1) independent runs, one after another, each giving ``num_samples`` draws resampled from its pooled
    rounds (log Z pooled over the runs). Model details (module notes): VP horizon ``t_max`` (0.6);
    ``whiten`` (None: "full" per mode, "diag" for one pooled model); restocked banks keep every
    ``refresh_keep_every`` (1) state; ``gaussian_fallback`` (True) on ``held_out`` (512) particles per
    mode; the flow's base widened by ``prior_scale`` (1). A round that missed (Pareto k above 0.7, Kish
    ESS below 20) gives no draws and no log Z; where every round missed or the run-level checks fail,
    the SMC bridge (``bridge``, True) corrects the run within ``max_evals`` (1,000,000) evaluations in
    all, with ``bridge_particles`` (None: 400 evaluations each of what is left, 128 to 4,096) and
    ``bridge_moves`` per stage (None: until decorrelated); if it cannot (``bridge=False``, no budget
    left, or a bridge that degenerates), a ``RuntimeWarning`` says so and ``attrs['reliable']`` is 0
    (module docstring).
    """
    return run_diffusion_sampler(
        target,
        num_samples=num_samples,
        num_chains=num_chains,
        generator=generator,
        progress=progress,
        device=device,
        use_diffusion=True,
        **options,
    )


@register_sampler("gaussian_is", options=RUN_OPTIONS, typed_by=DiffusionConfig)
def gaussian_is(target, *, num_samples, num_chains, generator, progress, device, **options) -> SamplerResult:
    r"""Per-mode Gaussian importance sampling: the same exploration, banking and restocking as
    ``"diffusion"``, then moment-matched Gaussians per mode (no score model). The baseline the
    diffusion sampler must beat where modes are not Gaussian."""
    for key in (
        "diffusion_weight",
        "ode_steps",
        "hidden",
        "depth",
        "train_steps",
        "refit_steps",
        "batch_size",
        "lr",
        "gaussian_fallback",
        "held_out",
        "t_max",
        "whiten",
        "prior_scale",
        "train_on_restarts",
    ):
        if key in options:
            raise ValueError(f"option {key!r} does not apply to gaussian_is")
    return run_diffusion_sampler(
        target,
        num_samples=num_samples,
        num_chains=num_chains,
        generator=generator,
        progress=progress,
        device=device,
        use_diffusion=False,
        **options,
    )
