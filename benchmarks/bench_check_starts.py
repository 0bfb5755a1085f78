"""How many screened starts the check for missed modes needs after a short run (``docs/audit.md``,
fourth round): ``narrow_wide(11, scales=(0.35, 1))``, whose heavy narrow mode (3/4 of the mass)
holds about 0.2% of the scaled N(0, I) starts' basins.

    python benchmarks/bench_check_starts.py --power 1024 2048 3072 4096 --seeds 40 --first-seed 200
    python benchmarks/bench_check_starts.py --runs nuts hmc --seeds 6
    python benchmarks/bench_check_starts.py --basins 0.5 1 1.5 2 4

``--power``: the check alone (:func:`~diffstat.modes.coverage.missed_modes` as the MCMC samplers
call it: no evidence, the first 256 starts climbing, the rest screened) on 4,000 exact draws of the
light mode, from that many N(0, I) starts; prints on how many seeds it finds the heavy mode (missed
share above 0.05) and its evaluations. ``--runs``: each method at its defaults, seeds 0 to
``seeds - 1``: the heavy mode's share of the draws, the missed share, the check's evaluations and
whether the run warned. ``--basins``: the share of 20,000 N(0, I) draws, scaled by each factor,
that 30 climbing steps (step 0.1, identity metric) take into the heavy mode's basin.
"""

from __future__ import annotations

import argparse
import warnings

import torch

import diffstat as ds
from diffstat.modes.climb import hill_climb
from diffstat.modes.check import NUM_CHECK_STARTS, SCREEN_STEPS
from diffstat.modes.coverage import MAX_MISSED_SHARE, missed_modes
from diffstat.targets.two_modes import narrow_wide

torch.set_num_threads(1)
F64 = torch.float64


def power(num_starts: int, seeds: int, first_seed: int) -> None:
    mix = narrow_wide(11, scales=(0.35, 1.0))
    target = mix.as_target(dtype=F64)
    found, evals = 0, []
    for seed in range(first_seed, first_seed + seeds):
        gen = torch.Generator().manual_seed(seed)
        draws = mix.means[1] + torch.randn(4000, 11, generator=gen, dtype=F64)
        starts = torch.randn(num_starts, 11, generator=gen, dtype=F64)
        res = missed_modes(target, draws, None, starts, gen, keep=NUM_CHECK_STARTS, screen_steps=SCREEN_STEPS)
        found += res.share > MAX_MISSED_SHARE
        evals.append(res.num_evals)
    print(f"| {num_starts} | {found} of {seeds} | {min(evals):,} to {max(evals):,} |", flush=True)


def basins(scales) -> None:
    mix = narrow_wide(11, scales=(0.35, 1.0))
    target = mix.as_target(dtype=F64)
    z = torch.randn(20_000, 11, generator=torch.Generator().manual_seed(0), dtype=F64)
    for s in scales:
        x = s * z
        lp, g = target.log_prob_and_grad(x)
        h = torch.full((x.shape[0],), 0.1, dtype=F64)
        y, _, _ = hill_climb(target.log_prob_and_grad, x, lp, g, 30, h, metric=torch.eye(11, dtype=F64))
        print(f"| {s} | {float((mix.assign(y) == 0).double().mean()):.2%} |", flush=True)


def runs(method: str, seeds: int) -> None:
    mix = narrow_wide(11, scales=(0.35, 1.0))
    for seed in range(seeds):
        target = mix.as_target(dtype=F64)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            idata = ds.sample(target, method, num_samples=1000, seed=seed, progress=False)
        attrs = idata.posterior.attrs
        x = torch.as_tensor(idata.posterior.x.values).reshape(-1, 11)
        heavy = float((mix.assign(x) == 0).double().mean())
        warned = any("no draw reaches" in str(w.message) for w in caught)
        print(
            f"| {method} | {seed} | {heavy:.3f} | {attrs['missed_mode_share']:.3f} | "
            f"{attrs['mode_check_evals']:,} | {attrs['num_target_evals']:,} | {'yes' if warned else 'no'} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--power", nargs="*", type=int, default=None, metavar="STARTS")
    parser.add_argument("--runs", nargs="*", default=None, metavar="METHOD")
    parser.add_argument("--basins", nargs="*", type=float, default=None, metavar="SCALE")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--first-seed", type=int, default=100)
    args = parser.parse_args()
    if args.power:
        print("| starts screened | heavy mode found | check evaluations |\n| ---: | --- | --- |")
        for num in args.power:
            power(num, args.seeds, args.first_seed)
    if args.basins:
        print("| scale | starts in the heavy basin |\n| ---: | ---: |")
        basins(args.basins)
    if args.runs:
        print("| method | seed | heavy share of draws | missed share | check evals | run evals | warned |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
        for method in args.runs:
            runs(method, args.seeds)


if __name__ == "__main__":
    main()
