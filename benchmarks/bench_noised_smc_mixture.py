"""The population mixture of ``method="pdds"`` on funnel(10): is the mixture, or the population, the limit?

For each seed: the pilot (``setup_path``), then a mixture of ``--components`` Gaussians fitted by EM
to ``n`` exact funnel draws (``--exact n``) or to a NUTS population (``--nuts
chains,warmup,size,budget`` with ``--accept`` and ``--thin``; the population's sd and 1%/99%
quantiles of x_1 are printed), the plain importance sampling estimate of log Z from 20,000 draws
of the mixture and its ESS fraction, and (unless ``--no-smc``) one SMC run of ``--particles``
particles with ``--mixture-moves`` independence and ``--local-moves`` MALA moves per level over
``--steps`` levels, the guidance ``--guidance``:
``mixed`` (the mixture's noised g_t mixed in at the noisy levels, what ``population="nuts"``
does), ``power`` (no guidance from the mixture, moves only) or ``bank`` (the mixture as the
pilot's bank, with the residual's power guidance). Prints the log Z error (s.e.), sd and 1%/99%
quantiles of x_1 (exact 3, -7.0, +7.0), the smallest ESS fraction over the levels, the range of
the independence moves' acceptance, and the evaluations (the run's, and all with the pilot and
population). Results: ``docs/noised_smc.md``.

The defaults are those of ``population="nuts"`` with 900 particles. Run (one thread)::

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_noised_smc_mixture.py --exact 2000 \
        --components 16 --steps 64 --mixture-moves 2 --local-moves 2 --guidance power
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_noised_smc_mixture.py --no-smc \
        --nuts 32,200,2048,600000 --accept 0.95 --thin 2
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch
from bench_noised_smc import problems

from diffstat import targets as T
from diffstat.diffusion.noised_smc import noised_smc
from diffstat.diffusion.noised_smc_learned import LearnedPath
from diffstat.diffusion.noised_smc_mixture import (
    MixtureGuidance,
    fit_mixture,
    noised_log_density,
    sample_noised,
)
from diffstat.diffusion.noised_smc_path import NoisedPath
from diffstat.diffusion.noised_smc_setup import setup_path
from diffstat.smoothing.mcmc_population import mcmc_population


def importance_check(path, mixture, generator, n=20000):
    """Plain importance sampling of log Z from ``n`` draws of the mixture: estimate, ESS fraction."""
    one = torch.tensor(1.0, dtype=torch.float64)
    z = sample_noised(generator, mixture, one, n)
    log_w = torch.nan_to_num(path.log_pi_and_grad(z)[0] - noised_log_density(mixture, z, one), nan=-math.inf)
    ess = float(torch.softmax(log_w, 0).pow(2).sum().reciprocal()) / n
    return float(torch.logsumexp(log_w, 0)) - math.log(n), ess


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--exact", type=int, default=0)
    parser.add_argument("--nuts", default="64,100,4096,573440")
    parser.add_argument("--accept", type=float, default=0.95)
    parser.add_argument("--thin", type=int, default=1)
    parser.add_argument("--no-smc", action="store_true")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--components", type=int, default=8)
    parser.add_argument("--particles", type=int, default=900)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--mixture-moves", type=int, default=1)
    parser.add_argument("--local-moves", type=int, default=1)
    parser.add_argument("--guidance", choices=("mixed", "power", "bank"), default="mixed")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    target, log_z, _ = problems()["funnel"]
    for seed in args.seeds:
        start, gen = time.perf_counter(), torch.Generator().manual_seed(seed)
        target.num_target_evals = 0
        path, _ = setup_path(target, gen, None, {})
        if args.exact:
            x = T.Funnel(10).sample(args.exact, gen).to(torch.float64)
            source = f"exact {args.exact}"
        else:
            chains, warmup, size, budget = (int(v) for v in args.nuts.split(","))
            x = mcmc_population(
                target, size, gen, num_chains=chains, num_warmup=warmup, budget=budget,
                target_accept=args.accept, thin=args.thin,
            ).x  # fmt: skip
            q = x[:, 0].quantile(torch.tensor([0.01, 0.99], dtype=x.dtype))
            source = (
                f"nuts {args.nuts} acc {args.accept} thin {args.thin}: {x.shape[0]} draws, "
                f"{target.num_target_evals} evals, sd(x1) {float(x[:, 0].std()):.2f} "
                f"q {float(q[0]):+.2f} {float(q[1]):+.2f}"
            )
        z = path.whitening.to_white(x)
        mixture = fit_mixture(z, path.log_pi_and_grad(z)[0], args.components)
        is_log_z, is_ess = importance_check(path, mixture, gen)
        if args.no_smc:
            print(f"seed {seed} {source} | IS {is_log_z - log_z:+.3f} ESS {is_ess:.3f}", flush=True)
            continue
        if args.guidance == "mixed":
            run_path = LearnedPath(path, MixtureGuidance(mixture))
        else:
            bank = mixture if args.guidance == "bank" else None
            run_path = NoisedPath(target, path.whitening, path.mode_scale_sq, args.guidance, bank)
        before = target.num_target_evals
        out = noised_smc(
            gen, run_path, args.particles, num_steps=args.steps, num_mcmc_steps=args.local_moves,
            mixture=mixture, num_mixture_moves=args.mixture_moves,
        )  # fmt: skip
        idx = torch.multinomial(
            torch.softmax(out.log_weights, 0), args.particles, replacement=True, generator=gen
        )
        x1 = path.whitening.from_white(out.particles.x[idx])[:, 0]
        rates = out.stages["mixture_acceptance"]
        print(
            f"seed {seed} {source} | IS {is_log_z - log_z:+.3f} ESS {is_ess:.3f} | {args.guidance} "
            f"err {out.log_normalizer - log_z:+.3f} ({out.log_normalizer_se:.3f}) "
            f"sd(x1) {float(x1.std()):.3f} "
            f"q {float(x1.quantile(0.01)):+.2f} {float(x1.quantile(0.99)):+.2f} "
            f"minESS {float(out.stages['ess'].min()):.3f} "
            f"mix acc {float(rates.min()):.2f}-{float(rates.max()):.2f} "
            f"evals {target.num_target_evals - before} total {target.num_target_evals} "
            f"{time.perf_counter() - start:.0f}s",
            flush=True,
        )


if __name__ == "__main__":
    main()
