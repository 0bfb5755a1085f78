"""Candidate checks for pdds with a NUTS population (``population="nuts"``, issue 15).

For each target and seed, one pdds run with the population (900 particles), and per run: log Z
error and s.e., the mode metric of ``bench_noised_smc.py``, whether the run warned, the stuck share
(mean of the last 8 levels) and three candidate statistics of a wrong run:

* ``stein``: Stein's identity per whitened coordinate on the run's final weighted particles
  (``diffstat.diffusion.stein.stein_statistic``; the gradients are the ones the last level already
  holds, no evaluation): the largest |S_j| and the largest z over the coordinates, and whether a
  coordinate fails (|S_j| > 0.1 and z > 5);
* ``reach``: the share of the final weight on particles whose mixture log-density is below the
  smallest of the population's draws (``reach0``) or below their 1% quantile (``reach1``);
* ``is``: plain importance sampling of log Z from 900 fresh draws of the mixture (900 extra
  evaluations, outside the run's count; the last level's independence proposals are such draws),
  and z = (SMC - IS) / sqrt(se_SMC^2 + se_IS^2), se_IS by the delta method.

Run (one thread; about 40 s a funnel run)::

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_noised_smc_checks.py --targets funnel \\
        --seeds 0 1 2 3 4
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_noised_smc_checks.py \\
        --targets narrow_wide nine_modes gmm40 ionosphere many_well --seeds 0 1 2

``--pdds`` with no value runs the default pdds (no population: only the Stein columns);
``--save DIR`` keeps each run's final particles, population and mixture. Results and the check
adopted (Stein's, for population runs): docs/noised_smc.md.
"""

from __future__ import annotations

import argparse
import ast
import math
import time
import warnings

import torch
from bench_noised_smc import problems

import diffstat as ds
import diffstat.smoothing.mcmc_population as mp
from diffstat.diffusion import noised_smc as ns
from diffstat.diffusion.noised_smc_check import LAST_LEVELS
from diffstat.diffusion.noised_smc_mixture import noised_log_density, sample_noised
from diffstat.diffusion.stein import stein_statistic

warnings.filterwarnings("ignore", category=FutureWarning)


class Capture:
    """Wraps pdds's run, population and mixture so that the statistics see them."""

    def __init__(self):
        self.runs, self.mixture, self.pop_x, self.pop_grad = [], None, None, None
        self._smc, self._pop, self._mcmc = ns.noised_smc, ns.population_path, mp.mcmc_population
        ns.noised_smc, ns.population_path, mp.mcmc_population = self.smc, self.population, self.mcmc

    def smc(self, generator, path, *args, **kwargs):
        out = self._smc(generator, path, *args, **kwargs)
        self.runs.append((path, out))
        return out

    def population(self, *args, **kwargs):
        res = self._pop(*args, **kwargs)
        self.mixture = res[1]
        return res

    def mcmc(self, *args, **kwargs):
        pop = self._mcmc(*args, **kwargs)
        self.pop_x, self.pop_grad = pop.x, pop.grad
        return pop


