"""Our samplers and three peers side by side at their defaults on the suite of ``_suite.py``.

Ours: ``ds.sample(target, method, num_samples=1000, seed=seed)`` for ``diffusion``, ``smc``, ``ais``
and ``pt`` (the defaults of ``bench_posteriordb.py``). Peers, when the ``[bench]`` extra is
installed (each one missing is skipped with a note): pocomc (preconditioned Monte Carlo: tempered
SMC with normalising-flow preconditioning; Karamanis et al. 2022), nautilus (importance nested
sampling with neural-network bounds; Lange 2023) and dynesty (nested sampling with ellipsoid bounds;
Speagle 2020), each at its defaults.

Every sampler sees the same problem: the target's log-density and its reference, a diagonal
Gaussian (the prior for the regressions). The nested samplers draw in the unit cube mapped to the
reference by its quantile function; pocomc gets the reference as its prior. Nested sampling and
pocomc estimate :math:`Z = \\int L(x) \\pi(x) dx` for a likelihood :math:`L` and prior :math:`\\pi`,
so the likelihood they see is :math:`\\log L = \\log p - \\log \\pi` with :math:`p` the target's
unnormalised density and :math:`\\pi` the normalised reference: then :math:`\\int L \\pi = \\int p`,
the Z our methods estimate (``tests/benchmarks/test_peers.py`` checks this on a Gaussian with an
exact log Z). :class:`CountedLogLikelihood` counts every point it is called on, batched or not: the
peers' evaluations. Ours report ``num_target_evals`` (a gradient evaluation counts as one).

Each run is a fresh process killed after ``--time-limit`` seconds of wall-clock time (300 by
default, as in ``bench_posteriordb.py``), printed as "over 300 s" with the CPU seconds it had used.

Columns: ``log Z err`` estimate minus exact (regressions: minus the literature value); ``/ best``
|log Z err| over that of the best peer (the smallest |log Z err| among the peers on that target and
seed); ``mode TV`` total-variation distance between the draws' mode weights and the exact ones
(many-well: share of pairs in the right well); ``mean err`` largest |mean error| / sd; ``sd err``
largest |log(sd / exact sd)|; ``detail`` the heavy mode's weight (narrow_wide, exact 0.75), modes
holding draws (GMM-40) or the sd of x_1 (funnel, exact 3); ``evals`` target evaluations and
``evals / best`` over the best peer's; ``seconds`` the run's time (ours: ``sampling_time``) and
``cpu s`` the CPU time of the whole call (on a shared machine the two differ).

Run (one thread each; all targets take hours, ``--fast`` a few minutes)::

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_peers.py [--fast] [--seeds 0 1]
        [--targets "nine_modes d=2" ...] [--methods smc dynesty ...] [--time-limit 300]

The table is printed and written to ``benchmarks/results/peers_<time>.md`` (not tracked), each row
as soon as it is done to the ``.jsonl`` beside it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from _suite import run_with_time_limit, suite
from run_all import evaluate, fmt

RESULTS = Path(__file__).resolve().parent / "results"
OURS = ("diffusion", "smc", "ais", "pt")
#: Peer name -> the module that must be importable.
PEERS = {"pocomc": "pocomc", "nautilus": "nautilus", "dynesty": "dynesty"}
#: ``--fast``: the cheap targets (2-d and 10-d, every peer finishes within the limit there).
FAST = ("nine_modes d=2", "narrow_wide d=10", "funnel d=10")
#: Draws per run of ours, as in bench_posteriordb.py.
NUM_SAMPLES = 1000


def diagonal_gaussian(target) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sd ``(dim,)`` of the target's reference, which must be a diagonal Gaussian
    (``Independent(Normal(loc, scale), 1)``, as every reference of the suite is)."""
    ref = target.reference
    base = getattr(ref, "base_dist", None)
    if not isinstance(base, torch.distributions.Normal) or ref.reinterpreted_batch_ndims != 1:
        raise ValueError(f"the reference must be Independent(Normal(loc, scale), 1), got {ref!r}")
    loc, scale = (t.expand(target.dim).double().numpy().copy() for t in (base.loc, base.scale))
    return loc, scale


