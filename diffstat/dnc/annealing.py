r"""The annealed product sampler of the diffusion combiner (:mod:`diffstat.dnc.diffusion`, step 3).

Sample :math:`\pi_t(w) \propto \exp(-\sum_k E_k(w, t))` (a
:class:`~diffstat.dnc.energy.ProductEnergy`, in coordinates :math:`w` where the shards' Gaussian
product is :math:`\mathcal N(0, I)`). Start from the product of the noised Gaussian parts at
``t_start`` (:func:`start_gaussian`, exact), then move down a grid of times to ``t_min``, uniform
in :math:`\log\sigma_t` (:func:`time_grid`): each time is one
:func:`~diffstat.tempering.core.smc_step`, the step of the tempering samplers (:func:`anneal_step`),
on the particles as a :class:`~diffstat.tempering.path.PathState` with ``delta``
:math:`-\sum_k E_k(w, t)` at :math:`\beta = 1`: the particles are evaluated at the new time, every
particle takes ``mcmc_per_level`` MALA steps at a fixed step size with a per-chain
Metropolis-Hastings accept (proposal :math:`y = w + h\nabla\log\pi_t + \sqrt{2h}\,\xi`, whose
density has :math:`4h` in the denominator: the trap in Du et al.'s public code), and then the step
size follows a Robbins-Monro recursion on :math:`\log h` toward MALA's optimal acceptance 0.574.
With ``reweight`` the annealing is sequential Monte Carlo: incremental weights
:math:`\pi_{t_{i+1}}/\pi_{t_i}`, resampling when the ESS falls below ``resample_threshold`` and at
``t_min``; without it (the default) the weights stay equal and nothing is resampled. Finally
:func:`sample_at_t_min` runs MALA on the summed energy at ``t_min``, half of
the steps tuning the step size by dual averaging, with an optional mode-weight calibration between
the halves (:mod:`diffstat.dnc.mode_weights`), and :func:`resample_within_modes` can correct the
learned product to the exact one within each mode. References: Du et al. (2023), "Reduce, reuse,
recycle"; Trojan, Fearnhead and Nemeth (2024).

The initial step size is half the smallest variance of the start Gaussian (capped at 1/2): a MALA
step of that size is stable in every direction of a Gaussian of that scale.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from diffstat._util import ess_from_log_weights
from diffstat.dnc.gaussian import gaussian_product
from diffstat.dnc.options import AnnealOptions
from diffstat.mcmc.adaptation import DualAveraging
from diffstat.mcmc.base import MCMCState
from diffstat.mcmc.mala import MALA_TARGET_ACCEPT, mala_step
from diffstat.tempering.core import MoveConfig, Reweight, TemperedState, smc_step
from diffstat.tempering.path import PathState
from diffstat.tempering.resampling import systematic

__all__ = [
    "SAMPLING_DTYPE",
    "AnnealState",
    "AnnealInfo",
    "time_grid",
    "start_gaussian",
    "anneal_init",
    "anneal_step",
    "sample_at_t_min",
    "resample_within_modes",
]

#: The particles and the energy networks are float32: the networks are trained in float32, and the
#: MALA moves need no more precision than the learned energies carry.
SAMPLING_DTYPE = torch.float32


class AnnealState(NamedTuple):
    r"""The particles as the tempering samplers' state ``smc``: ``particles.x (n, dim)`` with
    ``delta`` :math:`-\sum_k E_k(w, t)` and its gradient at the time ``t`` they were last moved at
    (``base`` zero, ``beta`` 1), log weights ``(n,)`` (float64, zero without ``reweight``) and the
    log of the MALA step size (float64, 0-d)."""

    smc: TemperedState
    t: float

    @property
    def mcmc(self) -> MCMCState:
        r"""The particles as an MCMC state of :math:`\pi_t`."""
        ps = self.smc.particles
        return MCMCState(ps.x, ps.delta, ps.delta_grad)

    @property
    def log_w(self) -> torch.Tensor:
        return self.smc.log_weights

    @property
    def step_size(self) -> torch.Tensor:
        """The MALA step size, a 0-d :data:`SAMPLING_DTYPE` tensor."""
        return torch.exp(self.smc.log_step_size).to(SAMPLING_DTYPE)


class AnnealInfo(NamedTuple):
    """One level: its time ``t``, the ESS fraction of the weights before any resampling, the mean
    MALA acceptance, the step size after the level's adaptation, whether the particles were
    resampled, and ``num_evals`` (points at which the summed energy was evaluated)."""

    t: float
    ess: torch.Tensor
    acceptance_rate: torch.Tensor
    step_size: torch.Tensor
    resampled: bool
    num_evals: int


def time_grid(process, t_start: float, t_min: float, num_levels: int) -> list[float]:
    r"""``num_levels + 1`` times from ``t_start`` to ``t_min``, uniform in :math:`\log\sigma_t`."""
    s_start = float(process.sigma(torch.tensor(t_start, dtype=torch.float64)))
    s_min = float(process.sigma(torch.tensor(t_min, dtype=torch.float64)))
    sig = torch.exp(torch.linspace(math.log(s_start), math.log(s_min), num_levels + 1, dtype=torch.float64))
    return [t_start] + [float(process.time_at_sigma(s)) for s in sig[1:-1]] + [t_min]


def start_gaussian(process, moments, shift, root, t_start: float):
    r"""Mean ``(dim,)`` and covariance ``(dim, dim)``, in sampling coordinates
    :math:`w = R^{-1}(z - \text{shift})`, of the product of the shards' Gaussian parts
    :math:`\mathcal N(m_k, S_k)` noised to ``t_start``: :math:`\prod_k \mathcal N(\alpha m_k,
    \alpha^2 S_k + \sigma^2 I)`."""
    ts = torch.tensor(t_start, dtype=torch.float64)
    a0, s0 = float(process.alpha(ts)), float(process.sigma(ts))
    eye = torch.eye(shift.shape[0], dtype=shift.dtype, device=shift.device)
    mu0, cov0 = gaussian_product([a0 * a for a, _ in moments], [a0**2 * b + s0**2 * eye for _, b in moments])
    root_inv = torch.linalg.inv(root)
    return (mu0 - shift) @ root_inv.T, root_inv @ cov0 @ root_inv.T


class _ProductAt:
    r""":math:`\pi_t \propto \exp(-\sum_k E_k(w, t))` as a path the tempering moves take at
    :math:`\beta = 1`: ``base`` zero, ``delta`` :math:`-\sum_k E_k(w, t)` (counted in
    ``product.num_evals``)."""

    def __init__(self, product, t: float):
        self.product, self.t = product, t

    def evaluate(self, w: torch.Tensor) -> PathState:
        lp, grad = self.product.log_prob_and_grad(self.t)(w)
        return PathState(w, torch.zeros_like(lp), torch.zeros_like(w), lp, grad)


def _time_reweight(product, t_from: float, t_to: float, reweight: bool) -> Reweight:
    r"""The reweighting hook of :func:`~diffstat.tempering.core.smc_step` from time ``t_from`` to
    ``t_to``: the particles evaluated at ``t_to``, with increments :math:`\log\pi_{t_{i+1}} -
    \log\pi_{t_i}` (float64) when ``reweight``, else zero; at an unchanged time they stay."""

    def hook(generator, particles, log_weights):
        if t_to == t_from:
            return particles, torch.zeros_like(log_weights)
        new = _ProductAt(product, t_to).evaluate(particles.x)
        incr = (new.delta - particles.delta).double() if reweight else torch.zeros_like(log_weights)
        return new, incr

    return hook


def anneal_init(generator, product, mean, cov, num_samples: int, options: AnnealOptions) -> AnnealState:
    r"""``num_samples`` exact draws of the start Gaussian ``N(mean, cov)`` (sampling coordinates),
    evaluated at ``t_start``; with ``reweight``, weighted by :math:`\pi_{t_0} / q`."""
    chol0 = torch.linalg.cholesky(0.5 * (cov + cov.T))
    eps = torch.randn(
        num_samples, mean.shape[0], generator=generator, dtype=mean.dtype, device=generator.device
    )
    eps = eps.to(mean.device)
    w = (mean + eps @ chol0.T).to(SAMPLING_DTYPE)
    particles = _ProductAt(product, options.t_start).evaluate(w)
    log_w = torch.zeros(num_samples, dtype=torch.float64, device=mean.device)
    if options.reweight:
        log_w = particles.delta.double() + 0.5 * (eps**2).sum(-1).double()
    h = torch.tensor(0.5 * min(1.0, float(torch.linalg.eigvalsh(cov).min())), dtype=SAMPLING_DTYPE)
    one = torch.ones((), dtype=SAMPLING_DTYPE, device=w.device)
    eve = torch.arange(num_samples, device=w.device)
    return AnnealState(TemperedState(particles, log_w, one, torch.log(h.double()), eve, 0), options.t_start)


def anneal_step(
    generator, state: AnnealState, product, t: float, options: AnnealOptions
) -> tuple[AnnealState, AnnealInfo]:
    """One level at time ``t``: :func:`~diffstat.tempering.core.smc_step` with
    :func:`_time_reweight`, resampling when the ESS fraction is below ``resample_threshold`` (and
    at ``t_min`` with ``reweight``), ``mcmc_per_level`` MALA steps at the state's step size; then
    the step size's Robbins-Monro update from their mean acceptance."""
    evals0 = product.num_evals
    final = options.reweight and t == options.t_min
    smc, info = smc_step(
        generator,
        state.smc,
        _time_reweight(product, state.t, t, options.reweight),
        path=_ProductAt(product, t),
        beta=state.smc.beta,
        moves=MoveConfig(num_mcmc_steps=options.mcmc_per_level, adapt_rate=0.0),
        resample_threshold=1.0 if final else options.resample_threshold,
    )
    acc = info.acceptance_rate
    h = state.step_size * torch.exp(torch.clamp(2.0 * (acc - MALA_TARGET_ACCEPT), -1.0, 1.0)).to(
        SAMPLING_DTYPE
    )
    info = AnnealInfo(t, info.ess, acc, h, info.resampled, product.num_evals - evals0)
    return AnnealState(smc._replace(log_step_size=torch.log(h.double())), t), info


