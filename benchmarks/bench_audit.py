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
import math
import time
import warnings

import numpy as np
import torch

import diffstat as ds
import diffstat._util as util
from diffstat.targets import GaussianMixture, narrow_wide

torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=FutureWarning)
F64 = torch.float64


# ----------------------------------------------------------------------------- torch targets
def banana(dim: int, b: float = 0.5, s: float = 1.5, dtype=F64):
    """x1 ~ N(0, s^2), x_k | x1 ~ N(b x1^2, 1) for k >= 2, normalised (log Z = 0)."""
    const = -0.5 * dim * math.log(2 * math.pi) - math.log(s)

    def log_prob(x):
        rest = x[:, 1:] - b * x[:, :1] ** 2
        return -0.5 * (x[:, 0] / s) ** 2 - 0.5 * (rest**2).sum(-1) + const

    mean = np.r_[0.0, np.full(dim - 1, b * s**2)]
    var = np.r_[s**2, np.full(dim - 1, 1 + 2 * b**2 * s**4)]
    return ds.Target(log_prob, dim, dtype=dtype), dict(mean=mean, sd=np.sqrt(var), log_z=0.0)


def student_t(dim: int = 4, nu: float = 5.0, dtype=F64):
    """Multivariate t, nu degrees of freedom, identity scale, normalised."""
    const = math.lgamma((nu + dim) / 2) - math.lgamma(nu / 2) - 0.5 * dim * math.log(nu * math.pi)

    def log_prob(x):
        return const - 0.5 * (nu + dim) * torch.log1p((x**2).sum(-1) / nu)

    sd = np.full(dim, math.sqrt(nu / (nu - 2)))
    return ds.Target(log_prob, dim, dtype=dtype), dict(mean=np.zeros(dim), sd=sd, log_z=0.0)


def correlated_gaussian(dim: int = 50, cond: float = 1e3, dtype=F64, log_z: float = 1.3):
    """N(m, S), S = Q diag(eigs) Q^T with eigenvalues log-spaced over ``cond``; log Z = ``log_z``."""
    g = torch.Generator().manual_seed(11)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=F64))
    eigs = torch.logspace(0, math.log10(cond), dim, dtype=F64) / 10
    cov = q @ torch.diag(eigs) @ q.T
    mean = torch.randn(dim, generator=g, dtype=F64)
    prec = torch.linalg.inv(cov)
    const = log_z - 0.5 * dim * math.log(2 * math.pi) - 0.5 * torch.log(eigs).sum().item()

    def log_prob(x):
        d = x - mean.to(x.dtype)
        return const - 0.5 * ((d @ prec.to(x.dtype)) * d).sum(-1)

    exact = dict(mean=mean.numpy(), sd=torch.diagonal(cov).sqrt().numpy(), log_z=log_z)
    return ds.Target(log_prob, dim, dtype=dtype), exact


def mixture_case(mix: GaussianMixture, dtype=F64):
    cov = mix.covariance() if hasattr(mix, "covariance") else None
    mean = (mix.weights[:, None] * mix.means).sum(0)
    second = (mix.weights[:, None, None] * (mix.covs + mix.means[:, :, None] * mix.means[:, None, :])).sum(0)
    cov = second - mean[:, None] * mean[None, :]
    exact = dict(
        mean=mean.numpy(),
        sd=torch.diagonal(cov).sqrt().numpy(),
        log_z=mix.log_normalizer,
        weights=mix.weights.numpy(),
        assign=mix.assign,
    )
    return mix.as_target(dtype=dtype), exact


def two_mode_6d():
    """0.6 N(2.2 u, 0.7^2 I) + 0.4 N(-1.8 u, 1.1^2 I) in 6-d, u = (1, -1, 1, -1, 1, -1)/1; log Z -0.4."""
    u = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0], dtype=F64)
    mix = GaussianMixture(
        torch.stack([2.2 * u, -1.8 * u]), [0.6, 0.4], scales=[0.7, 1.1], log_normalizer=-0.4
    )
    return mixture_case(mix)


