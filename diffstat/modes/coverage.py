r"""Modes that a set of draws misses: the check after a tempering run.

Tempering from a reference reaches the modes that the reference's mass leads to. A mode far from
the reference (a component of a mixture, the far side of a two-mode posterior) can be missed by
every independent run alike, and then no check between runs sees it: the runs agree, their
:math:`\log\hat Z` is the evidence of the modes they found, and nothing says that mass is missing.
:func:`missed_modes` looks for such modes directly, at the cost of a few thousand evaluations:

1. **Starts**: reference draws, scaled about their mean by ``scales`` (0.5, 1, 2, 4), cycling: a
   draw moved outward starts in a far basin that the reference itself rarely visits, one moved
   inward in the basin of a narrow mode that a wide mode's pull hides from farther out. With
   ``keep``, the first ``keep`` climb and the others are screened: each takes ``screen_steps``
   climbing steps, and the ``keep // 4`` highest in log-density climb on too (the first ``keep``
   keep what the check found without screening: far modes that only wide starts reach, low after
   a few steps). A start in a narrow, high mode's basin is at the top after a step or two, so
   screening buys starts at a few evaluations each: ``narrow_wide(10)``'s heavy mode is climbed to
   from 0.05% to 0.1% of N(0, 16 I)'s draws at scale 1 and 1% at scale 0.5 (``docs/mode_check.md``).
2. **Peaks**: ``num_found`` of the draws, half of them chosen by farthest-point selection so that a
   mode holding a few percent of the draws has one, climb to their local maxima
   (:func:`~diffstat.modes.climb.hill_climb`, at most ``num_climb`` steps): their peaks are the modes
   the draws hold. Then every start climbs (at most ``start_climb`` steps). The climbs are
   preconditioned by the draws' covariance within modes (:func:`draws_metric`), so that a narrow,
   correlated peak (a regression's, thousands of times narrower than its prior) is climbed in a
   few steps instead of crawling along its narrowest direction. That metric is the held modes':
   in a basin shaped otherwise (another component's correlations) a climb crawls as an isotropic
   one does and is cut off on the flank, where step 3 counts it covered. So the starts still rising
   when cut off take ``NEWTON_MOVES`` (4) monotone, capped, saddle-free Newton moves
   (:func:`~diffstat.modes.climb.finish_climbs`, proximal scale 16 times the draws' largest
   variance); on a Gaussian basin the first lands on the mode. They cost a Hessian (counted as one
   evaluation, ``d`` backward passes) per move and start still rising.
3. **Covered**: the draw peaks are grouped by barrier, and each group gets the share of the draws
   nearest to its climbed draws; a group with at least ``MIN_DRAW_SHARE`` (1%) of them is a mode the
   draws hold. A climbed start (or a draw peak of a group under that share) joined to its nearest
   draw peak of a held mode (coordinates standardised by the draws' spread) by a segment without a
   barrier (:func:`~diffstat.modes.barriers.no_barrier`) is covered. A start that never got far up
   even after its Newton moves is covered by the same test (its own log-density is the floor), so
   unfinished climbs raise no alarm.
4. **Mass**: the uncovered peaks are grouped by barrier; the highest point of each group is a
   missed mode unless one of its three nearest draws climbs to it and it is the nearest peak of 1%
   of the draws (a held mode that none of the climbed draws is in, as when the draws hold more
   modes than the 64 climbed: then the modes are not weighed). A missed mode's Laplace mass is
   :math:`\log p(m) + \tfrac d2\log 2\pi - \tfrac12\log\det(-\nabla^2\log p(m))` where the
   Hessian is negative definite (else it is not a mode and counts nothing). The missed share is
   :math:`M / (Z + M)`, :math:`M` the missed modes' total and :math:`Z` the run's evidence estimate
   (for MCMC, which has none, the held modes' Laplace masses of step 5).
5. **Weights**: where the draws hold at most ``MAX_WEIGHED_MODES`` (8) modes, each held mode's
   Laplace mass (at its best draw peak) and the missed ones' give each mode a share of the total;
   the ``misweight`` is the total variation between these and the modes' shares of the draws (a
   mode the runs reached with a few percent of the draws but three quarters of the mass, as
   ``narrow_wide``'s heavy mode under tempering).

A run is flagged where the missed share exceeds ``MAX_MISSED_SHARE`` (0.05: a mode with 5% of the
mass is one a statistician needs to hear about) or the misweight exceeds ``MAX_MISWEIGHT`` (0.25:
Laplace masses of non-Gaussian modes are off by factors of order one, so only a gross disagreement
of the weights is a reliable signal). A mode that no start reaches
(a narrow basin seen under a small solid angle, as the heavy mode of ``narrow_wide`` in 10-d on
some seeds) stays unseen: the check finds what gradient ascent from the widened reference finds,
which is far more than tempering's particles, not everything.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from diffstat.modes.barriers import group_by_barrier, no_barrier
from diffstat.modes.climb import BoxedTarget, finish_climbs, hill_climb, hill_climb_unfinished
from diffstat.modes.clusters import cluster_particles
from diffstat.modes.laplace import laplace_log_mass, log_prob_grad_hessian

__all__ = [
    "draws_metric",
    "MAX_MISSED_SHARE",
    "MAX_MISWEIGHT",
    "MIN_DRAW_SHARE",
    "MissedModes",
    "laplace_log_mass_at",
    "missed_modes",
]

#: The missed share above which a run is flagged (module notes).
MAX_MISSED_SHARE = 0.05

#: A mode holding a smaller share of the draws counts as missed (its mass then comes from Laplace).
MIN_DRAW_SHARE = 0.01

#: The draws' modes and the missed ones are weighed against their Laplace masses only up to this
#: many held modes: beyond it (many-well's thousands) the draws nearest to 64 climbed picks are no
#: measure of a mode's share.
MAX_WEIGHED_MODES = 8

#: Uncovered peaks grouped by barrier (the highest first): many-well's hundreds would cost a barrier
#: test per pair.
MAX_LOOSE = 64

#: Missed modes weighed (by Laplace, ``dim`` backward passes each): the highest peaks first.
MAX_MISSED_WEIGHED = 16

#: The misweight above which a run is flagged: Laplace masses of non-Gaussian modes are off by
#: factors of order one, so only a gross disagreement with the draws is a signal.
MAX_MISWEIGHT = 0.25

#: Newton moves for a start still rising when its climb is cut off (module notes, step 2): on a
#: Gaussian basin one lands on the mode, and a few allow for the damping and the other components.
NEWTON_MOVES = 4

#: Their proximal scale :math:`s^2`, in units of the draws' largest variance: wide enough that the
#: damping :math:`s^{-2}` hardly slows a step across a basin of the draws' size.
NEWTON_SCALE2 = 16.0


class MissedModes(NamedTuple):
    """``share`` of the total mass in modes the draws miss (0 when none), each missed mode's
    ``centres (k, dim)`` and Laplace ``log_masses (k,)``, the ``misweight`` (total variation between
    the modes' Laplace shares and their shares of the draws, NaN where they cannot be weighed), and
    the target evaluations spent."""

    share: float
    centres: torch.Tensor
    log_masses: torch.Tensor
    misweight: float
    num_evals: int


def laplace_log_mass_at(target, x: torch.Tensor) -> torch.Tensor:
    r"""Laplace log-masses ``(n,)`` of :math:`\tilde p` at the points ``x: (n, dim)``:
    :math:`\log\tilde p(x) + \frac d2\log 2\pi - \frac12\log\det(-\nabla^2\log\tilde p(x))`, and
    :math:`-\infty` where :math:`-\nabla^2\log\tilde p` is not positive definite (or not finite).
    Costs ``n`` evaluations (``d`` backward passes each)."""
    if x.shape[0] == 0:
        return x.new_empty(0)
    lp, _, hess = log_prob_grad_hessian(target, x)
    ok = torch.isfinite(lp) & torch.isfinite(hess).all(-1).all(-1)
    hess = torch.where(ok[:, None, None], hess, -torch.eye(x.shape[1], dtype=x.dtype, device=x.device))
    eig = torch.linalg.eigvalsh(-hess.double())
    ok = ok & (eig > 0).all(-1)
    log_mass = laplace_log_mass(lp.double(), eig.clamp_min(1e-300))
    return torch.where(ok, log_mass, torch.full_like(log_mass, -math.inf))


def _spread_picks(draws: torch.Tensor, sd: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Indices ``(min(k, n),)`` of draws: half by farthest-point selection in coordinates standardised
    by ``sd`` (every separate cluster of draws gets one, however few draws it holds), the rest at
    random."""
    n = draws.shape[0]
    order = torch.randperm(n, generator=generator, device=generator.device).to(draws.device)
    if k >= n:
        return order
    z = draws / sd
    picks = [int(order[0])]
    dist = (z - z[picks[0]]).norm(dim=-1)
    for _ in range(k // 2 - 1):
        picks.append(int(dist.argmax()))
        dist = torch.minimum(dist, (z - z[picks[-1]]).norm(dim=-1))
    chosen = torch.zeros(n, dtype=torch.bool, device=draws.device)
    chosen[picks] = True
    rest = order[~chosen[order]][: k - len(picks)]
    return torch.cat([torch.tensor(picks, device=draws.device), rest])


def missed_modes(
    target,
    draws: torch.Tensor,
    log_z: float | None,
    starts: torch.Tensor,
    generator: torch.Generator,
    *,
    scales=(0.5, 1.0, 2.0, 4.0),
    num_climb: int = 100,
    num_found: int = 64,
    step_size: float = 0.1,
    precondition: bool = True,
    start_climb: int = 30,
    keep: int | None = None,
    screen_steps: int = 2,
) -> MissedModes:
    r"""Look for modes that ``draws: (n, dim)`` (a run's draws, evidence ``log_z``; None for a run
    without one, such as MCMC: the held modes' Laplace masses then stand for it, and the share is NaN
    where they cannot be weighed) miss, climbing from ``starts: (m, dim)`` (reference draws) scaled
    about their mean by ``scales``, or from ``keep < m`` of them screened (module notes).

    With ``precondition`` (the default) every climb steps along :math:`M\nabla\log p`
    (:func:`draws_metric`: the draws' covariance, the draws' own climbs with it pooled within
    clusters, the starts' with it pooled within the modes those climbs found), beginning at
    ``step_size``; the starts climb at most ``start_climb`` steps: with the metric the climbs on
    mixtures end within it, while a start deep in a real posterior's prior tails is still crawling
    after ``num_climb`` and is judged from where it got either way (``docs/mode_check.md``).
    Without it (or where the draws give no metric) the climbs are isotropic, ``num_climb`` steps at
    most, beginning at ``step_size`` times the squared scale for the starts (``s`` reference sds
    from its mean), times the draws' mean variance for them; ``hill_climb`` adapts it per point.
    """
    evals0 = target.num_target_evals
    dtype, device = target.dtype, draws.device
    draws, starts = draws.to(dtype), starts.to(device=device, dtype=dtype)
    x0, scale = _scaled(starts, scales)
    box = BoxedTarget(target, torch.cat([x0, draws]))
    log_prob_and_grad = box.log_prob_and_grad
    sd = draws.std(0).clamp_min(1e-12) if draws.shape[0] > 1 else torch.ones_like(draws[0])
    metric = draws_metric(draws) if precondition else None
    spread = float(draws.var(0).mean()) if draws.shape[0] > 1 else 1.0
    h0 = step_size * spread if metric is None else step_size
    xd = draws[_spread_picks(draws, sd, num_found, generator)]
    held, held_lp, fine, _ = _climb(log_prob_and_grad, xd, num_climb, lambda ok: h0, metric)
    empty = MissedModes(0.0, draws.new_empty(0, draws.shape[1]), draws.new_empty(0), 0.0, 0)
    if held.shape[0] == 0:
        return empty._replace(num_evals=target.num_target_evals - evals0)
    # The modes the draws hold: the climbed picks grouped by barrier, each group with the share of the
    # draws nearest to its picks; a group under MIN_DRAW_SHARE holds too few to count as found.
    group = group_by_barrier(target.log_prob, held, held_lp)
    owner = torch.cdist(draws / sd, xd[fine] / sd).argmin(-1)
    draw_share = torch.bincount(group[owner], minlength=int(group.max()) + 1).double() / draws.shape[0]
    found = draw_share[group] >= MIN_DRAW_SHARE
    if precondition:  # the starts' metric: the covariance within the modes just found
        metric = draws_metric(draws, group[owner]) if metric is not None else None
    num_steps = num_climb if metric is None else start_climb
    s2 = NEWTON_SCALE2 * float(sd.max()) ** 2  # the Newton moves' proximal scale
    peaks, peak_lp = _climb_starts(box, x0, scale, keep, screen_steps, num_steps, step_size, metric, s2)
    if peaks.shape[0] == 0:
        return empty._replace(num_evals=target.num_target_evals - evals0)
    anchors, anchors_lp = held[found], held_lp[found]
    candidates, candidates_lp = torch.cat([peaks, held[~found]]), torch.cat([peak_lp, held_lp[~found]])
    near = torch.cdist(candidates / sd, anchors / sd).argmin(-1)
    covered = no_barrier(target.log_prob, candidates, candidates_lp, anchors[near], anchors_lp[near])
    loose, loose_lp = candidates[~covered], candidates_lp[~covered]
    centres, log_mass, unweighable = empty.centres, empty.log_masses.double(), False
    if loose.shape[0]:
        centres, log_mass, unweighable = _missed(
            target, log_prob_and_grad, loose, loose_lp, anchors, draws, sd, h0, metric
        )
    held_mass = None if unweighable else _held_log_mass(target, held, held_lp, group, draw_share)
    misweight = math.nan if held_mass is None else _misweight(draw_share, held_mass, log_mass)
    if log_z is None:  # no evidence estimate (MCMC): the held modes' Laplace masses stand for it
        log_z = math.nan if held_mass is None else float(torch.logsumexp(held_mass, 0))
    share = 0.0
    if log_mass.numel():
        missed = torch.logsumexp(log_mass, 0)
        share = float(torch.exp(missed - torch.logaddexp(missed, missed.new_tensor(float(log_z)))))
    return MissedModes(share, centres, log_mass, misweight, target.num_target_evals - evals0)


def _scaled(starts: torch.Tensor, scales) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``starts (m, dim)`` scaled about their mean by ``scales``, cycling; and each one's scale."""
    m = starts.shape[0]
    scale = starts.new_tensor(scales)[torch.arange(m, device=starts.device) % len(scales)]
    return starts.mean(0) + scale[:, None] * (starts - starts.mean(0)), scale


def _climb_starts(box, x0, scale, keep, screen_steps: int, num_steps: int, step_size, metric, s2: float):
    """The starts ``x0 (m, dim)`` (scales ``scale (m,)``) climbed at most ``num_steps`` steps within
    ``box``: all of them, or with ``keep < m`` the first ``keep`` and the ``keep // 4`` highest of the
    others after ``screen_steps`` steps; those still rising then take ``NEWTON_MOVES`` Newton moves
    at proximal scale ``s2`` (module notes). Without a metric a start's first step is ``step_size``
    times its squared scale (``s`` reference sds from the mean); the peaks and their log-densities."""

    def first_steps(s):
        return (lambda ok: step_size * s[ok] ** 2) if metric is None else (lambda ok: step_size)

    if keep is not None and x0.shape[0] > keep:
        top, rows = _screen(
            box.log_prob_and_grad, x0[keep:], keep // 4, screen_steps, first_steps(scale[keep:]), metric
        )
        x0, scale = torch.cat([x0[:keep], top]), torch.cat([scale[:keep], scale[keep:][rows]])
    peaks, peak_lp, _, rising = _climb(box.log_prob_and_grad, x0, num_steps, first_steps(scale), metric)
    peaks[rising], peak_lp[rising] = finish_climbs(box, peaks[rising], s2, NEWTON_MOVES)
    return peaks, peak_lp


def _screen(log_prob_and_grad, x: torch.Tensor, k: int, num_steps: int, step, metric):
    """The ``k`` of the starts ``x (m, dim)`` highest in log-density after ``num_steps`` climbing steps
    each (module notes): their climbed points ``(k, dim)`` and their rows in ``x``."""
    y, lp, ok, _ = _climb(log_prob_and_grad, x, num_steps, step, metric)
    top = lp.argsort(descending=True)[:k]
    return y[top], torch.nonzero(ok).flatten()[top]


def _climb(log_prob_and_grad, x: torch.Tensor, num_climb: int, step, metric):
    """The points of ``x (n, dim)`` with a finite log-density and gradient climbed by
    :func:`~diffstat.modes.climb.hill_climb` (first step sizes ``step(ok)`` for the mask ``ok`` of
    those points); the peaks, their log-densities, the mask, and the mask ``(ok.sum(),)`` of the
    peaks whose climbs were cut off while still rising."""
    with torch.no_grad():
        lp, g = log_prob_and_grad(x)
        ok = torch.isfinite(lp) & torch.isfinite(g).all(-1)
        h = torch.as_tensor(step(ok), dtype=x.dtype, device=x.device).expand(int(ok.sum())).clone()
        peaks, peak_lp, _, unfinished = hill_climb_unfinished(
            log_prob_and_grad, x[ok], lp[ok], g[ok], num_climb, h, metric=metric
        )
    return peaks, peak_lp, ok, unfinished


def _missed(target, log_prob_and_grad, loose, loose_lp, anchors, draws, sd, step: float, metric=None):
    """The missed modes among the uncovered peaks ``loose (m, dim)`` (module notes, step 4): their
    centres ``(k, dim)`` and Laplace log-masses ``(k,)``, and whether a held mode that no climbed draw
    was in turned up (then the modes are not weighed)."""
    top = torch.argsort(loose_lp, descending=True)[:MAX_LOOSE]  # the heaviest candidates, at bounded cost
    loose, loose_lp = loose[top], loose_lp[top]
    label = group_by_barrier(target.log_prob, loose, loose_lp)
    best = _best_of_groups(label, loose_lp)
    best = best[torch.argsort(loose_lp[best], descending=True)][:MAX_MISSED_WEIGHED]
    # A held mode that none of the climbed picks is in: the peak that its nearest draws climb to.
    held_too = _reached_by_draws(
        log_prob_and_grad, target.log_prob, loose[best], loose_lp[best], draws, sd, step, metric
    )
    if bool(held_too.any()):  # held only with a share of the draws (those nearest to it) of 1% or more
        points = torch.cat([anchors, loose[best[held_too]]])
        nearest = torch.cdist(draws / sd, points / sd).argmin(-1)
        counts = torch.bincount(nearest, minlength=points.shape[0])[anchors.shape[0] :]
        held_too[held_too.clone()] = counts / draws.shape[0] >= MIN_DRAW_SHARE
    centres = loose[best[~held_too]]
    log_mass = laplace_log_mass_at(target, centres)
    keep = torch.isfinite(log_mass)
    return centres[keep], log_mass[keep], bool(held_too.any())


def _reached_by_draws(log_prob_and_grad, log_prob, x, lp, draws, sd, step: float, metric, k=3, num_climb=100):
    """Whether each peak of ``x (m, dim)`` is the one that one of its ``k`` nearest draws (coordinates
    standardised by ``sd``) climbs to: no barrier between that draw's peak and it. Climbs ``m k``
    draws, at most ``num_climb`` steps each, the first of step size ``step``."""
    k = min(k, draws.shape[0])
    idx = torch.cdist(x / sd, draws / sd).topk(k, largest=False).indices.flatten()  # (m k,)
    with torch.no_grad():
        lp_d, g_d = log_prob_and_grad(draws[idx])
        ok = torch.isfinite(lp_d) & torch.isfinite(g_d).all(-1)
        step_sizes = torch.full_like(lp_d[ok], step)
        peaks, peak_lp, _ = hill_climb(
            log_prob_and_grad, draws[idx][ok], lp_d[ok], g_d[ok], num_climb, step_sizes, metric=metric
        )
    joined = torch.zeros(idx.shape[0], dtype=torch.bool, device=x.device)
    if peaks.shape[0]:
        rep = torch.arange(x.shape[0], device=x.device).repeat_interleave(k)[ok]
        joined[ok] = no_barrier(log_prob, x[rep], lp[rep], peaks, peak_lp)
    return joined.reshape(-1, k).any(-1)


def draws_metric(draws: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor | None:
    r"""The climbs' preconditioner from ``draws (n, dim)``: their covariance pooled within the groups
    ``labels (n,)`` (the modes the draws hold), or when None within the clusters of
    :func:`~diffstat.modes.clusters.cluster_particles` (draws in several modes would otherwise give
    the spread between modes, too wide a step for a climb within one), shrunk toward its diagonal,
    :math:`(1 - \lambda) S + \lambda\,\mathrm{diag}(S)` with :math:`\lambda = \min(1, d / n)` (a
    sample covariance of :math:`n` draws has correlation errors of order :math:`\sqrt{d/n}`, and at
    :math:`n \le d` it is singular); None with fewer than two draws or no finite, positive definite
    result (the climbs are then isotropic)."""
    n, dim = draws.shape
    if n < 2 or not bool(torch.isfinite(draws).all()):
        return None
    x = draws.double()
    if labels is None:
        gen = torch.Generator(device=x.device).manual_seed(0)  # the caller's stream is left as it was
        labels = cluster_particles(x, x.new_zeros(n), gen)
    labels = torch.unique(labels, return_inverse=True)[1]
    centred = x - torch.stack([x[labels == c].mean(0) for c in range(int(labels.max()) + 1)])[labels]
    cov = centred.T @ centred / max(n - int(labels.max()) - 1, 1)
    shrink = min(1.0, dim / n)
    metric = (1 - shrink) * cov + shrink * torch.diag(cov.diagonal())
    if int(torch.linalg.cholesky_ex(metric).info) != 0:
        return None
    return metric.to(draws.dtype)


def _best_of_groups(label: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """The index of the highest point of each group ``0..K-1`` of ``label``, ``(K,)``."""
    groups = [torch.nonzero(label == k).flatten() for k in range(int(label.max()) + 1)]
    return torch.stack([g[lp[g].argmax()] for g in groups])


def _held_log_mass(target, held, held_lp, group, draw_share) -> torch.Tensor | None:
    """The Laplace log-masses ``(k,)`` of the modes the draws hold (at least ``MIN_DRAW_SHARE`` each),
    at each one's best draw peak; None where more than ``MAX_WEIGHED_MODES`` are held or one has no
    finite Laplace mass."""
    kept = torch.nonzero(draw_share >= MIN_DRAW_SHARE).flatten()
    if kept.numel() > MAX_WEIGHED_MODES:
        return None
    log_mass = laplace_log_mass_at(target, held[_best_of_groups(group, held_lp)[kept]]).to(torch.float64)
    return log_mass if bool(torch.isfinite(log_mass).all()) else None


def _misweight(draw_share, held_log_mass, missed_log_mass) -> float:
    """Total variation between the modes' Laplace shares and their shares of the draws, over the
    modes the draws hold (``held_log_mass``, in the order of their groups) and the missed ones
    (holding none)."""
    kept = draw_share >= MIN_DRAW_SHARE
    log_mass = torch.cat([held_log_mass, missed_log_mass.to(torch.float64)])
    q = torch.cat([draw_share[kept] / draw_share[kept].sum(), log_mass.new_zeros(missed_log_mass.numel())])
    return 0.5 * float((torch.softmax(log_mass, 0) - q.to(log_mass)).abs().sum())