def sample_at_t_min(generator, state: AnnealState, product, num_steps: int, calibrate=None, bar=None):
    """``num_steps`` MALA steps on the summed energy at the state's time (``t_min``): the first half
    tune the step size by dual averaging toward 0.574, the rest sample with the final step size.
    ``calibrate(mcmc, step) -> (mcmc, info)`` runs between the halves with a gradient-ascent step
    of half the tuned step size. Returns the state, the per-chain acceptance ``(n,)`` of every
    sampling step, the tuned step size and the calibration's info (None without it)."""
    lpg = product.log_prob_and_grad(state.t)
    mcmc = state.mcmc
    adapt = DualAveraging(state.step_size.clone(), MALA_TARGET_ACCEPT)
    num_adapt = num_steps // 2
    accs, cal_info = [], None
    for j in range(num_steps):
        if j == num_adapt and calibrate is not None:
            mcmc, cal_info = calibrate(mcmc, 0.5 * float(adapt.final_step_size))
        step = adapt.step_size if j < num_adapt else adapt.final_step_size
        mcmc, info = mala_step(generator, mcmc, lpg, step)
        if j < num_adapt:
            adapt.update(info.acceptance_rate.mean())
        else:
            accs.append(info.acceptance_rate)
        if bar is not None:
            bar.update()
    return mcmc, accs, adapt.final_step_size, cal_info


def resample_within_modes(generator, log_r: torch.Tensor, labels: torch.Tensor | None):
    r"""Indices ``(n,)`` that importance-resample the particles within each mode by the log-ratios
    ``log_r (n,)`` (exact over learned log-density), each mode keeping its share of the particles
    (``labels (n,)``, -1 for none; None: one mode); and the summed ESS of the modes' weights
    as a fraction of ``n`` (modes labelled -1 left out)."""
    n = log_r.shape[0]
    labels = (
        torch.zeros(n, dtype=torch.long, device=log_r.device) if labels is None else labels.to(log_r.device)
    )
    log_w = torch.zeros_like(log_r)
    ess_sum = 0.0
    for j in torch.unique(labels).tolist():
        in_j = labels == j
        lw = log_r[in_j] - torch.logsumexp(log_r[in_j], 0)
        log_w[in_j] = lw + math.log(float(in_j.double().mean()))
        ess_sum += float(ess_from_log_weights(lw)) if j >= 0 else 0.0
    return systematic(generator, log_w).to(log_r.device), ess_sum / n