def statistics(cap: Capture, seed: int, log_z: float) -> str:
    path, out = cap.runs[-1]
    gs, log_w = out.particles, out.log_weights
    uniq, inv = torch.unique(gs.x, dim=0, return_inverse=True)  # resampled copies pooled
    w = torch.zeros(uniq.shape[0], dtype=torch.float64).index_add_(0, inv, torch.softmax(log_w.double(), 0))
    first = torch.zeros(uniq.shape[0], dtype=torch.long).scatter_(0, inv, torch.arange(inv.shape[0]))
    st = stein_statistic(uniq, (gs.grad_g - gs.x)[first], w)  # score in whitened coordinates
    stein = f"stein {float(st['stat'].abs().max()):.3f} z {float(st['z'].max()):5.1f}"
    stein += f" fail {int(st['fails'].sum())}"
    one = torch.ones((), dtype=torch.float64)
    mix = cap.mixture
    if mix is None:
        return stein
    mix = mix._replace(log_mass=mix.log_mass - torch.logsumexp(mix.log_mass, 0))  # q normalised
    z_pop = path.whitening.to_white(cap.pop_x.to(torch.float64))
    sp = stein_statistic(
        z_pop, path.whitening.grad_to_white(cap.pop_grad.to(torch.float64)), torch.ones(len(z_pop))
    )
    stein += f" popstein {float(sp['stat'].abs().max()):.3f} z {float(sp['z'].max()):5.1f}"
    lq_pop = noised_log_density(mix, z_pop, one)
    lq = noised_log_density(mix, gs.x, one)
    wt = torch.softmax(log_w.double(), 0)
    reach0 = float(wt[lq < lq_pop.min()].sum())
    reach1 = float(wt[lq < torch.quantile(lq_pop, 0.01)].sum())
    y = sample_noised(torch.Generator().manual_seed(10_000 + seed), mix, one, 900)
    lp, _ = path.log_pi_and_grad(y)
    lr = torch.nan_to_num(lp - noised_log_density(mix, y, one), nan=-math.inf)
    lz_is = float(torch.logsumexp(lr, 0) - math.log(900))
    r = torch.exp(lr - lr.max())
    se_is = float(r.std() / r.mean() / math.sqrt(900))
    z = (out.log_normalizer - lz_is) / math.sqrt(out.log_normalizer_se**2 + se_is**2)
    is_err = lz_is - log_z
    return f"{stein} reach0 {reach0:.4f} reach1 {reach1:.4f} is err {is_err:+.3f} ({se_is:.3f}) z {z:+.1f}"


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--targets", nargs="*", default=["funnel"])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--particles", type=int, default=900)
    parser.add_argument("--pdds", nargs="*", default=["population='nuts'"], help="pdds options, key=value")
    parser.add_argument("--save", default=None, help="folder for each run's particles, population, mixture")
    args = parser.parse_args()
    torch.set_num_threads(1)
    table = problems()
    options = {k: ast.literal_eval(v) for k, v in (kv.split("=", 1) for kv in args.pdds)}
    for name in args.targets:
        target, log_z, metric = table[name]
        for seed in args.seeds:
            cap = Capture()
            start = time.perf_counter()
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", RuntimeWarning)
                    idata = ds.sample(
                        target, "pdds", num_samples=args.particles, seed=seed, progress=False, **options
                    )
                a = idata.posterior.attrs
                secs = time.perf_counter() - start
                x = torch.as_tensor(idata.posterior["x"].values).reshape(-1, target.dim)
                stuck = float(cap.runs[-1][1].stages["stuck"][-LAST_LEVELS:].mean())
                warned = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
                row = (
                    f"{name:11s} {seed} err {a['log_normalizer'] - log_z:+.3f}"
                    f" se {a['log_normalizer_se']:.3f}"
                    f" {metric(x)} evals {a['num_target_evals']} {secs:.0f}s stuck {stuck:.3f}"
                    f" {'WARN' if warned else 'ok'} div {a.get('population_divergent', 0)}"
                    f" | {statistics(cap, seed, log_z)}"
                )
            finally:
                ns.noised_smc, ns.population_path, mp.mcmc_population = cap._smc, cap._pop, cap._mcmc
            print(row, flush=True)
            if args.save:
                path, out = cap.runs[-1]
                torch.save(
                    dict(out=out._asdict(), pop_x=cap.pop_x, pop_grad=cap.pop_grad, mixture=cap.mixture,
                         whitening=(path.whitening.shift, path.whitening.chol), log_z=log_z),
                    f"{args.save}/{name}_{seed}.pt",
                )  # fmt: skip
            for msg in warned:
                print("   ", msg[:300], flush=True)


if __name__ == "__main__":
    main()
