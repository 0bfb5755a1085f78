r"""Consensus Monte Carlo (Scott, Blocker, Bonassi, Chipman, George and McCulloch 2016).

Each combined draw is a precision-weighted average of one draw from every sub-posterior:

.. math::
    \theta = \Big(\sum_{k=1}^K W_k\Big)^{-1} \sum_{k=1}^K W_k\, \theta_k,
    \qquad \theta_k \sim p_k, \quad W_k = S_k^{-1},

with :math:`S_k` the sample covariance of shard ``k``. Exact when every sub-posterior is Gaussian;
for non-Gaussian (skewed, multimodal) sub-posteriors the average smears modes together, which is
what the diffusion combiner fixes.
"""

from __future__ import annotations

import torch

from diffstat.dnc.gaussian import CombineResult, gaussian_log_prob, gaussian_product, sample_moments

__all__ = ["combine_consensus"]


def combine_consensus(
    subposteriors: list[torch.Tensor],
    *,
    num_samples: int,
    generator: torch.Generator,
    scores=None,
    progress: bool = False,
    weights: str = "covariance",
) -> CombineResult:
    r"""Consensus Monte Carlo draws.

    Parameters
    ----------
    subposteriors : list of K tensors ``(n_k, dim)``
    num_samples : int
        Each combined draw averages one draw per shard, picked independently and uniformly
        (without replacement while ``num_samples <= n_k``, so every shard draw is used at most
        once; with replacement beyond).
    weights : {"covariance", "diagonal"}
        :math:`W_k` the inverse sample covariance (Scott et al.'s choice), or the inverse of its
        diagonal (their cheaper variant).

    Returns
    -------
    CombineResult
        ``lp`` is the log-density of the Gaussian product of the shards' moment approximations
        (consensus Monte Carlo has no density of its own).
    """
    if weights not in ("covariance", "diagonal"):
        raise ValueError(f"weights must be 'covariance' or 'diagonal', got {weights!r}")
    moments = [sample_moments(x) for x in subposteriors]
    covs = [c if weights == "covariance" else torch.diag(torch.diagonal(c)) for _, c in moments]
    precisions = [torch.linalg.inv(c) for c in covs]
    total = torch.linalg.inv(sum(precisions))
    combined = torch.zeros(
        num_samples, subposteriors[0].shape[1], dtype=subposteriors[0].dtype, device=subposteriors[0].device
    )
    for x, prec in zip(subposteriors, precisions):  # a loop over shards, not chains
        n = x.shape[0]
        if num_samples <= n:
            idx = torch.randperm(n, generator=generator, device=generator.device)[:num_samples].to(x.device)
        else:
            idx = torch.randint(0, n, (num_samples,), generator=generator, device=generator.device).to(
                x.device
            )
        combined = combined + x[idx] @ prec.T
    draws = combined @ total.T
    mean, cov = gaussian_product([m for m, _ in moments], [c for _, c in moments])
    return CombineResult(
        draws, {"lp": gaussian_log_prob(draws, mean, cov)}, attrs={"consensus_weights": weights}
    )
