"""Mixtures of banana-shaped (twisted Gaussian) modes: exact log-density, log normaliser,
draws, moments and mode weights."""

from __future__ import annotations

import math

import torch

from diffstat._util import check_positive_int
from diffstat.targets._base import MixtureBase, check_weights

__all__ = ["BananaMixture", "banana_mixture"]


class BananaMixture(MixtureBase):
    r"""A mixture of twisted Gaussians (Haario, Saksman and Tamminen 1999) on :math:`\mathbb R^d`.

    Component ``k`` is the law of :math:`\mu_k + \phi_k(Z)` with
    :math:`Z \sim \mathcal N(0, \operatorname{diag}(s_k^2))` and the twist

    .. math::
        \phi_k(z) = \bigl(z_1,\; z_2 + b_k (z_1^2 - s_{k1}^2),\; z_3, \dots, z_d\bigr),

    which bends the second coordinate along a parabola in the first. The twist is a shear with
    unit Jacobian, so :math:`p_k(x) = \mathcal N(\phi_k^{-1}(x - \mu_k); 0, \operatorname{diag}(s_k^2))`
    exactly, with :math:`\phi_k^{-1}(y) = (y_1, y_2 - b_k(y_1^2 - s_{k1}^2), y_3, \dots)`, and
    :math:`p = \sum_k w_k p_k` is normalised.

    Parameters
    ----------
    means : (K, dim)
        The component means (the twist is centred: :math:`E[\phi_k(Z)] = 0`).
    weights : (K,), normalised here; equal if None.
    scales : (K, dim), (K,) or float
        Standard deviations :math:`s_k` of the untwisted Gaussian.
    curvature : (K,) or float
        The twists :math:`b_k` (0 gives a Gaussian component).
    log_normalizer : float
        The target handed to samplers is :math:`Z p(x)` with :math:`\log Z` = ``log_normalizer``.

    Notes
    -----
    Exact moments of component ``k``: mean :math:`\mu_k`, covariance
    :math:`\operatorname{diag}(s_k^2)` except :math:`\operatorname{Var} x_2 = s_{k2}^2 + 2 b_k^2 s_{k1}^4`
    (:math:`\operatorname{Var}(z_1^2) = 2 s_{k1}^4`, and :math:`\operatorname{Cov}(z_1, z_1^2) = 0`).
    """

    def __init__(self, means, weights=None, *, scales=1.0, curvature=1.0, log_normalizer: float = 0.0):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() != 2 or means.shape[1] < 2:
            raise ValueError(f"means must have shape (K, dim) with dim >= 2, got {tuple(means.shape)}")
        k, d = means.shape
        scales = torch.as_tensor(scales, dtype=torch.float64)
        if scales.dim() == 1:
            if scales.shape[0] != k:
                raise ValueError(
                    f"1-d scales are one per component ({k}); give (K, dim) for per-coordinate scales"
                )
            scales = scales[:, None]
        if scales.dim() > 2 or not all(
            s in (1, t) for s, t in zip(scales.shape[-2:] if scales.dim() == 2 else (), (k, d))
        ):
            raise ValueError(
                f"scales must be a float, (K,) or (K, dim) = ({k}, {d}), got {tuple(scales.shape)}"
            )
        scales = scales.expand(k, d).clone()
        if (scales <= 0).any():
            raise ValueError("scales must be positive")
        curvature = torch.as_tensor(curvature, dtype=torch.float64).expand(k).clone()
        self.means = means
        self.weights = check_weights(weights, k)
        self.scales = scales
        self.curvature = curvature
        self.log_normalizer = float(log_normalizer)

    def _params(self, like: torch.Tensor):
        """means, log weights, scales, twists and Gaussian log-normalisers on ``like``'s device/dtype."""
        log_norm = lambda: -torch.log(self.scales).sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)  # noqa: E731
        return self._on(
            like,
            "params",
            lambda: (self.means, torch.log(self.weights), self.scales, self.curvature, log_norm()),
        )

    def untwist(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`z = \phi_k^{-1}(x - \mu_k)` for every component, ``(n, K, dim)``."""
        means, _, scales, b, _ = self._params(x)
        y = x[:, None, :] - means[None]
        shear = b * (y[..., 0] ** 2 - scales[:, 0] ** 2)  # (n, K)
        return torch.cat([y[..., :1], (y[..., 1] - shear).unsqueeze(-1), y[..., 2:]], dim=-1)

    def component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log w_k + log p_k(x)`` for each component, shape ``(n, K)``."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (n, {self.dim}), got {tuple(x.shape)}")
        _, log_w, scales, _, log_norm = self._params(x)
        z = self.untwist(x)
        return log_w + log_norm - 0.5 * ((z / scales) ** 2).sum(-1)

    def sample(
        self, n: int, generator: torch.Generator | None = None, dtype=torch.float64, device=None
    ) -> torch.Tensor:
        r"""Exact draws ``(n, dim)``: a component by its weight, then :math:`\mu_k + \phi_k(Z)`."""
        n = check_positive_int(n, "n")
        gen_device = generator.device if generator is not None else torch.device("cpu")
        comp = torch.multinomial(self.weights.to(gen_device), n, replacement=True, generator=generator)
        means, scales, b = (t.to(gen_device)[comp] for t in (self.means, self.scales, self.curvature))
        z = scales * torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=gen_device)
        z[:, 1] = z[:, 1] + b * (z[:, 0] ** 2 - scales[:, 0] ** 2)
        return (means + z).to(device=device or gen_device, dtype=dtype)

    @property
    def component_covs(self) -> torch.Tensor:
        """Exact covariance of each component, ``(K, dim, dim)`` (diagonal)."""
        var = self.scales**2
        var[:, 1] = var[:, 1] + 2 * self.curvature**2 * self.scales[:, 0] ** 4
        return torch.diag_embed(var)


def banana_mixture(
    dim: int = 6,
    *,
    offset: float = 2.5,
    weights=(2.0, 1.0),
    curvature=(1.0, -1.0),
    twist_scale: float = 1.0,
    scale: float = 0.5,
    log_normalizer: float = 0.0,
) -> BananaMixture:
    r"""Two banana modes bent in opposite directions, for ``dim`` from 4 to 10.

    Means :math:`-\text{offset}\,\mathbf 1` (weight 2/3, :math:`b = 1`) and
    :math:`+\text{offset}\,\mathbf 1` (weight 1/3, :math:`b = -1`); :math:`s_1` = ``twist_scale``
    (1) for the coordinate that bends the banana, ``scale`` (0.5) for the others. The modes differ
    by :math:`2 \cdot 2.5 = 5` in every coordinate, 10 standard deviations in each of the
    ``dim - 2`` untwisted ones (Mahalanobis distance at least 15 for ``dim >= 4``), so
    assignment to the most probable component errs with probability below 1e-12 and
    :attr:`BananaMixture.weights` are the exact mode weights.
    """
    dim = check_positive_int(dim, "dim")
    if dim < 3:
        raise ValueError(
            f"banana_mixture needs dim >= 3 (two twisted and at least one separating coordinate), got {dim}"
        )
    ones = torch.ones(dim, dtype=torch.float64)
    means = torch.stack([-offset * ones, offset * ones])
    scales = torch.full((2, dim), float(scale), dtype=torch.float64)
    scales[:, 0] = twist_scale
    return BananaMixture(
        means,
        torch.as_tensor(weights, dtype=torch.float64),
        scales=scales,
        curvature=curvature,
        log_normalizer=log_normalizer,
    )
