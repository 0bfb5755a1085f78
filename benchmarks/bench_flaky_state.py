"""Process state that made tests flaky (docs/flaky_state.md): does a Pyro target's construction
depend on torch's global RNG, and do threads leave ``torch.distributions``' validation off?

1. For global seeds ``0 .. N-1``: seed torch's global RNG, build ``nan_above`` (tests/test_pyro_nan_sites.py:
   the observation's scale is NaN where ``mu > 1.6``) in both vectorize modes; count the seeds whose
   construction raised, and whether it advanced the global stream.
2. Twenty times: two threads each evaluate a plain Target 200 times at once; count the runs after which
   ``torch.distributions.Distribution``'s default validation is no longer the user's ``True``.

Run from the repository root:
``PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_flaky_state.py [N]``.
"""

from __future__ import annotations

import concurrent.futures as cf
import pathlib
import sys

import pyro.distributions as dist
import torch

import diffstat as ds

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from test_pyro_nan_sites import nan_above  # noqa: E402  (the model of the flaky test itself)

F64 = torch.float64


def global_seed_sweep(n: int) -> tuple[list[int], int]:
    """The global seeds at which construction raised, and the number at which it moved the stream."""
    failed, moved = [], 0
    for k in range(n):
        torch.manual_seed(k)
        expected = torch.randn(())
        torch.manual_seed(k)
        try:
            for mode in ("plate", "vmap"):
                ds.Target.from_pyro(nan_above, torch.tensor(0.3, dtype=F64), vectorize=mode)
        except ValueError:
            failed.append(k)
            continue
        moved += not torch.equal(torch.randn(()), expected)
    return failed, moved


def thread_race(trials: int = 20, calls: int = 200) -> int:
    """Runs of two threads evaluating a Target at once after which validation was left off."""
    distribution = torch.distributions.Distribution
    target = ds.Target(lambda x: dist.Normal(0.0, 1.0).log_prob(x).sum(-1), 2, dtype=F64)
    x = torch.zeros(64, 2, dtype=F64)
    left_off = 0
    for _ in range(trials):
        distribution.set_default_validate_args(True)
        with cf.ThreadPoolExecutor(2) as ex:
            list(ex.map(lambda _: [target.log_prob_and_grad(x) for _ in range(calls)], range(2)))
        left_off += not distribution._validate_args
    distribution.set_default_validate_args(True)
    return left_off


if __name__ == "__main__":
    torch.set_num_threads(1)
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    failed, moved = global_seed_sweep(n)
    print(
        f"global seeds 0..{n - 1}: construction raised at {len(failed)} {failed[:12]}; "
        f"moved the stream at {moved}"
    )
    print(f"two threads: validation left off after {thread_race()} of 20 runs")
