"""SMC on a diamonds-like collinear regression with an exact posterior (issue 13, ``docs/smc_collinear.md``).

    python benchmarks/bench_smc_collinear.py --parts methods stages variants mix6

The target is ``collinear()`` of ``tests/tempering/correlated_targets.py``: an intercept and 24
standardised polynomial and product columns, n = 500, the NIG-conjugate model with prior_scale 10
(condition number of X^T X 1.7e12, least eigenvalue of the posterior correlation matrix 4e-6).
Each part compares the particle metric of SMC before issue 13 (``old``: dense from 10 effective
particles per dimension, else diagonal; always shrunk toward its diagonal by d / n_eff) with the
current one (``new``: dense from 4, the shrinkage capped at the least eigenvalue of the weighted
correlation matrix) and, where said, the shrinkage removed outright (``noshrink``).

``--kinds`` picks the metrics of ``methods`` and ``stages`` (default ``old new``; also ``noshrink`` and
``shrink10``, the shrinkage off from 10 effective particles per dimension, diagonal below).

* ``methods``: ``ds.sample(target, m, num_samples=1000, seed=0)`` at defaults for ``--methods``
  (4 runs for SMC): max |mean error| in posterior sds, max relative sd error, sigma, log Z error,
  evaluations, RuntimeWarnings. SMC under each of ``--kinds``, with ``--smc-options key=value``.
* ``stages``: one SMC run (1,000 particles, seed 0) per metric: per stage beta, ESS before
  resampling, the metric against the exact tempered covariance of beta (the extreme eigenvalues
  of C_exact^-1/2 M C_exact^-1/2; the tempered posterior is NIG with X, y scaled by sqrt(beta)),
  moves, first step size, acceptance, decorrelation.
* ``variants``: one SMC run per metric on smaller or less collinear versions (``--degrees``,
  ``--prior-scales``) and on the same X with an independent prior on log sigma (no exact answer;
  the spread of the four runs' log Z and the evaluations only).
* ``mix6``: the audit's two-mode 6-d mixture, ``--seeds``, under each metric and ``noshrink``:
  the heavier mode's share (0.6 exact) and log Z error.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import diffstat as ds
import diffstat.tempering.core as core
import diffstat.tempering.smc as smc
from diffstat.targets import GaussianMixture
from diffstat.tempering.path import make_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "tempering"))
from correlated_targets import NIGRegression, collinear  # noqa: E402

F64 = torch.float64
NEW = smc.cloud_metric


def factory(kind: str):
    """SMC's ``cloud_metric`` built the ``old``, ``new``, ``noshrink`` or ``shrink10`` way."""
    if kind == "new":
        return NEW
    if kind == "old":
        return lambda metric, within, **_: core.cloud_metric(metric, within)
    if kind == "shrink10":  # shrinkage off from 10 effective particles per dimension, diagonal below
        return lambda metric, within, **_: core.cloud_metric(metric, within, shrink_until=10.0)
    return lambda metric, within, **_: core.cloud_metric(
        metric, within, shrink_until=smc.DENSE_RATIO, dense_ratio=smc.DENSE_RATIO
    )


def use_metric(kind: str) -> None:
    smc.cloud_metric = factory(kind)


def errors(x: np.ndarray, t: NIGRegression) -> tuple[float, float, float]:
    b = x[:, :-1]
    me = np.max(np.abs(b.mean(0) - t.beta_mean.numpy()) / t.beta_sd.numpy())
    se = np.max(np.abs(b.std(0) / t.beta_sd.numpy() - 1))
    return float(me), float(se), float(np.exp(x[:, -1]).mean())


