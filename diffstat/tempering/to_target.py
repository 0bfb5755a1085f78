r"""Adaptive tempering from a reference with a density to the target, ending in equally weighted,
moved draws: the driver shared by the D&C exact-product SMC (:mod:`diffstat.dnc.exact_smc`) and the
diffusion sampler's SMC bridge (:mod:`diffstat.diffusion.bridge`).

From exact draws of the path's reference, each stage is :func:`~diffstat.tempering.core.tempered_step`
to the next :math:`\beta` at conditional ESS ``target_ess`` (:func:`~diffstat.tempering.smc.next_beta`;
Zhou, Johansen and Aston 2016), resampling below ``resample_threshold``; the stage that reaches
:math:`\beta = 1` always resamples and then moves, so the draws are equally weighted and the
duplicates of that resampling are separated on the target itself. Unlike
:func:`~diffstat.tempering.smc.adaptive_tempered_smc`, the moves of each stage are asked for just
before it (``moves(final)``), so a caller can size them from what is left of a budget.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffstat.tempering.core import (
    MoveConfig,
    Preconditioner,
    StageInfo,
    TemperedState,
    init_tempered,
    tempered_step,
)
from diffstat.tempering.path import GeometricPath, default_step_size
from diffstat.tempering.smc import next_beta

__all__ = ["temper_to_target"]


def temper_to_target(
    generator: torch.Generator,
    path: GeometricPath,
    num_particles: int,
    *,
    moves: Callable[[bool], MoveConfig],
    precondition: Preconditioner,
    target_ess: float = 0.5,
    resample_threshold: float = 0.5,
    max_stages: int = 1000,
) -> tuple[TemperedState, list[StageInfo]]:
    """``num_particles`` draws of the path's reference tempered to the target (module docstring), MALA
    moves from :func:`~diffstat.tempering.path.default_step_size`; ``moves(final)`` gives each stage's
    moves (``final``: the stage reaching beta = 1). Stops after ``max_stages`` stages: the caller
    checks ``state.beta``. Returns the last state and the stages' infos."""
    x0 = path.sample_reference(num_particles, generator)
    state = init_tempered(path, x0, default_step_size("mala", path.dim))
    infos = []
    while float(state.beta) < 1.0 and len(infos) < max_stages:
        new_beta = next_beta(state.log_weights, state.particles.delta, state.beta, target_ess)
        final = bool(new_beta >= 1.0)
        state, info = tempered_step(
            generator,
            state,
            new_beta,
            path=path,
            moves=moves(final),
            precondition=precondition,
            stage=len(infos),
            resample_threshold=1.0 if final else resample_threshold,
        )
        infos.append(info)
    return state, infos
