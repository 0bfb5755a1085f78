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
growing inside a doubling, so ``num_evals`` is exactly the number of leapfrog steps taken (on an
accelerator a chain stopped inside a subtree is evaluated to its end, and those points are counted
too). The cost of a transition is the deepest chain's tree. Per-chain state is packed into a few
tensors, so that dropping chains costs a few row gathers, and the momentum-sum statistics of a
subtree are formed once from the stacked weights: with small batches each operation costs about its
dispatch, and the count of operations per leapfrog step is what the sampler adds to the gradient.

Defaults: ``max_tree_depth = 10`` (at most 1023 leapfrog steps) is Stan's, a bound on the cost of
one transition that a well-adapted step size rarely reaches.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from diffstat.mcmc.base import (
    DIVERGENCE_THRESHOLD,
    LogProbAndGrad,
    MCMCState,
    as_per_chain,
)
from diffstat.mcmc.metric import DenseMetric, Metric, sample_momentum, velocity

__all__ = ["NUTSInfo", "nuts_step"]

#: Batches of more elements than this (rows times dim) take the elementwise paths that cost per
#: element rather than per operation; below it, operations are dominated by their dispatch.
_STACK_LIMIT = 8192


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
    """A subtree of :math:`2^j` leaves built from one end of each growing chain's tree."""

    valid: torch.Tensor  # (B,) no divergence and no U-turn inside
    first: tuple  # (p, v) at the leaf next to the old tree
    last: torch.Tensor  # (B, 4 dim) [x, p, grad, v] at the far leaf, the tree's new end
    rho: torch.Tensor  # (B, dim) momentum sum
    log_weight: torch.Tensor  # (B,) log of the sum of the leaves' weights
    proposal: torch.Tensor  # (B, 2 dim + 2) [x, grad, log_prob, 2 kinetic] drawn in proportion to the weights
    num_leapfrog: torch.Tensor
    sum_accept: torch.Tensor
    diverging: torch.Tensor
    num_evals: int


def _no_turn(velocities: list, sums: list) -> torch.Tensor:
    r"""The generalised U-turn criterion over several stretches at once: True where every
    :math:`p^\sharp\cdot\rho > 0` for the velocities at the stretches' ends and their momentum sums
    (paired in order). Small batches take one stacked product (few operations, each costing little
    more than its dispatch); large ones a product per pair (no copies into a stack)."""
    if velocities[0].numel() > _STACK_LIMIT:
        return torch.stack([(v * rho).sum(-1) for v, rho in zip(velocities, sums)]).amin(0) > 0
    return (torch.stack(velocities) * torch.stack(sums)).sum(-1).amin(0) > 0


def _leaf_log_weight(h0: torch.Tensor, log_prob: torch.Tensor, twice_kinetic: torch.Tensor) -> torch.Tensor:
    """Log multinomial weight :math:`H_0 - H` of a new point; NaN (a non-finite point) gives -inf."""
    log_weight = torch.sub(h0 + log_prob, twice_kinetic, alpha=0.5)
    return torch.nan_to_num(log_weight, nan=-torch.inf, posinf=-torch.inf)


def _sync_is_free(device: torch.device) -> bool:
    """Whether reading a flag back to the host costs nothing (the CPU), so that the target can be
    evaluated only at the chains still growing at every leapfrog step, not only at every doubling."""
    return device.type == "cpu"


