r"""The SMC bridge: the diffusion sampler's correction where importance sampling cannot give the
answer.

Importance sampling is sequential Monte Carlo with one stage: it is exact only when the proposal
:math:`q` covers the target :math:`p` well enough for one reweighting. Where every round misses
(high dimension; shapes that per-mode Gaussians and flows cannot follow) the sampler bridges from
:math:`q` to :math:`p` in many small stages instead: adaptive tempered SMC on the geometric path

.. math::
    \pi_\beta(x) \propto q(x)^{1-\beta}\, p(x)^{\beta}, \qquad 0 = \beta_0 < \dots < \beta_S = 1,

with :math:`q` the per-mode Gaussian mixture of the rounds, each mode's moment Gaussian joined by its
Laplace Gaussian (:func:`with_laplace`; :class:`ProposalDistribution`: a closed-form density, exact
draws), run by :func:`~diffstat.tempering.to_target.temper_to_target`
(as the D&C exact-product SMC), each stage the tempering samplers' own
:func:`~diffstat.tempering.core.tempered_step`: the next :math:`\beta` where the conditional ESS of
the increments is 0.5 (:func:`~diffstat.tempering.smc.next_beta`; Zhou, Johansen and Aston 2016),
systematic resampling below an ESS fraction of 0.5, MALA moves preconditioned by the particles'
covariance pooled within clusters (:func:`~diffstat.tempering.core.cloud_metric`), until decorrelated
or a fixed count. The metric is dense, shrunk toward its diagonal until the ESS reaches 10 per
dimension (as the D&C exact-product SMC): the ``"auto"`` metric's diagonal below that ESS left a 40-d
Gaussian of correlation 0.9 0.5 to 0.9 nats low with 750 particles, the dense one within its error.
At :math:`\beta = 1` the particles are resampled once more and moved, so the draws are equally
weighted. :math:`\log\hat Z = \sum_s \log\sum_i W_i g_i` is unbiased for :math:`Z` on the
natural scale (Del Moral, Doucet and Jasra 2006); its standard error comes from the genealogy
(:func:`~diffstat.tempering.smc.genealogy_variance`, Chan and Lai 2013).

**Budget.** The run as a whole keeps to ``max_evals`` target evaluations (1,000,000, the issue's
budget). The bridge gets what the rounds left, :math:`B`: ``BRIDGE_EVALS_PER_PARTICLE`` (400) per
particle, :math:`n = B / 400` clipped to [``MIN_PARTICLES``, ``MAX_PARTICLES``], room for about 20
stages of 20 moves, what the bridges measured on sonar and ionosphere took
(``docs/diffusion_sampler.md``). Each stage moves until decorrelated (at most ``MAX_MOVES``) within
the budget left after keeping ``FINAL_MOVES`` (10) moves a particle for the last stage, at the
target itself; a stage with none left only reweights and resamples (and the checks below say so).

**When to bridge.** The rounds stop early and leave their budget to the bridge once a round missed
by far and in the way more rounds repeat (:func:`bridge_now`): Pareto :math:`\hat k` above
``FAR_PARETO_K`` (1: the weights' mean no longer exists, Vehtari et al. 2024), a Kish ESS below
``MIN_ROUND_ESS``, and a log-weight variance :math:`\hat\sigma^2 = \ln(n/\mathrm{ESS})` (exact for
log-normal weights) below ``FIT_MARGIN`` (2) times :math:`d(d+3)/(2m)`, twice the expected
Kullback-Leibler divergence of a :math:`d`-dimensional Gaussian fitted to :math:`m` draws
(``refresh_chains`` per mode, what the next round refits each mode's Gaussian to). Such a miss is the
fit's own sampling error, spread over many dimensions, which a refit of the same size makes again; a
miss far above it is a mode missed in place or scale, which restocking from the best particles
repairs. A pooled bank (its Gaussian part fitted per coordinate) and ``bridge=False`` never stop
early.

**Judged by its own diagnostics.** The bridge is unreliable (a ``RuntimeWarning``, ``reliable`` 0)
when it ran with fewer than ``PARTICLES_PER_DIM`` (10) particles per dimension, when a stage
before the last had no moves, when its last stage used all ``MAX_MOVES`` (100) moves (particles still
drifting: on Neal's funnel the neck is never equilibrated and log Z stays 0.7 to 1 nat low), when its
genealogy collapsed to fewer than ``MIN_EVES`` (20) distinct initial particles (the
error estimate rests on the Eve families, and fewer than 20 give it to no better than 30%, the
``MIN_ROUND_ESS`` argument), or when fewer than ``MIN_DISTINCT`` (90%) of its final draws are
distinct (moves that do not move leave the duplicates of the final resampling: MALA at its target
acceptance 0.57 leaves both copies of a pair in place after :math:`k` moves with probability
:math:`0.43^{2k}`, 0.02% at five moves), or when its last stage's moves left the particles
within ``MIN_DECORRELATION`` (0.5, against 2 for independent draws) whitened squared distance per
dimension of where they started.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from diffstat.diffusion.gaussians import GaussianMixtureProposal, MeanFieldMixture
from diffstat.diffusion.importance import MIN_ROUND_ESS, unique_rows
from diffstat.modes.laplace import newton_ascent
from diffstat.tempering.core import MoveConfig, cloud_metric, stack_stage_infos
from diffstat.tempering.path import GeometricPath, make_path
from diffstat.tempering.smc import genealogy_variance
from diffstat.tempering.to_target import temper_to_target

__all__ = [
    "ProposalDistribution",
    "BridgeResult",
    "bridge_weights",
    "bridge_now",
    "with_laplace",
    "bridge_size",
    "smc_bridge",
    "bridge_reasons",
    "MAX_EVALS",
    "BRIDGE_EVALS_PER_PARTICLE",
    "MIN_PARTICLES",
    "MAX_PARTICLES",
    "MIN_EVES",
    "MIN_DISTINCT",
    "MIN_DECORRELATION",
    "FIT_MARGIN",
    "FAR_PARETO_K",
]

#: Target evaluations a whole run may spend (issue 15's budget), the rounds and the bridge together.
MAX_EVALS = 1_000_000
#: Evaluations per bridge particle: about 20 stages of about 20 moves (module docstring).
BRIDGE_EVALS_PER_PARTICLE = 400
#: Fewest particles the bridge runs with: below it the cloud metric and the genealogy's error rest on
#: too few points; a starved bridge runs with this many and its own checks say so.
MIN_PARTICLES = 128
#: Most particles: beyond 4,096 the budget buys more by moves than by particles.
MAX_PARTICLES = 4096
#: Fewest distinct Eves (initial particles with surviving descendants) of a sound bridge.
MIN_EVES = int(MIN_ROUND_ESS)
#: Fewest particles per dimension of a sound bridge: the covariance its moves are preconditioned by
#: needs about 10 effective particles per dimension (the ``"auto"`` metric of SMC turns dense there).
PARTICLES_PER_DIM = 10
#: Least share of distinct final draws of a bridge whose moves move.
MIN_DISTINCT = 0.9
#: Least whitened squared distance per dimension that the last stage's moves carry the particles.
MIN_DECORRELATION = 0.5
#: Monotone Newton steps from each mode's centre before its Laplace fit (:func:`with_laplace`).
LAPLACE_NEWTON_STEPS = 10
#: Most modes, and largest dimension, given a Laplace component: a Hessian costs ``dim`` backward
#: passes per mode and ``dim^2`` memory.
LAPLACE_MAX_MODES, LAPLACE_MAX_DIM = 64, 256
#: Defensive share of uniform mode weights in q, so that a mode the missed rounds weighed at zero
#: still starts particles (the SMC moves cannot be relied on to find it).
UNIFORM_SHARE = 0.1
#: Most moves of a stage (as SMC's ``max_mcmc_steps``); a last stage that needs them all has particles
#: still drifting after 100 moves, a metric that does not fit the target's scales (Neal's funnel's neck).
MAX_MOVES = 100
#: Moves per particle kept back for the last stage, at the target itself: after the final resampling,
#: 10 MALA moves leave both copies of a duplicated particle in place with probability 0.43^20.
FINAL_MOVES = 10
#: Most stages (as :class:`~diffstat.tempering.smc.SMCConfig`'s ``max_stages``).
MAX_STAGES = 1000
#: How many times the log-weight variance that a Gaussian fit's sampling error alone gives (d(d+3)/(2m))
#: a missed round may reach and still count as that error (:func:`bridge_now`): the rounds that never
#: recovered reached 0.7 to 1.6 times it (sonar, a 50-d Gaussian), the first rounds that later rounds
#: repaired 2.1 (ionosphere, 34-d) and 11 and more (a 10-d funnel, a 2-d Gaussian of sd 0.001;
#: ``docs/diffusion_sampler.md``). With 2 no round of ESS below 20 of 4,096 proposals stops a run of
#: 256 chains a mode in 35 or fewer dimensions.
FIT_MARGIN = 2.0
#: Pareto k above which a round missed by far: the weights' tail has no mean (Vehtari et al. 2024).
FAR_PARETO_K = 1.0


class ProposalDistribution(torch.distributions.Distribution):
    r"""The importance rounds' Gaussian part :math:`q` as a torch Distribution: the per-mode mixture
    :math:`\sum_k \pi_k \mathcal N(\mu_k, L_k L_k^\top)`
    (:class:`~diffstat.diffusion.gaussians.GaussianMixtureProposal`) or the per-coordinate product of
    a pooled bank (:class:`~diffstat.diffusion.gaussians.MeanFieldMixture`). ``log_prob`` is the
    closed form; ``sample`` draws i.i.d. (components multinomially, not stratified, so each draw is
    an exact draw of :math:`q`), from the global generator that
    :meth:`~diffstat.tempering.path.GeometricPath.sample_reference` seeds from the run's."""

    arg_constraints: dict = {}
    support = torch.distributions.constraints.real_vector

    def __init__(self, mixture: GaussianMixtureProposal | MeanFieldMixture):
        self.mixture = mixture
        super().__init__(torch.Size(), torch.Size([mixture.means.shape[1]]), validate_args=False)

    def sample(self, sample_shape=()) -> torch.Tensor:
        n = int(torch.Size(sample_shape).numel())
        m = self.mixture
        if isinstance(m, MeanFieldMixture):
            seed = int(torch.randint(0, 2**62, (1,)))
            return m.sample(n, torch.Generator(m.loc.device).manual_seed(seed)).reshape(*sample_shape, -1)
        comp = torch.multinomial(m.weights.double().cpu(), n, replacement=True).to(m.means.device)
        z = torch.randn(n, m.means.shape[1], 1, dtype=m.means.dtype).to(m.means.device)
        return (m.means[comp] + (m.chols[comp] @ z).squeeze(-1)).reshape(*sample_shape, -1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixture.log_prob(x)


def bridge_weights(mode_weights: torch.Tensor) -> torch.Tensor:
    """The mode weights ``(K,)`` of :math:`q`: the rounds' estimates with ``UNIFORM_SHARE`` of
    uniform weights (uniform where the estimates are all zero)."""
    w = mode_weights.double().clamp_min(0.0)
    w = w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / w.numel())
    return (1 - UNIFORM_SHARE) * w + UNIFORM_SHARE / w.numel()


