r"""Sharding a data set and building the sub-posteriors.

With the data split into K shards :math:`y_{(1)}, \dots, y_{(K)}`, the k-th sub-posterior is

.. math::
    p_k(\theta) \propto p(\theta)^{1/K}\, p(y_{(k)} \mid \theta),

so that :math:`\prod_k p_k(\theta) \propto p(\theta)\, p(y \mid \theta)`, the full posterior.
Sub-posteriors come from a log-prior and a per-shard log-likelihood callable
(:func:`subposteriors`), or from a Pyro model whose data arguments are split along their first
axis (the plate), with every latent site's log-density scaled by 1/K (:func:`pyro_subposteriors`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from diffstat._util import check_positive_int
from diffstat.target import Target

__all__ = ["split_indices", "take_rows", "SubPosterior", "subposteriors", "pyro_subposteriors"]


def split_indices(
    num_rows: int, num_shards: int, *, seed: int, method: str = "random", strata=None
) -> list[np.ndarray]:
    """Row indices of each shard, a partition of ``range(num_rows)`` into near-equal parts.

    Parameters
    ----------
    num_rows, num_shards : int
    seed : int
        Seeds the permutation (a ``torch.Generator``): the same seed gives the same shards.
    method : {"random", "stratified", "contiguous"}
        ``"random"``: a random permutation cut into K parts. ``"stratified"``: rows grouped by
        ``strata`` (e.g. the 0/1 response of a logistic regression), each group shuffled and dealt
        round-robin, so every shard gets its share of every stratum (rare positives are spread
        evenly). ``"contiguous"``: rows in order (the convention of Trojan et al.'s toy problems).
    strata : array ``(num_rows,)``, optional
        Labels for ``"stratified"``.

    Returns
    -------
    list of K sorted integer arrays.
    """
    num_rows = check_positive_int(num_rows, "num_rows")
    num_shards = check_positive_int(num_shards, "num_shards")
    if num_shards > num_rows:
        raise ValueError(f"cannot split {num_rows} rows into {num_shards} non-empty shards")
    gen = torch.Generator().manual_seed(int(seed))
    if method == "contiguous":
        order = np.arange(num_rows)
        return [np.sort(part) for part in np.array_split(order, num_shards)]
    if method == "random":
        order = torch.randperm(num_rows, generator=gen).numpy()
        return [np.sort(part) for part in np.array_split(order, num_shards)]
    if method == "stratified":
        if strata is None:
            raise ValueError("method='stratified' needs strata, one label per row")
        labels = np.asarray(strata).reshape(-1)
        if labels.shape[0] != num_rows:
            raise ValueError(f"strata has {labels.shape[0]} labels for {num_rows} rows")
        # shuffle, then stable-sort by label: rows grouped by stratum, random within each
        shuffled = torch.randperm(num_rows, generator=gen).numpy()
        order = shuffled[np.argsort(labels[shuffled], kind="stable")]
        offset = int(torch.randint(0, num_shards, (1,), generator=gen))
        shard_of = (np.arange(num_rows) + offset) % num_shards  # round-robin deal
        return [np.sort(order[shard_of == k]) for k in range(num_shards)]
    raise ValueError(f"method must be 'random', 'stratified' or 'contiguous', got {method!r}")


def take_rows(data, rows: np.ndarray) -> tuple[torch.Tensor, ...]:
    """The rows ``rows`` of each array in ``data`` (a tensor/array or a tuple of them, all with the
    same first dimension), as a tuple of tensors."""
    arrays = data if isinstance(data, (tuple, list)) else (data,)
    index = torch.as_tensor(rows, dtype=torch.long)
    return tuple(torch.as_tensor(np.asarray(a) if not torch.is_tensor(a) else a)[index] for a in arrays)


def _num_rows(data) -> int:
    arrays = data if isinstance(data, (tuple, list)) else (data,)
    sizes = {int(np.shape(a)[0]) for a in arrays}
    if len(sizes) != 1:
        raise ValueError(f"all data arrays must have the same number of rows, got sizes {sorted(sizes)}")
    return sizes.pop()


class SubPosterior:
    r"""The picklable log-density :math:`\theta \mapsto \tfrac1K \log p(\theta) + \log
    p(y_{(k)} \mid \theta)` of one shard.

    Parameters
    ----------
    log_prior : callable ``(n, dim) -> (n,)``
    log_likelihood : callable ``(theta (n, dim), data) -> (n,)``
    data : tuple of tensors, the shard's rows.
    num_shards : int
        K; the prior is raised to the power 1/K.
    """

    def __init__(self, log_prior: Callable, log_likelihood: Callable, data: tuple, num_shards: int):
        self.log_prior = log_prior
        self.log_likelihood = log_likelihood
        self.data = data
        self.num_shards = check_positive_int(num_shards, "num_shards")

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        return self.log_prior(theta) / self.num_shards + self.log_likelihood(theta, self.data)


def subposteriors(
    log_prior: Callable,
    log_likelihood: Callable,
    data,
    dim: int,
    num_shards: int,
    *,
    seed: int,
    method: str = "random",
    strata=None,
    dtype: torch.dtype = torch.float64,
    name: str = "x",
) -> list[Target]:
    r"""K sub-posterior targets :math:`p(\theta)^{1/K} p(y_{(k)} \mid \theta)` of a data set.

    Parameters
    ----------
    log_prior : callable ``theta (n, dim) -> (n,)``
    log_likelihood : callable ``(theta (n, dim), data_k) -> (n,)``, summing over the shard's rows;
        ``data_k`` is a tuple of tensors (the shard's rows of each array of ``data``).
    data : array/tensor or tuple of them, one row per observation.
    dim, num_shards : int
    seed, method, strata
        How to shard (:func:`split_indices`).

    Returns
    -------
    list of K :class:`~diffstat.Target` (picklable when the callables are module-level), each with
    attributes ``rows`` (the shard's row indices) and ``shard``.
    """
    num_rows = _num_rows(data)
    parts = split_indices(num_rows, num_shards, seed=seed, method=method, strata=strata)
    targets = []
    for k, rows in enumerate(parts):
        target = Target(
            SubPosterior(log_prior, log_likelihood, take_rows(data, rows), num_shards),
            dim,
            name=name,
            dtype=dtype,
        )
        target.rows, target.shard = rows, k
        targets.append(target)
    return targets


class _ScaleLatents:
    """Runs a Pyro model with every latent (unobserved) sample site's log-density scaled by
    ``scale``: the prior raised to the power 1/K."""

    def __init__(self, model: Callable, scale: float):
        self.model, self.scale = model, float(scale)
        self.__name__ = getattr(model, "__name__", "model")

    def __call__(self, *args, **kwargs):
        from pyro.poutine.messenger import Messenger

        scale = self.scale

        class _Scale(Messenger):
            def _process_message(self, msg):
                if msg["type"] == "sample" and not msg["is_observed"]:
                    msg["scale"] = scale * msg["scale"]

        with _Scale():
            return self.model(*args, **kwargs)


def pyro_subposteriors(
    model: Callable,
    num_shards: int,
    *,
    data: dict,
    seed: int,
    method: str = "random",
    strata=None,
    **model_kwargs,
) -> list[Target]:
    r"""K sub-posterior targets of a Pyro model (``Target.from_pyro``).

    Parameters
    ----------
    model : callable
        A Pyro model taking its data as keyword arguments, vectorised over a plate on the data's
        first axis (the plate's size taken from the data it is given).
    num_shards : int
    data : dict name -> array
        The model's data arguments, split along their first axis (same length for all).
    seed, method, strata
        How to shard (:func:`split_indices`).
    **model_kwargs
        Further keyword arguments passed unchanged to every shard's model.

    Returns
    -------
    list of K PyroTargets; each latent site's log-density is scaled by 1/K, each shard sees its
    rows of ``data``.
    """
    if not isinstance(data, dict) or not data:
        raise ValueError("data must be a non-empty dict of the model's data arguments")
    names = list(data)
    num_rows = _num_rows([data[n] for n in names])
    parts = split_indices(num_rows, num_shards, seed=seed, method=method, strata=strata)
    scaled = _ScaleLatents(model, 1.0 / num_shards)
    targets = []
    for k, rows in enumerate(parts):
        shard_data = dict(zip(names, take_rows([data[n] for n in names], rows)))
        target = Target.from_pyro(scaled, **shard_data, **model_kwargs)
        target.rows, target.shard = rows, k
        targets.append(target)
    return targets
