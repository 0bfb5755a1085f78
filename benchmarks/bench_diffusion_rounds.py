"""Honest error bars of the diffusion sampler: per-round log Z, the rounds' agreement and the last
round's ESS fraction at the defaults, on targets of the suite (``_suite.py``) and posteriordb.

Prints one markdown row per run: log Z error (where an exact or literature value exists), the
reported standard error, Cochran's Q p-value of the used rounds, the last round's ESS fraction,
and the flags the sampler raised (``attrs["reliable"]`` 0, with its warning). The table of
``docs/diffusion_sampler.md`` ("Judging a run as a whole") comes from

    python benchmarks/bench_diffusion_rounds.py --targets "nine_modes d=2" "narrow_wide d=10" \\
        "banana d=6" "gmm40 d=2" "funnel d=10" "ionosphere d=34" "sonar d=61" --seeds 0 1 2
    python benchmarks/bench_diffusion_rounds.py --fast-posteriordb --seeds 0 1
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import diffstat as ds  # noqa: E402
from diffstat import posteriordb as pdb  # noqa: E402


def run(target, truth, name: str, seed: int) -> str:
    """One default run; its markdown row."""
    start = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = ds.sample(target, "diffusion", num_samples=1000, seed=seed, progress=False)
    attrs, rounds = idata.posterior.attrs, idata["diffusion"]
    last = float(rounds["ess_fraction"].values[-1])
    err = "" if truth is None else f"{attrs['log_normalizer'] - truth:+.3f}"
    flags = [str(w.message).split(":")[1][:60].strip() for w in caught if w.category is RuntimeWarning]
    return (
        f"| {name} | {seed} | {err} | {attrs['log_normalizer_se']:.3f} | {attrs['round_agreement_p']:.2g} "
        f"| {last:.3f} | {attrs['reliable']} | {'; '.join(flags) or '-'} | {attrs['num_target_evals']:,} "
        f"| {time.time() - start:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="*", default=[], help="names of _suite.suite() problems")
    parser.add_argument("--posteriors", nargs="*", default=[], help="posteriordb names")
    parser.add_argument(
        "--fast-posteriordb", action="store_true", help="the FAST subset of bench_posteriordb"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    from _suite import suite

    problems = suite(True, 1000, 0)
    names = list(args.posteriors)
    if args.fast_posteriordb:
        from bench_posteriordb import FAST

        names += list(FAST)
    print(
        "| target | seed | log Z error | s.e. | agreement p | last ESS fraction | reliable | warning "
        "| evals | s |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: |")
    for name in args.targets:
        problem = problems[name]()
        for seed in args.seeds:
            print(run(problem.target, problem.log_z, name, seed), flush=True)
    for name in names:
        target = pdb.load(name, dtype=torch.float64).target
        for seed in args.seeds:
            print(run(target, None, name, seed), flush=True)


if __name__ == "__main__":
    main()