# ----------------------------------------------------------------------------- Pyro models
SCHOOLS_Y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SCHOOLS_SIGMA = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools(centered: bool):
    """mu ~ N(0, 5), tau ~ HalfCauchy(5), theta_j ~ N(mu, tau) (or mu + tau eta_j), y_j ~ N(theta_j, s_j)."""
    import pyro
    import pyro.distributions as dist

    y = torch.tensor(SCHOOLS_Y, dtype=F64)
    sigma = torch.tensor(SCHOOLS_SIGMA, dtype=F64)

    def model(y, sigma):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(torch.tensor(5.0, dtype=F64)))
        with pyro.plate("schools", 8):
            if centered:
                theta = pyro.sample("theta", dist.Normal(mu, tau))
            else:
                eta = pyro.sample("eta", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
                theta = pyro.deterministic("theta", mu + tau * eta)
            pyro.sample("obs", dist.Normal(theta, sigma), obs=y)

    return ds.Target.from_pyro(model, y, sigma), dict(sites=eight_schools_exact())


def eight_schools_exact(num: int = 200_001):
    """Posterior means and sds of mu, tau, theta by quadrature over tau (mu, theta | tau Gaussian)."""
    y, s2 = SCHOOLS_Y, SCHOOLS_SIGMA**2
    tau = np.linspace(1e-6, 200.0, num)[:, None]
    v = s2 + tau**2  # y_j | mu, tau ~ N(mu, v_j)
    prec_mu = 1 / 25.0 + (1 / v).sum(1, keepdims=True)
    m_mu = (y / v).sum(1, keepdims=True) / prec_mu
    log_w = (
        -0.5 * np.log(v).sum(1, keepdims=True)
        - 0.5 * (y**2 / v).sum(1, keepdims=True)
        + 0.5 * prec_mu * m_mu**2
        - 0.5 * np.log(prec_mu)
        - np.log1p((tau / 5.0) ** 2)
    )
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    var_mu = 1 / prec_mu
    shrink = tau**2 / v  # theta_j | mu, tau, y ~ N(shrink y + (1-shrink) mu, shrink s2)
    th_mean = shrink * y + (1 - shrink) * m_mu
    th_var = (1 - shrink) ** 2 * var_mu + shrink * s2
    out = {}
    for name, m, var in (("mu", m_mu, var_mu), ("tau", tau, 0 * tau), ("theta", th_mean, th_var)):
        e1 = (w * m).sum(0)
        e2 = (w * (var + m**2)).sum(0)
        out[name] = (e1, np.sqrt(e2 - e1**2))
    return out


def gamma_dirichlet():
    """rate ~ Gamma(2, 1), counts ~ Poisson(rate); p ~ Dirichlet(1.5 1), cats ~ Multinomial(p): conjugate."""
    import pyro
    import pyro.distributions as dist

    counts = torch.tensor([3.0, 5.0, 2.0, 4.0, 6.0], dtype=F64)
    cats = torch.tensor([7.0, 2.0, 11.0, 4.0], dtype=F64)

    def model(counts, cats):
        rate = pyro.sample("rate", dist.Gamma(torch.tensor(2.0, dtype=F64), 1.0))
        p = pyro.sample("p", dist.Dirichlet(torch.full((4,), 1.5, dtype=F64)))
        with pyro.plate("obs", 5):
            pyro.sample("counts", dist.Poisson(rate), obs=counts)
        pyro.sample("cats", dist.Multinomial(int(cats.sum()), p), obs=cats)

    a, b = 2 + counts.sum().item(), 1 + 5
    alpha = 1.5 + cats.numpy()
    a0 = alpha.sum()
    p_mean = alpha / a0
    p_sd = np.sqrt(alpha * (a0 - alpha) / (a0**2 * (a0 + 1)))
    sites = {"rate": (np.array([a / b]), np.array([math.sqrt(a) / b])), "p": (p_mean, p_sd)}
    return ds.Target.from_pyro(model, counts, cats), dict(sites=sites)


def poisson_glm():
    """counts_i ~ Poisson(exp(a + b x_i)), a, b ~ N(0, 2): no closed form; scored against NUTS."""
    import pyro
    import pyro.distributions as dist

    g = torch.Generator().manual_seed(5)
    x = torch.linspace(-1, 1, 40, dtype=F64)
    y = torch.poisson(torch.exp(0.7 + 1.2 * x), generator=g)

    def model(x, y):
        a = pyro.sample("a", dist.Normal(torch.tensor(0.0, dtype=F64), 2.0))
        b = pyro.sample("b", dist.Normal(torch.tensor(0.0, dtype=F64), 2.0))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Poisson(torch.exp(a + b * x)), obs=y)

    return ds.Target.from_pyro(model, x, y), {}


