r"""Explore, group and bank the modes of a target; :mod:`diffstat.diffusion.restock` restocks them.

A diffusion model fitted to particles can only place mass where particles were: a mode never
visited can never be recovered, and importance weights cannot flag it. This module is the first
half of the diffusion sampler (:mod:`diffstat.diffusion.sampler`):

1. :func:`explore` runs many short MALA chains started from the reference at several start
   scales, with a per-chain step size adapted on the fly (exploration only needs end points).
2. :func:`~diffstat.modes.climb.hill_climb` takes each end point up to its local maximum,
   and :func:`~diffstat.modes.barriers.group_by_barrier` (the package's mode finder,
   :mod:`diffstat.modes`) groups the climbed points by mode, robustly: two points share a mode
   only when
   :math:`\log p` has no barrier on the segment between them,

   .. math:: \min_{0<s<1} \log p\big((1-s)a + s b\big) \ge \min(\log p(a), \log p(b)) - \tau,

   checked at a few interior points (peaks, not samples, are compared: in high dimension samples
   sit about :math:`d/2` nats below their peak, under the saddle between nearby modes). Chains
   still in transit (the log-density still climbing over the last quarter of the run, or far
   below the typical level of their group) are dropped.
   Before grouping, :func:`unseen_mode_mass` estimates the mass of the modes the points never
   reached (Good 1953: the share of points alone in their mode, each point tested against its
   nearest neighbour only, three evaluations per point). Above ``MAX_UNSEEN`` the points cannot
   list the modes (many-well(32): 2^16 modes, nearly every point alone in its own), grouping
   them would cost a barrier test per pair of modes (2 million evaluations for 773 of them),
   and the bank holds the SMC seeds' end points as one pooled mode, with every end point as its
   ``support``.
3. :func:`~diffstat.diffusion.restock.balance_modes` then restocks each banked mode with local
   MALA chains, so every mode has the same number of particles for score matching.

All work is batched over chains; every log-density evaluation goes through the target and is
counted there.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from diffstat._util import check_positive_int, progress_bar
from diffstat.mcmc.base import LogProbAndGrad, MCMCState
from diffstat.mcmc.mala import MALA_TARGET_ACCEPT, mala_step
from diffstat.modes.barriers import group_by_barrier, no_barrier
from diffstat.modes.climb import hill_climb
from diffstat.tempering.core import initial_particles
from diffstat.tempering.path import make_path
from diffstat.tempering.resampling import resample
from diffstat.tempering.smc import adaptive_tempered_smc

__all__ = [
    "ModeBank",
    "explore",
    "screen",
    "explore_modes",
    "smc_seeds",
    "unseen_mode_mass",
    "MAX_UNSEEN",
]

#: Largest Good-Turing mass of unseen modes (:func:`unseen_mode_mass`) for which the explored points
#: are grouped into a bank of modes: a tenth, the bound the noised-path sampler's bank uses
#: (``noised_smc_bank.MAX_UNSEEN``). Above it most points sit alone in their modes, a bank would
#: list a small part of the target, and the per-mode work would grow with the number of points.
MAX_UNSEEN = 0.1


@dataclass
class ModeBank:
    r"""Particles grouped by mode.

    x : (n, dim) particles; log_prob : (n,); grad : (n, dim) the target score at ``x``;
    label : (n,) long, mode index in ``0..num_modes-1``; centers : (K, dim) the highest-density
    particle of each mode; center_log_prob : (K,); num_evals : target evaluations spent;
    unseen_mass : the Good-Turing mass of the modes the exploration never reached
    (:func:`unseen_mode_mass`); above ``MAX_UNSEEN`` the bank is one pooled mode of many, and
    support : (m, dim) every explored end point, which marks where its modes lie (None otherwise).
    """

    x: torch.Tensor
    log_prob: torch.Tensor
    grad: torch.Tensor
    label: torch.Tensor
    centers: torch.Tensor
    center_log_prob: torch.Tensor
    num_evals: int = 0
    unseen_mass: float = 0.0
    support: torch.Tensor | None = None

    @property
    def num_modes(self) -> int:
        return int(self.centers.shape[0])

    def counts(self) -> torch.Tensor:
        """Particles per mode, ``(K,)``."""
        return torch.bincount(self.label, minlength=self.num_modes)


def _relabel(x, lp, grad, label, num_evals, peak_x=None, peak_lp=None) -> ModeBank:
    """Compact labels to ``0..K-1`` (dropping ``label < 0``); each mode's centre is the best of
    ``peak_x`` (climbed points, one per particle; the particles themselves if not given)."""
    peak_x = x if peak_x is None else peak_x
    peak_lp = lp if peak_lp is None else peak_lp
    keep = label >= 0
    x, lp, grad, label, peak_x, peak_lp = (
        x[keep],
        lp[keep],
        grad[keep],
        label[keep],
        peak_x[keep],
        peak_lp[keep],
    )
    _, label = torch.unique(label, return_inverse=True)
    k = int(label.max()) + 1 if label.numel() else 0
    best = torch.full((k,), -math.inf, dtype=lp.dtype, device=lp.device).scatter_reduce(
        0, label, peak_lp, "amax"
    )
    idx = torch.nonzero(peak_lp == best[label]).flatten()
    center_idx = torch.empty(k, dtype=torch.long, device=lp.device)
    center_idx[label[idx]] = idx
    return ModeBank(x, lp, grad, label, peak_x[center_idx], peak_lp[center_idx], num_evals)


def explore(
    generator: torch.Generator,
    log_prob_and_grad: LogProbAndGrad,
    x0: torch.Tensor,
    num_steps: int,
    step_size: torch.Tensor,
) -> tuple[MCMCState, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Short MALA chains from ``x0: (n, dim)`` with a per-chain step size adapted on the fly,
    :math:`h \leftarrow h \exp(a - 0.574)` after each step of acceptance probability :math:`a`
    (the chains only look for modes, so the adaptation need not preserve the target).

    Returns the final state, the per-chain log-density averaged over the third quarter and over
    the last quarter of the run (``(n,)`` each, used to detect chains still in transit), and the
    adapted step sizes ``(n,)``.
    """
    state = MCMCState(x0, *log_prob_and_grad(x0))
    h = step_size.clone()
    q3 = torch.zeros_like(state.log_prob)
    q4 = torch.zeros_like(state.log_prob)
    start3, start4 = num_steps // 2, (3 * num_steps) // 4
    for i in range(num_steps):
        state, info = mala_step(generator, state, log_prob_and_grad, h)
        h = h * torch.exp(info.acceptance_rate - MALA_TARGET_ACCEPT)
        if start3 <= i < start4:
            q3 = q3 + state.log_prob / (start4 - start3)
        elif i >= start4:
            q4 = q4 + state.log_prob / (num_steps - start4)
    return state, q3, q4, h


