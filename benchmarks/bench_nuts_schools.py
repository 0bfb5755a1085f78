"""NUTS at its defaults on Eight Schools, centred and non-centred (issue 13, ``docs/nuts.md``): per
seed, what the kernel recorded (divergences, E-BFMI per chain, step size, metric, acceptance, tree
depth), the error against the quadrature answer, and every problem the RuntimeWarning lists (not only
its first line, which is R-hat's whenever R-hat is flagged).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_nuts_schools.py --cases schools_c --seeds 3 4 5
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import time
import warnings

import numpy as np
import torch

import diffstat as ds
from diffstat.diagnostics import e_bfmi

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from audit_cases import CASES  # noqa: E402
from bench_audit import score  # noqa: E402

torch.set_num_threads(1)


def run(case: str, seed: int, num_samples: int) -> dict:
    """One ``ds.sample(target, "nuts", num_samples, seed)`` and its figures."""
    target, exact = CASES[case]()
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = ds.sample(target, "nuts", num_samples=num_samples, seed=seed, progress=False)
    seconds = time.perf_counter() - start
    stats, attrs = idata.sample_stats, idata.posterior.attrs
    problems = []  # each problem of the diagnostics' warning, the first words of any other warning
    for message in (str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)):
        if "the result is unreliable" not in message:
            problems.append(message[:60])
        lines = [line[4:] for line in message.splitlines() if line.startswith("  - ")]
        problems += [re.split(r"[:(]", line)[0].strip() for line in lines]
    tau = idata.posterior["tau"].values
    return {
        "case": case,
        "seed": seed,
        "divergent": int(stats["diverging"].values.sum()),
        "e_bfmi": " ".join(f"{b:.2f}" for b in e_bfmi(stats["energy"].values)),
        "step": f"{float(attrs['step_size']):.3f}",
        "metric": attrs.get("metric"),
        "accept": f"{float(stats['acceptance_rate'].values.mean()):.2f}",
        "depth": f"{float(stats['tree_depth'].values.mean()):.2f}",
        "rhat": f"{float(attrs.get('rhat_max', np.nan)):.3f}",
        "mean_err": f"{score(idata, exact)['mean_err']:.3f}",
        "tau": f"{tau.mean():.2f} ({float(exact['sites']['tau'][0][0]):.2f})",
        "sec": f"{seconds:.0f}",
        "warned": "; ".join(problems) or "-",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["schools_c", "schools_nc"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--num-samples", type=int, default=1000)
    args = parser.parse_args()
    rows = [run(c, s, args.num_samples) for c in args.cases for s in args.seeds]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + " --- |" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
