r"""Choosing each chain's start along its optimisation path by the ELBO of local Gaussians.

Pathfinder's idea (Zhang, Carpenter, Gelman and Vehtari 2022, "Pathfinder: parallel quasi-Newton
variational inference", JMLR 23): along an optimisation path from a draw of the reference, each
point :math:`x_k` defines a Gaussian :math:`q_k = \mathcal N(x_k + \Sigma_k \nabla\log\pi(x_k),
\Sigma_k)` with :math:`\Sigma_k` an inverse Hessian of :math:`-\log\pi` at :math:`x_k`; the point
whose Gaussian has the largest evidence lower bound :math:`\mathrm{ELBO}(q_k) = E_{q_k}[\log\pi -
\log q_k]`, estimated from a few draws, is the one near the typical set, and a draw of that Gaussian
is the chain's start. Pathfinder takes :math:`\Sigma_k` from L-BFGS's history; here it is the
finite-difference Hessian of the start phase (:mod:`diffstat.mcmc.start`, ``find_start(...,
typical=True)``; not the default, ``docs/mcmc_start.md``), made positive definite where it is not
(:func:`candidates`). Why not the mode: where the log-density is unbounded above (a funnel's neck)
the climb runs down the neck, and a mode's Laplace fit there describes no mass; on a posterior
close to Gaussian the Laplace fit at the mode has the largest ELBO, and the start is a Laplace draw.

:class:`PathChoice` keeps, per chain, the best Gaussian seen so far as the path's points are
visited (one candidate at a time, so memory stays ``chains x dim^2``). The ELBO of every candidate
of a chain uses the same standard normal draws (common random numbers: the comparison between
candidates has far less noise than each estimate). The starts are resampled from all chains' best
Gaussians' draws with weights :math:`\pi / q`, without replacement (:meth:`PathChoice.starts`;
the draws' log-densities and gradients are already computed: no extra evaluation). On a funnel a
narrow Gaussian down the neck loses little ELBO (each slice of the funnel has the same normalised
conditional), so a chain whose path never crossed the bulk can prefer the neck: resampling across
chains moves it to the others' draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from diffstat.mcmc.base import rows_finite

__all__ = [
    "ELBO_DRAWS",
    "SNAPSHOTS",
    "PathChoice",
    "candidates",
    "local_gaussians",
    "mean_covariance",
    "snapshot_visitor",
]

#: Draws per candidate for the ELBO estimate (Pathfinder's default is 5): cheap beside a Hessian's
#: ``dim`` evaluations, and with common random numbers enough to rank candidates whose ELBOs differ
#: by nats.
ELBO_DRAWS = 8
#: Eigenvalues of a Hessian that is not positive definite are replaced by their absolute values,
#: floored at this fraction of the largest (or at 100 machine epsilons in the working precision,
#: where that is larger, so the Cholesky factor exists).
EIGEN_FLOOR = 1e-12
#: Ascent iterations after which each chain's point is a candidate, besides the ascent's end and the
#: Newton iterates: doubling, since the climb crosses orders of magnitude of log-density in its first
#: iterations and moves little in its last.
SNAPSHOTS = (0, 1, 2, 4, 8, 16, 32, 64, 128)


def _floored(lam: torch.Tensor) -> torch.Tensor:
    """Absolute values of curvatures ``(r, dim)``, floored at ``EIGEN_FLOOR`` of each row's largest
    (at least 100 machine epsilons) and at the smallest normal number."""
    floor = max(EIGEN_FLOOR, 100 * torch.finfo(lam.dtype).eps)
    lam = lam.abs()
    return lam.clamp_min(floor * lam.amax(-1, keepdim=True)).clamp_min(torch.finfo(lam.dtype).tiny)


def candidates(x: torch.Tensor, g: torch.Tensor, hess: torch.Tensor):
    r"""The local Gaussians of the points ``x, g: (r, dim)`` with Hessians ``hess: (r, dim, dim)`` of
    :math:`-\log\pi`, as a list. Where :math:`H` is positive definite:
    Pathfinder's :math:`\mathcal N(x + H^{-1}g, H^{-1})` (at a mode, the Laplace approximation).
    Elsewhere (the point is not near a mode; on a funnel, every point of the bulk) two, both tried:
    :math:`\mathcal N(x + D^{-1}g, D^{-1})` with :math:`D` the diagonal of :math:`H` in absolute
    value, and :math:`\mathcal N(x, |H|^{-1})` with :math:`|H|` the eigenvalues' absolute values (a
    Newton step with an indefinite :math:`|H|` can go far astray, so this one is centred at
    :math:`x`; ``docs/mcmc_start.md`` compares them). Returns ``(rows, mean, precision, laplace)``
    tuples, ``laplace`` True for the first kind."""
    _, info = torch.linalg.cholesky_ex(hess)
    finite = torch.isfinite(hess).flatten(1).all(-1) & rows_finite(g)
    pd = (info == 0) & finite
    out = []
    rows = pd.nonzero().squeeze(1)
    if rows.numel():
        h = hess.index_select(0, rows)
        step = torch.cholesky_solve(g.index_select(0, rows).unsqueeze(-1), torch.linalg.cholesky(h)).squeeze(
            -1
        )
        out.append((rows, x.index_select(0, rows) + step, h, True))
    rows = (~pd & finite).nonzero().squeeze(1)
    if rows.numel():
        h, xs, gs = hess.index_select(0, rows), x.index_select(0, rows), g.index_select(0, rows)
        d = _floored(h.diagonal(dim1=-2, dim2=-1))
        out.append((rows, xs + gs / d, torch.diag_embed(d), False))
        lam, vec = torch.linalg.eigh(h)
        prec = vec @ (_floored(lam).unsqueeze(-1) * vec.transpose(1, 2))
        out.append((rows, xs, 0.5 * (prec + prec.transpose(1, 2)), False))
    return out


def local_gaussians(mean: torch.Tensor, prec: torch.Tensor, z: torch.Tensor):
    r"""Draws of :math:`\mathcal N(\mu, P^{-1})`, ``mean: (r, dim)``, ``prec: (r, dim, dim)``, from
    standard normal ``z: (r, m, dim)``. Returns ``(draws (r, m, dim), log_q (r, m), ok (r,))``,
    ``ok`` False where :math:`P` has no Cholesky factor (the draws there are NaN)."""
    chol, info = torch.linalg.cholesky_ex(prec)
    ok = info == 0
    eye = torch.eye(mean.shape[1], dtype=mean.dtype, device=mean.device).expand_as(chol)
    inv_chol = torch.linalg.solve_triangular(chol, eye, upper=False)  # L^{-1}; P^{-1} = L^{-T} L^{-1}
    draws = mean.unsqueeze(1) + z @ inv_chol  # rows z^T L^{-1}: covariance L^{-T} L^{-1}
    log_det = chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # half log det P
    log_q = -0.5 * (z * z).sum(-1) + log_det.unsqueeze(-1) - 0.5 * mean.shape[1] * math.log(2 * math.pi)
    return torch.where(ok[:, None, None], draws, torch.nan), log_q, ok


class PathChoice:
    """Per chain, the Gaussian of largest ELBO among the path points visited, its draws and their
    importance log-weights; :meth:`starts` resamples the chains' starts from all chains' draws.

    ``evaluate(points: (m, dim)) -> (lp, grad)`` evaluates the target (the start phase's batched
    evaluation); ``like: (n, dim)`` gives the chains, dtype and device; ``draws`` per candidate.
    """

    def __init__(self, generator, evaluate: Callable, like: torch.Tensor, draws: int = ELBO_DRAWS):
        n, dim = like.shape
        self.evaluate = evaluate
        self.generator = generator
        self.z = torch.randn(n, draws, dim, generator=generator, dtype=like.dtype, device=like.device)
        self.elbo = torch.full((n,), -torch.inf, dtype=like.dtype, device=like.device)
        self.draws = torch.full_like(self.z, torch.nan)
        self.grads = torch.full_like(self.z, torch.nan)
        self.lp = torch.full((n, draws), torch.nan, dtype=like.dtype, device=like.device)
        self.log_w = torch.full((n, draws), -torch.inf, dtype=like.dtype, device=like.device)
        self.prec = torch.full((n, dim, dim), torch.nan, dtype=like.dtype, device=like.device)
        self.laplace = torch.zeros(n, dtype=torch.bool, device=like.device)

    def visit(self, rows: torch.Tensor, x: torch.Tensor, g: torch.Tensor, hess: torch.Tensor) -> None:
        """The path points of the chains ``rows`` (indices) at ``x, g: (r, dim)`` with Hessians
        ``hess`` of :math:`-\\log\\pi`: the ELBOs of their local Gaussians (:func:`candidates`,
        ``ELBO_DRAWS`` evaluations each); a chain's best is replaced where one is larger."""
        for sub, mean, prec, laplace in candidates(x, g, hess):
            self._try(rows.index_select(0, sub), mean, prec, laplace)

    def _try(self, rows: torch.Tensor, mean: torch.Tensor, prec: torch.Tensor, laplace: bool) -> None:
        """One Gaussian per chain ``rows``: its ELBO estimate, and the chain's best updated."""
        r, m, dim = rows.numel(), self.z.shape[1], self.z.shape[2]
        draws, log_q, ok = local_gaussians(mean, prec, self.z.index_select(0, rows))
        try:
            lp, grad = self.evaluate(draws.reshape(r * m, dim))
        except Exception:  # noqa: BLE001  (a model may raise far out: no candidate here)
            return
        lp, grad = lp.reshape(r, m), grad.reshape(r, m, dim)
        w = lp - log_q
        w = torch.where(torch.isfinite(w) & rows_finite(grad), w, -torch.inf)
        elbo = torch.where(ok, w.mean(-1), -torch.inf)  # -inf if any draw fell outside the support
        better = torch.isfinite(elbo) & (elbo > self.elbo.index_select(0, rows))
        if not bool(better.any()):
            return
        idx = better.nonzero().squeeze(1)
        sel = rows.index_select(0, idx)
        self.elbo[sel] = elbo[idx]
        self.draws[sel], self.grads[sel] = draws[idx], grad[idx]
        self.lp[sel], self.log_w[sel] = lp[idx], w[idx]
        self.prec[sel] = prec[idx]
        self.laplace[sel] = laplace

    def starts(self):
        """The chains' starts: ``n`` of all chains' best Gaussians' draws, resampled without
        replacement with probabilities proportional to their importance weights :math:`\\pi / q`
        (multi-path Pathfinder's importance resampling, Zhang et al. 2022, section 3; without
        replacement so that chains start apart). A chain whose path's Gaussians were all poor (its
        climb ran from far out straight down a neck, where a narrow Gaussian's ELBO is only a few
        nats below the bulk's) thus starts from another chain's draw. Returns ``(x, lp, g, ok)``,
        ``ok`` False for the chains left without a draw (fewer finite weights than chains)."""
        n, m, dim = self.draws.shape
        log_w = self.log_w.reshape(-1)
        finite = torch.isfinite(log_w)
        k = min(n, int(finite.sum()))
        ok = torch.arange(n, device=log_w.device) < k
        x = torch.full((n, dim), torch.nan, dtype=log_w.dtype, device=log_w.device)
        lp = torch.full((n,), torch.nan, dtype=log_w.dtype, device=log_w.device)
        g = torch.full_like(x, torch.nan)
        if k:
            prob = torch.softmax(torch.where(finite, log_w, -torch.inf), 0)
            pick = torch.multinomial(prob, k, replacement=False, generator=self.generator)
            x[:k], lp[:k] = self.draws.reshape(-1, dim)[pick], self.lp.reshape(-1)[pick]
            g[:k] = self.grads.reshape(-1, dim)[pick]
        return x, lp, g, ok

    def covariance(self) -> torch.Tensor | None:
        """The inverse of the chosen Gaussians' mean precision where every chain chose the Gaussian
        of a positive definite Hessian (a Laplace fit, Pathfinder's own), else None: the Gaussians
        of indefinite Hessians (:func:`candidates`) fit points far from any mode, whose mean says
        little of the posterior's covariance (warm-up then starts from the identity, as before)."""
        if not bool((torch.isfinite(self.elbo) & self.laplace).all()):
            return None
        return mean_covariance(self.prec)


