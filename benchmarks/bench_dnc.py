"""Divide-and-conquer combiners on Trojan, Fearnhead and Nemeth's (2024) two toy problems and two
real data sets.

(a) Mixture of Gaussians: y_i from an equal-weight mixture of N(-0.4, 0.2), N(0.4, 0.2), N(0, 0.2),
    N = 2000, the three means unknown with a N(0, 1) prior, 4 contiguous shards. The posterior is
    invariant under permutations of the means (label switching): every chain's draws are
    symmetrised by a uniformly random permutation per draw (exact, since prior and likelihood are
    symmetric), as Trojan et al. do with permutation moves inside NUTS.
(b) Logistic regression: x ~ N(0.5, 1) with an intercept, beta = (-3, -3), N = 1000, prior
    N(0, 5 I), 15 contiguous shards (few positives per shard: skewed sub-posteriors).

Shards are sampled by MALA through ``ds.dnc.sample_shards`` (the gradients kept); the reference
is MALA on the full data. Metrics (d_MAH, d_IAD, d_skew) as Trojan et al. define them, against
their published diffusion figures: mixture d_IAD 0.046; logistic d_MAH 0.094, d_IAD 0.034.

Rows: ``diffusion`` sees only the shards' draws and scores (mode masses from the draw counts);
``diffusion_lp`` also calls each shard's log-density at a few thousand points to weigh the modes
(``calibration_log_probs``; the count is printed); ``diffusion_exact`` (not run by default) runs
the final MCMC on the exact sum of shard log-densities.

(c) RAND HIE (``data/randhie.csv``): Poisson regression of outpatient visits, 20,190 rows, 10
    coefficients, prior N(0, 4 I), random shards, K = 8 and 16 (the README vignette's model).
(d) ISLP's Default (``data/default.csv``): logistic regression of a rare event (3.3% defaults),
    10,000 rows, 4 coefficients, prior N(0, 25 I), random shards, K = 8, 16 and 32.

On the real data sets, shards are sampled by NUTS (4 chains of 1,000 draws, 4,000 per shard);
the reference is NUTS on the full data (20 chains of 5,000 draws), cached per data set and printed
with its distance to the earlier reference (MALA in the coordinates of the Laplace approximation,
100,000 draws). The row ``diffusion_exact`` is the diffusion combiner given the shards'
log-densities (an SMC to their exact sum, :mod:`diffstat.dnc.exact_smc`): the default route of
``ds.dnc.run_pipeline``; ``diffusion_poly`` is given only the log-densities at the shards' draws
(with the scores: cubic shard energies fitted on the worker processes,
:mod:`diffstat.dnc.surrogate`), the route ``ds.dnc.combine`` takes by default when its inputs
carry them; the product of the shards' exact Laplace Gaussians is printed beside them (how far off
any Gaussian combiner must be), and so is the combining time of both routes.

Run:  python benchmarks/bench_dnc.py [--problem mixture|logistic|both|randhie|default|real] [--seed 0]
Shard draws are cached in benchmarks/_cache_dnc/ (delete to resample).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import math
import os
import time

import numpy as np
import torch

import diffstat as ds
from diffstat.dnc.models import (
    GaussianPrior,
    logistic_log_likelihood,
    mixture_means_log_likelihood,
    poisson_log_likelihood,
)
from diffstat.dnc.shards import SubPosterior, subposteriors, take_rows
from diffstat.target import Target

torch.set_num_threads(1)
CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_cache_dnc")
PUBLISHED = {"mixture": {"d_IAD": 0.046}, "logistic": {"d_MAH": 0.094, "d_IAD": 0.034}}


# ----------------------------------------------------------------------------- metrics
def _metrics():
    try:
        from diffstat import metrics

        return metrics.d_mah, metrics.d_iad, metrics.d_skew
    except (ImportError, AttributeError):
        return d_mah, d_iad, d_skew


def d_mah(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mahalanobis distance between the means, with the exact posterior's covariance."""
    diff = approx.mean(0) - exact.mean(0)
    cov = np.atleast_2d(np.cov(exact, rowvar=False))
    return float(np.sqrt(diff @ np.linalg.solve(cov, diff)))


