"""A new user's audit: small targets that no test or benchmark uses, every method at its defaults
through ``ds.sample`` only, each result set against its exact answer (``docs/audit.md``).

    python benchmarks/bench_audit.py --cases banana2 student_t --methods nuts smc --seed 0

prints one Markdown row per (case, method): the largest |mean error| in posterior sds, the largest
relative sd error, the mode weights' total-variation error, the log Z error, evaluations, seconds,
progress bars shown, and the RuntimeWarnings raised (first words). Exact answers: closed forms for
the torch targets; for Eight Schools the posterior given tau is Gaussian, so its moments are a 1-d
quadrature over tau; the conjugate Pyro model (Gamma rate, Dirichlet simplex) has a closed form.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import warnings

import numpy as np
import torch

import diffstat as ds
import diffstat._util as util

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from audit_cases import CASES  # noqa: E402

torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=FutureWarning)
F64 = torch.float64


# ----------------------------------------------------------------------------- scoring
def _short(message: str) -> str:
    """A warning's first 160 characters, and the start of each problem it lists (an MCMC warning
    lists R-hat, ESS, divergences and E-BFMI as ``  - `` lines, which the first characters hide)."""
    problems = [line.strip()[2:42] for line in message.splitlines()[1:] if line.strip().startswith("- ")]
    if not message:
        return ""
    return message.splitlines()[0][:160] + (f" [{'; '.join(problems)}]" if problems else "")


def score(idata, exact) -> dict:
    """Errors of the draws against the exact answer."""
    post = idata.posterior
    row = {}
    if "sites" in exact:
        errs, sd_errs = [], []
        for name, (m, s) in exact["sites"].items():
            if name == "theta" and name not in post:  # non-centred: a deterministic site, not reported
                v = post["mu"] + post["tau"] * post["eta"]
            else:
                v = post[name]
            x = v.values.reshape(v.shape[0] * v.shape[1], -1)
            if name == "tau":  # mean of tau only (its sd under a half-Cauchy prior is heavy-tailed)
                errs.append(np.abs(x.mean(0) - m) / x.std(0))
                continue
            m, s = np.ravel(m), np.ravel(s)
            scored = s > 0  # a constant coordinate (a Cholesky factor's 0 and 1 entries) is not
            errs.append(np.abs(x.mean(0) - m)[scored] / s[scored])
            sd_errs.append(np.abs(x.std(0)[scored] / s[scored] - 1))
        row["mean_err"] = float(np.max(np.concatenate(errs)))
        row["sd_err"] = float(np.max(np.concatenate(sd_errs)))
    else:
        x = post["x"].values.reshape(-1, post["x"].shape[-1])
        row["mean_err"] = float(np.max(np.abs(x.mean(0) - exact["mean"]) / exact["sd"]))
        row["sd_err"] = float(np.max(np.abs(x.std(0) / exact["sd"] - 1)))
        if "weights" in exact:
            k = exact["assign"](torch.as_tensor(x, dtype=F64)).numpy()
            share = np.bincount(k, minlength=len(exact["weights"])) / len(k)
            row["mode_tv"] = float(0.5 * np.abs(share - exact["weights"]).sum())
    if "log_normalizer" in post.attrs and "log_z" in exact:
        row["log_z_err"] = float(post.attrs["log_normalizer"] - exact["log_z"])
        row["log_z_se"] = float(post.attrs.get("log_normalizer_se", float("nan")))
    return row


def nuts_reference(case: str, num_samples: int = 5000) -> dict:
    """Posterior means and sds of every variable by a long NUTS run (4 chains of ``num_samples``,
    seed 123), for the cases without a closed form; cached in /tmp."""
    import os
    import pickle

    path = f"/tmp/diffstat_audit_ref_{case}_{num_samples}.pkl"
    if os.path.exists(path):
        with open(path, "rb") as f:
            return pickle.load(f)
    target, _ = CASES[case]()
    idata = ds.sample(target, "nuts", num_samples=num_samples, seed=123, progress=False)
    sites = {}
    for name, v in idata.posterior.data_vars.items():
        x = v.values.reshape(v.shape[0] * v.shape[1], -1)
        sites[name] = (x.mean(0), x.std(0))
    with open(path, "wb") as f:
        pickle.dump(sites, f)
    return sites


def run(case: str, method: str, seed: int, **options) -> dict:
    target, exact = CASES[case]()
    if "sites" not in exact and "mean" not in exact:
        exact = dict(exact, sites=nuts_reference(case))
    shown = []
    real = util.tqdm

    def counting(*args, **kwargs):
        if not kwargs.get("disable", False):
            shown.append(kwargs.get("desc"))
        return real(*args, **kwargs)

    util.tqdm = counting
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            idata = ds.sample(target, method, num_samples=1000, seed=seed, **options)
    except Exception as err:  # an audit records crashes instead of stopping
        return dict(case=case, method=method, seed=seed, crash=f"{type(err).__name__}: {err}"[:200])
    finally:
        util.tqdm = real
    row = dict(case=case, method=method, seed=seed, seconds=time.perf_counter() - start)
    row.update(score(idata, exact))
    post = idata.posterior
    row["shape"] = tuple(int(n) for n in post[list(post.data_vars)[0]].shape[:2])
    row["evals"] = int(post.attrs["num_target_evals"])
    row["bars"] = len(shown)
    row["warnings"] = [_short(str(w.message)) for w in caught if issubclass(w.category, RuntimeWarning)]
    return row


def fmt(row: dict) -> str:
    if "crash" in row:
        return f"| {row['case']} | {row['method']} | {row['seed']} | CRASH: {row['crash']} |"
    cells = [row["case"], row["method"], str(row["seed"]), str(row["shape"])]
    for key in ("mean_err", "sd_err", "mode_tv", "log_z_err", "log_z_se"):
        cells.append(f"{row[key]:.3f}" if key in row else "-")
    cells += [
        f"{row['evals']:,}",
        f"{row['seconds']:.0f}",
        str(row["bars"]),
        " / ".join(row["warnings"]) or "-",
    ]
    return "| " + " | ".join(cells) + " |"


def posteriordb_check(names=None) -> None:
    """The missed-mode check with its fewest screened starts (``MIN_SCREENED`` prior draws, the
    ``NUM_CHECK_STARTS`` first and the best half as many after two steps climbing) on posteriordb's
    Stan reference draws: false alarms (a missed share or misweight over the warning thresholds) and
    evaluations, beside the unscreened check (256 starts), as ``bench_mode_check.py --posteriordb``."""
    from diffstat import posteriordb
    from diffstat.modes.check import MIN_SCREENED, NUM_CHECK_STARTS
    from diffstat.modes.climb import hill_climb
    from diffstat.modes.coverage import laplace_log_mass_at, missed_modes
    from diffstat.tempering.path import make_path

    print(
        "| posterior | dim | missed / misweight (256) | evals (256) | missed / misweight (screened) | evals |"
    )
    print("| --- | ---: | --- | ---: | --- | ---: |")
    for name in names or posteriordb.names():
        post = posteriordb.load(name)
        target = post.target
        u = target.unconstrain(post.reference_sites()).to(target.dtype)
        lp, g = target.log_prob_and_grad(u[:64])
        h = torch.full_like(lp, 0.1 * float(u.var(0).mean()))
        peaks, peak_lp, _ = hill_climb(target.log_prob_and_grad, u[:64], lp, g, 200, h)
        log_z = float(laplace_log_mass_at(target, peaks[peak_lp.argmax()][None])[0])
        cells = []
        for num, keep in ((NUM_CHECK_STARTS, None), (MIN_SCREENED, NUM_CHECK_STARTS)):
            gen = torch.Generator().manual_seed(0)
            starts = make_path(target).sample_reference(num, gen)
            res = missed_modes(target, u, log_z, starts, gen, keep=keep)
            cells += [f"{res.share:.1e} / {res.misweight:.3f}", f"{res.num_evals:,}"]
        print(f"| {name} | {target.dim} | " + " | ".join(cells) + " |", flush=True)


def contract(case: str = "gamma_dirichlet", num_chains: int = 3) -> None:
    """Every method twice with the same seed and ``num_chains`` chains, on small settings (those of
    ``tests/test_progress_bars.py``: this checks the contract, not the draws): the variables' names
    and shapes ``(chain, draw, *site shape)``, whether the two runs' draws are identical, the attrs
    API.md names, the progress bars shown."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
    from test_progress_bars import SMALL

    print("| method | variables (shapes) | same seed, same draws | attrs missing | bars | error |")
    print("| --- | --- | --- | --- | ---: | --- |")
    need = ("method", "num_target_evals", "sampling_time", "seed", "diffstat_version")
    for method in ds.available_methods():
        opts = {k: v for k, v in SMALL.get(method, {}).items() if k != "smoothed_score"}
        runs, shown, error = [], [], ""
        real = util.tqdm

        def counting(*args, shown=shown, real=real, **kwargs):
            if not kwargs.get("disable", False):
                shown.append(kwargs.get("desc"))
            return real(*args, **kwargs)

        util.tqdm = counting
        try:
            for _ in range(2):
                target, _ = CASES[case]()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    runs.append(
                        ds.sample(target, method, num_samples=64, seed=7, num_chains=num_chains, **opts)
                    )
        except Exception as err:  # an audit records crashes
            error = f"{type(err).__name__}: {str(err)[:150]}"
        finally:
            util.tqdm = real
        if len(runs) < 2:
            print(f"| {method} | - | - | - | {len(shown)} | {error} |", flush=True)
            continue
        a, b = (r.posterior for r in runs)
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in a.data_vars.items())
        same = all(np.array_equal(a[k].values, b[k].values) for k in a.data_vars)
        missing = [k for k in need if k not in a.attrs] + [
            k for k in ("lp",) if k not in runs[0].sample_stats
        ]
        print(
            f"| {method} | {shapes} | {same} | {missing or '-'} | {len(shown) // 2} | {error or '-'} |",
            flush=True,
        )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    parser.add_argument("--methods", nargs="+", default=["nuts", "hmc", "mala", "smc", "ais", "pt"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--posteriordb-check", nargs="*", default=None, metavar="POSTERIOR")
    parser.add_argument("--contract", nargs="?", const="gamma_dirichlet", default=None, metavar="CASE")
    args = parser.parse_args()
    if args.contract is not None:
        contract(args.contract)
        return
    if args.posteriordb_check is not None:
        posteriordb_check(args.posteriordb_check)
        return
    print(
        "| case | method | seed | (chain, draw) | mean err (sd) | sd err | mode TV | log Z err | log Z se "
        "| evals | s | bars | RuntimeWarnings |"
    )
    print("| --- " * 14 + "|")
    for case in args.cases:
        for method in args.methods:
            print(fmt(run(case, method, args.seed)), flush=True)


if __name__ == "__main__":
    main()
