r"""The rounds of the diffusion sampler as small steps: ``init`` explores and banks the modes,
``step`` runs one importance round, ``done`` says when to stop.

A round (:func:`step`) restocks the modes from the previous round's weighted particles (from the
second round on), fits or warm-starts the score models (in a diffusion round), proposes from the
defensive mixture and weighs the proposals by :math:`p / q`. The state carries what the next round
needs: the latest restocked bank, the per-mode Gaussians and their weights :math:`\pi`, the
training banks, the score models and the held-out particles of their check. The pipeline, its
references and the reasons for every default are in :mod:`diffstat.diffusion.sampler`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from diffstat.diffusion.bridge import bridge_now
from diffstat.diffusion.importance import importance_summary, resample_per_mode, round_missed, unique_rows
from diffstat.diffusion.gaussians import MeanFieldMixture
from diffstat.diffusion.modes import MAX_UNSEEN, ModeBank, explore_modes, smc_seeds
from diffstat.diffusion.restock import balance_modes, laplace_frames
from diffstat.diffusion.sampler_config import DiffusionConfig
from diffstat.diffusion.networks import ScoreMLP
from diffstat.diffusion.processes import VP
from diffstat.diffusion.proposals import (
    DefensiveMixture,
    DiffusionMixture,
    DiffusionProposal,
    GaussianComponent,
    GaussianMixtureProposal,
    Whitening,
    fit_mode_gaussians,
    proposal_width,
    held_out_cross_entropy,
)
from diffstat.diffusion.training import TrainConfig, train_score_model

__all__ = ["Population", "RoundInfo", "RoundState", "Units", "MAX_FULL_MODES", "chains_per_mode"]
__all__ += ["done", "hopeless", "init", "step"]

#: Banks of at most this many modes restock every mode with the configured number of chains
#: (``chains_per_mode``, ``refresh_chains``); a larger bank shares that total, 64 modes' worth, among
#: its modes (:func:`chains_per_mode`), so the restocking never costs more than on a 64-mode target
#: (GMM-40's 40 modes and every few-mode target are untouched). Without the cap the work grew with
#: the bank: at ``run_all.py --fast``'s options many-well(32) banked 773 modes, whose restocking
#: (32 chains of 40 steps, then twice 256 of 21, per mode) comes to 9.3 of the run's 11.7 million
#: evaluations.
MAX_FULL_MODES = 64


def chains_per_mode(count: int, num_modes: int) -> int:
    """Chains per mode when ``count`` are configured per mode and the bank holds ``num_modes``:
    ``count`` up to ``MAX_FULL_MODES`` modes, then ``count * MAX_FULL_MODES // num_modes`` (at least
    one), a total budget shared by the modes."""
    return count if num_modes <= MAX_FULL_MODES else max(1, count * MAX_FULL_MODES // num_modes)


class Units(NamedTuple):
    """The score models, one per unit (a mode, or all modes for one pooled model), each on its
    whitened coordinates, with the VP process they were built with."""

    process: VP
    models: tuple
    whitenings: tuple


class Population(NamedTuple):
    """One round's proposals: ``x (n, dim)``, ``log_prob (n,)``, ``log_w (n,)`` (:math:`-\\infty`
    where undefined) and ``mode (n,)``, the Gaussian component that best explains each point."""

    x: torch.Tensor
    log_prob: torch.Tensor
    log_w: torch.Tensor
    mode: torch.Tensor


class RoundInfo(NamedTuple):
    """One round's weighted ``population``, its ``summary`` (an
    :func:`~diffstat.diffusion.importance.importance_summary` with the round's ``round``,
    ``num_proposals``, ``train_loss``, ``diffusion_share`` and per-unit model ``choice``: 0 the
    model, -1 its Gaussian, -2 no diffusion this round) and the target evaluations since ``init``."""

    population: Population
    summary: dict
    num_target_evals: int
    proposal: object = None  # the DefensiveMixture that drew the population


class RoundState(NamedTuple):
    """What the next round needs.

    bank : the latest restocked :class:`~diffstat.diffusion.modes.ModeBank` (its centres are the
    modes'); gaussians : the per-mode Gaussians, weighted by ``pi (K,)``; train : the banks the score
    models train on; units : the score models (None before the first fit); held : held-out
    ``(x, log_prob, mode)`` for the model check (None before the first round); last : the previous
    round's :class:`RoundInfo` (None before the first); round : rounds run; per_mode : one model
    per mode; evals0 : the target's evaluation count when ``init`` began; explore_nan : NaN
    log-densities met by the mode search (far from the posterior, where real models overflow)."""

    bank: ModeBank
    gaussians: GaussianMixtureProposal
    pi: torch.Tensor
    train: tuple
    units: Units | None
    held: tuple | None
    last: RoundInfo | None
    round: int
    per_mode: bool
    evals0: int
    explore_nan: int = 0
    pilot: torch.Tensor | None = None  # the exploration's SMC particles (diffusion.coverage)


def init(generator: torch.Generator, target, config: DiffusionConfig, device=None) -> RoundState:
    """Explore the modes from the reference, restock each with ``chains_per_mode`` MALA chains,
    and fit the per-mode Gaussians with uniform weights (steps 1 and 2 of the pipeline)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    evals0, nan0 = target.num_target_evals, target.num_nan_evals
    bank = explore_modes(
        target,
        generator,
        num_chains=config.num_explore,
        num_steps=config.explore_steps,
        num_screen=config.screen_ratio * config.num_explore,
        screen_steps=config.screen_steps,
        start_scales=config.start_scales,
        device=dev,
        reference=config.reference,
        extra_starts=(pilot := smc_seeds(generator, target, config.smc_explore, config.reference, dev)),
    )
    explore_nan = target.num_nan_evals - nan0
    num_modes = bank.num_modes
    count = chains_per_mode(config.chains_per_mode, num_modes)
    frames = laplace_frames(target, bank)  # each mode restocked in its Laplace frame
    bank = balance_modes(
        target, bank, generator, chains_per_mode=count, num_steps=config.restock_steps, frames=frames
    )
    gaussians = _fit_gaussians(bank, config)
    uniform = torch.full((num_modes,), 1.0 / num_modes, dtype=bank.x.dtype, device=dev)
    per_mode = config.use_diffusion and (
        num_modes <= config.max_mode_models and not _pooled(bank)
        if config.per_mode_models is None
        else bool(config.per_mode_models)
    )
    return RoundState(
        bank, gaussians, uniform, (bank,), None, None, None, 0, per_mode, evals0, explore_nan, pilot
    )


def _pooled(bank: ModeBank) -> bool:
    """Whether the bank holds many modes as one (their unseen mass above ``MAX_UNSEEN``)."""
    return bank.unseen_mass > MAX_UNSEEN


def _fit_gaussians(bank: ModeBank, config: DiffusionConfig, weights=None):
    """The Gaussian part of the proposal: per-mode Gaussians, or for a pooled bank the product of
    per-coordinate mixtures (:class:`~diffstat.diffusion.gaussians.MeanFieldMixture`), which covers
    the combinations of modes that no list holds, widened by the square root of ``inflate``: each
    coordinate's components already follow its shape, and the widening's cost multiplies over the
    coordinates (many-well(32): docs/diffusion_sampler.md)."""
    if _pooled(bank):
        return MeanFieldMixture.fit(bank.x, support=bank.support, inflate=math.sqrt(config.inflate))
    return fit_mode_gaussians(bank, inflate=config.inflate, weights=weights)


def _restart_bank(target, bank: ModeBank, pop: Population, count: int, generator) -> ModeBank:
    """A bank of ``count`` points per mode drawn from the weighted particles of that mode (the
    bank's own particles where a mode received no weight), with fresh gradients."""
    idx = resample_per_mode(pop.log_w, pop.mode, bank.num_modes, count, generator)
    lp, grad = target.log_prob_and_grad(pop.x[idx])
    new = ModeBank(
        pop.x[idx],
        lp,
        grad,
        pop.mode[idx],
        bank.centers,
        bank.center_log_prob,
        0,
        bank.unseen_mass,
        bank.support,
    )
    for k in range(bank.num_modes):  # a loop over modes (few): those that received no weight
        if bool((new.label == k).any()):
            continue
        rows = bank.label == k
        new = ModeBank(
            torch.cat([new.x, bank.x[rows]]),
            torch.cat([new.log_prob, bank.log_prob[rows]]),
            torch.cat([new.grad, bank.grad[rows]]),
            torch.cat([new.label, bank.label[rows]]),
            bank.centers,
            bank.center_log_prob,
            0,
            bank.unseen_mass,
            bank.support,
        )
    return new


def _restock(generator: torch.Generator, state: RoundState, target, config: DiffusionConfig) -> RoundState:
    """Between rounds: held-out particles for the model check (a weighted resample per unit, no
    target evaluations), the modes restocked from the weighted particles and balanced again, and
    the Gaussians refitted with :math:`\\pi` = half the estimated mode weights plus half uniform
    (so no mode is starved). The first restock replaces the explored bank as training data."""
    pop, summary, num_modes = state.last.population, state.last.summary, state.bank.num_modes
    held = state.held
    if config.use_diffusion:  # one pooled model: held_out over all modes, not per mode
        unit = pop.mode if state.per_mode else torch.zeros_like(pop.mode)
        idx = resample_per_mode(
            pop.log_w, unit, num_modes if state.per_mode else 1, config.held_out, generator
        )
        held = (pop.x[idx], pop.log_prob[idx], pop.mode[idx])
    count = chains_per_mode(config.refresh_chains, num_modes)
    restart = _restart_bank(target, state.bank, pop, count, generator)
    bank = balance_modes(
        target,
        restart,
        generator,
        chains_per_mode=count,
        num_steps=config.refresh_steps,
        keep_every=config.refresh_keep_every,
        frames=laplace_frames(target, restart),
    )
    uniform = torch.full((num_modes,), 1.0 / num_modes, dtype=bank.x.dtype, device=state.pi.device)
    pi = 0.5 * summary["mode_weights"].to(bank.x.dtype) + 0.5 * uniform
    pi = pi / pi.sum()  # the mode weights are all zero where a round had no finite weight
    new = (bank,)
    if config.train_on_restarts:  # the distinct resampled particles (their gradients are paid for)
        _, rows = unique_rows(restart.x)
        new += (
            ModeBank(
                restart.x[rows],
                restart.log_prob[rows],
                restart.grad[rows],
                restart.label[rows],
                restart.centers,
                restart.center_log_prob,
                0,
            ),
        )
    train = new if state.round == 1 else state.train + new
    gaussians = _fit_gaussians(bank, config, weights=pi)
    return state._replace(bank=bank, gaussians=gaussians, pi=pi, train=train, held=held)


def _new_units(generator, x, groups, dim: int, config: DiffusionConfig, per_mode: bool, device) -> Units:
    """One whitening and one zero-output :class:`ScoreMLP` (seeded from ``generator``) per unit."""
    process = VP(t_max=config.t_max)
    kind = ("full" if per_mode else "diag") if config.whiten is None else config.whiten
    whitenings, models = [], []
    for rows in groups:
        whitenings.append(Whitening.fit(x[rows], kind=kind))
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        models.append(ScoreMLP(dim, config.hidden, config.depth, process=process, seed=seed).to(device))
    return Units(process, tuple(models), tuple(whitenings))


def _model_loses(proposal, k: int, state: RoundState, config: DiffusionConfig) -> bool:
    """Whether unit ``k``'s Gaussian alone beats its defensive mixture with the model in held-out
    cross-entropy on the held-out particles (for a per-mode unit, those of its mode and its own
    component, normalised)."""
    xh, lph, mode_h = state.held
    sel = mode_h == k if state.per_mode else torch.ones_like(mode_h, dtype=torch.bool)
    g = state.gaussians
    log_g = (
        g.component_log_prob(xh[sel])[:, k] - torch.log(g.weights[k])
        if state.per_mode
        else g.log_prob(xh[sel])
    )
    lw, lg = math.log(config.diffusion_weight), math.log1p(-config.diffusion_weight)
    model_score = held_out_cross_entropy(
        lph[sel], torch.logaddexp(lw + proposal.log_prob(xh[sel]), lg + log_g)
    )
    return held_out_cross_entropy(lph[sel], log_g) < model_score


def _fit_units(generator, state: RoundState, dim: int, config: DiffusionConfig):
    """Fit (or warm-start) the score model of every unit on the training banks; with
    ``gaussian_fallback`` keep it only where :func:`_model_loses` says it does not. Returns the
    units, the diffusion proposal (None where the one pooled model lost), the mean final training
    loss and the choice per unit (0: model, -1: Gaussian)."""
    x = torch.cat([b.x for b in state.train])
    g = torch.cat([b.grad for b in state.train])
    label = torch.cat([b.label for b in state.train])
    num_modes = state.bank.num_modes
    groups = (
        [label == k for k in range(num_modes)]
        if state.per_mode
        else [torch.ones_like(label, dtype=torch.bool)]
    )
    first = state.units is None
    units = _new_units(generator, x, groups, dim, config, state.per_mode, x.device) if first else state.units
    train = TrainConfig(
        num_steps=config.train_steps if first else config.refit_steps,
        batch_size=config.batch_size,
        lr=config.lr,
        loss="mixed",
        lr_schedule="cosine",
    )
    models, losses, comps, choice = list(units.models), [], [], []
    for k, rows in enumerate(groups):  # a loop over units (few modes)
        white = units.whitenings[k]
        fit = train_score_model(
            models[k],
            units.process,
            white.to_white(x[rows]),
            white.grad_to_white(g[rows]),
            config=train,
            generator=generator,
        )
        models[k] = fit.model
        losses.append(fit.history["train_loss"][-1] if fit.history["train_loss"] else math.nan)
        proposal = DiffusionProposal(
            fit.model,  # the model itself: velocity_and_divergence takes its exact trace layer by layer
            units.process,
            white,
            num_steps=config.ode_steps,
            prior_scale=config.prior_scale,
        )
        lost = (
            state.held is not None and config.gaussian_fallback and _model_loses(proposal, k, state, config)
        )
        choice.append(-1 if lost else 0)
        if state.per_mode:
            comps.append(
                GaussianComponent(state.gaussians.means[k], state.gaussians.chols[k]) if lost else proposal
            )
        elif not lost:
            comps.append(proposal)
    units = units._replace(models=tuple(models))
    mean_loss = float(sum(losses) / len(losses))
    if not comps:  # the pooled model lost to the Gaussians: this round is Gaussian IS
        return units, None, mean_loss, choice
    return units, (DiffusionMixture(comps, state.pi) if state.per_mode else comps[0]), mean_loss, choice


def step(generator: torch.Generator, state: RoundState, target, config: DiffusionConfig):
    """One importance round: restock from the previous round (from the second round on), fit the
    score models (in a diffusion round, from round ``gaussian_rounds`` on), propose from the
    defensive mixture, weigh by :math:`p / q`. Returns the new state and the round's
    :class:`RoundInfo`."""
    if state.last is not None:
        state = _restock(generator, state, target, config)
    r, units, diffusion, loss = state.round, state.units, None, math.nan
    choice = [-2] * (state.bank.num_modes if state.per_mode else 1)  # -2: no diffusion this round
    if config.use_diffusion and r >= config.gaussian_rounds:
        units, diffusion, loss, choice = _fit_units(generator, state, target.dim, config)
    proposal = DefensiveMixture(diffusion, state.gaussians, config.diffusion_weight)
    n = config.round_size(r)
    x, log_q, from_diffusion = proposal.sample(n, generator)
    with torch.no_grad():
        lp = target.log_prob(x)
    log_w = torch.nan_to_num(lp - log_q, nan=-math.inf, neginf=-math.inf)  # keep -inf as -inf
    g = state.gaussians
    modes = (g.component_log_prob(x) - torch.log(g.weights)).argmax(-1)
    summary = importance_summary(log_w, modes, state.bank.num_modes)
    held = summary["mode_weights"].to(x.dtype) > 0.01  # the modes that hold weight
    width = proposal_width(g, state.bank)
    evals = target.num_target_evals - state.evals0
    summary.update(
        round=r,
        num_proposals=n,
        train_loss=loss,
        num_target_evals=evals,
        diffusion_share=float(from_diffusion.double().mean()),
        choice=choice,
        proposal_width=float(width[held].min()) if bool(held.any()) else math.inf,
    )
    info = RoundInfo(Population(x, lp, log_w, modes), summary, evals, proposal)
    return state._replace(units=units, last=info, round=r + 1), info


def done(state: RoundState, info: RoundInfo, config: DiffusionConfig) -> bool:
    """Stop after ``max_rounds``; once a round that did not miss reaches an ESS fraction of
    ``target_ess`` with the score models fitted (or none to fit); or once more rounds are hopeless."""
    s = info.summary
    enough = s["ess"] >= config.target_ess * s["num_proposals"] and not round_missed(s)
    return (
        state.round == config.max_rounds
        or (enough and (state.units is not None or not config.use_diffusion))
        or hopeless(state, info, config)
    )


def hopeless(state: RoundState, info: RoundInfo, config: DiffusionConfig) -> bool:
    """Whether the round missed by no more than the error of the next round's per-mode Gaussian fits
    (:func:`~diffstat.diffusion.bridge.bridge_now`), with the bridge to follow and a bank not pooled."""
    if not config.bridge or _pooled(state.bank):
        return False
    fit_draws = chains_per_mode(config.refresh_chains, state.bank.num_modes)
    return bridge_now(info.summary, info.population.x.shape[1], fit_draws)
