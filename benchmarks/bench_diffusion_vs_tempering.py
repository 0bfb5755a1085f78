"""Diffusion sampler against adaptive SMC tempering on the 10-d narrow-heavy / wide-light mixture.

Target (REFERENCES.md, ``diffstat.targets.narrow_wide``): 0.75 N(1.5 1, 0.4^2 I) + 0.25 N(-1.5 1, I)
in d = 10, log Z = 1.3 here. Adaptive SMC tempering (``"smc"``) starts from N(0, 4^2 I) and, as
REFERENCES.md measured, loses the heavy narrow mode. The diffusion sampler explores from N(0, I)
at start scales 0.5, 1, 2, 4 (so up to the same N(0, 4^2 I)), banks the modes, restocks them
evenly, fits one score model per mode and corrects by importance weights. Printed per method and
seed: the heavy mode's weight among the draws (nearest component; exact 0.75), the log Z error
with its standard error, the modes found, the last round's importance ESS, target evaluations and
seconds.

    python benchmarks/bench_diffusion_vs_tempering.py [--seeds 0 1 2] [--particles 2000]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import diffstat as ds
from diffstat.targets import narrow_wide

LOG_Z = 1.3


def run(method: str, seed: int, args, **options) -> dict:
    mix = narrow_wide(10, log_normalizer=LOG_Z)
    target = mix.as_target(dtype=torch.float64)
    start = time.perf_counter()
    idata = ds.sample(target, method, seed=seed, progress=False, **options)
    elapsed = time.perf_counter() - start
    attrs = idata.posterior.attrs
    x = torch.as_tensor(idata.posterior[target.name].values).reshape(-1, mix.dim)
    row = {
        "heavy": float((mix.assign(x) == 0).double().mean()),
        "logz_err": float(attrs["log_normalizer"] - LOG_Z),
        "se": float(attrs.get("log_normalizer_se", math.nan)),
        "evals": int(attrs["num_target_evals"]),
        "time": elapsed,
        "modes": attrs.get("num_modes", "-"),
        "ess": "-",
    }
    if "diffusion" in idata.groups():
        row["ess"] = f"{float(idata['diffusion']['ess_fraction'].values[-1]):.3f}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--particles", type=int, default=2000, help="SMC particles")
    parser.add_argument("--num-explore", type=int, default=4000, help="diffusion exploration chains")
    args = parser.parse_args()
    torch.set_num_threads(1)
    d = 10
    wide = torch.distributions.Independent(
        torch.distributions.Normal(
            torch.zeros(d, dtype=torch.float64), 4 * torch.ones(d, dtype=torch.float64)
        ),
        1,
    )
    configs = [("diffusion", "diffusion", dict(num_samples=10_000, num_explore=args.num_explore))]
    if "smc" in ds.available_methods():
        configs.append(
            (
                "smc",
                "smc (reference N(0, 16 I))",
                dict(num_samples=args.particles, num_chains=1, reference=wide),
            )
        )
    else:
        print("method 'smc' is not available in this tree: diffusion only")
    print(
        f"{'method':<30}{'seed':>5}{'heavy':>8}{'logZ err':>10}{'se':>8}"
        f"{'modes':>6}{'ESS frac':>9}{'evals':>10}{'seconds':>9}"
    )
    for method, label, options in configs:
        for seed in args.seeds:
            r = run(method, seed, args, **options)
            print(
                f"{label:<30}{seed:>5}{r['heavy']:>8.3f}{r['logz_err']:>+10.3f}{r['se']:>8.3f}{str(r['modes']):>6}{r['ess']:>9}{r['evals']:>10d}{r['time']:>9.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
