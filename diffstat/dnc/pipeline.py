r"""The divide-and-conquer pipeline: shards -> per-shard sampling -> per-shard model fit -> combine.

Every shard is sampled independently by any diffstat sampler, on any
``concurrent.futures.Executor`` (a local process pool by default;
``dask.distributed.Client(...).get_executor()`` to spread shards over a cluster). The sampler's
draws are kept in the target's unconstrained coordinates together with the log-density and its
gradient at each draw (evaluated at the draws: the samplers do not return them), which the
diffusion combiner's target score matching needs.

Fault tolerance (:mod:`diffstat.dnc.tasks`): a shard whose task raises, or whose worker dies, is
resubmitted (same seed, so the same draws) up to ``max_retries`` times; :class:`ShardFailure`
carries every finished :class:`ShardResult`, and ``sample_shards(..., completed=err.completed)``
resumes with only the missing shards. The sampler's name and declared options, and the combiner's,
are checked before any shard is submitted; an exception of the user's log-density reaches the user
with its own type and message.

Checkpoints (``checkpoint_dir=``): every shard task writes its result to
``checkpoint_dir/shard_<k>.pt`` (atomically: a temporary file, then a rename) before it returns,
and a task whose file exists returns it without sampling. A result that was finished on a worker
that then dies, before the client fetched it, is therefore not recomputed when Dask reruns the
task, and a later call (or a restarted client) with the same directory runs only the missing
shards. On several machines the directory must be on a file system that every worker and the
client see (NFS, a cluster scratch disk); the seeds make a recomputed shard identical anyway.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import socket
import time

import numpy as np
import torch

from diffstat._util import check_options, check_positive_int
from diffstat.dnc.combine import check_combiner, combine
from diffstat.dnc.tasks import ShardFailure, ShardResult, check_max_retries, map_with_retries

__all__ = [
    "check_sampler",
    "ShardResult",
    "ShardFailure",
    "sample_one_shard",
    "sample_shards",
    "map_with_retries",
    "run_pipeline",
    "shard_seeds",
    "load_checkpoints",
]


def shard_seeds(seed: int, num_shards: int) -> list[int]:
    """Independent per-shard seeds derived from one seed (numpy ``SeedSequence.spawn``)."""
    children = np.random.SeedSequence(int(seed)).spawn(num_shards)
    return [int(c.generate_state(1, dtype=np.uint32)[0]) for c in children]


def _checkpoint_path(checkpoint_dir, shard: int, seed: int) -> str:
    return os.path.join(os.fspath(checkpoint_dir), f"shard_{shard}_seed_{seed}.pt")


def load_checkpoints(checkpoint_dir, seeds: list[int]) -> dict[int, ShardResult]:
    """The shards whose results ``checkpoint_dir`` holds (for these seeds): shard -> ShardResult."""
    if checkpoint_dir is None:
        return {}
    found = {}
    for k, s in enumerate(seeds):
        path = _checkpoint_path(checkpoint_dir, k, s)
        if os.path.exists(path):
            found[k] = torch.load(path, weights_only=False)
    return found


def check_sampler(method: str, options: dict) -> None:
    """``ValueError`` for an unknown shard sampler, listing the valid ones, or for an option the
    sampler declares it does not take: checked before any shard is submitted."""
    from diffstat.sampling import available_methods, method_options

    methods = available_methods()
    if method not in methods:
        raise ValueError(f"unknown shard sampler {method!r}; available: {', '.join(methods)}")
    allowed = method_options(method)
    if allowed is not None:
        check_options(options, allowed, method)


def _probe(target, num_chains, seed: int, init=None) -> None:
    """Evaluate the shard's log-density and gradient where an MCMC sampler starts: at ``init`` if
    given, else at the reference draws it would take (from a generator of its own: the sampler's
    draws do not change). An exception of the user's code reaches the caller as it was raised,
    where the samplers' input validation would re-word it as a dimension mismatch. Not counted in
    ``num_target_evals``, like the target's validation at construction."""
    if init is not None:
        x = torch.as_tensor(init, dtype=target.dtype)
        if x.dim() not in (1, 2) or x.shape[-1] != target.dim:
            return  # the sampler refuses a misshapen init with its own message
        x = x.reshape(-1, target.dim)
    else:
        x = target.sample_reference(
            4 if num_chains is None else num_chains, torch.Generator().manual_seed(int(seed))
        )
    target.log_prob_and_grad(x)


