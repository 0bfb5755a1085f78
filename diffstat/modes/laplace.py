r"""Newton ascent to a mode with Hessians, Laplace fits there, and the merging of fits that found the
same mode: the parts of the training-free smoothed score (:mod:`diffstat.smoothing.laplace_score`)
and of its mode exploration (:func:`diffstat.smoothing.laplace.explore_modes`).

For the posterior of one measurement, and for a proximal step on :math:`\log p` alone (``y`` the
current point),

.. math::
    f(x) = \log p(x) - \frac{\lVert x - y\rVert^2}{2 s^2},\qquad
    A(x) = s^{-2} I - \nabla^2 \log p(x),

a Newton step is :math:`x \leftarrow x + A^{-1}\nabla f(x)`, solved by Cholesky. Where :math:`A` is
not positive definite (between modes, where :math:`\log p` curves up) the step uses the saddle-free
:math:`|A|` (eigenvalues :math:`\max(|\lambda|, s^{-2})`), so it always climbs; its length is capped
at :data:`MAX_STEP` :math:`= 4` times :math:`s \sqrt d` (a draw of :math:`\mathcal N(y, s^2 I)` lies
about :math:`s\sqrt d` from ``y``), and the ascent is monotone: a step that lowers the objective is
refused and the next one shrunk fourfold (a trust factor per start, doubled back after each
accepted step). Without this, Newton ascent on a logistic-regression posterior oscillated (far from
the mode the saturated likelihood has almost no curvature, so the full step overshoots) and never
reached the mode. Batched eigen-decompositions are ten times slower than Cholesky factorisations on
CPU, so they are only used for the rows that need them.

Fits are merged in their own metric: a fit is a duplicate of an earlier one (in order of evidence)
within a given number of the earlier fit's standard deviations, :math:`\lVert m_j - m_i\rVert_{A_i}`
(:func:`later_duplicates`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "MAX_STEP",
    "log_prob_grad_hessian",
    "laplace_log_mass",
    "safe_cholesky",
    "chol_solve",
    "newton_direction",
    "newton_ascent",
    "NewtonFit",
    "damped_newton",
    "mahalanobis2",
    "later_duplicates",
    "merge_within",
]

#: Newton steps are capped at this many times s * sqrt(d).
MAX_STEP = 4.0


def log_prob_grad_hessian(target, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Log-density ``(n,)``, gradient ``(n, d)`` and Hessian ``(n, d, d)`` at ``x: (n, d)``.

    The Hessian takes ``d`` backward passes through the gradient (one per row); the evaluation counts
    ``n`` target evaluations (points), like a gradient. A log-density that is linear in ``x`` gives
    a zero Hessian. Where the second backward pass gives non-finite entries at a point whose gradient
    is finite (``torch.logaddexp`` of terms more than about 745 nats apart, as in a mixture far from
    one of its components), that point's Hessian is the central difference of gradients instead
    (:func:`_finite_difference_hessian`, ``2 d`` counted evaluations a point).
    """
    n, d = x.shape
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        lp = target.log_prob(xg)
        (g,) = torch.autograd.grad(lp.sum(), xg, create_graph=True)
        if not g.requires_grad:
            return lp.detach(), g.detach(), torch.zeros(n, d, d, dtype=x.dtype, device=x.device)
        rows = []
        for i in range(d):
            (row,) = torch.autograd.grad(g[:, i].sum(), xg, retain_graph=i < d - 1, allow_unused=True)
            rows.append(torch.zeros_like(x) if row is None else row)
    hess = torch.stack(rows, 1).detach()
    g = g.detach()
    redo = ~torch.isfinite(hess).all(-1).all(-1) & torch.isfinite(g).all(-1)
    if bool(redo.any()):
        hess[redo] = _finite_difference_hessian(target, x[redo].detach())
    hess = 0.5 * (hess + hess.transpose(-1, -2))
    return lp.detach(), g, hess


def _finite_difference_hessian(target, x: torch.Tensor) -> torch.Tensor:
    r"""Hessians ``(n, d, d)`` at ``x: (n, d)`` by central differences of the gradient,
    :math:`H_{:,i} = (\nabla\log p(x + \epsilon_i e_i) - \nabla\log p(x - \epsilon_i e_i)) / 2\epsilon_i`
    with :math:`\epsilon_i = 10^{-4}\max(1, |x_i|)` (the error is :math:`O(\epsilon^2)` in the third
    derivatives, the rounding :math:`O(10^{-16}/\epsilon)`: about 1e-8 relative for smooth densities);
    ``2 n d`` evaluations, in one call."""
    n, d = x.shape
    eps = 1e-4 * x.abs().clamp_min(1.0)  # (n, d)
    shift = torch.diag_embed(eps)  # (n, d, d): row i moves coordinate i
    points = torch.cat([x[:, None, :] + shift, x[:, None, :] - shift], 1).reshape(-1, d)
    _, grad = target.log_prob_and_grad(points)
    grad = grad.reshape(n, 2, d, d)  # (n, +/-, i, gradient)
    return ((grad[:, 0] - grad[:, 1]) / (2 * eps[..., None])).transpose(-1, -2)


