r"""HMC with jittered trajectory lengths, and ChEES adaptation of the length
(Hoffman, Radul and Sountsov 2021, "An adaptive MCMC scheme for setting trajectory lengths in
Hamiltonian Monte Carlo", AISTATS).

Each iteration integrates for a time :math:`t = u T` with :math:`u \sim U(0, 1]` shared by all chains
(jitter breaks the periodicities that make a fixed length resonate with the target), i.e.
:math:`\lceil u T / h\rceil` leapfrog steps, capped at ``max_leapfrog``. Chains with their own step
sizes take their own numbers of steps: the batch runs the largest count and freezes the chains that
are done, evaluating the log-density only where a chain still moves.

ChEES (the change in the estimator of the expected square) is
:math:`\tfrac14\,\mathbb E[(\lVert x' - \mathbb E x'\rVert^2 - \lVert x - \mathbb E x\rVert^2)^2]`,
a proxy for how fast a trajectory decorrelates the second moments; its derivative in
:math:`\log T` for one chain is :math:`\delta\,(x' - \bar x')^\top v'\, u T`, with
:math:`\delta = \lVert x' - \bar x'\rVert^2 - \lVert x - \bar x\rVert^2` and :math:`v'` the velocity at
the proposal, means taken across chains and each chain's term multiplied by its acceptance probability.
:class:`ChEESAdaptation` ascends it with Adam on :math:`\log T` (learning rate 0.025, the paper's),
each update clipped to a factor 1.4 (a noisy estimate from few chains cannot throw T far), and
returns an iterate average of :math:`\log T` (weight :math:`t^{-3/4}` on the newest, as dual averaging
averages the step size) at the end of warm-up. The estimate is an average across chains: ChEES is
meant for runs with many chains (``CHEES_MIN_CHAINS``); with fewer, :class:`JitteredLength` sets the
length from each new metric instead. When the metric changes, the length is carried into the new units
by the ratio of the widest direction's sd before and after.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from diffstat.mcmc.base import LogProbAndGrad, MCMCState, as_per_chain, metropolis_accept, rows_finite
from diffstat.mcmc.metric import Metric, kinetic_energy, sample_momentum, velocity

__all__ = [
    "CHEES_MIN_CHAINS",
    "MAX_LEAPFROG",
    "ChEESAdaptation",
    "HMCInfo",
    "JitteredLength",
    "jittered_hmc_step",
]

#: Cap on leapfrog steps per iteration (a trajectory length that outgrows its step size this much
#: is a symptom, not a tuning; NUTS's default depth 10 gives the same cap).
MAX_LEAPFROG = 1000
#: ChEES adapts the length from this many chains up; fewer use :class:`JitteredLength` (with 4 chains
#: the ChEES gradient was seen to drift: T = 64 on a 3-d target whitened to unit scales).
CHEES_MIN_CHAINS = 32


class HMCInfo(NamedTuple):
    """An HMC step's diagnostics: the fields of :class:`~diffstat.mcmc.base.MCMCInfo`, plus
    ``energy`` (n,), the Hamiltonian at the new state (for E-BFMI), ``n_steps`` (n,) the leapfrog
    steps taken, and the proposal ``proposal: (n, dim)`` with its velocity (used by ChEES)."""

    acceptance_rate: torch.Tensor
    is_accepted: torch.Tensor
    diverging: torch.Tensor
    num_evals: int
    energy: torch.Tensor
    n_steps: torch.Tensor
    proposal: torch.Tensor
    proposal_velocity: torch.Tensor


def jittered_hmc_step(
    generator: torch.Generator,
    state: MCMCState,
    log_prob_and_grad: LogProbAndGrad,
    step_size,
    inv_mass: Metric = None,
    num_steps: torch.Tensor | int = 10,
) -> tuple[MCMCState, HMCInfo]:
    r"""One HMC step where chain ``c`` takes ``num_steps[c]`` leapfrog steps of size ``h[c]``.

    Momentum :math:`p \sim \mathcal N(0, M)`, leapfrog, per-chain accept with probability
    :math:`\min(1, e^{-\Delta H})`; non-finite trajectories are rejected and flagged divergent, also
    where the log-density raises at their non-finite points (:func:`_at_finite_rows`).
    ``num_steps`` is an int or an integer tensor ``(n,)`` (each at least 1).
    """
    x0 = state.x
    n = x0.shape[0]
    h = as_per_chain(step_size, x0)
    steps = torch.as_tensor(num_steps, device=x0.device).expand(n)
    counts = steps.tolist()
    max_steps, uniform = max(counts), min(counts) == max(counts)
    p0 = sample_momentum(generator, inv_mass, x0)
    x, p, lp, g = x0, p0 + 0.5 * h * state.grad, state.log_prob, state.grad
    num_evals = 0
    for i in range(max_steps):
        if uniform:
            x = x + h * velocity(inv_mass, p)
            lp, g, m = _at_finite_rows(log_prob_and_grad, x)
            num_evals += m
        else:
            idx = (steps > i).nonzero().squeeze(-1)
            x = x.clone()
            x[idx] = x[idx] + h[idx] * velocity(inv_mass, p[idx])
            lp_i, g_i, m = _at_finite_rows(log_prob_and_grad, x[idx])
            lp, g = lp.clone(), g.clone()
            lp[idx], g[idx] = lp_i, g_i
            num_evals += m
        last = (steps == i + 1).unsqueeze(-1)
        moving = (steps > i).unsqueeze(-1)
        p = torch.where(moving, p + torch.where(last, 0.5 * h, h) * g, p)
    kinetic0, kinetic1 = kinetic_energy(inv_mass, p0), kinetic_energy(inv_mass, p)
    log_ratio = (lp - kinetic1) - (state.log_prob - kinetic0)
    new, info = metropolis_accept(generator, state, MCMCState(x, lp, g), log_ratio, num_evals)
    energy = torch.where(info.is_accepted, -lp + kinetic1, -state.log_prob + kinetic0)
    extra = (energy, steps, x, velocity(inv_mass, p))
    return new, HMCInfo(*info, *extra)


def _at_finite_rows(log_prob_and_grad: LogProbAndGrad, x: torch.Tensor):
    r"""``log_prob_and_grad(x)`` for ``x: (m, dim)``, and the rows evaluated. Where that raises and a
    row has a non-finite coordinate (a trajectory that overflowed: it has diverged and will be
    rejected; a Pyro model run under ``vmap`` raises at NaN), the other rows are evaluated and those
    get :math:`-\infty` and a zero gradient; an error at finite points is the model's and is raised.
    Nothing is spent on the usual case, where every row is finite or the target returns NaN there."""
    try:
        lp, g = log_prob_and_grad(x)
        return lp, g, x.shape[0]
    except Exception:
        ok = rows_finite(x)
        if bool(ok.all()):
            raise
    lp = torch.full(x.shape[:1], -math.inf, dtype=x.dtype, device=x.device)
    g = torch.zeros_like(x)
    if bool(ok.any()):
        lp_ok, g_ok = log_prob_and_grad(x[ok])
        lp, g = lp.to(lp_ok.dtype), g.to(g_ok.dtype)
        lp[ok], g[ok] = lp_ok, g_ok
    return lp, g, int(ok.sum())


class JitteredLength:
    r"""A jittered trajectory length :math:`T` without gradient adaptation, for runs with few chains,
    where the ChEES gradient (an average across chains) is too noisy to follow.

    :math:`T = \pi\sqrt{\lambda_{\max}}`, with :math:`\lambda_{\max}` the largest variance of the
    target as the metric sees it (set by :meth:`set_from_metric` at each metric update; about 1 once
    the metric is the covariance). For a Gaussian of variance :math:`\lambda` the jittered time
    :math:`t \sim U(0, T]` then gives :math:`\mathbb E\cos(t/\sqrt\lambda) = \mathbb
    E\cos(2t/\sqrt\lambda) = 0`: on average no correlation is left in the first two moments along
    the widest direction. Before the first metric update it is 10 initial step sizes.
    """

    def __init__(self, length: float, max_leapfrog: int = MAX_LEAPFROG):
        self.log_length = self.log_avg = math.log(length)
        self.max_leapfrog = max_leapfrog
        self.u = 1.0

    @property
    def length(self) -> float:
        return math.exp(self.log_length)

    @property
    def final_length(self) -> float:
        """The length to sample with."""
        return math.exp(self.log_avg)

    def rescale(self, factor: float) -> None:
        """Multiply the length (to keep the step count when a new metric changes the step size)."""
        self.log_length += math.log(factor)
        self.log_avg += math.log(factor)

    def set_from_metric(self, largest_variance: float) -> None:
        r"""At a metric update: :math:`T = \pi\sqrt{\lambda_{\max}}`."""
        self.log_length = self.log_avg = math.log(math.pi * math.sqrt(largest_variance))

    def num_steps(self, generator: torch.Generator, step_size: torch.Tensor, length: float | None = None):
        """``ceil(u T / h)`` leapfrog steps per chain, ``u ~ U(0, 1]`` shared, capped at ``max_leapfrog``."""
        self.u = 1.0 - float(torch.rand((), generator=generator, dtype=torch.float64))
        t = self.u * (self.length if length is None else length)
        steps = torch.ceil(t / step_size).clamp(1, self.max_leapfrog)
        return steps.to(torch.int64)

    def update(self, x: torch.Tensor, info: HMCInfo) -> None:
        """No adaptation between metric updates."""


class ChEESAdaptation(JitteredLength):
    """Adam ascent of the ChEES criterion in :math:`\\log T` across chains (see module docstring)."""

    def __init__(self, length: float, learning_rate: float = 0.025, max_leapfrog: int = MAX_LEAPFROG):
        super().__init__(length, max_leapfrog)
        self.lr = learning_rate
        self.beta1, self.beta2, self.eps = 0.9, 0.999, 1e-8
        self.m = self.v = 0.0
        self.t = 0

    def set_from_metric(self, largest_variance: float) -> None:
        """ChEES keeps its own length across metric updates (rescaled with the step size)."""

    def update(self, x: torch.Tensor, info: HMCInfo) -> None:
        """One Adam step from the chains' start points ``x: (n, dim)`` and their step's info."""
        prop, vel, alpha = info.proposal, info.proposal_velocity, info.acceptance_rate
        finite = rows_finite(prop) & rows_finite(vel) & (alpha > 0)
        if int(finite.sum()) < 2:
            return
        x, prop, vel, alpha = x[finite], prop[finite], vel[finite], alpha[finite]
        xc, pc = x - x.mean(0), prop - prop.mean(0)
        delta = (pc * pc).sum(-1) - (xc * xc).sum(-1)
        grads = delta * (pc * vel).sum(-1) * self.u * self.length
        # Weighted by acceptance but averaged over all chains, not normalised by the total acceptance:
        # an iteration where every proposal diverges (early warm-up) then contributes about nothing,
        # instead of a huge unweighted gradient that would fill Adam's moments for many iterations.
        grad = float((alpha * grads).mean())
        self.t += 1
        self.m = self.beta1 * self.m + (1 - self.beta1) * grad
        self.v = self.beta2 * self.v + (1 - self.beta2) * grad * grad
        m_hat, v_hat = self.m / (1 - self.beta1**self.t), self.v / (1 - self.beta2**self.t)
        change = self.lr * m_hat / (math.sqrt(v_hat) + self.eps)  # ascent
        self.log_length += max(-0.35, min(0.35, change))
        eta = self.t**-0.75  # dual-averaging-style iterate average: later iterates weigh more
        self.log_avg = eta * self.log_length + (1 - eta) * self.log_avg
