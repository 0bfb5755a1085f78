"""NUTS warm-up with the start phase's Laplace metric on the audit's ``varying_slopes`` (21-d Pyro
model, non-centred varying intercepts and slopes): the first metric's check
(``diffstat.mcmc.warmup``, ``_FirstMetricCheck``) printed iteration by iteration, then the run's
evaluations, time and mean tree depth of the draws. Results: ``docs/nuts.md`` section (d).

Run:
    python benchmarks/bench_first_metric.py [--warmup 40] [--samples 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch

import diffstat as ds
import diffstat.mcmc.warmup as warmup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import audit_cases  # noqa: F401  (registers the sixth round's cases)
    import audit_cases_sixth_a  # noqa: F401

    torch.set_num_threads(1)
    target, _ = audit_cases.CASES["varying_slopes"]()
    update = warmup._FirstMetricCheck.update

    def spy(self, info, *rest):
        out = update(self, info, *rest)
        score = None if self.trial_of is None else round(self.trial_of[0], 5)
        print(f"depths {info.tree_depth.tolist()} metric {out[1]} first-metric score {score}", flush=True)
        return out

    warmup._FirstMetricCheck.update = spy
    t0 = time.time()
    idata = ds.sample(
        target, "nuts", num_samples=args.samples, num_warmup=args.warmup, seed=args.seed, progress=False
    )
    attrs = idata.posterior.attrs
    depth = idata.sample_stats["tree_depth"].values.mean(1).round(2).tolist()
    evals, kind = attrs["num_target_evals"], attrs.get("metric")
    print(f"{time.time() - t0:.0f} s, evals {evals}, metric {kind}, mean tree depth per chain {depth}")


if __name__ == "__main__":
    main()
