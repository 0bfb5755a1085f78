"""Why SMC is silently wrong on the 5-d banana and low on the Student-t's log Z (``docs/smc_banana.md``).

    python benchmarks/bench_smc_banana.py --parts squeeze mixing variants student_t diagnostics

* ``squeeze``: x1's sd along the geometric path N(0, I) -> banana5, exact (quadrature) against the
  SMC particles after each stage (one run, seed 0; defaults, then ``target_ess=0.9,
  num_mcmc_steps=100``).
* ``mixing``: the moves at beta = 1 started from 1,000 exact banana5 draws, with the particles'
  dense metric and the step size adapted as in SMC: the correlation of x1, x1^2 and x2 with their
  start and the decorrelation D_k after k moves (MALA, HMC with 5 leapfrog steps, DR-MALA).
* ``variants``: ``ds.sample(banana5, "smc", num_samples=1000, seed=s)`` at defaults and with more
  moves, slower tempering, HMC, ``max_pareto_k=0.5``: x1's sd, x2..x5's mean and sd, log Z.
* ``student_t``: the 4-d t (5 dof), seeds 0-3, defaults against ``max_pareto_k`` 0.7 and 0.5.
* ``posteriordb``: SMC on four posteriordb posteriors (``bench_posteriordb.run_one``, seed 0)
  at defaults and with ``max_pareto_k=0.5``: errors against Stan's reference and evaluations.
* ``audit``: ``bench_audit.run`` (the audit's scoring) at defaults and with ``max_pareto_k=0.5``
  on the audit's cases (``--cases``), seeds ``--seeds``.
* ``reference``: ``bench_audit.run`` from the reference N(0, 3^2 I) instead of N(0, I), seed 0.
* ``lag`` (tried, not adopted): AIS's lag check (``diffstat/tempering/lag.py``) at SMC's last
  reweighting, to beta = 1, per run: the log-density lag and the acceptance shift (the previous
  stage's per-particle acceptance) under that reweighting's weights, each with its noise z, for the
  bananas, the Student-t and two mixtures, seeds ``--seeds``.
* ``diagnostics`` (tried, not adopted as warnings): per run, the largest Pareto k of a stage's
  weights and the Stein identity E[u (L^T grad log p)^T] = -I on the final weighted particles
  (u the whitened coordinates), for the bananas, the Student-t and two mixtures.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import warnings

import numpy as np
import torch

import diffstat as ds
import diffstat.tempering.core as core
import diffstat.tempering.smc as smc
from diffstat._util import pareto_k
from diffstat.tempering.moves import particle_metric
from diffstat.tempering.path import get_kernel, make_path, move
from diffstat.mcmc.metric import inverse_quadratic

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from audit_cases import CASES  # noqa: E402

torch.set_num_threads(1)
F64 = torch.float64


def exact_x1_sd(beta: float, dim: int = 5, b: float = 0.5, s: float = 1.5) -> float:
    """x1's sd under pi_beta ~ N(0, I)^(1 - beta) banana^beta: integrating x2..xd out leaves
    exp(-x1^2 ((1 - beta) + beta / s^2) / 2 - (dim - 1) beta (1 - beta) (b x1^2)^2 / 2)."""
    t = np.linspace(-12, 12, 200_001)
    logp = -(t**2) * ((1 - beta) + beta / s**2) / 2 - (dim - 1) * beta * (1 - beta) * (b * t**2) ** 2 / 2
    p = np.exp(logp - logp.max())
    return float(math.sqrt((p * t**2).sum() / p.sum()))


def squeeze(options: dict) -> None:
    target, _ = CASES["banana5"]()
    path, rec = make_path(target), []
    orig = smc.tempered_step

    def recording(g, state, new_beta, **kw):
        st, info = orig(g, state, new_beta, **kw)
        w, x1 = torch.softmax(st.log_weights, -1), st.particles.x[:, 0]
        sd = float((w * (x1 - (w * x1).sum()) ** 2).sum().sqrt())
        rec.append((float(new_beta), info.num_mcmc_steps, sd))
        return st, info

    smc.tempered_step = recording
    try:
        g = torch.Generator().manual_seed(0)
        out = smc.adaptive_tempered_smc(g, path, path.sample_reference(1000, g), **options)
    finally:
        smc.tempered_step = orig
    print(f"\nsqueeze {options or 'defaults'} (log Z {out.log_normalizer:.3f})")
    print("| beta | moves | x1 sd, particles | x1 sd, exact |\n| --- | --- | --- | --- |")
    for beta, k, sd in rec:
        print(f"| {beta:.4f} | {k} | {sd:.3f} | {exact_x1_sd(beta):.3f} |")


def mixing(kernel_name: str, n: int = 1000, checkpoints=(8, 32, 64, 128, 256, 400)) -> None:
    target, _ = CASES["banana5"]()
    path = make_path(target)
    g = torch.Generator().manual_seed(0)
    x1 = 1.5 * torch.randn(n, 1, generator=g, dtype=F64)
    x = torch.cat([x1, 0.5 * x1**2 + torch.randn(n, 4, generator=g, dtype=F64)], 1)
    ps, x0, metric = path.evaluate(x), x, particle_metric(x, None, "auto")
    kernel, accept = get_kernel(kernel_name)
    log_h, one = torch.tensor(math.log(0.5), dtype=F64), torch.tensor(1.0, dtype=F64)
    print(f"\nmixing at equilibrium, {kernel_name}")
    print(
        "| moves | step size | corr x1 | corr x1^2 | corr x2 | D_k |\n| --- | --- | --- | --- | --- | --- |"
    )
    for k in range(1, max(checkpoints) + 1):
        ps, info = move(kernel, g, ps, path, one, torch.exp(log_h), metric)
        log_h = log_h + (info.acceptance_rate.mean() - accept)
        if k in checkpoints:
            c = [np.corrcoef(f(x0), f(ps.x))[0, 1] for f in (lambda v: v[:, 0], lambda v: v[:, 0] ** 2)]
            c.append(np.corrcoef(x0[:, 1], ps.x[:, 1])[0, 1])
            d_k = float(inverse_quadratic(metric, ps.x - x0).mean()) / 5
            print(
                f"| {k} | {float(torch.exp(log_h)):.3f} | {c[0]:.2f} | {c[1]:.2f} | {c[2]:.2f} | {d_k:.2f} |"
            )


def run_sample(case: str, seed: int, options: dict):
    target, exact = CASES[case]()
    e0 = target.num_target_evals
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = ds.sample(target, "smc", num_samples=1000, seed=seed, progress=False, **options)
    x = idata.posterior["x"].values.reshape(-1, target.dim)
    attrs = idata.posterior.attrs
    warned = "; ".join(str(w.message)[:60] for w in caught if issubclass(w.category, RuntimeWarning))
    return x, exact, attrs, target.num_target_evals - e0, warned or "-"


def variants(seeds) -> None:
    print(
        "\nbanana5, ds.sample(..., 'smc', num_samples=1000) (exact: x1 sd 1.5, x2..x5 mean 1.125, sd 1.879)"
    )
    print("| options | seed | x1 sd | x2..x5 mean | x2..x5 sd | log Z (se) | evals | warnings |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for options in (
        {},
        {"num_mcmc_steps": 200},
        {"target_ess": 0.9},
        {"kernel": "hmc"},
        {"max_pareto_k": 0.5},
    ):
        for seed in seeds:
            x, _, attrs, evals, warned = run_sample("banana5", seed, options)
            lz, se = attrs["log_normalizer"], attrs["log_normalizer_se"]
            print(
                f"| {options or 'defaults'} | {seed} | {x[:, 0].std():.3f} | {x[:, 1:].mean():.3f} | "
                f"{x[:, 1:].std(0).mean():.3f} | {lz:.3f} ({se:.3f}) | {evals:,} | {warned} |"
            )


def student_t(seeds) -> None:
    print("\nstudent_t (4-d, 5 dof), log Z exact 0")
    print("| options | seed | log Z (se) | stages | largest sd error | evals |")
    print("| --- | --- | --- | --- | --- | --- |")
    for options in ({}, {"max_pareto_k": 0.7}, {"max_pareto_k": 0.5}):
        for seed in seeds:
            x, exact, attrs, evals, _ = run_sample("student_t", seed, options)
            sd_err = float(np.max(np.abs(x.std(0) / exact["sd"] - 1)))
            lz, se = attrs["log_normalizer"], attrs["log_normalizer_se"]
            print(
                f"| {options or 'defaults'} | {seed} | {lz:.3f} ({se:.3f}) | {attrs['num_stages']} | "
                f"{sd_err:.3f} | {evals:,} |"
            )


def stein_diagonal(ps, log_w) -> np.ndarray:
    """Weighted estimates of E[u_j (L^T grad log p)_j], each -1 under the target."""
    w = torch.softmax(log_w, -1)
    m = (w[:, None] * ps.x).sum(0)
    cov = (w[:, None] * (ps.x - m)).T @ (ps.x - m)
    chol = torch.linalg.cholesky(cov)
    u = torch.linalg.solve_triangular(chol, (ps.x - m).T, upper=False).T
    g_u = (ps.base_grad + ps.delta_grad) @ chol
    return (w[:, None] * u * g_u).sum(0).numpy()


def _recording_reweight(orig, ks: list):
    """``core.tempered_reweight`` that appends each stage's weights' Pareto k to ``ks``."""

    def make(b0, b1):
        reweight = orig(b0, b1)

        def rw(generator, ps, log_w):
            p, inc = reweight(generator, ps, log_w)
            ks.append(pareto_k(log_w + inc))
            return p, inc

        return rw

    return make


def diagnostics(seeds, cases=("banana5", "banana2", "student_t", "mix6", "nw8")) -> None:
    print("\none run each: largest stage Pareto k, Stein diagonal (each -1 under the target)")
    print("| case | seed | stages | largest k | Stein min | Stein max | log Z |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    orig = core.tempered_reweight
    for case in cases:
        target, _ = CASES[case]()
        path = make_path(target)
        for seed in seeds:
            ks = []
            core.tempered_reweight = _recording_reweight(orig, ks)
            try:
                g = torch.Generator().manual_seed(seed)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out = smc.adaptive_tempered_smc(g, path, path.sample_reference(1000, g))
            finally:
                core.tempered_reweight = orig
            st = stein_diagonal(out.particles, out.log_weights)
            print(
                f"| {case} | {seed} | {len(ks)} | {np.nanmax(ks):.2f} | {st.min():.3f} | {st.max():.3f} | "
                f"{out.log_normalizer:.3f} |"
            )


POSTERIORS = ("gp_pois_regr-gp_regr", "sblri-blr", "garch-garch11", "kidiq-kidscore_momhs")


def posteriordb(options: dict) -> None:
    import bench_posteriordb

    orig = ds.sample

    def sample(target, method, **kw):
        return orig(target, method, **kw, **options)

    print(f"\nposteriordb, smc {options or 'defaults'}")
    print("| posterior | mean err | sd err | evals | warnings |\n| --- | --- | --- | --- | --- |")
    ds.sample = sample
    try:
        for name in POSTERIORS:
            row = bench_posteriordb.run_one(name, "smc", 0, "float64", 1000)
            said = row.get("warnings", "-")
            print(f"| {name} | {row['mean_err']:.3f} | {row['sd_err']:.3f} | {row['evals']:,} | {said} |")
    finally:
        ds.sample = orig


def audit(cases, seeds) -> None:
    import bench_audit

    print(
        "\n| case | method | seed | (chain, draw) | mean err (sd) | sd err | mode TV | log Z err | log Z se ",
        end="",
    )
    print("| evals | s | bars | RuntimeWarnings |\n" + "| --- " * 14 + "|")
    for case in cases:
        for seed in seeds:
            for options in ({}, {"max_pareto_k": 0.5}):
                row = bench_audit.fmt(bench_audit.run(case, "smc", seed, progress=False, **options))
                print(row.replace("| smc |", f"| smc {options or ''} |"), flush=True)


def wide_reference(cases, seed: int = 0, scale: float = 3.0) -> None:
    import bench_audit

    print(f"\nfrom N(0, {scale:g}^2 I)")
    print(
        "| case | method | seed | (chain, draw) | mean err (sd) | sd err | mode TV | log Z err | log Z se ",
        end="",
    )
    print("| evals | s | bars | RuntimeWarnings |\n" + "| --- " * 14 + "|")
    for case in cases:
        dim = CASES[case]()[0].dim
        ref = torch.distributions.Independent(
            torch.distributions.Normal(torch.zeros(dim, dtype=F64), scale), 1
        )
        print(bench_audit.fmt(bench_audit.run(case, "smc", seed, progress=False, reference=ref)), flush=True)


def _recording_step(records: list):
    """``core.smc_step`` that appends, at each stage, the stage's beta, its weights' log-density lag
    and the acceptance shift of the previous stage's moves (``lag.weighted_shift``) to ``records``."""
    from diffstat.tempering.lag import weighted_shift

    real, previous = core.smc_step, {}

    def step(generator, state, reweight, **kw):
        ps, incr = reweight(generator, state.particles, state.log_weights)
        new, info = real(generator, state, lambda g, p, w: (ps, incr), **kw)
        acc = previous.get(id(kw["path"]))
        if acc is not None and acc.shape == incr.shape:
            log_w = state.log_weights + incr
            records.append(
                (float(kw["beta"]), weighted_shift(log_w, ps.target_log_prob), weighted_shift(log_w, acc))
            )
        previous[id(kw["path"])] = info.acceptance
        return new, info

    return step


