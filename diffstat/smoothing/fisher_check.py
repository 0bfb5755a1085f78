r"""The held-out check of a learned smoothed score: a scale-free relative Fisher divergence.

At the check's noise :math:`\sigma_0` (the smallest trained one) the learned score :math:`s` is
compared on held-out draws :math:`x_i` of :math:`p` with

.. math:: r_i = (I + \sigma_0^2 F)^{-1}\,\nabla\log p(x_i), \qquad
   D = \frac{\sum_i (s(x_i, \sigma_0) - r_i)^\top F^{-1} (s(x_i, \sigma_0) - r_i)}
            {\sum_i \nabla\log p(x_i)^\top F^{-1} \nabla\log p(x_i)},

:math:`F = \mathbb E_p[\nabla\log p\,\nabla\log p^\top]` the Fisher information of the score's kept
particles (a Gaussian mode's precision; for separated modes their precisions averaged by mass).

- **Reference** :math:`r`: the smoothed score at :math:`\sigma_0` of a Gaussian mode of precision
  :math:`F`, exact for a Gaussian target (:math:`-(\Sigma + \sigma_0^2 I)^{-1}(x - m)`). The check's
  noise is a fixed share of the particles' overall scale (``sigma_min``), and along a direction
  narrower than :math:`\sigma_0` the smoothed score is a small part of :math:`\nabla\log p`: on a
  2-d ridge with sds 0.1 and 100, :math:`\sigma_0 = 0.70`, the exact smoothed score was 0.96 off the
  true score in the plain ratio :math:`\sum\lVert s - \nabla\log p\rVert^2 / \sum\lVert\nabla\log
  p\rVert^2` (the statistic before; docs/sms.md, "The Fisher check").
- **Metric** :math:`F^{-1}`: the covariance of a Gaussian mode, the limit of the final correction's
  preconditioner :math:`(F + I/s^2)^{-1}` (:func:`~diffstat.smoothing.correction.posterior_metric`).
  An error :math:`\delta` of the score moves a preconditioned Langevin step by :math:`F^{-1}\delta`
  against noise of covariance :math:`F^{-1}`, so :math:`\delta^\top F^{-1}\delta` is its size in the
  step's own units, the same in every direction and unchanged by a linear change of coordinates
  (in the plain ratio the narrowest direction outweighs the others by its precision).
- **Normalisation**: the true score's size in that metric, :math:`\mathbb E\,\nabla\log p^\top F^{-1}
  \nabla\log p = d` for draws of :math:`p`, so :math:`D` is the error's share per dimension. Where
  :math:`\sigma_0` is far below every mode's width (:math:`\sigma_0^2 F \ll I`) and :math:`F` is
  isotropic, :math:`D` is the plain ratio.

Without the score's particles' gradients (no :math:`F`) the plain ratio against :math:`\nabla\log p` is
returned.
"""

from __future__ import annotations

import torch

__all__ = ["relative_fisher"]

#: Eigenvalues of F below this share of its largest are raised to it (a direction where the kept
#: scores never vary, e.g. a flat coordinate, would otherwise get an infinite weight).
_EIGEN_FLOOR = 1e-12


def relative_fisher(s: torch.Tensor, grad: torch.Tensor, fisher: torch.Tensor | None, sigma: float) -> float:
    r"""The relative Fisher divergence :math:`D` of the module doc of the learned score ``s: (n, d)``
    at noise ``sigma`` against the target's score ``grad: (n, d)`` at the same points, in the metric of
    the Fisher information ``fisher: (d, d)`` (None: the plain ratio); float64 throughout."""
    s, g = s.double().cpu(), grad.double().cpu()
    if fisher is None:
        return float(((s - g) ** 2).sum() / (g**2).sum().clamp_min(1e-300))
    lam, axes = torch.linalg.eigh(fisher.double().cpu())
    lam = lam.clamp_min(_EIGEN_FLOOR * float(lam.max().clamp_min(1e-300)))
    gp, sp = g @ axes, s @ axes  # both in F's eigenbasis
    err = sp - gp / (1.0 + sigma**2 * lam)
    return float(((err**2) / lam).sum() / ((gp**2) / lam).sum().clamp_min(1e-300))
