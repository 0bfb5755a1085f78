r"""Per-shard tasks on any ``concurrent.futures.Executor``, each retried when it fails.

The pipeline samples the shards with it (:mod:`diffstat.dnc.pipeline`) and the diffusion combiner
fits its shard models with it (:mod:`diffstat.dnc.energy`); both sit above this module.

A task that raises (or whose worker process dies: Dask reports it as ``KilledWorker`` or
reschedules it itself) is resubmitted up to ``max_retries`` times, each failure reported by a
warning and recorded. Results are collected as they finish, so a task that fails for good never
costs the finished ones: :class:`ShardFailure` carries every finished result, and is chained
(``raise ... from``) to the last exception of the first task that failed, which keeps its own type,
message and traceback. ``max_retries = 2`` by default: a transient failure (a killed worker) rarely
strikes the same task three times, while a bug in the user's code is reported after three tries.
"""

from __future__ import annotations

import concurrent.futures as cf
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from diffstat._util import progress_bar

__all__ = ["ShardResult", "ShardFailure", "map_with_retries", "check_max_retries"]


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
    shard that finished; ``failures``: shard -> the error messages of its attempts. ``__cause__``:
    the last exception of the first failed shard, as its task raised it."""

    def __init__(self, message: str, completed: dict[int, ShardResult], failures: dict[int, list[str]]):
        super().__init__(message)
        self.completed = completed
        self.failures = failures


def check_max_retries(max_retries) -> int:
    """``max_retries`` as an int, or ``ValueError`` unless it is a non-negative integer."""
    if isinstance(max_retries, bool) or not isinstance(max_retries, (int, np.integer)) or max_retries < 0:
        raise ValueError(f"max_retries must be a non-negative integer, got {max_retries!r}")
    return int(max_retries)


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
    task still fails, :class:`ShardFailure` is raised carrying every finished result (module notes).
    """
    max_retries = check_max_retries(max_retries)
    num_tasks = len(args)
    kwargs = [{} for _ in range(num_tasks)] if kwargs is None else kwargs
    done: dict = dict(completed or {})
    errors: dict[int, list[BaseException]] = {}

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
                    errors.setdefault(k, []).append(err)
                    if _retry(k, errors[k], max_retries):
                        pending[submit(k)] = k
                    else:
                        bar.update()
                    continue
                if isinstance(res, ShardResult):
                    res.attempts = len(errors.get(k, [])) + 1
                    res.errors = [_describe(e) for e in errors.get(k, [])]
                done[k] = res
                bar.update()
    _raise_failures(num_tasks, done, errors, max_retries)
    return [done[k] for k in range(num_tasks)]


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _retry(k: int, errors: list[BaseException], max_retries: int) -> bool:
    """Warn about task ``k``'s latest failure; whether it is to be resubmitted."""
    attempt, msg = len(errors), _describe(errors[-1])
    again = attempt <= max_retries
    what = (
        f"failed (attempt {attempt}): {msg}; retrying"
        if again
        else f"failed {attempt} times, giving up: {msg}"
    )
    warnings.warn(f"shard {k} {what}", RuntimeWarning, stacklevel=3)
    return again


def _raise_failures(num_tasks: int, done: dict, errors: dict, max_retries: int) -> None:
    """:class:`ShardFailure` for the tasks that never finished, chained to the first one's error."""
    failed = {k: v for k, v in sorted(errors.items()) if k not in done}
    if not failed:
        return
    raise ShardFailure(
        f"{len(failed)} of {num_tasks} shards failed after {max_retries} retries: "
        + "; ".join(f"shard {k}: {_describe(v[-1])}" for k, v in failed.items())
        + f". The {len(done)} finished shards are in .completed (pass completed= to resume).",
        done,
        {k: [_describe(e) for e in v] for k, v in failed.items()},
    ) from next(iter(failed.values()))[-1]
