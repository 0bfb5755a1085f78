r"""The training-free smoothed score: multi-start Laplace fits of :math:`p(x\mid y)` with a mode bank
shared by all chains, corrected by importance sampling (:class:`LaplaceSmoothedScore`).

Its building blocks are damped Newton ascent, Hessians and the merging of fits
(:mod:`diffstat.modes.laplace`) and the mode bank and mode exploration
(:mod:`diffstat.smoothing.laplace`); REFERENCES.md ("Measured here: training-free SMS") records why a
shared bank: it keeps the relative masses of the posterior modes right, where per-chain starts
find only the modes near each chain.
"""

from __future__ import annotations

import math

import torch

from diffstat._util import check_positive_int, ess_from_log_weights
from diffstat.smoothing.base import SmoothedScore
from diffstat.modes.laplace import (
    MAX_STEP,
    chol_solve,
    damped_newton,
    log_prob_grad_hessian,
    merge_within,
    safe_cholesky,
)
from diffstat.smoothing.laplace import ModeBank, explore_modes

__all__ = ["LaplaceSmoothedScore"]


class LaplaceSmoothedScore(SmoothedScore):
    r"""Training-free :math:`\mathbb E[X\mid y]` by multi-start Laplace fits with a shared mode bank.

    For each chain's query ``y`` at noise ``s``, with :math:`f(x) = \log p(x) - \lVert x - y
    \rVert^2 / (2 s^2)`:

    1. Starts: the chain's previous local mode, ``num_fresh`` draws from :math:`\mathcal N(y, s^2 I)`,
       and every entry of a :class:`~diffstat.smoothing.laplace.ModeBank` shared by all chains.
    2. Fresh starts climb by ``newton_steps - 1`` damped Newton steps on :math:`f`
       (:func:`~diffstat.modes.laplace.damped_newton`); every start is then fitted where it
       stands (starts at known modes need no climb): at :math:`x_j`, the local precision
       :math:`A_j = s^{-2} I - \nabla^2 \log p(x_j)` (made positive definite, saddle-free, where it
       is not) and the Laplace mean :math:`m_j = x_j + A_j^{-1}\nabla f(x_j)`.
    3. Starts that reached the same local mode (Mahalanobis distance under :math:`A_j` below
       ``merge_radius``) are merged, keeping the highest evidence; each distinct mode gets the evidence
       :math:`\log E_j = f(x_j) + \tfrac12 \nabla f^\top A_j^{-1} \nabla f - \tfrac12 \log\det A_j`
       (up to a common constant),
       corrected by importance sampling from :math:`\mathcal N(m_j, A_j^{-1})` with ``num_is`` draws
       (:math:`\hat r_j = \frac1K\sum_k e^{f(x_{jk})} / \hat q_j(x_{jk})`, exactly one for a Gaussian
       mode).
    4. :math:`\mathbb E[X\mid y] \approx \sum_j \pi_j m_j` with :math:`\pi \propto E_j \hat r_j`. The
       reported ``spread`` is the delta-method standard error from the IS corrections,
       :math:`\sqrt{\sum_j \pi_j^2 \lVert m_j - \hat x\rVert^2 \widehat{\mathrm{var}}(\log \hat r_j) / d}`.

    The target modes next to the converged local modes of non-negligible weight enter the bank
    (de-duplicated after every call; see :meth:`_bank_add`).
    Once fewer than ``cheap_fraction`` of the chains see two modes for ``cheap_patience`` calls in
    a row, the estimator switches to one cheap start: a single Newton step from the chain's previous
    mode with a curvature refreshed every ``hessian_every`` calls (one gradient per chain per call).
    Laplace is exact for Gaussian modes; on other modes the IS correction carries the error.

    Parameters
    ----------
    target : Target
    num_fresh : int
        Fresh starts drawn from :math:`\mathcal N(y, s^2 I)` per chain and call (they discover modes).
    newton_steps : int
        Hessian evaluations per fresh start (``newton_steps - 1`` moves, then the Laplace fit).
    num_is : int
        IS draws per local mode for the evidence correction; 0 gives the deterministic Laplace weights.
    bank_size : int
        Most modes kept in the shared bank.
    merge_radius : float
        Two local modes closer than this many local standard deviations are one.
    cheap_fraction, cheap_patience, hessian_every :
        The switch to the one-start estimator (see above); ``cheap_fraction=0`` never switches.
    explore : int
        Starts of a mode exploration from the reference that seeds the bank before the first call
        (0: none).
    """

    uses_target = True

    def __init__(
        self,
        target,
        *,
        num_fresh: int = 2,
        newton_steps: int = 3,
        num_is: int = 8,
        bank_size: int = 32,
        merge_radius: float = 1.0,
        cheap_fraction: float = 0.02,
        cheap_patience: int = 3,
        hessian_every: int = 8,
        explore: int = 256,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.target = target
        self.num_fresh = int(num_fresh)
        self.newton_steps = check_positive_int(newton_steps, "newton_steps")
        self.num_is = int(num_is)
        if self.num_fresh < 0 or self.num_is < 0:
            raise ValueError("num_fresh and num_is must be non-negative")
        self.merge_radius = float(merge_radius)
        self.cheap_fraction = float(cheap_fraction)
        self.cheap_patience = int(cheap_patience)
        self.hessian_every = check_positive_int(hessian_every, "hessian_every")
        self.explore = int(explore)
        self.generator = generator
        self.bank = ModeBank(bank_size, merge_radius=2.0 * self.merge_radius)
        self.num_hessian_evals = 0
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.prev: torch.Tensor | None = None
        self.cheap = False
        self._calm_calls = 0
        self._neg_hess: torch.Tensor | None = None  # -Hessian at each chain's main mode
        self._calls_since_hessian = 0

    # ------------------------------------------------------------------ helpers
    def _gen(self, y):
        if self.generator is None:
            self.generator = torch.Generator(device=y.device).manual_seed(0)
        return self.generator

    def seed_bank(self, x: torch.Tensor | None = None, generator: torch.Generator | None = None) -> None:
        """Explore the target's modes from the reference (or from the points ``x``) into the bank."""
        gen = generator if generator is not None else self.generator
        if gen is None:
            gen = torch.Generator().manual_seed(0)
        if x is None:
            if self.explore == 0:
                return
            x = self.target.sample_reference(self.explore, gen, gen.device)
        modes = explore_modes(self.target, x)
        self.num_hessian_evals += modes.num_hessian_evals
        self.bank.add(modes.modes, modes.precisions)

    # ------------------------------------------------------------------ the estimator
    def denoise(self, y: torch.Tensor, sigma: float) -> torch.Tensor:
        r""":math:`\mathbb E[X\mid y]` ``(n, dim)`` by steps 1 to 4 of the class docstring (or the cheap
        one-start estimator once switched); a chain with no finite fit gets NaN."""
        s2 = float(sigma) ** 2
        gen = self._gen(y)
        if self.prev is not None and self.prev.shape != y.shape:
            self.reset()
        if self.cheap and self.prev is not None:
            return self._cheap(y, s2)
        if len(self.bank) == 0 and self.explore > 0:
            self.seed_bank(generator=gen)
        means, log_ev, chol, decrement = self._fit_starts(y, s2, *self._starts(y, s2, gen))
        keep = merge_within(means, log_ev, chol, self.merge_radius) & torch.isfinite(log_ev)
        log_ev = torch.where(keep, log_ev, torch.full_like(log_ev, -math.inf))
        log_ev, log_r_var, is_ess = self._corrected_evidence(y, s2, means, log_ev, chol, keep)
        pi = torch.nan_to_num(torch.softmax(log_ev, -1), nan=0.0)  # (n, S)
        x_hat = (pi[..., None] * means).sum(1)
        x_hat = torch.where(keep.any(-1, keepdim=True), x_hat, torch.full_like(x_hat, math.nan))
        dev2 = ((means - x_hat[:, None]) ** 2).sum(-1)
        spread = torch.sqrt((pi**2 * dev2 * log_r_var).sum(-1) / y.shape[1])
        significant = (pi > 0.01) & keep
        num_modes = significant.sum(-1)
        self._remember(y, s2, pi, means, chol, significant & (decrement < 1.0), num_modes)
        # the IS ESS fraction of the fits, weighted by their posterior weight: near 1 where the
        # Laplace fits describe p(x | y); low where p(x | y) is far from Gaussian (the estimate of
        # E[X | y] is then biased, e.g. toward the joint mode in a funnel's neck) or where the
        # weight went to a fit the IS step did not check; 1 without IS (num_is=0: no check)
        fit_ess = torch.where(keep.any(-1), (pi * is_ess).sum(-1), torch.zeros_like(spread))
        self.last_info = {"spread": spread, "num_modes": num_modes.to(y.dtype), "fit_ess": fit_ess}
        return x_hat

    def _starts(self, y: torch.Tensor, s2: float, gen: torch.Generator):
        r"""``(near, fresh)``: ``(n, S_near, dim)`` starts at the chain's previous mode and the bank's
        modes (None if neither), and ``(n, num_fresh, dim)`` draws of :math:`\mathcal N(y, s^2 I)`
        (None if ``num_fresh = 0`` and there are near starts)."""
        n, d = y.shape
        near, fresh = [], None
        if self.prev is not None:
            near.append(self.prev[:, None])
        if len(self.bank) > 0:
            near.append(self.bank.modes.to(y)[None].expand(n, -1, -1))
        if self.num_fresh > 0 or not near:
            k = max(self.num_fresh, 1)
            eps = torch.randn(n, k, d, generator=gen, dtype=y.dtype, device=y.device)
            fresh = y[:, None] + math.sqrt(s2) * eps
        return (torch.cat(near, 1) if near else None), fresh

    def _fit_starts(self, y: torch.Tensor, s2: float, near, fresh):
        """Laplace fits ``(means (n, S, dim), log_ev (n, S), chol (n, S, dim, dim), decrement (n, S))``
        of all starts. Starts at known modes are fitted where they stand (the fit's Newton step moves
        the mean); fresh ones climb for ``newton_steps - 1`` moves first. A fit that overflowed (a
        start far in a tail, where log p or its Hessian is not finite) gets evidence -inf, so that it
        carries no weight."""
        (n, d), fits = y.shape, []
        for x0, steps in ((near, 1), (fresh, self.newton_steps)):
            if x0 is None:
                continue
            yy = y[:, None].expand_as(x0).reshape(-1, d)
            fit = damped_newton(self.target, x0.reshape(-1, d), yy, s2, min(steps, self.newton_steps))
            self.num_hessian_evals += fit.num_hessian_evals
            k = x0.shape[1]
            parts = (fit.mean, fit.log_evidence, fit.chol, fit.decrement)
            fits.append(tuple(t.reshape(n, k, *t.shape[1:]) for t in parts))
        means, log_ev, chol, decrement = (torch.cat(parts, 1) for parts in zip(*fits))
        finite = (
            torch.isfinite(means).all(-1) & torch.isfinite(log_ev) & torch.isfinite(chol).flatten(2).all(-1)
        )
        means = torch.where(finite[..., None], means, y[:, None])
        eye = torch.eye(d, dtype=y.dtype, device=y.device)
        chol = torch.where(finite[..., None, None], chol, eye / math.sqrt(s2))
        log_ev = torch.where(finite, log_ev, torch.full_like(log_ev, -math.inf))
        return means, log_ev, chol, decrement

    def _corrected_evidence(self, y, s2, means, log_ev, chol, keep):
        """``(log_ev, log_r_var, is_ess)``, each ``(n, S)``, after the IS correction of the fits with a
        Laplace weight above 1e-3 (the modes that matter), then of those that the correction handed
        such a weight (a bad Laplace fit between modes loses its overestimated evidence). Without IS
        (``num_is = 0``): the Laplace evidence, variance 0 and ESS fraction 1."""
        log_r_var, is_ess = torch.zeros_like(log_ev), torch.ones_like(log_ev)
        if self.num_is == 0:
            return log_ev, log_r_var, is_ess
        checked = keep & (torch.nan_to_num(torch.softmax(log_ev, -1), nan=0.0) > 1e-3)
        log_r, log_r_var, is_ess = self._is_correction(y, s2, means, log_ev, chol, checked)
        log_ev = log_ev + log_r
        late = keep & ~checked & (torch.nan_to_num(torch.softmax(log_ev, -1), nan=0.0) > 1e-3)
        if bool(late.any()):
            log_r2, var2, ess2 = self._is_correction(y, s2, means, log_ev, chol, late)
            log_ev = log_ev + log_r2
            log_r_var = torch.where(late, var2, log_r_var)
            is_ess = torch.where(late, ess2, is_ess)
        return log_ev, log_r_var, is_ess

    def _remember(self, y, s2, pi, means, chol, converged, num_modes) -> None:
        """Per-chain state for the next call: the main mode and its curvature (-H), the bank's new
        modes (from the ``converged`` significant fits) and the switch to the cheap estimator."""
        rows, best = torch.arange(y.shape[0], device=y.device), pi.argmax(-1)
        self.prev = means[rows, best]
        eye = torch.eye(y.shape[1], dtype=y.dtype, device=y.device)
        lo_best = chol[rows, best]
        self._neg_hess = lo_best @ lo_best.transpose(-1, -2) - eye / s2  # -H at each chain's main mode
        self._calls_since_hessian = 0
        self._bank_add(y, s2, means, chol, converged)
        frac_multi = (num_modes >= 2).to(y.dtype).mean()
        self._calm_calls = self._calm_calls + 1 if float(frac_multi) < self.cheap_fraction else 0
        if self._calm_calls >= self.cheap_patience:
            self.cheap = True

    def _bank_add(self, y, s2, means, chol, significant) -> None:
        r"""Offer the target modes near the converged significant local fits to the bank. A posterior mode
        :math:`m` has :math:`\nabla\log p(m) = (m - y)/s^2`, so one Newton step on :math:`\log p`
        alone, :math:`\mu = m + P^{-1}(m - y)/s^2` with :math:`P = A - s^{-2} I`, estimates the
        target's mode (exactly, for a Gaussian mode); fits where :math:`P` is not positive definite
        are not offered."""
        significant = significant & torch.isfinite(y).all(-1, keepdim=True)
        m = means[significant]
        if m.shape[0] == 0:
            return
        lo = chol[significant]
        eye = torch.eye(m.shape[1], dtype=m.dtype, device=m.device)
        prec = lo @ lo.transpose(-1, -2) - eye / s2
        lp_chol, info = torch.linalg.cholesky_ex(prec)
        ok = info == 0
        if not ok.any():
            return
        yy = y[:, None].expand_as(means)[significant]
        step, _ = chol_solve(lp_chol[ok], (m[ok] - yy[ok]) / s2)
        # a near-singular P sends the estimate far off (e.g. along a funnel's neck): offer only
        # finite estimates within the Newton cap of the posterior mode
        cap = MAX_STEP * math.sqrt(s2 * m.shape[1])
        good = torch.isfinite(step).all(-1) & (step.norm(dim=-1) <= cap)
        self.bank.add((m[ok] + step)[good], prec[ok][good])

    def _is_correction(self, y, s2, means, log_ev, chol, keep):
        r"""Per-mode IS factors :math:`\log \hat r_j` and their variances ``(n, S)``."""
        n, num_starts, d = means.shape
        k = self.num_is
        gen = self._gen(y)
        z = torch.randn(n, num_starts, d, k, generator=gen, dtype=y.dtype, device=y.device)
        # x = m + L^{-T} z ~ N(m, A^{-1})
        lt = chol.transpose(-1, -2)
        x = means[..., None] + torch.linalg.solve_triangular(lt, z, upper=True)  # (n, S, d, k)
        x = x.transpose(-1, -2)  # (n, S, k, d)
        # Laplace model of f at each draw: log E_j + log N(x; m_j, A_j^{-1}); the ratio is exactly
        # one for a Gaussian mode.
        log_det = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        log_q = (
            log_ev[..., None]
            - 0.5 * (z**2).sum(-2)
            - 0.5 * d * math.log(2 * math.pi)
            + 0.5 * log_det[..., None]
        )
        flat = x.reshape(-1, d)
        idx = keep[:, :, None].expand(n, num_starts, k).reshape(-1)
        log_f = torch.full((flat.shape[0],), -math.inf, dtype=y.dtype, device=y.device)
        if idx.any():
            pts = flat[idx]
            yy = y[:, None, None].expand(n, num_starts, k, d).reshape(-1, d)[idx]
            log_f[idx] = self.target.log_prob(pts).detach() - ((pts - yy) ** 2).sum(-1) / (2 * s2)
        log_f = log_f.reshape(n, num_starts, k)
        log_w = torch.where(keep[:, :, None], log_f - log_q, torch.zeros_like(log_f))
        log_w = torch.nan_to_num(log_w, nan=-math.inf)
        log_r = torch.logsumexp(log_w, -1) - math.log(k)
        rel = torch.exp(log_w - log_r[..., None])
        var = rel.var(-1, unbiased=True) / k if k > 1 else torch.zeros_like(log_r)
        log_r = torch.where(keep & torch.isfinite(log_r), log_r, torch.zeros_like(log_r))
        var = torch.where(keep, torch.nan_to_num(var, nan=0.0, posinf=0.0), torch.zeros_like(var))
        # Kish ESS fraction of the k draws: 1 where the local Gaussian is p(x | y) itself
        ess = ess_from_log_weights(log_w) / k
        # a fit left uncorrected (Laplace weight under 1e-3) is unchecked: 0, so that if the
        # correction of the others hands it the weight, fit_ess says the estimate is unchecked
        ess = torch.where(keep, torch.nan_to_num(ess, nan=0.0), torch.zeros_like(ess))
        return log_r, var, ess

    def _cheap(self, y: torch.Tensor, s2: float) -> torch.Tensor:
        """One Newton step on :math:`f` from each chain's previous mode, cached curvature."""
        x = self.prev
        if self._calls_since_hessian >= self.hessian_every or self._neg_hess is None:
            _, g, hess = log_prob_grad_hessian(self.target, x)
            self.num_hessian_evals += x.shape[0]
            self._neg_hess = -hess
            self._calls_since_hessian = 0
        else:
            _, g = self.target.log_prob_and_grad(x)
        self._calls_since_hessian += 1
        eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        chol = safe_cholesky(self._neg_hess + eye / s2, s2)
        step, _ = chol_solve(chol, g - (x - y) / s2)
        x_hat = torch.where(torch.isfinite(step).all(-1, keepdim=True), x + step, x)
        self.prev = x_hat
        n = y.shape[0]
        self.last_info = {
            "spread": torch.zeros(n, dtype=y.dtype, device=y.device),
            "num_modes": torch.ones(n, dtype=y.dtype, device=y.device),
        }
        return x_hat