def laplace_log_mass(log_peak: torch.Tensor, precision_eigenvalues: torch.Tensor) -> torch.Tensor:
    r"""Laplace log-masses ``(n,)`` of peaks of log-density ``log_peak (n,)`` whose precision
    :math:`-\nabla^2\log p` has the positive eigenvalues ``(n, d)``:
    :math:`\log p(m) + \tfrac d2\log 2\pi - \tfrac12\sum_i\log\lambda_i`."""
    d = precision_eigenvalues.shape[-1]
    return log_peak + 0.5 * d * math.log(2 * math.pi) - 0.5 * torch.log(precision_eigenvalues).sum(-1)


def safe_cholesky(a: torch.Tensor, s2: float) -> torch.Tensor:
    r"""Lower Cholesky factors of the precisions ``a: (n, d, d)``; rows that are not positive
    definite are first made so, saddle-free: eigenvalues :math:`\lambda \mapsto \max(|\lambda|,
    s^{-2})` (an eigen-decomposition only for those rows). Their factor is taken from the
    decomposition itself, :math:`L = R^\top` for the QR factor :math:`R` of
    :math:`\Lambda^{1/2}V^\top` (:math:`R^\top R = V\Lambda V^\top`), not by factoring the rebuilt
    matrix, which rounding can leave indefinite when the eigenvalues span 16 orders."""
    chol, info = torch.linalg.cholesky_ex(a)
    bad = (info != 0) | ~torch.isfinite(chol).flatten(1).all(-1)
    if bad.any():
        a_bad = torch.nan_to_num(a[bad], nan=0.0, posinf=0.0, neginf=0.0)
        lam, vec = torch.linalg.eigh(a_bad)
        lam = torch.maximum(lam.abs(), torch.full_like(lam, 1.0 / s2))
        r = torch.linalg.qr(lam.sqrt().unsqueeze(-1) * vec.transpose(-1, -2), mode="r").R
        sign = torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(r)
        chol = chol.clone()
        chol[bad] = (sign.unsqueeze(-1) * r).transpose(-1, -2)
    return chol


