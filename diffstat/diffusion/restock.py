r"""Restock every banked mode evenly with local MALA chains (step 2 of the diffusion sampler,
:mod:`diffstat.diffusion.sampler`; the modes come from :func:`~diffstat.diffusion.modes.explore_modes`).

A score model fitted to the explored particles learns the modes in proportion to how many chains
happened to end in each (a handful in a narrow mode); :func:`balance_modes` gives every mode the same
number of particles, with their gradients, for score matching. Measured on the 10-d
narrow-heavy/wide-light mixture, training on the raw explored particles fails and balancing makes
it work (REFERENCES.md). The chains adapt one step size and one diagonal preconditioner per mode,
batched over all chains of all modes.

The chains run in each mode's own frame :math:`x = c_k + L_k y` (:func:`laplace_frames`: :math:`c_k`
the peak of a few Newton steps from the mode's centre, :math:`L_k L_k^\top` the inverse of the negative
Hessian there), where a mode's curvature is its own. A diagonal preconditioner cannot follow a
posterior whose covariance has condition number :math:`10^5` and correlations near 1 (a collinear
regression, ``docs/diffusion_collinear.md``): its step size is set by the narrowest direction, the
chains do not move along the widest in 40 steps, and the moment Gaussians fitted to them were a
thousand times too narrow in variance there; in the Laplace frame the same target has unit scales.
Where the Hessian is not negative definite (or too many modes, too many dimensions, a pooled bank) a
mode keeps the identity frame, which is the plain diagonal scheme.
"""

from __future__ import annotations

import torch

from diffstat._util import check_positive_int
from diffstat.diffusion.modes import MAX_UNSEEN, ModeBank
from diffstat.mcmc.adaptation import DualAveraging
from diffstat.mcmc.base import MCMCState
from diffstat.mcmc.mala import MALA_TARGET_ACCEPT, mala_step
from diffstat.modes.laplace import newton_ascent

__all__ = ["balance_modes", "laplace_frames"]

#: Monotone Newton steps from each mode's centre before its Laplace frame (as the bridge's Laplace fit).
FRAME_NEWTON_STEPS = 10
#: Most modes, and largest dimension, given a Laplace frame: a Hessian costs ``dim`` backward passes
#: per mode and ``dim^2`` memory (the bridge's Laplace limits).
FRAME_MAX_MODES, FRAME_MAX_DIM = 64, 256


def laplace_frames(target, bank: ModeBank) -> tuple[torch.Tensor, torch.Tensor] | None:
    r"""Per mode, the centre ``(K, dim)`` and lower factor ``(K, dim, dim)`` of its Laplace frame:
    ``FRAME_NEWTON_STEPS`` monotone Newton steps (:func:`~diffstat.modes.laplace.newton_ascent`,
    proximal scale 100 times the largest variance of the mode's particles) from its centre, then the
    peak of the quadratic model there and the Cholesky factor of the inverse negative Hessian. A mode
    whose Hessian is not negative definite (or whose peak is not finite) keeps its centre and the
    identity. None for a pooled bank, more than ``FRAME_MAX_MODES`` modes or more than
    ``FRAME_MAX_DIM`` dimensions. Counts ``FRAME_NEWTON_STEPS + 1`` evaluations per mode."""
    k, d = bank.centers.shape
    if bank.unseen_mass > MAX_UNSEEN or k > FRAME_MAX_MODES or d > FRAME_MAX_DIM:
        return None
    var = torch.zeros(k, d, dtype=bank.x.dtype, device=bank.x.device).index_add_(
        0, bank.label, (bank.x - bank.centers[bank.label]) ** 2
    )
    s2 = 100.0 * float((var / bank.counts().clamp_min(1)[:, None].to(var)).max().clamp_min(1e-12))
    with torch.no_grad():
        m, lp, g, hess = newton_ascent(target, bank.centers, s2, FRAME_NEWTON_STEPS)
    prec_chol, info = torch.linalg.cholesky_ex(-hess)
    eye = torch.eye(d, dtype=bank.x.dtype, device=bank.x.device).expand(k, d, d)
    # a failed factor can hold a zero pivot, on which cholesky_inverse raises (a Laplace density's
    # Hessian is 0 off its kinks): such modes invert the identity instead and are masked out below
    prec_chol = torch.where((info == 0)[:, None, None], prec_chol, eye)
    m = m + torch.cholesky_solve(g.unsqueeze(-1), prec_chol).squeeze(-1)  # the quadratic model's peak
    chol, info2 = torch.linalg.cholesky_ex(torch.cholesky_inverse(prec_chol))
    ok = (info == 0) & (info2 == 0) & torch.isfinite(chol).flatten(1).all(-1) & torch.isfinite(m).all(-1)
    return torch.where(ok[:, None], m, bank.centers), torch.where(ok[:, None, None], chol, eye)


