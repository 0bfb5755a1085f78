"""The walk-jump sigma trade-off on the unequal two-mode target (weights 2:1, covariance 0.05 I).

For each sigma, walk-jump with the exact smoothed score (and, with --training-free, the Laplace
estimator from the log-density only) from walkers all started in the LIGHT mode, so a walk that does
not cross between modes shows it. Printed per sigma: the heavy mode's weight among the jumps (truth
2/3), the within-mode variance of the jumps against the theory tau^4 / (tau^2 + sigma^2) and against
tau^2 = 0.05, the fraction of walkers that changed mode at least once, and the cost.

Small sigma: jumps close to draws of p (variance near tau^2) but walkers stay where they started;
large sigma: walkers mix, the jumps are posterior means shrunk toward each other.

    python benchmarks/bench_walk_jump_sigma.py [--dim 8] [--chains 1000] [--training-free]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import diffstat as ds
from diffstat.smoothing import isotropic_mixture_smoothed_score
from diffstat.targets.two_modes import two_modes


def fast_two_modes_target(gm, dim):
    """The two-mode mixture as a plain Target (isotropic closed form: fast, no exact attributes)."""
    means, log_w = gm.means, torch.log(gm.weights)

    def log_prob(x):
        sq = ((x[:, None, :] - means.to(x)) ** 2).sum(-1)
        return torch.logsumexp(log_w.to(x) - 0.5 * sq / 0.05 - 0.5 * dim * math.log(2 * math.pi * 0.05), -1)

    return ds.Target(log_prob, dim, dtype=torch.float64)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--chains", type=int, default=1000)
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--sigmas", type=str, default="0.25,0.5,1,1.5,2,3,4,6")
    parser.add_argument("--training-free", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    d = args.dim
    gm = two_modes(d)
    tau2 = 0.05
    exact = isotropic_mixture_smoothed_score(
        gm.means, gm.weights, torch.full((2,), tau2, dtype=torch.float64)
    )
    light = gm.means[1].to(torch.float64)
    print(
        f"walk-jump sigma sweep, two modes d={d}, {args.chains} walkers started in the light mode, "
        f"{args.warmup} warm-up steps, {args.draws} jumps each; truth weight 0.6667, tau^2 = {tau2}"
    )
    print(
        f"{'score':>8} {'sigma':>6} {'weight':>7} {'var':>8} "
        f"{'theory':>8} {'switched':>8} {'evals':>10} {'time':>6}"
    )
    for sigma in (float(s) for s in args.sigmas.split(",")):
        sources = [("exact", dict(smoothed_score=exact))]
        if args.training_free:
            sources.append(("laplace", dict(estimator="laplace")))
        for name, opts in sources:
            target = fast_two_modes_target(gm, d)
            start = time.perf_counter()
            idata = ds.sample(
                target,
                "walk_jump",
                num_samples=args.draws,
                num_chains=args.chains,
                seed=0,
                progress=False,
                sigma=sigma,
                num_warmup=args.warmup,
                init=light,
                **opts,
            )
            elapsed = time.perf_counter() - start
            x = torch.as_tensor(idata.posterior["x"].values)  # (chain, draw, d)
            comp = gm.assign(x.reshape(-1, d)).reshape(x.shape[:2])
            weight = float((comp == 0).double().mean())
            switched = float((comp != 1).any(1).double().mean())
            var = []
            for k in (0, 1):
                xs = x.reshape(-1, d)[comp.reshape(-1) == k]
                if xs.shape[0] > d:
                    var.append(float(torch.diagonal(torch.cov(xs.T)).mean()))
            theory = tau2**2 / (tau2 + sigma**2)
            print(
                f"{name:>8} {sigma:6.2f} {weight:7.3f} {sum(var) / max(len(var), 1):8.4f} {theory:8.4f} "
                f"{switched:8.3f} {idata.posterior.attrs['num_target_evals']:10d} {elapsed:6.1f}"
            )


if __name__ == "__main__":
    main()
