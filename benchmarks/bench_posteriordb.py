"""Sampling methods on the posteriordb suite (``diffstat.posteriordb``), against Stan's reference.

Each (posterior, method) runs in its own process with a time limit: ``ds.sample(post.target,
method, num_samples=1000, num_chains=4 for MCMC / the method's default otherwise, seed=...)`` at the
method's defaults. A crash or a timeout is printed as a row (a crash is a finding).

Columns: ``mean err`` the largest |mean - ref mean| / ref sd over parameters (constrained, Stan
names); ``sd err`` the largest |sd / ref sd - 1|; ``R-hat`` the largest rank-normalised R-hat
(arviz; chains > 1 only); ``ESS/1k`` the smallest bulk ESS over parameters per 1,000 target
evaluations of the sampling (the check for missed modes' evaluations left out); ``evals`` target
evaluations, the check's included; ``sec`` sampling time; ``pass`` mean err <= 0.15 and
sd err <= 0.15; then the run's RuntimeWarnings by kind (``modes``: the check for missed modes).

Run:
    python benchmarks/bench_posteriordb.py [--methods smc mala] [--posteriors NAME ...] [--fast]
        [--time-limit 300] [--seed 0] [--dtype float64] [--init default|stan]
    python benchmarks/bench_posteriordb.py --timing      # dim and seconds per gradient, batch 4 / 1000

Results (JSON lines and the printed table) go to benchmarks/results/ (not tracked).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("nuts", "hmc", "mala", "smc", "ais", "pt", "diffusion")
#: Methods whose draws are chains (``num_chains=4``); the others use their own default.
MCMC = ("nuts", "hmc", "mala", "rwm")
#: One or two of each kind of model.
FAST = (
    "kidiq-kidscore_momhs",
    "earnings-logearn_height",
    "mesquite-logmesquite",
    "nes1980-nes",
    "kilpisjarvi_mod-kilpisjarvi",
    "sblri-blr",
    "garch-garch11",
    "arma-arma11",
    "hmm_example-hmm_example",
    "gp_pois_regr-gp_regr",
)
HEADER = (
    f"{'posterior':44s} {'method':9s} {'mean err':>8s} {'sd err':>7s} {'R-hat':>6s} {'ESS/1k':>7s} "
    f"{'evals':>9s} {'sec':>7s}  pass"
)


def run_one(name: str, method: str, seed: int, dtype: str, num_samples: int, init: str = "default") -> dict:
    """One run, in the calling process: the row as a dict. ``init="stan"``: MCMC chains start
    uniformly in (-2, 2) in unconstrained space, as Stan's do (otherwise at reference draws)."""
    import arviz as az
    import torch

    import diffstat as ds
    from diffstat import posteriordb as pdb

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    post = pdb.load(name, dtype=getattr(torch, dtype))
    num_chains = 4 if method in MCMC else None
    options = {}
    if init == "stan" and method in MCMC:
        g = torch.Generator().manual_seed(seed + 1)
        u = torch.rand(num_chains, post.target.dim, generator=g, dtype=post.target.dtype)
        options["init"] = 4 * u - 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = ds.sample(
            post.target,
            method,
            num_samples=num_samples,
            num_chains=num_chains,
            seed=seed,
            progress=False,
            **options,
        )
    said = sorted({str(w.message)[:120] for w in caught if issubclass(w.category, RuntimeWarning)})
    cmp = post.compare(idata)
    flat = post.flatten(idata)
    chains = next(iter(flat.values())).shape[0]
    ds_ = az.convert_to_dataset({k: np.asarray(v, dtype=np.float64) for k, v in flat.items()})
    ess = float(min(az.ess(ds_, method="bulk")[k].item() for k in flat))
    rhat = float(max(az.rhat(ds_)[k].item() for k in flat)) if chains > 1 else float("nan")
    evals = int(idata.posterior.attrs["num_target_evals"])
    check_evals = int(idata.posterior.attrs.get("mode_check_evals", 0))
    # AIS: the ESS of its weights (the draws are a resample of them)
    extra = {"weight_ess": float(idata.posterior.attrs["ess"])} if method == "ais" else {}
    return {
        "posterior": name,
        "method": method,
        "dim": post.target.dim,
        "chains": chains,
        "mean_err": cmp.max_mean_error,
        "worst_mean": cmp.worst_mean,
        "sd_err": cmp.max_sd_error,
        "worst_sd": cmp.worst_sd,
        "rhat": rhat,
        "min_ess_bulk": ess,
        "ess_per_1k_evals": 1000 * ess / max(evals - check_evals, 1),
        "evals": evals,
        "seconds": float(idata.posterior.attrs["sampling_time"]),
        "passed": cmp.passed(),
        "warnings": said,
        "mode_check_evals": check_evals,
        # the diffusion sampler: "importance" or "smc" (its bridge) and attrs["reliable"]
        "correction": idata.posterior.attrs.get("correction"),
        "reliable": int(idata.posterior.attrs.get("reliable", 1)),
        "coverage_missed": idata.posterior.attrs.get("coverage_missed"),  # diffusion/coverage.py
        **extra,
    }


