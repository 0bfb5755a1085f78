"""Samplers that walk on the Gaussian-smoothed target and jump with the empirical-Bayes denoiser.

- Smoothed scores: the interface (:mod:`~diffstat.smoothing.base`), the front that picks one
  (:mod:`~diffstat.smoothing.scores`), the training-free Laplace estimator with a shared mode bank
  (:mod:`~diffstat.smoothing.laplace_score`, on the Hessians, damped Newton, mode bank and mode
  exploration of :mod:`~diffstat.modes.laplace` and :mod:`~diffstat.smoothing.laplace`), the baselines
  (:mod:`~diffstat.smoothing.baselines`) and a score network (:mod:`~diffstat.smoothing.learned`),
  fitted from the log-density by :mod:`~diffstat.smoothing.fit` (the default estimator) on a
  particle population of :mod:`~diffstat.smoothing.populations` (NUTS chains:
  :mod:`~diffstat.smoothing.mcmc_population`), and checked on held-out particles
  (:mod:`~diffstat.smoothing.fisher_check`).
- Kernels: the Langevin walks (:mod:`~diffstat.smoothing.walks`), the one adaptive MALA runner
  (:mod:`~diffstat.smoothing.adaptive_mala`) and the final MALA correction on p(x | y)
  (:mod:`~diffstat.smoothing.correction`); SMS's measurement steps
  (:mod:`~diffstat.smoothing.measurements`) and noise defaults (:mod:`~diffstat.smoothing.geometry`).
- Samplers: walk-jump (:mod:`~diffstat.smoothing.walk_jump`, ``method="walk_jump"``) and sequential
  (and joint) multimeasurement sampling (:mod:`~diffstat.smoothing.sms`, ``method="sms"``).
"""

from diffstat.smoothing.baselines import ImportanceSmoothedScore, MCMCSmoothedScore
from diffstat.smoothing.fit import fit_smoothed_score
from diffstat.smoothing.learned import LearnedSmoothedScore
from diffstat.smoothing.populations import Population
from diffstat.smoothing.scores import (
    ExactSmoothedScore,
    LaplaceSmoothedScore,
    SmoothedScore,
    isotropic_mixture_smoothed_score,
    resolve_smoothed_score,
)
from diffstat.smoothing.sms import conditional_score, default_noise, sms
from diffstat.smoothing.walk_jump import walk_jump

__all__ = [
    "SmoothedScore",
    "ExactSmoothedScore",
    "LaplaceSmoothedScore",
    "ImportanceSmoothedScore",
    "MCMCSmoothedScore",
    "LearnedSmoothedScore",
    "fit_smoothed_score",
    "Population",
    "resolve_smoothed_score",
    "isotropic_mixture_smoothed_score",
    "conditional_score",
    "default_noise",
    "sms",
    "walk_jump",
]
