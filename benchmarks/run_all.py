"""Every sampling method of ``ds.sample`` on the benchmark targets of ``diffstat.targets``, side by
side, at matched budgets of target evaluations; one table, printed and written as Markdown.

Targets (exact answers from ``diffstat.targets``):

- Gaussian mixtures in d = 2 to 64: ``nine_modes`` (2-d, nine unequal modes),
  ``narrow_wide(10)`` (the heavy narrow / light wide mixture on which tempering loses the heavy
  mode), ``two_modes(d)`` (SLIPS' two unequal modes, weights 2:1) for d = 16 and 64;
- Neal's funnel (d = 10), many-well (d = 32, 2^16 modes, log Z = 164.6957);
- the ionosphere logistic-regression posterior (d = 34; no exact answer: the means and sds come
  from a long HMC run made here, log Z is the literature's -111.6).

Every method sees only the log-density: ``ds.Target(log_prob, dim, reference=...)``, with a wide
Gaussian reference (the prior for the regression). The budget of target evaluations is set per
target; each method's options are chosen from it (:func:`method_options`): exactly for the
methods whose cost is a fixed number of evaluations per draw (MCMC, AIS, PT), approximately for
SMC (adaptive number of temperatures) and the diffusion sampler (adaptive rounds). The training-
free smoothed-score estimators of SMS and walk-jump spend a number of evaluations per draw that
depends on the target; they get a fixed number of draws. Every row reports the evaluations it used.

Metrics: ``mode TV`` the total-variation distance between the mode weights of the draws and the
exact ones (mixtures; for many-well the fraction of pairs in the right well against the exact
one); ``SW`` the sliced 2-Wasserstein distance to as many exact draws as the method returned, up
to ``num_exact`` (``SW floor``: the same distance between two independent exact samples of that
size, the Monte Carlo noise level); ``mean err`` the
largest |mean error| / sd over coordinates and ``sd err`` the largest |log(sd / exact sd)|;
``log Z err`` the estimate minus the exact value (or the literature value).

Run:  python benchmarks/run_all.py [--fast] [--out PATH] [--methods smc,diffusion] [--targets ...]
"""

from __future__ import annotations

import argparse
import math
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

import numpy as np
import torch

import diffstat as ds
from diffstat import metrics
from diffstat import targets as T

warnings.filterwarnings("ignore", category=FutureWarning)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "table.md"
#: The methods in table order (those not installed are skipped with a note).
METHODS = ("smc", "ais", "pt", "hmc", "mala", "diffusion", "gaussian_is", "sms", "walk_jump")
#: DDS's reference value for ionosphere (standardised features, N(0, 1) priors); importance
#: sampling with 2e5 draws here gave -111.61 (``diffstat.targets.ionosphere``).
IONOSPHERE_LOG_Z = -111.6


@dataclass
class Problem:
    """A benchmark target and what is known about it exactly."""

    name: str
    target: ds.Target
    budget: int
    exact_draws: torch.Tensor | None = None  # (2 * num_exact, dim)
    log_z: float | None = None
    mean: torch.Tensor | None = None
    sd: torch.Tensor | None = None
    classify: Callable[[torch.Tensor], np.ndarray] | None = None  # draws (n, d) -> mode weights (K,)
    weights: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)


def wide_gaussian(dim: int, scale: float) -> torch.distributions.Distribution:
    zeros = torch.zeros(dim, dtype=torch.float64)
    return torch.distributions.Independent(
        torch.distributions.Normal(zeros, scale * torch.ones_like(zeros)), 1
    )


def mixture_problem(name, mixture, reference_scale, budget, num_exact, generator) -> Problem:
    target = ds.Target(
        mixture.unnormalized_log_prob,
        mixture.dim,
        reference=wide_gaussian(mixture.dim, reference_scale),
        dtype=torch.float64,
    )
    exact = mixture.sample(2 * num_exact, generator)
    k = mixture.num_components

    def classify(x):
        return metrics.mode_weights(x, classifier=mixture.assign, num_modes=k)

    return Problem(
        name,
        target,
        budget,
        exact,
        mixture.log_normalizer,
        exact.mean(0),
        exact.std(0),
        classify,
        mixture.weights.numpy(),
    )


