r"""SMC on Neal's funnel in 10-d, with and without randomised step sizes (``step_jitter``).

Target: ``diffstat.targets.Funnel(10)`` (exact log Z 0, sd of x_1 3), reference N(0, I), the SMC
defaults otherwise. Each setting is run once per seed with ``num_samples`` particles; the columns
are the log Z error, the draws' sd of x_1, their 1% and 99% quantiles of x_1 (exact -6.98, 6.98),
the target evaluations (``attrs["num_target_evals"]``), the number of stages and the seconds.
Settings are SMC options written ``key=value`` (Python literals), ``;`` between options, one per
``--settings`` argument; ``default`` is no option; ``reference_sd=s`` sets the reference to
N(0, s^2 I); ``dr_stages=K`` and/or ``dr_factor=c`` make the kernel delayed-rejection MALA
(``diffstat.mcmc.dr_mala.dr_mala_step``) with ``K`` stages (default 2) and step reduction ``c``
(default 4), its first-stage target acceptance ``target_accept`` (default 0.4) and MALA's first
step size (``kernel='dr_mala'`` is the same with both defaults). Figures and the commands that gave them:
``docs/smc_funnel.md``.

``--checks`` runs the same settings where SMC is right today, 1000 particles unless ``--particles``:

* ``gauss``: a 10-d Gaussian, equicorrelated at 0.9, sds from 0.1 to 10 (log-spaced), mean 1, log Z 0;
  columns: log Z error, the largest |mean error| and |sd / exact sd - 1| over coordinates;
* ``mixture6``: the 6-d three-mode mixture of ``tests/tempering/test_smc.py`` (weights 0.5 / 0.3 / 0.2,
  sds 0.7 / 1.0 / 0.85, log Z 2.3), with that test's ``target_ess=0.9``; columns: log Z error, the
  total variation of the mode shares;
* ``regression``, ``ar5``, ``mixture``: the targets of ``benchmarks/bench_smc_moves.py`` with their
  exact answers (log Z error; the largest |mean error| in posterior sd and relative sd error for
  the regressions, the mode total variation for the mixture);
* posteriordb posteriors (any other name in ``--targets``): the largest mean and sd errors in
  reference sds against Stan's reference draws (``diffstat.posteriordb``), log Z not known ("-").

``--trace`` follows one funnel run stage by stage (the loop of ``adaptive_tempered_smc``, same draws
as ``ds.sample`` with the same seed) against the exact tempered targets: on the path
:math:`\pi_\beta \propto \mathcal N(0, I)^{1-\beta}\,\tilde\pi^\beta` the coordinates 2..d
integrate out in closed form, leaving the 1-d marginal of :math:`x_1`

.. math:: \log \pi_\beta(x_1) = \beta \log\mathcal N(x_1; 0, 9) + (1-\beta)\log\mathcal N(x_1; 0, 1)
   - (d-1)\left[\tfrac{\beta x_1}{2} + \tfrac12\log(\beta e^{-x_1} + 1 - \beta)\right],

whose integral (a 20,001-point grid on [-25, 25]) is :math:`\log Z_\beta` and whose quantiles are
exact. Columns: beta, the running SMC estimate of log Z_beta, the exact value, the weighted 1% / 50%
/ 99% quantiles of x_1 of the particles after the moves and the exact ones, the moves made, the
adapted step size, the mean acceptance.

    python benchmarks/bench_smc_funnel.py [--seeds 0 1 2] [--particles 1000]
        [--settings default "step_jitter=1.0" ...] [--dim 10]
    python benchmarks/bench_smc_funnel.py --checks [--targets gauss mixture6 POSTERIOR ...]
        [--settings ...] [--seeds 0 1 2]
    python benchmarks/bench_smc_funnel.py --trace [--settings ...] [--seeds 0] [--particles 300]
"""

from __future__ import annotations

import argparse
import ast
import math
import pathlib
import sys
import time
import warnings

import numpy as np
import torch

import functools

