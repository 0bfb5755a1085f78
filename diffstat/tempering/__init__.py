"""Tempering baselines with log-evidence: annealed importance sampling (``"ais"``), SMC with
adaptive tempering (``"smc"``) and parallel tempering (``"pt"``), all along the geometric path
from a reference to the target (:mod:`diffstat.tempering.path`), with resampling schemes in
:mod:`diffstat.tempering.resampling`. Importing this package registers the three samplers."""

from diffstat.tempering import resampling
from diffstat.tempering.ais import ais, schedule
from diffstat.tempering.path import GeometricPath, PathState, incremental_log_weights, move, tempered_state
from diffstat.tempering.pt import parallel_tempering
from diffstat.tempering.smc import adaptive_tempered_smc, next_beta
from diffstat.tempering.smc_sampler import smc_sampler

__all__ = [
    "GeometricPath",
    "PathState",
    "tempered_state",
    "incremental_log_weights",
    "move",
    "resampling",
    "ais",
    "schedule",
    "adaptive_tempered_smc",
    "next_beta",
    "smc_sampler",
    "parallel_tempering",
]
