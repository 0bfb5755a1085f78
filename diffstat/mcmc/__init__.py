"""MCMC building blocks: kernels as pure steps (RWM, MALA, HMC, NUTS, Langevin) and adaptation."""

from diffstat.mcmc.adaptation import DualAveraging, WelfordCovariance, WelfordVariance
from diffstat.mcmc.chees import ChEESAdaptation, jittered_hmc_step
from diffstat.mcmc.base import MCMCInfo, MCMCState, init, metropolis_accept
from diffstat.mcmc.hmc import hmc_step, leapfrog
from diffstat.mcmc.langevin import UnderdampedState, ula_step, underdamped_init, underdamped_step
from diffstat.mcmc.mala import mala_step
from diffstat.mcmc.metric import DenseMetric
from diffstat.mcmc.nuts import NUTSInfo, nuts_step
from diffstat.mcmc.rwm import rwm_step
from diffstat.mcmc.start import find_start

__all__ = [
    "DenseMetric",
    "MCMCState",
    "MCMCInfo",
    "init",
    "metropolis_accept",
    "rwm_step",
    "mala_step",
    "hmc_step",
    "nuts_step",
    "NUTSInfo",
    "leapfrog",
    "ula_step",
    "UnderdampedState",
    "underdamped_init",
    "underdamped_step",
    "DualAveraging",
    "WelfordVariance",
    "WelfordCovariance",
    "jittered_hmc_step",
    "ChEESAdaptation",
    "find_start",
]
