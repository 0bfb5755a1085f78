"""posteriordb real posteriors, ported to Pyro, with their reference moments.

37 posteriors of posteriordb (github.com/stan-dev/posteriordb, commit 28f8d3d6e9, BSD 3-Clause:
``LICENCE.md`` beside this file), all of those with reference draws except the two ODE models. The
data and the reference are in the package (``data/``); nothing is read from elsewhere.

>>> from diffstat import posteriordb
>>> post = posteriordb.load("kidiq-kidscore_momhs")
>>> idata = ds.sample(post.target, "mala", num_samples=1000, seed=0)   # doctest: +SKIP
>>> post.compare(idata).max_mean_error                                   # doctest: +SKIP

Reference moments are the mean and sd of all 10,000 reference draws (10 Stan NUTS chains, thinned)
per scalar parameter, named as in Stan (``beta[2]``, ``sigma``); ``reference_draws`` is a thinned
subset (1,000 draws, float32) for checks that need draws.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import torch

from diffstat.posteriordb.models import BUILDERS

__all__ = ["SOURCE_COMMIT", "Comparison", "Posterior", "data", "flatten", "load", "names"]

_DIR = Path(__file__).parent / "data"
_INDEX_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\[([0-9, ]+)\])?$")


@cache
def _index() -> dict:
    return json.loads((_DIR / "index.json").read_text())


@cache
def _npz(file: str) -> dict[str, np.ndarray]:
    with np.load(_DIR / file, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


SOURCE_COMMIT = _index()["source_commit"]


def names() -> list[str]:
    """Names of the ported posteriors (``"<data>-<model>"`` as in posteriordb)."""
    return sorted(_index()["posteriors"])


def _check_name(name: str) -> dict:
    info = _index()["posteriors"].get(name)
    if info is None:
        raise ValueError(f"unknown posterior {name!r}; available: {', '.join(names())}")
    return info


def data(name: str) -> dict[str, np.ndarray]:
    """A copy of the data set of posterior ``name`` (field -> float64 array), to inspect or perturb."""
    prefix = _check_name(name)["data"] + "/"
    return {k[len(prefix) :]: v.copy() for k, v in _npz("data.npz").items() if k.startswith(prefix)}


def _split_name(flat_name: str) -> tuple[str, tuple[int, ...]]:
    """``"beta[2]"`` -> ``("beta", (1,))`` (zero-based); ``"sigma"`` -> ``("sigma", ())``."""
    m = _INDEX_RE.match(flat_name)
    if m is None:
        raise ValueError(f"cannot parse parameter name {flat_name!r}")
    index = tuple(int(i) - 1 for i in m.group(2).split(",")) if m.group(2) else ()
    return m.group(1), index


def flatten(values, param_names: list[str]) -> dict[str, np.ndarray]:
    """Scalar draws named as in Stan from site values.

    ``values``: an ``InferenceData`` (its ``posterior`` group), or a mapping site -> array of shape
    ``(*lead, *site_shape)``. Returns name -> ``(*lead,)`` for each of ``param_names``.
    """
    post = getattr(values, "posterior", values)
    out = {}
    for flat_name in param_names:
        site, index = _split_name(flat_name)
        if site not in post:
            raise ValueError(f"no site {site!r} in the draws (sites: {sorted(post.keys())})")
        a = np.asarray(post[site])
        out[flat_name] = a[(Ellipsis, *index)] if index else a
    return out


@dataclass
class Comparison:
    """Draws against the reference, per parameter: ``mean_error`` = |mean - ref mean| / ref sd and
    ``sd_error`` = |sd / ref sd - 1|, with the worst of each."""

    mean_error: dict[str, float]
    sd_error: dict[str, float]
    max_mean_error: float = field(init=False)
    max_sd_error: float = field(init=False)
    worst_mean: str = field(init=False)
    worst_sd: str = field(init=False)

    def __post_init__(self):
        self.worst_mean = max(self.mean_error, key=self.mean_error.get)
        self.worst_sd = max(self.sd_error, key=self.sd_error.get)
        self.max_mean_error = self.mean_error[self.worst_mean]
        self.max_sd_error = self.sd_error[self.worst_sd]

    def passed(self, mean_tol: float = 0.15, sd_tol: float = 0.15) -> bool:
        """Whether every mean is within ``mean_tol`` reference sds and every sd within ``sd_tol``."""
        return bool(self.max_mean_error <= mean_tol and self.max_sd_error <= sd_tol)


class Posterior:
    """One posteriordb posterior: its Pyro model, data, target and reference.

    Attributes
    ----------
    name, model_name, data_name : str
    param_names : list of str
        Scalar parameters in Stan's naming, in the reference's order.
    reference_moments : dict
        name -> ``(mean, sd)`` over all 10,000 reference draws, constrained space.
    reference_draws : np.ndarray
        ``(1000, len(param_names))`` float32: every 10th draw of each reference chain.
    model, model_args
        The Pyro model and its arguments (``model(*model_args)``).
    target : diffstat.Target
        ``ds.Target.from_pyro(model, *model_args, dtype=dtype)``: sampling in unconstrained space.
    """

    def __init__(self, name: str, *, dtype: torch.dtype = torch.float64, data_override: dict | None = None):
        from diffstat.target import Target

        info = _check_name(name)
        self.name, self.model_name, self.data_name = name, info["model"], info["data"]
        ref = _npz("reference.npz")
        self.param_names = [str(s) for s in ref[f"{name}/names"]]
        mean, sd = ref[f"{name}/mean"], ref[f"{name}/sd"]
        self.reference_moments = {k: (float(m), float(s)) for k, m, s in zip(self.param_names, mean, sd)}
        self.reference_draws = ref[f"{name}/draws"]
        self.model, self.model_args = BUILDERS[self.model_name](
            data_override if data_override is not None else data(name)
        )
        self.target = Target.from_pyro(self.model, *self.model_args, dtype=dtype)

    def flatten(self, values) -> dict[str, np.ndarray]:
        """Stan-named scalar draws from an ``InferenceData`` or site -> array (see :func:`flatten`)."""
        return flatten(values, self.param_names)

    def reference_sites(self, draws: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """The reference draws (or ``draws: (n, len(param_names))`` in the same order) as site
        values ``{site: (n, *site_shape)}``, ready for ``target.unconstrain``."""
        draws = self.reference_draws if draws is None else np.asarray(draws)
        out = {}
        for site, s in self.target.sites.items():
            out[site] = torch.zeros((draws.shape[0],) + s.shape, dtype=torch.float64)
        for j, flat_name in enumerate(self.param_names):
            site, index = _split_name(flat_name)
            out[site][(slice(None), *index)] = torch.as_tensor(draws[:, j], dtype=torch.float64)
        return out

    def compare(self, values) -> Comparison:
        """Per-parameter |mean error| / reference sd and relative sd error of the given draws."""
        flat = self.flatten(values)
        mean_err, sd_err = {}, {}
        for k, (m, s) in self.reference_moments.items():
            a = np.asarray(flat[k], dtype=np.float64).reshape(-1)
            mean_err[k] = float(abs(a.mean() - m) / s)
            sd_err[k] = float(abs(a.std(ddof=1) / s - 1.0))
        return Comparison(mean_err, sd_err)

    def __repr__(self) -> str:
        return f"Posterior({self.name}: {len(self.param_names)} parameters, dim={self.target.dim})"


def load(name: str, *, dtype: torch.dtype = torch.float64, data: dict | None = None) -> Posterior:
    """The posterior ``name`` (see :func:`names`); ``data`` replaces its data set (e.g. a perturbed
    copy of :func:`data`), ``dtype`` is the target's float type."""
    return Posterior(name, dtype=dtype, data_override=data)
