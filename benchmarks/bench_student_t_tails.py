"""Are NUTS and HMC biased on a heavy-tailed target, or only noisy? (``docs/audit.md``)

    python benchmarks/bench_student_t_tails.py --methods nuts hmc --seeds 0 1 2 3

On the 4-d multivariate t with 5 degrees of freedom, ``|x|^2 / 4`` follows an F(4, 5) law, so
``U = F_cdf(|x|^2 / 4)`` is uniform under the exact target. Per run it prints the per-coordinate sds and
their pooled value (exact sqrt(5/3) = 1.291), the mean of U (0.5), the shares of U above 0.99 and 0.999
(0.01, 0.001), and the ESS of the coordinates' bulk (what the diagnostics check) beside the ESS of U and
of ``lp``, which mix like the radial direction.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import warnings

import arviz as az
import numpy as np
import scipy.stats as st
import torch

import diffstat as ds

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from audit_cases import student_t  # noqa: E402

torch.set_num_threads(1)


def one(method: str, seed: int, num_samples: int) -> str:
    target, _ = student_t(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = ds.sample(target, method, num_samples=num_samples, seed=seed, progress=False)
    x = idata.posterior["x"].values
    u = st.f.cdf((x**2).sum(-1) / 4, 4, 5.0)
    flat = x.reshape(-1, 4)
    lp = idata.sample_stats["lp"].values
    ess_x = idata.posterior.attrs.get("ess_bulk_min", float("nan"))
    warned = [str(w.message)[:60] for w in caught if issubclass(w.category, RuntimeWarning)]
    return (
        f"| {method} | {seed} | {np.array2string(flat.std(0), precision=3)} "
        f"| {np.sqrt((flat**2).mean()):.3f} "
        f"| {u.mean():.3f} | {(u > 0.99).mean():.4f} | {(u > 0.999).mean():.4f} | {ess_x:.0f} "
        f"| {float(az.ess(u)):.0f} | {float(az.ess(lp)):.0f} | {' / '.join(warned) or '-'} |"
    )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=["nuts", "hmc"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num-samples", type=int, default=1000)
    args = parser.parse_args()
    print(
        "| method | seed | sds | pooled sd | mean U | P(U > 0.99) | P(U > 0.999) "
        "| ESS x (min) | ESS U | ESS lp | warnings |"
    )
    print("| --- " * 11 + "|")
    for method in args.methods:
        for seed in args.seeds:
            print(one(method, seed, args.num_samples), flush=True)


if __name__ == "__main__":
    main()
