"""SMC on Neal's funnel in 10-d, with and without randomised step sizes (``step_jitter``).

Target: ``diffstat.targets.Funnel(10)`` (exact log Z 0, sd of x_1 3), reference N(0, I), the SMC
defaults otherwise. Each setting is run once per seed with ``num_samples`` particles; the columns
are the log Z error, the draws' sd of x_1, their 1% and 99% quantiles of x_1 (exact -6.98, 6.98),
the target evaluations (``attrs["num_target_evals"]``), the number of stages and the seconds.
Settings are SMC options written ``key=value`` (Python literals), ``;`` between options, one per
``--settings`` argument; ``default`` is no option. Figures and the commands that gave them:
``docs/smc_funnel.md``.

``--checks`` runs the same settings where SMC is right today, 1000 particles unless ``--particles``:

* ``gauss``: a 10-d Gaussian, equicorrelated at 0.9, sds from 0.1 to 10 (log-spaced), mean 1, log Z 0;
  columns: log Z error, the largest |mean error| and |sd / exact sd - 1| over coordinates;
* ``mixture6``: the 6-d three-mode mixture of ``tests/tempering/test_smc.py`` (weights 0.5 / 0.3 / 0.2,
  sds 0.7 / 1.0 / 0.85, log Z 2.3), with that test's ``target_ess=0.9``; columns: log Z error, the
  total variation of the mode shares;
* posteriordb posteriors (``--posteriors``): the largest mean and sd errors in reference sds against
  Stan's reference draws (``diffstat.posteriordb``), log Z not known.

    python benchmarks/bench_smc_funnel.py [--seeds 0 1 2] [--particles 1000]
        [--settings default "step_jitter=1.0" ...] [--dim 10]
    python benchmarks/bench_smc_funnel.py --checks [--targets gauss mixture6 POSTERIOR ...]
        [--settings ...] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import ast
import math
import time
import warnings

import torch

import diffstat as ds
from diffstat.targets import Funnel, GaussianMixture


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


def check_target(name: str):
    """``(target, evaluate)`` for a check target: ``evaluate(idata) -> (log Z error or nan, err1,
    err2)`` (module docstring)."""
    if name == "gauss":
        d = 10
        sd = torch.logspace(-1, 1, d, dtype=torch.float64)
        corr = torch.full((d, d), 0.9, dtype=torch.float64).fill_diagonal_(1.0)
        mvn = torch.distributions.MultivariateNormal(
            torch.ones(d, dtype=torch.float64), corr * sd * sd[:, None]
        )
        target = ds.Target(mvn.log_prob, d, dtype=torch.float64)

        def evaluate(idata):
            x = torch.as_tensor(idata.posterior.x.values[0])
            mean_err = float(((x.mean(0) - 1) / sd).abs().max())
            return idata.posterior.attrs["log_normalizer"], mean_err, float((x.std(0) / sd - 1).abs().max())

        return target, evaluate, {}
    if name == "mixture6":
        means = torch.tensor([[2.5, 2.5, 0, 0, 0, 0], [-2.5, -2.5, 0, 0, 0, 0], [0, 0, 2.5, 2.5, 0, 0]])
        gm = GaussianMixture(means, [0.5, 0.3, 0.2], scales=[0.7, 1.0, 0.85], log_normalizer=2.3)

        def evaluate(idata):
            x = torch.as_tensor(idata.posterior.x.values[0])
            share = torch.bincount(gm.assign(x), minlength=3).to(torch.float64) / x.shape[0]
            tv = 0.5 * float((share - gm.weights).abs().sum())
            return idata.posterior.attrs["log_normalizer"] - 2.3, tv, math.nan

        return gm.as_target(dtype=torch.float64), evaluate, {"target_ess": 0.9}
    from diffstat import posteriordb

    post = posteriordb.load(name, dtype=torch.float64)

    def evaluate(idata):
        cmp = post.compare(idata)
        return math.nan, cmp.max_mean_error, cmp.max_sd_error

    return post.target, evaluate, {}


def checks(args) -> None:
    print("| target | setting | seed | log Z err | err 1 | err 2 | evals | stages | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.targets:
        target, evaluate, base = check_target(name)
        for setting in args.settings:
            options = {**base, **parse_setting(setting)}
            for seed in args.seeds:
                t0 = time.time()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    idata = ds.sample(
                        target, "smc", num_samples=args.particles, seed=seed, progress=False, **options
                    )
                seconds = time.time() - t0
                log_z, e1, e2 = evaluate(idata)
                attrs = idata.posterior.attrs
                print(
                    f"| {name} | {setting} | {seed} | {log_z:+.3f} | {e1:.3f} | {e2:.3f} | "
                    f"{attrs['num_target_evals'] / 1e3:.0f}k | {attrs['num_stages']} | {seconds:.0f} |",
                    flush=True,
                )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--particles", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=10)
    parser.add_argument("--settings", nargs="+", default=["default", "step_jitter=1.0"])
    parser.add_argument("--checks", action="store_true", help="the targets where SMC is right today")
    parser.add_argument("--targets", nargs="+", default=["gauss", "mixture6"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.checks:
        checks(args)
        return
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
