"""The check for modes every run missed (``check_modes``, ``diffstat/modes/coverage.py``): what it
finds and what it costs, and that it stays silent where nothing is missed.

``--detect`` (default): ``ds.sample(target, method, num_samples=1000, seed=s)`` for ``smc``, ``ais``
and ``pt`` at their defaults, from each target's default reference (N(0, I): no reference given), on
mixtures with exact mode weights. Columns: the total variation between the draws' mode shares and
the exact weights (what is missed), the check's ``missed_mode_share`` and ``mode_misweight``, whether
it warned, whether anything else warned, the check's evaluations over the run's, seconds.

* ``three_modes``: 5-d, weights 0.5 / 0.3 / 0.2 at 0, 8 e_1, 8 e_2 (covariances 0.5 I, sheared, 2 I);
* ``two_modes16``: ``two_modes(16, weights=(3, 1))``, the SLIPS target, modes 8 apart;
* ``narrow_wide10``: ``narrow_wide(10)``, heavy narrow mode 0.75;
* ``mixture6``: issue 13's 6-d mixture (``tests/tempering/correlated_targets.py``) from N(0, I)
  instead of its N(0, 36 I);
* ``nine_modes``: the 2-d nine-mode grid.

``--posteriordb``: false alarms. For each of the 37 posteriors the Stan reference draws (mapped to
unconstrained space) stand for a run's draws, and a Laplace fit at the best of 64 climbed draws
for its evidence; the check then runs from 256 prior draws. Columns: missed share, the number of
uncovered local maxima with a negative definite Hessian and their Laplace log-masses, the misweight,
evaluations,
and the reference width ratio of the draws against the prior (the reference of likelihood tempering).

``--posteriordb --screen 4096``: the same with 4,096 starts screened (the most a long run gets).
``--posteriordb --isotropic``: the same with the climbs unpreconditioned (``precondition=False``: the
check before preconditioning, isotropic steps and at most 100 of them for the starts too).

``--wide``: SMC's log Z on N(0, s^2 I) from N(0, I) (exact 0), the reference width check's basis.

``--mcmc-cost NAME ...``: NUTS on posteriordb posteriors without and with the check, side by side.

    python benchmarks/bench_mode_check.py [--detect] [--posteriordb [--isotropic]] [--wide]
        [--mcmc-cost NAME ...]
        [--seeds 0 1 2]
        [--methods smc ais pt] [--targets ...]

``--detect --targets readme_nw10 --methods smc ais pt nuts --seeds 0 1 2 3 4 5``: the README's example
from N(0, 16 I) (``readme_nw12_s0.3`` and the others: its narrower siblings).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time
import warnings

import torch

import diffstat as ds
from diffstat.targets.gmm40 import nine_modes
from diffstat.targets.two_modes import narrow_wide, two_modes

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "tempering"))
from correlated_targets import mixture6  # noqa: E402

F64 = torch.float64


def three_modes():
    """``(target, means (3, 5), weights (3,))`` of the 5-d three-mode mixture (module docstring)."""
    w = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    mus = torch.zeros(3, 5, dtype=F64)
    mus[1, 0], mus[2, 1] = 8.0, 8.0
    shear = torch.eye(5, dtype=F64)
    shear[0, 1] = 0.9
    covs = torch.stack([0.5 * torch.eye(5, dtype=F64), shear @ shear.T, 2.0 * torch.eye(5, dtype=F64)])
    comps = torch.distributions.MultivariateNormal(mus, covs)
    target = ds.Target(lambda x: torch.logsumexp(comps.log_prob(x[:, None, :]) + w.log(), -1), 5)
    return target, lambda x: comps.log_prob(x[:, None, :].to(F64)).argmax(-1), w


def _mixture(gm):
    return gm.as_target(dtype=F64), lambda x: gm.assign(x.to(F64)), gm.weights.to(F64)


def _from_wide(gm, sd: float = 4.0):
    """The mixture from N(0, sd^2 I): the README example's reference, wider than the posterior."""
    wide = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(gm.dim, dtype=F64), sd), 1)
    target = ds.Target(gm.unnormalized_log_prob, gm.dim, reference=wide, dtype=F64)
    return target, lambda x: gm.assign(x.to(F64)), gm.weights.to(F64)


