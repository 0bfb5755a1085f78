"""diffstat: Bayesian computation with diffusion-based samplers.

>>> import diffstat as ds
>>> target = ds.Target(lambda x: -0.5 * (x**2).sum(-1), dim=2)
>>> idata = ds.sample(target, "mala", num_samples=1000, seed=0, progress=False)
"""

from diffstat._version import __version__
from diffstat.diagnostics import diagnose
from diffstat.sampling import available_methods, register_sampler, sample
from diffstat.target import Target

__all__ = [
    "__version__",
    "Target",
    "sample",
    "available_methods",
    "register_sampler",
    "diagnose",
    "dnc",
    "metrics",
    "targets",
    "posteriordb",
]


def __getattr__(name):
    # Subpackages load on first use, so `import diffstat` stays light.
    if name in ("dnc", "metrics", "targets", "diffusion", "tempering", "smoothing", "mcmc", "posteriordb"):
        import importlib

        return importlib.import_module(f"diffstat.{name}")
    raise AttributeError(f"module 'diffstat' has no attribute {name!r}")
