"""AIS on the collinear regression and PT's log Z standard error (issue 13, ``docs/ais_pt_errors.md``).

    python benchmarks/bench_ais_pt_errors.py --parts ais --seeds 0 1 2 3 4 5
    python benchmarks/bench_ais_pt_errors.py --parts pt --cases ring laplace4 ridge2 --seeds $(seq 0 19)

* ``ais``: ``ds.sample(collinear(), "ais", num_samples=1000, seed=s)`` at defaults per seed: the
  largest |mean error| over the coefficients in posterior sds, the RMS of those errors, the final
  ESS, log Z error with its standard error and their ratio, the thermodynamic length and number of
  temperatures of the plan, target evaluations, RuntimeWarnings.
* ``pt``: ``ds.sample(target, "pt", num_samples=1000, seed=s, check_modes=False)`` (4 chains) per
  seed on audit cases with an exact log Z: the error, the reported standard error, its two parts
  (the MCMC standard error of the delta-method series from the multi-chain ESS, and the spread of
  the 4 chains' estimates over 2, which was the whole standard error before issue 13), Cochran's p
  of the chains, the stones' largest Pareto k; then per case the RMS and mean of |error| / se for
  each error (|N(0,1)| has RMS 1 and mean 0.80) and the count beyond 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

import diffstat as ds
import diffstat.tempering.pt_phases as phases

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "tempering"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from audit_cases import CASES  # noqa: E402
from correlated_targets import collinear  # noqa: E402


def ais_part(seeds) -> None:
    t = collinear()
    for seed in seeds:
        t.num_target_evals = 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            idata = ds.sample(t, "ais", num_samples=1000, seed=seed, progress=False)
        a = idata.posterior.attrs
        x = idata.posterior["x"].values.reshape(-1, t.dim)
        z = (x[:, :-1].mean(0) - t.beta_mean.numpy()) / t.beta_sd.numpy()
        err = a["log_normalizer"] - t.log_evidence
        warns = [str(w.message)[:60] for w in caught if issubclass(w.category, RuntimeWarning)]
        print(
            f"ais seed {seed}: max |mean err| {np.abs(z).max():.3f} rms {np.sqrt((z**2).mean()):.3f} "
            f"ESS {a['ess']:.0f} log Z err {err:+.4f} se {a['log_normalizer_se']:.4f} "
            f"({err / a['log_normalizer_se']:+.2f}) length {a['thermodynamic_length']:.2f} "
            f"K {a['num_stages']} evals {a['num_target_evals']:,}",
            warns,
            flush=True,
        )


def pt_part(cases, seeds) -> None:
    captured = {}
    original = phases.stepping_stones

    def capturing(terms):
        captured["terms"], captured["ev"] = terms, original(terms)
        return captured["ev"]

    phases.stepping_stones = capturing
    for case in cases:
        target, exact = CASES[case]()
        rows = []
        for seed in seeds:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds.sample(target, "pt", num_samples=1000, seed=seed, progress=False, check_modes=False)
            ev, terms = captured["ev"], captured["terms"]
            u = torch.exp(terms - ev.increments).sum(-1).T
            parts = (phases._mean_se(u), float(ev.chain_log_z.std() / math.sqrt(terms.shape[1])))
            err = ev.log_z - exact["log_z"]
            rows.append((err, ev.se, *parts))
            print(
                f"{case} seed {seed}: err {err:+.4f} se {ev.se:.4f} (ESS part {parts[0]:.4f}, "
                f"chains' spread {parts[1]:.4f}) p {ev.agreement_p:.2g} k {ev.pareto_k:.2f}",
                flush=True,
            )
        r = np.array(rows)
        for name, col in (("reported", 1), ("ESS part", 2), ("spread (before)", 3)):
            z = np.abs(r[:, 0] / r[:, col])
            print(
                f"{case} {name}: rms |err|/se {np.sqrt((z**2).mean()):.2f}, mean {z.mean():.2f}, "
                f"max {z.max():.2f}, beyond 2: {int((z > 2).sum())} of {len(z)}",
                flush=True,
            )
    phases.stepping_stones = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["ais", "pt"])
    parser.add_argument("--cases", nargs="+", default=["ring", "laplace4", "ridge2"])
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(20)))
    args = parser.parse_args()
    if "ais" in args.parts:
        ais_part(args.seeds)
    if "pt" in args.parts:
        pt_part(args.cases, args.seeds)


if __name__ == "__main__":
    main()
