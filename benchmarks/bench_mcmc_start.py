"""The MCMC start phase (``diffstat/mcmc/start.py``) on funnel geometry (``docs/mcmc_start.md``).

    python benchmarks/bench_mcmc_start.py --start            # find_start alone on funnel(10)
    python benchmarks/bench_mcmc_start.py --seeds 0 1 2      # ds.sample(funnel(10), "nuts") at defaults
    python benchmarks/bench_mcmc_start.py --start --seeds 0 1 2 --typical   # the same, typical=True
    python benchmarks/bench_mcmc_start.py --elbos            # local Gaussians' ELBOs on the funnel
    python benchmarks/bench_mcmc_start.py --posteriordb NAME ... [--typical] [--method hmc]

``--start``: :func:`~diffstat.mcmc.start.find_start` from 64 reference draws (N(0, I), float32)
and from 64 exact draws (float64) of Neal's funnel(10) (seed 0): the start points' x_1 (mean, min,
max, sd; the posterior x_1 ~ N(0, 3)) and the start's target evaluations. ``--seeds``:
``ds.sample(Funnel(10).as_target(), method, num_samples=1000, seed=s)`` at defaults (4 chains):
mean and sd of x_1 (exact 0 and 3), divergent transitions, the largest R-hat, the start's
evaluations (a separate find_start from 4 reference draws with the run's seed), all
evaluations, seconds, and the RuntimeWarnings (first words). The Eight Schools and AR(1) cases run
through ``benchmarks/bench_audit.py`` (``--cases schools_c ar1_latent``).
"""

from __future__ import annotations

import argparse
import functools
import time
import warnings

import torch

import diffstat as ds
from diffstat.mcmc import sampler
from diffstat.mcmc.base import init
from diffstat.mcmc.start import find_start
from diffstat.targets.funnel import Funnel

torch.set_num_threads(1)


def start_only(n: int = 64, seed: int = 0, dim: int = 10, exact: bool = False, typical: bool = False) -> dict:
    """find_start from ``n`` reference draws (N(0, I), float32 as in ds.sample) or, ``exact``, from
    ``n`` exact draws in float64: the start points' x_1 and the evaluations."""
    funnel = Funnel(dim)
    target = funnel.as_target(dtype=torch.float64) if exact else funnel.as_target()
    gen = torch.Generator().manual_seed(seed)
    x0 = funnel.sample(n, gen) if exact else target.sample_reference(n, gen, None)
    state = init(target.log_prob_and_grad, x0)
    before = target.num_target_evals
    out, cov = find_start(gen, state, target.log_prob_and_grad, typical=typical)
    x1 = out.x[:, 0]
    return dict(
        x1_mean=float(x1.mean()), x1_min=float(x1.min()), x1_max=float(x1.max()),
        x1_sd=float(x1.std()), evals=target.num_target_evals - before, cov=cov is not None,
    )  # fmt: skip


def start_evals(seed: int, dim: int = 10, chains: int = 4, typical: bool = False) -> int:
    """The start phase's evaluations in a default run: find_start from the run's own reference draws."""
    target = Funnel(dim).as_target()
    gen = torch.Generator().manual_seed(seed)
    x0 = target.sample_reference(chains, gen, None)
    state = init(target.log_prob_and_grad, x0)
    before = target.num_target_evals
    find_start(gen, state, target.log_prob_and_grad, typical=typical)
    return target.num_target_evals - before


def run(seed: int, method: str = "nuts", dim: int = 10, typical: bool = False) -> dict:
    target = Funnel(dim).as_target()
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = ds.sample(target, method, num_samples=1000, seed=seed, progress=False)
    seconds = time.perf_counter() - t0
    post = idata.posterior
    x = post[list(post.data_vars)[0]].values  # (chains, draws, dim)
    x1 = x[..., 0].reshape(-1)
    return dict(
        seed=seed, method=method, x1_mean=float(x1.mean()), x1_sd=float(x1.std()),
        div=int(idata.sample_stats["diverging"].values.sum()), rhat=float(post.attrs["rhat_max"]),
        start=start_evals(seed, dim, typical=typical), evals=int(post.attrs["num_target_evals"]), sec=seconds,
        warn=[str(w.message)[:90].replace("\n", " ") for w in caught if w.category is RuntimeWarning],
    )  # fmt: skip