def hier_logistic():
    """y_ij ~ Bernoulli(logit(alpha_j + beta x_ij)), alpha_j ~ N(mu, sigma), sigma ~ HalfNormal(1)."""
    import pyro
    import pyro.distributions as dist

    g = torch.Generator().manual_seed(6)
    groups, per = 5, 20
    x = torch.randn(groups, per, generator=g, dtype=F64)
    alpha = torch.randn(groups, 1, generator=g, dtype=F64) * 0.8
    y = torch.bernoulli(torch.sigmoid(alpha + 1.0 * x), generator=g)

    def model(x, y):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 2.0))
        sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(1.0, dtype=F64)))
        beta = pyro.sample("beta", dist.Normal(torch.tensor(0.0, dtype=F64), 2.0))
        with pyro.plate("groups", groups):
            a = pyro.sample("alpha", dist.Normal(mu, sigma))
        pyro.sample("y", dist.Bernoulli(logits=a[:, None] + beta * x).to_event(2), obs=y)

    return ds.Target.from_pyro(model, x, y), {}


def sonar_case():
    """The sonar logistic regression (61-d); log Z -108.48 +- 0.03 (diffstat.targets.sonar's notes)."""
    from diffstat.targets import sonar

    post = sonar()
    return ds.Target(post.log_prob, post.dim, dtype=F64), dict(log_z=-108.48)


CASES = {
    "banana2": lambda: banana(2),
    "banana5": lambda: banana(5),
    "banana5_f32": lambda: banana(5, dtype=torch.float32),
    "student_t": lambda: student_t(4),
    "corr50": lambda: correlated_gaussian(50),
    "corr50_f32": lambda: correlated_gaussian(50, dtype=torch.float32),
    "mix6": two_mode_6d,
    "nw8": lambda: mixture_case(narrow_wide(8)),
    "nw11": lambda: mixture_case(narrow_wide(11, scales=(0.35, 1.0))),
    "schools_c": lambda: eight_schools(True),
    "schools_nc": lambda: eight_schools(False),
    "gamma_dirichlet": gamma_dirichlet,
    "poisson_glm": poisson_glm,
    "hier_logistic": hier_logistic,
    "sonar": sonar_case,
}


# ----------------------------------------------------------------------------- scoring
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
            errs.append(np.abs(x.mean(0) - m) / s)
            sd_errs.append(np.abs(x.std(0) / s - 1))
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
    row["warnings"] = [str(w.message)[:160] for w in caught if issubclass(w.category, RuntimeWarning)]
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
    """The missed-mode check as the samplers now run it (``NUM_CHECK_CANDIDATES`` prior draws, the
    ``NUM_CHECK_STARTS`` first and the best half as many after two steps climbing) on posteriordb's
    Stan reference draws: false alarms (a missed share or misweight over the warning thresholds) and
    evaluations, beside the unscreened check (256 starts), as ``bench_mode_check.py --posteriordb``."""
    from diffstat import posteriordb
    from diffstat.modes.check import NUM_CHECK_CANDIDATES, NUM_CHECK_STARTS
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
        for num, keep in ((NUM_CHECK_STARTS, None), (NUM_CHECK_CANDIDATES, NUM_CHECK_STARTS)):
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
    import pathlib
    import sys

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
