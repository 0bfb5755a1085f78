"""The diffusion sampler's coverage check (``diffstat/diffusion/coverage.py``) on the issue-15 suite
(``_suite.py``): one line per (target, seed) at defaults, with the share of the exploration's SMC
particles that the last used round's proposal misses (``attrs['coverage_missed']``: where
p / (Z q) > 100), where the SMC bridge started (``none``, ``proposal`` or ``reference``), ``reliable``,
log Z and the errors of ``run_all.evaluate`` (mode TV, mean and sd errors, log Z error), evaluations,
seconds and the RuntimeWarnings' first words. ``docs/diffusion_coverage.md`` holds the figures.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_diffusion_coverage.py \\
        --targets "narrow_wide d=10" "funnel d=10" --seeds 0 1

The audit's cases print the same column through ``bench_diffusion_tails.py`` ("missed share").
"""

from __future__ import annotations

import argparse
import time
import warnings

import diffstat as ds
from _suite import suite
from run_all import evaluate


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--targets", nargs="+", default=list(suite(False, 0, 0)))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    args = parser.parse_args()
    for name in args.targets:
        for seed in args.seeds:
            problem = suite(False, 20_000, seed)[name]()
            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                idata = ds.sample(problem.target, "diffusion", num_samples=2000, seed=seed, progress=False)
            seconds = time.perf_counter() - start
            a = idata.posterior.attrs
            scores = {k: v for k, v in evaluate(problem, idata, seed).items() if isinstance(v, float)}
            said = [str(w.message)[:80] for w in caught if issubclass(w.category, RuntimeWarning)]
            cells = [
                name,
                str(seed),
                f"{a['coverage_missed']:.3f}",
                a["bridge_start"],
                str(a["reliable"]),
                f"{a['log_normalizer']:.3f}",
                ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if k != "seconds"),
                f"{a['num_target_evals']:,}",
                f"{seconds:.0f}",
                " / ".join(said) or "-",
            ]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
