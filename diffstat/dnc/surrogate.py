r"""Polynomial shard energies fitted to the log-densities and scores at the shards' own draws.

The pipeline keeps, for every draw :math:`x_i` of shard :math:`k`, the log-density
:math:`\ell_i = \log p_k(x_i)` (up to a constant) and the score :math:`g_i = \nabla\log p_k(x_i)`.
In the shard's own whitened coordinates :math:`u = L_k^{-1}(x - m_k)` (its sample mean and
covariance), :math:`\log p_k` is fitted by a polynomial of degree ``degree``,

.. math::
    f_k(u) = c_0 + \sum_{1 \le |\alpha| \le D} c_\alpha u^\alpha,

by least squares on the values and the gradients together (a Hermite-type fit: :math:`n(d + 1)`
equations for :math:`\binom{d + D}{D}` coefficients):

.. math::
    \min_c \sum_i \big(f_k(u_i) - \ell_i\big)^2 + \big\lVert \nabla_u f_k(u_i) - L_k^\top g_i
    \big\rVert^2 .

Degree 2 is a Gaussian, fitted to the scores instead of the moments; degree 3 (the default) adds
the skewness the shards of a regression carry, and, being fitted to exact values and gradients,
extrapolates smoothly into the shards' tails, where the product of disagreeing shards lives (RAND
HIE, K = 8: the product of the cubic fits is 0.15 posterior sds from the full posterior, the
Gaussian product 1.76; ``docs/dnc.md``). The product :math:`\sum_k f_k` is then sampled by the
SMC of :mod:`diffstat.dnc.exact_smc`, as if it were exact.

How well the fit describes a shard is measured where it was fitted: ``misfit``, the RMS residual
of the fitted log-density at the draws in nats (up to a constant). Summed over the shards,
:math:`\sqrt{\sum_k \mathrm{misfit}_k^2}` is about the error of the product's log-density near the
draws; above :data:`MAX_PRODUCT_MISFIT` the combiner warns that the route is likely biased.
Measured (``docs/dnc.md``): RAND HIE 0.003 (K = 8) and 0.009 (K = 16); ISLP Default 0.08 (K = 8)
and 0.85 (K = 32, whose cubic product is 0.44 posterior sds off); Trojan et al.'s logistic toy 0.53
to 0.64 (cubic product 0.46 off); their mixture toy, whose shards are multimodal, 1.8. It cannot
see a bias that comes from extrapolating far into a shard's tail (RAND HIE's cubic product is 0.17
posterior sds off with the smallest misfit).

A cubic is unbounded above in some direction, so a product of cubics is improper: ``damping``
multiplies the terms of degree 3 and more by :math:`\exp(-\lVert u\rVert^2/2s^2)` (and the fit uses
the damped terms), so that far from the draws the quadratic part rules. The combiner sets
:math:`s` to 4 times the distance, in shard sds, from the shard's mean to the Gaussian product's
(at least 12): twice that distance cost accuracy on RAND HIE (0.33 posterior sds, against 0.11
undamped and 0.15 at four times).
"""

from __future__ import annotations

import itertools
import math

import torch

from diffstat.dnc.gaussian import gaussian_product, sample_moments
from diffstat.dnc.tasks import map_with_retries

__all__ = [
    "MAX_PRODUCT_MISFIT",
    "monomials",
    "PolynomialShard",
    "fit_polynomial_shard",
    "fit_polynomial_shards",
    "product_misfit",
]

#: Largest :math:`\sqrt{\sum_k \mathrm{misfit}_k^2}` (nats) without a warning: an error of 0.3 in
#: the product's log-density moves relative densities by up to about 35%.
MAX_PRODUCT_MISFIT = 0.3


def _index_sets(dim: int, degree: int) -> list[torch.Tensor]:
    """Per degree r = 2..degree, the multi-indices (P_r, r) of the monomials of that degree."""
    return [
        torch.tensor(list(itertools.combinations_with_replacement(range(dim), r)), dtype=torch.long)
        for r in range(2, degree + 1)
    ]


def monomials(u: torch.Tensor, index_sets: list[torch.Tensor], damping: float | None = None):
    r"""All monomials :math:`u^\alpha`, :math:`1 \le |\alpha| \le D`, at ``u: (n, d)`` and their
    gradients: ``(n, P)`` and ``(n, d, P)``, the degree-1 terms first, then ``index_sets`` in order.
    With ``damping`` :math:`s`, the terms of degree 3 and more are multiplied by
    :math:`\exp(-\lVert u\rVert^2 / 2s^2)`."""
    n, d = u.shape
    values = [u]
    grads = [torch.eye(d, dtype=u.dtype, device=u.device).expand(n, d, d)]
    if damping is not None:
        w = torch.exp(-0.5 * (u**2).sum(-1) / damping**2)  # (n,)
        w_grad = -u * w[:, None] / damping**2  # (n, d)
    for r, idx in enumerate(index_sets, start=2):
        factors = u[:, idx]  # (n, P, r)
        values.append(factors.prod(-1))
        g = torch.zeros(n, d, idx.shape[0], dtype=u.dtype, device=u.device)
        cols = torch.arange(idx.shape[0], device=u.device)
        for p in range(idx.shape[1]):
            others = torch.cat([factors[..., :p], factors[..., p + 1 :]], -1).prod(-1)  # (n, P)
            g[:, idx[:, p].to(u.device), cols] += others  # (row, column) pairs unique within one p
        if damping is not None and r >= 3:
            g = g * w[:, None, None] + w_grad[:, :, None] * values[-1][:, None, :]
            values[-1] = values[-1] * w[:, None]
        grads.append(g)
    return torch.cat(values, 1), torch.cat(grads, 2)


