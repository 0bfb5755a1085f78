r"""A bank of Laplace modes from the pilot, and the guidance it gives along the noised path.

Bank
----
Each pilot end point :math:`z` (whitened) takes :data:`NUM_NEWTON` Newton steps on
:math:`\log\pi_z` whose isotropic curvature :math:`c` is measured by a secant along a trial step
(two evaluations a step; exact for an isotropic Gaussian mode, whose centre it then lands on),
keeping the best point. Candidates are merged greedily (highest log-density first) when closer
than :data:`MERGE_RADIUS` typical radii :math:`\sqrt{d/c}`. Each mode then gets its Hessian
:math:`H` by forward differences of the gradient (``dim`` evaluations) and one full Newton step,
and carries its Laplace mass :math:`L = \log\pi_z(m) + \tfrac d2\log 2\pi - \tfrac12\log\det H`:
the bank is the mixture :math:`\hat\pi_z = \sum_j e^{L_j}\mathcal N(m_j, H_j^{-1})`.

Guidance
--------
The noised marginals of a Gaussian mixture are closed-form, so the bank's exact :math:`g_t` is

.. math:: \log g^{\rm bank}_t(x) = \log\sum_j e^{L_j}\,\mathcal N(x; a m_j, a^2 H_j^{-1} + \lambda I)
          - \log\mathcal N(x; 0, I),

free of target evaluations. The guidance multiplies it by the power guidance
(:mod:`~diffstat.diffusion.noised_smc_path`) of the residual :math:`r = g / g^{\rm bank}_0`:

.. math:: \log\hat g_t(x) = \log g^{\rm bank}_t(x) + \beta_t\,[\log g(a x) - \log g^{\rm bank}_0(a x)],

exact at :math:`\lambda = 0` (:math:`\hat g_0 = g`), exact at every noise level for a Gaussian
mixture the bank has found, and the power guidance where the bank is empty; a mode the pilot
missed still shows through the residual, brought in gradually by :math:`\beta_t` (with
:math:`\beta_t = 1` the residual of a missed mode is hundreds of nats at once and the weights
collapse: GMM-40 lost 16 of 40 modes). Rationale: the mode weights along the path come from the
bank's Laplace masses instead of from :math:`g(a x)`, whose intermediate mode weights are far from
the target's when modes are narrow (a heavy narrow mode falls to a fraction of a percent at mid
noise and is lost).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from diffstat.modes.laplace import laplace_log_mass

__all__ = ["ModeBank", "bank_log_g", "build_mode_bank"]

#: Candidates closer than this many typical radii sqrt(d / c) of the better one are one mode.
MERGE_RADIUS = 0.5
#: Curvature bounds (whitened units): scales between 0.01 and 10.
CURVATURE_BOUNDS = (1e-2, 1e4)
#: Secant-Newton steps per pilot point: one is exact for an isotropic Gaussian mode; more bring in
#: points that ended their pilot chain between modes.
NUM_NEWTON = 3
#: Most modes kept (by log-density at the mode) is this over d^2, at least 16: the guidance costs
#: n * J * d^2 per evaluation (32 modes in d = 32, where 128 took minutes per run).
MAX_MODES_TIMES_D2 = 2**15
#: Largest Good-Turing mass of unseen modes for which the bank is used (a tenth: the rest of the
#: target still reaches the particles through the residual guidance).
MAX_UNSEEN = 0.1
#: Modes whose Laplace mass is this many nats below the largest are dropped.
MASS_FLOOR = 30.0


class ModeBank(NamedTuple):
    """Modes ``means (J, dim)`` (whitened), their covariances :math:`H^{-1}` as eigenvectors
    ``evecs (J, dim, dim)`` (columns) and eigenvalues ``evals (J, dim)``, and Laplace log masses
    ``log_mass (J,)``."""

    means: torch.Tensor
    evecs: torch.Tensor
    evals: torch.Tensor
    log_mass: torch.Tensor


def _newton(log_pi_and_grad, z, lp, grad):
    """One secant-Newton step per point (module docstring); the best of the three points, their
    log-densities, gradients and the secant curvatures."""
    n, d = z.shape
    lo, hi = CURVATURE_BOUNDS
    c0 = ((grad**2).sum(-1) / d).clamp(lo, hi)  # score identity |grad|^2 = d c at a draw
    trial = grad / c0.unsqueeze(-1)
    lp1, grad1 = log_pi_and_grad(z + trial)
    sq = (trial**2).sum(-1).clamp_min(torch.finfo(z.dtype).tiny)
    curv = torch.nan_to_num(-((grad1 - grad) * trial).sum(-1) / sq, nan=lo).clamp(lo, hi)
    newton = z + grad / curv.unsqueeze(-1)
    lp2, grad2 = log_pi_and_grad(newton)
    lps = torch.nan_to_num(torch.stack([lp, lp1, lp2]), nan=-math.inf)
    best, rows = lps.argmax(0), torch.arange(n, device=z.device)
    pick = lambda *ts: torch.stack(ts)[best, rows]
    return pick(z, z + trial, newton), lps[best, rows], pick(grad, grad1, grad2), curv


def build_mode_bank(
    log_pi_and_grad,
    z: torch.Tensor,
    lp: torch.Tensor,
    grad: torch.Tensor,
    num_newton: int = NUM_NEWTON,
    max_modes: int | None = None,
) -> tuple[ModeBank, float]:
    r"""The bank from points ``z (n, dim)`` with :math:`\log\pi_z` ``lp (n,)`` and gradient ``grad
    (n, dim)``; ``log_pi_and_grad`` evaluates both at new points (``2 n`` per Newton step, then
    ``dim + 1`` per mode for its Hessian by forward differences of the gradient and a full Newton
    step, after which candidates that met at a centre are merged again). Candidates with a flat or
    convex direction, or whose next Newton step would still be longer than one typical radius, are
    not modes and are dropped. Modes with the ``max_modes`` largest log-densities are kept (default
    :data:`MAX_MODES_TIMES_D2` over ``dim`` squared).

    Also returns the Good-Turing estimate of the mass of modes the points never reached: the share
    of points that are alone in their mode (Good 1953). The bank is empty when that exceeds
    :data:`MAX_UNSEEN` or when there are more modes than ``max_modes``: it would then hold a small
    part of the target, and between its modes the residual guidance is hundreds of nats (many-well
    in d = 32: 2^16 modes, a bank of 32, log Z off by -232)."""
    d = z.shape[1]
    max_modes = max(16, MAX_MODES_TIMES_D2 // d**2) if max_modes is None else max_modes
    m, lpm, g, curv = _newton(log_pi_and_grad, z, lp, grad)  # the first secant sets the merge radius
    for _ in range(num_newton - 1):
        m, lpm, g, _ = _newton(log_pi_and_grad, m, lpm, g)
    kept, _ = _merge(m, lpm, curv)
    # Good-Turing mass of modes not seen, counted with the kept points' radii: a unimodal but
    # anisotropic target leaves its Newton points scattered beyond the tight radii
    counts = _merge(m, lpm, curv, tight=False)[1]
    unseen = sum(c == 1 for c in counts) / max(sum(counts), 1)
    if unseen > MAX_UNSEEN or len(kept) > max_modes:
        return _empty(m), unseen
    keep = torch.tensor(kept, device=z.device, dtype=torch.long)
    m, lpm, g, curv = m[keep], lpm[keep], g[keep], curv[keep]
    hess = _hessian(log_pi_and_grad, m, g, curv)
    evals, evecs = torch.linalg.eigh(hess)
    lo, hi = CURVATURE_BOUNDS
    peaked = evals[:, 0] > lo  # a flat or convex direction: no mode here
    evals = evals.clamp(lo, hi)

    def newton(grad):  # H^{-1} grad
        return torch.einsum("jab,jb->ja", evecs, torch.einsum("jba,jb->ja", evecs, grad) / evals)

    step = newton(g)
    lp_new, g_new = log_pi_and_grad(m + step)
    better = torch.nan_to_num(lp_new, nan=-math.inf) > lpm
    m, lpm = torch.where(better.unsqueeze(-1), m + step, m), torch.where(better, lp_new, lpm)
    g = torch.where(better.unsqueeze(-1), g_new, g)
    # a centre: the remaining Newton step is within one typical radius (grad' H^{-1} grad < d)
    settled = peaked & ((g * newton(g)).sum(-1) < d)
    m, lpm, evals, evecs = m[settled], lpm[settled], evals[settled], evecs[settled]
    if m.shape[0] == 0:  # no mode (a funnel's neck has none): an empty bank
        return _empty(m), unseen
    again, _ = _merge(m, lpm, evals.mean(-1))  # now at the centres
    again = torch.tensor(again, device=z.device, dtype=torch.long)
    m, lpm, evals, evecs = m[again], lpm[again], evals[again], evecs[again]
    log_mass = laplace_log_mass(lpm, evals)
    ok = log_mass > log_mass.max() - MASS_FLOOR
    return ModeBank(m[ok], evecs[ok], 1.0 / evals[ok], log_mass[ok]), unseen


def _empty(like: torch.Tensor) -> ModeBank:
    d = like.shape[1]
    return ModeBank(like.new_zeros(0, d), like.new_zeros(0, d, d), like.new_zeros(0, d), like.new_zeros(0))


def _hessian(log_pi_and_grad, m: torch.Tensor, g: torch.Tensor, curv: torch.Tensor) -> torch.Tensor:
    r""":math:`-\nabla^2\log\pi_z` at each mode ``(J, d, d)``, by forward differences of the gradient
    over a step of 1e-4 mode sds (float64; 1e-2 in lower precision), symmetrised."""
    J, d = m.shape
    rel = 1e-4 if m.dtype == torch.float64 else 1e-2
    eps = rel / torch.sqrt(curv)  # (J,)
    eye = torch.eye(d, dtype=m.dtype, device=m.device)
    pts = (m.unsqueeze(1) + eps[:, None, None] * eye).reshape(J * d, d)
    _, gp = log_pi_and_grad(pts)
    hess = -(gp.reshape(J, d, d) - g.unsqueeze(1)) / eps[:, None, None]
    return torch.nan_to_num(0.5 * (hess + hess.transpose(1, 2)))


def _merge(
    m: torch.Tensor, lpm: torch.Tensor, curv: torch.Tensor, tight: bool = True
) -> tuple[list[int], list[int]]:
    """Greedy merge, highest log-density first: the indices of the points kept as modes, and how
    many points each absorbed (itself included). Distances are in typical radii of the smaller of
    the two radii (``tight``) or of the kept point's."""
    d = m.shape[1]
    keep: list[int] = []
    counts: list[int] = []
    for i in torch.argsort(lpm, descending=True).tolist():  # a host loop over a few thousand points
        if not math.isfinite(float(lpm[i])):
            continue
        if keep:
            k = torch.tensor(keep, device=m.device)
            c = torch.maximum(curv[k], curv[i]) if tight else curv[k]  # tight: a flat point absorbs nothing
            near = (((m[k] - m[i]) ** 2).sum(-1) * c / d) < MERGE_RADIUS**2
            if bool(near.any()):
                counts[int(torch.nonzero(near)[0])] += 1
                continue
        keep.append(i)
        counts.append(1)
    return keep, counts


def bank_log_g(bank: ModeBank, x: torch.Tensor, rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`\log g^{\rm bank}_t(x)` ``(n,)`` and its gradient ``(n, dim)`` at :math:`a^2` = ``rho``:
    mode ``j`` noised is :math:`\mathcal N(a m_j, a^2 C_j + \lambda I)`, diagonal in ``C_j``'s eigenbasis."""
    d = x.shape[-1]
    a = torch.sqrt(rho)
    var = a**2 * bank.evals + (1.0 - rho)  # (J, d)
    proj = torch.einsum("nd,jde->nje", x, bank.evecs) - a * torch.einsum("jd,jde->je", bank.means, bank.evecs)
    log_comp = bank.log_mass - 0.5 * (proj**2 / var).sum(-1) - 0.5 * torch.log(2 * math.pi * var).sum(-1)
    resp = torch.softmax(log_comp, -1)  # (n, J)
    grad = -torch.einsum("nje,jde->nd", resp.unsqueeze(-1) * proj / var, bank.evecs) + x
    log_ref = -0.5 * (x**2).sum(-1) - 0.5 * d * math.log(2 * math.pi)
    return torch.logsumexp(log_comp, -1) - log_ref, grad