def build_problems(fast: bool, num_exact: int, seed: int, names: list[str] | None) -> list[Problem]:
    gen = torch.Generator().manual_seed(seed + 1000)
    scale = 1 if fast else 2  # budgets double in the full run
    builders: dict[str, Callable[[], Problem]] = {
        "nine_modes d=2": lambda: mixture_problem(
            "nine_modes d=2", T.nine_modes(), 6.0, 50_000 * scale, num_exact, gen
        ),
        "narrow_wide d=10": lambda: mixture_problem(
            "narrow_wide d=10", T.narrow_wide(10), 4.0, 100_000 * scale, num_exact, gen
        ),
        "two_modes d=16": lambda: mixture_problem(
            "two_modes d=16", T.two_modes(16), 3.0, 100_000 * scale, num_exact, gen
        ),
        "two_modes d=64": lambda: mixture_problem(
            "two_modes d=64", T.two_modes(64), 3.0, 200_000 * scale, num_exact, gen
        ),
        "funnel d=10": lambda: funnel_problem(100_000 * scale, num_exact, gen),
        "many_well d=32": lambda: manywell_problem(200_000 * scale, num_exact, gen),
        "ionosphere d=34": lambda: ionosphere_problem(100_000 * scale, fast, seed),
    }
    if names is None:
        names = (
            list(builders)
            if not fast
            else [
                "nine_modes d=2",
                "narrow_wide d=10",
                "two_modes d=16",
                "funnel d=10",
                "many_well d=32",
                "ionosphere d=34",
            ]
        )
    unknown = [n for n in names if n not in builders]
    if unknown:
        raise SystemExit(f"unknown targets {unknown}; choose from {list(builders)}")
    return [builders[n]() for n in names]


def funnel_problem(budget, num_exact, gen) -> Problem:
    funnel = T.Funnel(10)
    target = ds.Target(
        funnel.unnormalized_log_prob, 10, reference=wide_gaussian(10, 3.0), dtype=torch.float64
    )
    exact = funnel.sample(2 * num_exact, gen)
    return Problem("funnel d=10", target, budget, exact, 0.0, funnel.mean, funnel.variance.sqrt())


def manywell_problem(budget, num_exact, gen) -> Problem:
    well = T.ManyWell(32)
    target = ds.Target(well.unnormalized_log_prob, 32, reference=wide_gaussian(32, 2.0), dtype=torch.float64)
    exact = well.sample(2 * num_exact, gen)
    q = float(well.well_probability)

    def classify(x):  # fraction of pairs in the right well, and in the left one
        right = float(well.wells(torch.as_tensor(x)).double().mean())
        return np.array([right, 1 - right])

    return Problem(
        "many_well d=32",
        target,
        budget,
        exact,
        well.log_normalizer,
        well.mean,
        well.variance.sqrt(),
        classify,
        np.array([q, 1 - q]),
        ["mode TV: share of the 16 pairs in the right well"],
    )


def ionosphere_problem(budget, fast, seed) -> Problem:
    model = T.ionosphere()
    target = ds.Target(model.log_prob, model.dim, reference=model.prior(), dtype=torch.float64)
    # The reference moments: a long HMC run (not an exact answer; its Monte Carlo error is in the notes).
    ref_target = ds.Target(model.log_prob, model.dim, dtype=torch.float64)
    n = 1000 if fast else 4000
    idata = ds.sample(
        ref_target, "hmc", num_samples=n, num_chains=8, num_warmup=1000, seed=seed + 99, progress=False
    )
    draws = torch.as_tensor(idata.posterior["x"].values).reshape(-1, model.dim)
    return Problem(
        "ionosphere d=34",
        target,
        budget,
        None,
        IONOSPHERE_LOG_Z,
        draws.mean(0),
        draws.std(0),
        notes=[f"reference moments: HMC, 8 x {n} draws; log Z: literature value"],
    )


