r"""Local Laplace fits from the log-density: Hessians, damped Newton ascent, mode merging, a shared
mode bank and a quick exploration of the target's modes.

These are the parts of the training-free smoothed score
(:class:`~diffstat.smoothing.scores.LaplaceSmoothedScore`) and of the default noise level of SMS
(the diameter rule needs the modes). For the posterior of one measurement,

.. math::
    f(x) = \log p(x) - \frac{\lVert x - y\rVert^2}{2 s^2},\qquad
    A(x) = s^{-2} I - \nabla^2 \log p(x),

a Newton step is :math:`x \leftarrow x + A^{-1}\nabla f(x)`, solved by Cholesky. Where :math:`A` is
not positive definite (between modes, where :math:`\log p` curves up) the step uses the saddle-free
:math:`|A|` (eigenvalues :math:`\max(|\lambda|, s^{-2})`), so it always climbs; its length is capped
at :math:`4 s \sqrt d` (a draw of :math:`\mathcal N(y, s^2 I)` lies about :math:`s\sqrt d` from
``y``), and the ascent is monotone: a step that lowers the objective is refused and the next one
shrunk fourfold (a trust factor per start, doubled back after each accepted step). Without this,
Newton ascent on a logistic-regression posterior oscillated (far from the mode the saturated
likelihood has almost no curvature, so the full step overshoots) and never reached the mode. Batched
eigen-decompositions are ten times slower than Cholesky factorisations on CPU, so
they are only used for the rows that need them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "log_prob_grad_hessian",
    "NewtonFit",
    "safe_cholesky",
    "chol_solve",
    "damped_newton",
    "merge_within",
    "ModeBank",
    "ExploredModes",
    "explore_modes",
    "MAX_STEP",
]

#: Newton steps are capped at this many times s * sqrt(d).
MAX_STEP = 4.0


def log_prob_grad_hessian(target, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Log-density ``(n,)``, gradient ``(n, d)`` and Hessian ``(n, d, d)`` at ``x: (n, d)``.

    The Hessian takes ``d`` backward passes through the gradient (one per row); the evaluation counts
    ``n`` target evaluations (points), like a gradient. A log-density that is linear in ``x`` gives
    a zero Hessian.
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
    hess = torch.stack(rows, 1)
    hess = 0.5 * (hess + hess.transpose(-1, -2))
    return lp.detach(), g.detach(), hess.detach()


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


def safe_cholesky(a: torch.Tensor, s2: float) -> torch.Tensor:
    r"""Lower Cholesky factors of the precisions ``a: (n, d, d)``; rows that are not positive
    definite are first made so, saddle-free: eigenvalues :math:`\lambda \mapsto \max(|\lambda|,
    s^{-2})` (an eigen-decomposition only for those rows)."""
    chol, info = torch.linalg.cholesky_ex(a)
    bad = (info != 0) | ~torch.isfinite(chol).flatten(1).all(-1)
    if bad.any():
        a_bad = torch.nan_to_num(a[bad], nan=0.0, posinf=0.0, neginf=0.0)
        lam, vec = torch.linalg.eigh(a_bad)
        lam = torch.maximum(lam.abs(), torch.full_like(lam, 1.0 / s2))
        chol = chol.clone()
        chol[bad] = torch.linalg.cholesky(torch.einsum("nde,ne,nfe->ndf", vec, lam, vec))
    return chol


def chol_solve(chol: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A^{-1} b`` and ``L^{-1} b`` for ``A = L L^T``, ``b: (n, d)``."""
    half = torch.linalg.solve_triangular(chol, b.unsqueeze(-1), upper=False)
    full = torch.linalg.solve_triangular(chol.transpose(-1, -2), half, upper=True)
    return full.squeeze(-1), half.squeeze(-1)


def _newton_direction(g, hess, x, y, s2):
    """Gradient of f, the Cholesky factor of the saddle-free A, the Newton step and decrement."""
    grad_f = g - (x - y) / s2
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    chol = safe_cholesky(eye / s2 - hess, s2)
    step, half = chol_solve(chol, grad_f)
    return grad_f, chol, step, (half**2).sum(-1)


