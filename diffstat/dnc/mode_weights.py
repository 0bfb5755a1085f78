r"""Mode weights of a product of learned shard energies, calibrated on the shards' draw counts.

Score matching learns :math:`\nabla_z E_k`; where two modes of a shard are separated, nothing in the
loss fixes the offset of :math:`E_k` between them (only the noised law at times where the modes
overlap does, and there a learned energy is off by a few tenths of a nat). The information that
does fix the masses is in the draws: shard :math:`k` puts a fraction of its draws in each region.
This module uses it.

Partition the space into the basins of attraction :math:`A_j` of the modes of the product
:math:`\pi(z) \propto \exp(-\sum_k E_k(z, t_{\min}))` (gradient ascent from every point, end points
grouped; :mod:`diffstat.modes`). On :math:`A_j` write the shard's density as
:math:`p_k(z) = e^{-E_k(z) + \delta_{kj}}`: a learned energy is right within a basin up to the
constant :math:`\delta_{kj}`. For any density
:math:`q` (a Gaussian fitted to the shard's draws in :math:`A_j`, its covariance shrunk so that
:math:`q/p_k` stays bounded),

.. math::
    \mathbb E_{p_k}\!\big[\mathbf 1_{A_j}(Z)\, q(Z)\, e^{E_k(Z) - \delta_{kj}}\big] = Q_{kj}
    := \int_{A_j} q, \qquad\text{so}\qquad
    \hat\delta_{kj} = \log \frac{1}{n_k}\sum_{i:\, z_i \in A_j} q(z_i)\, e^{E_k(z_i)} - \log \hat Q_{kj}

(reciprocal importance sampling over the shard's own draws; :math:`\hat Q_{kj}` from draws of
:math:`q` sent through the same gradient ascent). The product's mass in :math:`A_j` is then

.. math::
    W_j \propto \int_{A_j} \prod_k p_k = e^{\sum_k \delta_{kj}}\, \mathcal Z_j, \qquad
    \mathcal Z_j = \int_{A_j} e^{-\sum_k E_k},

and :math:`1/\mathcal Z_j` is estimated the same way from the product's particles in :math:`A_j`
(which the annealing and the first MCMC steps leave distributed within each basin, whatever their
share between basins). The particles are then resampled so each basin holds the share
:math:`W_j / \sum_l W_l`. The estimate is as good as the learned energies within each basin and
the shards' draw counts (a relative error of about :math:`\sqrt{(1 - P)/(nP)}` per shard and basin
for independent draws).

Basins whose particles, or some shard's draws, are too few to fit a Gaussian keep the share the
annealing gave them.
"""

from __future__ import annotations

import math

import torch

from diffstat.modes.barriers import group_by_leaders
from diffstat.modes.climb import ascend

__all__ = ["group_end_points", "assign_to_centres", "calibrate_mode_weights"]


def group_end_points(
    ends: torch.Tensor,
    log_prob,
    tol: float,
    *,
    num_checks: int = 8,
    margin: float = 1.0,
    max_groups: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Group gradient-ascent end points ``ends: (n, dim)`` by mode with
    :func:`~diffstat.modes.barriers.group_by_leaders`: a point within ``tol`` of its group's first
    point joins it, and so does one with no barrier between them at ``num_checks`` interior points
    with a ``margin`` in nats. The margin is a nat, not the half nat of an exact target's peaks:
    the ends lie on a learned energy, off by a few tenths of a nat, and a fixed-step ascent need not
    have converged along a flat direction. Returns ``labels (n,)`` (-1 after ``max_groups``
    groups) and ``centres (m, dim)``. ``log_prob(x) -> (n,)``."""
    return group_by_leaders(
        log_prob, ends, radius=tol, tol=margin, num_points=num_checks, max_groups=max_groups
    )


def assign_to_centres(ends: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Label of the nearest centre for every end point ``(n,)``."""
    return torch.cdist(ends, centres).argmin(-1)


def _gaussian(x: torch.Tensor, shrink: float):
    mean = x.mean(0)
    c = x - mean
    cov = shrink * (c.T @ c) / (x.shape[0] - 1)
    cov = cov + 1e-9 * torch.eye(x.shape[1], dtype=x.dtype, device=x.device) * cov.diagonal().mean()
    return torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)


def _log_reciprocal(points: torch.Tensor, neg_log_density: torch.Tensor, n_total: int, q) -> torch.Tensor:
    r""":math:`\log \frac1{n}\sum_i q(z_i) e^{E(z_i)}` over the points of one basin (float64)."""
    return torch.logsumexp(q.log_prob(points) + neg_log_density, 0) - math.log(n_total)


