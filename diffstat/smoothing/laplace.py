r"""The mode bank of the training-free smoothed score and a quick exploration of the target's modes
(the default noise level of SMS needs them: the diameter rule).

Both rest on :mod:`diffstat.modes.laplace` (Hessians, capped monotone Newton ascent, merging of fits
in their own metric). :class:`ModeBank` holds the modes found so far, shared by all chains of
:class:`~diffstat.smoothing.laplace_score.LaplaceSmoothedScore`; :func:`explore_modes` climbs from
reference draws by proximal Newton and keeps the end points that are modes, merged within two
standard deviations of each other.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from diffstat.modes.laplace import laplace_log_mass, later_duplicates, mahalanobis2, newton_ascent

__all__ = ["ModeBank", "ExploredModes", "explore_modes"]


class ModeBank:
    """Local modes found so far, shared by all chains: points ``(B, d)`` with precisions
    ``(B, d, d)`` and hit counts. A candidate within ``merge_radius`` of an entry (in the entry's
    metric) counts as a hit; others are merged among themselves and appended; beyond ``size``
    entries, the least-hit are dropped."""

    def __init__(self, size: int = 32, merge_radius: float = 2.0, max_new: int = 256):
        self.size = int(size)
        self.merge_radius = float(merge_radius)
        self.max_new = int(max_new)
        self.modes: torch.Tensor | None = None
        self.precisions: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.modes is None else self.modes.shape[0]

    def add(self, points: torch.Tensor, precisions: torch.Tensor) -> None:
        """Add candidate modes ``points: (k, d)`` with precisions ``(k, d, d)``."""
        finite = torch.isfinite(points).all(-1) & torch.isfinite(precisions).flatten(1).all(-1)
        points, precisions = points[finite].detach(), precisions[finite].detach()
        if points.shape[0] == 0:
            return
        r2 = self.merge_radius**2
        if self.modes is not None:
            dist2 = mahalanobis2(points, self.modes.to(points), self.precisions.to(points))
            hit = dist2.min(-1)
            near = hit.values < r2
            self.counts = self.counts + torch.bincount(hit.indices[near], minlength=len(self)).to(self.counts)
            points, precisions = points[~near], precisions[~near]
        if points.shape[0] == 0:
            return
        points, precisions = points[: self.max_new], precisions[: self.max_new]
        dup = later_duplicates(mahalanobis2(points, points, precisions), self.merge_radius)
        new, new_prec = points[~dup], precisions[~dup]
        new_counts = torch.ones(new.shape[0], dtype=points.dtype, device=points.device)
        if self.modes is None:
            self.modes, self.precisions, self.counts = new, new_prec, new_counts
        else:
            self.modes = torch.cat([self.modes, new])
            self.precisions = torch.cat([self.precisions, new_prec])
            self.counts = torch.cat([self.counts, new_counts])
        if len(self) > self.size:
            top = torch.argsort(self.counts, descending=True)[: self.size]
            self.modes, self.precisions, self.counts = self.modes[top], self.precisions[top], self.counts[top]


class ExploredModes(NamedTuple):
    """Distinct modes of the target: ``modes (K, d)``, precisions ``-Hessian (K, d, d)``, Laplace
    log-masses ``(K,)``, the number of starts that reached each ``(K,)``, and the cost."""

    modes: torch.Tensor
    precisions: torch.Tensor
    log_mass: torch.Tensor
    hits: torch.Tensor
    num_hessian_evals: int

    def mixture_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``(d,)`` and covariance ``(d, d)`` of the Laplace mixture of the modes."""
        w = torch.softmax(self.log_mass, 0)
        covs = torch.linalg.inv(self.precisions)
        mean = (w[:, None] * self.modes).sum(0)
        dev = self.modes - mean
        cov = (w[:, None, None] * (covs + dev[:, :, None] * dev[:, None, :])).sum(0)
        return mean, cov


def explore_modes(target, x: torch.Tensor, *, num_steps: int = 15, prox_scale: float = 2.0) -> ExploredModes:
    r"""Climb from the points ``x: (n, d)`` to the target's modes and merge the end points.

    Proximal Newton (Levenberg-Marquardt) iterations :math:`x \leftarrow x + (|{-\nabla^2\log p}| +
    \rho^{-2} I)^{-1}\nabla \log p` with :math:`\rho` = ``prox_scale``, capped and monotone
    (:func:`~diffstat.modes.laplace.newton_ascent` without ``y``); end points with a Newton
    decrement below one and a positive-definite :math:`-\nabla^2\log p` are modes, merged when within
    two standard deviations. Each mode's Laplace log-mass is :math:`\log p(\mu) + \tfrac d2\log 2\pi -
    \tfrac12\log\det P`.
    """
    n, d = x.shape
    s2 = float(prox_scale) ** 2
    x, lp, g, hess = newton_ascent(target, x.detach(), s2, num_steps)
    lam, vec = torch.linalg.eigh(-hess)
    ok = torch.isfinite(lp) & (lam.min(-1).values > 0)
    lam_safe = torch.where(ok[:, None], lam, torch.ones_like(lam))
    coef = torch.einsum("nde,nd->ne", vec, g)
    decrement = (coef**2 / lam_safe).sum(-1)
    ok &= decrement < 1.0
    evals = num_steps * n + n
    if not ok.any():
        empty = x.new_zeros((0, d))
        return ExploredModes(empty, x.new_zeros((0, d, d)), x.new_zeros(0), x.new_zeros(0), evals)
    x, lp, lam, vec = x[ok], lp[ok], lam_safe[ok], vec[ok]
    x = x + torch.einsum("nde,ne->nd", vec, torch.einsum("nde,nd->ne", vec, g[ok]) / lam)
    prec = torch.einsum("nde,ne,nfe->ndf", vec, lam, vec)
    log_mass = laplace_log_mass(lp, lam)
    order = torch.argsort(log_mass, descending=True)
    x, prec, log_mass = x[order], prec[order], log_mass[order]
    dist2 = mahalanobis2(x, x, prec)  # (j, i): x_j in the metric of x_i
    keep = ~later_duplicates(dist2, 2.0)
    # each end point is a hit of the first mode (by log-mass) within two standard deviations of it
    owner = torch.where(dist2 < 4.0, torch.arange(x.shape[0], device=x.device), x.shape[0]).min(-1).values
    hits = torch.bincount(owner, minlength=x.shape[0]).to(x.dtype)
    return ExploredModes(x[keep], prec[keep], log_mass[keep], hits[keep], evals)
