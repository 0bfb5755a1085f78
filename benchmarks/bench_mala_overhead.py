"""Overhead of the MALA sampler over the bare target-gradient evaluations it makes.

Runs, in one process and back to back, (a) ``ds.sample(target, "mala")`` with 1,000 chains (start
phase, warm-up, sampling, diagnostics and the ArviZ conversion: the user's wall time) and (b) the
same number of bare ``target.log_prob_and_grad`` calls on batches of 1,000 points, and prints the
ratio of the two times (goals: at most 2.5 on the Gaussian, 1.3 on the logistic posterior), the
same ratio of this thread's CPU seconds (steadier than wall time on a shared machine, where the other
jobs' time slices fall into the wall time of either side; torch runs one thread here), and
the same ratio without the time spent in the MCMC diagnostics (R-hat, bulk and tail ESS of every
coordinate; beyond 16 chains the split R-hat of all chains' draws and folded draws and the rank
ESS of 16 chains, :func:`diffstat.rank_stats.many_chain_diagnostics`; timed by wrapping
``diffstat.diagnostics.mcmc_diagnostics``). Repeats a few
times and reports the medians, because these machines are noisy. Two cheap targets: an anisotropic
Gaussian (the gradient costs about 0.2 ms per 1,000 points, so the kernel's own elementwise work
and its random numbers show fully) and the Bayesian logistic regression on the ionosphere data in
``data/`` (351 rows, 34 coefficients; warm-up picks a dense metric there, so each MALA step adds
three small matrix products). Measured figures, and where the time goes:
``docs/mala_overhead.md``.

    python benchmarks/bench_mala_overhead.py [--target gaussian|logistic|both] [--chains 1000] [--steps 300]
        [--phases]  # also the seconds of each phase and of the gradient calls inside the run
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import diffstat as ds
import diffstat.diagnostics
import diffstat.io
import diffstat.mcmc.sampler

DATA = Path(__file__).resolve().parents[1] / "data" / "ionosphere.csv"
GOALS = {"gaussian": 2.5, "logistic": 1.3}
#: What ``--phases`` times: (module, function, label); the diagnostics are timed always.
PHASES = [
    (diffstat.mcmc.sampler, "find_start", "start"),
    (diffstat.mcmc.sampler, "initial_step_sizes", "step-size init"),
    (diffstat.mcmc.sampler, "windowed_warmup", "warm-up"),
    (diffstat.mcmc.sampler, "_sample", "sampling"),
    (diffstat.io, "to_inference_data", "InferenceData"),
]


class Timed:
    """Wraps a function and adds up the seconds spent in it, and of those the seconds spent inside
    another ``Timed`` (``inner``: the gradient calls made within a phase)."""

    def __init__(self, fn, inner: Timed | None = None):
        self.fn, self.inner, self.seconds, self.inner_seconds = fn, inner, 0.0, 0.0

    def __call__(self, *args, **kwargs):
        t0, inner0 = time.perf_counter(), self.inner.seconds if self.inner else 0.0
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0
            if self.inner:
                self.inner_seconds += self.inner.seconds - inner0


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
    parser.add_argument(
        "--phases", action="store_true", help="also time each phase and the gradient calls inside it"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    diagnose = diffstat.diagnostics.mcmc_diagnostics = Timed(diffstat.diagnostics.mcmc_diagnostics)
    phases, originals = {}, {label: getattr(module, fn) for module, fn, label in PHASES}
    names = ["gaussian", "logistic"] if args.target == "both" else [args.target]
    for name in names:
        target = make_target(name, args.dim)
        gradient = Timed(target.log_prob_and_grad)
        if args.phases:  # the driver looks these up as module globals at each call, so wrapping works
            target.log_prob_and_grad = gradient
            for module, fn, label in PHASES:
                phases[label] = Timed(originals[label], inner=gradient)
                setattr(module, fn, phases[label])
        # one untimed run first: imports (ArviZ) and allocator warm-up are not the sampler's cost
        ds.sample(
            target,
            "mala",
            num_samples=20,
            num_warmup=20,
            num_chains=args.chains,
            seed=0,
            progress=False,
            check_modes=False,
        )
        ratios, without, cpu = [], [], []
        for rep in range(args.repeats):
            before, diagnose.seconds, gradient.seconds = target.num_target_evals, 0.0, 0.0
            for timed in phases.values():
                timed.seconds = timed.inner_seconds = 0.0
            t0, c0 = time.perf_counter(), time.thread_time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # short runs at 1,000 chains warn about ESS
                ds.sample(
                    target,
                    "mala",
                    num_samples=args.steps,
                    num_warmup=args.steps,
                    num_chains=args.chains,
                    seed=rep,
                    progress=False,
                    check_modes=False,  # a diagnostic after sampling, not the sampler's overhead
                )
            t_sampler, c_sampler = time.perf_counter() - t0, time.thread_time() - c0
            in_run = gradient.seconds
            calls = (target.num_target_evals - before) // args.chains
            x = torch.randn(args.chains, target.dim)
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(calls):
                target.log_prob_and_grad(x)
            t_bare, c_bare = time.perf_counter() - t0, time.thread_time() - c0
            ratios.append(t_sampler / t_bare)
            cpu.append(c_sampler / c_bare)
            without.append((t_sampler - diagnose.seconds) / t_bare)
            print(
                f"{name} repeat {rep}: sampler {t_sampler:.3f} s (diagnostics {diagnose.seconds:.3f} s), "
                f"bare gradients {t_bare:.3f} s ({calls} calls x {args.chains} points), ratio "
                f"{ratios[-1]:.2f}, without diagnostics {without[-1]:.2f}; CPU-time ratio {cpu[-1]:.2f}"
            )
            if args.phases:
                print(
                    "  phases, s (of which gradient calls): "
                    + ", ".join(f"{k} {t.seconds:.3f} ({t.inner_seconds:.3f})" for k, t in phases.items())
                    + f"; all gradient calls of the run {in_run:.3f} s (bare {t_bare:.3f} s)"
                )
        print(
            f"{name} (dim {target.dim}): median ratio sampler / bare gradient time "
            f"{statistics.median(ratios):.2f} (goal <= {GOALS[name]}), without diagnostics "
            f"{statistics.median(without):.2f}; median CPU-time ratio {statistics.median(cpu):.2f}"
        )


if __name__ == "__main__":
    main()
