r"""SwISS: Sub-posteriors with Inflation, Scaling and Shifting (Vyner, Nemeth and Sherlock 2023).

Every shard's draws are moved by an affine map so that their first two moments become those of the
Gaussian approximation to the full posterior, and the moved draws are pooled:

.. math::
    \theta \mapsto \mu + A_k (\theta - m_k), \qquad
    A_k = \Sigma^{1/2} \big(\Sigma^{-1/2} S_k \Sigma^{-1/2}\big)^{-1/2} \Sigma^{-1/2},

so that :math:`A_k S_k A_k^\top = \Sigma`. With ``formulation="product"`` (the sub-posteriors of
:func:`~diffstat.dnc.combine`: prior to the power 1/K) :math:`(\mu, \Sigma)` is the Gaussian
product :math:`\Sigma^{-1} = \sum_k S_k^{-1}`; with ``formulation="swiss"`` (the paper's shards:
full prior, likelihood raised to the power K, already at the full posterior's scale)
:math:`\Sigma^{-1} = \frac1K \sum_k S_k^{-1}`. Keeps each shard's shape (skewness, tails) but never
combines shapes: the pooled draws are a mixture of K reshaped sub-posteriors.
"""

from __future__ import annotations

import torch

from diffstat.dnc.gaussian import (
    CombineResult,
    gaussian_log_prob,
    gaussian_product,
    sample_moments,
    sqrtm_psd,
)

__all__ = ["combine_swiss", "swiss_maps"]


def swiss_maps(subposteriors: list[torch.Tensor], formulation: str = "product"):
    """The target moments ``(mu, Sigma)`` and per-shard maps ``[(m_k, A_k)]`` described above."""
    if formulation not in ("product", "swiss"):
        raise ValueError(f"formulation must be 'product' or 'swiss', got {formulation!r}")
    moments = [sample_moments(x) for x in subposteriors]
    weight = 1.0 if formulation == "product" else 1.0 / len(subposteriors)
    mean, cov = gaussian_product([m for m, _ in moments], [c for _, c in moments], weight=weight)
    root = sqrtm_psd(cov)
    root_inv = torch.linalg.inv(root)
    maps = []
    for m_k, s_k in moments:
        inner = sqrtm_psd(root_inv @ s_k @ root_inv, inverse=True)
        maps.append((m_k, root @ inner @ root_inv))
    return mean, cov, maps


def combine_swiss(
    subposteriors: list[torch.Tensor],
    *,
    num_samples: int,
    generator: torch.Generator,
    scores=None,
    progress: bool = False,
    formulation: str = "product",
) -> CombineResult:
    r"""SwISS draws: the moved shard draws pooled, then ``num_samples`` of them picked uniformly
    (without replacement while the pool is large enough).

    ``lp`` is the log-density of :math:`\mathcal N(\mu, \Sigma)` at the draws.
    """
    mean, cov, maps = swiss_maps(subposteriors, formulation)
    pooled = torch.cat([mean + (x - m_k) @ a_k.T for x, (m_k, a_k) in zip(subposteriors, maps)])
    n = pooled.shape[0]
    if num_samples <= n:
        idx = torch.randperm(n, generator=generator, device=generator.device)[:num_samples]
    else:
        idx = torch.randint(0, n, (num_samples,), generator=generator, device=generator.device)
    draws = pooled[idx.to(pooled.device)]
    return CombineResult(
        draws, {"lp": gaussian_log_prob(draws, mean, cov)}, attrs={"swiss_formulation": formulation}
    )