def methods(names, seed: int, kinds, options: dict) -> None:
    t = collinear()
    for m in names:
        for kind in kinds if m == "smc" else ("-",):
            if m == "smc":
                use_metric(kind)
            t.num_target_evals = 0
            t0 = time.time()
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                idata = ds.sample(
                    t, m, num_samples=1000, seed=seed, progress=False, **(options if m == "smc" else {})
                )
            x = idata.posterior["x"].values.reshape(-1, t.dim)
            me, se, sig = errors(x, t)
            lz = idata.posterior.attrs.get("log_normalizer")
            lz = "-" if lz is None else f"{lz - t.log_evidence:+.3f}"
            warns = [str(a.message)[:70] for a in w if issubclass(a.category, RuntimeWarning)]
            print(
                f"{m} {kind}: mean err {me:.3f} sd err {se:.3f} sigma {sig:.4f} (exact {t.sigma_mean:.4f})"
                f" logZ err {lz} evals {idata.posterior.attrs['num_target_evals']:,} {time.time() - t0:.0f}s",
                warns,
                flush=True,
            )
    use_metric("new")


def exact_tempered_cov(t: NIGRegression, beta: float) -> torch.Tensor:
    X, y, n = t.X, t.y, t.X.shape[0]
    prec = torch.linalg.inv(t.V0) + beta * X.T @ X
    m = torch.linalg.solve(prec, beta * X.T @ y)
    a = t.a0 + n * beta / 2
    b = t.b0 + 0.5 * beta * float(y @ y) - 0.5 * float(m @ prec @ m)
    return b / (a - 1) * torch.linalg.inv(prec)


def recording(make, rows: list):
    """A ``cloud_metric`` factory like ``make`` whose preconditioners append (log weights, metric)."""

    def build(*args, **kwargs):
        inner = make(*args, **kwargs)

        def precondition(generator, stage, particles, log_w):
            out = inner(generator, stage, particles, log_w)
            rows.append((log_w, out[0]))
            return out

        return precondition

    return build


def stages(seed: int, kinds) -> None:
    t = collinear()
    for kind in kinds:
        rows = []
        smc.cloud_metric = recording(factory(kind), rows)
        path = make_path(t, None)
        gen = torch.Generator().manual_seed(seed)
        x0 = path.sample_reference(1000, gen, None)
        t.num_target_evals = 0
        out = smc.adaptive_tempered_smc(gen, path, x0)
        st = out.stages
        w = torch.softmax(out.log_weights, -1)
        mean = (w[:, None] * out.particles.x).sum(0)
        sd = ((w[:, None] * (out.particles.x - mean) ** 2).sum(0)).sqrt()
        me = float(((mean[:-1] - t.beta_mean).abs() / t.beta_sd).max())
        se = float((sd[:-1] / t.beta_sd - 1).abs().max())
        print(
            f"\n{kind}: {len(st['beta'])} stages, {t.num_target_evals:,} evals, log Z err "
            f"{out.log_normalizer - t.log_evidence:+.3f}, Eves {out.num_eves}, mean err {me:.3f},"
            f" sd err {se:.3f}"
        )
        print("stage     beta  ESS  metric/exact var min..max  moves  step   acc    D")
        for k, (log_w, metric) in enumerate(rows):
            beta = float(st["beta"][k])
            c = exact_tempered_cov(t, beta)
            m = metric.inv_mass[:-1, :-1] if hasattr(metric, "inv_mass") else torch.diag(metric[:-1])
            li = torch.linalg.inv(torch.linalg.cholesky(c))
            ev = torch.linalg.eigvalsh(li @ m @ li.T)
            n_eff = float(1 / (torch.softmax(log_w, -1) ** 2).sum())
            print(
                f"{k:5d} {beta:8.2e} {n_eff:4.0f} {float(ev.min()):9.3g} .. {float(ev.max()):9.3g}"
                f" {'dense' if hasattr(metric, 'inv_mass') else 'diag '} {int(st['num_mcmc_steps'][k]):4d}"
                f" {float(st['step_size'][k]):8.2e} {float(st['acceptance_rate'][k]):.2f}"
                f" {float(st['decorrelation'][k]):.2f}"
            )
    use_metric("new")


def free_sigma(degree: int) -> ds.Target:
    """The collinear X and y, beta ~ N(0, 10^2 I) and log sigma ~ N(0, 1) independent."""
    t = collinear(degree=degree)
    X, y = t.X, t.y
    p = X.shape[1]

    def log_prob(z):
        beta, s = z[:, :-1], z[:, -1]
        resid = y - beta @ X.T
        lik = -0.5 * (resid**2).sum(-1) * torch.exp(-2 * s) - y.shape[0] * s
        return lik - 0.5 * (beta**2).sum(-1) / 100 - 0.5 * s**2

    ref = torch.distributions.Independent(
        torch.distributions.Normal(
            torch.zeros(p + 1, dtype=F64), torch.tensor([10.0] * p + [1.0], dtype=F64)
        ),
        1,
    )
    return ds.Target(log_prob, p + 1, reference=ref, dtype=F64)