def mean_covariance(prec: torch.Tensor) -> torch.Tensor | None:
    """The symmetrised inverse of the mean of the precisions ``prec: (n, dim, dim)``, or None where that
    mean is singular or the inverse not finite (a Hessian flat along a ring's crest)."""
    cov, singular = torch.linalg.inv_ex(prec.mean(0))
    return 0.5 * (cov + cov.T) if not int(singular) and bool(torch.isfinite(cov).all()) else None


def snapshot_visitor(hessian: Callable, choice: PathChoice) -> Callable:
    """A callback ``visit(it, x, g, last)`` for the start phase's ascent: at the iterations in
    ``SNAPSHOTS`` the chains whose point moved since ``last`` (the previous snapshot's points) are
    visited with their Hessians ``hessian(x, g)`` (``dim`` evaluations per chain). Returns the new
    ``last``."""

    def visit(it, x, g, last):
        if it not in SNAPSHOTS:
            return last
        moved = torch.ones_like(x[:, 0], dtype=torch.bool) if last is None else (x != last).any(-1)
        rows = moved.nonzero().squeeze(1)
        if rows.numel():
            xs, gs = x.index_select(0, rows), g.index_select(0, rows)
            choice.visit(rows, xs, gs, hessian(xs, gs))
        return x

    return visit