def calibrate_mode_weights(
    generator: torch.Generator,
    w: torch.Tensor,
    product,
    t_min: float,
    shard_z: list[torch.Tensor],
    to_w,
    to_z,
    step: float,
    *,
    num_iters: int = 60,
    num_q_draws: int = 1024,
    max_shard_draws: int = 10000,
    shrink: float = 0.7,
    min_points: int | None = None,
    exact_log_prob=None,
    inflate: float = 1.5,
) -> tuple[torch.Tensor, dict]:
    r"""Log-weights ``(n,)`` for the particles ``w (n, dim)`` that move every basin's share to its
    calibrated mass (module notes), and a dict of diagnostics.

    Parameters
    ----------
    w : (n, dim)
        Particles in sampling coordinates, within-basin equilibrated.
    product : object with ``energy(w, t)`` (summed energy, sampling coordinates),
        ``log_prob_and_grad(t)`` and ``models`` (the shard energies ``energy(z, t)``).
    shard_z : list of K ``(n_k, dim)``
        The shards' draws in the models' coordinates ``z``.
    to_w, to_z : callables
        The affine maps between ``z`` and ``w`` (constant Jacobian: it cancels between basins).
    step : float
        Gradient-ascent step (a fraction of the MALA step size); end points within
        :math:`2\sqrt{\text{step}}` of each other, or with no barrier between them, are one mode
        (:func:`group_end_points`).
    num_iters, num_q_draws, max_shard_draws : int
        Ascent steps per point; draws of each :math:`q` for :math:`\hat Q`; draws per shard used
        (a random subset when there are more).
    shrink : float
        Covariance factor of the Gaussians :math:`q` (below 1 keeps :math:`q/p` bounded).
    exact_log_prob : callable ``z (n, dim) -> (n,)``, optional
        The sum of the shards' exact log-densities (any constant): then each basin's mass is
        :math:`\int_{A_j} \prod_k p_k`, estimated by importance sampling from a Gaussian fitted
        to the particles in :math:`A_j` (covariance times ``inflate``), ``num_q_draws``
        evaluations per shard and basin; no draw counts and no learned energies enter.

    Returns
    -------
    log_w : (n,) float64, zero when one basin holds all particles.
    info : ``num_modes``, ``calibrated`` (basins whose mass was estimated), ``shares_before``,
        ``shares_after`` (float lists), ``num_energy_evals``, ``num_shard_evals`` (points at
        which every shard's exact log-density was evaluated), ``labels`` (basin of every
        particle, ``(n,)``, -1 where none).
    """
    n, dim = w.shape
    min_points = 4 * (dim + 2) if min_points is None else min_points
    grad_fn = product.log_prob_and_grad(t_min)
    evals0 = product.num_evals
    with torch.no_grad():
        ends = ascend(grad_fn, w, step, num_iters)
        tol = 2.0 * math.sqrt(float(step))
        labels, centres = group_end_points(ends, lambda x: -product.energy(x, t_min), tol)
    m = centres.shape[0]
    shares = torch.stack([(labels == j).double().mean() for j in range(m)]) if m else torch.zeros(0)
    info = {"num_modes": int(m), "calibrated": [], "shares_before": shares.tolist(), "num_shard_evals": 0}
    info.update(shares_after=shares.tolist(), labels=labels)
    log_w = torch.zeros(n, dtype=torch.float64, device=w.device)
    if m > 1:
        basins = _Basins(generator, grad_fn, centres, step, num_iters, to_w, num_q_draws)
        z_part = to_z(w).double()
        if exact_log_prob is not None:
            log_mass = _exact_masses(basins, z_part, labels, exact_log_prob, min_points, inflate, info)
        else:
            shard_z = [_subset(generator, z, max_shard_draws) for z in shard_z]
            log_mass = _draw_count_masses(
                basins, w, z_part, labels, product, t_min, shard_z, min_points, shrink, info
            )
        log_w = _to_log_weights(shares, log_mass, info, labels, log_w)
    info["num_energy_evals"] = product.num_evals - evals0
    return log_w, info


class _Basins:
    """The product's basins of attraction at ``t_min``: where gradient ascent from a point ends
    (nearest centre), and the masses of Gaussians within a basin by quasi-Monte Carlo."""

    def __init__(self, generator, grad_fn, centres, step, num_iters, to_w, num_q_draws):
        self.generator, self.grad_fn, self.centres = generator, grad_fn, centres
        self.step, self.num_iters, self.to_w, self.num_q_draws = step, num_iters, to_w, num_q_draws

    def of(self, z: torch.Tensor) -> torch.Tensor:
        """Basin ``(n,)`` of every point ``z (n, dim)`` in the models' coordinates."""
        with torch.no_grad():
            return assign_to_centres(
                ascend(self.grad_fn, self.to_w(z), self.step, self.num_iters), self.centres
            )

    def draws(self, q) -> torch.Tensor:
        """``num_q_draws`` draws of ``q`` from a scrambled Sobol sequence (quasi-Monte Carlo:
        a smaller error than independent draws for the smooth integrands here)."""
        gen = self.generator
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen, device=gen.device))
        engine = torch.quasirandom.SobolEngine(q.loc.shape[0], scramble=True, seed=seed)
        u = engine.draw(self.num_q_draws, dtype=torch.float64)
        eps = torch.special.ndtri(u.clamp(1e-12, 1 - 1e-12)).to(q.loc.device)
        return q.loc + eps @ q.scale_tril.T

    def log_q_mass(self, q, j: int) -> torch.Tensor:
        r""":math:`\log \hat Q`: the share of draws of ``q`` whose ascent ends in basin ``j``."""
        in_j = self.of(self.draws(q)) == j
        return torch.log(in_j.double().mean().clamp_min(1.0 / self.num_q_draws))

    def log_mass(self, q, j: int, energy) -> torch.Tensor:
        r""":math:`\log \int_{A_j} e^{-E}` by importance sampling from ``q`` (``energy(z) -> (n,)``)."""
        draws = self.draws(q)
        in_j = self.of(draws) == j
        with torch.no_grad():
            log_r = -energy(draws).double() - q.log_prob(draws)
        log_r = torch.where(in_j, log_r, torch.full_like(log_r, -math.inf))
        return torch.logsumexp(log_r, 0) - math.log(self.num_q_draws)


