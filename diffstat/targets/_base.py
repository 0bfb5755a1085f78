"""What every mixture target shares: weights, a per-(device, dtype) parameter cache, the
log-density from the components, mode assignment, moments and the Target wrapper."""

from __future__ import annotations

import torch

from diffstat.target import Target

__all__ = ["MixtureBase", "check_weights"]


def check_weights(weights, k: int) -> torch.Tensor:
    """Normalised mixture weights ``(k,)`` in float64 (equal when ``weights`` is None)."""
    w = (
        torch.full((k,), 1.0 / k, dtype=torch.float64)
        if weights is None
        else torch.as_tensor(weights, dtype=torch.float64)
    )
    if w.shape != (k,) or bool((w < 0).any()) or not bool(w.sum() > 0):
        raise ValueError(f"weights must be {k} non-negative numbers with a positive sum, got {w}")
    return w / w.sum()


class MixtureBase:
    r"""Base of :math:`p(x) = \sum_k w_k p_k(x)` with exact components.

    A subclass sets ``means (K, dim)``, ``weights (K,)`` and ``log_normalizer``, and defines
    :meth:`component_log_prob` (``log w_k + log p_k(x)``, ``(n, K)``), :meth:`sample` and
    :attr:`component_covs` ``(K, dim, dim)``; the rest follows here. Mixture moments:
    :math:`E X = \sum_k w_k \mu_k`,
    :math:`\operatorname{Cov} X = \sum_k w_k (\Sigma_k + (\mu_k - E X)(\mu_k - E X)^\top)`.
    """

    means: torch.Tensor
    weights: torch.Tensor
    log_normalizer: float

    def _on(self, like: torch.Tensor, key, make) -> tuple:
        """``make()``'s tensors moved to ``like``'s device and dtype, cached under ``key``."""
        full_key = (key, like.device, like.dtype)
        cache = self.__dict__.setdefault("_cache", {})
        if full_key not in cache:
            cache[full_key] = tuple(t.to(device=like.device, dtype=like.dtype) for t in make())
        return cache[full_key]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised log-density, ``(n,)``."""
        return torch.logsumexp(self.component_log_prob(x), -1)

    def unnormalized_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x) + log_normalizer``: the log-density handed to samplers."""
        return self.log_prob(x) + self.log_normalizer

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior component probabilities ``(n, K)``."""
        return torch.softmax(self.component_log_prob(x), -1)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Most probable component of each point, ``(n,)`` long."""
        return self.component_log_prob(x).argmax(-1)

    @property
    def mean(self) -> torch.Tensor:
        """Exact mean ``(dim,)``."""
        return (self.weights[:, None] * self.means).sum(0)

    @property
    def cov(self) -> torch.Tensor:
        """Exact covariance ``(dim, dim)``."""
        d = self.means - self.mean
        return (self.weights[:, None, None] * (self.component_covs + d[:, :, None] * d[:, None, :])).sum(0)

    def as_target(self, name: str = "x", reference=None, dtype=None) -> Target:
        """A :class:`~diffstat.Target` for :math:`Z p(x)`; it carries no answers (exact
        information goes to a sampler only through explicit options)."""
        return Target(self.unnormalized_log_prob, self.dim, name=name, reference=reference, dtype=dtype)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(K={self.num_components}, dim={self.dim}, weights={self.weights.tolist()})"
        )
