r"""The No-U-Turn sampler, batched over chains that grow their own trees in lockstep.

Algorithm (Hoffman and Gelman 2014, with Betancourt 2017's multinomial sampling, as in Stan 2.21+,
``base_nuts.hpp``). Draw :math:`p \sim \mathcal N(0, M)`, set :math:`H_0 = -\log\pi(x) + K(p)`,
start a tree holding the one point :math:`(x, p)` and double it at most ``max_tree_depth`` times:

1. pick a direction, forward or backward in time, with probability 1/2 each, and integrate a new
   subtree of :math:`2^j` leapfrog steps from the tree's end in that direction;
2. each new point :math:`z` has weight :math:`w = e^{H_0 - H(z)}`; the subtree's candidate is
   drawn from its points with probability proportional to :math:`w` (progressive sampling, leaf by
   leaf), and replaces the tree's sample with probability :math:`\min(1, W_{new}/W_{old})`
   (Stan's *biased* progressive sampling, which favours points far from the start);
3. the generalised U-turn criterion (Betancourt 2013): a stretch of trajectory with ends
   :math:`a, b` and momentum sum :math:`\rho` keeps going while :math:`p^\sharp_a\cdot\rho > 0` and
   :math:`p^\sharp_b\cdot\rho > 0`, with :math:`p^\sharp = M^{-1}p`. It is checked on every
   aligned block of :math:`2^m` points inside the subtree, as the recursive tree does when it merges
   two halves, plus Stan's two checks across the boundary of the halves (each half extended by the
   neighbouring point of the other), and then on the merged tree. A U-turn inside the subtree, or an
   energy error :math:`H - H_0` above 1000 nats or not finite (a divergence), discards the subtree
   and stops the chain; a U-turn of the merged tree stops it after the subtree was sampled.

Batching: ``x`` is ``(n, dim)``; at doubling ``j`` every chain still growing integrates :math:`2^j`
steps in its own direction, so all of them sit at the same leaf index and the blocks whose checks
fall due are the same for all: the momentum sums and end momenta of the open blocks are kept as
checkpoints, one per level (:math:`O(\text{max depth})` storage, the iterative scheme of blackjax and
TFP). Chains that stopped are dropped from the batch at each doubling (one host sync per doubling);
on the CPU, where a sync costs nothing, the log-density is also evaluated only at the rows still
growing inside a doubling, so ``num_evals`` is exactly the number of leapfrog steps taken. The cost
of a transition is the deepest chain's tree.

Defaults: ``max_tree_depth = 10`` (at most 1023 leapfrog steps) is Stan's, a bound on the cost of
one transition that a well-adapted step size rarely reaches.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from diffstat.mcmc.base import DIVERGENCE_THRESHOLD, LogProbAndGrad, MCMCState, as_per_chain
from diffstat.mcmc.metric import Metric, sample_momentum, velocity

__all__ = ["NUTSInfo", "nuts_step"]


class NUTSInfo(NamedTuple):
    """What one NUTS transition did, per chain.

    acceptance_rate: (n,) Stan's accept_stat, the mean over the tree's new points of
        :math:`\\min(1, e^{H_0 - H})` (the statistic step-size adaptation drives to its target).
    is_accepted: (n,) bool, the chain moved (its sample is not the starting point).
    diverging: (n,) bool, an energy error above DIVERGENCE_THRESHOLD (1000 nats) or not finite.
    num_evals: points at which the log-density and gradient were evaluated (sum over chains).
    tree_depth: (n,) int, doublings whose subtree was kept.
    num_leapfrog: (n,) int, leapfrog steps taken by each chain.
    energy: (n,) the Hamiltonian :math:`-\\log\\pi(x) + K(p)` at the chosen point (for E-BFMI).
    """

    acceptance_rate: torch.Tensor
    is_accepted: torch.Tensor
    diverging: torch.Tensor
    num_evals: int
    tree_depth: torch.Tensor
    num_leapfrog: torch.Tensor
    energy: torch.Tensor


class _Subtree(NamedTuple):
    """A subtree built from one end of each chain's tree (rows of the doubling's batch)."""

    valid: torch.Tensor  # (B,) no divergence and no U-turn inside
    first: tuple  # (p, v) at the leaf next to the old tree
    last: tuple  # (x, p, grad, v) at the far leaf, the tree's new end
    rho: torch.Tensor  # (B, dim) momentum sum
    log_weight: torch.Tensor  # (B,) log of the sum of the leaves' weights
    proposal: tuple  # (x, p, grad, log_prob) drawn in proportion to the weights
    num_leapfrog: torch.Tensor
    sum_accept: torch.Tensor
    diverging: torch.Tensor
    num_evals: int


def _metric_rows(inv_mass: Metric, rows: torch.Tensor) -> Metric:
    """The metric of the chains ``rows`` (only a per-chain diagonal ``(n, dim)`` needs indexing)."""
    if isinstance(inv_mass, torch.Tensor) and inv_mass.dim() == 2:
        return inv_mass[rows]
    return inv_mass


def _turning(v_a: torch.Tensor, v_b: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    r"""The generalised U-turn of a stretch with end velocities :math:`p^\sharp_a, p^\sharp_b` and
    momentum sum :math:`\rho`: not (:math:`p^\sharp_a\cdot\rho > 0` and :math:`p^\sharp_b\cdot\rho > 0`)."""
    return ((v_a * rho).sum(-1) <= 0) | ((v_b * rho).sum(-1) <= 0)


def _leaf_log_weight(h0: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """Log multinomial weight :math:`H_0 - H` of a new point; NaN (a non-finite point) gives -inf."""
    return torch.nan_to_num(h0 - energy, nan=-torch.inf, posinf=-torch.inf)


def _sync_is_free(device: torch.device) -> bool:
    """Whether reading a flag back to the host costs nothing (the CPU), so that the target can be
    evaluated only at the chains still growing at every leapfrog step, not only at every doubling."""
    return device.type == "cpu"


def _directions(generator: torch.Generator, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """For each chain in ``rows``, 1 (extend forward in time) or 0 (backward), each with probability 1/2."""
    return (torch.rand(rows.shape, generator=generator, dtype=like.dtype, device=like.device) < 0.5).long()


def _leapfrog(log_prob_and_grad, x, p, grad, h, inv_mass, live):
    """One leapfrog step of signed size ``h: (B, 1)``; the target is evaluated only at the rows
    ``live`` (``None``: all rows). Returns x, p, grad, log_prob and the number of points evaluated."""
    p = p + (0.5 * h) * grad
    x = x + h * velocity(inv_mass, p)
    if live is None or bool(live.all()):
        lp, grad = log_prob_and_grad(x)
        count = x.shape[0]
    else:
        idx = live.nonzero().squeeze(1)
        lp_live, grad_live = log_prob_and_grad(x[idx])
        lp = torch.full_like(x[:, 0], torch.nan).index_copy_(0, idx, lp_live)
        grad = torch.zeros_like(x).index_copy_(0, idx, grad_live)
        count = idx.numel()
    p = p + (0.5 * h) * grad
    return x, p, grad, lp, count


def _inner_turn(k: int, depth: int, starts: list, ends: list, p, v, cum):
    """U-turns of the blocks of :math:`2^m` leaves (m >= 1) that leaf ``k`` completes: the whole
    block, and each half extended by the neighbouring leaf of the other half (Stan 2.21+)."""
    turn = None
    for m in range(1, depth + 1):
        if (k + 1) % (1 << m):
            break
        _, va0, before_a = starts[m]  # first leaf of the block, momentum sum before it
        pb0, vb0, before_b = starts[m - 1]  # first leaf of the second half
        pa1, va1 = ends[m - 1]  # last leaf of the first half
        rho_a, rho_b = before_b - before_a, cum - before_b
        t = _turning(va0, v, rho_a + rho_b) | _turning(va0, vb0, rho_a + pb0) | _turning(va1, v, rho_b + pa1)
        turn = t if turn is None else turn | t
    return turn


def _build_subtree(log_prob_and_grad, start, h, inv_mass, h0, depth, generator, exact_evals) -> _Subtree:
    """Integrate :math:`2^{depth}` leapfrog steps from ``start = (x, p, grad)`` with signed step
    sizes ``h: (B, 1)``, sampling a candidate and checking U-turns and divergences as it goes.

    ``starts[m]`` holds (p, velocity, momentum sum before it) at the first leaf of the open block
    of :math:`2^m` leaves, ``ends[m]`` (p, velocity) at the last leaf of the last closed one.
    """
    x, p, grad = start
    batch = x.shape[0]
    live = torch.ones(batch, dtype=torch.bool, device=x.device)
    num_leapfrog = torch.zeros(batch, dtype=torch.long, device=x.device)
    sum_accept, diverging = torch.zeros_like(h0), torch.zeros_like(live)
    log_weight = torch.full_like(h0, -torch.inf)
    cum = torch.zeros_like(p)
    starts: list = [None] * (depth + 1)
    ends: list = [None] * depth
    num_evals, first, proposal = 0, None, None
    for k in range(1 << depth):
        x, p, grad, lp, count = _leapfrog(log_prob_and_grad, x, p, grad, h, inv_mass, live if exact_evals else None)
        num_evals += count
        v = velocity(inv_mass, p)
        w = _leaf_log_weight(h0, 0.5 * (p * v).sum(-1) - lp)
        num_leapfrog += live
        sum_accept += torch.where(live, torch.exp(w.clamp(max=0.0)), 0.0)
        div = live & (w < -DIVERGENCE_THRESHOLD)
        diverging |= div
        log_weight = torch.logaddexp(log_weight, w)
        if k == 0:
            proposal, first = (x, p, grad, lp), (p, v)
        else:  # progressive sampling: after leaf k, each leaf so far is held with probability w / W
            u = torch.rand(batch, generator=generator, dtype=h0.dtype, device=h0.device)
            take = u < torch.exp(w - log_weight)
            proposal = tuple(torch.where(take.view((-1,) + (1,) * (a.dim() - 1)), b, a)
                             for a, b in zip(proposal, (x, p, grad, lp)))
        before, cum = cum, cum + p
        for m in range(depth + 1):
            if k % (1 << m) == 0:
                starts[m] = (p, v, before)
        turn = _inner_turn(k, depth, starts, ends, p, v, cum)
        for m in range(depth):
            if (k + 1) % (1 << m) == 0:
                ends[m] = (p, v)
        live = live & ~div if turn is None else live & ~div & ~turn
        if exact_evals and k + 1 < (1 << depth) and not bool(live.any()):
            break  # every row stopped: the rest of the subtree would be discarded anyway
    return _Subtree(live, first, (x, p, grad, v), cum, log_weight, proposal, num_leapfrog, sum_accept,
                    diverging, num_evals)


class _Tree:
    """Each chain's trajectory so far, full size ``n``, updated in place after every doubling.

    The two ends are stacked, index 0 the backward (earliest) end and 1 the forward one.
    """

    def __init__(self, state: MCMCState, p0: torch.Tensor, v0: torch.Tensor):
        x, n = state.x, state.x.shape[0]
        self.ends = {name: torch.stack([t, t]) for name, t in (("x", x), ("p", p0), ("grad", state.grad), ("v", v0))}
        self.rho = p0.clone()
        self.sample = [x, p0, state.grad, state.log_prob]
        self.moved = torch.zeros(n, dtype=torch.bool, device=x.device)
        self.log_weight = torch.zeros_like(state.log_prob)  # the start's weight is e^{H0 - H0} = 1
        self.depth = torch.zeros(n, dtype=torch.long, device=x.device)
        self.num_leapfrog = torch.zeros_like(self.depth)
        self.sum_accept = torch.zeros_like(state.log_prob)
        self.diverging = torch.zeros_like(self.moved)
        self.active = torch.ones_like(self.moved)

    def merge(self, rows: torch.Tensor, fwd: torch.Tensor, sub: _Subtree, generator: torch.Generator) -> None:
        """Merge each chain's new subtree (built in direction ``fwd: (B,)`` long, 1 forward) into
        its tree: biased progressive sampling, the U-turn checks of the merged tree, the new end."""
        valid = sub.valid
        old_weight = self.log_weight[rows]
        u = torch.rand(rows.shape, generator=generator, dtype=old_weight.dtype, device=old_weight.device)
        take = valid & (u < torch.exp(sub.log_weight - old_weight))
        for i, new in enumerate(sub.proposal):
            old = self.sample[i][rows]
            self.sample[i] = self.sample[i].index_copy(0, rows, torch.where(take.view((-1,) + (1,) * (old.dim() - 1)), new, old))
        self.moved[rows] = self.moved[rows] | take
        self.log_weight[rows] = torch.where(valid, torch.logaddexp(old_weight, sub.log_weight), old_weight)
        back = 1 - fwd
        v_far, p_near, v_near = self.ends["v"][back, rows], self.ends["p"][fwd, rows], self.ends["v"][fwd, rows]
        rho_old = self.rho[rows]
        rho = rho_old + sub.rho
        (p_first, v_first), v_last = sub.first, sub.last[3]
        turn = (_turning(v_far, v_last, rho) | _turning(v_far, v_first, rho_old + p_first)
                | _turning(v_near, v_last, sub.rho + p_near))
        keep = valid.unsqueeze(-1)
        for name, new in zip(("x", "p", "grad", "v"), sub.last):
            self.ends[name][fwd, rows] = torch.where(keep, new, self.ends[name][fwd, rows])
        self.rho[rows] = torch.where(keep, rho, rho_old)
        self.depth[rows] += valid
        self.num_leapfrog[rows] += sub.num_leapfrog
        self.sum_accept[rows] += sub.sum_accept
        self.diverging[rows] |= sub.diverging
        self.active[rows] = valid & ~turn


def nuts_step(
    generator: torch.Generator,
    state: MCMCState,
    log_prob_and_grad: LogProbAndGrad,
    step_size,
    inv_mass: Metric = None,
    *,
    max_tree_depth: int = 10,
) -> tuple[MCMCState, NUTSInfo]:
    r"""One NUTS transition for each of ``n`` chains (module docstring: the algorithm).

    Parameters
    ----------
    generator : torch.Generator
        The only source of randomness (momenta, directions, multinomial draws).
    state : MCMCState
        Current points ``x: (n, dim)`` with their log-densities and gradients.
    log_prob_and_grad : callable
        ``x: (B, dim) -> (log_prob (B,), grad (B, dim))``; called on the chains still growing.
    step_size : float or (n,) tensor
        Leapfrog step size, shared or one per chain.
    inv_mass : None, (dim,) or (n, dim) tensor, or DenseMetric
        The metric :math:`M^{-1}` (identity, diagonal shared or per chain, dense).
    max_tree_depth : int
        At most this many doublings, :math:`2^{\text{depth}} - 1` leapfrog steps (Stan's 10).

    Returns
    -------
    (MCMCState, NUTSInfo)
        The new points and what the transition did, per chain.
    """
    if max_tree_depth < 1:
        raise ValueError(f"max_tree_depth must be at least 1, got {max_tree_depth}")
    x = state.x
    num_evals = 0
    if state.grad is None:
        lp, grad = log_prob_and_grad(x)
        state, num_evals = MCMCState(x, lp, grad), x.shape[0]
    h = as_per_chain(step_size, x)
    p0 = sample_momentum(generator, inv_mass, x)
    v0 = velocity(inv_mass, p0)
    h0 = 0.5 * (p0 * v0).sum(-1) - state.log_prob
    tree = _Tree(state, p0, v0)
    exact_evals = _sync_is_free(x.device)
    for depth in range(max_tree_depth):
        rows = tree.active.nonzero().squeeze(1)  # the one host sync per doubling
        if rows.numel() == 0:
            break
        fwd = _directions(generator, rows, x)
        start = tuple(tree.ends[name][fwd, rows] for name in ("x", "p", "grad"))
        signed_h = h[rows] * (2.0 * fwd - 1.0).to(x.dtype).unsqueeze(-1)
        sub = _build_subtree(log_prob_and_grad, start, signed_h, _metric_rows(inv_mass, rows), h0[rows], depth,
                             generator, exact_evals)
        num_evals += sub.num_evals
        tree.merge(rows, fwd, sub, generator)
    x_new, p_new, grad_new, lp_new = tree.sample
    energy = 0.5 * (p_new * velocity(inv_mass, p_new)).sum(-1) - lp_new
    info = NUTSInfo(tree.sum_accept / tree.num_leapfrog.clamp(min=1), tree.moved, tree.diverging, num_evals,
                    tree.depth, tree.num_leapfrog, energy)
    return MCMCState(x_new, lp_new, grad_new), info
