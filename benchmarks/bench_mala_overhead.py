"""Overhead of the MALA sampler over the bare target-gradient evaluations it makes.

Runs, in one process and back to back, (a) ``ds.sample(target, "mala")`` with 1,000 chains and
(b) the same number of bare ``target.log_prob_and_grad`` calls on batches of 1,000 points, and
prints the ratio of the two times (goal: under 1.5). Repeats a few times and reports the median,
because these machines are noisy. Two cheap targets: an anisotropic Gaussian (the gradient costs
about 50 microseconds per 1,000 points, so the kernel's own elementwise work shows fully) and the
Bayesian logistic regression on the ionosphere data in ``data/`` (351 rows, 35 coefficients).

    python benchmarks/bench_mala_overhead.py [--target gaussian|logistic|both] [--chains 1000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import diffstat as ds

DATA = Path(__file__).resolve().parents[1] / "data" / "ionosphere.csv"


def make_target(name: str, dim: int) -> ds.Target:
    if name == "gaussian":
        scales = torch.linspace(0.5, 2.0, dim)
        return ds.Target(lambda x: -0.5 * ((x / scales) ** 2).sum(-1), dim)
    table = np.genfromtxt(DATA, delimiter=",", skip_header=1)
    features, labels = table[:, :-1], table[:, -1]
    features = (features - features.mean(0)) / features.std(0)
    design = torch.tensor(np.hstack([np.ones((len(labels), 1)), features]), dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.float32)

    def log_prob(beta):  # N(0, 1) prior, Bernoulli-logit likelihood
        logits = beta @ design.T
        return (y * logits - torch.nn.functional.softplus(logits)).sum(-1) - 0.5 * (beta**2).sum(-1)

    return ds.Target(log_prob, design.shape[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=["gaussian", "logistic", "both"], default="both")
    parser.add_argument("--dim", type=int, default=10, help="dimension of the Gaussian target")
    parser.add_argument("--chains", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=500, help="warm-up and sampling steps each")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    names = ["gaussian", "logistic"] if args.target == "both" else [args.target]
    for name in names:
        target = make_target(name, args.dim)
        # one untimed run first: imports (ArviZ) and allocator warm-up are not the sampler's cost
        ds.sample(
            target, "mala", num_samples=20, num_warmup=20, num_chains=args.chains, seed=0, progress=False
        )
        ratios = []
        for rep in range(args.repeats):
            before = target.num_target_evals
            t0 = time.perf_counter()
            ds.sample(
                target,
                "mala",
                num_samples=args.steps,
                num_warmup=args.steps,
                num_chains=args.chains,
                seed=rep,
                progress=False,
            )
            t_sampler = time.perf_counter() - t0
            calls = (target.num_target_evals - before) // args.chains
            x = torch.randn(args.chains, target.dim)
            t0 = time.perf_counter()
            for _ in range(calls):
                target.log_prob_and_grad(x)
            t_bare = time.perf_counter() - t0
            ratios.append(t_sampler / t_bare)
            print(
                f"{name} repeat {rep}: sampler {t_sampler:.3f} s, bare gradients {t_bare:.3f} s "
                f"({calls} calls x {args.chains} points), ratio {t_sampler / t_bare:.2f}"
            )
        print(
            f"{name} (dim {target.dim}): median ratio sampler / bare gradient time "
            f"{statistics.median(ratios):.2f} (goal < 1.5)"
        )


if __name__ == "__main__":
    main()
