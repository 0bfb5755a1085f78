r"""Particle populations of the target, with their target gradients: the training data of a learned
smoothed score (:func:`~diffstat.smoothing.fit.fit_smoothed_score`).

A population source is any function

    ``source(target, num_particles, generator, device, **options) -> Population``

so the sampler behind the score can be switched (e.g. to a noised-path SMC) by passing a callable as
``population=``. The learned score inherits the population's mode weights: at large noise the
smoothed score is decided by the relative masses of the modes, which the particles alone carry.

- ``"modes"`` (default): the mode exploration, restocking and per-mode Gaussian importance sampling
  of :mod:`diffstat.diffusion.sampler` (``method="gaussian_is"``), which estimates each mode's
  mass by importance sampling within it, resampled to equal weights and moved by ``num_moves`` MALA
  steps on :math:`p` (they keep :math:`p` invariant and, for separated modes, the mode weights; they
  spread the resampled copies and give the gradients at no extra cost). Measured (2,000 draws,
  seed 0, before the moves): heavy weight 0.739 for 0.75 on the 10-d narrow-heavy/wide-light
  mixture, total variation 0.017 over the nine modes in 2-d, 0.670 for 2/3 on the 8-d two-mode
  target; 0.612 at d = 64 with the sampler's own defaults (hence the larger defaults here).
  The proposals' covariances are inflated by :func:`default_inflate` (1.2, the sampler's default, in
  low dimension; :math:`1 + 0.4/\sqrt d` above): for a Gaussian mode the importance weights of
  :math:`\mathcal N(\mu, c^2\Sigma)` have second moment :math:`(c^2/\sqrt{2c^2 - 1})^d`, 22.7 at
  :math:`c = 1.2`, :math:`d = 64` (ESS fraction 4%: measured 4.0%, and the mode masses off by up to
  0.05), 1.4 on the rule (measured 28%; heavy weight 0.661 and 0.654 for 2/3, seeds 0 and 1).
- ``"nuts"``: NUTS chains of :mod:`diffstat.mcmc`, thinned
  (:mod:`~diffstat.smoothing.mcmc_population`). Equally weighted: a chain stays in the mode it starts
  in, so an MCMC population does not carry mode weights across separated modes (its shares follow
  the starts), which is why ``"modes"`` stays the default where its importance sampling succeeds.
- Fallback (``"modes"`` with ``fallback="nuts"``, the default): when the pipeline distrusts its
  importance weights (the condition of the :class:`FitWarning` below), NUTS chains started at the
  modes' particles (``fallback_options`` go to :func:`mcmc_population`) replace them, the warning
  says so with the chains' evaluations and divergences, and the population's ``source`` (the
  samplers' attribute ``score_population``) is ``"nuts (fallback from modes)"``. Where the weights
  are trusted nothing changes, bit for bit. Rationale: a neck or a heavy tail that the per-mode
  Gaussian proposals miss is reached by the chains (funnel(10), seed 0: sd of :math:`x_1` 2.98 and 1%
  quantile -5.8 for 3 and -7.0, against 2.08 and -3.8 from the importance sampling and its moves;
  docs/sms.md), and the modes' particles give the chains starts in every mode found.
- ``"smc"``: adaptive tempered SMC from the reference (:mod:`diffstat.tempering.smc`), keeping the
  target gradients SMC computed. Tempering lets mode weights drift (measured, 2,000 particles,
  seed 0: heavy weight 0.512 for 0.75 on the narrow-heavy case, 0.556 for 2/3 and 1.000 at d = 8
  and 64 on the two-mode target; nine modes, TV 0.687): kept as an option for unimodal targets.

Warnings: the ``"modes"`` source runs the diffusion pipeline inside, whose own warnings speak of
``diffusion`` options the caller of :func:`~diffstat.smoothing.fit.fit_smoothed_score`, ``sms`` or
``walk_jump`` never passed. They are replaced by a :class:`FitWarning` that says what the population
got wrong and which of the caller's own options give it more work (:meth:`FitWarning.for_caller`
words them for ``sms`` and ``walk_jump``, which reach the population through ``estimator_options``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

from diffstat.smoothing.correction import posterior_mala
from diffstat.smoothing.population_moves import hmc_moves

__all__ = [
    "FitWarning",
    "Population",
    "default_inflate",
    "modes_population",
    "smc_population",
    "get_population",
]

_FITTERS = ("fit_smoothed_score", "sms", "walk_jump")


class FitWarning(RuntimeWarning):
    """A warning of the score's fit, worded for its caller: ``subject`` (what is wrong, e.g. "the
    population that trains the smoothed score"), ``problem`` (how), ``options``, a dict of the fit's
    options that give it more work (of the population source when ``population_level``), and
    ``fallback``, what to do if that does not help. The text names the caller (one of
    ``fit_smoothed_score``, ``sms``, ``walk_jump``) and passes the options as that caller takes them:
    ``fit_smoothed_score`` as keywords, ``sms`` and ``walk_jump`` inside ``estimator_options``."""

    def __init__(
        self,
        subject: str,
        problem: str,
        options: dict,
        population_level: bool,
        fallback: str = "",
        caller: str = "fit_smoothed_score",
    ):
        if caller not in _FITTERS:
            raise ValueError(f"caller must be one of {_FITTERS}, got {caller!r}")
        self.subject, self.problem, self.options, self.fallback = subject, problem, dict(options), fallback
        self.population_level, self.caller = population_level, caller
        super().__init__(self._text())

    def for_caller(self, caller: str) -> FitWarning:
        """The same warning worded for ``caller``."""
        return FitWarning(
            self.subject, self.problem, self.options, self.population_level, self.fallback, caller
        )

    def _text(self) -> str:
        opts = {"population_options": self.options} if self.population_level else self.options
        if self.caller == "fit_smoothed_score":
            how = ", ".join(f"{k}={v!r}" for k, v in opts.items())
        else:
            how = f"estimator_options={opts!r}"
        tail = f"; {self.fallback}" if self.fallback else ""
        return f"{self.caller}: {self.subject} {self.problem}. Give it more work with {how}{tail}."


class Population(NamedTuple):
    """Equally weighted particles ``x: (n, d)`` of the target with ``grad: (n, d)`` (the target's
    score there), ``log_prob: (n,)``, the target evaluations spent (int), the source's name and the
    NaN log-densities met by a mode search far from the posterior (counted, not warned about)."""

    x: torch.Tensor
    grad: torch.Tensor
    log_prob: torch.Tensor
    num_target_evals: int
    source: str
    num_nan_exploration: int = 0
    num_divergent: int = 0
    num_transitions: int = 0


def _move(target, x, generator, num_moves: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """``num_moves`` MALA steps on ``p`` (step from the particles' spread); ``(x, lp, grad, step size)``
    (NaN without moves)."""
    if num_moves == 0:
        lp, g = target.log_prob_and_grad(x)
        return x, lp.detach(), g.detach(), math.nan
    scale2 = float(x.var(0).min().clamp_min(1e-12)) if x.shape[0] > 1 else 1.0
    x, lp, _, h, g = posterior_mala(generator, target, x, x, math.inf, num_moves, scale2=scale2)
    return x, lp.detach(), g.detach(), h


def default_inflate(dim: int) -> float:
    r"""The proposals' inflation :math:`c = \min(1.2, 1 + 0.4/\sqrt d)` (module doc): the weights'
    second moment :math:`(c^2/\sqrt{2c^2-1})^d \approx e^{d(c^2-1)^2/2}` stays near
    :math:`e^{0.32}` however large ``dim``, while some inflation still covers a covariance estimated
    a little too narrow."""
    return min(1.2, 1.0 + 0.4 / math.sqrt(dim))


def modes_population(
    target,
    num_particles: int,
    generator: torch.Generator,
    device=None,
    *,
    num_moves: int = 20,
    chains_per_mode: int = 512,
    num_proposals: int = 16384,
    inflate: float | None = None,
    repair_moves: int = 8,
    fallback: str | None = "nuts",
    fallback_options: dict | None = None,
    **options,
) -> Population:
    """Per-mode Gaussian importance sampling (module doc), resampled and moved; ``options`` go to
    :func:`diffstat.diffusion.sampler.run_diffusion_sampler` (larger restocks and proposals than its
    defaults: the per-mode covariances and masses need them in 64 dimensions; ``inflate`` default
    :func:`default_inflate`). When the pipeline did not trust its importance weights and corrected
    them with its SMC bridge, ``repair_moves`` long-trajectory HMC steps follow the MALA moves
    (:func:`~diffstat.smoothing.population_moves.hmc_moves`; 8: they bring a curved target's
    particles to its spread where the MALA moves would need hundreds of steps, docs/walk_jump_banana.md).
    When the pipeline distrusts its importance weights, ``fallback="nuts"`` replaces the particles by
    :func:`mcmc_population` 's (``fallback_options``), started from them (module doc); ``None`` keeps them."""
    from diffstat.diffusion.sampler import run_diffusion_sampler

    if fallback not in (None, "nuts"):
        raise ValueError(f"fallback must be 'nuts' or None, got {fallback!r}")
    evals0 = target.num_target_evals
    inflate = default_inflate(target.dim) if inflate is None else inflate
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run_diffusion_sampler(
            target,
            num_samples=num_particles,
            num_chains=1,
            generator=generator,
            progress=False,
            device=device,
            use_diffusion=False,
            chains_per_mode=chains_per_mode,
            num_proposals=num_proposals,
            inflate=inflate,
            **options,
        )
    for w in caught:  # the pipeline's own warnings, but its "diffusion: ..." ones in the caller's words
        if not str(w.message).startswith("diffusion:"):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    unreliable = any(str(w.message).startswith("diffusion:") for w in caught)
    x = out.draws.reshape(-1, target.dim).to(device=device, dtype=target.dtype)
    nan_explore = int(out.attrs["num_nan_exploration"])
    if unreliable and fallback is not None:  # NUTS chains from the modes' particles replace them
        pop = _nuts_fallback(target, x, num_particles, generator, device, fallback_options)
        warnings.warn(_unreliable(out, chains_per_mode, num_proposals, pop), stacklevel=2)
        evals = target.num_target_evals - evals0
        source = "nuts (fallback from modes)"
        return Population(*pop[:3], evals, source, nan_explore, pop.num_divergent, pop.num_transitions)
    if unreliable:
        warnings.warn(_unreliable(out, chains_per_mode, num_proposals), stacklevel=2)
    x, lp, g, h = _move(target, x, generator, num_moves)
    if out.attrs.get("correction") == "smc" and repair_moves > 0:  # the importance weights were not trusted
        x, lp, g, _ = hmc_moves(target, x, generator, h, repair_moves)
    return Population(x, g, lp, target.num_target_evals - evals0, "modes", nan_explore)


def _nuts_fallback(target, x, num_particles, generator, device, fallback_options) -> Population:
    """:func:`~diffstat.smoothing.mcmc_population.mcmc_population` started at the particles ``x``, its
    options ``fallback_options``; its own :class:`FitWarning` s name their options as
    :func:`modes_population` takes them (inside ``fallback_options``)."""
    from diffstat.smoothing.mcmc_population import mcmc_population

    options = dict(fallback_options or {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pop = mcmc_population(target, num_particles, generator, device, init=x, **options)
    for w in caught:
        message = w.message
        if isinstance(message, FitWarning):
            more = {"fallback_options": dict(options, **message.options)}
            message = FitWarning(message.subject, message.problem, more, True, message.fallback)
        warnings.warn_explicit(message, w.category, w.filename, w.lineno, source=w.source)
    return pop


def _unreliable(
    out, chains_per_mode: int, num_proposals: int, replaced: Population | None = None
) -> FitWarning:
    """The :class:`FitWarning` for an importance run the pipeline judged unreliable: every round's
    Pareto k and ESS fraction, and twice the restocking chains, proposals and rounds; with the
    population that ``replaced`` the particles (the NUTS fallback), its evaluations and divergences."""
    from diffstat.diffusion.importance import MAX_PARETO_K, MIN_FINAL_ESS_FRACTION

    group = out.groups["diffusion"]
    ks = ", ".join(f"{float(k):.2f}" for k in group["pareto_k"].flatten())
    fractions = ", ".join(f"{float(f):.3f}" for f in group["ess_fraction"].flatten())
    rounds = int(out.attrs["num_rounds"])
    problem = (
        f"(population='modes', per-mode importance sampling) is unreliable: its {rounds} rounds had "
        f"Pareto k {ks} and ESS fractions {fractions} of their proposals (trusted: k at most {MAX_PARETO_K} "
        f"and a last fraction of {MIN_FINAL_ESS_FRACTION} or more), so the particles likely lack part of "
        "the target's mass (a neck or a heavy tail)"
    )
    options = dict(
        chains_per_mode=2 * chains_per_mode, num_proposals=2 * num_proposals, max_rounds=2 * rounds
    )
    fallback = "if that does not help, sample this target with MCMC ('nuts')"
    if replaced is None:
        problem += ", and the smoothed score and every draw from it inherit that"
    else:
        problem += (
            f"; the particles were replaced by those of NUTS chains started from them (population "
            f"'nuts', {replaced.num_target_evals} evaluations, {replaced.num_divergent} divergent "
            f"transitions of {replaced.num_transitions}), which, equally weighted, do not carry mode "
            "weights across separated modes"
        )
        fallback = "or train on NUTS chains alone with population='nuts' (fallback=None keeps the particles)"
    return FitWarning("the population that trains the smoothed score", problem, options, True, fallback)


def smc_population(
    target, num_particles: int, generator: torch.Generator, device=None, *, num_moves: int = 0, **options
) -> Population:
    """Adaptive tempered SMC (``options`` as :func:`~diffstat.tempering.smc.adaptive_tempered_smc`,
    plus ``reference``), resampled to equal weights; the gradients are SMC's own."""
    from diffstat.tempering.path import make_path
    from diffstat.tempering.resampling import resample
    from diffstat.tempering.smc import adaptive_tempered_smc, initial_particles

    evals0 = target.num_target_evals
    path = make_path(target, options.pop("reference", None))
    out = adaptive_tempered_smc(
        generator, path, initial_particles(path, num_particles, generator, device), **options
    )
    ps, log_w = out.particles, out.log_weights
    if not bool((log_w == log_w[0]).all()):
        ps = ps.index(resample(generator, log_w, "systematic"))
    x, lp, g = ps.x, ps.target_log_prob, ps.base_grad + ps.delta_grad
    if num_moves > 0:
        x, lp, g, _ = _move(target, x, generator, num_moves)
    return Population(x.detach(), g.detach(), lp.detach(), target.num_target_evals - evals0, "smc")


_SOURCES: dict[str, Callable[..., Population]] = {"modes": modes_population, "smc": smc_population}


def get_population(source) -> Callable[..., Population]:
    """The population function named ``source`` (``"modes"``, ``"nuts"``, ``"smc"``) or ``source`` itself
    if callable."""
    if callable(source):
        return source
    if source == "nuts":  # imported here: that module builds on this one's Population and FitWarning
        from diffstat.smoothing.mcmc_population import mcmc_population

        return mcmc_population
    if source not in _SOURCES:
        names = sorted([*_SOURCES, "nuts"])
        raise ValueError(f"population must be one of {names} or a callable, got {source!r}")
    return _SOURCES[source]