def sample_one_shard(
    target,
    method: str,
    shard: int,
    num_samples: int,
    num_chains,
    seed: int,
    options: dict,
    worker_threads: int | None = 1,
    checkpoint_dir=None,
) -> ShardResult:
    """Sample one sub-posterior (runs in a worker). Calls the registered sampler directly so the
    draws stay in unconstrained coordinates, then evaluates log-density and gradient at them.
    With ``checkpoint_dir``, a result already there is returned as it is, and a new one is written
    there (module notes)."""
    if checkpoint_dir is not None:
        path = _checkpoint_path(checkpoint_dir, shard, seed)
        if os.path.exists(path):
            return torch.load(path, weights_only=False)
        result = sample_one_shard(
            target, method, shard, num_samples, num_chains, seed, options, worker_threads
        )
        tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
        torch.save(result, tmp)
        os.replace(tmp, path)  # atomic: a reader never sees half a file
        return result
    if worker_threads is not None:
        torch.set_num_threads(int(worker_threads))
    sampler = _registered(method)
    _probe(target, num_chains, seed, options.get("init"))
    generator = torch.Generator().manual_seed(int(seed))
    evals0, start = target.num_target_evals, time.perf_counter()
    result = sampler(
        target, num_samples=num_samples, num_chains=num_chains, generator=generator, progress=False,
        device=torch.device("cpu"), **options,
    )  # fmt: skip
    draws = result.draws.reshape(-1, result.draws.shape[-1]).detach()
    log_probs, scores = target.log_prob_and_grad(draws)
    elapsed = time.perf_counter() - start
    acc = result.sample_stats.get("acceptance_rate")
    acc = float(torch.as_tensor(acc).float().mean()) if acc is not None else float("nan")
    worker = f"{socket.gethostname()}:{os.getpid()}"
    evals = int(target.num_target_evals - evals0)
    return ShardResult(shard, draws, scores, log_probs, evals, elapsed, acc, worker=worker)


def _registered(method: str):
    """The sampler registered as ``method``, loading the MCMC samplers alone when it is one of them."""
    import diffstat.mcmc.sampler  # noqa: F401 - registers the MCMC samplers without loading the rest
    from diffstat.sampling import _REGISTRY, _load_samplers

    if method not in _REGISTRY:
        _load_samplers()
    if method not in _REGISTRY:
        raise ValueError(f"unknown shard sampler {method!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[method]


def sample_shards(
    targets: list,
    method: str = "mala",
    *,
    num_samples: int,
    seed: int,
    num_chains: int | None = None,
    executor: cf.Executor | None = None,
    max_retries: int = 2,
    completed: dict[int, ShardResult] | None = None,
    progress: bool = True,
    worker_threads: int | None = 1,
    checkpoint_dir: str | os.PathLike | None = None,
    **options,
) -> list[ShardResult]:
    """Sample every sub-posterior in ``targets`` on ``executor``; return the results in shard order.

    Parameters
    ----------
    targets : list of K Targets (picklable: module-level callables, see :mod:`diffstat.dnc.shards`)
    method : str
        Any ``ds.sample`` method (``"mala"``, ``"hmc"``, ...); checked before any shard is submitted.
    num_samples, num_chains : int
        Per shard, as in ``ds.sample``.
    seed : int
        Shard k uses ``shard_seeds(seed, K)[k]``, whichever worker runs it and however often.
    executor : concurrent.futures.Executor, optional
        Default: a ``ProcessPoolExecutor`` with ``min(K, cpu_count)`` workers, shut down at the end.
    max_retries : int
        Resubmissions of a failing shard before giving up.
    completed : dict shard -> ShardResult, optional
        Finished shards from an earlier call (``ShardFailure.completed``): not run again.
    worker_threads : int or None
        ``torch.set_num_threads`` in the worker (None leaves it).
    checkpoint_dir : path, optional
        Every finished shard is written there by its worker and never sampled again, by this call
        or a later one with the same directory and seed (module notes); it is created if missing.
    **options
        Options of the sampler.

    Raises
    ------
    ShardFailure
        If a shard still fails after ``max_retries`` retries; it carries every finished result and
        is chained to the shard's own exception.
    """
    if not targets:
        raise ValueError("targets must be a non-empty list of sub-posterior Targets")
    num_samples = check_positive_int(num_samples, "num_samples")
    max_retries = check_max_retries(max_retries)
    check_sampler(method, options)
    seeds = shard_seeds(seed, len(targets))
    if checkpoint_dir is not None:
        os.makedirs(checkpoint_dir, exist_ok=True)
        completed = {**load_checkpoints(checkpoint_dir, seeds), **(completed or {})}
    args = [
        (target, method, k, num_samples, num_chains, seeds[k], options, worker_threads, checkpoint_dir)
        for k, target in enumerate(targets)
    ]
    with _executor(executor, len(targets)) as pool:
        return map_with_retries(
            pool, sample_one_shard, args, max_retries=max_retries, completed=completed,
            progress=progress, desc=f"shards ({method})",
        )  # fmt: skip


@contextlib.contextmanager
def _executor(executor: cf.Executor | None, num_tasks: int):
    """``executor`` as it is, or a ``ProcessPoolExecutor`` of ``min(num_tasks, cpu_count)`` workers,
    shut down on leaving the ``with`` block."""
    if executor is not None:
        yield executor
        return
    pool = cf.ProcessPoolExecutor(max_workers=max(1, min(num_tasks, os.cpu_count() or 1)))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True)


