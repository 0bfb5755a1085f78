"""Diffusion toolkit: noising processes, score and energy networks, score-matching losses,
training with EMA, and reverse-time samplers.

The ``method="diffusion"`` sampler (``diffstat.diffusion.sampler``) is built on these parts; it is
imported by the ``ds.sample`` front when needed, not here.

Layout, parts first: ``processes`` (VP, VE), ``networks``, ``losses``, ``train_config`` and
``training`` (an ``init``/``step`` pair over an optimiser state, and its driver), ``model_io``
(save and load), ``reverse`` (reverse-time samplers); the diffusion sampler's ``modes`` (finding
and banking modes, on :mod:`diffstat.modes`), ``restock`` (restocking the modes evenly),
``gaussians`` and ``proposals`` (importance proposals with exact densities), ``importance``
(judging and pooling rounds), ``bridge`` (the SMC correction where the rounds are unreliable),
``sampler_config`` (its options), ``rounds`` (``init``/``step`` of one round), ``sampler`` (the
driver) and ``sampler_output`` (assembling its output); PDDS in ``noised_smc`` with its
``noised_smc_*`` parts.
"""

from diffstat.diffusion.losses import (
    dsm_loss,
    implicit_score_matching_loss,
    mixed_loss,
    sliced_score_matching_loss,
    tsm_loss,
)
from diffstat.diffusion.networks import EnergyMLP, ScoreMLP
from diffstat.diffusion import noised_smc  # noqa: F401  (registers ds.sample(..., "pdds"))
from diffstat.diffusion.processes import VE, VP, noised_mixture_score, process_from_dict
from diffstat.diffusion.reverse import (
    annealed_langevin,
    ddpm_ancestral,
    euler_maruyama,
    predictor_corrector,
    probability_flow,
    probability_flow_log_prob,
)
from diffstat.diffusion.training import TrainConfig, TrainResult, load_model, save_model, train_score_model

__all__ = [
    "VP",
    "VE",
    "process_from_dict",
    "noised_mixture_score",
    "ScoreMLP",
    "EnergyMLP",
    "dsm_loss",
    "tsm_loss",
    "mixed_loss",
    "sliced_score_matching_loss",
    "implicit_score_matching_loss",
    "TrainConfig",
    "TrainResult",
    "train_score_model",
    "save_model",
    "load_model",
    "probability_flow",
    "probability_flow_log_prob",
    "euler_maruyama",
    "predictor_corrector",
    "annealed_langevin",
    "ddpm_ancestral",
]