import diffstat as ds
from diffstat.mcmc.dr_mala import DR_MALA_TARGET_ACCEPT, DR_NUM_STAGES, DR_STEP_FACTOR, dr_mala_step
from diffstat.targets import Funnel, GaussianMixture
from diffstat.tempering.core import cloud_metric, init_tempered, initial_particles, tempered_step
from diffstat.tempering.path import default_step_size, make_path
from diffstat.tempering.smc import SMCConfig, next_beta


def parse_setting(text: str) -> dict:
    """``"a=1;b='x'"`` as ``{"a": 1, "b": "x"}``; ``"default"`` as ``{}``."""
    if text == "default":
        return {}
    pairs = (item.split("=", 1) for item in text.split(";") if item.strip())
    return {k.strip(): ast.literal_eval(v.strip()) for k, v in pairs}


def with_reference(dim: int, options: dict) -> dict:
    """``options`` with ``reference_sd=s`` replaced by the reference N(0, s^2 I)."""
    options = dict(options)
    if "reference_sd" in options:
        scale = torch.full((dim,), float(options.pop("reference_sd")), dtype=torch.float64)
        options["reference"] = torch.distributions.Independent(
            torch.distributions.Normal(0 * scale, scale), 1
        )
    return options


def with_kernel(dim: int, options: dict) -> dict:
    """``options`` with ``dr_stages``/``dr_factor`` replaced by a DR-MALA kernel (module docstring)."""
    options = dict(options)
    if "dr_stages" in options or "dr_factor" in options:
        stages = int(options.pop("dr_stages", DR_NUM_STAGES))
        factor = float(options.pop("dr_factor", DR_STEP_FACTOR))
        options["kernel"] = functools.partial(dr_mala_step, num_stages=stages, step_factor=factor)
        options.setdefault("target_accept", DR_MALA_TARGET_ACCEPT)
        options.setdefault("step_size", default_step_size("dr_mala", dim))
    return options


def run(dim: int, seed: int, particles: int, options: dict) -> dict:
    target = Funnel(dim).as_target(dtype=torch.float64)
    options = with_kernel(dim, with_reference(dim, options))
    t0 = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = ds.sample(target, "smc", num_samples=particles, seed=seed, progress=False, **options)
    seconds = time.time() - t0
    x1 = torch.as_tensor(idata.posterior.x.values[0][:, 0])
    attrs = idata.posterior.attrs
    return {
        "log_z": attrs["log_normalizer"],
        "se": attrs["log_normalizer_se"],
        "sd_x1": float(x1.std()),
        "q01": float(torch.quantile(x1, 0.01)),
        "q99": float(torch.quantile(x1, 0.99)),
        "evals": attrs["num_target_evals"],
        "stages": attrs["num_stages"],
        "seconds": seconds,
        "warned": any(issubclass(w.category, RuntimeWarning) for w in caught),
    }


def check_target(name: str):
    """``(target, evaluate, options)`` for a check target: ``evaluate(idata) -> (log Z error or nan,
    err 1, err 2 or nan)`` (module docstring), ``options`` the target's own SMC options."""
    if name == "gauss":
        d = 10
        sd = torch.logspace(-1, 1, d, dtype=torch.float64)
        corr = torch.full((d, d), 0.9, dtype=torch.float64).fill_diagonal_(1.0)
        mvn = torch.distributions.MultivariateNormal(
            torch.ones(d, dtype=torch.float64), corr * sd * sd[:, None]
        )
        target = ds.Target(mvn.log_prob, d, dtype=torch.float64)

        def evaluate(idata):
            x = torch.as_tensor(idata.posterior.x.values[0])
            mean_err = float(((x.mean(0) - 1) / sd).abs().max())
            return idata.posterior.attrs["log_normalizer"], mean_err, float((x.std(0) / sd - 1).abs().max())

        return target, evaluate, {}
    if name == "mixture6":
        means = torch.tensor([[2.5, 2.5, 0, 0, 0, 0], [-2.5, -2.5, 0, 0, 0, 0], [0, 0, 2.5, 2.5, 0, 0]])
        gm = GaussianMixture(means, [0.5, 0.3, 0.2], scales=[0.7, 1.0, 0.85], log_normalizer=2.3)

        def evaluate(idata):
            x = torch.as_tensor(idata.posterior.x.values[0])
            share = torch.bincount(gm.assign(x), minlength=3).to(torch.float64) / x.shape[0]
            tv = 0.5 * float((share - gm.weights).abs().sum())
            return idata.posterior.attrs["log_normalizer"] - 2.3, tv, math.nan

        return gm.as_target(dtype=torch.float64), evaluate, {"target_ess": 0.9}
    if name in CORRELATED:
        return correlated_check(name)
    from diffstat import posteriordb

    post = posteriordb.load(name, dtype=torch.float64)

    def evaluate(idata):
        cmp = post.compare(idata)
        return math.nan, cmp.max_mean_error, cmp.max_sd_error

    return post.target, evaluate, {}


