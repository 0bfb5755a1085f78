r"""The temperature ladder of parallel tempering: a geometric start, DEO swaps between neighbours,
and the ladder equalised from the swap rates (Syed, Bouchard-Cote, Deligiannidis and Doucet 2021).

See :mod:`diffstat.tempering.pt` for the algorithm; here are its parts. :func:`swap_step` proposes
exchanges between the pairs of one parity, accepted with probability
:math:`\min\{1, \exp[(\beta_{r+1} - \beta_r)(\delta(x_r) - \delta(x_{r+1}))]\}`;
:func:`equalize_ladder` places the temperatures at equal communication barrier
:math:`\Lambda(\beta_k) = \sum_{i<k} r_i` (the pairs' rejection rates), inverted by linear
interpolation; :func:`end_of_round` carries the per-temperature tuning to a new ladder.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from diffstat._util import check_positive_int
from diffstat.mcmc.metric import DenseMetric
from diffstat.mcmc.warmup import DENSE_MIN_DRAWS_PER_DIM, FLOOR
from diffstat.tempering.path import PathState

__all__ = [
    "RoundSums",
    "end_of_round",
    "equalize_ladder",
    "geometric_ladder",
    "is_dense",
    "swap_step",
    "with_factors",
]

#: Smallest positive temperature of the default geometric ladder.
BETA_MIN = 1e-3
#: Shortest warm-up round between ladder updates (iterations).
MIN_ROUND = 20


def geometric_ladder(
    num_temperatures: int, beta_min: float = BETA_MIN, *, dtype=torch.float64, device=None
) -> torch.Tensor:
    r"""``(R,)``: :math:`\beta_0 = 0` and :math:`R-1` temperatures geometric from ``beta_min`` to 1."""
    r = check_positive_int(num_temperatures, "num_temperatures")
    if r < 2:
        raise ValueError(f"parallel tempering needs num_temperatures >= 2, got {r}")
    if not 0 < beta_min < 1:
        raise ValueError(f"beta_min must lie in (0, 1), got {beta_min}")
    if r == 2:
        return torch.tensor([0.0, 1.0], dtype=dtype, device=device)
    b = torch.logspace(math.log10(beta_min), 0.0, r - 1, dtype=dtype, device=device)
    b[-1] = 1.0
    return torch.cat([torch.zeros(1, dtype=dtype, device=device), b])


def _interp(xq: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of ``fp: (m, ...)`` given at increasing ``xp: (m,)``."""
    i = torch.searchsorted(xp, xq).clamp(1, xp.numel() - 1)
    x0, x1 = xp[i - 1], xp[i]
    t = ((xq - x0) / (x1 - x0)).clamp(0, 1)
    t = t.reshape(-1, *([1] * (fp.dim() - 1)))
    return fp[i - 1] + t * (fp[i] - fp[i - 1])


def equalize_ladder(betas: torch.Tensor, rejection: torch.Tensor) -> tuple[torch.Tensor, float]:
    r"""The ladder with equal estimated barriers between neighbours, and :math:`\Lambda(1)`.

    ``rejection: (R-1,)`` are the pairs' mean rejection probabilities; a tiny floor keeps
    :math:`\Lambda` strictly increasing so that it can be inverted.
    """
    rej = rejection.clamp(min=0.0, max=1.0) + 1e-6
    lam = torch.cat([torch.zeros(1, dtype=rej.dtype, device=rej.device), torch.cumsum(rej, 0)])
    grid = torch.linspace(0.0, float(lam[-1]), betas.numel(), dtype=betas.dtype, device=betas.device)
    new = _interp(grid, lam.to(betas.dtype), betas)
    new[0], new[-1] = betas[0], betas[-1]
    return new, float(lam[-1] - rej.numel() * 1e-6)


def swap_step(
    generator: torch.Generator, ps: PathState, betas: torch.Tensor, num_chains: int, parity: int
) -> tuple[PathState, torch.Tensor, torch.Tensor]:
    """One DEO round of swaps between neighbours ``(r, r+1)`` with ``r % 2 == parity``.

    ``ps`` holds ``num_chains * R`` replicas, replica ``r`` of chain ``c`` at row ``c * R + r``.
    Returns the permuted replicas, the swap probabilities ``(C, R-1)`` (0 for pairs not proposed)
    and the mask of proposed pairs ``(R-1,)``.
    """
    r = betas.numel()
    delta = ps.delta.reshape(num_chains, r)
    log_a = (betas[1:] - betas[:-1]) * (delta[:, :-1] - delta[:, 1:])
    log_a = torch.nan_to_num(log_a, nan=-math.inf)
    proposed = torch.arange(r - 1, device=betas.device) % 2 == parity
    prob = torch.where(proposed, torch.exp(log_a.clamp(max=0.0)), torch.zeros_like(log_a))
    u = torch.rand(prob.shape, generator=generator, dtype=prob.dtype, device=prob.device)
    swap = u < prob
    ar = torch.arange(r - 1, device=betas.device).expand(num_chains, -1)
    perm = torch.arange(r, device=betas.device).repeat(num_chains, 1)
    perm[:, :-1] = torch.where(swap, ar + 1, perm[:, :-1])
    perm[:, 1:] = torch.where(swap, ar, perm[:, 1:])  # pairs of one parity never overlap
    rows = (perm + r * torch.arange(num_chains, device=betas.device).unsqueeze(-1)).flatten()
    return ps.index(rows), prob, proposed


