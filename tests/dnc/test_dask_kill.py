"""The pipeline with 64 shards on a Dask LocalCluster while one worker process is killed (SIGKILL,
a real kill of the process): every shard comes back, and no finished shard is computed again.

Each shard's log-likelihood leaves a marker file the first time it runs in a freshly unpickled
copy, i.e. once per computation of the shard, named by the shard and the worker's pid; the test
reads them to count computations."""

import os
import signal
import sys
import threading
import time
import uuid
import warnings

import pytest
import torch

import diffstat as ds
from diffstat.dnc.models import GaussianPrior
from diffstat.dnc.shards import SubPosterior, split_indices, take_rows
from diffstat.target import Target

DIM, NUM_SHARDS, PRIOR_VAR = 2, 64, 1.0
SAMPLER = dict(num_samples=50, num_chains=2, num_warmup=50)


def normal_log_likelihood(theta, data):
    (y,) = data
    return -0.5 * ((y.to(theta)[None] - theta[:, None]) ** 2).sum((1, 2))


class CountingLikelihood:
    """``normal_log_likelihood`` that marks every computation of its shard (module notes) and
    sleeps ``delay`` seconds per call, so that a shard takes long enough to be caught running (1 ms:
    about 0.2 s of sleep per shard; at 2 ms the sleeps were about half of the 30 s test; in three
    runs at 1 ms a shard was running at the kill, and computed again, each time)."""

    def __init__(self, marker_dir: str, shard: int, delay: float = 0.001):
        self.marker_dir, self.shard, self.delay = marker_dir, shard, delay
        self.marked = False

    def __getstate__(self):
        return {**self.__dict__, "marked": False}

    def __call__(self, theta, data):
        if not self.marked:
            name = f"{self.shard}_{os.getpid()}_{uuid.uuid4().hex}"
            open(os.path.join(self.marker_dir, name), "w").close()
            self.marked = True
        time.sleep(self.delay)
        return normal_log_likelihood(theta, data)


def computations(marker_dir: str) -> dict[int, list[int]]:
    """shard -> pids of the processes that computed it, in order of the markers' times."""
    out: dict[int, list[tuple[float, int]]] = {}
    for name in os.listdir(marker_dir):
        shard, pid, _ = name.split("_")
        out.setdefault(int(shard), []).append((os.path.getmtime(os.path.join(marker_dir, name)), int(pid)))
    return {k: [p for _, p in sorted(v)] for k, v in out.items()}


def unneeded_recomputations(runs: dict[int, list[int]], killed: set[int]) -> list[int]:
    """Shards computed more than once, except a shard whose earlier computations all ran on a
    killed process (it was running there when the process died: recomputing it is needed)."""
    return [k for k, pids in runs.items() if len(pids) > 1 and not set(pids[:-1]) <= killed]


def _targets(marker_dir):
    gen = torch.Generator().manual_seed(0)
    y = torch.tensor([1.0, -0.5], dtype=torch.float64) + torch.randn(
        640, DIM, generator=gen, dtype=torch.float64
    )
    parts = split_indices(y.shape[0], NUM_SHARDS, seed=0)
    targets = [
        Target(
            SubPosterior(
                GaussianPrior(PRIOR_VAR), CountingLikelihood(marker_dir, k), take_rows((y,), rows), NUM_SHARDS
            ),
            DIM,
            dtype=torch.float64,
            validate=False,
        )
        for k, rows in enumerate(parts)
    ]
    return targets, y


def _kill_when(marker_dir, pid, num_markers, killed, timeout=60.0):
    """Kill ``pid`` once ``num_markers`` shard computations have started (a background thread)."""
    end = time.time() + timeout
    while time.time() < end:
        if len(os.listdir(marker_dir)) >= num_markers:
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
            return
        time.sleep(0.01)


@pytest.mark.slow
def test_dask_64_shards_survive_a_killed_worker(tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    import cloudpickle

    cloudpickle.register_pickle_by_value(
        sys.modules[__name__]
    )  # this test module is not importable on workers
    markers, checkpoints = tmp_path / "markers", tmp_path / "checkpoints"
    markers.mkdir()
    targets, y = _targets(str(markers))
    cluster = distributed.LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
    )
    client = distributed.Client(cluster)
    try:
        pids = sorted(client.run(os.getpid).values())
        killed: set[int] = set()
        killer = threading.Thread(target=_kill_when, args=(str(markers), pids[0], 20, killed))
        killer.start()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            idata, results = ds.dnc.run_pipeline(
                targets,
                "gaussian",
                num_samples=2000,
                seed=3,
                executor=client.get_executor(),
                max_retries=3,
                shard_samples=SAMPLER["num_samples"],
                num_chains=SAMPLER["num_chains"],
                progress=False,
                sampler_options=dict(num_warmup=SAMPLER["num_warmup"]),
                checkpoint_dir=str(checkpoints),
            )
        killer.join()
        new_pids = set(client.run(os.getpid).values())
    finally:
        client.close()
        cluster.close()
    assert killed == {pids[0]} and pids[0] not in new_pids  # the process really died
    assert [r.shard for r in results] == list(range(NUM_SHARDS))
    assert all(r.draws.shape == (100, DIM) and bool(torch.isfinite(r.draws).all()) for r in results)
    workers = [int(r.worker.split(":")[1]) for r in results]
    assert workers.count(pids[0]) >= 5  # the killed worker had finished shards: they were kept
    runs = computations(str(markers))
    assert sorted(runs) == list(range(NUM_SHARDS))
    assert unneeded_recomputations(runs, killed) == []
    assert sum(len(p) > 1 for p in runs.values()) <= 1  # at most the one shard running at the kill
    # the combined posterior is the conjugate one (the Gaussian product is exact here)
    prec = 1.0 / PRIOR_VAR + y.shape[0]
    x = torch.as_tensor(idata.posterior["x"].values).reshape(-1, DIM)
    assert ((x.mean(0) - y.sum(0) / prec).abs() / prec**-0.5 < 0.5).all()

    # the check can fail: a shard whose finished result is thrown away is computed again, and flagged
    k = next(i for i, w in enumerate(workers) if w != pids[0] and len(runs[i]) == 1)
    os.remove(
        os.path.join(str(checkpoints), f"shard_{k}_seed_{ds.dnc.pipeline.shard_seeds(3, NUM_SHARDS)[k]}.pt")
    )
    again = ds.dnc.sample_shards(
        targets,
        "mala",
        seed=3,
        executor=None,
        progress=False,
        checkpoint_dir=str(checkpoints),
        num_chains=SAMPLER["num_chains"],
        num_samples=SAMPLER["num_samples"],
        num_warmup=SAMPLER["num_warmup"],
    )
    assert torch.equal(again[k].draws, results[k].draws)  # same seed, same draws
    assert unneeded_recomputations(computations(str(markers)), killed) == [k]
