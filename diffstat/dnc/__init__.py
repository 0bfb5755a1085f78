"""Divide-and-conquer MCMC: split the data into shards, sample each sub-posterior (the prior to
the power 1/K times the shard's likelihood) independently, and combine the draws.

- :func:`combine`: ``ds.dnc.combine(subposteriors, method, *, scores, num_samples, seed)``.
- :mod:`~diffstat.dnc.shards`: sharding a data set, and the sub-posterior targets.
- :mod:`~diffstat.dnc.pipeline`: data -> shards -> per-shard sampling and model fitting on any
  ``concurrent.futures.Executor`` -> combined posterior (retries in :mod:`~diffstat.dnc.tasks`).

Layers, each importing only those before it: building blocks (``gaussian``, ``models``,
``options``, ``tasks``, ``shards``); algorithms (``consensus``, ``swiss``, ``semiparametric``,
``surrogate``, ``energy``, ``mode_weights``, ``exact_smc``, ``annealing``); the diffusion combiner
(``diffusion``); the front (``combine``); the pipeline (``pipeline``).
"""

from diffstat.dnc.combine import COMBINERS, combine
from diffstat.dnc.shards import SubPosterior, pyro_subposteriors, split_indices, subposteriors
from diffstat.dnc.pipeline import run_pipeline, sample_shards
from diffstat.dnc.tasks import ShardFailure, ShardResult, map_with_retries

__all__ = [
    "combine",
    "COMBINERS",
    "split_indices",
    "subposteriors",
    "SubPosterior",
    "pyro_subposteriors",
    "sample_shards",
    "run_pipeline",
    "ShardResult",
    "ShardFailure",
    "map_with_retries",
]