class CountedLogLikelihood:
    r"""The log-likelihood a peer sees, :math:`\log p(x) - \log \pi(x)` (target minus normalised
    reference), counting every point it is evaluated at.

    ``x: (dim,)`` gives a float, ``x: (n, dim)`` an array ``(n,)``; ``num_evals`` grows by 1 or
    ``n``. NaN is returned as ``-inf`` (a point the peer must reject).
    """

    def __init__(self, target):
        self.target = target
        self.num_evals = 0

    def __call__(self, x):
        x = np.asarray(x, dtype=np.float64)
        xt = torch.as_tensor(np.atleast_2d(x), dtype=self.target.dtype)
        self.num_evals += xt.shape[0]
        with torch.no_grad():
            ll = (self.target.log_prob(xt) - self.target.reference.log_prob(xt)).double().numpy()
        ll = np.where(np.isnan(ll), -np.inf, ll)
        return ll if x.ndim == 2 else float(ll[0])


class UnitCubeToReference:
    r"""The prior transform of nested sampling: :math:`u \in (0, 1)^d \mapsto \mu + \sigma
    \Phi^{-1}(u)`, the reference's quantile function, for ``u: (dim,)`` or ``(n, dim)``."""

    def __init__(self, loc: np.ndarray, scale: np.ndarray):
        self.loc, self.scale = loc, scale

    def __call__(self, u):
        from scipy.special import ndtri

        return self.loc + self.scale * ndtri(np.asarray(u, dtype=np.float64))


def run_peer(name: str, target, seed: int, options: dict | None = None) -> dict:
    """One peer at its defaults: ``{"draws": (n, dim), "log_z", "evals", "seconds"}``.

    Only what the interface needs is set: the seed, no progress output, and a vectorised
    likelihood where the peer takes one (nautilus, pocomc; it changes no step of the algorithm).
    ``options`` go to the peer's sampler class (the benchmark passes none; tests shrink the runs).
    """
    options = options or {}
    loc, scale = diagonal_gaussian(target)
    loglike, transform, dim = CountedLogLikelihood(target), UnitCubeToReference(loc, scale), target.dim
    np.random.seed(seed)  # pocomc resamples its posterior with the global numpy stream
    torch.manual_seed(seed)  # and samples its flow with torch's
    start = time.perf_counter()
    if name == "dynesty":
        import dynesty

        rng = np.random.default_rng(seed)
        sampler = dynesty.NestedSampler(loglike, transform, dim, rstate=rng, **options)
        sampler.run_nested(print_progress=False)
        res = sampler.results
        log_z, draws = float(res.logz[-1]), res.samples_equal(rstate=rng)
    elif name == "nautilus":
        import nautilus

        sampler = nautilus.Sampler(transform, loglike, n_dim=dim, vectorized=True, seed=seed, **options)
        sampler.run(verbose=False)
        log_z, draws = float(sampler.log_z), sampler.posterior(equal_weight=True)[0]
    elif name == "pocomc":
        import pocomc
        from scipy import stats

        prior = pocomc.Prior([stats.norm(m, s) for m, s in zip(loc, scale)])
        sampler = pocomc.Sampler(prior, loglike, n_dim=dim, vectorize=True, random_state=seed, **options)
        sampler.run(progress=False)
        log_z, draws = float(sampler.evidence()[0]), sampler.posterior(resample=True)[0]
    else:
        raise ValueError(f"unknown peer {name!r}; choose from {list(PEERS)}")
    seconds = time.perf_counter() - start
    return {"draws": np.asarray(draws), "log_z": log_z, "evals": loglike.num_evals, "seconds": seconds}


def run_ours(method: str, target, seed: int) -> dict:
    """``ds.sample`` at its defaults; a RuntimeWarning (the method's own diagnosis) becomes a note."""
    import diffstat as ds

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        idata = ds.sample(target, method, num_samples=NUM_SAMPLES, seed=seed, progress=False)
    attrs = idata.posterior.attrs
    row = {
        "draws": np.asarray(idata.posterior["x"].values).reshape(-1, target.dim),
        "log_z": float(attrs["log_normalizer"]) if "log_normalizer" in attrs else None,
        "evals": int(attrs["num_target_evals"]),
        "seconds": float(attrs["sampling_time"]),
    }
    warned = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if warned:
        row["note"] = "warned: " + " ".join(warned[0].split())[:100]
    return row