def run_pipeline(
    targets: list,
    combiner: str = "diffusion",
    *,
    num_samples: int,
    seed: int,
    sampler: str = "mala",
    shard_samples: int = 1000,
    num_chains: int | None = None,
    executor: cf.Executor | None = None,
    max_retries: int = 2,
    sampler_options: dict | None = None,
    combine_options: dict | None = None,
    log_probs: str | None = "exact",
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
):
    r"""From sub-posterior targets to the combined posterior.

    Samples every shard (:func:`sample_shards`), then combines with ``ds.dnc.combine(combiner)``,
    passing the stored scores; for ``"diffusion"`` the per-shard model fits also run on
    ``executor``.

    Parameters
    ----------
    targets : list of K sub-posterior Targets (:func:`~diffstat.dnc.shards.subposteriors`).
    combiner : str
        A method of :func:`~diffstat.dnc.combine`.
    num_samples : int
        Combined draws.
    shard_samples : int
        Draws per chain on each shard.
    log_probs : {"exact", "draws", None}
        What ``"diffusion"`` is given besides the shards' draws and scores (ignored by the other
        combiners). ``"exact"`` (the default): the shards' own log-densities; its draws are then
        those of an SMC to their exact sum, the full posterior (:mod:`diffstat.dnc.exact_smc`),
        which stays right when the shards disagree or are skewed, at the cost of evaluating every
        shard at every particle a few times, in this process. ``"draws"``: only the log-densities
        at the shards' draws; each shard's energy is a damped cubic fitted to the values and scores
        there (:mod:`diffstat.dnc.surrogate`), with no further call of a shard's log-density
        (approximately right while the product lies within a few shard sds of each shard's draws
        and the shards are unimodal). ``None``: learned energy-based diffusion models fitted to the
        draws and scores (Trojan et al.), biased where the product lies in the shards' tails
        (``docs/dnc.md`` has the figures). The default is the only route that is consistent
        whatever the shards; an input of the same name in ``combine_options`` takes precedence.
    checkpoint_dir : path, optional
        Shard results are written there and never recomputed (:func:`sample_shards`).

    The sampler, the combiner and their options are checked (``ValueError``) before any shard runs.

    Returns
    -------
    (arviz.InferenceData, list of ShardResult)
        The combined posterior (attrs add ``shard_num_target_evals``, ``shard_sampling_time``
        (the sum over shards) and ``max_shard_attempts``) and the per-shard results.
    """
    sampler_options = dict(sampler_options or {})
    check_sampler(sampler, sampler_options)
    options = dict(combine_options or {})
    if log_probs not in _LOG_PROB_ROUTES:
        raise ValueError(f"log_probs must be one of {_LOG_PROB_ROUTES}, got {log_probs!r}")
    check_combiner(combiner, {**_DIFFUSION_INPUTS, **options} if combiner == "diffusion" else options)
    with _executor(executor, len(targets)) as pool:
        results = sample_shards(
            targets, sampler, num_samples=shard_samples, seed=seed, num_chains=num_chains, executor=pool,
            max_retries=max_retries, progress=progress, checkpoint_dir=checkpoint_dir, **sampler_options,
        )  # fmt: skip
        if combiner == "diffusion":
            inputs = _diffusion_inputs(pool, max_retries, targets, results, log_probs)
            options = {**inputs, **options}
        idata = combine(
            [r.draws for r in results], combiner, scores=[r.scores for r in results],
            num_samples=num_samples, seed=seed, progress=progress, **options,
        )  # fmt: skip
    idata.posterior.attrs["shard_num_target_evals"] = int(sum(r.num_target_evals for r in results))
    idata.posterior.attrs["shard_sampling_time"] = float(sum(r.sampling_time for r in results))
    idata.posterior.attrs["max_shard_attempts"] = int(max(r.attempts for r in results))
    idata.posterior.attrs["shard_sampler"] = sampler
    return idata, results


#: What the pipeline may hand to the diffusion combiner besides the user's ``combine_options``.
_DIFFUSION_INPUTS = dict.fromkeys(("executor", "max_retries", "log_probs", "draw_log_probs"))
#: The values of ``run_pipeline(..., log_probs=)``.
_LOG_PROB_ROUTES = ("exact", "draws", None)


def _diffusion_inputs(executor, max_retries, targets, results, log_probs) -> dict:
    """The diffusion combiner's fits run on the pipeline's executor; with ``log_probs="exact"`` it
    gets the shards' log-densities, with ``"draws"`` their values at the draws, with None neither
    (``draw_log_probs=None`` says so explicitly: no route is taken from the inputs)."""
    inputs = dict(executor=executor, max_retries=max_retries, draw_log_probs=None)
    if log_probs == "exact":
        inputs["log_probs"] = [t.log_prob_and_grad for t in targets]
    elif log_probs == "draws":
        inputs["draw_log_probs"] = [r.log_probs for r in results]
    return inputs
