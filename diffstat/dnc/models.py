r"""Log-priors and per-shard log-likelihoods of the models the divide-and-conquer examples use.

Each is a module-level callable (picklable, so shards can travel to worker processes and Dask
workers): a log-prior maps ``theta: (n, dim)`` to ``(n,)``; a log-likelihood maps ``theta`` and the
shard's data (a tuple of tensors with one row per observation) to ``(n,)``, summed over the rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "GaussianPrior",
    "logistic_log_likelihood",
    "poisson_log_likelihood",
    "mixture_means_log_likelihood",
]


@dataclass(frozen=True)
class GaussianPrior:
    r"""Isotropic :math:`\mathcal N(0, \text{variance}\, I)` log-prior (normalised)."""

    variance: float = 1.0

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        d = theta.shape[-1]
        return -0.5 * (theta**2).sum(-1) / self.variance - 0.5 * d * math.log(2 * math.pi * self.variance)


def logistic_log_likelihood(theta: torch.Tensor, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    r"""Bernoulli log-likelihood :math:`\sum_i y_i \eta_i - \log(1 + e^{\eta_i})`,
    :math:`\eta = X\theta`; ``data = (X (m, dim), y (m,))``."""
    x, y = data
    eta = theta @ x.to(theta).T  # (n, m)
    return (y.to(theta) * eta - torch.nn.functional.softplus(eta)).sum(-1)


def poisson_log_likelihood(theta: torch.Tensor, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    r"""Poisson log-likelihood :math:`\sum_i y_i \eta_i - e^{\eta_i} - \log y_i!`,
    :math:`\eta = X\theta`; ``data = (X (m, dim), y (m,))``."""
    x, y = data
    eta = theta @ x.to(theta).T
    y = y.to(theta)
    return (y * eta - torch.exp(eta) - torch.lgamma(y + 1)).sum(-1)


def mixture_means_log_likelihood(
    theta: torch.Tensor, data: tuple[torch.Tensor], sd: float = math.sqrt(0.2)
) -> torch.Tensor:
    r"""Equal-weight Gaussian mixture with unknown means :math:`\theta \in \mathbb R^J` and known
    sd: :math:`\sum_i \log \frac1J \sum_j \mathcal N(y_i; \theta_j, \text{sd}^2)`; ``data = (y (m,),)``
    (Trojan et al.'s mixture-of-Gaussians toy problem, J = 3, sd = sqrt(0.2))."""
    (y,) = data
    y = y.to(theta).reshape(1, -1, 1)
    z = (y - theta[:, None, :]) / sd  # (n, m, J)
    log_comp = -0.5 * z**2 - math.log(sd * math.sqrt(2 * math.pi)) - math.log(theta.shape[-1])
    return torch.logsumexp(log_comp, -1).sum(-1)