def variants(degrees, prior_scales, seed: int) -> None:
    for degree in degrees:
        for scale in prior_scales:
            t = collinear(degree=degree, prior_scale=scale)
            for kind in ("old", "new"):
                use_metric(kind)
                t.num_target_evals = 0
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    idata = ds.sample(t, "smc", num_samples=1000, num_chains=1, seed=seed, progress=False)
                me, se, _ = errors(idata.posterior["x"].values.reshape(-1, t.dim), t)
                print(
                    f"degree {degree} (p = {t.p}) prior_scale {scale} {kind}: mean err {me:.3f}"
                    f" sd err {se:.3f}"
                    f" logZ err {idata.posterior.attrs['log_normalizer'] - t.log_evidence:+.3f}"
                    f" evals {idata.posterior.attrs['num_target_evals']:,} warnings {len(w)}",
                    flush=True,
                )
        t = free_sigma(degree)
        for kind in ("old", "new"):
            use_metric(kind)
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                idata = ds.sample(t, "smc", num_samples=1000, seed=seed, progress=False, check_modes=False)
            a = idata.posterior.attrs
            print(
                f"degree {degree} free log sigma {kind}: log Z {a['log_normalizer']:.3f}"
                f" +- {a['log_normalizer_se']:.3f},"
                f" R-hat across runs {a['rhat_max']:.3f}, evals {a['num_target_evals']:,}, warnings"
                f" {[str(m.message)[:60] for m in w]}",
                flush=True,
            )
    use_metric("new")


def mix6(seeds) -> None:
    u = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0], dtype=F64)
    for kind in ("old", "noshrink", "new"):
        use_metric(kind)
        tv, lz = [], []
        for seed in seeds:
            gm = GaussianMixture(
                torch.stack([2.2 * u, -1.8 * u]), [0.6, 0.4], scales=[0.7, 1.1], log_normalizer=-0.4
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                idata = ds.sample(gm.as_target(dtype=F64), "smc", num_samples=1000, seed=seed, progress=False)
            x = torch.as_tensor(idata.posterior.x.values).reshape(-1, 6)
            tv.append(abs(float(((x @ u) > 0).double().mean()) - 0.6))
            lz.append(idata.posterior.attrs["log_normalizer"] + 0.4)
        print(
            f"mix6 {kind}: mode TV per seed {np.round(tv, 3).tolist()} mean {np.mean(tv):.3f};"
            f" log Z err {np.round(lz, 3).tolist()} rms {math.sqrt(np.mean(np.square(lz))):.3f}",
            flush=True,
        )
    use_metric("new")


def parse(option: str):
    key, value = option.split("=", 1)
    try:
        return key, int(value)
    except ValueError:
        try:
            return key, float(value)
        except ValueError:
            return key, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["methods", "stages", "variants", "mix6"])
    parser.add_argument("--methods", nargs="+", default=["smc"])
    parser.add_argument("--degrees", nargs="+", type=int, default=[3, 4, 8])
    parser.add_argument("--prior-scales", nargs="+", type=float, default=[10.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(6)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smc-options", nargs="*", default=[], help="key=value options of SMC (methods)")
    parser.add_argument("--kinds", nargs="+", default=["old", "new"], help="metrics for methods, stages")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for part in args.parts:
        print(f"# {part}", flush=True)
        if part == "methods":
            methods(args.methods, args.seed, args.kinds, dict(parse(o) for o in args.smc_options))
        elif part == "stages":
            stages(args.seed, args.kinds)
        elif part == "variants":
            variants(args.degrees, args.prior_scales, args.seed)
        elif part == "mix6":
            mix6(args.seeds)
        else:
            raise SystemExit(f"unknown part {part!r}")


if __name__ == "__main__":
    main()
