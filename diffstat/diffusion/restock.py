r"""Restock every banked mode evenly with local MALA chains (step 2 of the diffusion sampler,
:mod:`diffstat.diffusion.sampler`; the modes come from :func:`~diffstat.diffusion.modes.explore_modes`).

A score model fitted to the explored particles learns the modes in proportion to how many chains
happened to end in each (a handful in a narrow mode); :func:`balance_modes` gives every mode the same
number of particles, with their gradients, for score matching. Measured on the 10-d
narrow-heavy/wide-light mixture, training on the raw explored particles fails and balancing makes
it work (REFERENCES.md). The chains adapt one step size and one diagonal preconditioner per mode,
batched over all chains of all modes.
"""

from __future__ import annotations

import torch

from diffstat._util import check_positive_int
from diffstat.diffusion.modes import ModeBank
from diffstat.mcmc.adaptation import DualAveraging
from diffstat.mcmc.base import MCMCState
from diffstat.mcmc.mala import MALA_TARGET_ACCEPT, mala_step

__all__ = ["balance_modes"]


def balance_modes(
    target,
    bank: ModeBank,
    generator: torch.Generator,
    *,
    chains_per_mode: int = 128,
    num_steps: int = 40,
    keep_every: int = 4,
) -> ModeBank:
    r"""Restock every mode with ``chains_per_mode`` local MALA chains started from its particles.

    One step size per mode is adapted by dual averaging toward acceptance 0.574 over the first
    half, with a diagonal preconditioner per mode (the relative variances of that mode's chains)
    from the first quarter on. The states of the second half, every ``keep_every`` steps, are
    kept: each mode then holds ``chains_per_mode * ceil(num_steps / (2 keep_every))`` particles,
    labelled by the mode their chain started in, with their gradients. The centres are kept.
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
    state = MCMCState(bank.x[start], bank.log_prob[start], bank.grad[start])
    count = torch.full((k,), float(chains_per_mode), dtype=dt, device=dev)
    spread = torch.zeros(k, dtype=dt, device=dev).index_add_(
        0, bank.label, (bank.x - bank.centers[bank.label]).pow(2).mean(-1)
    )
    spread = spread / bank.counts().to(dt)
    adapt = DualAveraging((0.5 * spread).clamp(1e-4, 1.0), MALA_TARGET_ACCEPT)
    inv_mass = torch.ones(k, target.dim, dtype=dt, device=dev)
    kept = []
    for i in range(num_steps):
        h = adapt.step_size if i < num_steps // 2 else adapt.final_step_size
        state, info = mala_step(generator, state, target.log_prob_and_grad, h[mode], inv_mass[mode])
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
            kept.append(state)
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