TARGETS = {
    "three_modes": three_modes,
    "two_modes16": lambda: _mixture(two_modes(16, weights=(3, 1))),
    "narrow_wide10": lambda: _mixture(narrow_wide(10)),
    "mixture6": lambda: _mixture(mixture6()[0]),
    "nine_modes": lambda: _mixture(nine_modes()),
}
#: The default set of ``--detect`` (the table of docs/mode_check.md's "What it finds").
DEFAULT_TARGETS = list(TARGETS)
#: The README's example and its narrower siblings, from N(0, 16 I) (docs/mode_check.md, "Screened starts").
TARGETS |= {
    "readme_nw10": lambda: _from_wide(narrow_wide(10)),
    "readme_nw12_s0.3": lambda: _from_wide(narrow_wide(12, scales=(0.3, 1.0))),
    "readme_nw12_s0.25": lambda: _from_wide(narrow_wide(12, scales=(0.25, 1.0))),
    "readme_nw14_s0.3": lambda: _from_wide(narrow_wide(14, scales=(0.3, 1.0))),
}


def detect(names, methods, seeds) -> None:
    print(
        "| target | method | seed | TV | missed / misweight | check warns | other warns "
        "| evals (check / all) | s |"
    )
    print("| --- | --- | --- | ---: | ---: | --- | --- | --- | ---: |")
    for name in names:
        for method in methods:
            for seed in seeds:
                target, assign, weights = TARGETS[name]()
                t0 = time.time()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    idata = ds.sample(target, method, num_samples=1000, seed=seed, progress=False)
                attrs = idata.posterior.attrs
                x = torch.as_tensor(idata.posterior["x"].values).reshape(-1, target.dim)
                share = torch.bincount(assign(x), minlength=len(weights)).to(F64) / x.shape[0]
                tv = 0.5 * float((share / share.sum() - weights / weights.sum()).abs().sum())
                messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
                mine = ("no draw reaches", "modes wrongly")
                check = any(any(k in m for k in mine) for m in messages)
                other = any(not any(k in m for k in mine) for m in messages)
                share, mis = attrs.get("missed_mode_share", math.nan), attrs.get("mode_misweight", math.nan)
                missed = f"{share:.3f} / {mis:.3f}"
                evals = f"{attrs.get('mode_check_evals', 0):,} / {attrs['num_target_evals']:,}"
                flags = f"{'yes' if check else 'no'} | {'yes' if other else 'no'}"
                print(
                    f"| {name} | {method} | {seed} | {tv:.3f} | {missed} | {flags} | {evals} | "
                    f"{time.time() - t0:.0f} |",
                    flush=True,
                )


def posteriordb_false_alarms(precondition: bool = True, screen: int = 0) -> None:
    from diffstat import posteriordb
    from diffstat.modes.climb import hill_climb
    from diffstat.modes.coverage import laplace_log_mass_at, missed_modes
    from diffstat.tempering.mode_check import reference_width_ratio
    from diffstat.tempering.path import make_path

    print(
        "| posterior | dim | missed | misweight | uncovered modes (log-mass) | log Z (Laplace) | evals "
        "| width |"
    )
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for name in posteriordb.names():
        post = posteriordb.load(name)
        target = post.target
        u = target.unconstrain(post.reference_sites()).to(target.dtype)
        gen = torch.Generator().manual_seed(0)
        starts = make_path(target).sample_reference(max(screen, 256), gen)
        lp, g = target.log_prob_and_grad(u[:64])
        h = torch.full_like(lp, 0.1 * float(u.var(0).mean()))
        peaks, peak_lp, _ = hill_climb(target.log_prob_and_grad, u[:64], lp, g, 200, h)
        log_z = float(laplace_log_mass_at(target, peaks[peak_lp.argmax()][None])[0])
        keep = 256 if screen > 256 else None
        res = missed_modes(target, u, log_z, starts, gen, precondition=precondition, keep=keep)
        masses = ", ".join(f"{float(v):.1f}" for v in res.log_masses[:3]) or "-"
        print(
            f"| {name} | {target.dim} | {res.share:.1e} | {res.misweight:.3f} | "
            f"{res.centres.shape[0]} ({masses}) | "
            f"{log_z:.2f} | "
            f"{res.num_evals:,} | {reference_width_ratio(make_path(target), u, gen, None):.2f} |",
            flush=True,
        )


