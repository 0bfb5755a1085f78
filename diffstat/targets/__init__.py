"""Benchmark targets with exact answers (log normalisers, draws, moments, smoothed scores)."""

from diffstat.targets.mixture import GaussianMixture

__all__ = ["GaussianMixture"]