def screen(
    generator: torch.Generator,
    log_prob_and_grad: LogProbAndGrad,
    x0: torch.Tensor,
    step_size: torch.Tensor,
    num_steps: int,
    keep: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Many cheap starts, ``keep`` survivors: :func:`explore` runs ``num_steps`` steps from every
    row of ``x0: (n, dim)`` in batches of ``keep`` (the target never sees a larger batch than the
    survivors'), then the ``keep // 2`` chains with the highest final log-density survive, and the
    others are drawn uniformly at random from the rest.

    A mode whose basin of attraction holds a small share of the starts is found only by starting
    many chains, and after a few steps a chain in the basin of a high, narrow mode already sits
    far above the others (on ``narrow_wide(12, scales=(0.3, 1))`` 0.04% of the starts reach the
    heavy mode, and after 8 steps they rank in the top 0.04% by log-density; docs/diffusion_sampler.md), so
    screening by log-density buys starts at a few evaluations each; the random half keeps the
    wide, low modes that plain exploration finds. Returns the survivors' points ``(keep, dim)``
    and adapted step sizes ``(keep,)``.
    """
    ends, lps, hs = [], [], []
    for rows in torch.split(torch.arange(x0.shape[0], device=x0.device), keep):
        state, _, _, h = explore(generator, log_prob_and_grad, x0[rows], num_steps, step_size[rows])
        ends.append(state.x)
        lps.append(torch.nan_to_num(state.log_prob, nan=-math.inf))
        hs.append(h)
    x, lp, h = torch.cat(ends), torch.cat(lps), torch.cat(hs)
    order = lp.argsort(descending=True)
    rest = order[keep // 2 :]
    pick = torch.randperm(rest.numel(), generator=generator, device=generator.device)
    chosen = torch.cat([order[: keep // 2], rest[pick[: keep - keep // 2].to(rest.device)]])
    return x[chosen], h[chosen]


def _drop_stragglers(lp: torch.Tensor, label: torch.Tensor, dim: int, anchored=None) -> torch.Tensor:
    r"""Label ``-1`` for points far below the typical log-density of their group: under a Gaussian
    mode :math:`\log p = c - \chi^2_d / 2`, so a point more than :math:`3\sqrt{2d} + 2` nats (six
    standard deviations of :math:`\chi^2_d/2`, plus slack) below the group's median is in transit.
    Where the group holds ``anchored`` points ``(n,)`` bool (draws of a tempered SMC run, which
    approximate the group's own distribution), the margin is counted from the lowest of them
    instead: chains from the reference that are stuck far from the posterior can be the majority
    of a group, and then its median is theirs."""
    label = label.clone()
    k = int(label.max()) + 1
    for i in range(k):
        rows = label == i
        anchor = rows if anchored is None else rows & anchored
        med = lp[rows].median() if anchored is None or not bool(anchor.any()) else lp[anchor].min()
        label[rows & (lp < med - 3 * math.sqrt(2 * dim) - 2)] = -1
    return label


def unseen_mode_mass(log_prob, x: torch.Tensor, lp: torch.Tensor, *, tol: float = 0.5) -> float:
    r"""Good-Turing estimate of the mass of the modes that the climbed peaks ``x: (n, dim)`` (with
    log-densities ``lp: (n,)``) never reached: the share of points alone in their mode (Good 1953),
    a point counting as alone when a barrier (:func:`~diffstat.modes.barriers.no_barrier`)
    separates it from its nearest other point (Euclidean, in coordinates standardised by the
    points' spread). Peaks of one mode coincide to the climb's tolerance, so a point with a
    mode-mate has it as its nearest neighbour. Costs ``3 n`` target evaluations and draws no
    random numbers."""
    n = x.shape[0]
    if n < 2:
        return 1.0
    xs = x / x.std(0).clamp_min(1e-12)
    nearest = torch.cdist(xs, xs).fill_diagonal_(math.inf).argmin(-1)
    joined = no_barrier(log_prob, x, lp, x[nearest], lp[nearest], tol=tol)
    return float((~joined).double().mean())


def explore_modes(
    target,
    generator: torch.Generator,
    *,
    num_chains: int = 2000,
    num_steps: int = 20,
    num_screen: int = 0,
    screen_steps: int = 2,
    num_climb: int = 30,
    start_scales=(0.5, 1.0, 2.0, 4.0),
    step_size: float = 0.1,
    tol: float = 0.5,
    device=None,
    progress: bool = False,
    reference: torch.distributions.Distribution | None = None,
    extra_starts: torch.Tensor | None = None,
) -> ModeBank:
    r"""Explore from the reference (``reference``, else the target's, else N(0, I)) and bank the
    modes found.

    ``num_chains`` MALA chains of ``num_steps`` steps start at :math:`m + s (x - m)`, ``x`` a
    reference draw with mean ``m``, the scale ``s`` cycling through ``start_scales`` (wide starts
    find wide modes; narrow starts find the narrow modes that a wide mode's pull hides from far
    away). Chains whose mean log-density over the last quarter exceeds that over the third quarter
    by more than :math:`2\sqrt{d/2} + 1` nats (twice the sd of :math:`\chi^2_d/2`) are still
    climbing and are dropped. The rest climb to their local maxima (:func:`hill_climb`, at most
    ``num_climb`` steps), the climbed points are grouped by :func:`group_by_barrier`, and each
    chain's end point (a sample, kept with its gradient) takes its climbed point's label.
    With ``num_screen`` larger than ``num_chains``, that many starts are screened first
    (:func:`screen`, ``screen_steps`` steps each) and ``num_chains`` of them go on.
    ``extra_starts`` ``(m, dim)``: further chains started there (at scale 1), e.g. the particles of
    a tempered SMC run that reached the posterior where chains from the reference cannot.
    Where :func:`unseen_mode_mass` of the climbed points exceeds ``MAX_UNSEEN`` they are not
    grouped: the bank holds the end points of the ``extra_starts`` chains (all of them where there
    are none) as one mode (its ``unseen_mass`` says so, its ``support`` keeps every end point),
    whose centre is their best climbed point: the SMC particles visit modes in proportion to their
    mass, chains from the reference in proportion to their basins.
    Returns a :class:`ModeBank` whose centres are the best climbed point of each mode.
    """
    num_chains = check_positive_int(num_chains, "num_chains")
    num_steps = check_positive_int(num_steps, "num_steps")
    screen_steps = check_positive_int(screen_steps, "screen_steps")
    if num_screen != 0:
        check_positive_int(num_screen, "num_screen")
    num_starts = max(num_chains, num_screen)
    scales = torch.as_tensor(start_scales, dtype=target.dtype)
    if scales.dim() != 1 or scales.numel() == 0 or not bool((scales > 0).all()):
        raise ValueError(f"start_scales must be positive numbers, got {start_scales!r}")
    evals0 = target.num_target_evals
    x0, s = _starts(target, generator, num_starts, scales, reference, device)
    dev = x0.device
    h0 = step_size * s**2
    with progress_bar(3, "diffusion: exploring modes", progress) as bar:
        if num_starts > num_chains:
            x0, h0 = screen(generator, target.log_prob_and_grad, x0, h0, screen_steps, num_chains)
        if extra_starts is not None:
            x0 = torch.cat([x0, extra_starts.to(x0)])
            h0 = torch.cat([h0, torch.full((extra_starts.shape[0],), step_size).to(h0)])
        state, q3, q4, _ = explore(generator, target.log_prob_and_grad, x0, num_steps, h0)
        bar.update()
        settled = torch.isfinite(state.log_prob) & (q4 - q3 <= 2 * math.sqrt(target.dim / 2) + 1)
        if not bool(settled.any()):
            raise ValueError("no exploration chain settled in a mode; raise num_steps or check the target")
        from_smc = torch.arange(x0.shape[0], device=dev) >= num_chains
        xs, lp, grad = state.x[settled], state.log_prob[settled], state.grad[settled]
        from_smc = from_smc[settled]
        label = _drop_stragglers(lp, torch.zeros_like(lp, dtype=torch.long), target.dim, from_smc)
        xs, lp, grad, from_smc = xs[label >= 0], lp[label >= 0], grad[label >= 0], from_smc[label >= 0]
        peak_x, peak_lp, _ = hill_climb(
            target.log_prob_and_grad, xs, lp, grad, num_climb, h0[settled][label >= 0]
        )
        bar.update()
        label, unseen = _label_peaks(target.log_prob, peak_x, peak_lp, from_smc, tol)
        bar.update()
    label = _drop_stragglers(lp, label, target.dim, from_smc)
    bank = _relabel(xs, lp, grad, label, target.num_target_evals - evals0, peak_x, peak_lp)
    bank.unseen_mass = unseen
    bank.support = xs if unseen > MAX_UNSEEN else None
    return bank


def _label_peaks(log_prob, peak_x, peak_lp, from_smc, tol: float) -> tuple[torch.Tensor, float]:
    """Mode labels ``(n,)`` of the climbed peaks ``peak_x: (n, dim)`` and their unseen mode mass:
    grouped by :func:`group_by_barrier` where :func:`unseen_mode_mass` is at most ``MAX_UNSEEN``;
    above it, too many modes to list, so one pooled mode (label 0) of the points ``from_smc``
    ``(n,)`` bool where there are any (the others ``-1``), else of all points."""
    unseen = unseen_mode_mass(log_prob, peak_x, peak_lp, tol=tol)
    if unseen > MAX_UNSEEN:
        label = torch.zeros_like(peak_lp, dtype=torch.long)
        if bool(from_smc.any()):
            label[~from_smc] = -1
        return label, unseen
    return group_by_barrier(log_prob, peak_x, peak_lp, tol=tol), unseen


def _starts(target, generator, num_starts: int, scales: torch.Tensor, reference, device):
    """``num_starts`` starts :math:`m + s (x - m)` from reference draws ``x`` (``reference``, else
    the target's, else N(0, I); ``m`` its mean), the scale ``s`` cycling through ``scales``;
    returns the starts ``(num_starts, dim)`` and their scales ``(num_starts,)``. The unscaled
    draws are validated (a start scaled 4 times may be NaN where the draw is not)."""
    reference = target.reference if reference is None else reference
    if reference is None:
        x = target.sample_reference(num_starts, generator, device)
    else:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            x = reference.sample((num_starts,)).to(device=device, dtype=target.dtype)
    dev = x.device
    mean = torch.zeros(target.dim, dtype=x.dtype, device=dev)
    if reference is not None:
        try:
            mean = reference.mean.to(device=dev, dtype=x.dtype)
        except (NotImplementedError, AttributeError):
            pass
    s = scales.to(dev)[torch.arange(num_starts, device=dev) % scales.numel()]
    target.validate(x[: min(num_starts, 16)])
    return mean + s.unsqueeze(-1) * (x - mean), s


def smc_seeds(generator, target, num_particles: int, reference=None, device=None) -> torch.Tensor | None:
    """``num_particles`` particles ``(n, dim)`` of adaptive tempered SMC from ``reference`` (the
    ``"smc"`` method's algorithm and defaults), resampled to equal weights; None when it is 0.
    Chains from the reference alone do not reach a regression posterior that is thousands of times
    narrower than its prior and strongly correlated (posteriordb's earnings, kidiq, mesquite, nes);
    tempering with moves preconditioned by the particles' covariance does. 256 particles: enough
    for a dense covariance in the suite's dimensions at a quarter of ``"smc"``'s cost; they only
    seed the mode search, so their bias (moves capped on the hardest posteriors) is corrected by
    the importance weights and is not warned about. Where the SMC does not reach beta = 1 within
    its stages (a posterior far beyond the reference's reach) it returns None: the seeds only seed
    the mode search, which goes on from the reference's draws, so the sampler does not fail for them."""
    if not num_particles:
        return None
    path = make_path(target, reference)
    x0 = initial_particles(path, num_particles, generator, device)
    with warnings.catch_warnings():  # its moves capped or biased: the importance weights correct it
        warnings.filterwarnings("ignore", message="SMC moves hit max_mcmc_steps", category=RuntimeWarning)
        try:
            out = adaptive_tempered_smc(generator, path, x0)
        except RuntimeError as err:
            if not str(err).startswith("SMC did not reach beta = 1"):
                raise
            return None
    return out.particles.x[resample(generator, out.log_weights, "systematic")]