def balance_modes(
    target,
    bank: ModeBank,
    generator: torch.Generator,
    *,
    chains_per_mode: int = 128,
    num_steps: int = 40,
    keep_every: int = 4,
    frames: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> ModeBank:
    r"""Restock every mode with ``chains_per_mode`` local MALA chains started from its particles.

    One step size per mode is adapted by dual averaging toward acceptance 0.574 over the first
    half, with a diagonal preconditioner per mode (the relative variances of that mode's chains)
    from the first quarter on. The states of the second half, every ``keep_every`` steps, are
    kept: each mode then holds ``chains_per_mode * ceil(num_steps / (2 keep_every))`` particles,
    labelled by the mode their chain started in, with their gradients. The centres are kept.
    ``frames``: per mode a centre ``(K, dim)`` and factor ``(K, dim, dim)`` (:func:`laplace_frames`);
    the chains then run on :math:`y = L_k^{-1}(x - c_k)` (module notes); None: the identity.
    """
    chains_per_mode = check_positive_int(chains_per_mode, "chains_per_mode")
    num_steps = check_positive_int(num_steps, "num_steps")
    keep_every = check_positive_int(keep_every, "keep_every")
    evals0 = target.num_target_evals
    k, dev, dt = bank.num_modes, bank.x.device, bank.x.dtype
    mode = torch.arange(k, device=dev).repeat_interleave(chains_per_mode)
    start = torch.empty_like(mode)
    for i in range(k):  # a loop over modes (few), not over chains
        rows = torch.nonzero(bank.label == i).flatten()
        pick = torch.randint(
            0, rows.numel(), (chains_per_mode,), generator=generator, device=generator.device
        )
        start[mode == i] = rows[pick.to(dev)]
    to_y, from_y, log_prob_and_grad = _frame(target, frames, mode)
    state = MCMCState(bank.x[start], bank.log_prob[start], bank.grad[start])
    rel = bank.x - bank.centers[bank.label]
    if frames is not None:  # the chains start from their particles in their mode's frame
        state = MCMCState(to_y(state.x, mode), state.log_prob, _grad_y(state.grad, frames[1], mode))
        rel = to_y(bank.x, bank.label)
    count = torch.full((k,), float(chains_per_mode), dtype=dt, device=dev)
    spread = torch.zeros(k, dtype=dt, device=dev).index_add_(0, bank.label, rel.pow(2).mean(-1))
    spread = spread / bank.counts().to(dt)
    adapt = DualAveraging((0.5 * spread).clamp(1e-4, 1.0), MALA_TARGET_ACCEPT)
    inv_mass = torch.ones(k, target.dim, dtype=dt, device=dev)
    kept = []
    for i in range(num_steps):
        h = adapt.step_size if i < num_steps // 2 else adapt.final_step_size
        state, info = mala_step(generator, state, log_prob_and_grad, h[mode], inv_mass[mode])
        if i < num_steps // 2:
            adapt.update(
                torch.zeros(k, dtype=dt, device=dev).index_add_(0, mode, info.acceptance_rate) / count
            )
        if i == num_steps // 4:
            mean = (
                torch.zeros(k, target.dim, dtype=dt, device=dev).index_add_(0, mode, state.x) / count[:, None]
            )
            var = (
                torch.zeros(k, target.dim, dtype=dt, device=dev).index_add_(
                    0, mode, (state.x - mean[mode]) ** 2
                )
                / count[:, None]
            )
            inv_mass = (var / var.mean(-1, keepdim=True).clamp_min(1e-12)).clamp(1e-3, 1e3)
            adapt.restart(adapt.final_step_size)
        if i >= num_steps // 2 and (num_steps - 1 - i) % keep_every == 0:
            kept.append(from_y(state))
    x = torch.cat([s.x for s in kept])
    return ModeBank(
        x,
        torch.cat([s.log_prob for s in kept]),
        torch.cat([s.grad for s in kept]),
        mode.repeat(len(kept)),
        bank.centers,
        bank.center_log_prob,
        bank.num_evals + target.num_target_evals - evals0,
        bank.unseen_mass,
        bank.support,
    )


def _frame(target, frames, mode: torch.Tensor):
    r"""The maps of the chains' frames :math:`x = c_k + L_k y` (``mode (n,)`` the chains' modes):
    ``to_y(x, modes)``, ``from_y(state)`` (a state in ``x`` with :math:`\nabla_x = L_k^{-\top}\nabla_y`)
    and the log-density with its gradient :math:`\nabla_y = L_k^\top \nabla_x` in ``y`` (the
    constant Jacobian leaves MALA's acceptance unchanged). ``frames`` None: the identity maps, with
    ``to_y`` relative to the bank's centres only for the initial spread. A loop over modes (few):
    the factors are never gathered per chain."""
    if frames is None:
        return None, lambda state: state, target.log_prob_and_grad
    centers, chols = frames

    def per_mode(v, modes, fn):
        out = torch.empty_like(v)
        for i in range(centers.shape[0]):
            rows = modes == i
            if bool(rows.any()):
                out[rows] = fn(v[rows], i)
        return out

    def to_y(x, modes):
        return per_mode(
            x, modes, lambda v, i: torch.linalg.solve_triangular(chols[i], (v - centers[i]).T, upper=False).T
        )

    def from_x(y):
        return per_mode(y, mode, lambda v, i: centers[i] + v @ chols[i].T)

    def log_prob_and_grad(y):
        lp, g = target.log_prob_and_grad(from_x(y))
        return lp, _grad_y(g, chols, mode)

    def from_y(state):
        g = per_mode(
            state.grad, mode, lambda v, i: torch.linalg.solve_triangular(chols[i].T, v.T, upper=True).T
        )
        return MCMCState(from_x(state.x), state.log_prob, g)

    return to_y, from_y, log_prob_and_grad


def _grad_y(grad: torch.Tensor, chols: torch.Tensor, mode: torch.Tensor) -> torch.Tensor:
    r""":math:`\nabla_y = L_k^\top\nabla_x` per row of ``grad (n, dim)`` (mode ``mode (n,)``)."""
    out = torch.empty_like(grad)
    for i in range(chols.shape[0]):  # a loop over modes (few)
        rows = mode == i
        out[rows] = grad[rows] @ chols[i]
    return out
