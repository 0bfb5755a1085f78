"""The missed-mode check on ``mix3_corr`` (audit 6b, finding 2): 0.5 N(m1, S1) + 0.3 N(m2, S2) +
0.2 N(m3, S3) in 5-d, each covariance correlated differently (sds 0.3 to 2; AR(0.9), equicorrelation
0.6, a -0.9 pair), means 6.7 to 7.4 apart, normalised (log Z 0). From N(0, I) a tempering run can hold
component 1 alone; the check must then warn. The case is ``mix3_corr`` of
``benchmarks/audit_cases_sixth_b.py``.

``python benchmarks/bench_mix3_check.py [--methods ais smc pt nuts] [--seeds 0 1]``: per run the
draws' share in each component, log Z, the check's ``missed_mode_share``, ``mode_misweight`` and
evaluations, and whether the check (or anything else) warned. Results: ``docs/mode_check.md``
("Starts the draws' metric leaves on a flank").
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import warnings

import numpy as np
import torch

import diffstat as ds

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from audit_cases_sixth_b import mix3_corr as audit_mix3_corr  # noqa: E402

F64 = torch.float64


def mix3_corr():
    """The target (float64) and a function giving each draw's most probable component."""
    target, exact = audit_mix3_corr()
    return target, exact["assign"]


def run(method: str, seed: int) -> None:
    target, assign = mix3_corr()
    start = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = ds.sample(target, method, num_samples=1000, seed=seed, progress=False)
    attrs = idata.posterior.attrs
    x = torch.as_tensor(idata.posterior["x"].values.reshape(-1, 5))
    shares = np.bincount(assign(x).numpy(), minlength=3) / x.shape[0]
    texts = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    check = any("no draw reaches" in t or "weigh the target's modes wrongly" in t for t in texts)
    other = len(texts) - check
    nan = float("nan")
    cells = [
        method,
        str(seed),
        " / ".join(f"{s:.3f}" for s in shares),
        f"{attrs.get('log_normalizer', nan):.3f}",
        f"{attrs.get('missed_mode_share', nan):.3f}",
        f"{attrs.get('mode_misweight', nan):.3f}",
        "yes" if check else "no",
        str(other),
        f"{attrs.get('mode_check_evals', 0):,}",
        f"{time.time() - start:.0f}",
    ]
    print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=["ais", "smc", "pt", "nuts"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| method | seed | shares (0.5 / 0.3 / 0.2) | log Z | missed | misweight | check warns ", end="")
    print("| other warns | check evals | s |")
    print("| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for method in args.methods:
        for seed in args.seeds:
            run(method, seed)


if __name__ == "__main__":
    main()