def check_ladder(betas, num_temperatures, beta_min, dtype, device) -> torch.Tensor:
    if betas is None:
        return geometric_ladder(num_temperatures, beta_min, dtype=dtype, device=device)
    betas = torch.as_tensor(betas, dtype=dtype, device=device).flatten().clone()
    increasing = bool((betas[1:] > betas[:-1]).all())
    if betas.numel() < 2 or float(betas[0]) != 0.0 or float(betas[-1]) != 1.0 or not increasing:
        raise ValueError("betas must be strictly increasing from 0 to 1, with at least 2 temperatures")
    return betas


def warmup_windows(num_warmup: int, adapt_ladder: bool, adapt_mass: bool) -> tuple[set, set]:
    """Iterations ending a warm-up round: ladder updates at ``num_warmup / 2^j`` (j >= 1, rounds
    doubling in length, the last halfway), and preconditioner updates at those or, without them,
    halfway, so the second half of warm-up always tunes the step sizes for the final ones."""
    rounds = {num_warmup // 2**j for j in range(1, 64) if num_warmup // 2**j >= MIN_ROUND}
    updates = rounds if adapt_ladder else set()
    mass = {num_warmup // 2} if adapt_mass and num_warmup // 2 >= MIN_ROUND else set()
    return updates, updates | mass


def end_of_round(update_ladder, betas, swap_rate, adapt, inv_mass, mom):
    """End of a warm-up round: new preconditioners from the round's per-temperature variances or, with
    a dense metric (``inv_mass: (R, dim, dim)``), covariances (shrunk toward 1e-3 of the current
    variances), a new ladder from the swap rates, the tuning carried
    over to it by interpolation in beta, and dual averaging restarted from there. Returns the
    ladder and the preconditioners."""
    log_h = torch.log(adapt.final_step_size)
    if inv_mass is not None and mom[2] > 1:
        n, dense = mom[2], inv_mass.dim() == 3
        old_var = inv_mass.diagonal(dim1=-2, dim2=-1) if dense else inv_mass
        # shrunk toward 1e-3 of the current variances: Stan's shrinkage in the metric's own units
        # (an absolute 1e-3 swamps the narrow directions of an uncentred regression)
        floor = FLOOR * old_var * (5.0 / (n + 5.0))
        if dense:
            cov = (mom[1] - mom[0].unsqueeze(-1) * mom[0].unsqueeze(-2) / n) / (n - 1)
            if n < DENSE_MIN_DRAWS_PER_DIM * cov.shape[-1]:  # too few draws for the correlations
                cov = torch.diag_embed(cov.diagonal(dim1=-2, dim2=-1).clamp_min(0.0))
            estimate = (n / (n + 5.0)) * cov + torch.diag_embed(floor)
            var = estimate.diagonal(dim1=-2, dim2=-1).clamp_min(1e-300)
        else:
            var = ((mom[1] - mom[0] ** 2 / n) / (n - 1)).clamp_min(0.0)
            estimate = var = (n / (n + 5.0)) * var + floor
        # Keep the proposal's scale h M^{-1} roughly where it was; dual averaging refines it.
        log_h = log_h + torch.log((old_var / var).mean(-1))
        inv_mass = estimate
    if update_ladder:
        new, _ = equalize_ladder(betas, 1 - swap_rate)
        log_h = _interp(new, betas, log_h)
        if inv_mass is not None and inv_mass.dim() == 3:  # a convex combination of covariances
            inv_mass = _interp(new, betas, inv_mass)
        elif inv_mass is not None:
            inv_mass = torch.exp(_interp(new, betas, torch.log(inv_mass)))
        betas = new
    adapt.restart(torch.exp(log_h))
    return betas, inv_mass


def with_factors(state):
    """``state`` (a PT state) with the Cholesky factors of its dense metrics (none for a diagonal one)."""
    if not is_dense(state):
        return state._replace(chol=None)
    return state._replace(chol=torch.stack([DenseMetric.from_covariance(c).chol for c in state.inv_mass]))


def is_dense(state) -> bool:
    """Whether ``state`` (a PT state) carries a dense metric per temperature ``(R, dim, dim)``."""
    return state.inv_mass is not None and state.inv_mass.dim() == 3


class RoundSums(NamedTuple):
    """Running sums over a round or the sampling phase: swap probabilities and proposals ``(R-1,)``,
    acceptance ``(R,)``, and the first two moments of the replicas per temperature with their count."""

    swap: torch.Tensor
    swap_num: torch.Tensor
    acc: torch.Tensor
    m1: torch.Tensor
    m2: torch.Tensor
    count: int

    @classmethod
    def zeros(cls, r: int, dim: int, dtype, device, dense: bool = False) -> RoundSums:
        """Empty sums; ``dense``: second moments as outer products ``(R, dim, dim)``."""
        z = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        return cls(z(r - 1), z(r - 1), z(r), z(r, dim), z(r, dim, dim) if dense else z(r, dim), 0)

    def add(self, info, x_t: torch.Tensor, moments: bool) -> RoundSums:
        c, r = x_t.shape[:2]
        swap = self.swap + info.swap_prob.sum(0)
        swap_num = self.swap_num + info.proposed.to(swap.dtype) * c
        acc = self.acc + info.acceptance.reshape(c, r).mean(0)
        if not moments:
            return RoundSums(swap, swap_num, acc, self.m1, self.m2, self.count)
        second = torch.einsum("crd,cre->rde", x_t, x_t) if self.m2.dim() == 3 else (x_t**2).sum(0)
        return RoundSums(swap, swap_num, acc, self.m1 + x_t.sum(0), self.m2 + second, self.count + c)

    @property
    def swap_rate(self) -> torch.Tensor:
        return self.swap / self.swap_num.clamp_min(1)
