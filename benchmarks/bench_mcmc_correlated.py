r"""HMC, NUTS and MALA at defaults on a correlated 100-d Gaussian (condition number 1e4, random rotation):
bulk ESS per gradient evaluation, minimum over coordinates, side by side.

Run from the repository root: ``OMP_NUM_THREADS=1 python benchmarks/bench_mcmc_correlated.py [seed ...]``
(default seed 0; figures and their reading in ``docs/nuts.md``).
Two columns of cost: all evaluations of the run (start phase, warm-up, sampling) and those of the
sampling phase alone (the leapfrog steps recorded in ``n_steps``; one per draw for MALA).

``... bench_mcmc_correlated.py whitened [step ...]`` instead computes what the kernels do on the target
as the dense metric sees it, a 100-d standard normal: 500 chains started at exact draws run 100
transitions of NUTS and of HMC with jittered lengths :math:`t \sim U(0, \pi]` (the sampler's choice
once the metric is the covariance) at a given step size (default 0.5, what warm-up adapts both to),
and the exact lag autocorrelations (the mean and variance are known) give the integrated
autocorrelation times of :math:`x_i` and :math:`x_i^2`, hence ESS per draw and per leapfrog step
without the noise of an ESS estimate from 4 chains.
"""

import math
import sys
import time

import arviz as az
import numpy as np
import torch

import diffstat as ds

sys.path.insert(0, "tests/mcmc")
from test_dense_gaussian import correlated_gaussian


def whitened(step_size: float, dim: int = 100, chains: int = 500, moves: int = 100, lags: int = 20) -> None:
    """ESS per draw and per leapfrog step of NUTS and jittered HMC on a standard normal, from exact
    autocorrelations (summed over lags 1 to ``lags``, pooled over chains and coordinates)."""
    from diffstat.mcmc import init, nuts_step
    from diffstat.mcmc.chees import JitteredLength, jittered_hmc_step

    def standard_normal(x):
        return -0.5 * (x**2).sum(-1), -x

    for kernel in ("nuts", "hmc"):
        gen = torch.Generator().manual_seed(0)
        state = init(standard_normal, torch.randn(chains, dim, generator=gen, dtype=torch.float64))
        length, h = JitteredLength(math.pi), torch.full((chains,), step_size, dtype=torch.float64)
        draws, steps = [state.x], 0
        for _ in range(moves):
            if kernel == "nuts":
                state, info = nuts_step(gen, state, standard_normal, step_size)
                steps += int(info.num_leapfrog.sum())
            else:
                n = length.num_steps(gen, h)
                state, info = jittered_hmc_step(gen, state, standard_normal, step_size, num_steps=n)
                steps += int(n.sum())
            draws.append(state.x)
        x = torch.stack(draws)  # (moves + 1, chains, dim)
        per_draw = steps / (chains * moves)
        line = f"{kernel:4} step {step_size}: {per_draw:5.2f} leapfrog steps per draw"
        for name, f in (("x", x), ("x^2", (x**2 - 1) / math.sqrt(2))):
            rho = [float((f[:-k] * f[k:]).mean()) for k in range(1, lags + 1)]
            ess = 1 / (1 + 2 * sum(rho))
            line += f"; {name}: lag-1 {rho[0]:+.3f}, ESS/draw {ess:.2f}, ESS/step {ess / per_draw:.3f}"
        print(line)


def main(seed: int = 0) -> None:
    print(f"seed {seed}")
    target, mean, _ = correlated_gaussian()
    methods = [m for m in ("hmc", "nuts", "mala") if m in ds.available_methods()]
    print(
        f"{'method':6} {'metric':6} {'min bulk ESS':>12} {'evals':>9} {'sampling evals':>14} "
        f"{'ESS/eval':>9} {'ESS/sampling eval':>17} {'max |z|':>8} {'max R-hat':>9} {'time s':>7}"
    )
    for method in methods:
        start = time.perf_counter()
        idata = ds.sample(
            target, method, num_samples=1000, num_chains=4, seed=seed, progress=False, check_modes=False
        )
        seconds = time.perf_counter() - start
        ess = float(az.ess(idata, method="bulk")["x"].min())
        evals = idata.posterior.attrs["num_target_evals"]
        stats = idata.sample_stats
        sampling = int(stats["n_steps"].sum()) if "n_steps" in stats else stats["lp"].size
        z = (
            np.abs(idata.posterior["x"].mean(("chain", "draw")).values - mean)
            / az.mcse(idata, method="mean")["x"].values
        )
        rhat = float(az.rhat(idata)["x"].max())
        print(
            f"{method:6} {idata.posterior.attrs['metric']:6} {ess:12.0f} {evals:9d} {sampling:14d} "
            f"{ess / evals:9.2e} {ess / sampling:17.2e} {z.max():8.2f} {rhat:9.4f} {seconds:7.1f}"
        )


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1:2] == ["whitened"]:
        for step in sys.argv[2:] or ["0.5"]:
            whitened(float(step))
    else:
        for seed in sys.argv[1:] or ["0"]:
            main(int(seed))
