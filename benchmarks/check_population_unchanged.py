"""The default population (fit_smoothed_score's: 'modes', 4,096 particles) per target, seed 0: its
particles, log-densities, gradients, evaluations and the generator's state after it, saved to argv[1]
(a ``.pt`` file), to compare two versions of the code bit for bit (docs/sms.md, the NUTS fallback):
the fit and the samplers after the population are the same code, so equal particles and generator
states give equal draws.

    PYTHONPATH=<old checkout> python benchmarks/check_population_unchanged.py old.pt \
        narrow_wide10,two_modes8,nine_modes,ionosphere
    PYTHONPATH=. python benchmarks/check_population_unchanged.py new.pt \
        narrow_wide10,two_modes8,nine_modes,ionosphere
    python benchmarks/check_population_unchanged.py --compare old.pt new.pt
"""

import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sms_learned import make  # noqa: E402

from diffstat.smoothing.populations import get_population  # noqa: E402

torch.set_num_threads(1)
if sys.argv[1] == "--compare":
    a, b = (torch.load(f, weights_only=False) for f in sys.argv[2:4])
    for k in a:
        same = all(torch.equal(a[k][f], b[k][f]) for f in ("x", "lp", "grad", "state"))
        print(
            k,
            "identical" if same and a[k]["evals"] == b[k]["evals"] else "DIFFERENT",
            a[k]["source"],
            b[k]["source"],
        )
    sys.exit(0)
out = {}
for name in sys.argv[2].split(","):
    target, _ = make(name)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = get_population("modes")(target, 4096, g, None)
    out[name] = dict(
        x=p.x, lp=p.log_prob, grad=p.grad, evals=p.num_target_evals, source=p.source, state=g.get_state()
    )
    print(name, p.source, p.num_target_evals, "%.0f s" % (time.perf_counter() - t0), len(caught), flush=True)
torch.save(out, sys.argv[1])
