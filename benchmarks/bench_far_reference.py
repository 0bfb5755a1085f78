"""Tempering from the default reference when the posterior is far from it (docs/far_reference.md).

    python benchmarks/bench_far_reference.py decisions
    python benchmarks/bench_far_reference.py stages --distances 5 10 20 40 80 160
    python benchmarks/bench_far_reference.py runs --cases far_gauss far50_10d --methods smc ais pt diffusion

``decisions``: the pilot's decision (``diffstat.tempering.auto_reference.decide``) on every torch case
of ``benchmarks/audit_cases.py`` and the sixth audit's ``far_gauss`` and ``tiny_scale`` (copied
from ``benchmarks/audit_cases_sixth_b.py`` on branch ``audit6b``): the nearest peak's distance, the
reference chosen, the pilot's evaluations. ``stages``: adaptive tempered SMC (1,000 particles,
defaults, seed 0) on N(D e_1, I) in 5-d from N(0, I) (the path without the pilot) and from the
default path: stages, evaluations, beta reached. ``runs``: ``ds.sample`` at defaults (seed 0,
1,000 draws) on the far cases, errors against the exact answer.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time
import warnings

import numpy as np
import torch

import diffstat as ds
from diffstat.tempering.auto_reference import decide
from diffstat.tempering.core import initial_particles
from diffstat.tempering.path import GeometricPath, make_path
from diffstat.tempering.smc import adaptive_tempered_smc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from audit_cases import CASES  # noqa: E402

torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=FutureWarning)
F64 = torch.float64
LOG_2PI = math.log(2 * math.pi)


def _shifted_gaussian(m: torch.Tensor):
    """N(m, I), unnormalised: log Z = (d/2) log(2 pi)."""

    def log_prob(x):
        return -0.5 * ((x - m.to(x.dtype)) ** 2).sum(-1)

    d = m.shape[0]
    return ds.Target(log_prob, d, dtype=F64), dict(mean=m.numpy(), sd=np.ones(d), log_z=0.5 * d * LOG_2PI)


def far_gauss():
    """The sixth audit's case: N(m, I) in 5-d, m = 1000 (1, -1, 1, -1, 1)."""
    return _shifted_gaussian(1000.0 * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0], dtype=F64))


def far50_10d():
    """N(50 (1, ..., 1), I) in 10-d (158 sds of N(0, I) from the origin)."""
    return _shifted_gaussian(50.0 * torch.ones(10, dtype=F64))


def tiny_scale():
    """The sixth audit's case: 3-d Gaussian, sds (1e-3, 2e-3, 5e-4), mean (0.5, -2, 3), corr 0.9."""
    sd = torch.tensor([1e-3, 2e-3, 5e-4], dtype=F64)
    corr = torch.eye(3, dtype=F64)
    corr[0, 1] = corr[1, 0] = 0.9
    cov = sd[:, None] * corr * sd[None, :]
    mean = torch.tensor([0.5, -2.0, 3.0], dtype=F64)
    prec = torch.linalg.inv(cov)

    def log_prob(x):
        z = x - mean.to(x.dtype)
        return -0.5 * ((z @ prec.to(x.dtype)) * z).sum(-1)

    log_z = 1.5 * LOG_2PI + 0.5 * float(torch.logdet(cov))
    return ds.Target(log_prob, 3, dtype=F64), dict(mean=mean.numpy(), sd=sd.numpy(), log_z=log_z)


FAR = {"far_gauss": far_gauss, "far50_10d": far50_10d, "tiny_scale": tiny_scale}


def decisions() -> None:
    print("| case | dim | reference | nearest peak (sds) | pilot evals |")
    print("| --- | --- | --- | --- | --- |")
    for name, make in {**CASES, **FAR}.items():
        target = make()[0]
        path = make_path(target)
        if path.reference_source != "auto":  # a Pyro model (likelihood tempering) or own reference
            print(f"| {name} | {target.dim} | {path.reference_source} (no pilot) | - | 0 |")
            continue
        info = decide(target)
        print(
            f"| {name} | {target.dim} | {info['reference']} | {info['distance']:.1f} | "
            f"{info['pilot_evals']:,} |"
        )


def stages(distances) -> None:
    print("| D | path | stages | beta reached | evals | s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for dist in distances:
        for kind in ("N(0, I)", "default"):
            m = torch.zeros(5, dtype=F64)
            m[0] = dist
            target = _shifted_gaussian(m)[0]
            path = GeometricPath(target) if kind == "N(0, I)" else make_path(target)
            gen = torch.Generator().manual_seed(0)
            t0 = time.time()
            x0 = initial_particles(path, 1000, gen, "cpu")
            try:
                out = adaptive_tempered_smc(gen, path, x0)
                k, beta = len(out.stages["beta"]), float(out.stages["beta"][-1])
            except RuntimeError as err:
                k, beta = 1000, float(str(err).split("beta = ")[2].split(")")[0])
            name = kind if kind == "N(0, I)" else f"default ({path.reference_source})"
            print(
                f"| {dist:g} | {name} | {k} | {beta:.3g} | {target.num_target_evals:,} | "
                f"{time.time() - t0:.0f} |"
            )


def runs(cases, methods, seed: int) -> None:
    print(
        "| case | method | mean err (sd) | sd err | log Z err | log Z se | evals | pilot evals | s | error |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for case in cases:
        for method in methods:
            target, exact = FAR[case]()
            t0 = time.time()
            try:
                idata = ds.sample(target, method, num_samples=1000, seed=seed, progress=False)
            except Exception as err:  # noqa: BLE001 - a crash is a row
                print(f"| {case} | {method} | | | | | | | {time.time() - t0:.0f} | {str(err)[:120]} |")
                continue
            x = idata.posterior["x"].values.reshape(-1, target.dim)
            mean_err = np.max(np.abs(x.mean(0) - exact["mean"]) / exact["sd"])
            sd_err = np.max(np.abs(x.std(0) / exact["sd"] - 1))
            a = idata.posterior.attrs
            lz = a.get("log_normalizer")
            lz_err = "-" if lz is None else f"{lz - exact['log_z']:.3f}"
            se = a.get("log_normalizer_se")
            se = "-" if se is None else f"{se:.3f}"
            pilot = getattr(target, "_default_reference", {}).get("pilot_evals", 0)
            print(
                f"| {case} | {method} | {mean_err:.3f} | {sd_err:.3f} | {lz_err} | {se} | "
                f"{target.num_target_evals:,} | {pilot:,} | {time.time() - t0:.0f} | - |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["decisions", "stages", "runs"])
    parser.add_argument("--distances", nargs="+", type=float, default=[5, 10, 20, 40, 80, 160])
    parser.add_argument("--cases", nargs="+", default=["far_gauss", "far50_10d"])
    parser.add_argument("--methods", nargs="+", default=["smc", "ais", "pt", "diffusion"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.what == "decisions":
        decisions()
    elif args.what == "stages":
        stages(args.distances)
    else:
        runs(args.cases, args.methods, args.seed)


if __name__ == "__main__":
    main()