def run_one(method: str, target, seed: int) -> dict:
    """The child process's work: one run, torch on one thread; ``cpu_seconds`` its CPU time."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    start = time.process_time()
    result = run_peer(method, target, seed) if method in PEERS else run_ours(method, target, seed)
    result["cpu_seconds"] = time.process_time() - start
    return result


def detail(problem, x: torch.Tensor) -> str:
    """The one number per target that says most about a failure (see the module docstring)."""
    if problem.name.startswith("narrow_wide"):
        return f"heavy {problem.classify(x)[0]:.3f}"
    if problem.name.startswith("gmm40"):
        shares = problem.classify(x)
        return f"modes {int((shares > 0).sum())}/{len(shares)}"
    if problem.name.startswith("funnel"):
        return f"sd(x1) {float(x[:, 0].std()):.2f}"
    return ""


def score(problem, result: dict, seed: int) -> dict:
    """The row of metrics of one finished run (``run_all.evaluate`` on its draws)."""
    x = torch.as_tensor(result["draws"], dtype=torch.float64)
    attrs = {"num_target_evals": result["evals"], "sampling_time": result["seconds"]}
    if result["log_z"] is not None:
        attrs["log_normalizer"] = result["log_z"]
    import xarray as xr

    idata = SimpleNamespace(posterior=xr.Dataset({"x": (("draw", "dim"), x.numpy())}, attrs=attrs))
    row = evaluate(problem, idata, seed)
    row["cpu s"] = result["cpu_seconds"]
    finite = x[torch.isfinite(x).all(1)]
    if len(finite) > 1:
        row["detail"] = detail(problem, finite)
    if result.get("note"):
        row["note"] = "; ".join(filter(None, [row.get("note"), result["note"]]))
    return row


def add_ratios(rows: list[dict]) -> None:
    """``/ best`` columns: each row against the peer with the smallest |log Z err| on its target
    and seed (none when no peer finished there)."""
    for key in {(r["target"], r["seed"]) for r in rows}:
        group = [r for r in rows if (r["target"], r["seed"]) == key]
        peers = [r for r in group if r["method"] in PEERS and math.isfinite(r.get("log Z err", math.nan))]
        if not peers:
            continue
        best = min(peers, key=lambda r: abs(r["log Z err"]))
        for r in group:
            if "log Z err" in r:
                r["/ best"] = abs(r["log Z err"]) / max(abs(best["log Z err"]), 1e-12)
            if "evals" in r:
                r["evals / best"] = r["evals"] / max(best["evals"], 1)


RATIO_NOTE = (
    "`/ best`: |log Z err| over the best peer's (the smallest |log Z err| among the peers on that "
    "target and seed); `evals / best`: evaluations over that peer's."
)
#: The columns printed as each run ends.
SHORT = ("log Z err", "evals", "seconds")
COLUMNS = ("log Z err", "/ best", "mode TV", "mean err", "sd err", "detail", "evals", "evals / best")


def markdown(rows: list[dict], header: str) -> str:
    cols = COLUMNS + ("seconds", "cpu s")
    lines = [
        header,
        "",
        "| target | seed | method | " + " | ".join(cols) + " | note |",
        "| --- | ---: | --- | " + " | ".join("---:" for _ in cols) + " | --- |",
    ]
    for r in rows:
        cells = [r.get(c) if c == "detail" else fmt(r.get(c)) for c in cols]
        lines.append(
            f"| {r['target']} | {r['seed']} | {r['method']} | "
            + " | ".join(c or "-" for c in cells)
            + f" | {' '.join(r.get('note', '').split())} |"  # a table cell holds no line break
        )
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """The log Z errors side by side: one line per target and seed, one column per method, each cell
    ``error (x ratio to the best peer)`` marked ``w`` where the method warned, or why there is none."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cells: dict[tuple, dict[str, str]] = {}
    for r in rows:
        if "log Z err" in r:
            ratio = f" ({r['/ best']:.2g}x)" if "/ best" in r else ""
            cell = f"{r['log Z err']:+.3f}{ratio}" + (" w" if "warned" in r.get("note", "") else "")
        else:
            cell = r.get("note", "-").split(" (")[0].split(":")[0]
        cells.setdefault((r["target"], r["seed"]), {})[r["method"]] = cell
    lines = [
        "log Z error (times the best peer's |error|; w: the method warned that its result is unreliable):",
        "",
        "| target | seed | " + " | ".join(methods) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in methods) + " |",
    ]
    for (target, seed), by_method in cells.items():
        lines.append(f"| {target} | {seed} | " + " | ".join(by_method.get(m, "-") for m in methods) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help=f"only {', '.join(FAST)}")
    parser.add_argument("--targets", nargs="+", default=None, help="target names (see _suite.suite)")
    parser.add_argument("--methods", nargs="+", default=list(OURS) + list(PEERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds per run (default 300)")
    parser.add_argument(
        "--table", nargs="+", type=Path, default=None, help="only make the table from these .jsonl logs"
    )
    args = parser.parse_args(argv)
    if args.table:  # runs split over processes (or cut short) joined into one table
        rows = [json.loads(line) for path in args.table for line in path.read_text().splitlines()]
        add_ratios(rows)
        header = f"Rows of {', '.join(p.name for p in args.table)}. {RATIO_NOTE}"
        print(markdown(rows, header) + "\n\n" + summary(rows))
        return
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)

    builders = suite(args.fast, num_exact=2000 if args.fast else 4000, seed=min(args.seeds))
    names = args.targets or (list(FAST) if args.fast else list(builders))
    unknown = set(names) - set(builders)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; choose from {list(builders)}")
    methods = []
    for m in args.methods:
        if m in PEERS and importlib.util.find_spec(PEERS[m]) is None:
            print(f"[skip] {m}: not installed (pip install 'diffstat[bench]'); its rows are left out")
        elif m not in OURS and m not in PEERS:
            parser.error(f"unknown method {m!r}; choose from {list(OURS) + list(PEERS)}")
        else:
            methods.append(m)

    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"peers_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}"
    rows, start_all = [], time.perf_counter()
    with open(stem.with_suffix(".jsonl"), "w") as log:
        for name in names:
            problem = builders[name]()
            for seed in args.seeds:
                for method in methods:
                    result = run_with_time_limit(run_one, (method, problem.target, seed), args.time_limit)
                    row = {"target": name, "seed": seed, "method": method}
                    if "timeout" in result:
                        cpu = result["cpu_seconds"]
                        row["note"] = f"over {args.time_limit:.0f} s" + (f" ({cpu:.0f} CPU s)" if cpu else "")
                    elif "error" in result:
                        row["note"] = f"failed: {result['error'][:150]}"
                    else:
                        row.update(score(problem, result, seed))
                    rows.append(row)
                    print(
                        f"{name:>16} {seed} {method:>9}: "
                        + ", ".join(
                            f"{c} {fmt(row[c])}" for c in ("log Z err", "evals", "seconds") if c in row
                        )
                        + (f", {row['detail']}" if row.get("detail") else "")
                        + (f" [{row['note']}]" if row.get("note") else ""),
                        flush=True,
                    )
                    log.write(json.dumps(row) + "\n")
                    log.flush()
    add_ratios(rows)
    total = (time.perf_counter() - start_all) / 60
    header = (
        f"Seeds {args.seeds}, {'--fast' if args.fast else 'every target'}, time limit "
        f"{args.time_limit:.0f} s per run, one torch thread, {total:.0f} min in all. {RATIO_NOTE}"
    )
    table = markdown(rows, header) + "\n\n" + summary(rows)
    stem.with_suffix(".md").write_text(table + "\n")
    print("\n" + table + f"\n\nwritten to {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
