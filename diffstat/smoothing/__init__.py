"""Samplers that walk on the Gaussian-smoothed target and jump with the empirical-Bayes denoiser.

- :mod:`diffstat.smoothing.scores`: the smoothed-score interface, exact closed forms and the
  training-free Laplace estimator with a shared mode bank; :mod:`~diffstat.smoothing.baselines`
  (importance sampling, MCMC) and :mod:`~diffstat.smoothing.learned` (a score network).
- :mod:`diffstat.smoothing.fit`: ``fit_smoothed_score(target)``, the learned score from the log-density
  (the default estimator), trained on a particle population of :mod:`~diffstat.smoothing.populations`.
- :mod:`diffstat.smoothing.correction`: the final MALA correction on p(x | y).
- :mod:`diffstat.smoothing.laplace`: Hessians, damped Newton, mode bank, mode exploration.
- :mod:`diffstat.smoothing.walk_jump`: walk-jump sampling (``method="walk_jump"``).
- :mod:`diffstat.smoothing.sms`: sequential (and joint) multimeasurement sampling (``method="sms"``).
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