def chol_solve(chol: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A^{-1} b`` and ``L^{-1} b`` for ``A = L L^T``, ``b: (n, d)``."""
    half = torch.linalg.solve_triangular(chol, b.unsqueeze(-1), upper=False)
    full = torch.linalg.solve_triangular(chol.transpose(-1, -2), half, upper=True)
    return full.squeeze(-1), half.squeeze(-1)


def newton_direction(g, hess, x, y, s2):
    r"""At ``x: (n, d)`` with gradient ``g`` and Hessian ``hess`` of :math:`\log p`: the gradient of
    :math:`f` ``(n, d)``, the Cholesky factor of the saddle-free :math:`A` ``(n, d, d)``, the Newton
    step :math:`A^{-1}\nabla f` ``(n, d)`` and the Newton decrement :math:`\nabla f^\top A^{-1}
    \nabla f` ``(n,)``."""
    grad_f = g - (x - y) / s2
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    chol = safe_cholesky(eye / s2 - hess, s2)
    step, half = chol_solve(chol, grad_f)
    return grad_f, chol, step, (half**2).sum(-1)


def newton_ascent(
    target, x: torch.Tensor, s2: float, num_moves: int, y: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""``num_moves`` capped, monotone Newton steps (module notes) from ``x: (n, d)``, batched.

    With ``y: (n, d)`` the ascent is on :math:`f` (the posterior given ``y`` at noise variance
    ``s2``); without, it is proximal (Levenberg-Marquardt) ascent on :math:`\log p`, ``y`` the
    current point, :math:`s` the proximal scale. Returns the end points ``(n, d)`` with their
    log-density ``(n,)``, gradient ``(n, d)`` and Hessian ``(n, d, d)``; ``num_moves + 1`` Hessian
    evaluations per point.
    """
    n, d = x.shape
    cap = MAX_STEP * math.sqrt(s2 * d)
    lp, g, hess = log_prob_grad_hessian(target, x)
    trust = torch.ones(n, 1, dtype=x.dtype, device=x.device)
    for _ in range(num_moves):
        _, _, step, _ = newton_direction(g, hess, x, x if y is None else y, s2)
        step = step * torch.clamp(cap / step.norm(dim=-1, keepdim=True), max=1.0) * trust
        x_new = x + step
        lp_new, g_new, hess_new = log_prob_grad_hessian(target, x_new)
        ok = (
            torch.isfinite(lp_new)
            & torch.isfinite(g_new).all(-1)
            & torch.isfinite(hess_new).flatten(1).all(-1)
        )
        if y is None:
            f_old, f_new = lp, lp_new
        else:
            f_old = lp - ((x - y) ** 2).sum(-1) / (2 * s2)
            f_new = lp_new - ((x_new - y) ** 2).sum(-1) / (2 * s2)
        ok = ok & (f_new >= f_old - 1e-12 * f_old.abs())
        trust = torch.where(ok[:, None], torch.clamp(2 * trust, max=1.0), 0.25 * trust)
        x = torch.where(ok[:, None], x_new, x)
        lp = torch.where(ok, lp_new, lp)
        g = torch.where(ok[:, None], g_new, g)
        hess = torch.where(ok[:, None, None], hess_new, hess)
    return x, lp, g, hess


class NewtonFit(NamedTuple):
    """Laplace fits of :math:`f` at the end points of damped Newton ascent, one per start.

    mean: (n, d) the Laplace mean :math:`x + A^{-1}\\nabla f(x)`.
    log_evidence: (n,) :math:`\\log\\int e^{\\hat f}`, :math:`\\hat f` the quadratic model of ``f``.
    chol: (n, d, d) lower Cholesky factor ``L`` of the (saddle-free) precision ``A = L L^T``.
    decrement: (n,) Newton decrement :math:`\\nabla f^\\top A^{-1} \\nabla f` (0 at a mode).
    num_hessian_evals: points at which a Hessian was evaluated.
    """

    mean: torch.Tensor
    log_evidence: torch.Tensor
    chol: torch.Tensor
    decrement: torch.Tensor
    num_hessian_evals: int


def damped_newton(target, x: torch.Tensor, y: torch.Tensor, s2: float, num_steps: int) -> NewtonFit:
    r"""``num_steps`` Hessian evaluations of damped Newton ascent on :math:`f` from ``x: (n, d)``
    toward the posterior mode given ``y: (n, d)`` at noise variance ``s2`` (:func:`newton_ascent`,
    ``num_steps - 1`` moves); the last one fits the Laplace approximation, :math:`\log E = f(x) +
    \tfrac12 \nabla f^\top A^{-1}\nabla f + \tfrac d2 \log 2\pi - \tfrac12 \log\det A`."""
    n, d = x.shape
    x, lp, g, hess = newton_ascent(target, x, s2, num_steps - 1, y)
    _, chol, step, decrement = newton_direction(g, hess, x, y, s2)
    f = lp - ((x - y) ** 2).sum(-1) / (2 * s2)
    log_det = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    log_ev = f + 0.5 * decrement + 0.5 * d * math.log(2 * math.pi) - 0.5 * log_det
    log_ev = torch.nan_to_num(log_ev, nan=-math.inf)
    return NewtonFit(x + step, log_ev, chol, decrement, n * num_steps)


def mahalanobis2(x: torch.Tensor, centres: torch.Tensor, precisions: torch.Tensor) -> torch.Tensor:
    r"""Squared distances ``(k, B)`` of the points ``x: (k, d)`` from ``centres: (B, d)``, each in its
    centre's metric: :math:`(x_k - c_b)^\top P_b (x_k - c_b)`, ``precisions: (B, d, d)``."""
    diff = x[:, None, :] - centres[None]  # (k, B, d)
    return torch.einsum("kbd,bde,kbe->kb", diff, precisions, diff)


def later_duplicates(dist2: torch.Tensor, radius: float) -> torch.Tensor:
    r"""Which of ``S`` ordered points are duplicates, ``(..., S)`` bool: point ``j`` is when an
    earlier point ``i < j`` has ``dist2[..., j, i] < radius**2`` (the distance of ``j`` in the
    metric of ``i``, e.g. :func:`mahalanobis2` of the points from themselves). A duplicate of a
    duplicate is one too, so the result does not depend on which duplicates were dropped first."""
    s = dist2.shape[-1]
    earlier = torch.ones(s, s, dtype=torch.bool, device=dist2.device).tril(-1)  # [j, i]: i < j
    return ((dist2 < radius**2) & earlier).any(-1)


def merge_within(means: torch.Tensor, key: torch.Tensor, chol: torch.Tensor, radius: float) -> torch.Tensor:
    r"""Per chain, which of ``S`` local fits ``means: (n, S, d)`` are distinct modes, ``(n, S)`` bool.

    Fits are visited by decreasing ``key`` (e.g. the log-evidence); a fit is a duplicate when an
    earlier one lies within ``radius`` of it in the earlier one's metric
    :math:`\lVert m_j - m_i\rVert_{A_i} = \lVert L_i^\top (m_j - m_i)\rVert` (:func:`later_duplicates`);
    a fit with a non-finite key is never distinct.
    """
    n, s, d = means.shape
    order = torch.argsort(key, dim=-1, descending=True)
    idx = order[..., None]
    m = torch.gather(means, 1, idx.expand(n, s, d))
    lo = torch.gather(chol, 1, idx[..., None].expand(n, s, d, d))
    diff = m[:, None, :, :] - m[:, :, None, :]  # (n, i, j, d) = m_j - m_i
    proj = torch.einsum("nide,nijd->nije", lo, diff)
    dist2 = (proj**2).sum(-1)  # (n, i, j) in the metric of i
    unusable = ~torch.isfinite(torch.gather(key, 1, order))
    dup_sorted = later_duplicates(dist2.transpose(-1, -2), radius) | unusable
    keep = torch.empty_like(dup_sorted)
    keep.scatter_(1, order, ~dup_sorted)
    return keep
