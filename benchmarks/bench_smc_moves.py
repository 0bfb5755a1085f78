"""SMC moves on correlated and multimodal posteriors: the old defaults against the new, side by side.

Targets (``tests/tempering/correlated_targets.py``, each with exact answers):

* ``regression``: Bayesian linear regression, 5 predictors equicorrelated at 0.85, n = 100, conjugate
  normal-inverse-gamma prior, sampled in (beta, log sigma); likelihood tempering from the prior;
* ``ar5``: an AR(5) model (phi = 1.2, -0.1, -0.2, 0.1, -0.1) on 200 simulated values, the same prior
  on its conditional likelihood;
* ``mixture``: 6-d mixture, weights 0.5 / 0.3 / 0.2, three different full covariances, from N(0, 36 I);
* ``mixture_iso``: the 6-d mixture of ``tests/tempering/test_smc.py`` (isotropic components of sd
  0.7 / 1.0 / 0.85, means 2.5 apart per coordinate), from N(0, 36 I), as in issue 13.

Settings, one run each: ``old`` (5 MALA moves per stage, diagonal metric of the whole cloud: the
defaults before), ``new`` (the moves of the defaults: dense metric pooled within clusters, moves until
decorrelated), and ``old@budget`` (the old diagonal metric with as many moves per stage as ``new``
used on average, so both spend about the same number of target evaluations); then ``default (4
runs)``, the defaults themselves: four independent runs of ``new``, their draws pooled. With
``--runs`` only ``new`` (one run) and the default (four runs) are run.

Columns: target evaluations; for the regressions the largest |error| of a beta mean in posterior sd,
sigma's mean error in posterior sd, the largest relative error of a posterior sd (beta and sigma);
for the mixture the total variation of the mode shares; the log Z error; all averaged over seeds
(mean of absolute values, and the worst).

    python benchmarks/bench_smc_moves.py [--seeds 5] [--first-seed 0] [--particles 1000] [--runs]
        [--targets regression ar5 mixture mixture_iso]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import warnings

import torch

import diffstat as ds

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "tempering"))
from correlated_targets import ar5, mixture6, mixture6_iso, regression

OLD = {"num_mcmc_steps": 5, "metric": "diag", "within_modes": False}


def errors(name, target, gm, idata) -> dict[str, float]:
    x = torch.as_tensor(idata.posterior.x.values)
    x = x.reshape(-1, x.shape[-1])  # every run's draws
    log_z = idata.posterior.attrs["log_normalizer"]
    if name.startswith("mixture"):
        share = torch.bincount(gm.assign(x), minlength=3).to(torch.float64) / x.shape[0]
        return {"tv": 0.5 * float((share - gm.weights).abs().sum()), "log_z": log_z - gm.log_normalizer}
    beta, sigma = x[:, :-1], torch.exp(x[:, -1])
    sd_rel = torch.cat([beta.std(0) / target.beta_sd - 1, (sigma.std() / target.sigma_sd - 1).reshape(1)])
    return {
        "beta_z": float(((beta.mean(0) - target.beta_mean) / target.beta_sd).abs().max()),
        "sigma_z": (float(sigma.mean()) - target.sigma_mean) / target.sigma_sd,
        "sd_rel": float(sd_rel.abs().max()),
        "log_z": log_z - target.log_evidence,
    }


def build(name):
    if name.startswith("mixture"):
        return mixture6() if name == "mixture" else mixture6_iso()
    return None, regression() if name == "regression" else ar5()


def run(name, seed, particles, options):
    gm, target = build(name)
    t0 = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = ds.sample(target, "smc", num_samples=particles, seed=seed, progress=False, **options)
    out = errors(name, target, gm, idata)
    out["evals"] = idata.posterior.attrs["num_target_evals"]
    out["stages"] = idata.posterior.attrs["num_stages"]
    out["seconds"] = time.time() - t0
    out["warned"] = any(issubclass(w.category, RuntimeWarning) for w in caught)
    return out


def summary(rows) -> str:
    keys = [k for k in ("beta_z", "sigma_z", "sd_rel", "tv", "log_z") if k in rows[0]]
    evals = sum(r["evals"] for r in rows) / len(rows)
    parts = [f"evals {evals:9.0f}"]
    for k in keys:
        vals = [abs(r[k]) for r in rows]
        parts.append(f"|{k}| {sum(vals) / len(vals):6.3f} (worst {max(vals):6.3f})")
    parts.append(f"warned {sum(r['warned'] for r in rows)}/{len(rows)}")
    parts.append(f"{sum(r['seconds'] for r in rows):5.1f}s")
    return "  ".join(parts)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--runs", action="store_true", help="one run against the default four only")
    parser.add_argument("--particles", type=int, default=1000)
    parser.add_argument("--targets", nargs="+", default=["regression", "ar5", "mixture", "mixture_iso"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.targets:
        print(f"== {name} ({args.seeds} seeds, {args.particles} particles)")
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        new = [run(name, s, args.particles, {"num_chains": 1}) for s in seeds]
        default = [run(name, s, args.particles, {}) for s in seeds]
        if args.runs:
            for label, rows in (("new (1 run)", new), ("default (4 runs)", default)):
                print(f"  {label:24s} {summary(rows)}")
            continue
        old = [run(name, s, args.particles, OLD | {"num_chains": 1}) for s in seeds]
        # as many moves per stage as the new moves made on average (evals per particle per stage)
        per_stage = sum(r["evals"] / args.particles / r["stages"] for r in new) / len(new)
        steps = max(5, round(per_stage))
        opts = {**OLD, "num_mcmc_steps": steps, "num_chains": 1}
        budget = [run(name, s, args.particles, opts) for s in seeds]
        rows_by_label = (
            ("old", old),
            ("new", new),
            (f"old@budget ({steps}/stage)", budget),
            ("default (4 runs)", default),
        )
        for label, rows in rows_by_label:
            print(f"  {label:24s} {summary(rows)}")
        for s, (o, n) in enumerate(zip(old, new)):
            diff = "  ".join(
                f"{k} {o[k]:+.3f} -> {n[k]:+.3f}"
                for k in o
                if k not in ("evals", "stages", "seconds", "warned")
            )
            print(f"    seed {seeds[s]}: {diff}")


if __name__ == "__main__":
    main()