def damped_newton(target, x: torch.Tensor, y: torch.Tensor, s2: float, num_steps: int) -> NewtonFit:
    r"""``num_steps`` Hessian evaluations of damped Newton ascent on :math:`f` from ``x: (n, d)``
    toward the posterior mode given ``y: (n, d)`` at noise variance ``s2``; the last one fits the
    Laplace approximation, :math:`\log E = f(x) + \tfrac12 \nabla f^\top A^{-1}\nabla f +
    \tfrac d2 \log 2\pi - \tfrac12 \log\det A`."""
    n, d = x.shape
    cap = MAX_STEP * math.sqrt(s2 * d)
    lp, g, hess = log_prob_grad_hessian(target, x)
    trust = torch.ones(n, 1, dtype=x.dtype, device=x.device)
    for it in range(num_steps):
        grad_f, chol, step, decrement = _newton_direction(g, hess, x, y, s2)
        if it == num_steps - 1:
            break
        norm = step.norm(dim=-1, keepdim=True)
        step = step * torch.clamp(cap / norm, max=1.0) * trust
        x_new = x + step
        lp_new, g_new, hess_new = log_prob_grad_hessian(target, x_new)
        ok = (
            torch.isfinite(lp_new)
            & torch.isfinite(g_new).all(-1)
            & torch.isfinite(hess_new).flatten(1).all(-1)
        )
        # monotone: a step that lowers f is refused and the next one shrunk (far from a mode the
        # curvature of, e.g., a logistic likelihood vanishes and the full Newton step overshoots)
        f_old = lp - ((x - y) ** 2).sum(-1) / (2 * s2)
        f_new = lp_new - ((x_new - y) ** 2).sum(-1) / (2 * s2)
        ok = ok & (f_new >= f_old - 1e-12 * f_old.abs())
        trust = torch.where(ok[:, None], torch.clamp(2 * trust, max=1.0), 0.25 * trust)
        x = torch.where(ok[:, None], x_new, x)
        lp = torch.where(ok, lp_new, lp)
        g = torch.where(ok[:, None], g_new, g)
        hess = torch.where(ok[:, None, None], hess_new, hess)
    f = lp - ((x - y) ** 2).sum(-1) / (2 * s2)
    log_det = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    log_ev = f + 0.5 * decrement + 0.5 * d * math.log(2 * math.pi) - 0.5 * log_det
    log_ev = torch.nan_to_num(log_ev, nan=-math.inf)
    return NewtonFit(x + step, log_ev, chol, decrement, n * num_steps)


def merge_within(means: torch.Tensor, key: torch.Tensor, chol: torch.Tensor, radius: float) -> torch.Tensor:
    r"""Per chain, which of ``S`` local fits ``means: (n, S, d)`` are distinct modes, ``(n, S)`` bool.

    Fits are visited by decreasing ``key`` (e.g. the log-evidence); a fit is a duplicate when an
    earlier one lies within ``radius`` of it in the earlier one's metric
    :math:`\lVert m_j - m_i\rVert_{A_i} = \lVert L_i^\top (m_j - m_i)\rVert`.
    """
    n, s, d = means.shape
    order = torch.argsort(key, dim=-1, descending=True)
    idx = order[..., None]
    m = torch.gather(means, 1, idx.expand(n, s, d))
    lo = torch.gather(chol, 1, idx[..., None].expand(n, s, d, d))
    diff = m[:, None, :, :] - m[:, :, None, :]  # (n, i, j, d) = m_j - m_i
    proj = torch.einsum("nide,nijd->nije", lo, diff)
    dist2 = (proj**2).sum(-1)  # metric of i
    earlier = torch.ones(s, s, dtype=torch.bool, device=means.device).triu(1)  # i < j
    dup_sorted = ((dist2 < radius**2) & earlier).any(1) | ~torch.isfinite(torch.gather(key, 1, order))
    keep = torch.empty_like(dup_sorted)
    keep.scatter_(1, order, ~dup_sorted)
    return keep


class ModeBank:
    """Local modes found so far, shared by all chains: points ``(B, d)`` with precisions
    ``(B, d, d)`` and hit counts. A candidate within ``merge_radius`` of an entry (in the entry's
    metric) counts as a hit; others are merged among themselves and appended; beyond ``size``
    entries, the least-hit are dropped."""

    def __init__(self, size: int = 32, merge_radius: float = 2.0, max_new: int = 256):
        self.size = int(size)
        self.merge_radius = float(merge_radius)
        self.max_new = int(max_new)
        self.modes: torch.Tensor | None = None
        self.precisions: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.modes is None else self.modes.shape[0]

    def _dist2(self, points, modes, precisions):
        diff = points[:, None, :] - modes[None]  # (k, B, d)
        return torch.einsum("kbd,bde,kbe->kb", diff, precisions, diff)

    def add(self, points: torch.Tensor, precisions: torch.Tensor) -> None:
        """Add candidate modes ``points: (k, d)`` with precisions ``(k, d, d)``."""
        finite = torch.isfinite(points).all(-1) & torch.isfinite(precisions).flatten(1).all(-1)
        points, precisions = points[finite].detach(), precisions[finite].detach()
        if points.shape[0] == 0:
            return
        r2 = self.merge_radius**2
        if self.modes is not None:
            dist2 = self._dist2(points, self.modes.to(points), self.precisions.to(points))
            hit = dist2.min(-1)
            near = hit.values < r2
            self.counts = self.counts + torch.bincount(hit.indices[near], minlength=len(self)).to(self.counts)
            points, precisions = points[~near], precisions[~near]
        if points.shape[0] == 0:
            return
        points, precisions = points[: self.max_new], precisions[: self.max_new]
        dist2 = self._dist2(points, points, precisions)  # metric of the second index
        earlier = torch.ones(points.shape[0], points.shape[0], dtype=torch.bool, device=points.device).tril(
            -1
        )
        dup = ((dist2 < r2) & earlier).any(-1)
        new, new_prec = points[~dup], precisions[~dup]
        new_counts = torch.ones(new.shape[0], dtype=points.dtype, device=points.device)
        if self.modes is None:
            self.modes, self.precisions, self.counts = new, new_prec, new_counts
        else:
            self.modes = torch.cat([self.modes, new])
            self.precisions = torch.cat([self.precisions, new_prec])
            self.counts = torch.cat([self.counts, new_counts])
        if len(self) > self.size:
            top = torch.argsort(self.counts, descending=True)[: self.size]
            self.modes, self.precisions, self.counts = self.modes[top], self.precisions[top], self.counts[top]


