r"""The divide-and-conquer pipeline: shards -> per-shard sampling -> per-shard model fit -> combine.

Every shard is sampled independently by any diffstat sampler, on any
``concurrent.futures.Executor`` (a local process pool by default;
``dask.distributed.Client(...).get_executor()`` to spread shards over a cluster). The sampler's
draws are kept in the target's unconstrained coordinates together with the log-density and its
gradient at each draw (evaluated at the draws: the samplers do not return them), which the
diffusion combiner's target score matching needs.

Fault tolerance: a shard whose task raises (or whose worker process dies: Dask reports it as
``KilledWorker`` or reschedules it itself) is resubmitted (same seed, so the same draws) up to
``max_retries`` times, each failure reported by a warning and recorded. Results are collected as
they finish, so a shard that fails for good never costs the finished ones: :class:`ShardFailure`
carries every finished :class:`ShardResult`, and ``sample_shards(..., completed=err.completed)``
resumes with only the missing shards.

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
import os
import socket
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from diffstat._util import check_positive_int, progress_bar

__all__ = [
    "ShardResult",
    "ShardFailure",
    "sample_one_shard",
    "sample_shards",
    "map_with_retries",
    "run_pipeline",
    "shard_seeds",
    "load_checkpoints",
]


@dataclass
class ShardResult:
    """One shard's draws in the target's unconstrained coordinates.

    draws : (n, dim) flattened over chains; scores : (n, dim) gradients of the shard's
    log-density at the draws; log_probs : (n,) the log-density there.
    """

    shard: int
    draws: torch.Tensor
    scores: torch.Tensor
    log_probs: torch.Tensor
    num_target_evals: int
    sampling_time: float
    acceptance_rate: float = float("nan")
    attempts: int = 1
    worker: str = ""
    errors: list[str] = field(default_factory=list)


class ShardFailure(RuntimeError):
    """Some shards failed ``max_retries + 1`` times. ``completed``: shard -> ShardResult of every
    shard that finished; ``failures``: shard -> the error messages of its attempts."""

    def __init__(self, message: str, completed: dict[int, ShardResult], failures: dict[int, list[str]]):
        super().__init__(message)
        self.completed = completed
        self.failures = failures


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
    from diffstat.sampling import _REGISTRY, _load_samplers

    if worker_threads is not None:
        torch.set_num_threads(int(worker_threads))
    import diffstat.mcmc.sampler  # noqa: F401 - registers the MCMC samplers without loading the rest

    if method not in _REGISTRY:
        _load_samplers()
    if method not in _REGISTRY:
        raise ValueError(f"unknown sampler {method!r}; available: {', '.join(sorted(_REGISTRY))}")
    generator = torch.Generator().manual_seed(int(seed))
    evals0 = target.num_target_evals
    start = time.perf_counter()
    result = _REGISTRY[method](
        target,
        num_samples=num_samples,
        num_chains=num_chains,
        generator=generator,
        progress=False,
        device=torch.device("cpu"),
        **options,
    )
    draws = result.draws.reshape(-1, result.draws.shape[-1]).detach()
    log_probs, scores = target.log_prob_and_grad(draws)
    elapsed = time.perf_counter() - start
    acc = result.sample_stats.get("acceptance_rate")
    acc = float(torch.as_tensor(acc).float().mean()) if acc is not None else float("nan")
    return ShardResult(
        shard,
        draws,
        scores,
        log_probs,
        int(target.num_target_evals - evals0),
        elapsed,
        acc,
        worker=f"{socket.gethostname()}:{os.getpid()}",
    )


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
        Any ``ds.sample`` method (``"mala"``, ``"hmc"``, ...).
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
        If a shard still fails after ``max_retries`` retries; it carries every finished result.
    """
    if not targets:
        raise ValueError("targets must be a non-empty list of sub-posterior Targets")
    num_samples = check_positive_int(num_samples, "num_samples")
    if isinstance(max_retries, bool) or not isinstance(max_retries, (int, np.integer)) or max_retries < 0:
        raise ValueError(f"max_retries must be a non-negative integer, got {max_retries!r}")
    num_shards = len(targets)
    seeds = shard_seeds(seed, num_shards)
    if checkpoint_dir is not None:
        os.makedirs(checkpoint_dir, exist_ok=True)
        completed = {**load_checkpoints(checkpoint_dir, seeds), **(completed or {})}
    own = executor is None
    if own:
        executor = cf.ProcessPoolExecutor(max_workers=max(1, min(num_shards, os.cpu_count() or 1)))
    args = [
        (targets[k], method, k, num_samples, num_chains, seeds[k], options, worker_threads, checkpoint_dir)
        for k in range(num_shards)
    ]
    try:
        return map_with_retries(
            executor,
            sample_one_shard,
            args,
            max_retries=max_retries,
            completed=completed,
            progress=progress,
            desc=f"shards ({method})",
        )
    finally:
        if own:
            executor.shutdown(wait=True)


def _attempt(fn, attempt: int, *args, **kwargs):
    """``fn(*args, **kwargs)``; ``attempt`` only distinguishes resubmissions."""
    return fn(*args, **kwargs)


