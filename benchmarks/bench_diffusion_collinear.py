"""The diffusion sampler on a diamonds-like collinear regression with an exact posterior
(``docs/diffusion_collinear.md``): 24 standardised polynomial/product predictors + intercept, n = 500,
cond(X^T X) = 1.7e12, the NIG-conjugate ``NIGRegression`` of ``tests/tempering/correlated_targets.py``
(prior_scale 10) in (beta, log sigma).

    python benchmarks/bench_diffusion_collinear.py --methods diffusion gaussian_is --seed 0
    python benchmarks/bench_diffusion_collinear.py --frames off --methods diffusion   # before the fix
    python benchmarks/bench_diffusion_collinear.py --parts init --frames on off       # the bank alone

``--frames off`` restocks with the diagonal scheme alone (``laplace_frames`` returning None), the
sampler before the Laplace frames. ``--parts init`` runs the exploration and the first restocking only
and prints how far the restocked bank's moment Gaussian is from the exact posterior (KL, whitened mean
error, extreme eigenvalues of the covariance ratio), and where the explored mode centre lies.
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
import diffstat.diffusion.rounds as rounds

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "tempering"))
from correlated_targets import NIGRegression  # noqa: E402

torch.set_num_threads(1)
F64 = torch.float64
_FRAMES = rounds.laplace_frames


def diamonds_like(n=500, seed=5) -> NIGRegression:
    """The lead's target (``/work/notes/s23/collinear.py``): raw powers of a, b a^k and b^2 a^k."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, generator=g, dtype=F64) * 2 + 0.2
    b = torch.randn(n, generator=g, dtype=F64)
    cols = [a**k for k in range(1, 9)] + [b * a**k for k in range(8)] + [(b**2) * a**k for k in range(8)]
    X = torch.stack(cols, 1)
    X = torch.cat([torch.ones(n, 1, dtype=F64), (X - X.mean(0)) / X.std(0)], 1)
    beta = torch.randn(X.shape[1], generator=g, dtype=F64) * 0.5
    y = X @ beta + 0.7 * torch.randn(n, generator=g, dtype=F64)
    return NIGRegression(X, y, prior_scale=10.0)


def exact_moments(t: NIGRegression) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of (beta, log sigma): beta's are exact; log sigma = -log(Gamma)/2 + log(b_n)/2
    has mean (log b_n - digamma a_n)/2 and variance trigamma(a_n)/4; the two are uncorrelated."""
    an = torch.tensor(t.an, dtype=F64)
    cov = torch.zeros(t.dim, t.dim, dtype=F64)
    cov[:-1, :-1] = t.bn / (t.an - 1) * t.Vn
    cov[-1, -1] = 0.25 * torch.polygamma(1, an)
    mean = torch.cat([t.mn, (0.5 * (math.log(t.bn) - torch.digamma(an)))[None]])
    return mean, cov


def gaussian_gap(mean_q, cov_q, mean, cov) -> str:
    """KL(q || p) of two Gaussians, the whitened mean error and the covariance ratio's eigenvalues."""
    chol = torch.linalg.cholesky(cov)
    z = torch.linalg.solve_triangular(chol, (mean_q - mean)[:, None], upper=False).squeeze(-1)
    w = torch.linalg.solve_triangular(
        chol, torch.linalg.solve_triangular(chol, cov_q, upper=False).T, upper=False
    )
    ev = torch.linalg.eigvalsh(0.5 * (w + w.T))
    kl = 0.5 * float(ev.sum() - ev.numel() - torch.log(ev).sum() + (z**2).sum())
    ratio = f"{ev.min():.3g}..{ev.max():.3g}"
    return f"KL {kl:.3f}, whitened mean error {float(z.norm()):.3f}, cov ratio eig {ratio}"


def run_init(t, seed: int) -> None:
    from diffstat.diffusion.sampler_config import DiffusionConfig

    mean, cov = exact_moments(t)
    t.num_target_evals = 0
    start = time.time()
    state = rounds.init(torch.Generator().manual_seed(seed), t, DiffusionConfig(use_diffusion=False))
    x = state.bank.x
    print(f"  init: {t.num_target_evals:,} evals, {time.time() - start:.0f} s, {state.bank.num_modes} modes")
    print(f"  explored centre: {gaussian_gap(state.bank.centers[0], cov, mean, cov)}")
    print(f"  restocked bank's moments: {gaussian_gap(x.mean(0), torch.cov(x.T), mean, cov)}")
    g = state.gaussians
    print(f"  moment Gaussian (inflated): {gaussian_gap(g.means[0], g.chols[0] @ g.chols[0].T, mean, cov)}")


def run_method(t, method: str, seed: int) -> None:
    t.num_target_evals = 0
    start = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = ds.sample(t, method, num_samples=1000, seed=seed, progress=False)
    x = idata.posterior["x"].values.reshape(-1, t.dim)
    me = np.max(np.abs(x[:, :-1].mean(0) - t.beta_mean.numpy()) / t.beta_sd.numpy())
    se = np.max(np.abs(x[:, :-1].std(0) / t.beta_sd.numpy() - 1))
    a = idata.posterior.attrs
    warned = [str(w.message)[:100] for w in caught if issubclass(w.category, RuntimeWarning)]
    print(
        f"  {method}: mean err {me:.3f} sd, sd err {se:.3f},"
        f" log Z err {a['log_normalizer'] - t.log_evidence:+.3f},"
        f" reliable {a['reliable']}, correction {a['correction']}, Pareto k {a['pareto_k']:.2f},"
        f" evals {a['num_target_evals']:,}, {time.time() - start:.0f} s, warnings {warned}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["diffusion"])
    parser.add_argument("--frames", nargs="+", choices=["on", "off"], default=["on"])
    parser.add_argument("--parts", choices=["sample", "init"], default="sample")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    t = diamonds_like()
    for frames in args.frames:
        rounds.laplace_frames = _FRAMES if frames == "on" else (lambda target, bank: None)
        print(f"Laplace frames {frames}, seed {args.seed}:")
        if args.parts == "init":
            run_init(t, args.seed)
        else:
            for method in args.methods:
                run_method(t, method, args.seed)


if __name__ == "__main__":
    main()
