"""Two-mode Gaussian mixtures with unequal weights: the SLIPS two-mode target and the
narrow-heavy / wide-light mixture on which tempering loses the heavy mode."""

from __future__ import annotations

import torch

from diffstat._util import check_positive_int
from diffstat.targets.mixture import GaussianMixture

__all__ = ["two_modes", "narrow_wide"]


def two_modes(
    dim: int = 8,
    a: float = 1.0,
    *,
    weights=(2.0, 1.0),
    variance: float = 0.05,
    centered: bool = True,
    log_normalizer: float = 0.0,
) -> GaussianMixture:
    r"""The unequal two-mode target of SLIPS (Grenioux et al. 2024, their ``make_target``).

    .. math::
        p = w_1\, \mathcal N(-a \mathbf 1 + c \mathbf 1, v I)
            + w_2\, \mathcal N(a \mathbf 1 + c \mathbf 1, v I),
        \qquad c = a / 3 \text{ if centered else } 0,

    with weights 2 : 1 (the heavy mode at :math:`-a\mathbf 1`), :math:`v = 0.05`, and ``d`` from 8
    to 128 in the paper. With the default weights the shift :math:`a/3` makes the mixture mean zero.
    The SMS measurements in REFERENCES.md used weights 0.75 / 0.25: pass ``weights=(3, 1)``.

    Parameters
    ----------
    dim : int
    a : float
        Half the distance between the means along each coordinate.
    weights : (2,)
        Unnormalised weights of the modes at :math:`-a\mathbf 1` and :math:`+a\mathbf 1`.
    variance : float
        Isotropic variance of each mode.
    centered : bool
        Add :math:`(a/3)\mathbf 1` to both means (as in SLIPS).
    log_normalizer : float
        Passed to :class:`GaussianMixture`.
    """
    dim = check_positive_int(dim, "dim")
    if not variance > 0:
        raise ValueError(f"variance must be positive, got {variance}")
    ones = torch.ones(dim, dtype=torch.float64)
    means = torch.stack([-a * ones, a * ones])
    if centered:
        means = means + (a / 3.0) * ones
    return GaussianMixture(
        means,
        torch.as_tensor(weights, dtype=torch.float64),
        scales=variance**0.5,
        log_normalizer=log_normalizer,
    )


def narrow_wide(
    dim: int = 10,
    *,
    offset: float = 1.5,
    weights=(0.75, 0.25),
    scales=(0.4, 1.0),
    log_normalizer: float = 0.0,
) -> GaussianMixture:
    r"""A heavy narrow mode and a light wide one: :math:`0.75\, \mathcal N(\text{offset}\,\mathbf 1,
    0.4^2 I) + 0.25\, \mathcal N(-\text{offset}\,\mathbf 1, I)` (REFERENCES.md, "known failure of
    tempering").

    The means, :math:`\pm 1.5\,\mathbf 1` by default, are our choice (the prototype's were not
    recorded): they lie :math:`3\sqrt d` apart (9.5 in d = 10), 9.5 standard deviations of the wide
    mode, so the modes do not overlap and nearest-mode assignment is exact up to about 1e-10, while
    from far away the wide mode's pull dominates, which is what makes the narrow one hard to find.
    """
    dim = check_positive_int(dim, "dim")
    ones = torch.ones(dim, dtype=torch.float64)
    means = torch.stack([offset * ones, -offset * ones])
    return GaussianMixture(
        means,
        torch.as_tensor(weights, dtype=torch.float64),
        scales=torch.as_tensor(scales, dtype=torch.float64),
        log_normalizer=log_normalizer,
    )