def with_laplace(target, mixture, inflate: float):
    r"""``mixture`` with each mode's moment Gaussian joined by its Laplace Gaussian at equal shares:
    :math:`\pi_k [\tfrac12 \mathcal N(\mu_k, \Sigma_k) + \tfrac12 \mathcal N(m_k, c^2 H_k^{-1})]`,
    :math:`m_k` the peak of the quadratic model of :math:`\log p` after ``LAPLACE_NEWTON_STEPS``
    monotone Newton steps (:func:`~diffstat.modes.laplace.newton_ascent`) from the mode's centre,
    :math:`H_k` the negative Hessian of :math:`\log p` there and :math:`c^2` = ``inflate``. The
    moment Gaussian has the spread the chains saw, which in high dimension is estimated from too few
    effective draws (a 50-d Gaussian with condition number 1e3: every round's ESS under 8 of 4,096);
    the Laplace Gaussian is exact for a Gaussian target and close for a regression posterior. As a
    defensive mixture the weights are at most twice those of the better of the two. Modes whose
    Hessian is not negative definite, a bank of more than ``LAPLACE_MAX_MODES`` modes, a pooled bank
    or a dimension above ``LAPLACE_MAX_DIM`` keep the moment Gaussians alone. Counts
    ``LAPLACE_NEWTON_STEPS + 1`` evaluations per mode."""
    if not isinstance(mixture, GaussianMixtureProposal):
        return mixture
    k, d = mixture.means.shape
    if k > LAPLACE_MAX_MODES or d > LAPLACE_MAX_DIM:
        return mixture
    covs = mixture.chols @ mixture.chols.transpose(-1, -2)
    s2 = 100.0 * float(torch.diagonal(covs, dim1=-2, dim2=-1).max())  # a proximal scale far above the modes'
    m, _, g, hess = newton_ascent(target, mixture.means, s2, LAPLACE_NEWTON_STEPS)
    prec_chol, info = torch.linalg.cholesky_ex(-hess)
    m = m + torch.cholesky_solve(g.unsqueeze(-1), prec_chol).squeeze(-1)  # the quadratic model's peak
    ok = (info == 0) & torch.isfinite(prec_chol).flatten(1).all(-1) & torch.isfinite(m).all(-1)
    if not bool(ok.any()):
        return mixture
    cov = inflate * torch.cholesky_inverse(prec_chol[ok])
    chol, info = torch.linalg.cholesky_ex(cov)
    good = info == 0
    keep = ok.nonzero().squeeze(1)[good]
    if keep.numel() == 0:
        return mixture
    w = mixture.weights.clone()
    w[keep] = 0.5 * w[keep]
    return GaussianMixtureProposal(
        torch.cat([mixture.means, m[keep]]), torch.cat([mixture.chols, chol[good]]), torch.cat([w, w[keep]])
    )


