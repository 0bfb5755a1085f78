"""Overhead of the batched NUTS kernel over the bare target-gradient evaluations it makes.

For each target and number of chains: tune a step size (dual averaging to accept_stat 0.8) and a
diagonal metric (variances over the warm-up draws) with ``nuts_step``, then time ``--steps`` NUTS
transitions while recording the batch size of every call to the target, and time, after each
transition, the same sequence of bare ``log_prob_and_grad`` calls on batches of those sizes
(interleaved, so that both see the same load on a shared machine). Prints the ratio of the two
times (goals: under 2 at 4 chains and under 1.3 at 1,000 chains for real-posterior gradients), the
share of the sampler's time spent inside the target, and the mean tree depth and leapfrog steps.
Repeats and reports the median, since these machines are noisy.
Targets: (a) a 10-d Gaussian with scales 0.5 to 2 (its gradient is a few elementwise operations, so
the kernel's own work shows fully); (b) Bayesian logistic regression on the ionosphere data (34-d,
351 rows, N(0, 1) priors; ``diffstat.targets.logistic.ionosphere``), gradients by autograd; (c) with
``--target posteriordb``, posteriors of the posteriordb suite (``diffstat.posteriordb``, Pyro
models in unconstrained space; ``--posteriors`` picks them), by default at 4 chains, the goal of 2.

    python benchmarks/bench_nuts_overhead.py [--target gaussian|logistic|both] [--chains 4 1000]
    python benchmarks/bench_nuts_overhead.py --target posteriordb [--posteriors NAME ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffstat.mcmc import DualAveraging, init, nuts_step
from diffstat import posteriordb
from diffstat.targets.logistic import ionosphere


#: posteriordb posteriors timed by default: regressions, a time series, a hidden Markov model and a
#: Gaussian process (the kinds of ``bench_posteriordb.py --fast``).
POSTERIORS = (
    "kidiq-kidscore_momhs",
    "earnings-logearn_height",
    "kilpisjarvi_mod-kilpisjarvi",
    "sblri-blr",
    "arma-arma11",
    "garch-garch11",
    "hmm_example-hmm_example",
    "gp_pois_regr-gp_regr",
)


def make_target(name: str, dtype: torch.dtype):
    """``log_prob_and_grad`` and the dimension of the target: ``"gaussian"``, ``"logistic"`` or a
    posteriordb name."""
    if name == "gaussian":
        scales = torch.linspace(0.5, 2.0, 10, dtype=dtype)
        return (lambda x: (-0.5 * ((x / scales) ** 2).sum(-1), -x / scales**2)), 10
    if name == "logistic":
        target = ionosphere().as_target(dtype=dtype)
    else:
        target = posteriordb.load(name, dtype=dtype).target
    return target.log_prob_and_grad, target.dim


class Recorder:
    """Wraps ``log_prob_and_grad``: records each call's batch size and the time spent inside."""

    def __init__(self, fn):
        self.fn, self.sizes, self.seconds = fn, [], 0.0

    def __call__(self, x):
        t0 = time.perf_counter()
        out = self.fn(x)
        self.seconds += time.perf_counter() - t0
        self.sizes.append(x.shape[0])
        return out


def tune(lpg, dim, chains, dtype, gen, warmup=150):
    """Dual averaging with the identity metric, then a diagonal metric from the second half of
    the warm-up draws and more dual averaging with it. Returns (state, step size, inv_mass)."""
    state = init(lpg, 0.1 * torch.randn(chains, dim, generator=gen, dtype=dtype))
    inv_mass, draws = None, []
    for phase in range(2):
        adapt = DualAveraging(torch.tensor(0.1, dtype=dtype), 0.8)
        for i in range(warmup):
            state, info = nuts_step(gen, state, lpg, adapt.step_size, inv_mass)
            adapt.update(info.acceptance_rate.mean())
            if phase == 0 and i >= warmup // 2:
                draws.append(state.x)
        inv_mass = torch.cat(draws).var(0)
    return state, adapt.final_step_size, inv_mass


def run(name: str, chains: int, steps: int, repeats: int, dtype: torch.dtype, warmup: int = 150) -> None:
    lpg, dim = make_target(name, dtype)
    gen = torch.Generator().manual_seed(0)
    state, step_size, inv_mass = tune(lpg, dim, chains, dtype, gen, warmup)
    ratios = []
    for rep in range(repeats):
        rec = Recorder(lpg)
        depth = leapfrog = t_sampler = t_bare = 0.0
        for _ in range(steps):  # interleaved, so that both timings see the same load on the machine
            start = len(rec.sizes)
            t0 = time.perf_counter()
            state, info = nuts_step(gen, state, rec, step_size, inv_mass)
            t_sampler += time.perf_counter() - t0
            x = state.x.clone()
            t0 = time.perf_counter()
            for size in rec.sizes[start:]:
                lpg(x[:size])
            t_bare += time.perf_counter() - t0
            depth += info.tree_depth.double().mean().item() / steps
            leapfrog += info.num_leapfrog.double().mean().item() / steps
        ratios.append(t_sampler / t_bare)
        print(
            f"  {name} {chains} chains, repeat {rep}: sampler {t_sampler:.3f} s (in the target "
            f"{rec.seconds:.3f} s, {100 * rec.seconds / t_sampler:.0f}%), bare {t_bare:.3f} s over "
            f"{len(rec.sizes)} calls of mean batch {sum(rec.sizes) / len(rec.sizes):.0f}; step "
            f"{float(step_size):.3f}, depth {depth:.2f}, leapfrog {leapfrog:.1f}; ratio {ratios[-1]:.2f}"
        )
    goal = 2.0 if chains <= 4 else 1.3
    print(
        f"{name} (dim {dim}) {chains} chains: median ratio sampler / bare gradient time "
        f"{statistics.median(ratios):.2f} (goal < {goal})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=["gaussian", "logistic", "both", "posteriordb"], default="both")
    parser.add_argument("--posteriors", nargs="+", default=list(POSTERIORS), help="with --target posteriordb")
    parser.add_argument("--chains", type=int, nargs="+", help="default 4 1000 (posteriordb: 4)")
    parser.add_argument("--steps", type=int, default=100, help="timed NUTS transitions per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=150, help="tuning transitions per phase (two phases)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "float64"], help="float32; posteriordb: float64")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = {"both": ["gaussian", "logistic"], "posteriordb": args.posteriors}.get(args.target, [args.target])
    chains_list = args.chains or ([4] if args.target == "posteriordb" else [4, 1000])
    dtype = getattr(torch, args.dtype or ("float64" if args.target == "posteriordb" else "float32"))
    for name in names:
        for chains in chains_list:
            run(name, chains, args.steps, args.repeats, dtype, args.warmup)


if __name__ == "__main__":
    main()
