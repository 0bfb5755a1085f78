r"""Check a port against its reference draws without any sampler: Stein identities.

For a smooth density :math:`\pi` on :math:`\mathbb{R}^d` that decays fast enough, integration by
parts gives, for every coordinate :math:`j`,

.. math::

    \mathbb{E}_\pi\bigl[\partial_j \log\pi(u)\bigr] = 0, \qquad
    \mathbb{E}_\pi\bigl[u_j\,\partial_j \log\pi(u)\bigr] = -1 .

The reference draws, mapped to the unconstrained space of the port, are draws from the port's
target if (and only if, for practical purposes) the port is the Stan model. Each identity is
estimated by its sample mean over the draws, and the discrepancy is reported as a z-score, the
error over its Monte Carlo standard error (sample sd / sqrt(n); the thinned reference draws are
nearly independent, ESS near n). A wrong prior scale or a perturbed data vector moves the
gradient and shows up as large z-scores.

The same identities hold in any affine coordinates :math:`w = L^{-1}(u - m)` (the gradient becomes
:math:`L^\top \nabla_u`). They are also checked in whitened coordinates, ``L`` the Cholesky factor
of the draws' covariance: in strongly correlated posteriors (a regression on an uncentred
predictor) the raw gradient's noise along the long axis swamps an error in a short one, and
whitening gives each direction its own scale (the estimated ``m``, ``L`` add an O(1/n) bias, small
against the O(1/sqrt(n)) standard error).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

__all__ = ["SteinCheck", "stein_check"]


class SteinCheck(NamedTuple):
    """z-scores per unconstrained coordinate: ``z_grad`` for E[grad] = 0, ``z_scaled`` for
    E[u * grad] = -1, and the same in whitened coordinates (``z_white_grad``, ``z_white_scaled``);
    ``max_abs_z`` the largest of all; ``num_draws`` n."""

    z_grad: np.ndarray
    z_scaled: np.ndarray
    z_white_grad: np.ndarray
    z_white_scaled: np.ndarray
    max_abs_z: float
    num_draws: int


def _z(values: torch.Tensor, expected: float) -> np.ndarray:
    n = values.shape[0]
    se = values.std(0) / n**0.5
    return ((values.mean(0) - expected) / se).numpy()


def stein_check(posterior, draws: np.ndarray | None = None) -> SteinCheck:
    """Stein-identity z-scores of ``posterior``'s target at its reference draws (or at ``draws``,
    ``(n, len(param_names))`` in the reference order). The target must be float64."""
    target = posterior.target
    with torch.no_grad():
        u = target.unconstrain(posterior.reference_sites(draws))
    _, grad = target.log_prob_and_grad(u)
    centred = u - u.mean(0)
    chol = torch.linalg.cholesky(centred.T @ centred / (u.shape[0] - 1))
    w = torch.linalg.solve_triangular(chol, centred.T, upper=False).T
    grad_w = grad @ chol
    zs = [_z(grad, 0.0), _z(u * grad, -1.0), _z(grad_w, 0.0), _z(w * grad_w, -1.0)]
    worst = float(np.max(np.abs(np.concatenate(zs))))
    return SteinCheck(*zs, worst, int(u.shape[0]))
