"""PT iterations per second: dense moves one temperature at a time against one batched move.

Parallel tempering keeps a dense metric per temperature. It used to move the replicas one
temperature at a time (a kernel call per temperature, each with its ``DenseMetric``); now one
whitened move (:func:`diffstat.tempering.pt.whitened_move`) moves all of them with a fixed number of
tensor calls. This script times :func:`~diffstat.tempering.pt.parallel_tempering` (``C`` runs of
``R`` temperatures, exact reference draws at beta = 0, one MALA step per replica, DEO swaps, no
warm-up so that every variant does the same work from the same start) on a Gaussian with
correlation 0.9 in ``dim`` dimensions, side by side with

- ``loop``: the earlier moves, one kernel call per temperature with its ``DenseMetric`` (built
  once, outside the timing, as the earlier code did once per warm-up round);
- ``batched``: the batched dense moves of the package;
- ``diagonal``: the batched diagonal moves (``DENSE_MAX_DIM = 0``), for scale.

The machine may be shared: each figure is the best of ``--repeats`` interleaved runs. Prints
iterations per second and the speed-up of ``batched`` over ``loop``:

    python benchmarks/bench_pt_dense_moves.py [--dims 2 10 50] [--temperatures 5 10 20] [--chains 4]
        [--iterations 200]
        [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

import diffstat as ds
import diffstat.tempering.pt as pt
from diffstat.mcmc.base import MCMCInfo
from diffstat.mcmc.metric import DenseMetric
from diffstat.tempering.path import GeometricPath, move

F64 = torch.float64
#: The loop's DenseMetric per temperature, built on its first call of a run.
_METRICS: list[DenseMetric] = []


def loop_moves(kernel, generator, ps, path, beta, step_size, chol):
    """The earlier dense moves, with the signature of ``whitened_move``: one kernel call per
    temperature with its ``DenseMetric`` (built on the first call: without warm-up the factors
    never change)."""
    r = chol.shape[0]
    if not _METRICS:
        _METRICS.extend(DenseMetric(factor @ factor.T, factor) for factor in chol)
    temp = torch.arange(ps.x.shape[0]) % r
    x, acc = ps, torch.zeros_like(beta)
    accepted, diverging, evals = (
        torch.zeros_like(beta, dtype=torch.bool),
        torch.zeros_like(beta, dtype=torch.bool),
        0,
    )
    for t in range(r):
        rows = torch.nonzero(temp == t).flatten()
        part, info = move(
            kernel, generator, ps.index(rows), path, beta[rows[0]], step_size[rows[0]], _METRICS[t]
        )
        x = type(ps)(*(a.index_copy(0, rows, b) for a, b in zip(x, part)))
        acc, accepted = (
            acc.index_copy(0, rows, info.acceptance_rate),
            accepted.index_copy(0, rows, info.is_accepted),
        )
        diverging, evals = diverging.index_copy(0, rows, info.diverging), evals + info.num_evals
    return x, MCMCInfo(acc, accepted, diverging, evals)


def rate(variant: str, dim: int, r: int, c: int, iterations: int) -> float:
    """Iterations per second of one PT run of ``variant`` (``loop``, ``batched`` or ``diagonal``)."""
    cov = 0.1 * torch.eye(dim, dtype=F64) + 0.9
    target = ds.Target(
        torch.distributions.MultivariateNormal(torch.zeros(dim, dtype=F64), cov).log_prob, dim, dtype=F64
    )
    gen = torch.Generator().manual_seed(0)
    path = GeometricPath(target)
    x0 = path.sample_reference(c * r, gen)
    batched, dense_max = pt.whitened_move, pt.DENSE_MAX_DIM
    _METRICS.clear()
    try:
        pt.whitened_move = loop_moves if variant == "loop" else batched
        pt.DENSE_MAX_DIM = 0 if variant == "diagonal" else dense_max
        start = time.perf_counter()
        pt.parallel_tempering(gen, path, x0, c, num_samples=iterations, num_warmup=0, num_temperatures=r)
        return iterations / (time.perf_counter() - start)
    finally:
        pt.whitened_move, pt.DENSE_MAX_DIM = batched, dense_max


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 10, 50])
    parser.add_argument("--temperatures", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    variants = ("loop", "batched", "diagonal")
    print(f"{'dim':>4} {'R':>3} {'loop it/s':>10} {'batched it/s':>13} {'diagonal it/s':>14} {'speed-up':>9}")
    for dim in args.dims:
        for r in args.temperatures:
            best = dict.fromkeys(variants, 0.0)
            for _ in range(args.repeats):
                for v in variants:
                    best[v] = max(best[v], rate(v, dim, r, args.chains, args.iterations))
            loop, batched, diagonal = (best[v] for v in variants)
            print(f"{dim:>4} {r:>3} {loop:>10.0f} {batched:>13.0f} {diagonal:>14.0f} {batched / loop:>8.1f}x")


if __name__ == "__main__":
    main()