def _child(queue, *args) -> None:
    try:
        queue.put(run_one(*args))
    except Exception as err:  # noqa: BLE001  (reported as a row)
        queue.put({"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=4)})


def run_isolated(name, method, seed, dtype, num_samples, time_limit, init="default") -> dict:
    """``run_one`` in a fresh process, killed after ``time_limit`` seconds."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, name, method, seed, dtype, num_samples, init))
    start = time.perf_counter()
    proc.start()
    try:
        row = queue.get(timeout=time_limit)
    except Exception:  # noqa: BLE001  (queue.Empty: the time limit)
        row = {"error": f"timeout after {time_limit:.0f} s"}
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    row.setdefault("posterior", name)
    row.setdefault("method", method)
    row["wall_seconds"] = time.perf_counter() - start
    return row


def format_row(r: dict) -> str:
    if "error" in r:
        return f"{r['posterior']:44s} {r['method']:9s} ERROR {r['error'][:150]}"
    rhat = "-" if np.isnan(r["rhat"]) else f"{r['rhat']:.3f}"
    return (
        f"{r['posterior']:44s} {r['method']:9s} {r['mean_err']:8.3f} {r['sd_err']:7.3f} {rhat:>6s} "
        f"{r['ess_per_1k_evals']:7.2f} {r['evals']:9d} {r['seconds']:7.1f}  "
        f"{'yes' if r['passed'] else 'NO'}  {_warned(r)}"
    )


def _warned(r: dict) -> str:
    """The run's warnings, by kind: ``modes`` from the check for missed modes, ``other`` else."""
    said = r.get("warnings", [])
    modes = sum(("no draw reaches" in m or "modes wrongly" in m or "missed modes stopped" in m) for m in said)
    kinds = [f"modes {modes}" if modes else "", f"other {len(said) - modes}" if len(said) > modes else ""]
    return ", ".join(k for k in kinds if k) or "-"


def timing(names, repeats: int = 5) -> None:
    """Unconstrained dim and seconds per log-density-and-gradient evaluation, batches of 4 and 1000."""
    import torch

    from diffstat import posteriordb as pdb

    torch.set_num_threads(1)
    print(f"{'posterior':44s} {'dim':>4s} {'s/grad (4)':>11s} {'s/grad (1000)':>14s}")
    for name in names:
        post = pdb.load(name)
        u = post.target.unconstrain(post.reference_sites())
        row = [name, post.target.dim]
        for n in (4, 1000):
            x = u[:n]
            post.target.log_prob_and_grad(x)  # warm-up
            start = time.perf_counter()
            for _ in range(repeats):
                post.target.log_prob_and_grad(x)
            row.append((time.perf_counter() - start) / repeats)
        print(f"{row[0]:44s} {row[1]:4d} {row[2]:11.4f} {row[3]:14.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--posteriors", nargs="+", default=None)
    parser.add_argument("--fast", action="store_true", help="the FAST subset of posteriors")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    parser.add_argument(
        "--init",
        default="default",
        choices=("default", "stan"),
        help="MCMC starts: the method's default (reference draws) or Stan's uniform(-2, 2)",
    )
    parser.add_argument("--timing", action="store_true", help="only time gradient evaluations")
    args = parser.parse_args()

    from diffstat import available_methods
    from diffstat import posteriordb as pdb

    names = args.posteriors or (list(FAST) if args.fast else pdb.names())
    unknown = set(names) - set(pdb.names())
    if unknown:
        parser.error(f"unknown posteriors: {sorted(unknown)}")
    if args.timing:
        timing(names)
        return
    known = set(available_methods())
    methods = []
    for m in args.methods:
        if m in known:
            methods.append(m)
        else:
            print(f"note: method {m!r} is not available in this diffstat; skipped")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"posteriordb_{stamp}_{'-'.join(methods)}_{os.getpid()}.jsonl"
    print(HEADER, flush=True)
    with open(out, "w") as f:
        for name in names:
            for method in methods:
                row = run_isolated(
                    name, method, args.seed, args.dtype, args.num_samples, args.time_limit, args.init
                )
                print(format_row(row), flush=True)
                f.write(json.dumps(row) + "\n")
                f.flush()
    print(f"results: {out}")


if __name__ == "__main__":
    main()
