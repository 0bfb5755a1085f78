"""HMC, NUTS and MALA at defaults on a correlated 100-d Gaussian (condition number 1e4, random rotation):
bulk ESS per gradient evaluation, minimum over coordinates, side by side.

Run from the repository root: ``OMP_NUM_THREADS=1 python benchmarks/bench_mcmc_correlated.py [seed]``.
Two columns of cost: all evaluations of the run (start phase, warm-up, sampling) and those of the
sampling phase alone (the leapfrog steps recorded in ``n_steps``; one per draw for MALA).
"""

import sys
import time

import arviz as az
import numpy as np
import torch

import diffstat as ds

sys.path.insert(0, "tests/mcmc")
from test_dense_gaussian import correlated_gaussian


def main(seed: int = 0) -> None:
    target, mean, _ = correlated_gaussian()
    methods = [m for m in ("hmc", "nuts", "mala") if m in ds.available_methods()]
    print(
        f"{'method':6} {'metric':6} {'min bulk ESS':>12} {'evals':>9} {'sampling evals':>14} "
        f"{'ESS/eval':>9} {'ESS/sampling eval':>17} {'max |z|':>8} {'max R-hat':>9} {'time s':>7}"
    )
    for method in methods:
        start = time.perf_counter()
        idata = ds.sample(target, method, num_samples=1000, num_chains=4, seed=seed, progress=False)
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
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