def _subset(generator: torch.Generator, z: torch.Tensor, max_draws: int) -> torch.Tensor:
    """A random subset of ``max_draws`` rows of ``z`` (all of them when there are fewer)."""
    if z.shape[0] <= max_draws:
        return z
    return z[
        torch.randperm(z.shape[0], generator=generator, device=generator.device)[:max_draws].to(z.device)
    ]


def _exact_masses(basins, z_part, labels, exact_log_prob, min_points, inflate, info) -> torch.Tensor:
    r""":math:`\log W_j = \log\int_{A_j}\prod_k p_k` by importance sampling from a Gaussian fitted
    to the particles in :math:`A_j`; NaN for basins with fewer than ``min_points`` particles."""
    m = basins.centres.shape[0]
    log_mass = torch.full((m,), float("nan"), dtype=torch.float64)
    for j in range(m):
        in_j = (labels == j).to(z_part.device)
        if int(in_j.sum()) < min_points:
            continue
        log_mass[j] = basins.log_mass(_gaussian(z_part[in_j], inflate), j, lambda z_: -exact_log_prob(z_))
        info["num_shard_evals"] += basins.num_q_draws
        info["calibrated"].append(j)
    return log_mass


def _draw_count_masses(
    basins, w, z_part, labels, product, t_min, shard_z, min_points, shrink, info
) -> torch.Tensor:
    r""":math:`\log W_j = \sum_k \hat\delta_{kj} + \log\hat{\mathcal Z}_j` by reciprocal importance
    sampling over the particles and the shards' draws in :math:`A_j` (module notes); NaN for
    basins with fewer than ``min_points`` particles or draws of some shard."""
    m = basins.centres.shape[0]
    log_mass = torch.full((m,), float("nan"), dtype=torch.float64)
    shard_labels = [basins.of(z.to(w)).cpu() for z in shard_z]
    tt = torch.tensor(t_min, dtype=w.dtype, device=w.device)
    for j in range(m):
        in_j = (labels == j).cpu()
        if int(in_j.sum()) < min_points or any(int((lab == j).sum()) < min_points for lab in shard_labels):
            continue
        # product: 1 / Z_j by reciprocal importance sampling over the particles in A_j
        zj = z_part[in_j.to(w.device)]
        qj = _gaussian(zj, shrink)
        with torch.no_grad():
            e_sum = product.energy(w[in_j.to(w.device)], t_min).double()
        total = basins.log_q_mass(qj, j) - _log_reciprocal(zj, e_sum, zj.shape[0], qj)
        # shards: delta_kj by reciprocal importance sampling over the shard's draws in A_j
        for k, (z, lab) in enumerate(zip(shard_z, shard_labels)):
            zk = z[lab.to(z.device) == j].to(w.device).double()
            qk = _gaussian(zk, shrink)
            with torch.no_grad():
                e_k = product.models[k].energy(zk.to(w.dtype), tt).double()
            total = total + _log_reciprocal(zk, e_k, z.shape[0], qk) - basins.log_q_mass(qk, j)
        log_mass[j] = total
        info["calibrated"].append(j)
    return log_mass


def _to_log_weights(shares, log_mass, info, labels, log_w) -> torch.Tensor:
    """Log-weights that give the calibrated basins (two or more) their estimated masses, within the
    share the annealing gave them together; ``log_w`` (zeros) unchanged otherwise."""
    cal = torch.tensor(info["calibrated"], dtype=torch.long)
    if cal.numel() < 2:
        return log_w
    total_share = shares[cal].sum()
    new = torch.softmax(log_mass[cal], 0) * total_share
    after = shares.clone()
    after[cal] = new
    ratio = torch.zeros(shares.shape[0], dtype=torch.float64)
    ratio[cal] = torch.log(new) - torch.log(shares[cal])
    log_w = ratio.to(log_w.device)[labels.clamp_min(0)]
    info["shares_after"] = after.tolist()
    return torch.where(labels >= 0, log_w, torch.zeros_like(log_w))