def d_iad(approx: np.ndarray, exact: np.ndarray, res: int = 128, sigmas: float = 5.0) -> float:
    """Integrated absolute difference of marginal Gaussian KDEs (Scott's rule), on a 128-point
    grid over +-5 sd, halved and averaged over dimensions."""
    from scipy.stats import gaussian_kde

    total = 0.0
    for j in range(approx.shape[1]):
        a, e = approx[:, j], exact[:, j]
        lo = min(a.mean() - sigmas * a.std(), e.mean() - sigmas * e.std())
        hi = max(a.mean() + sigmas * a.std(), e.mean() + sigmas * e.std())
        grid = np.linspace(lo, hi, res)
        total += np.trapezoid(np.abs(gaussian_kde(a)(grid) - gaussian_kde(e)(grid)), grid)
    return float(total / (2 * approx.shape[1]))


def d_skew(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean absolute difference of the marginal skewnesses."""

    def skew(x):
        c = x - x.mean(0)
        return (c**3).mean(0) / x.var(0) ** 1.5

    return float(np.abs(skew(approx) - skew(exact)).mean())


# ----------------------------------------------------------------------------- problems
def mixture_problem():
    gen = torch.Generator().manual_seed(2023)
    n, k = 2000, 4
    means = torch.tensor([-0.4, 0.4, 0.0], dtype=torch.float64)
    comp = torch.randint(0, 3, (n,), generator=gen)
    y = means[comp] + math.sqrt(0.2) * torch.randn(n, generator=gen, dtype=torch.float64)
    return dict(
        name="mixture",
        log_prior=GaussianPrior(1.0),
        log_likelihood=mixture_means_log_likelihood,
        data=(y,),
        dim=3,
        num_shards=k,
        symmetric=True,
        init=means,
    )


def logistic_problem():
    gen = torch.Generator().manual_seed(2023)
    n, k = 1000, 15
    x = 0.5 + torch.randn(n, generator=gen, dtype=torch.float64)
    design = torch.stack([torch.ones(n, dtype=torch.float64), x], 1)
    beta = torch.tensor([-3.0, -3.0], dtype=torch.float64)
    y = torch.bernoulli(torch.sigmoid(design @ beta), generator=gen)
    return dict(
        name="logistic",
        log_prior=GaussianPrior(5.0),
        log_likelihood=logistic_log_likelihood,
        data=(design, y),
        dim=2,
        num_shards=k,
        symmetric=False,
        init=-torch.ones(2, dtype=torch.float64),
    )


DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def randhie_problem(num_shards: int = 8):
    """RAND HIE Poisson regression (the vignette's model): 20,190 rows, 10 coefficients, prior
    N(0, 4 I), random shards; shards sampled by NUTS, 4 chains of 1,000 draws (4,000 per shard)."""
    from diffstat.targets import randhie_poisson

    x, y, _ = randhie_poisson(os.path.join(DATA, "randhie.csv"))
    return dict(
        name=f"randhie_k{num_shards}",
        dataset="randhie",
        log_prior=GaussianPrior(4.0),
        log_likelihood=poisson_log_likelihood,
        data=(x, y),
        dim=10,
        num_shards=num_shards,
        symmetric=False,
        init=None,
        split="random",
        sampler="nuts",
        num_chains=4,
        num_samples=1000,
        options=dict(num_warmup=1000),
    )


def default_problem(num_shards: int = 8):
    """ISLP's Default data (``data/default.csv``): logistic regression of the rare default (333 of
    10,000) on an intercept, student (0/1), standardised balance and income; prior N(0, 25 I);
    random shards, so at K = 32 a shard sees about 10 defaults and its sub-posterior is skewed.
    Shards sampled by NUTS, 4 chains of 1,000 draws."""
    import csv

    with open(os.path.join(DATA, "default.csv"), newline="") as f:
        rows = list(csv.reader(f))[1:]
    y = torch.tensor([r[0] == "Yes" for r in rows], dtype=torch.float64)
    student = torch.tensor([r[1] == "Yes" for r in rows], dtype=torch.float64)
    num = torch.tensor([[float(r[2]), float(r[3])] for r in rows], dtype=torch.float64)
    num = (num - num.mean(0)) / num.std(0)
    x = torch.cat([torch.ones(len(rows), 1, dtype=torch.float64), student[:, None], num], 1)
    return dict(
        name=f"default_k{num_shards}",
        dataset="default",
        log_prior=GaussianPrior(25.0),
        log_likelihood=logistic_log_likelihood,
        data=(x, y),
        dim=4,
        num_shards=num_shards,
        symmetric=False,
        init=None,
        split="random",
        sampler="nuts",
        num_chains=4,
        num_samples=1000,
        options=dict(num_warmup=1000),
    )


def newton_mode(log_prob, x0: torch.Tensor, num_iter: int = 50):
    """Mode and Hessian of a smooth concave log-density ``(n, dim) -> (n,)`` by Newton's method."""
    x = x0.clone().double()
    f = lambda v: log_prob(v[None])[0]  # noqa: E731
    for _ in range(num_iter):
        grad = torch.func.grad(f)(x)
        hess = torch.func.hessian(f)(x)
        step = torch.linalg.solve(hess, grad)
        x = x - step
        if float(step.abs().max()) < 1e-12:
            break
    return x, torch.func.hessian(f)(x)


class _Whitened:
    """log p(m + L u): a log-density in the coordinates of its Laplace approximation."""

    def __init__(self, log_prob, mode, chol):
        self.log_prob, self.mode, self.chol = log_prob, mode, chol

    def __call__(self, u):
        return self.log_prob(self.mode + u @ self.chol.T)


def nuts_reference(problem, seed: int, num_chains: int = 20, num_samples: int = 5000):
    """Full-data reference: NUTS (20 chains, 1,000 warm-up, 5,000 draws each: 100,000 draws, with
    its dense metric adapted in warm-up), cached per data set. Its Monte Carlo error is far below
    the issue's bars: with a bulk ESS of about 10^5, the reference mean is about 0.003 posterior
    sds from the truth, against a d_MAH bar of 0.3."""
    import arviz as az

    path = os.path.join(CACHE, f"{problem['dataset']}_nuts_reference_{seed}.pt")
    if os.path.exists(path):
        return torch.load(path)
    full = Target(
        _FullPosterior(problem["log_prior"], problem["log_likelihood"], problem["data"]),
        problem["dim"],
        dtype=torch.float64,
    )
    start = time.perf_counter()
    idata = ds.sample(
        full, "nuts", num_samples=num_samples, num_chains=num_chains, seed=seed + 1, progress=False,
        num_warmup=1000,
    )  # fmt: skip
    attrs = idata.posterior.attrs
    ref = {
        "exact": torch.as_tensor(idata.posterior["x"].values).reshape(-1, problem["dim"]),
        "time": time.perf_counter() - start,
        "rhat": float(az.rhat(idata).x.max()),
        "ess_bulk": float(az.ess(idata).x.min()),
        "ess_tail": float(az.ess(idata, method="tail").x.min()),
        "divergences": int(np.asarray(idata.sample_stats["diverging"]).sum()),
        "num_target_evals": int(attrs["num_target_evals"]),
    }
    torch.save(ref, path)
    return ref


def mala_reference(problem, seed: int, num_chains: int = 40, num_samples: int = 2500):
    """The earlier reference, to check the NUTS one against: MALA (40 chains, 1,000 warm-up, 2,500
    draws thinned by 4) in the coordinates where the full posterior's Laplace approximation is
    N(0, I); cached per data set."""
    path = os.path.join(CACHE, f"{problem['dataset']}_mala_reference_{seed}.pt")
    if os.path.exists(path):
        return torch.load(path)
    full = _FullPosterior(problem["log_prior"], problem["log_likelihood"], problem["data"])
    mode, hess = newton_mode(full, torch.zeros(problem["dim"], dtype=torch.float64))
    chol = torch.linalg.cholesky(torch.linalg.inv(-hess))
    target = Target(_Whitened(full, mode, chol), problem["dim"], dtype=torch.float64)
    start = time.perf_counter()
    idata = ds.sample(
        target, "mala", num_samples=num_samples, num_chains=num_chains, seed=seed + 1, progress=False,
        num_warmup=1000, thin=4, init=torch.zeros(problem["dim"], dtype=torch.float64),
    )  # fmt: skip
    u = torch.as_tensor(idata.posterior["x"].values).reshape(-1, problem["dim"])
    rhat = float(np.max(__import__("arviz").rhat(idata).x.values))
    ref = {"exact": mode + u @ chol.T, "time": time.perf_counter() - start, "rhat": rhat}
    torch.save(ref, path)
    return ref


def check_reference(problem, seed: int) -> None:
    """Print the NUTS reference's diagnostics and its distance to the MALA reference (all draws)."""
    nuts, mala = nuts_reference(problem, seed), mala_reference(problem, seed)
    a, b = nuts["exact"].numpy(), mala["exact"].numpy()
    d_m, d_i, _ = _metrics()
    print(
        f"reference: NUTS on the full data, {a.shape[0]:,} draws, R-hat {nuts['rhat']:.4f}, min bulk ESS "
        f"{nuts['ess_bulk']:,.0f}, min tail ESS {nuts['ess_tail']:,.0f}, {nuts['divergences']} divergences, "
        f"{nuts['time']:.0f} s; against {b.shape[0]:,} MALA draws (R-hat {mala['rhat']:.4f}): "
        f"d_MAH {d_m(a, b):.4f}, d_IAD {d_i(a, b):.4f}"
    )


def laplace_product_bias(problem, targets, exact: np.ndarray) -> float:
    """d_MAH of the product of the shards' exact Laplace Gaussians N(mode_k, -H_k^{-1})."""
    from diffstat.dnc.gaussian import gaussian_product

    modes, covs = [], []
    for t in targets:
        # the shard's log-density as a plain callable: torch.func transforms of a Target's log_prob
        # trip over its NaN counter (a tensor kept across calls)
        shard = SubPosterior(
            problem["log_prior"], problem["log_likelihood"], take_rows(problem["data"], t.rows), len(targets)
        )
        mode, hess = newton_mode(shard, torch.zeros(problem["dim"], dtype=torch.float64))
        modes.append(mode)
        covs.append(torch.linalg.inv(-hess))
    mean, _ = gaussian_product(modes, covs)
    diff = mean.numpy() - exact.mean(0)
    return float(np.sqrt(diff @ np.linalg.solve(np.cov(exact, rowvar=False), diff)))


def _symmetrise(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Apply a uniformly random permutation of the coordinates to every draw."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.argsort(torch.rand(x.shape, generator=gen), dim=1)
    return torch.gather(x, 1, perm)


class _FullPosterior:
    def __init__(self, log_prior, log_likelihood, data):
        self.log_prior, self.log_likelihood, self.data = log_prior, log_likelihood, data

    def __call__(self, theta):
        return self.log_prior(theta) + self.log_likelihood(theta, self.data)


def shard_draws(problem, seed: int, num_chains: int = 20, num_samples: int = 500):
    """(draws, scores, log-density callables) of every shard, and the full-data reference draws."""
    os.makedirs(CACHE, exist_ok=True)
    sampler = problem.get("sampler", "mala")
    path = os.path.join(CACHE, f"{problem['name']}_{sampler}_{seed}.pt")
    targets = subposteriors(
        problem["log_prior"],
        problem["log_likelihood"],
        problem["data"],
        problem["dim"],
        problem["num_shards"],
        seed=seed,
        method=problem.get("split", "contiguous"),
    )
    if os.path.exists(path):
        cached = torch.load(path)
        return cached["draws"], cached["scores"], cached["exact"], targets, cached["shard_time"]
    options = problem.get("options", dict(num_warmup=1000, thin=5, init=problem["init"]))
    start = time.perf_counter()
    with cf.ProcessPoolExecutor(max_workers=2) as ex:
        results = ds.dnc.sample_shards(
            targets,
            sampler,
            num_samples=problem.get("num_samples", num_samples),
            seed=seed,
            num_chains=problem.get("num_chains", num_chains),
            executor=ex,
            progress=False,
            **options,
        )
    shard_time = time.perf_counter() - start
    draws = [r.draws for r in results]
    scores = [r.scores for r in results]
    if "dataset" in problem:  # real data: a reference shared by every K
        exact = nuts_reference(problem, seed)["exact"]
        torch.save({"draws": draws, "scores": scores, "exact": exact, "shard_time": shard_time}, path)
        return draws, scores, exact, targets, shard_time
    full = Target(
        _FullPosterior(problem["log_prior"], problem["log_likelihood"], problem["data"]),
        problem["dim"],
        dtype=torch.float64,
    )
    # a large reference: num_samples draws for scoring and as many for the Monte Carlo floor
    idata = ds.sample(
        full,
        "mala",
        num_samples=num_samples * 2,
        num_chains=num_chains * 5,
        seed=seed + 1,
        progress=False,
        **options,
    )
    exact = torch.as_tensor(idata.posterior["x"].values).reshape(-1, problem["dim"])
    if problem["symmetric"]:
        exact = _symmetrise(exact, seed + 2)
        for i in range(len(draws)):
            perm_seed = seed + 10 + i
            gen = torch.Generator().manual_seed(perm_seed)
            perm = torch.argsort(torch.rand(draws[i].shape, generator=gen), dim=1)
            draws[i] = torch.gather(draws[i], 1, perm)
            scores[i] = torch.gather(scores[i], 1, perm)  # the score permutes with the point
    torch.save({"draws": draws, "scores": scores, "exact": exact, "shard_time": shard_time}, path)
    return draws, scores, exact, targets, shard_time


class _FitCache:
    """A process pool that remembers finished shard fits, so the diffusion rows share them (same
    seed, same settings, same draws: the same fits)."""

    def __init__(self, pool):
        self.pool, self.cache = pool, {}

    def submit(self, fn, *args, **kwargs):
        key = (
            fn.__name__
            + repr(sorted(kwargs.items()))
            + repr([float(a.double().sum()) for a in args if torch.is_tensor(a)])
        )
        if key in self.cache:
            future = cf.Future()
            future.set_result(self.cache[key])
            return future
        future = self.pool.submit(fn, *args, **kwargs)
        future.add_done_callback(
            lambda f: self.cache.__setitem__(key, f.result()) if f.exception() is None else None
        )
        return future


def run(
    problem, seed: int, methods, num_samples: int, diffusion_options: dict, combine_seed: int | None = None
):
    draws, scores, exact, targets, shard_time = shard_draws(problem, seed)
    metric_fns = _metrics()
    # Trojan et al. score 10,000 draws against 10,000 exact draws: the KDE bandwidth (Scott's rule)
    # depends on the sample size, so the reference is subsampled to num_samples draws (spread over
    # all chains); a second disjoint subsample scored the same way gives the Monte Carlo floor.
    perm = torch.randperm(exact.shape[0], generator=torch.Generator().manual_seed(seed)).numpy()
    ex = exact.numpy()[perm[:num_samples]]
    ex2 = exact.numpy()[perm[num_samples : 2 * num_samples]]
    print(
        f"\n== {problem['name']}: dim {problem['dim']}, {problem['num_shards']} shards, "
        f"{draws[0].shape[0]} draws per shard (shard sampling {shard_time:.1f} s) =="
    )
    if "dataset" in problem:
        check_reference(problem, seed)
    print(f"{'method':<16}{'d_MAH':>8}{'d_IAD':>8}{'d_skew':>8}{'time (s)':>10}{'cpu (s)':>9}")
    rows, times = {}, {}
    cseed = seed if combine_seed is None else combine_seed
    pool = cf.ProcessPoolExecutor(max_workers=2)  # the per-shard fits on two worker processes
    fit_cache = _FitCache(pool)
    for method in methods:
        opts = diffusion_options if method.startswith("diffusion") else {}
        name = method
        if method == "diffusion_exact":
            opts = dict(diffusion_options, log_probs=[t.log_prob_and_grad for t in targets])
            method = "diffusion"
        if method == "diffusion_poly":  # cubic shard energies from the log-densities at the draws
            opts = dict(diffusion_options, draw_log_probs=[t.log_prob(x) for t, x in zip(targets, draws)])
            method = "diffusion"
        if method == "diffusion_lp":  # the shards' log-densities weigh the product's modes
            opts = dict(diffusion_options, calibration_log_probs=[t.log_prob for t in targets])
            method = "diffusion"
        start, cpu_start = time.perf_counter(), time.process_time()
        if method == "diffusion":
            idata = ds.dnc.combine(
                draws,
                method,
                scores=scores,
                num_samples=num_samples,
                seed=cseed,
                progress=False,
                executor=fit_cache,
                **opts,
            )
        else:
            idata = ds.dnc.combine(
                draws, method, scores=scores, num_samples=num_samples, seed=cseed, progress=False, **opts
            )
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        approx = idata.posterior["x"].values.reshape(-1, problem["dim"])
        vals = [f(approx, ex) for f in metric_fns]
        rows[name] = vals
        times[name] = (elapsed, cpu)
        extra = ""
        a = idata.posterior.attrs
        if name in ("diffusion_exact", "diffusion_poly"):
            extra = (
                f"   (SMC from {a['start']}: {a['smc_stages']} stage(s), {a['num_shard_evals']} points per "
                f"shard; {a.get('shard_energies', 'exact shard log-densities')}, fit {a['fit_time']:.1f} s)"
            )
        elif method == "diffusion":
            extra = (
                f"   ({'fits reused; ' if name != 'diffusion' else ''}"
                f"fit per shard max {a['max_fit_time']:.1f} s,"
                f" total {a['fit_time']:.1f} s; sampling {a['combine_time']:.1f} s;"
                f" modes {a['num_modes']}, calibrated {a['num_calibrated_modes']},"
                f" shard log-density evaluations {a['num_shard_evals']} per shard"
                + (f", final IS ESS {a['final_is_ess']:.2f}" if a["num_shard_evals"] else "")
                + ")"
            )
        print(f"{name:<16}{vals[0]:>8.3f}{vals[1]:>8.3f}{vals[2]:>8.3f}{elapsed:>10.1f}{cpu:>9.1f}{extra}")
    pool.shutdown()
    floor = [f(ex2, ex) for f in metric_fns]
    print(
        f"{'(exact draws)':<16}{floor[0]:>8.3f}{floor[1]:>8.3f}{floor[2]:>8.3f}   "
        f"<- {num_samples} reference draws "
        "scored the same way: the Monte Carlo floor"
    )
    if "dataset" in problem:
        bias = laplace_product_bias(problem, targets, exact.numpy())
        print(
            f"product of the shards' exact Laplace Gaussians: d_MAH {bias:.3f} (the Gaussian combiners' bias)"
        )
        classical = [v for k, v in rows.items() if not k.startswith("diffusion")]
        for k, v in rows.items():
            if k.startswith("diffusion") and classical:
                better = all(v[i] < min(c[i] for c in classical) for i in (0, 1))
                print(f"{k} better than every classical combiner on d_MAH and d_IAD: {better}")
        routes = {
            "diffusion_exact": "run_pipeline's default route (the shards' log-densities: no fits)",
            "diffusion_poly": "combine's default given log-densities at the draws (cubic fits on 2 worker "
            "processes, then the SMC)",
        }
        for key, label in routes.items():
            if key in times:
                print(
                    f"combining time, {problem['num_shards']} shards of {draws[0].shape[0]} draws in "
                    f"{problem['dim']}-d, {label}: {times[key][0]:.1f} s wall, {times[key][1]:.1f} s CPU "
                    "in this process (the issue's budget: 60 s on 2 cores)"
                )
        print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    else:
        pub = PUBLISHED[problem["name"]]
        print("published diffusion (Trojan et al.): " + ", ".join(f"{k} {v}" for k, v in pub.items()))
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--problem", default="both", choices=["mixture", "logistic", "both", "randhie", "default", "real"]
    )
    parser.add_argument(
        "--shards", default=None, help="K for the real data sets (default: RAND HIE 8,16; Default 8,16,32)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--combine-seed", type=int, default=None, help="seed of the combiners (default: --seed)"
    )
    parser.add_argument(
        "--num-samples", type=int, default=None, help="default: 10,000 (toys), 4,000 (real data)"
    )
    parser.add_argument(
        "--methods",
        default=None,
        help="default: consensus,gaussian,swiss,semiparametric, then "
        "diffusion,diffusion_lp on the toys, diffusion_exact on real data",
    )
    parser.add_argument("--num-steps", type=int, default=None, help="default: the combiner's")
    parser.add_argument("--hidden", type=int, default=None, help="default: the combiner's")
    parser.add_argument("--num-levels", type=int, default=None, help="default: the combiner's")
    parser.add_argument("--num-final-steps", type=int, default=None, help="default: the combiner's")
    parser.add_argument(
        "--no-calibrate", action="store_true", help="diffusion without the mode-weight calibration"
    )
    args = parser.parse_args()
    problems = {"mixture": mixture_problem, "logistic": logistic_problem}
    for data, make, ks in (("randhie", randhie_problem, "8,16"), ("default", default_problem, "8,16,32")):
        for k in (int(v) for v in (args.shards or ks).split(",")):
            problems[f"{data}_k{k}"] = lambda k=k, make=make: make(k)
    by_data = {d: [n for n in problems if n.startswith(d)] for d in ("randhie", "default")}
    names = {"both": ["mixture", "logistic"], "real": by_data["randhie"] + by_data["default"], **by_data}.get(
        args.problem, [args.problem]
    )
    dopts = {
        k: v
        for k, v in dict(
            num_steps=args.num_steps,
            hidden=args.hidden,
            num_levels=args.num_levels,
            num_final_steps=args.num_final_steps,
        ).items()
        if v is not None
    }
    if args.no_calibrate:
        dopts["calibrate"] = False
    for name in names:
        problem = problems[name]()
        default = "diffusion_poly,diffusion_exact" if "dataset" in problem else "diffusion,diffusion_lp"
        methods = args.methods or f"consensus,gaussian,swiss,semiparametric,{default}"
        num_samples = (
            4000 if "dataset" in problem and args.num_samples is None else (args.num_samples or 10000)
        )
        run(problem, args.seed, methods.split(","), num_samples, dopts, args.combine_seed)


if __name__ == "__main__":
    main()