def method_options(method: str, budget: int, dim: int, fast: bool) -> tuple[int, dict]:
    """``(num_samples, options)`` for a method, from the evaluation budget. The tempering and MCMC
    methods run without their check for missed modes (a diagnostic after sampling), so that the budget
    is spent on the sampling the table compares."""
    if method == "smc":  # one run: about 10 temperatures x (num_mcmc_steps + 1) evaluations per particle
        n = 1000
        return n, dict(num_chains=1, num_mcmc_steps=max(1, round(budget / (n * 10)) - 1), check_modes=False)
    if method == "ais":  # one MALA step per temperature
        n = 1000
        return n, dict(num_temperatures=max(2, budget // n), check_modes=False)
    if method == "pt":  # 4 chains x 10 temperatures x (warm-up T + T draws)
        return max(10, budget // 80), dict(num_chains=4, num_temperatures=10, check_modes=False)
    if method == "mala":  # 8 chains x (warm-up + draws)
        return max(10, budget // 16), dict(num_chains=8, check_modes=False)
    if method == "hmc":  # 8 chains x (warm-up + draws) x about 10 leapfrog steps (then rescaled)
        return max(10, budget // 160), dict(num_chains=8, check_modes=False)
    if method in ("diffusion", "gaussian_is"):  # exploration + restocking + proposals, adaptively
        options = dict(num_explore=1000, num_proposals=2048)
        if fast:  # restocking costs chains_per_mode x restock_steps per mode found (many on many-well)
            options.update(chains_per_mode=32)
            if method == "diffusion":
                options.update(train_steps=400, refit_steps=100, hidden=64)
        return 2000, options
    if method == "sms":
        return (50 if fast else 250), dict(num_chains=1)
    if method == "walk_jump":  # 4 chains of independent walkers (issue 14: no more chains than draws)
        return (500 if fast else 1000), dict(num_chains=4)
    raise ValueError(method)


def run_matched(problem: Problem, method: str, num_samples: int, options: dict, seed: int):
    """``ds.sample``; SMC, whose number of temperatures adapts to the target, and HMC, whose trajectory
    lengths adapt, are run once more when the first run missed the budget by more than a factor 1.5:
    SMC with ``num_mcmc_steps`` rescaled, HMC with ``num_samples`` (and so its warm-up, as long)
    rescaled (the row reports the second run; its note gives the first run's evaluations)."""
    idata = ds.sample(problem.target, method, num_samples=num_samples, seed=seed, progress=False, **options)
    if method not in ("smc", "hmc"):
        return idata
    attrs = idata.posterior.attrs
    evals = attrs["num_target_evals"]
    if method == "smc":
        steps = options["num_mcmc_steps"]
        new_steps = max(1, round((steps + 1) * problem.budget / evals) - 1)
        unchanged = new_steps == steps
        num_samples, options = num_samples, {**options, "num_mcmc_steps": new_steps}
    else:
        new_samples = max(10, round(num_samples * problem.budget / evals))
        unchanged = new_samples == num_samples
        num_samples = new_samples
    if 1 / 1.5 < evals / problem.budget < 1.5 or unchanged:
        return idata
    seconds = attrs["sampling_time"]
    idata = ds.sample(problem.target, method, num_samples=num_samples, seed=seed, progress=False, **options)
    idata.posterior.attrs["calibration_evals"] = int(evals)
    idata.posterior.attrs["calibration_seconds"] = float(seconds)
    return idata


def evaluate(problem: Problem, idata, gen_seed: int) -> dict:
    x = torch.as_tensor(idata.posterior["x"].values).reshape(-1, problem.target.dim).double()
    attrs = idata.posterior.attrs
    row = {"evals": int(attrs["num_target_evals"]), "seconds": float(attrs["sampling_time"])}
    finite = torch.isfinite(x).all(1)
    if int(finite.sum()) < 2:
        row["note"] = f"{int((~finite).sum())} of {len(x)} draws are not finite (the run diverged)"
        return row
    x = x[finite]
    if problem.classify is not None:
        row["mode TV"] = metrics.tv_distance(problem.classify(x), problem.weights)
    if problem.exact_draws is not None:  # 2 x num_exact exact draws: the first half against the
        half = len(problem.exact_draws) // 2  # method's draws, the second half for the noise floor
        m = min(len(x), half)
        gen = torch.Generator().manual_seed(gen_seed)
        sub = x[torch.randperm(len(x), generator=gen)[:m]]
        row["SW"] = metrics.sliced_wasserstein(sub, problem.exact_draws[:m])
        row["SW floor"] = metrics.sliced_wasserstein(
            problem.exact_draws[half : half + m], problem.exact_draws[:m]
        )
    if problem.mean is not None:
        row["mean err"] = float(((x.mean(0) - problem.mean).abs() / problem.sd).max())
        row["sd err"] = float((x.std(0) / problem.sd).log().abs().max())
    if "log_normalizer" in attrs and problem.log_z is not None:
        row["log Z err"] = float(attrs["log_normalizer"]) - problem.log_z
    notes = []
    if "calibration_evals" in attrs:
        what = "num_mcmc_steps" if attrs.get("method") == "smc" else "num_samples"
        notes.append(f"{what} calibrated by a first run of {attrs['calibration_evals']:,} evaluations")
    if not bool(finite.all()):
        notes.append(f"{int((~finite).sum())} non-finite draws dropped")
    if notes:
        row["note"] = "; ".join(notes)
    return row


COLUMNS = ("mode TV", "SW", "SW floor", "mean err", "sd err", "log Z err", "evals", "seconds")


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.3g}"


def markdown(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| target | method | " + " | ".join(COLUMNS) + " | note |",
        "| --- | --- | " + " | ".join("---:" for _ in COLUMNS) + " | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['target']} | {r['method']} | "
            + " | ".join(fmt(r.get(c)) for c in COLUMNS)
            + f" | {r.get('note', '')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="smaller budgets and fewer targets")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"Markdown table (default {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--methods", type=lambda s: s.split(","), default=None, help="comma-separated methods"
    )
    parser.add_argument(
        "--targets", type=lambda s: s.split(","), default=None, help="comma-separated target names"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 unless measuring)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    available = ds.available_methods()
    methods = list(args.methods or METHODS)
    for m in methods:
        if m not in available:
            print(f"[skip] {m}: not available in this installation")
    methods = [m for m in methods if m in available]
    num_exact = 2000 if args.fast else 4000
    problems = build_problems(args.fast, num_exact, args.seed, args.targets)

    rows = []
    start_all = time.perf_counter()
    for problem in problems:
        for method in methods:
            num_samples, options = method_options(method, problem.budget, problem.target.dim, args.fast)
            row = {"target": problem.name, "method": method}
            try:
                idata = run_matched(problem, method, num_samples, options, args.seed)
                row.update(evaluate(problem, idata, args.seed))
            except Exception as err:  # noqa: BLE001 - one failing run is a row, not the end of the table
                row["note"] = f"failed: {type(err).__name__}: {str(err)[:120]}"
                traceback.print_exc(limit=2)
            rows.append(row)
            print(
                f"{problem.name:>18} {method:>12}: "
                + ", ".join(f"{c} {fmt(row.get(c))}" for c in COLUMNS if c in row)
                + (f" [{row['note']}]" if "note" in row else ""),
                flush=True,
            )
    total = time.perf_counter() - start_all

    budgets = ", ".join(f"{p.name}: {p.budget:,}" for p in problems)
    notes = "; ".join(f"{p.name}: {n}" for p in problems for n in p.notes)
    header = (
        f"Budgets of target evaluations ({'--fast' if args.fast else 'full'} run, seed {args.seed}, "
        f"{args.threads} torch thread(s), {total / 60:.1f} min in all): {budgets}. "
        f"SW: sliced 2-Wasserstein distance to exact draws, as many as the method's (at most {num_exact}); "
        "`SW floor`: the same distance between two independent exact samples of that size. "
        + (f"Notes: {notes}." if notes else "")
    )
    table = markdown(rows, header)
    print()
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
