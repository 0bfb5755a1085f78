"""The diffusion sampler where a bank cannot list the modes: many-well(32), 2^16 modes (issue 15).

Runs ``method="diffusion"`` and ``"gaussian_is"`` at their defaults on the suite's many-well target
(``_suite.py``: the reference N(0, 2^2 I), exact log Z 164.6957) and, as a regression check, on
``narrow_wide d=10`` and ``nine_modes d=2``, and prints one markdown row per run: log Z error, the
reported standard error, ``attrs["reliable"]`` and the warnings raised, the modes banked, every
round's Kish ESS and model choice (0 the score model, -1 the Gaussian part, -2 no model that round),
the share of the many-well pairs in the right well (exact 0.844) or the largest |log(sd / exact
sd)|, target evaluations and seconds. The table of ``docs/diffusion_sampler.md`` ("Many modes")
comes from

    python benchmarks/bench_diffusion_many_modes.py --seeds 0 1 2
    python benchmarks/bench_diffusion_many_modes.py --targets "narrow_wide d=10" "nine_modes d=2" \\
        --methods diffusion --seeds 0
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


def run(problem, method: str, seed: int) -> str:
    """One default run; its markdown row."""
    start = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = ds.sample(problem.target, method, num_samples=2000, seed=seed, progress=False)
    seconds = time.time() - start
    attrs, rounds = idata.posterior.attrs, idata["diffusion"]
    x = torch.as_tensor(idata.posterior["x"].values).reshape(-1, problem.target.dim)
    if problem.name.startswith("many_well"):
        shape = f"right {problem.classify(x)[0]:.3f}"
    else:
        shape = f"sd {float((x.std(0) / problem.sd).log().abs().max()):.3f}"
    flags = [str(w.message)[:70] for w in caught if w.category is RuntimeWarning]
    ess = "/".join(f"{float(e):.0f}" for e in rounds["ess"].values)
    choice = "/".join(str(c) for c in rounds["model_choice"].values.reshape(len(rounds["ess"]), -1)[:, 0])
    return (
        f"| {problem.name} | {method} | {seed} | {attrs['log_normalizer'] - problem.log_z:+.3f} "
        f"| {attrs['log_normalizer_se']:.3f} | {attrs['reliable']} | {attrs['num_modes']} | {ess} | {choice} "
        f"| {shape} | {attrs['num_target_evals']:,} | {seconds:.0f} | {'; '.join(flags) or '-'} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", default=["many_well d=32"], help="names of _suite.suite()")
    parser.add_argument("--methods", nargs="+", default=["diffusion", "gaussian_is"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    from _suite import suite

    problems = suite(True, 2000, 0)
    print(
        "| target | method | seed | log Z error | s.e. | reliable | modes | ESS per round | model choice "
        "| shape | evaluations | seconds | warnings |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | ---: | ---: | --- |")
    for name in args.targets:
        problem = problems[name]()
        for method in args.methods:
            for seed in args.seeds:
                print(run(problem, method, seed), flush=True)


if __name__ == "__main__":
    main()