def wide(seeds) -> None:
    print("| d | s | seed | log Z (s.e.) | width ratio | warned |")
    print("| ---: | ---: | ---: | --- | ---: | --- |")
    for d in (2, 10):
        for s in (2.0, 3.0, 5.0, 10.0, 30.0):
            normal = torch.distributions.Normal(torch.zeros(d, dtype=F64), s)
            target = ds.Target(lambda x, n=normal: n.log_prob(x).sum(-1), d, dtype=F64)
            for seed in seeds:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    idata = ds.sample(target, "smc", num_samples=1000, seed=seed, progress=False)
                a = idata.posterior.attrs
                warned = any("as wide as the reference" in str(w.message) for w in caught)
                print(
                    f"| {d} | {s:g} | {seed} | {a['log_normalizer']:+.3f} ({a['log_normalizer_se']:.3f}) | "
                    f"{a['reference_width_ratio']:.2f} | {'yes' if warned else 'no'} |",
                    flush=True,
                )


def mcmc_cost(names, seeds) -> None:
    """NUTS at its defaults without and with the check, one after the other in one process: the
    check's evaluations and the wall time of both runs (seconds are noisy on a shared machine)."""
    from diffstat import posteriordb

    print("| posterior | seed | evals without / with (check) | seconds without / with | warnings with |")
    print("| --- | ---: | --- | --- | --- |")
    for name in names:
        target = posteriordb.load(name).target
        for seed in seeds:
            row = []
            for check in (False, True):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    t0 = time.perf_counter()
                    idata = ds.sample(
                        target, "nuts", num_samples=1000, seed=seed, progress=False, check_modes=check
                    )
                    row.append((idata.posterior.attrs, time.perf_counter() - t0, caught))
            (a0, t0, _), (a1, t1, caught) = row
            said = [str(w.message)[:60] for w in caught if issubclass(w.category, RuntimeWarning)]
            print(
                f"| {name} | {seed} | {a0['num_target_evals']:,} / {a1['num_target_evals']:,} "
                f"({a1['mode_check_evals']:,}) | {t0:.0f} / {t1:.0f} | {'; '.join(said) or '-'} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--detect", action="store_true")
    parser.add_argument("--posteriordb", action="store_true")
    parser.add_argument("--wide", action="store_true")
    parser.add_argument("--mcmc-cost", nargs="*", default=None, metavar="POSTERIOR")
    parser.add_argument(
        "--isotropic", action="store_true", help="--posteriordb with the climbs unpreconditioned"
    )
    parser.add_argument(
        "--screen", type=int, default=0, help="--posteriordb: screen this many starts, 256 of them climbing"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["smc", "ais", "pt"])
    parser.add_argument("--targets", nargs="+", default=DEFAULT_TARGETS, choices=list(TARGETS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.detect or not (args.posteriordb or args.wide or args.mcmc_cost is not None):
        detect(args.targets, args.methods, args.seeds)
    if args.mcmc_cost is not None:
        mcmc_cost(
            args.mcmc_cost or ["kidiq-kidscore_momhs", "earnings-logearn_height", "nes1980-nes"], args.seeds
        )
    if args.wide:
        wide(args.seeds)
    if args.posteriordb:
        posteriordb_false_alarms(precondition=not args.isotropic, screen=args.screen)


if __name__ == "__main__":
    main()
