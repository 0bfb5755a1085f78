"""Gaussian mixtures of any dimension: exact log-density, log normaliser, draws, moments,
mode weights and exact Gaussian-smoothed scores."""

from __future__ import annotations

import math

import torch

from diffstat.targets._base import MixtureBase, check_weights

__all__ = ["GaussianMixture"]


class GaussianMixture(MixtureBase):
    r"""The mixture :math:`p(x) = \sum_k w_k\, \mathcal N(x; \mu_k, \Sigma_k)` on :math:`\mathbb R^d`.

    Parameters
    ----------
    means : (K, dim)
    weights : (K,), normalised here.
    scales : (K,) isotropic standard deviations (``Sigma_k = s_k^2 I``), or
    covs : (K, dim, dim) full covariances. Give exactly one of ``scales`` and ``covs``.
    log_normalizer : float
        The target reported by :meth:`as_target` is :math:`Z\,p(x)` with
        :math:`\log Z` = ``log_normalizer``, so estimates of :math:`\log Z` have an exact answer.

    Notes
    -----
    Smoothing is closed-form: if :math:`X \sim p` and :math:`Y = a X + s \varepsilon`, then
    :math:`Y \sim \sum_k w_k \mathcal N(a\mu_k, a^2 \Sigma_k + s^2 I)` (:meth:`noised`); the
    walk-jump density :math:`q_\sigma = p * \mathcal N(0, \sigma^2 I)` is ``noised(1, sigma)``.
    """

    def __init__(self, means, weights=None, *, scales=None, covs=None, log_normalizer: float = 0.0):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() != 2:
            raise ValueError(f"means must have shape (K, dim), got {tuple(means.shape)}")
        k, d = means.shape
        if (scales is None) == (covs is None):
            raise ValueError("give exactly one of scales (K,) and covs (K, dim, dim)")
        if scales is not None:
            scales = torch.as_tensor(scales, dtype=torch.float64).expand(k).clone()
            if (scales <= 0).any():
                raise ValueError("scales must be positive")
            covs = scales[:, None, None] ** 2 * torch.eye(d, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if covs.shape != (k, d, d):
            raise ValueError(f"covs must have shape ({k}, {d}, {d}), got {tuple(covs.shape)}")
        self.means = means
        self.weights = check_weights(weights, k)
        self.covs = covs
        self.chol = torch.linalg.cholesky(covs)
        # Isotropic components (Sigma_k = s_k^2 I) take a fast path without triangular solves.
        diag = torch.diagonal(covs, dim1=-2, dim2=-1)
        off_diagonal_zero = torch.equal(covs, torch.diag_embed(diag))
        self.iso_var = (
            diag[:, 0].clone()
            if off_diagonal_zero and torch.equal(diag, diag[:, :1].expand_as(diag))
            else None
        )
        self.log_normalizer = float(log_normalizer)
        self._smoothed: dict[float, GaussianMixture] = {}

    def _params(self, like: torch.Tensor):
        """means, log weights, Cholesky factors and log-determinants on ``like``'s device/dtype."""
        return self._on(
            like,
            "params",
            lambda: (
                self.means,
                torch.log(self.weights),
                self.chol,
                2 * torch.log(torch.diagonal(self.chol, dim1=-2, dim2=-1)).sum(-1),
            ),
        )

    def _iso_var(self, like: torch.Tensor) -> torch.Tensor:
        return self._on(like, "iso", lambda: (self.iso_var,))[0]

    def component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log w_k + log N(x; mu_k, Sigma_k)`` for each component, shape ``(n, K)``."""
        means, log_w, chol, log_det = self._params(x)
        if self.iso_var is not None:
            maha = ((x[:, None, :] - means[None]) ** 2).sum(-1) / self._iso_var(x)
        else:
            diff = (x[:, None, :] - means[None]).unsqueeze(-1)  # (n, K, d, 1)
            z = torch.linalg.solve_triangular(chol[None], diff, upper=False).squeeze(-1)
            maha = (z**2).sum(-1)
        return log_w - 0.5 * (maha + log_det + self.dim * math.log(2 * math.pi))

    def score(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\nabla \log p(x) = \sum_k r_k(x) \Sigma_k^{-1}(\mu_k - x)`, ``(n, dim)``."""
        means, _, chol, _ = self._params(x)
        resp = torch.softmax(self.component_log_prob(x), -1)  # (n, K)
        if self.iso_var is not None:
            weights = resp / self._iso_var(x)
            return weights @ means - weights.sum(-1, keepdim=True) * x
        diff = (means[None] - x[:, None, :]).unsqueeze(-1)
        prec_diff = torch.cholesky_solve(diff, chol[None]).squeeze(-1)  # (n, K, d)
        return (resp.unsqueeze(-1) * prec_diff).sum(1)

    def sample(
        self, n: int, generator: torch.Generator | None = None, dtype=torch.float64, device=None
    ) -> torch.Tensor:
        """Exact draws ``(n, dim)``."""
        gen_device = generator.device if generator is not None else torch.device("cpu")
        comp = torch.multinomial(self.weights.to(gen_device), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, 1, generator=generator, dtype=torch.float64, device=gen_device)
        x = self.means.to(gen_device)[comp] + (self.chol.to(gen_device)[comp] @ z).squeeze(-1)
        return x.to(device=device or gen_device, dtype=dtype)

    @property
    def component_covs(self) -> torch.Tensor:
        """Component covariances ``(K, dim, dim)``."""
        return self.covs

    def noised(self, alpha: float, sigma: float) -> GaussianMixture:
        """Law of ``alpha X + sigma N(0, I)``: a mixture with means ``alpha mu_k`` and covariances
        ``alpha^2 Sigma_k + sigma^2 I`` (same log_normalizer)."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        return GaussianMixture(
            alpha * self.means,
            self.weights,
            covs=alpha**2 * self.covs + sigma**2 * eye,
            log_normalizer=self.log_normalizer,
        )

    def smoothed_score(self, y: torch.Tensor, sigma) -> torch.Tensor:
        r"""Exact :math:`\nabla \log q_\sigma(y)` with :math:`q_\sigma = p * \mathcal N(0, \sigma^2 I)`,
        ``y: (n, dim)``; ``sigma`` a float (one smoothed mixture is cached per value)."""
        sigma = float(sigma)
        if sigma not in self._smoothed:
            self._smoothed[sigma] = self.noised(1.0, sigma)
        return self._smoothed[sigma].score(y)
