"""Shared parts of the benchmark scripts: the suite of targets with their exact answers, and one run
in a child process with a time limit.

The targets are those of ``run_all.py`` (whose builders are imported, not copied) plus GMM-40 (the
reference of ``bench_noised_smc.py``), a banana mixture and the sonar posterior. A
:class:`run_all.Problem` carries what is known exactly (log Z, exact draws, moments, mode weights);
``run_all.evaluate`` turns draws into the metrics.

The two logistic-regression posteriors have no exact answer: log Z is the literature's (DDS:
ionosphere -111.56, sonar -108.58) and the reference means and sds come from a long HMC run made
here (8 chains of 4,000 draws after 1,000 warm-up steps; 1,000 draws with ``fast``), whose Monte
Carlo error is far below the errors the table is about.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

import diffstat as ds
from diffstat import targets as T
from run_all import Problem, funnel_problem, manywell_problem, mixture_problem

#: Literature log Z (standardised features, N(0, 1) priors; DDS, Vargas et al. 2023).
LOGISTIC_LOG_Z = {"ionosphere": -111.56, "sonar": -108.58}


def logistic_problem(name: str, model: T.LogisticRegression, log_z: float, fast: bool, seed: int) -> Problem:
    """A logistic-regression posterior with its prior as the reference, the literature's log Z and
    reference moments from a long HMC run (seeded by ``seed + 99``, so independent of the runs)."""
    target = ds.Target(model.log_prob, model.dim, reference=model.prior(), dtype=torch.float64)
    n = 1000 if fast else 4000
    idata = ds.sample(
        ds.Target(model.log_prob, model.dim, dtype=torch.float64),
        "hmc",
        num_samples=n,
        num_chains=8,
        num_warmup=1000,
        seed=seed + 99,
        progress=False,
    )
    draws = torch.as_tensor(idata.posterior["x"].values).reshape(-1, model.dim)
    return Problem(
        name,
        target,
        0,
        None,
        log_z,
        draws.mean(0),
        draws.std(0),
        notes=[f"reference moments: HMC, 8 x {n} draws; log Z: literature value"],
    )


def suite(fast: bool, num_exact: int, seed: int) -> dict[str, Callable[[], Problem]]:
    """Builders of the suite's problems by name (each builds its exact draws when called).

    References (what every sampler, ours or a peer, starts from): wide diagonal Gaussians whose
    scales are those of ``run_all.py`` and ``bench_noised_smc.py`` (6 for the nine modes, 25 for
    GMM-40 whose means fill [-40, 40]^2, 4 for narrow_wide, 3 for the funnel, 2 for many-well), 5
    for the banana mixture (modes at +-2.5 in every coordinate, bent by up to about 8 in the
    second) and the prior N(0, I) for the regressions. ``budget`` is unused here (0): every method
    runs at its defaults.
    """
    gen = lambda: torch.Generator().manual_seed(seed + 1000)  # noqa: E731 - the same draws in any subset
    mix = lambda name, m, scale: lambda: mixture_problem(name, m, scale, 0, num_exact, gen())  # noqa: E731
    return {
        "nine_modes d=2": mix("nine_modes d=2", T.nine_modes(), 6.0),
        "gmm40 d=2": mix("gmm40 d=2", T.gmm40(), 25.0),
        "narrow_wide d=10": mix("narrow_wide d=10", T.narrow_wide(10), 4.0),
        "banana d=6": mix("banana d=6", T.banana_mixture(6), 5.0),
        "funnel d=10": lambda: funnel_problem(0, num_exact, gen()),
        "many_well d=32": lambda: manywell_problem(0, num_exact, gen()),
        "ionosphere d=34": lambda: logistic_problem(
            "ionosphere d=34", T.ionosphere(), LOGISTIC_LOG_Z["ionosphere"], fast, seed
        ),
        "sonar d=61": lambda: logistic_problem("sonar d=61", T.sonar(), LOGISTIC_LOG_Z["sonar"], fast, seed),
    }


def _child(queue, fn, blob: bytes) -> None:
    try:
        row = fn(*pickle.loads(blob))
    except Exception as err:  # noqa: BLE001 - reported as a row
        row = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=4)}
    queue.put(pickle.dumps(row))


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process so far (Linux ``/proc``; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def run_with_time_limit(fn: Callable[..., dict], args: tuple, time_limit: float) -> dict:
    """``fn(*args)`` (a picklable, module-level function returning a dict) in a fresh ``spawn``
    process, killed after ``time_limit`` seconds of wall-clock time. Returns its dict,
    ``{"error": ...}`` if it raised, or ``{"timeout": time_limit, "cpu_seconds": ...}`` with the
    CPU time the child had used (on a shared machine a run can time out having had a fraction of
    a core); ``wall_seconds`` is added (start-up included).

    Arguments and result cross as bytes of the standard pickler: multiprocessing's own pickler,
    with torch's reductions, moves every tensor it sends to shared memory, which frees the
    parent's storage under any NumPy view of it (a mixture's ``weights.numpy()`` read garbage after
    the first run).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, pickle.dumps(args)))
    start = time.perf_counter()
    proc.start()
    try:
        row = pickle.loads(queue.get(timeout=time_limit))
    except Exception:  # noqa: BLE001 - queue.Empty: the time limit
        row = {"timeout": time_limit, "cpu_seconds": cpu_seconds(proc.pid)}
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    row["wall_seconds"] = time.perf_counter() - start
    return row
