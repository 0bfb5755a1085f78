"""The diffusion sampler's SMC bridge from Laplace Gaussians (``diffstat.diffusion.bridge.with_laplace``):
the figures of ``docs/diffusion_sampler.md``, "The bridge from the Laplace Gaussians too".

``--laplace-is NAME``: Laplace importance sampling alone on a logistic posterior of the suite (Newton to
the mode from 0, the Hessian there, covariance ``inflate`` times its inverse): ESS fraction and log Z.
``--gaussian D COND``: methods at their defaults on a D-dimensional Gaussian with condition number COND
(eigenvalues log-spaced, a random rotation and mean from seed 1, log Z 10): log Z error, the largest mean
error in sds, the largest relative sd error, evaluations and the warnings.

    python benchmarks/bench_laplace_bridge.py --laplace-is sonar
    python benchmarks/bench_laplace_bridge.py --gaussian 50 1000 --methods diffusion,smc,nuts
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch

import diffstat as ds
from diffstat import targets as T
from diffstat.diffusion.gaussians import GaussianMixtureProposal
from diffstat.modes.laplace import newton_ascent


def laplace_is(name: str, inflates=(1.0, 1.2, 1.5), sizes=(4096, 40000)) -> None:
    model = T.sonar() if name == "sonar" else T.ionosphere()
    target = ds.Target(model.log_prob, model.dim, dtype=torch.float64)
    m, _, _, hess = newton_ascent(target, torch.zeros(1, model.dim, dtype=torch.float64), 100.0, 30)
    for inflate in inflates:
        cov = inflate * torch.cholesky_inverse(torch.linalg.cholesky(-hess[0]))
        q = GaussianMixtureProposal(m, torch.linalg.cholesky(cov)[None], torch.ones(1, dtype=torch.float64))
        for n in sizes:
            x = q.sample(n, torch.Generator().manual_seed(0))
            log_w = target.log_prob(x) - q.log_prob(x)
            ess = float(1 / (torch.softmax(log_w, 0) ** 2).sum())
            log_z = float(torch.logsumexp(log_w, 0)) - math.log(n)
            print(f"{name} inflate {inflate} n {n}: ESS fraction {ess / n:.3f}, log Z {log_z:.3f}")


def gaussian(dim: int, cond: float, methods: list[str], seed: int) -> None:
    g = torch.Generator().manual_seed(1)
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    cov = rotation @ torch.diag(torch.logspace(0, math.log10(cond), dim, dtype=torch.float64)) @ rotation.T
    mean = torch.randn(dim, generator=g, dtype=torch.float64)
    gauss = torch.distributions.MultivariateNormal(mean, cov)
    sd = cov.diag().sqrt()
    for method in methods:
        target = ds.Target(lambda x: gauss.log_prob(x) + 10.0, dim, dtype=torch.float64)
        start = time.time()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            idata = ds.sample(target, method, num_samples=1000, seed=seed, progress=False)
        x = torch.as_tensor(idata.posterior["x"].values).reshape(-1, dim)
        a = idata.posterior.attrs
        log_z = a.get("log_normalizer")
        err = "-" if log_z is None else f"{log_z - 10.0:+.3f} (s.e. {a['log_normalizer_se']:.3f})"
        warned = [str(w.message)[:100] for w in caught if issubclass(w.category, RuntimeWarning)]
        print(
            f"gaussian d={dim} cond={cond:g} {method}: log Z error {err}, mean error "
            f"{float(((x.mean(0) - mean) / sd).abs().max()):.3f} sd, sd error "
            f"{float((x.std(0) / sd - 1).abs().max()):.3f}, evals {a['num_target_evals']:,}, "
            f"{time.time() - start:.0f} s, warnings: {warned or 'none'}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--laplace-is", choices=["sonar", "ionosphere"])
    parser.add_argument("--gaussian", nargs=2, type=float, metavar=("D", "COND"))
    parser.add_argument("--methods", default="diffusion,gaussian_is,smc,ais,pt,nuts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.laplace_is:
        laplace_is(args.laplace_is)
    if args.gaussian:
        gaussian(int(args.gaussian[0]), args.gaussian[1], args.methods.split(","), args.seed)


if __name__ == "__main__":
    main()
