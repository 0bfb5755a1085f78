r"""The product of Gaussian approximations to the sub-posteriors, and the moment algebra that the
other combiners share.

If each sub-posterior is approximated by :math:`\mathcal N(m_k, S_k)` (its sample mean and
covariance), the product :math:`\prod_{k=1}^K \mathcal N(\theta; m_k, S_k)` is, up to a constant,
:math:`\mathcal N(\theta; \mu, \Sigma)` with

.. math::
    \Sigma = \Big(\sum_k S_k^{-1}\Big)^{-1}, \qquad \mu = \Sigma \sum_k S_k^{-1} m_k .

Exact when every sub-posterior is Gaussian (then the full posterior is this Gaussian); the
baseline and the starting point of the diffusion combiner otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = [
    "CombineResult",
    "sample_moments",
    "sqrtm_psd",
    "gaussian_product",
    "gaussian_log_prob",
    "combine_gaussian",
]


@dataclass
class CombineResult:
    """What a combiner hands to the :func:`~diffstat.dnc.combine` front.

    draws : (num_samples, dim) equally weighted draws from the combined posterior.
    sample_stats : name -> (num_samples,) arrays; ``lp`` is the combiner's estimate of the product
        log-density at each draw (up to a constant).
    groups : extra InferenceData groups, name -> {variable -> array with a leading ``stage`` axis}.
    attrs : extra ``posterior.attrs``.
    """

    draws: torch.Tensor
    sample_stats: dict[str, object]
    groups: dict[str, dict[str, object]] = field(default_factory=dict)
    attrs: dict[str, object] = field(default_factory=dict)


def sample_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample mean ``(dim,)`` and unbiased covariance ``(dim, dim)`` of draws ``x: (n, dim)``."""
    mean = x.mean(0)
    centred = x - mean
    cov = centred.T @ centred / max(x.shape[0] - 1, 1)
    return mean, cov


def sqrtm_psd(a: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    r"""Symmetric square root :math:`A^{1/2}` (or :math:`A^{-1/2}`) of a positive-definite ``a``,
    by eigendecomposition; ``ValueError`` if ``a`` is not positive definite."""
    evals, evecs = torch.linalg.eigh(a)
    if not bool((evals > 0).all()):
        raise ValueError(
            "a sub-posterior covariance is not positive definite (too few draws, or a coordinate "
            "that never moves?)"
        )
    power = -0.5 if inverse else 0.5
    return (evecs * evals**power) @ evecs.T


def gaussian_product(means: list[torch.Tensor], covs: list[torch.Tensor], weight: float = 1.0):
    r"""Mean ``(dim,)`` and covariance ``(dim, dim)`` of :math:`\prod_k \mathcal N(m_k, S_k)^{w}`:
    :math:`\Sigma = (w \sum_k S_k^{-1})^{-1}`, :math:`\mu = \Sigma\, w \sum_k S_k^{-1} m_k`.

    ``weight = 1/K`` gives SwISS's average of precisions (for shards whose likelihood was raised
    to the power K)."""
    precisions = [torch.linalg.inv(c) for c in covs]
    prec = weight * sum(precisions)
    cov = torch.linalg.inv(prec)
    cov = 0.5 * (cov + cov.T)
    mean = cov @ (weight * sum(p @ m for p, m in zip(precisions, means)))
    return mean, cov


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Log-density of N(mean, cov) at ``x: (n, dim)``, shape ``(n,)``."""
    chol = torch.linalg.cholesky(cov)
    z = torch.linalg.solve_triangular(chol, (x - mean).T, upper=False).T
    dim = x.shape[-1]
    return -0.5 * (z**2).sum(-1) - torch.log(torch.diagonal(chol)).sum() - 0.5 * dim * math.log(2 * math.pi)


def combine_gaussian(
    subposteriors: list[torch.Tensor],
    *,
    num_samples: int,
    generator: torch.Generator,
    scores=None,
    progress: bool = False,
) -> CombineResult:
    r"""Draws from the product of the sub-posteriors' Gaussian approximations.

    Parameters
    ----------
    subposteriors : list of K tensors ``(n_k, dim)``
    num_samples : int
        Independent draws from :math:`\mathcal N(\mu, \Sigma)`.
    scores : ignored (accepted so every combiner has one signature).

    Returns
    -------
    CombineResult
        ``lp`` is the Gaussian product's log-density; ``attrs`` hold nothing extra.
    """
    moments = [sample_moments(x) for x in subposteriors]
    mean, cov = gaussian_product([m for m, _ in moments], [c for _, c in moments])
    x = subposteriors[0]
    z = torch.randn(num_samples, x.shape[1], generator=generator, dtype=x.dtype, device=x.device)
    draws = mean + z @ torch.linalg.cholesky(cov).T
    return CombineResult(draws, {"lp": gaussian_log_prob(draws, mean, cov)})
