r"""Stan's windowed warm-up for a batch of chains, with per-chain step sizes.

Schedule (:func:`~diffstat.mcmc.adaptation.stan_windows`; Stan Reference Manual, "HMC algorithm
parameters", and ``stan/mcmc/windowed_adaptation.hpp``): a fast window of 75 iterations adapts the
step size only; slow windows of 25, 50, 100, ... iterations each end with a new metric, estimated from
that window's draws pooled across all chains (diagonal: the regularised variances; dense: the
regularised covariance :math:`\tfrac{n}{n+5} S + 10^{-3}\tfrac{5}{n+5} D`, with :math:`D` the
current metric's variances, or :math:`I` while the metric is the identity: Stan's shrinkage in the
units of the metric in use, see :data:`FLOOR`); a terminal fast window of
50 iterations adapts the step size to the final metric. After each metric update the step sizes are
re-initialised by the doubling heuristic and dual averaging restarts, as in Stan; a window whose
estimate does not replace the current metric (too few draws for a dense one, or the current one
whitens the window better) leaves the step sizes to their running dual averaging, since what they
were adapted to has not changed.

Step sizes are **per chain** until the last metric update: every chain runs its own dual averaging
(Hoffman and Gelman 2014) toward the kernel's target acceptance, so one chain still far in a tail,
whose step size must be tiny, does not shrink the others'. The terminal window then pools them: one
step size, started at the median of the chains' re-initialised step sizes, adapted on the acceptance
averaged over chains (a statistic as many times less noisy as there are chains, over the 50 iterations
that set the sampling step size). One shared step size for sampling keeps the chains exchangeable
(R-hat compares like with like; a stuck chain cannot hide behind a step size of its own). Without
metric windows (``adapt_mass=False`` or under 20 iterations) the step sizes stay per chain and the
median of their averages is used.

A first metric handed in (the start phase's Laplace covariance at the joint mode) is checked over
the first :data:`FIRST_CHECK` iterations: where the chains' median tree depth reaches
:data:`SATURATED_DEPTH`, the identity is tried for as many iterations (step sizes re-initialised) and
kept if it moves the slowest coordinate further per leapfrog step; otherwise the first metric and
its step sizes come back. The mode of a hierarchical model can sit where the bulk is not (a group
scale far above its posterior, the non-centred coefficients pinned there), and its curvature is then
far too narrow for the bulk: keeping it until the first slow window ends costs every fast-window
iteration a near-maximal tree, while the identity is what warm-up uses without a start phase.

With ``metric="auto"`` the kind is chosen at each metric update from that window's correlations
(:func:`~diffstat.mcmc.adaptation.choose_metric`); the last choice is the one sampled with.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffstat.mcmc.adaptation import (
    AUTO_DENSE_MAX_DIM,
    DualAveraging,
    WelfordCovariance,
    WelfordVariance,
    choose_metric,
    stan_windows,
)
from diffstat.mcmc.base import LogProbAndGrad, MCMCState
from diffstat.mcmc.chees import JitteredLength
from diffstat.mcmc.metric import DenseMetric, Metric
from diffstat.mcmc.start import initial_step_sizes

__all__ = ["METRICS", "WarmupResult", "whitening_loss", "windowed_warmup"]

METRICS = ("diag", "dense", "auto")
#: A dense metric is estimated only from at least this many draws per dimension: with n draws in d
#: dimensions the sample covariance's eigenvalues spread over about (1 +- sqrt(d/n))^2
#: (Marchenko-Pastur), and below n = d it is singular, Stan's 1e-3 shrinkage then giving a metric
#: that forces tiny steps (measured: NUTS on the 100-d test Gaussian spent 5x more gradients in
#: warm-up than in sampling).
DENSE_MIN_DRAWS_PER_DIM = 10
#: Stan shrinks a window's estimate toward 1e-3 I, a floor fixed in absolute units: on a regression
#: with an uncentred predictor (posteriordb's earnings and kilpisjarvi, correlations 0.998 to 0.99999,
#: the narrowest posterior variance 1e-9 to 1.5e-7) it widens the metric's narrowest direction 300 to
#: 50,000 times and forces trees of 50+ leapfrog steps. Here the floor is this fraction of the
#: current metric's variances (:func:`_floor`).
FLOOR = 1e-3

#: The start's Laplace covariance is checked over warm-up's first :data:`FIRST_CHECK` iterations, and
#: the identity tried over as many: ten let the step sizes settle from the doubling heuristic's start
#: (the median depth is taken over the last half), and cost little next to the 65 or more iterations
#: of a fast window that a saturating metric would spend.
FIRST_CHECK = 10
#: The identity is tried where the chains' median tree depth under the first metric reaches this:
#: 2^7 = 128 leapfrog steps before a U-turn, where a metric that matches the posterior's scales needs
#: a few; the trial, not this bound, decides, so it only keeps the trial off where trees are short.
SATURATED_DEPTH = 7


@dataclass
class WarmupResult:
    """What warm-up hands to the sampling phase."""

    state: MCMCState
    step_size: torch.Tensor  # scalar: the median of the per-chain averaged step sizes
    chain_step_sizes: torch.Tensor  # (n,)
    inv_mass: Metric
    metric: str  # "identity", "diag" or "dense"
    length: float | None  # HMC's jittered trajectory length, if any
    first_metric_dropped: bool = False  # the start's metric replaced by the identity (module notes)


def _new_accumulator(metric: str, dim: int, device):
    if metric == "dense" or (metric == "auto" and dim <= AUTO_DENSE_MAX_DIM):
        return WelfordCovariance(dim, device=device)
    return WelfordVariance(dim, device=device)


def _largest_variance(estimate: torch.Tensor, inv_mass: Metric) -> float:
    r"""The largest variance of a window's estimate (a covariance ``(d, d)`` or variances ``(d,)``)
    in the units of a metric: the top eigenvalue of :math:`L^{-1}\hat\Sigma L^{-\top}` for
    :math:`M^{-1} = LL^\top` (with variances only, the largest ratio of variance to metric)."""
    if estimate.dim() == 1:
        scale = 1.0 if inv_mass is None else inv_mass
        if isinstance(inv_mass, DenseMetric):
            scale = inv_mass.inv_mass.diagonal()
        return float((estimate / scale).max())
    if inv_mass is None:
        whitened = estimate
    elif isinstance(inv_mass, DenseMetric):
        chol = inv_mass.chol.to(estimate.dtype)
        half = torch.linalg.solve_triangular(chol, estimate, upper=False)
        whitened = torch.linalg.solve_triangular(chol, half.T, upper=False)
    else:
        s = inv_mass.to(estimate.dtype).rsqrt()
        whitened = estimate * torch.outer(s, s)
    return float(torch.linalg.eigvalsh(0.5 * (whitened + whitened.T))[-1])


def _variances(metric: Metric, dim: int, device) -> torch.Tensor:
    """The variances ``(dim,)`` of a metric in float64: its diagonal (averaged over chains for
    per-chain metrics), ones for the identity."""
    if metric is None:
        return torch.ones(dim, dtype=torch.float64, device=device)
    var = metric.inv_mass.diagonal() if isinstance(metric, DenseMetric) else metric
    return (var.mean(0) if var.dim() == 2 else var).to(torch.float64)


def _floor(current: Metric, dim: int, device) -> torch.Tensor:
    r"""The variances a window's estimate is shrunk toward: :math:`10^{-3}` times the current
    metric's variances (Stan's :math:`10^{-3}` in the units of the metric in use, so the same
    shrinkage on any scale), or :math:`10^{-3}` while the metric is the identity."""
    return FLOOR * _variances(current, dim, device)


def whitening_loss(inv_mass: Metric, cov_x: torch.Tensor, cov_g: torch.Tensor) -> float:
    r"""How badly a metric :math:`\Sigma = M^{-1}` whitens a window's draws and their gradients:
    :math:`\operatorname{tr}(\Sigma^{-1} C_x) + \operatorname{tr}(\Sigma C_g)`, with :math:`C_x` the
    draws' covariance and :math:`C_g` the gradients' (``(d, d)``, or variances ``(d,)``).

    On a Gaussian posterior :math:`C_g = C_x^{-1}`, and the loss is
    :math:`\sum_i (\lambda_i + 1/\lambda_i) \ge 2d` over the eigenvalues :math:`\lambda_i` of
    :math:`\Sigma^{-1} C_x`, equal to :math:`2d` only at :math:`\Sigma = C_x`: it charges a metric
    too wide in some direction as much as one too narrow, the two ways a metric shortens the step
    size or lengthens the trajectories. The gradients' covariance (Fisher's identity:
    :math:`E[\nabla\log\pi\,\nabla\log\pi^\top] = E[-\nabla^2 \log\pi]`) sees the posterior's
    curvature, which a few hundred autocorrelated draws estimate poorly in its narrow directions (the
    same criterion as nutpie's metric adaptation, Seyboldt et al. 2025).
    """
    cov_x, cov_g = cov_x.to(torch.float64), cov_g.to(torch.float64)
    dense = cov_x.dim() == 2
    if isinstance(inv_mass, DenseMetric):
        chol, sigma = inv_mass.chol.to(torch.float64), inv_mass.inv_mass.to(torch.float64)
        if not dense:
            return float(
                (torch.cholesky_inverse(chol).diagonal() * cov_x).sum() + (sigma.diagonal() * cov_g).sum()
            )
        return float(torch.cholesky_solve(cov_x, chol).diagonal().sum() + (sigma * cov_g).sum())
    var = _variances(inv_mass, cov_x.shape[0], cov_x.device)
    vx, vg = (cov_x.diagonal(), cov_g.diagonal()) if dense else (cov_x, cov_g)
    return float((vx / var).sum() + (var * vg).sum())


def _estimate_metric(acc, acc_g, metric: str, dtype, current: Metric) -> tuple[Metric, str, torch.Tensor]:
    """The new metric, its kind, and the window's estimate (covariance or variances).

    A dense estimate from fewer than ``DENSE_MIN_DRAWS_PER_DIM * dim`` draws is not used: the current
    dense metric (the Laplace covariance, or an earlier window's) is kept, or else the diagonal is.
    The current metric is also kept where it whitens the window's draws and gradients better than the
    estimate (:func:`whitening_loss`): a start-phase Laplace covariance is often closer to the
    posterior's than a window of a few hundred autocorrelated draws.
    """
    new, kind, estimate = _window_metric(acc, metric, dtype, current)
    if new is current or current is None:
        return new, kind, estimate
    unregularised = (
        acc.variance(regularize=False) if isinstance(acc, WelfordVariance) else acc.covariance(False)
    )
    cov_g = acc_g.variance(False) if isinstance(acc_g, WelfordVariance) else acc_g.covariance(False)
    if whitening_loss(current, unregularised, cov_g) < whitening_loss(new, unregularised, cov_g):
        return current, ("dense" if isinstance(current, DenseMetric) else "diag"), estimate
    return new, kind, estimate


def _window_metric(acc, metric: str, dtype, current: Metric) -> tuple[Metric, str, torch.Tensor]:
    floor = _floor(current, acc.mean.shape[0], acc.mean.device)
    if isinstance(acc, WelfordVariance):
        var = acc.variance(floor=floor)
        return var.to(dtype), "diag", var
    cov = acc.covariance(floor=floor)
    kind = choose_metric(metric, cov, acc.count)
    if kind == "dense" and acc.count < DENSE_MIN_DRAWS_PER_DIM * cov.shape[0]:
        if isinstance(current, DenseMetric):
            return current, "dense", cov
        kind = "diag"
    if kind == "dense":
        return DenseMetric.from_covariance(cov).to(dtype), "dense", cov
    return cov.diagonal().clone().to(dtype), "diag", cov


def _end_window(acc, acc_g, metric, dtype, old_metric, state, accept_prob, dual, jittered, pooled, remaining):
    """At a slow window's end: the new metric, step sizes re-initialised (pooled to one before the
    terminal window), the HMC length carried into the new metric's units.

    When the current metric is kept, the step sizes adapted to it stay valid, so dual averaging goes
    on where it was (Stan restarts it only because its metric always changes): a restart's
    :math:`\\mu = \\log 10h` sends the step sizes up and then overshoots down, and NUTS pays for every
    small step with a doubled tree. Before the terminal window the chains' averaged step sizes are then
    pooled at their median, centred there (no push toward larger steps: nothing changed to explore).
    """
    inv_mass, kind, estimate = _estimate_metric(acc, acc_g, metric, dtype, old_metric)
    if inv_mass is old_metric:
        if pooled:
            dual.restart(torch.exp(torch.log(dual.final_step_size).median()), 1.0)
        return inv_mass, kind
    old = dual.final_step_size
    new = initial_step_sizes(lambda h: accept_prob(state, h, inv_mass), old)
    if jittered is not None:  # follow the widest direction's scale
        largest = _largest_variance(estimate, inv_mass)
        jittered.rescale(math.sqrt(largest / _largest_variance(estimate, old_metric)))
        jittered.set_from_metric(largest)
    if pooled:  # a terminal window under 50 iterations cannot undo the overshoot of mu = log(10 h)
        dual.restart(torch.exp(torch.log(new).median()), 10.0 if remaining >= 50 else 1.0)
    else:
        dual.restart(new)
    return inv_mass, kind


def windowed_warmup(
    generator: torch.Generator,
    state: MCMCState,
    log_prob_and_grad: LogProbAndGrad,
    *,
    step: Callable,
    accept_prob: Callable,
    target_accept: float,
    num_warmup: int,
    step_size: torch.Tensor,
    metric: str = "auto",
    adapt_mass: bool = True,
    trajectory: JitteredLength | int | None = None,
    inv_mass: Metric = None,
    bar=None,
) -> WarmupResult:
    """Run ``num_warmup`` adaptive iterations of ``step`` on every chain.

    Parameters
    ----------
    step : callable
        ``step(generator, state, log_prob_and_grad, h, inv_mass, **kw) -> (state, info)``; ``kw`` is
        ``num_steps=`` when ``trajectory`` is given.
    accept_prob : callable
        ``accept_prob(state, h, inv_mass) -> (n,)`` one trial step's acceptance probabilities, for
        re-initialising the step sizes after a metric update.
    step_size : (n,) tensor
        Initial per-chain step sizes.
    inv_mass : metric, optional
        The metric until the first window ends (the start phase's Laplace covariance, or identity).
    trajectory : JitteredLength, int or None
        Leapfrog steps for HMC: a jittered length (adapted by ChEES, or set from each new metric),
        a fixed count, or not applicable (None).
    """
    dim, dtype, device = state.x.shape[1], state.x.dtype, state.x.device
    _, windows, _ = stan_windows(num_warmup) if adapt_mass else (num_warmup, [], 0)
    starts, ends = {start for start, _ in windows}, {end for _, end in windows}
    last_end, pooled = (windows[-1][1] if windows else None), False
    dual = DualAveraging(step_size, target_accept)
    kind = "identity" if inv_mass is None else ("dense" if isinstance(inv_mass, DenseMetric) else "diag")
    acc, acc_g, collecting = None, None, False
    jittered = trajectory if isinstance(trajectory, JitteredLength) else None
    checked = inv_mass is not None and 2 * FIRST_CHECK < (windows[0][1] if windows else num_warmup)
    check = _FirstMetricCheck(inv_mass, kind) if checked else None
    for i in range(num_warmup):
        if i in starts:
            acc, acc_g, collecting = (
                _new_accumulator(metric, dim, device),
                _new_accumulator(metric, dim, device),
                True,
            )
        h = dual.step_size
        kw = {}
        if jittered is not None:
            kw["num_steps"] = jittered.num_steps(generator, h)
        elif trajectory is not None:
            kw["num_steps"] = trajectory
        x_before = state.x
        state, info = step(generator, state, log_prob_and_grad, h, inv_mass, **kw)
        dual.update(info.acceptance_rate.mean() if pooled else info.acceptance_rate)
        if jittered is not None:
            jittered.update(x_before, info)
        if check is not None and check.active and getattr(info, "tree_depth", None) is not None:
            inv_mass, kind = check.update(info, x_before, state, accept_prob, dual, inv_mass, kind)
        if collecting:
            acc.update(state.x)
            acc_g.update(state.grad)
        if i + 1 in ends:
            pooled = i + 1 == last_end
            inv_mass, kind = _end_window(acc, acc_g, metric, dtype, inv_mass, state, accept_prob, dual,
                                         jittered, pooled, num_warmup - i - 1)  # fmt: skip
            collecting = False
        if bar is not None:
            bar.update()
    chain_h = dual.final_step_size if num_warmup else dual.step_size
    chain_h = chain_h.expand(step_size.shape) if pooled else chain_h
    h = torch.exp(torch.log(chain_h).median())
    length = jittered.final_length if jittered is not None else None
    return WarmupResult(state, h, chain_h, inv_mass, kind, length, check is not None and check.dropped)


class _FirstMetricCheck:
    """The first metric's check (module notes): after :data:`FIRST_CHECK` iterations whose median
    tree depth (last half) reaches :data:`SATURATED_DEPTH`, the identity is tried for as many; it is
    kept if it moves the chains further per leapfrog step (:meth:`_score`), else the first metric
    comes back with its step sizes."""

    def __init__(self, inv_mass: Metric, kind: str):
        self.saved, self.trial_of, self.active, self.dropped = (inv_mass, kind), None, True, False
        self.seen: list = []

    def update(self, info, x_before, state, accept_prob, dual, inv_mass, kind):
        self.seen.append((info.tree_depth, info.num_leapfrog, x_before, state.x))
        if len(self.seen) < FIRST_CHECK:
            return inv_mass, kind
        recent, self.seen = self.seen[FIRST_CHECK // 2 :], []
        if self.trial_of is None:
            if float(torch.stack([r[0] for r in recent]).to(torch.float64).median()) < SATURATED_DEPTH:
                self.active = False
                return inv_mass, kind
            self.trial_of = (self._score(recent), dual.step_size.clone())
            dual.restart(initial_step_sizes(lambda h: accept_prob(state, h, None), dual.step_size))
            return None, "identity"
        self.active = False
        if self._score(recent) > self.trial_of[0]:
            self.dropped = True
            return None, "identity"
        dual.restart(self.trial_of[1])
        return self.saved

    @staticmethod
    def _score(recent) -> float:
        """The worst coordinate's squared jump per iteration over its variance (pooled over the
        chains and iterations: the chains start spread as the posterior), per leapfrog step: the
        slowest direction's mixing per gradient, which a metric's scaling does not change (short
        trees that leave a wide direction to a random walk score low, unlike by tree depth)."""
        jumps = torch.stack([(after - before) ** 2 for _, _, before, after in recent]).mean((0, 1))
        spread = torch.stack([after for *_, after in recent]).flatten(0, 1).var(0)
        steps = float(torch.stack([r[1] for r in recent]).to(torch.float64).mean())
        return float((jumps / spread.clamp_min(torch.finfo(spread.dtype).tiny)).min()) / max(steps, 1.0)