class ExploredModes(NamedTuple):
    """Distinct modes of the target: ``modes (K, d)``, precisions ``-Hessian (K, d, d)``, Laplace
    log-masses ``(K,)``, the number of starts that reached each ``(K,)``, and the cost."""

    modes: torch.Tensor
    precisions: torch.Tensor
    log_mass: torch.Tensor
    hits: torch.Tensor
    num_hessian_evals: int

    def mixture_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``(d,)`` and covariance ``(d, d)`` of the Laplace mixture of the modes."""
        w = torch.softmax(self.log_mass, 0)
        covs = torch.linalg.inv(self.precisions)
        mean = (w[:, None] * self.modes).sum(0)
        dev = self.modes - mean
        cov = (w[:, None, None] * (covs + dev[:, :, None] * dev[:, None, :])).sum(0)
        return mean, cov


def explore_modes(target, x: torch.Tensor, *, num_steps: int = 15, prox_scale: float = 2.0) -> ExploredModes:
    r"""Climb from the points ``x: (n, d)`` to the target's modes and merge the end points.

    Proximal Newton (Levenberg-Marquardt) iterations :math:`x \leftarrow x + (|{-\nabla^2\log p}| +
    \rho^{-2} I)^{-1}\nabla \log p` with :math:`\rho` = ``prox_scale``; end points with a Newton
    decrement below one and a positive-definite :math:`-\nabla^2\log p` are modes, merged when within
    two standard deviations. Each mode's Laplace log-mass is :math:`\log p(\mu) + \tfrac d2\log 2\pi -
    \tfrac12\log\det P`.
    """
    n, d = x.shape
    s2 = float(prox_scale) ** 2
    x = x.detach()
    lp, g, hess = log_prob_grad_hessian(target, x)
    trust = torch.ones(n, 1, dtype=x.dtype, device=x.device)
    for _ in range(num_steps):
        _, _, step, _ = _newton_direction(g, hess, x, x, s2)
        step = (
            step
            * torch.clamp(MAX_STEP * math.sqrt(s2 * d) / step.norm(dim=-1, keepdim=True), max=1.0)
            * trust
        )
        x_new = x + step
        lp_new, g_new, hess_new = log_prob_grad_hessian(target, x_new)
        # monotone ascent: a step that lowers log p is refused and the next one shrunk
        ok = (
            torch.isfinite(lp_new)
            & torch.isfinite(g_new).all(-1)
            & torch.isfinite(hess_new).flatten(1).all(-1)
        )
        ok = ok & (lp_new >= lp - 1e-12 * lp.abs())
        x = torch.where(ok[:, None], x_new, x)
        lp, g = torch.where(ok, lp_new, lp), torch.where(ok[:, None], g_new, g)
        hess = torch.where(ok[:, None, None], hess_new, hess)
        trust = torch.where(ok[:, None], torch.clamp(2 * trust, max=1.0), 0.25 * trust)
    lam, vec = torch.linalg.eigh(-hess)
    ok = torch.isfinite(lp) & (lam.min(-1).values > 0)
    lam_safe = torch.where(ok[:, None], lam, torch.ones_like(lam))
    coef = torch.einsum("nde,nd->ne", vec, g)
    decrement = (coef**2 / lam_safe).sum(-1)
    ok &= decrement < 1.0
    evals = num_steps * n + n
    if not ok.any():
        empty = x.new_zeros((0, d))
        return ExploredModes(empty, x.new_zeros((0, d, d)), x.new_zeros(0), x.new_zeros(0), evals)
    x, lp, lam, vec = x[ok], lp[ok], lam_safe[ok], vec[ok]
    x = x + torch.einsum("nde,ne->nd", vec, torch.einsum("nde,nd->ne", vec, g[ok]) / lam)
    prec = torch.einsum("nde,ne,nfe->ndf", vec, lam, vec)
    log_mass = lp + 0.5 * d * math.log(2 * math.pi) - 0.5 * torch.log(lam).sum(-1)
    order = torch.argsort(log_mass, descending=True)
    x, prec, log_mass = x[order], prec[order], log_mass[order]
    diff = x[None, :, :] - x[:, None, :]  # (i, j, d) = x_j - x_i
    dist2 = torch.einsum("ijd,ide,ije->ij", diff, prec, diff)
    close = dist2 < 4.0
    earlier = torch.ones_like(close).triu(1)
    dup = (close & earlier).any(0)
    owner = torch.where(close, torch.arange(x.shape[0], device=x.device)[:, None], x.shape[0]).min(0).values
    hits = torch.bincount(owner, minlength=x.shape[0]).to(x.dtype)
    keep = ~dup
    return ExploredModes(x[keep], prec[keep], log_mass[keep], hits[keep], evals)
