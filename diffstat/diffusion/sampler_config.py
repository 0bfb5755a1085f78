"""The options of the diffusion sampler (``method="diffusion"`` and ``"gaussian_is"``) as one frozen
dataclass, validated once where it is built, so the rounds (:mod:`diffstat.diffusion.rounds`) read
checked fields instead of threading keyword arguments. Each option's meaning and the reason for its
default are documented with the method, :func:`diffstat.diffusion.sampler.diffusion`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffstat._util import check_positive_int, check_probability

__all__ = ["DiffusionConfig"]


@dataclass(frozen=True)
class DiffusionConfig:
    """The options of ``method="diffusion"`` and ``"gaussian_is"``, validated once; the meaning
    and the reason for each default are in :func:`diffstat.diffusion.sampler.diffusion`.
    ``use_diffusion=False`` gives per-mode Gaussian importance sampling (no score model)."""

    use_diffusion: bool = True
    num_explore: int = 2000
    smc_explore: int = 256
    explore_steps: int = 20
    screen_ratio: int = 36
    screen_steps: int = 2
    start_scales: tuple = (0.5, 1.0, 2.0, 4.0)
    chains_per_mode: int = 128
    restock_steps: int = 40
    num_proposals: int = 4096
    final_proposals: int | None = None
    diffusion_weight: float = 0.9
    inflate: float = 1.2
    ode_steps: int = 50
    hidden: int = 128
    depth: int = 3
    train_steps: int = 2000
    refit_steps: int = 500
    batch_size: int = 256
    lr: float = 1e-3
    refresh_chains: int = 256
    refresh_steps: int = 20
    gaussian_rounds: int = 1
    max_rounds: int = 3
    target_ess: float = 0.3
    per_mode_models: bool | None = None
    max_mode_models: int = 4
    gaussian_fallback: bool = True
    held_out: int = 512
    t_max: float = 0.6
    whiten: str | None = None
    refresh_keep_every: int = 1
    train_on_restarts: bool = True
    reference: torch.distributions.Distribution | None = None
    prior_scale: float = 1.0
    bridge: bool = True
    max_evals: int = 1_000_000
    bridge_particles: int | None = None
    bridge_moves: int | None = None

    def __post_init__(self):
        for name in ("num_proposals", "max_rounds", "ode_steps", "train_steps", "held_out"):
            check_positive_int(getattr(self, name), name)
        object.__setattr__(
            self, "target_ess", check_probability(self.target_ess, "target_ess", open_interval=False)
        )
        if self.whiten not in (None, "full", "diag"):
            raise ValueError(f"whiten must be None, 'full' or 'diag', got {self.whiten!r}")
        if not 0.0 < self.t_max <= 1.0:
            raise ValueError(f"t_max must lie in (0, 1], got {self.t_max}")
        check_positive_int(self.refresh_keep_every, "refresh_keep_every")
        if self.smc_explore != 0:  # 0 switches the SMC seeds off
            check_positive_int(self.smc_explore, "smc_explore")
        check_positive_int(self.screen_ratio, "screen_ratio")  # 1: no screening
        check_positive_int(self.screen_steps, "screen_steps")
        if self.final_proposals is not None:
            check_positive_int(self.final_proposals, "final_proposals")
        check_positive_int(self.max_evals, "max_evals")
        particles = self.bridge_particles
        if particles is not None and check_positive_int(particles, "bridge_particles") < 2:
            raise ValueError(f"bridge_particles must be at least 2, got {self.bridge_particles}")
        if self.bridge_moves is not None and int(self.bridge_moves) < 0:
            raise ValueError(f"bridge_moves must be non-negative, got {self.bridge_moves}")
        if self.use_diffusion:
            check_probability(self.diffusion_weight, "diffusion_weight")

    def round_size(self, r: int) -> int:
        """Proposals in round ``r`` (0-based): ``final_proposals`` in the last round, when given."""
        last = r + 1 == self.max_rounds and self.final_proposals is not None
        return int(self.final_proposals if last else self.num_proposals)