def bridge_now(summary: dict, dim: int, fit_draws: int) -> bool:
    r"""Whether a round (an :func:`~diffstat.diffusion.importance.importance_summary` with its
    ``num_proposals`` :math:`n`) missed so that more importance rounds are hopeless (module docstring):
    Pareto :math:`\hat k` above ``FAR_PARETO_K``, a Kish ESS positive and below ``MIN_ROUND_ESS``,
    and a log-weight variance :math:`\ln(n/\mathrm{ESS})` below ``FIT_MARGIN`` times
    :math:`d(d+3)/(2m)`, the one a ``dim``-dimensional Gaussian fitted to :math:`m` = ``fit_draws``
    independent draws gives by its sampling error alone (twice its expected Kullback-Leibler
    divergence, :math:`d + d(d+1)/2` parameters over :math:`2m`). A round without a finite weight
    (ESS 0) missed in place, not in shape, and is not hopeless."""
    ess, n = float(summary["ess"]), int(summary["num_proposals"])
    if not (summary["pareto_k"] > FAR_PARETO_K and 0.0 < ess < MIN_ROUND_ESS):
        return False
    return math.log(n / ess) < FIT_MARGIN * dim * (dim + 3) / (2 * fit_draws)


def bridge_size(budget: int, num_particles: int | None = None) -> int:
    """Particles of a bridge with ``budget`` evaluations left (module docstring), or
    ``num_particles`` when given."""
    if num_particles is not None:
        return int(num_particles)
    return int(min(MAX_PARTICLES, max(MIN_PARTICLES, budget // BRIDGE_EVALS_PER_PARTICLE)))


class BridgeResult(NamedTuple):
    """A bridge run: equally weighted draws ``x (n, dim)`` with the target's log-density ``lp (n,)``,
    ``log_z`` and ``log_z_se``, the per-stage tensors ``stages`` (of
    :func:`~diffstat.tempering.core.stack_stage_infos`), ``num_eves`` (distinct surviving initial
    particles), ``distinct`` (share of distinct final draws), ``num_particles`` and ``num_evals``."""

    x: torch.Tensor
    lp: torch.Tensor
    log_z: float
    log_z_se: float
    stages: dict[str, torch.Tensor]
    num_eves: int
    distinct: float
    num_particles: int
    num_evals: int


def _move_cap(budget_left: int, n: int, final: bool, num_moves: int | None) -> MoveConfig:
    """The moves of a stage with ``budget_left`` evaluations: until decorrelated, at most 100 (as
    SMC's ``max_mcmc_steps``), or ``num_moves`` when given, within what is left after keeping
    ``FINAL_MOVES`` moves of every particle for the last stage (which may spend them)."""
    cap = max(0, (budget_left - (0 if final else FINAL_MOVES * n)) // n)
    if num_moves is not None:
        return MoveConfig(num_mcmc_steps=min(int(num_moves), cap))
    if cap == 0:
        return MoveConfig(num_mcmc_steps=0)
    return MoveConfig(max_mcmc_steps=min(MAX_MOVES, cap))


def smc_bridge(
    generator: torch.Generator,
    target,
    q: ProposalDistribution,
    *,
    budget: int,
    num_particles: int | None = None,
    num_moves: int | None = None,
    reference=None,
) -> BridgeResult:
    r"""Adaptive tempered SMC from ``q`` to ``target`` (module docstring) within ``budget`` target
    evaluations (the initial draws' included; a stage with none left only reweights).

    Parameters
    ----------
    generator : torch.Generator
    target : Target
        Counts its evaluations (``num_target_evals``).
    q : ProposalDistribution or None
        The start, with a closed-form density; None: the ``"smc"`` method's path from ``reference``
        (:func:`~diffstat.tempering.path.make_path`: the target's reference or, for a model with a
        prior and a likelihood, likelihood tempering).
    budget : int
        Evaluations the bridge may spend.
    num_particles : int, optional
        None: :func:`bridge_size`.
    num_moves : int, optional
        MALA moves per stage (None: until decorrelated, within the budget).

    Returns
    -------
    BridgeResult
    """
    path = GeometricPath(target, q) if q is not None else make_path(target, reference)
    n = bridge_size(budget, num_particles)
    evals0 = target.num_target_evals
    state, infos = temper_to_target(
        generator,
        path,
        n,
        moves=lambda final: _move_cap(budget - (target.num_target_evals - evals0), n, final, num_moves),
        precondition=cloud_metric("dense", within_modes=True, shrink_until=10.0),
        max_stages=MAX_STAGES,
    )
    v, num_eves = genealogy_variance(state.log_weights, state.eve, state.num_resampling, "systematic")
    stages = stack_stage_infos(infos)
    x, lp = state.particles.x, state.particles.target_log_prob
    if float(state.beta) < 1.0:  # never in practice: MAX_STAGES stages did not reach the target
        idx = torch.multinomial(
            torch.softmax(state.log_weights.double(), 0).to(generator.device), n, True, generator=generator
        ).to(x.device)
        x, lp = x[idx], lp[idx]
    distinct = unique_rows(x)[0].shape[0] / n
    log_z = float(stages["log_z_increment"].sum()) if infos else 0.0
    if float(state.beta) < 1.0:
        log_z = -math.inf
    return BridgeResult(
        x, lp, log_z, math.sqrt(v), stages, num_eves, distinct, n, int(target.num_target_evals - evals0)
    )


def bridge_reasons(result: BridgeResult) -> list[str]:
    """Why a bridge is unreliable (empty when its own diagnostics find nothing wrong): too few
    surviving Eves, too few distinct final draws, a last stage whose moves did not move, or no
    arrival at the target."""
    reasons = []
    dim = result.x.shape[1]
    if result.num_particles < PARTICLES_PER_DIM * dim:
        reasons.append(
            f"the SMC bridge ran with {result.num_particles} particles, fewer than the "
            f"{PARTICLES_PER_DIM} per dimension ({PARTICLES_PER_DIM * dim}) its metric needs; raise max_evals"
        )
    idle = int((result.stages["num_mcmc_steps"][:-1] == 0).sum())
    if idle:
        reasons.append(
            f"{idle} of the SMC bridge's {len(result.stages['beta'])} stages had no moves (max_evals spent), "
            "so their resampled duplicates were never separated"
        )
    if not math.isfinite(result.log_z):
        reasons.append(f"the SMC bridge did not reach the target in {MAX_STAGES} stages")
    if result.num_eves < MIN_EVES:
        reasons.append(
            f"the SMC bridge's genealogy collapsed to {result.num_eves} of {result.num_particles} initial "
            f"particles (below {MIN_EVES}), so neither its draws nor its error estimate can be trusted"
        )
    if result.distinct < MIN_DISTINCT:
        reasons.append(
            f"only {result.distinct:.0%} of the SMC bridge's final draws are distinct (below "
            f"{MIN_DISTINCT:.0%}): its moves did not move"
        )
    stages = result.stages
    if len(stages["beta"]):
        if int(stages["num_mcmc_steps"][-1]) >= MAX_MOVES:
            reasons.append(
                f"the SMC bridge's last stage used all {MAX_MOVES} moves without its particles' distance "
                "from their start settling (the moves mix slowly in some direction, as in a funnel's neck)"
            )
        last = float(stages["decorrelation"][-1])
        if not last >= MIN_DECORRELATION:
            reasons.append(
                f"the SMC bridge's last stage moved its particles {last:.2f} (whitened squared distance "
                f"per dimension, below {MIN_DECORRELATION}; independent draws give 2) in "
                f"{int(stages['num_mcmc_steps'][-1])} moves"
            )
    return reasons
