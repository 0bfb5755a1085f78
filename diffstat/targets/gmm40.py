"""Two-dimensional multimodal Gaussian mixtures: GMM-40 and a 3 x 3 grid of unequal modes."""

from __future__ import annotations

import math

import torch

from diffstat._util import check_positive_int
from diffstat.targets.mixture import GaussianMixture

__all__ = ["gmm40", "nine_modes"]


def gmm40(
    num_modes: int = 40,
    *,
    loc_scaling: float = 40.0,
    scale: float = math.log1p(math.e),
    seed: int = 0,
    log_normalizer: float = 0.0,
) -> GaussianMixture:
    r"""GMM-40 (Midgley et al. 2023, FAB): 40 equally weighted isotropic Gaussians in 2-d with means
    uniform in :math:`[-40, 40]^2`.

    The means are ``(2 u - 1) * loc_scaling`` with ``u`` the first ``2 * num_modes`` float32
    uniforms of ``torch.Generator().manual_seed(seed)`` on the CPU: the same stream as FAB's
    ``torch.manual_seed(0); torch.rand((40, 2))``, so with the defaults these are FAB's means (to
    float32 rounding, 1e-6), the same on every machine. Each mode has standard deviation ``scale``, by default
    softplus(1) = log(1 + e) = 1.3133 as in FAB's code (``scale_tril = diag(softplus(1))``).
    """
    num_modes = check_positive_int(num_modes, "num_modes")
    gen = torch.Generator().manual_seed(int(seed))
    u = torch.rand(num_modes, 2, generator=gen, dtype=torch.float32).double()
    means = (2 * u - 1) * loc_scaling
    return GaussianMixture(means, None, scales=scale, log_normalizer=log_normalizer)


def nine_modes(*, spacing: float = 5.0, log_normalizer: float = 0.0) -> GaussianMixture:
    r"""Nine isotropic Gaussians on the grid :math:`\{-s, 0, s\}^2` (``s`` = ``spacing``, 5) with
    unequal weights and widths.

    Mode ``k = 0..8`` (row-major from :math:`(-s, -s)`) has weight proportional to ``k + 1``
    (from 1/45 to 9/45) and standard deviation ``0.3 + 0.075 k`` (0.3 to 0.9), so the heaviest
    modes are also the widest and the lightest the narrowest: a weight error shows in the mode
    weights, not only in the spread. Neighbouring means are 5.6 standard deviations of the widest
    mode apart.
    """
    grid = torch.tensor([-spacing, 0.0, spacing], dtype=torch.float64)
    means = torch.cartesian_prod(grid, grid)
    k = torch.arange(9, dtype=torch.float64)
    return GaussianMixture(means, k + 1, scales=0.3 + 0.075 * k, log_normalizer=log_normalizer)