def map_with_retries(
    executor: cf.Executor,
    fn,
    args: list[tuple],
    kwargs: list[dict] | None = None,
    *,
    max_retries: int = 2,
    completed: dict | None = None,
    progress: bool = False,
    desc: str = "shards",
) -> list:
    """``[fn(*args[k], **kwargs[k]) for k]`` on ``executor``, each task retried up to
    ``max_retries`` times when it raises (a warning per failure); results in task order.

    Results are kept as they finish; tasks in ``completed`` (index -> result) are not run. If a
    task still fails, :class:`ShardFailure` is raised carrying every finished result.
    """
    if isinstance(max_retries, bool) or not isinstance(max_retries, (int, np.integer)) or max_retries < 0:
        raise ValueError(f"max_retries must be a non-negative integer, got {max_retries!r}")
    num_tasks = len(args)
    kwargs = [{} for _ in range(num_tasks)] if kwargs is None else kwargs
    done: dict = dict(completed or {})
    errors: dict[int, list[str]] = {}

    def submit(k: int):
        # the attempt number makes every resubmission a new task: executors that cache by
        # arguments (Dask's pure=True default) would otherwise return the failed result again
        return executor.submit(_attempt, fn, len(errors.get(k, [])), *args[k], **kwargs[k])

    pending = {submit(k): k for k in range(num_tasks) if k not in done}
    with progress_bar(len(pending), desc, progress) as bar:
        while pending:
            finished, _ = cf.wait(list(pending), return_when=cf.FIRST_COMPLETED)
            for future in finished:
                k = pending.pop(future)
                try:
                    res = future.result()
                except Exception as err:  # noqa: BLE001 - any worker error is retried and reported
                    msg = f"{type(err).__name__}: {err}"
                    errors.setdefault(k, []).append(msg)
                    attempt = len(errors[k])
                    if attempt <= max_retries:
                        warnings.warn(
                            f"shard {k} failed (attempt {attempt}): {msg}; retrying",
                            RuntimeWarning,
                            stacklevel=2,
                        )
                        pending[submit(k)] = k
                    else:
                        warnings.warn(
                            f"shard {k} failed {attempt} times, giving up: {msg}",
                            RuntimeWarning,
                            stacklevel=2,
                        )
                        bar.update()
                    continue
                if isinstance(res, ShardResult):
                    res.attempts = len(errors.get(k, [])) + 1
                    res.errors = list(errors.get(k, []))
                done[k] = res
                bar.update()
    failed = {k: v for k, v in errors.items() if k not in done}
    if failed:
        raise ShardFailure(
            f"{len(failed)} of {num_tasks} shards failed after {max_retries} retries: "
            + "; ".join(f"shard {k}: {v[-1]}" for k, v in sorted(failed.items()))
            + f". The {len(done)} finished shards are in .completed (pass completed= to resume).",
            done,
            failed,
        )
    return [done[k] for k in range(num_tasks)]


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
    exact_log_probs: bool = False,
    surrogate: bool = False,
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
    exact_log_probs : bool
        Hand the shards' own log-densities to ``"diffusion"``: its draws are then those of an SMC
        to their exact sum, the full posterior (:mod:`diffstat.dnc.exact_smc`).
    surrogate : bool
        Hand the shards' log-densities at their draws to ``"diffusion"``: each shard's energy is
        then a cubic fitted to the values and scores there (:mod:`diffstat.dnc.surrogate`), with no
        further call of the shard's log-density and no network.
    checkpoint_dir : path, optional
        Shard results are written there and never recomputed (:func:`sample_shards`).

    Returns
    -------
    (arviz.InferenceData, list of ShardResult)
        The combined posterior (attrs add ``shard_num_target_evals``, ``shard_sampling_time``
        (the sum over shards) and ``max_shard_attempts``) and the per-shard results.
    """
    from diffstat.dnc.combine import combine

    own = executor is None
    if own:
        executor = cf.ProcessPoolExecutor(max_workers=max(1, min(len(targets), os.cpu_count() or 1)))
    try:
        results = sample_shards(
            targets,
            sampler,
            num_samples=shard_samples,
            seed=seed,
            num_chains=num_chains,
            executor=executor,
            max_retries=max_retries,
            progress=progress,
            checkpoint_dir=checkpoint_dir,
            **(sampler_options or {}),
        )
        options = dict(combine_options or {})
        if combiner == "diffusion":
            options.setdefault("executor", executor)
            options.setdefault("max_retries", max_retries)
            if exact_log_probs:
                options.setdefault("log_probs", [t.log_prob_and_grad for t in targets])
            if surrogate:
                options.setdefault("draw_log_probs", [r.log_probs for r in results])
        idata = combine(
            [r.draws for r in results],
            combiner,
            scores=[r.scores for r in results],
            num_samples=num_samples,
            seed=seed,
            progress=progress,
            **options,
        )
    finally:
        if own:
            executor.shutdown(wait=True)
    idata.posterior.attrs["shard_num_target_evals"] = int(sum(r.num_target_evals for r in results))
    idata.posterior.attrs["shard_sampling_time"] = float(sum(r.sampling_time for r in results))
    idata.posterior.attrs["max_shard_attempts"] = int(max(r.attempts for r in results))
    idata.posterior.attrs["shard_sampler"] = sampler
    return idata, results
