"""Neal's funnel: exact log-density, log normaliser, draws and marginal moments."""

from __future__ import annotations

import math

import torch

from diffstat._util import check_positive_int
from diffstat.target import Target

__all__ = ["Funnel"]


class Funnel:
    r"""Neal's funnel on :math:`\mathbb R^d` (Neal 2003, "Slice sampling", section 8).

    .. math::
        x_1 \sim \mathcal N(0, \sigma_1^2), \qquad
        x_i \mid x_1 \sim \mathcal N(0, e^{x_1}), \quad i = 2, \dots, d,

    so :math:`\log p(x) = \log \mathcal N(x_1; 0, \sigma_1^2)
    + \sum_{i \ge 2} \left[-\tfrac12 x_i^2 e^{-x_1} - \tfrac12 x_1 - \tfrac12 \log 2\pi\right]`.

    Parameters
    ----------
    dim : int
        ``d >= 2``; 10 is the benchmark of DDS and PDDS.
    scale : float
        :math:`\sigma_1`, the standard deviation of the neck coordinate (3 in Neal's funnel).
    log_normalizer : float
        The target handed to samplers is :math:`Z p(x)` with :math:`\log Z` = ``log_normalizer``
        (0 by default, the benchmark's value).

    Notes
    -----
    Exact marginal moments: :math:`E x = 0`, :math:`\operatorname{Var} x_1 = \sigma_1^2`,
    :math:`\operatorname{Var} x_i = E e^{x_1} = e^{\sigma_1^2/2}` (90.02 for
    :math:`\sigma_1 = 3`), :math:`E|x_i| = \sqrt{2/\pi}\, e^{\sigma_1^2/8}`, and
    :math:`x_i e^{-x_1/2} \sim \mathcal N(0, 1)` independently of :math:`x_1`.
    Literature (DDS results files, d = 10, true log Z = 0): DDS -0.176 +- 0.068, SMC about -0.05.
    """

    def __init__(self, dim: int = 10, scale: float = 3.0, log_normalizer: float = 0.0):
        dim = check_positive_int(dim, "dim")
        if dim < 2:
            raise ValueError(f"the funnel needs dim >= 2, got {dim}")
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self._dim = dim
        self.scale = float(scale)
        self.log_normalizer = float(log_normalizer)

    @property
    def dim(self) -> int:
        return self._dim

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised log-density at ``x: (n, dim)``, shape ``(n,)``."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (n, {self.dim}), got {tuple(x.shape)}")
        x1, rest = x[:, 0], x[:, 1:]
        half_log_2pi = 0.5 * math.log(2 * math.pi)
        lp1 = -0.5 * (x1 / self.scale) ** 2 - math.log(self.scale) - half_log_2pi
        lp_rest = -0.5 * (rest**2).sum(-1) * torch.exp(-x1) - (self.dim - 1) * (0.5 * x1 + half_log_2pi)
        return lp1 + lp_rest

    def unnormalized_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x) + log_normalizer``: the log-density handed to samplers."""
        return self.log_prob(x) + self.log_normalizer

    def sample(
        self, n: int, generator: torch.Generator | None = None, dtype=torch.float64, device=None
    ) -> torch.Tensor:
        """Exact draws ``(n, dim)``: ``x_1 = sigma_1 z_1``, ``x_i = e^{x_1 / 2} z_i``."""
        n = check_positive_int(n, "n")
        gen_device = generator.device if generator is not None else torch.device("cpu")
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=gen_device)
        x1 = self.scale * z[:, :1]
        x = torch.cat([x1, torch.exp(0.5 * x1) * z[:, 1:]], dim=1)
        return x.to(device=device or gen_device, dtype=dtype)

    @property
    def mean(self) -> torch.Tensor:
        """Exact mean ``(dim,)``: zero."""
        return torch.zeros(self.dim, dtype=torch.float64)

    @property
    def variance(self) -> torch.Tensor:
        r"""Exact marginal variances ``(dim,)``: :math:`\sigma_1^2`, then :math:`e^{\sigma_1^2/2}`."""
        var = torch.full((self.dim,), math.exp(0.5 * self.scale**2), dtype=torch.float64)
        var[0] = self.scale**2
        return var

    @property
    def mean_abs(self) -> torch.Tensor:
        r"""Exact :math:`E|x_i|` ``(dim,)``: :math:`\sigma_1\sqrt{2/\pi}`, then
        :math:`\sqrt{2/\pi}\, E e^{x_1/2} = \sqrt{2/\pi}\, e^{\sigma_1^2/8}`."""
        c = math.sqrt(2 / math.pi)
        out = torch.full((self.dim,), c * math.exp(self.scale**2 / 8), dtype=torch.float64)
        out[0] = c * self.scale
        return out

    def as_target(self, name: str = "x", reference=None, dtype=None) -> Target:
        """A :class:`~diffstat.Target` for :math:`Z p(x)`; it carries no answers (exact
        information goes to a sampler only through explicit options)."""
        return Target(self.unnormalized_log_prob, self.dim, name=name, reference=reference, dtype=dtype)

    def __repr__(self) -> str:
        return f"Funnel(dim={self.dim}, scale={self.scale})"
