"""The diffusion sampler on curved and heavy-tailed targets (``docs/diffusion_tails.md``): the audit's
cases (``benchmarks/audit_cases.py``) scored against their exact answers by ``bench_audit.score``, at
defaults or with options given as ``key=value`` (Python literals), one Markdown row per (case, seed):

    python benchmarks/bench_diffusion_tails.py  # schools_c banana2 banana5_f32 mix6 nw11 student_t, 0 1 2
    python benchmarks/bench_diffusion_tails.py --cases banana2 banana5 --seeds 0 1 --options bridge=False

Columns: the largest |mean error| in posterior sds, the largest relative sd error and (torch targets) its
sign, the mode weights' TV, log Z error and its standard error, the last round's Pareto k, the Stein check's
largest |S_j| and |z| (``diffstat/diffusion/stein.py``), the share of the exploration's SMC particles the
proposal misses (``diffstat/diffusion/coverage.py``), ``attrs['reliable']``, the correction (importance
or the SMC bridge), target evaluations, seconds and the RuntimeWarnings (first words).
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

import diffstat as ds  # noqa: E402
from audit_cases import CASES  # noqa: E402
from bench_audit import nuts_reference, score  # noqa: E402


def run(case: str, seed: int, **options) -> dict:
    """One run at ``options``: the audit's scores, the signed worst sd ratio minus one and the attrs."""
    target, exact = CASES[case]()
    if "sites" not in exact and "mean" not in exact:
        exact = dict(exact, sites=nuts_reference(case))
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = ds.sample(target, "diffusion", num_samples=1000, seed=seed, progress=False, **options)
    row = dict(case=case, seed=seed, seconds=time.perf_counter() - start, **score(idata, exact))
    post = idata.posterior
    if "sd" in exact:
        ratio = post["x"].values.reshape(-1, target.dim).std(0) / exact["sd"] - 1
        row["sd_signed"] = float(ratio[np.argmax(np.abs(ratio))])
    row.update(
        {
            k: post.attrs[k]
            for k in (
                "num_target_evals",
                "reliable",
                "correction",
                "pareto_k",
                "stein_max_z",
                "stein_max_error",
                "coverage_missed",
                "bridge_start",
            )
        }
    )
    row["warnings"] = [str(w.message)[:100] for w in caught if issubclass(w.category, RuntimeWarning)]
    return row


def fmt(row: dict) -> str:
    cells = [row["case"], str(row["seed"])]
    keys = (
        "mean_err",
        "sd_err",
        "sd_signed",
        "mode_tv",
        "log_z_err",
        "log_z_se",
        "pareto_k",
        "stein_max_error",
    )
    for key in keys + ("stein_max_z", "coverage_missed"):
        cells.append(f"{row[key]:.3f}" if key in row else "-")
    cells += [
        str(row["reliable"]),
        row["correction"] + ("" if row["bridge_start"] != "reference" else " (from the reference)"),
        f"{row['num_target_evals']:,}",
        f"{row['seconds']:.0f}",
    ]
    return "| " + " | ".join(cells + [" / ".join(row["warnings"]) or "-"]) + " |"


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cases", nargs="+", default=["schools_c", "banana2", "banana5_f32", "mix6", "nw11", "student_t"]
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--options", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    options = {k: ast.literal_eval(v) for k, v in (o.split("=", 1) for o in args.options)}
    print(f"options: {options or 'defaults'}")
    print(
        "| case | seed | mean err (sd) | sd err | sd ratio - 1 | mode TV | log Z err | log Z se | last k"
        " | Stein |S| | Stein z | missed share | reliable | correction | evals | s | RuntimeWarnings |"
    )
    print("| --- " * 17 + "|")
    for case in args.cases:
        for seed in args.seeds:
            print(fmt(run(case, seed, **options)), flush=True)


if __name__ == "__main__":
    main()
