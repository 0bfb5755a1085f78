"""AIS's lag check (``diffstat/tempering/lag.py``) on the runs it must flag and those it must not
(``docs/ais_lag.md``): ``ds.sample(target, "ais", num_samples=1000, seed=S)`` at defaults (options
``key=value`` after ``--options``), one JSON line per run with the log-density lag and the acceptance
shift (each in weighted sds and in noise sds), the weights' ESS and Pareto k, log Z, the errors against
the exact answer (audit cases, ``bench_audit.score``) or Stan's draws (posteriordb), evaluations, and
the RuntimeWarnings (first words).

    python benchmarks/bench_ais_lag.py --audit ar1_latent --seeds 0 1 2
    python benchmarks/bench_ais_lag.py --posteriordb            # the 37 posteriors, seed 0
    python benchmarks/bench_ais_lag.py --posteriordb kidiq-kidscore_momhs --options num_temperatures=1000
    python benchmarks/bench_ais_lag.py --ar1-torch --seeds 0 1 2 3 4 5 6 7 8 9

``--ar1-torch``: the torch port of the AR(1) model in ``tests/tempering/ar1_target.py`` (its prior as
reference, sampled by torch instead of Pyro, so other runs than ``--audit ar1_latent``'s, 10 times
as fast), scored on log Z and the mean of sigma against its quadrature.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import warnings

import numpy as np
import torch

import diffstat as ds

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from audit_cases import CASES  # noqa: E402
from bench_audit import nuts_reference, score  # noqa: E402

torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=FutureWarning)


_EXACT = {}  # the AR(1) port's quadrature, once


def run(kind: str, name: str, seed: int, options: dict) -> dict:
    """One AIS run at defaults (plus ``options``) on an audit case or a posteriordb posterior."""
    if kind == "audit":
        target, exact = CASES[name]()
        if "sites" not in exact and "mean" not in exact:  # no closed form: a long NUTS run's moments
            exact = dict(exact, sites=nuts_reference(name))
    elif kind == "ar1_torch":
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "tempering"))
        from ar1_target import AR1

        target = AR1()
        if "ar1" not in _EXACT:
            _EXACT["ar1"] = target.exact()
        log_z, sigma_mean = _EXACT["ar1"]
    else:
        from diffstat import posteriordb as pdb

        post = pdb.load(name, dtype=torch.float64)
        target = post.target
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = ds.sample(target, "ais", num_samples=1000, seed=seed, progress=False, **options)
    a = idata.posterior.attrs
    row = dict(name=name, seed=seed, options=options, seconds=round(time.perf_counter() - start, 1))
    lag, noise = a["log_density_lag"], a["log_density_lag_noise"]
    acc, acc_noise = a["acceptance_shift"], a["acceptance_shift_noise"]
    row.update(
        lag=lag,
        lag_z=lag / noise if noise else None,
        accept=acc,
        accept_z=acc / acc_noise if acc_noise else None,
    )
    row.update(
        ess=a["ess"], pareto_k=a["pareto_k"], log_z=a["log_normalizer"], log_z_se=a["log_normalizer_se"]
    )
    row.update(evals=int(a["num_target_evals"]), num_temperatures=int(a["num_stages"]))
    if kind == "audit":
        row.update(score(idata, exact))
    elif kind == "ar1_torch":
        sigma = idata.posterior["x"].values[..., 1].ravel()
        row.update(
            log_z_err=row["log_z"] - log_z, sigma_mean=float(np.exp(sigma).mean()), sigma_exact=sigma_mean
        )
    else:
        cmp = post.compare(idata)
        row.update(mean_err=cmp.max_mean_error, sd_err=cmp.max_sd_error, passed=bool(cmp.passed()))
    row["warnings"] = [str(w.message)[:90] for w in caught if issubclass(w.category, RuntimeWarning)]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audit", nargs="*", default=None, help="audit cases (benchmarks/audit_cases.py)")
    parser.add_argument("--posteriordb", nargs="*", default=None, help="posteriors (none named: all 37)")
    parser.add_argument("--ar1-torch", action="store_true", help="the torch port of the AR(1) model")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--options", nargs="*", default=[], help="key=value, the value read as JSON")
    args = parser.parse_args()
    options = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.options)}
    jobs = [("audit", n) for n in args.audit or []] + ([("ar1_torch", "ar1_torch")] if args.ar1_torch else [])
    if args.posteriordb is not None:
        from diffstat import posteriordb as pdb

        jobs += [("posteriordb", n) for n in (args.posteriordb or pdb.names())]
    for kind, name in jobs:
        for seed in args.seeds:
            print(json.dumps(run(kind, name, seed, options)), flush=True)


if __name__ == "__main__":
    main()