class PolynomialShard:
    """A fitted shard energy: ``x (n, dim) -> (log p_k(x), grad)`` up to a constant (picklable)."""

    def __init__(
        self,
        mean: torch.Tensor,
        chol: torch.Tensor,
        coef: torch.Tensor,
        const: float,
        degree: int,
        damping: float | None = None,
        misfit: float = float("nan"),
    ):
        self.mean, self.chol_inv = mean, torch.linalg.inv(chol)
        self.coef, self.const, self.degree, self.damping = coef, float(const), int(degree), damping
        self.index_sets = _index_sets(mean.shape[0], degree)
        self.misfit = float(misfit)  # RMS of the fitted values' residuals at the draws, in nats

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = (x.to(self.mean) - self.mean) @ self.chol_inv.T
        values, grads = monomials(u, self.index_sets, self.damping)
        return self.const + values @ self.coef, (grads @ self.coef) @ self.chol_inv


def fit_polynomial_shard(
    x: torch.Tensor,
    scores: torch.Tensor,
    log_probs: torch.Tensor,
    *,
    degree: int = 3,
    damping: float | None = None,
) -> PolynomialShard:
    r"""Least-squares polynomial fit of one shard's log-density to its values and scores at its
    draws (module notes).

    Parameters
    ----------
    x, scores : (n, dim)
        Draws and :math:`\nabla\log p_k` there. log_probs : (n,) :math:`\log p_k` there (any
        constant).
    degree : int
        2 (a Gaussian fitted to the scores) or more; 3 by default (module notes).
    damping : float, optional
        :math:`s`: the terms of degree 3 and more are damped by :math:`\exp(-\lVert u\rVert^2/2s^2)`
        (fitted so), so that far from the draws the quadratic part rules and the product stays
        proper; None (no damping) for exact polynomials.
    """
    if degree < 2:
        raise ValueError(f"degree must be at least 2, got {degree}")
    x, scores, log_probs = x.double(), scores.double(), log_probs.double()
    n, dim = x.shape
    mean, cov = sample_moments(x)
    chol = torch.linalg.cholesky(cov)
    u = torch.linalg.solve_triangular(chol, (x - mean).T, upper=False).T
    values, grads = monomials(u, _index_sets(dim, degree), damping)
    num_coef = values.shape[1]
    if n * (dim + 1) < 2 * (num_coef + 1):
        raise ValueError(
            f"{n} draws are too few for a degree-{degree} fit in {dim} dimensions "
            f"({num_coef + 1} coefficients)"
        )
    design = torch.cat(
        [
            torch.cat([torch.ones(n, 1, dtype=x.dtype), values], 1),
            torch.cat([torch.zeros(n * dim, 1, dtype=x.dtype), grads.reshape(n * dim, num_coef)], 1),
        ]
    )
    target = torch.cat([log_probs, (scores @ chol).reshape(n * dim)])
    solution = torch.linalg.lstsq(design, target[:, None]).solution[:, 0]
    residual = design[:n] @ solution - log_probs
    misfit = float((residual - residual.mean()).pow(2).mean().sqrt())
    return PolynomialShard(mean, chol, solution[1:], float(solution[0]), degree, damping, misfit)


def _fit_in_worker(x, scores, log_probs, degree, damping, worker_threads):
    """:func:`fit_polynomial_shard` in a worker process, on ``worker_threads`` torch threads."""
    if worker_threads is not None:
        torch.set_num_threads(int(worker_threads))
    return fit_polynomial_shard(x, scores, log_probs, degree=degree, damping=damping)


def fit_polynomial_shards(
    subposteriors: list[torch.Tensor],
    scores: list[torch.Tensor] | None,
    draw_log_probs: list,
    *,
    degree: int = 3,
    executor=None,
    max_retries: int = 2,
) -> list[PolynomialShard]:
    """:func:`fit_polynomial_shard` for every shard, each damped at 4 times the distance, in its
    own sds, from its mean to the shards' Gaussian product (at least 12; module notes): on
    ``executor`` (one task per shard, one torch thread each, retried up to ``max_retries`` times:
    :func:`~diffstat.dnc.tasks.map_with_retries`), or in this process."""
    if scores is None or len(draw_log_probs) != len(subposteriors):
        raise ValueError("draw_log_probs needs scores and one (n_k,) array per shard")
    moments = [sample_moments(x.double()) for x in subposteriors]
    mu_prod, _ = gaussian_product([a for a, _ in moments], [b for _, b in moments])
    args = []
    for (m_k, c_k), x, g, lp in zip(moments, subposteriors, scores, draw_log_probs):
        chol_k = torch.linalg.cholesky(c_k)
        reach = torch.linalg.solve_triangular(chol_k, (mu_prod - m_k)[:, None], upper=False)
        damping = 4.0 * max(float(reach.norm()), 3.0)
        args.append((x.cpu(), g.cpu(), torch.as_tensor(lp).cpu(), degree, damping))
    if executor is None:
        return [fit_polynomial_shard(*a[:3], degree=degree, damping=a[4]) for a in args]
    return map_with_retries(
        executor, _fit_in_worker, [(*a, 1) for a in args], max_retries=max_retries,
        desc="fitting cubic shard energies",
    )  # fmt: skip


def product_misfit(shards: list[PolynomialShard]) -> float:
    r""":math:`\sqrt{\sum_k \mathrm{misfit}_k^2}`, the fits' joint error at the draws (nats; module notes)."""
    return math.sqrt(sum(s.misfit**2 for s in shards))