#: The targets of ``benchmarks/bench_smc_moves.py`` (``tests/tempering/correlated_targets.py``).
CORRELATED = ("regression", "ar5", "mixture")


def correlated_check(name: str):
    """``check_target`` for the targets of ``bench_smc_moves.py``: the regressions (log Z error, the
    largest |mean error| in posterior sd and relative sd error over beta and sigma) and the 6-d
    mixture with full covariances from N(0, 36 I) (log Z error, mode total variation)."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "tempering"))
    import correlated_targets as ct

    if name == "mixture":
        gm, target = ct.mixture6()

        def evaluate(idata):
            x = torch.as_tensor(idata.posterior.x.values[0])
            share = torch.bincount(gm.assign(x), minlength=3).to(torch.float64) / x.shape[0]
            log_z = idata.posterior.attrs["log_normalizer"] - gm.log_normalizer
            return log_z, 0.5 * float((share - gm.weights).abs().sum()), math.nan

        return target, evaluate, {}
    target = ct.regression() if name == "regression" else ct.ar5()

    def evaluate(idata):
        x = torch.as_tensor(idata.posterior.x.values[0])
        beta, sigma = x[:, :-1], torch.exp(x[:, -1])
        mean_z = torch.cat(
            [
                (beta.mean(0) - target.beta_mean) / target.beta_sd,
                ((sigma.mean() - target.sigma_mean) / target.sigma_sd).reshape(1),
            ]
        )
        sd_rel = torch.cat([beta.std(0) / target.beta_sd - 1, (sigma.std() / target.sigma_sd - 1).reshape(1)])
        log_z = idata.posterior.attrs["log_normalizer"] - target.log_evidence
        return log_z, float(mean_z.abs().max()), float(sd_rel.abs().max())

    return target, evaluate, {}


def checks(args) -> None:
    print("| target | setting | seed | log Z err | err 1 | err 2 | evals | stages | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.targets:
        target, evaluate, base = check_target(name)
        for setting in args.settings:
            options = with_kernel(target.dim, {**base, **parse_setting(setting)})
            for seed in args.seeds:
                t0 = time.time()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    idata = ds.sample(
                        target, "smc", num_samples=args.particles, seed=seed, progress=False, **options
                    )
                seconds = time.time() - t0
                log_z, e1, e2 = evaluate(idata)
                attrs = idata.posterior.attrs
                log_z = "-" if math.isnan(log_z) else f"{log_z:+.3f}"
                e2 = "-" if math.isnan(e2) else f"{e2:.3f}"
                print(
                    f"| {name} | {setting} | {seed} | {log_z} | {e1:.3f} | {e2} | "
                    f"{attrs['num_target_evals'] / 1e3:.0f}k | {attrs['num_stages']} | {seconds:.0f} |",
                    flush=True,
                )


def exact_marginal(beta: float, dim: int, grid: np.ndarray) -> tuple[float, list[float]]:
    """log Z_beta and the 1% / 50% / 99% quantiles of x_1 under pi_beta (module docstring; N(0, I)
    reference, sd of x_1 3)."""
    normal = -0.5 * math.log(2 * math.pi)
    log_p = beta * (-(grid**2) / 18 - math.log(3) + normal) + (1 - beta) * (-(grid**2) / 2 + normal)
    log_p = log_p - (dim - 1) * (beta * grid / 2 + 0.5 * np.log(beta * np.exp(-grid) + 1 - beta))
    top = log_p.max()
    p = np.exp(log_p - top)
    cdf = np.cumsum(p) / p.sum()
    quantiles = [float(grid[np.searchsorted(cdf, a)]) for a in (0.01, 0.5, 0.99)]
    return float(top + math.log(p.sum() * (grid[1] - grid[0]))), quantiles


def trace(args) -> None:
    grid = np.linspace(-25.0, 25.0, 20001)
    path = make_path(Funnel(args.dim).as_target(dtype=torch.float64))
    print("| setting | seed | beta | log Z_beta SMC | exact | q01, q50, q99 x1 | exact | moves | h | acc |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for setting in args.settings:
        config = SMCConfig(**with_kernel(args.dim, parse_setting(setting)))
        precondition = cloud_metric(config.metric, config.within_modes)
        for seed in args.seeds:
            generator = torch.Generator().manual_seed(seed)
            x0 = initial_particles(path, args.particles, generator, None)
            h0 = default_step_size(config.kernel, args.dim) if config.step_size is None else config.step_size
            state, log_z = init_tempered(path, x0, h0), 0.0
            schedule = None if config.betas is None else torch.as_tensor(config.betas, dtype=torch.float64)
            for k in range(config.max_stages if schedule is None else len(schedule)):
                if schedule is None:
                    beta = next_beta(
                        state.log_weights,
                        state.particles.delta,
                        state.beta,
                        config.target_ess,
                        config.criterion,
                    )
                else:
                    beta = schedule[k]
                state, info = tempered_step(
                    generator,
                    state,
                    beta,
                    path=path,
                    moves=config.moves,
                    precondition=precondition,
                    stage=k,
                    resample_threshold=config.resample_threshold,
                    scheme=config.resampling,
                )
                log_z += float(info.log_z_increment)
                exact_log_z, exact_q = exact_marginal(float(beta), args.dim, grid)
                x1 = state.particles.x[:, 0].numpy()
                order = np.argsort(x1)
                cdf = np.cumsum(torch.softmax(state.log_weights, -1).numpy()[order])
                q = [x1[order][min(np.searchsorted(cdf, a), len(x1) - 1)] for a in (0.01, 0.5, 0.99)]
                cells = [
                    setting,
                    str(seed),
                    f"{float(beta):.4f}",
                    f"{log_z:+.3f}",
                    f"{exact_log_z:+.3f}",
                    ", ".join(f"{v:.1f}" for v in q),
                    ", ".join(f"{v:.1f}" for v in exact_q),
                    str(info.num_mcmc_steps),
                    f"{float(info.step_size):.3f}",
                    f"{float(info.acceptance_rate):.2f}",
                ]
                print("| " + " | ".join(cells) + " |", flush=True)
                if bool(state.beta >= 1.0):
                    break


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--particles", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=10)
    parser.add_argument("--settings", nargs="+", default=["default", "step_jitter=1.0"])
    parser.add_argument("--checks", action="store_true", help="the targets where SMC is right today")
    parser.add_argument("--targets", nargs="+", default=["gauss", "mixture6"])
    parser.add_argument("--trace", action="store_true", help="stage by stage against the exact path")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.checks:
        checks(args)
        return
    if args.trace:
        trace(args)
        return
    print("| setting | seed | log Z err (s.e.) | sd x1 | q01, q99 x1 | evals | stages | s | warned |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for setting in args.settings:
        options = parse_setting(setting)
        for seed in args.seeds:
            r = run(args.dim, seed, args.particles, options)
            print(
                f"| {setting} | {seed} | {r['log_z']:+.3f} ({r['se']:.2f}) | {r['sd_x1']:.2f} | "
                f"{r['q01']:.1f}, {r['q99']:.1f} | {r['evals'] / 1e3:.0f}k | {r['stages']} | "
                f"{r['seconds']:.0f} | {'yes' if r['warned'] else 'no'} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
