"""Benchmark targets with exact answers (log normalisers, draws, moments, smoothed scores)."""

from diffstat.targets.mixture import GaussianMixture
from diffstat.targets.banana import BananaMixture, banana_mixture
from diffstat.targets.funnel import Funnel
from diffstat.targets.gmm40 import gmm40, nine_modes
from diffstat.targets.logistic import LogisticRegression, ionosphere, load_dataset, sonar
from diffstat.targets.manywell import ManyWell
from diffstat.targets.two_modes import narrow_wide, two_modes
from diffstat.targets.conjugate import GammaPrecision, NormalNormal
from diffstat.targets.randhie import load_randhie, randhie_poisson

__all__ = [
    "GaussianMixture",
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
    "NormalNormal",
    "GammaPrecision",
    "load_randhie",
    "randhie_poisson",
]
