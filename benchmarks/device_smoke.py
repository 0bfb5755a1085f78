"""Run every method of ds.sample (and the divide-and-conquer combiners) on a device, e.g. a GPU.

    python benchmarks/device_smoke.py --device cuda

Prints, per method, the heavy-mode weight on a 2-d two-component mixture (exact 0.7), the log Z
estimate where there is one (exact 0.5), the number of target evaluations and the seconds, or
the error the method raised. Exit status 1 if any method failed.
"""

from __future__ import annotations

import argparse
import time
import traceback

import torch

import diffstat as ds
from diffstat.targets import GaussianMixture

FAST = {
    "mala": dict(num_warmup=200),
    "hmc": dict(num_warmup=200, num_leapfrog=5),
    "rwm": dict(num_warmup=200),
    "ais": dict(num_temperatures=50),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-samples", type=int, default=1000)
    args = parser.parse_args()
    mixture = GaussianMixture([[-2.0, 0.0], [2.0, 0.5]], [0.7, 0.3], scales=[0.6, 0.8], log_normalizer=0.5)
    failures = 0
    print(f"device {args.device}; exact heavy weight 0.7, exact log Z 0.5")
    for method in ds.available_methods():
        target = mixture.as_target(dtype=torch.float32)
        start = time.perf_counter()
        try:
            idata = ds.sample(
                target,
                method,
                num_samples=args.num_samples,
                seed=0,
                progress=False,
                device=args.device,
                **FAST.get(method, {}),
            )
        except Exception:  # report and go on: this script is a survey
            failures += 1
            print(f"{method:>10}: FAILED\n{traceback.format_exc(limit=3)}")
            continue
        x = torch.as_tensor(idata.posterior["x"].values).reshape(-1, 2).double()
        weight = float((mixture.assign(x) == 0).double().mean())
        log_z = idata.posterior.attrs.get("log_normalizer", float("nan"))
        print(
            f"{method:>10}: heavy weight {weight:.3f}  log Z {log_z:7.3f}  "
            f"evals {idata.posterior.attrs['num_target_evals']:>9}  {time.perf_counter() - start:6.1f} s"
        )
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
