"""The fourth audit round's diagnostics (``docs/audit.md``, "Fourth round, seed 3"):

    python benchmarks/bench_audit_rounds.py rounds schools_c 3 4 5
    python benchmarks/bench_audit_rounds.py negbin-sd

``rounds CASE SEED ...``: the diffusion sampler at defaults, scored as ``bench_audit.py`` does, with
its reliability attrs, the per-round records of its ``diffusion`` group, and each site's mean and sd
against the exact ones. ``negbin-sd``: the kurtosis of phi in the ``negbin`` case (its quadrature with
phi^3, phi^4 added) and the distribution of the sd of 1,000 exact draws of phi (resampled from 400,000
importance draws of a 4-d Student-t around the exact moments, 2,000 times).
"""

from __future__ import annotations

import pathlib
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributions as D

import diffstat as ds

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import audit_cases_pyro  # noqa: E402
import audit_exact  # noqa: E402
from audit_cases import CASES  # noqa: E402
from bench_audit import score  # noqa: E402

torch.set_num_threads(1)
ATTRS = ("reliable", "correction", "pareto_k", "ess", "num_rounds", "stein_max_z", "stein_max_error")
ROUNDS = ("pareto_k", "ess_fraction", "used", "log_normalizer", "log_normalizer_se", "num_proposals")


def rounds(case: str, seeds: list[int]) -> None:
    for seed in seeds:
        target, exact = CASES[case]()
        start = time.time()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            idata = ds.sample(target, "diffusion", num_samples=1000, seed=seed, progress=False)
        row = {k: round(v, 3) for k, v in score(idata, exact).items()}
        print(case, seed, row, f"{time.time() - start:.0f} s")
        for k in ATTRS:
            print("  ", k, idata.posterior.attrs.get(k))
        for k in ROUNDS:
            print("  ", k, np.round(np.asarray(idata["diffusion"][k].values, dtype=float).ravel(), 3))
        post = idata.posterior
        for name, (m, s) in exact.get("sites", {}).items():
            if name in post:
                x = post[name].values.reshape(1000, -1)
                print(f"   {name}: mean {np.round(x.mean(0), 2)} exact {np.round(np.ravel(m), 2)}", end="")
                print(f" sd {np.round(x.std(0), 2)} exact {np.round(np.ravel(s), 2)}")
        runtime = [str(w.message)[:200] for w in caught if issubclass(w.category, RuntimeWarning)]
        print("   warnings:", runtime, flush=True)


def negbin_sd(num_draws: int = 1000, reps: int = 2000) -> None:
    captured = {}

    def hook(log_density, start, funcs, **kw):
        captured.update(ld=log_density, start=start)
        return audit_exact.grid_moments(log_density, start, funcs, **kw)

    audit_cases_pyro.grid_moments = hook
    _, exact = CASES["negbin"]()
    powers = {
        "p": lambda u: torch.stack([u[:, 3].exp() ** k for k in (1, 2, 3, 4)], -1),
        "log_phi": lambda u: u[:, 3],
    }
    sites, _ = audit_exact.grid_moments(captured["ld"], captured["start"], powers)
    m1, m2, m3, m4 = sites["p"][0]
    var = m2 - m1**2
    kurt = (m4 - 4 * m1 * m3 + 6 * m1**2 * m2 - 3 * m1**4) / var**2
    sd = var**0.5
    print(f"phi: mean {m1:.4f}, sd {sd:.4f}, kurtosis {kurt:.1f}; iid relative se of the sd of")
    print(f"{num_draws} draws sqrt((k - 1) / 4n) = {np.sqrt((kurt - 1) / (4 * num_draws)):.3f}")
    cat = lambda i: np.concatenate([np.ravel(exact["sites"]["b0"][i]), np.ravel(exact["sites"]["b"][i])])  # noqa: E731
    centre = torch.tensor(list(cat(0)) + [float(sites["log_phi"][0][0])], dtype=torch.float64)
    scale = torch.tensor(list(cat(1)) + [float(sites["log_phi"][1][0])], dtype=torch.float64)
    torch.manual_seed(0)
    t = D.StudentT(4.0)
    z = t.sample((400_000, 4)).double() * 1.5
    x = centre + z * scale
    with torch.no_grad():
        lw = captured["ld"](x) - (t.log_prob(z / 1.5) - np.log(1.5) - torch.log(scale)).sum(-1)
    w = torch.softmax(lw, 0).numpy()
    phi = x[:, 3].exp().numpy()
    rng = np.random.default_rng(1)
    ratio = np.array([phi[rng.choice(len(phi), num_draws, p=w)].std() for _ in range(reps)]) / sd
    print(
        f"importance ESS {1 / (w**2).sum():,.0f}; sd ratio quantiles 2.5/50/97.5%:",
        np.quantile(ratio, [0.025, 0.5, 0.975]),
    )
    print(
        f"P(|ratio - 1| > 0.175) = {np.mean(np.abs(ratio - 1) > 0.175):.4f}, "
        f"P(ratio < 0.825) = {np.mean(ratio < 0.825):.4f}"
    )


if __name__ == "__main__":
    if sys.argv[1] == "rounds":
        rounds(sys.argv[2], [int(s) for s in sys.argv[3:]])
    else:
        negbin_sd()
