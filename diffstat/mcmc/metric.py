r"""The metric (inverse mass matrix) every gradient kernel shares: diagonal or dense.

A kernel's ``inv_mass`` argument is one of

* ``None``: the identity, :math:`M^{-1} = I`;
* a tensor ``(dim,)`` or ``(n, dim)``: a diagonal :math:`M^{-1}`, shared or one per chain;
* a :class:`DenseMetric`: a full :math:`M^{-1} = L L^\top` (``(dim, dim)``), with its Cholesky
  factor computed once, so a step costs two triangular products and no factorisation.

With :math:`M^{-1} = LL^\top`, momenta :math:`p \sim \mathcal N(0, M)` are :math:`p = L^{-\top}z`,
the velocity is :math:`M^{-1}p`, the kinetic energy :math:`\tfrac12 p^\top M^{-1} p`, and a
Gaussian proposal with covariance :math:`c\,M^{-1}` is :math:`\sqrt c\, L\xi` with log-density
:math:`-\lVert L^{-1} v\rVert^2/(2c)`. A good :math:`M^{-1}` is the posterior covariance
(Neal 2011, section 4.1): the kernel then sees a target with unit scales and, for the dense metric,
no correlations.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "DenseMetric",
    "Metric",
    "velocity",
    "kinetic_energy",
    "sample_momentum",
    "scale_noise",
    "inverse_quadratic",
]


class DenseMetric(NamedTuple):
    """A dense inverse mass matrix ``inv_mass: (dim, dim)`` and its lower Cholesky factor ``chol``."""

    inv_mass: torch.Tensor
    chol: torch.Tensor

    @classmethod
    def from_covariance(cls, cov: torch.Tensor, jitter: float = 1e-10) -> DenseMetric:
        r"""A dense metric from a covariance ``(dim, dim)`` (symmetrised; a relative jitter of
        ``jitter`` times its mean variance is added until the Cholesky factorisation succeeds)."""
        if cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
            raise ValueError(f"a dense metric needs a square matrix, got shape {tuple(cov.shape)}")
        cov = 0.5 * (cov + cov.T)
        eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        scale = cov.diagonal().mean().clamp_min(torch.finfo(cov.dtype).tiny)
        for k in range(12):
            chol, info = torch.linalg.cholesky_ex(cov + (jitter * 10.0**k * scale if k else 0.0) * eye)
            if int(info) == 0:
                return cls(chol @ chol.T, chol)
        raise ValueError("the covariance for the dense metric is not positive definite")

    def to(self, dtype=None, device=None) -> DenseMetric:
        return DenseMetric(
            self.inv_mass.to(dtype=dtype, device=device), self.chol.to(dtype=dtype, device=device)
        )


Metric = torch.Tensor | DenseMetric | None


def velocity(inv_mass: Metric, p: torch.Tensor) -> torch.Tensor:
    r""":math:`M^{-1} p` for momenta ``p: (n, dim)``."""
    if inv_mass is None:
        return p
    if isinstance(inv_mass, DenseMetric):
        return p @ inv_mass.inv_mass  # symmetric: (M^{-1} p^T)^T = p M^{-1}
    return inv_mass * p


def kinetic_energy(inv_mass: Metric, p: torch.Tensor) -> torch.Tensor:
    r""":math:`\tfrac12 p^\top M^{-1} p`, shape ``(n,)``."""
    return 0.5 * (p * velocity(inv_mass, p)).sum(-1)


def sample_momentum(generator: torch.Generator, inv_mass: Metric, like: torch.Tensor) -> torch.Tensor:
    r"""Momenta :math:`p \sim \mathcal N(0, M)` of the shape of ``like: (n, dim)``."""
    z = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    if inv_mass is None:
        return z
    if isinstance(inv_mass, DenseMetric):
        # p = L^{-T} z, i.e. solve L^T p^T = z^T
        return torch.linalg.solve_triangular(inv_mass.chol.T, z.T, upper=True).T
    return z / torch.sqrt(inv_mass)


def scale_noise(inv_mass: Metric, xi: torch.Tensor) -> torch.Tensor:
    r""":math:`L\xi` with :math:`LL^\top = M^{-1}`: standard normal ``xi: (n, dim)`` made
    :math:`\mathcal N(0, M^{-1})`."""
    if inv_mass is None:
        return xi
    if isinstance(inv_mass, DenseMetric):
        return xi @ inv_mass.chol.T
    return torch.sqrt(inv_mass) * xi


def inverse_quadratic(inv_mass: Metric, v: torch.Tensor) -> torch.Tensor:
    r""":math:`v^\top M v = \lVert L^{-1} v \rVert^2`, shape ``(n,)``: the Mahalanobis norm of a
    displacement ``v: (n, dim)`` under the covariance :math:`M^{-1}`."""
    if inv_mass is None:
        return (v**2).sum(-1)
    if isinstance(inv_mass, DenseMetric):
        w = torch.linalg.solve_triangular(inv_mass.chol, v.T, upper=False)
        return (w**2).sum(0)
    return (v**2 / inv_mass).sum(-1)
