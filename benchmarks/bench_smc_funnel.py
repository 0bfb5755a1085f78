"""SMC on Neal's funnel in 10-d, with and without randomised step sizes (``step_jitter``).

Target: ``diffstat.targets.Funnel(10)`` (exact log Z 0, sd of x_1 3), reference N(0, I), the SMC
defaults otherwise. Each setting is run once per seed with ``num_samples`` particles; the columns
are the log Z error, the draws' sd of x_1, their 1% and 99% quantiles of x_1 (exact -6.98, 6.98),
the target evaluations (``attrs["num_target_evals"]``), the number of stages and the seconds.
Settings are SMC options written ``key=value`` (Python literals), ``;`` between options, one per
``--settings`` argument; ``default`` is no option. Figures and the commands that gave them:
``docs/smc_funnel.md``.

    python benchmarks/bench_smc_funnel.py [--seeds 0 1 2] [--particles 1000]
        [--settings default "step_jitter=1.0" ...] [--dim 10]
"""

from __future__ import annotations

import argparse
import ast
import time
import warnings

import torch

import diffstat as ds
from diffstat.targets import Funnel


def parse_setting(text: str) -> dict:
    """``"a=1;b='x'"`` as ``{"a": 1, "b": "x"}``; ``"default"`` as ``{}``."""
    if text == "default":
        return {}
    pairs = (item.split("=", 1) for item in text.split(";") if item.strip())
    return {k.strip(): ast.literal_eval(v.strip()) for k, v in pairs}


def run(dim: int, seed: int, particles: int, options: dict) -> dict:
    target = Funnel(dim).as_target(dtype=torch.float64)
    t0 = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = ds.sample(target, "smc", num_samples=particles, seed=seed, progress=False, **options)
    seconds = time.time() - t0
    x1 = torch.as_tensor(idata.posterior.x.values[0][:, 0])
    attrs = idata.posterior.attrs
    return {
        "log_z": attrs["log_normalizer"],
        "se": attrs["log_normalizer_se"],
        "sd_x1": float(x1.std()),
        "q01": float(torch.quantile(x1, 0.01)),
        "q99": float(torch.quantile(x1, 0.99)),
        "evals": attrs["num_target_evals"],
        "stages": attrs["num_stages"],
        "seconds": seconds,
        "warned": any(issubclass(w.category, RuntimeWarning) for w in caught),
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--particles", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=10)
    parser.add_argument("--settings", nargs="+", default=["default", "step_jitter=1.0"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| setting | seed | log Z err (s.e.) | sd x1 | q01, q99 x1 | evals | stages | s | warned |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for setting in args.settings:
        options = parse_setting(setting)
        for seed in args.seeds:
            r = run(args.dim, seed, args.particles, options)
            print(
                f"| {setting} | {seed} | {r['log_z']:+.3f} ({r['se']:.2f}) | {r['sd_x1']:.2f} | "
                f"{r['q01']:.1f}, {r['q99']:.1f} | {r['evals'] / 1e3:.0f}k | {r['stages']} | "
                f"{r['seconds']:.0f} | {'yes' if r['warned'] else 'no'} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