def _directions(generator: torch.Generator, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """For each chain in ``rows``, 1 (extend forward in time) or 0 (backward), each with probability 1/2."""
    return (torch.rand(rows.shape, generator=generator, dtype=like.dtype, device=like.device) < 0.5).long()


def _replace_rows(dst: torch.Tensor, take: torch.Tensor, src: torch.Tensor, sync_free: bool) -> torch.Tensor:
    """``dst`` with its rows ``take: (B,)`` replaced by those of ``src``. On the CPU the rows are
    copied in place into ``dst`` (which must be a buffer of the caller's): ``torch.where`` there
    costs about ten additions per element, and late in a trajectory few rows change."""
    if sync_free and dst.numel() > _STACK_LIMIT:
        idx = take.nonzero().squeeze(1)
        return dst.index_copy_(0, idx, src.index_select(0, idx))
    return torch.where(take.unsqueeze(-1), src, dst)


def _drift(inv_mass: Metric, h: torch.Tensor):
    r"""The position update :math:`p \mapsto h M^{-1} p` for steps ``h: (B, 1)``, with the diagonal
    metric folded into the step once per doubling."""
    if inv_mass is None:
        return lambda p: h * p
    if isinstance(inv_mass, DenseMetric):
        return lambda p: h * (p @ inv_mass.inv_mass)
    scaled = h * inv_mass
    return lambda p: scaled * p


def _evaluate(log_prob_and_grad, x: torch.Tensor, idx: torch.Tensor | None, lp, grad):
    """Log-density and gradient at the rows ``idx`` of ``x`` (``None``: all rows), the other rows
    keeping ``lp`` and ``grad`` (stale values of stopped rows, never used), and the number of
    points evaluated."""
    if idx is None:
        lp, grad = log_prob_and_grad(x)
        return lp, grad, x.shape[0]
    lp_live, grad_live = log_prob_and_grad(x.index_select(0, idx))
    return lp.index_copy(0, idx, lp_live), grad.index_copy(0, idx, grad_live), idx.numel()


def _inner_no_turn(k: int, depth: int, starts: list, ends: list, v, cum):
    """No U-turn in the blocks of :math:`2^m` leaves (m >= 1) that leaf ``k`` completes: the whole
    block, and each half extended by the neighbouring leaf of the other half (Stan 2.21+).

    With ``cum`` the momentum sum through leaf ``k``, a block ``[a0, b1]`` with halves ending at
    ``a1`` and starting at ``b0`` has sums ``cum - before(a0)`` (whole), ``after(b0) - before(a0)``
    (first half and ``b0``) and ``cum - before(a1)`` (``a1`` and the second half). For two leaves
    the three coincide and one check is made.
    """
    velocities, sums = [], []
    for m in range(1, depth + 1):
        if (k + 1) % (1 << m):
            break
        va0, before_a0, _ = starts[m]
        whole = cum - before_a0
        velocities += [va0, v]
        sums += [whole, whole]
        if m > 1:
            vb0, _, after_b0 = starts[m - 1]
            va1, before_a1 = ends[m - 1]
            left, right = after_b0 - before_a0, cum - before_a1
            velocities += [va0, vb0, va1, v]
            sums += [left, left, right, right]
    return _no_turn(velocities, sums) if velocities else None


def _build_subtree(log_prob_and_grad, start, h, inv_mass, h0, depth, generator, sync_free) -> _Subtree:
    """Integrate :math:`2^{depth}` leapfrog steps from ``start = (x, p, grad)`` with signed step
    sizes ``h: (B, 1)``, sampling a candidate and checking U-turns and divergences as it goes.

    ``starts[m]`` holds (velocity, momentum sums before and through it) at the first leaf of the
    open block of :math:`2^m` leaves, ``ends[m]`` (velocity, momentum sum before it) at the last
    leaf of the last closed one.
    """
    x, p, grad = start
    batch, size = x.shape[0], 1 << depth
    half, drift = 0.5 * h, _drift(inv_mass, h)
    kick = half * grad
    live = torch.ones(batch, dtype=torch.bool, device=x.device)
    log_weight = torch.full_like(h0, -torch.inf)
    log_uniforms = torch.rand((size, batch), generator=generator, dtype=h0.dtype, device=h0.device).log_()
    cum = torch.zeros_like(p)
    starts: list = [None] * (depth + 1)
    ends: list = [None] * depth
    num_evals, first, proposal, lives, weights, lp = 0, None, None, [], [], None
    for k in range(size):
        evaluate_at = None
        if sync_free and k:
            idx = live.nonzero().squeeze(1)
            if idx.numel() == 0:
                break  # every row stopped: the rest of the subtree would be discarded anyway
            evaluate_at = idx if idx.numel() < batch else None
        p = p + kick
        x = x + drift(p)
        lp, grad, count = _evaluate(log_prob_and_grad, x, evaluate_at, lp, grad)
        num_evals += count
        kick = half * grad  # this half kick ends this step and starts the next
        p = p + kick
        v = velocity(inv_mass, p)
        twice_kinetic = (p * v).sum(-1)
        w = _leaf_log_weight(h0, lp, twice_kinetic)
        lives.append(live)
        weights.append(w)
        log_weight = torch.logaddexp(log_weight, w)
        leaf = torch.cat([x, grad, lp.unsqueeze(-1), twice_kinetic.unsqueeze(-1)], -1)
        if k == 0:
            proposal, first = leaf, (p, v)
        else:  # progressive sampling: after leaf k, each leaf so far is held with probability w / W
            proposal = _replace_rows(proposal, log_uniforms[k] < w - log_weight, leaf, sync_free)
        before, cum = cum, cum + p
        for m in range(depth + 1):
            if k % (1 << m) == 0:
                starts[m] = (v, before, cum)
        no_turn = _inner_no_turn(k, depth, starts, ends, v, cum)
        for m in range(depth):
            if (k + 1) % (1 << m) == 0:
                ends[m] = (v, before)
        live = live & (w >= -DIVERGENCE_THRESHOLD)
        if no_turn is not None:
            live = live & no_turn
    # the statistics of the steps taken while the subtree was alive, once per subtree
    lives_taken, weights = torch.stack(lives), torch.stack(weights)
    sum_accept = (lives_taken * torch.exp(weights.clamp(max=0.0))).sum(0)
    diverging = (lives_taken & (weights < -DIVERGENCE_THRESHOLD)).any(0)
    last = torch.cat([x, p, grad, v], -1)
    return _Subtree(
        live, first, last, cum, log_weight, proposal, lives_taken.sum(0), sum_accept, diverging, num_evals
    )


class _Tree:
    """The trajectories of the chains still growing, ``B`` rows for the chains ``rows``: compacted
    after each doubling, the chains that stop being written to the full-size outputs ``out``.

    ``ends: (2, B, 4 dim)`` holds [x, p, grad, velocity] at the backward (0) and forward (1) ends,
    ``sample: (B, 2 dim + 2)`` [x, grad, log_prob, twice the kinetic energy] of the point drawn
    so far, ``chain: (B, 2)`` [step size, H0] and ``stats: (B, 5)`` the counts [moved, depth,
    leapfrog steps, sum of acceptance probabilities, divergences]: packed so that compacting the
    batch and retiring chains cost a few row gathers.
    """

    PER_CHAIN = ("rows", "chain", "stats", "log_weight", "rho", "sample")
    OUTPUTS = ("sample", "stats")

    def __init__(self, state: MCMCState, p0, h, inv_mass):
        x, n = state.x, state.x.shape[0]
        v0 = velocity(inv_mass, p0)
        twice_kinetic = (p0 * v0).sum(-1)
        self.ends = torch.cat([x, p0, state.grad, v0], -1).expand(2, -1, -1).contiguous()
        self.sample = torch.cat([x, state.grad, torch.stack([state.log_prob, twice_kinetic], -1)], -1)
        self.rows = torch.arange(n, device=x.device)
        self.chain = torch.cat([h, (0.5 * twice_kinetic - state.log_prob).unsqueeze(-1)], -1)
        self.stats = x.new_zeros((n, 5))
        self.rho, self.inv_mass = p0, inv_mass
        self.log_weight = torch.zeros_like(state.log_prob)  # the start's weight is e^{H0 - H0} = 1
        self.out = {name: torch.empty_like(getattr(self, name)) for name in self.OUTPUTS}

    def grow(self, log_prob_and_grad, depth: int, generator: torch.Generator, sync_free: bool) -> int:
        """Double every tree once (in its own direction), merge, and keep the chains that go on.
        Returns the number of points evaluated."""
        batch, dim = self.rho.shape
        fwd = _directions(generator, self.rows, self.rho)
        arange = torch.arange(batch, device=fwd.device)
        flat, near_rows = self.ends.view(2 * batch, 4 * dim), fwd * batch + arange
        near = flat.index_select(0, near_rows)  # the end the subtree grows from
        v_far = flat[:, 3 * dim :].index_select(0, (1 - fwd) * batch + arange)
        x, p, grad, v_near = near.split(dim, -1)
        h, h0 = self.chain[:, :1] * (2 * fwd - 1).unsqueeze(-1), self.chain[:, 1]  # signed steps, H0
        start = (x, p, grad)
        sub = _build_subtree(log_prob_and_grad, start, h, self.inv_mass, h0, depth, generator, sync_free)
        # biased progressive sampling: the subtree's candidate with probability min(1, W_new / W_old)
        u = torch.rand(batch, generator=generator, dtype=x.dtype, device=x.device)
        take = sub.valid & (u < torch.exp(sub.log_weight - self.log_weight))
        self.sample = _replace_rows(self.sample, take, sub.proposal, sync_free)
        self.log_weight = torch.logaddexp(self.log_weight, sub.log_weight)  # used only where valid
        (p_first, v_first), v_last = sub.first, sub.last[:, 3 * dim :]
        rho = self.rho + sub.rho
        extended_old, extended_new = self.rho + p_first, sub.rho + p
        no_turn = _no_turn(
            [v_far, v_last, v_far, v_first, v_near, v_last],
            [rho, rho, extended_old, extended_old, extended_new, extended_new],
        )
        self.rho = rho
        self.stats += torch.stack([take, sub.valid, sub.num_leapfrog, sub.sum_accept, sub.diverging], -1)
        self._keep(sub.valid & no_turn, near_rows, sub.last)
        return sub.num_evals

    def _keep(self, go_on: torch.Tensor, near_rows, last) -> None:
        """The subtree's ``last`` leaf becomes each tree's end it grew from (rows ``near_rows`` of
        the flattened ends, in place); write the chains that stop to the outputs and compact the rest."""
        self.ends.view(-1, last.shape[1]).index_copy_(0, near_rows, last)
        keep = go_on.nonzero().squeeze(1)  # the one host sync per doubling
        if keep.numel() < go_on.numel():
            self.retire(~go_on)
            for name in self.PER_CHAIN:
                setattr(self, name, getattr(self, name).index_select(0, keep))
            self.inv_mass = _metric_rows(self.inv_mass, keep)
            self.ends = self.ends.index_select(1, keep)

    def retire(self, stop: torch.Tensor | None = None) -> None:
        """Write the chains ``stop`` (all when None) to the outputs."""
        idx = None if stop is None else stop.nonzero().squeeze(1)
        rows = self.rows if idx is None else self.rows.index_select(0, idx)
        for name in self.OUTPUTS:
            value = getattr(self, name)
            self.out[name].index_copy_(0, rows, value if idx is None else value.index_select(0, idx))


def _metric_rows(inv_mass: Metric, rows: torch.Tensor) -> Metric:
    """The metric of the chains ``rows`` (only a per-chain diagonal ``(n, dim)`` needs indexing)."""
    if isinstance(inv_mass, torch.Tensor) and inv_mass.dim() == 2:
        return inv_mass.index_select(0, rows)
    return inv_mass


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
    x, dim = state.x, state.x.shape[1]
    num_evals = 0
    if state.grad is None:
        lp, grad = log_prob_and_grad(x)
        state, num_evals = MCMCState(x, lp, grad), x.shape[0]
    p0 = sample_momentum(generator, inv_mass, x)
    tree = _Tree(state, p0, as_per_chain(step_size, x), inv_mass)
    sync_free = _sync_is_free(x.device)
    for depth in range(max_tree_depth):
        num_evals += tree.grow(log_prob_and_grad, depth, generator, sync_free)
        if tree.rows.numel() == 0:
            break
    tree.retire()
    sample, (moved, depth, steps, sum_accept, diverging) = tree.out["sample"], tree.out["stats"].unbind(-1)
    lp_new, twice_kinetic = sample[:, 2 * dim], sample[:, 2 * dim + 1]
    info = NUTSInfo(
        sum_accept / steps.clamp(min=1),
        moved > 0,
        diverging > 0,
        num_evals,
        depth.long(),
        steps.long(),
        0.5 * twice_kinetic - lp_new,
    )
    new = MCMCState(sample[:, :dim].contiguous(), lp_new.contiguous(), sample[:, dim : 2 * dim].contiguous())
    return new, info