def elbos(n: int = 16, draws: int = 200, seed: int = 1, dim: int = 10) -> None:
    """200-draw ELBOs of three local Gaussians at ``n`` exact funnel draws (float64), where every
    Hessian is indefinite: N(x + |H|^-1 g, |H|^-1), N(x + D^-1 g, D^-1) with D = |diag H|, and
    N(x, |H|^-1) (``diffstat.mcmc.pathfinder.candidates`` keeps the last two)."""
    from diffstat.mcmc.pathfinder import _floored, local_gaussians
    from diffstat.mcmc.start import _hessian

    target = Funnel(dim).as_target(dtype=torch.float64)
    lpg = target.log_prob_and_grad
    gen = torch.Generator().manual_seed(seed)
    x = Funnel(dim).sample(n, gen)
    _, g = lpg(x)
    hess = _hessian(lpg, x, g)
    lam, vec = torch.linalg.eigh(hess)
    prec_abs = vec @ (_floored(lam).unsqueeze(-1) * vec.transpose(1, 2))
    d = _floored(hess.diagonal(dim1=-2, dim2=-1))
    abs_step = torch.linalg.solve(prec_abs, g.unsqueeze(-1)).squeeze(-1)
    z = torch.randn(n, draws, dim, generator=gen, dtype=torch.float64)
    print("x_1:", [round(v, 1) for v in x[:, 0].tolist()])
    print("positive definite:", int((torch.linalg.cholesky_ex(hess)[1] == 0).sum()), "of", n)
    for label, mean, prec in (
        ("N(x + |H|^-1 g, |H|^-1)", x + abs_step, prec_abs),
        ("N(x + D^-1 g, D^-1)", x + g / d, torch.diag_embed(d)),
        ("N(x, |H|^-1)", x, prec_abs),
    ):
        pts, log_q, _ = local_gaussians(mean, prec, z)
        lp, _ = lpg(pts.reshape(-1, dim))
        elbo = (lp.reshape(n, draws) - log_q).mean(-1)
        print(label, [round(v, 1) for v in elbo.tolist()])


def posteriordb_row(name: str, method: str) -> None:
    """``benchmarks/bench_posteriordb.py``'s run of one posterior (seed 0, float64, 4 chains), in this
    process so that ``--typical`` reaches it: mean and sd errors (in reference sds), R-hat, evals."""
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from bench_posteriordb import run_one

    t0 = time.perf_counter()
    r = run_one(name, method, 0, "float64", 1000)
    print(
        f"| {name} | {method} | {r['mean_err']:.3f} | {r['sd_err']:.3f} | {r['rhat']:.3f} | {r['evals']:,} "
        f"| {time.perf_counter() - t0:.0f} | {r['passed']} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--start", action="store_true")
    parser.add_argument("--elbos", action="store_true", help="ELBOs of the local Gaussians on the funnel")
    parser.add_argument("--seeds", type=int, nargs="*", default=[])
    parser.add_argument("--method", default="nuts")
    parser.add_argument("--typical", action="store_true", help="find_start(..., typical=True) in every run")
    parser.add_argument("--posteriordb", nargs="*", default=[], help="posteriordb names, run in this process")
    args = parser.parse_args()
    if args.typical:  # ds.sample's driver calls find_start by name: the option goes in there
        sampler.find_start = functools.partial(find_start, typical=True)
    if args.elbos:
        elbos()
    if args.start:
        print("reference draws:", start_only(typical=args.typical))
        print("exact draws, float64:", start_only(exact=True, typical=args.typical))
    if args.posteriordb:
        print("| posterior | method | mean err | sd err | R-hat | evals | s | pass |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.posteriordb:
        posteriordb_row(name, args.method)
    if args.seeds:
        print(
            "| seed | method | mean x_1 | sd x_1 | divergent | R-hat | start evals | evals | s | warnings |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for seed in args.seeds:
        r = run(seed, args.method, typical=args.typical)
        print(
            f"| {r['seed']} | {r['method']} | {r['x1_mean']:.2f} | {r['x1_sd']:.2f} | {r['div']} "
            f"| {r['rhat']:.3f} "
            f"| {r['start']:,} | {r['evals']:,} | {r['sec']:.0f} | {' / '.join(r['warn']) or '-'} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