def lag(seeds, cases=("banana5", "banana2", "student_t", "mix6", "nw8")) -> None:
    import bench_audit

    print(
        "| case | seed | mean err | sd err | log Z err | per run at beta = 1: lag (z), acceptance shift (z) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    real = core.smc_step
    for case in cases:
        for seed in seeds:
            records = []
            core.smc_step = _recording_step(records)
            try:
                target, exact = CASES[case]()
                idata = ds.sample(
                    target, "smc", num_samples=1000, seed=seed, progress=False, check_modes=False
                )
            finally:
                core.smc_step = real
            sc = bench_audit.score(idata, exact)
            runs = "; ".join(
                f"{a[0]:.3f} ({a[0] / a[1]:.1f}), {b[0]:.3f} ({b[0] / b[1]:.1f})"
                for beta, a, b in records
                if beta >= 1.0
            )
            print(
                f"| {case} | {seed} | {sc['mean_err']:.3f} | {sc['sd_err']:.3f} | "
                f"{sc.get('log_z_err', math.nan):.3f} | {runs} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parts = (
        "squeeze",
        "mixing",
        "variants",
        "student_t",
        "posteriordb",
        "audit",
        "reference",
        "diagnostics",
        "lag",
    )
    parser.add_argument("--parts", nargs="+", default=list(parts), choices=parts)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--cases", nargs="+", default=["banana5", "banana2", "student_t", "corr50", "mix6"])
    args = parser.parse_args()
    if "squeeze" in args.parts:
        squeeze({})
        squeeze({"target_ess": 0.9, "num_mcmc_steps": 100})
    if "mixing" in args.parts:
        for kernel in ("mala", "hmc", "dr_mala"):
            mixing(kernel)
    if "variants" in args.parts:
        variants(args.seeds[:3])
    if "student_t" in args.parts:
        student_t(args.seeds)
    if "posteriordb" in args.parts:
        posteriordb({"max_pareto_k": 0.5})
    if "audit" in args.parts:
        audit(args.cases, args.seeds[:3])
    if "reference" in args.parts:
        wide_reference(["banana5", "banana2", "student_t", "mix6"])
    if "diagnostics" in args.parts:
        diagnostics(args.seeds[:3])
    if "lag" in args.parts:
        lag(args.seeds[:3])


if __name__ == "__main__":
    main()
