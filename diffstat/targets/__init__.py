"""Benchmark targets with exact answers (log normalisers, draws, moments, smoothed scores)."""

from diffstat.targets.mixture import GaussianMixture

__all__ = ["GaussianMixture"]

from diffstat.targets.banana import BananaMixture, banana_mixture
from diffstat.targets.funnel import Funnel
from diffstat.targets.gmm40 import gmm40, nine_modes
from diffstat.targets.logistic import LogisticRegression, ionosphere, load_dataset, sonar
from diffstat.targets.manywell import ManyWell
from diffstat.targets.two_modes import narrow_wide, two_modes

__all__ += [
    "Funnel",
    "ManyWell",
    "two_modes",
    "narrow_wide",
    "nine_modes",
    "gmm40",
    "BananaMixture",
    "banana_mixture",
    "LogisticRegression",
    "ionosphere",
    "sonar",
    "load_dataset",
]

from diffstat.targets.conjugate import GammaPrecision, NormalNormal

__all__ += ["NormalNormal", "GammaPrecision"]

from diffstat.targets.randhie import load_randhie, randhie_poisson

__all__ += ["load_randhie", "randhie_poisson"]
