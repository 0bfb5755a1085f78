"""Real-style targets for the diffusion sampler (notes: docs/diffusion_robustness.md).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 \\
        python docs/diffusion_robustness_targets.py TARGET METHOD ["opt=value, ..."]

TARGET: reg (conjugate regression, 10 predictors of correlation 0.9^|i-j|, n = 200, known sigma),
ar2 (Pyro AR(2), half-normal sigma; METHOD exact gives the quadrature answer), kidiq, earnings,
garch (posteriordb kidiq-kidscore_momiq, earnings-earn_height, garch-garch11, against their
reference draws, in unconstrained coordinates), gp (posteriordb gp_pois_regr-gp_regr), narrowS
(N((3, 3), 0.001^2 I) with its log-density shifted by S, e.g. narrow2000 or narrow-2000)."""

import math
import sys
import time
import warnings
import numpy as np
import torch
import diffstat as ds
import pyro
import pyro.distributions as dist


def regression(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    n, d, rho, sigma, tau = 200, 10, 0.9, 1.0, 10.0
    cov = rho ** (torch.arange(d)[:, None] - torch.arange(d)[None, :]).abs().double()
    X = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    beta = torch.randn(d, generator=g, dtype=torch.float64)
    y = X @ beta + sigma * torch.randn(n, generator=g, dtype=torch.float64)

    def log_prob(b):
        r = y - b @ X.T.to(b)
        return (
            -0.5 * (r**2).sum(-1) / sigma**2
            - 0.5 * n * math.log(2 * math.pi * sigma**2)
            - 0.5 * (b**2).sum(-1) / tau**2
            - 0.5 * d * math.log(2 * math.pi * tau**2)
        )

    prec = X.T @ X / sigma**2 + torch.eye(d, dtype=torch.float64) / tau**2
    V = torch.linalg.inv(prec)
    m = V @ X.T @ y / sigma**2
    log_z = float(
        torch.distributions.MultivariateNormal(
            torch.zeros(n, dtype=torch.float64),
            sigma**2 * torch.eye(n, dtype=torch.float64) + tau**2 * X @ X.T,
        ).log_prob(y)
    )
    return ds.Target(log_prob, d, dtype=dtype), m, V.diagonal().sqrt(), log_z


def ar2():
    g = torch.Generator().manual_seed(1)
    T, phi, sigma = 200, (0.5, -0.3), 0.5
    y = torch.zeros(T, dtype=torch.float64)
    e = torch.randn(T, generator=g, dtype=torch.float64)
    for t in range(2, T):
        y[t] = phi[0] * y[t - 1] + phi[1] * y[t - 2] + sigma * e[t]

    def model(y):
        p = pyro.sample("phi", dist.Normal(torch.zeros(2, dtype=y.dtype), 1.0).to_event(1))
        s = pyro.sample("sigma", dist.HalfNormal(torch.tensor(1.0, dtype=y.dtype)))
        with pyro.plate("t", y.shape[0] - 2):
            pyro.sample(
                "y",
                dist.Normal(p[..., 0:1] * y[1:-1] + p[..., 1:2] * y[:-2], s.unsqueeze(-1) if s.dim() else s),
                obs=y[2:],
            )

    return ds.Target.from_pyro(model, y=y)


def flat(idata):
    post = idata.posterior
    return np.concatenate(
        [post[v].values.reshape(post[v].shape[0] * post[v].shape[1], -1) for v in post.data_vars], 1
    )


def kidiq():
    import json
    import zipfile

    root = "/work/shared/posteriordb/posterior_database/"
    d = json.loads(zipfile.ZipFile(root + "data/data/kidiq.json.zip").read("kidiq.json"))
    y, iq = torch.tensor(d["kid_score"], dtype=torch.float64), torch.tensor(d["mom_iq"], dtype=torch.float64)

    def log_prob(
        u,
    ):  # u = (beta1, beta2, log sigma); half-Cauchy(0, 2.5) on sigma with its Jacobian, flat beta
        s = u[:, 2].exp()
        mu = u[:, 0:1] + u[:, 1:2] * iq.to(u)
        ll = (-0.5 * ((y.to(u) - mu) / s[:, None]) ** 2).sum(-1) - y.numel() * (
            u[:, 2] + 0.5 * math.log(2 * math.pi)
        )
        return ll + math.log(2 / (math.pi * 2.5)) - torch.log1p((s / 2.5) ** 2) + u[:, 2]

    r = json.loads(
        zipfile.ZipFile(root + "reference_posteriors/draws/draws/kidiq-kidscore_momiq.json.zip").read(
            "kidiq-kidscore_momiq.json"
        )
    )
    ref = np.concatenate([np.stack([c["beta[1]"], c["beta[2]"], np.log(c["sigma"])], 1) for c in r])
    return (
        ds.Target(log_prob, 3, dtype=torch.float64),
        torch.as_tensor(ref.mean(0)),
        torch.as_tensor(ref.std(0)),
    )


def earnings():
    import json
    import zipfile

    root = "/work/shared/posteriordb/posterior_database/"
    d = json.loads(zipfile.ZipFile(root + "data/data/earnings.json.zip").read("earnings.json"))
    y, h = torch.tensor(d["earn"], dtype=torch.float64), torch.tensor(d["height"], dtype=torch.float64)

    def log_prob(
        u,
    ):  # u = (beta1, beta2, log sigma); flat priors (Stan's improper), the Jacobian of sigma = exp(u3)
        s = u[:, 2].exp()
        mu = u[:, 0:1] + u[:, 1:2] * h.to(u)
        return (
            (-0.5 * ((y.to(u) - mu) / s[:, None]) ** 2).sum(-1)
            - y.numel() * (u[:, 2] + 0.5 * math.log(2 * math.pi))
            + u[:, 2]
        )

    r = json.loads(
        zipfile.ZipFile(root + "reference_posteriors/draws/draws/earnings-earn_height.json.zip").read(
            "earnings-earn_height.json"
        )
    )
    ref = np.concatenate([np.stack([c["beta[1]"], c["beta[2]"], np.log(c["sigma"])], 1) for c in r])
    return (
        ds.Target(log_prob, 3, dtype=torch.float64),
        torch.as_tensor(ref.mean(0)),
        torch.as_tensor(ref.std(0)),
    )


def garch():
    import json
    import zipfile

    root = "/work/shared/posteriordb/posterior_database/"
    d = json.loads(zipfile.ZipFile(root + "data/data/garch.json.zip").read("garch.json"))
    y, s1 = torch.tensor(d["y"], dtype=torch.float64), float(d["sigma1"])

    def log_prob(
        u,
    ):  # u = (mu, log alpha0, logit alpha1, logit(beta1 / (1 - alpha1))); flat priors, with Jacobians
        mu, a0 = u[:, 0], u[:, 1].exp()
        a1 = torch.sigmoid(u[:, 2])
        b1 = (1 - a1) * torch.sigmoid(u[:, 3])
        jac = (
            u[:, 1]
            + torch.nn.functional.logsigmoid(u[:, 2])
            + torch.nn.functional.logsigmoid(-u[:, 2])
            + torch.log1p(-a1)
            + torch.nn.functional.logsigmoid(u[:, 3])
            + torch.nn.functional.logsigmoid(-u[:, 3])
        )
        yy = y.to(u)
        var = torch.full_like(mu, s1**2)
        ll = torch.distributions.Normal(mu, var.sqrt()).log_prob(yy[0])
        for t in range(1, yy.numel()):
            var = a0 + a1 * (yy[t - 1] - mu) ** 2 + b1 * var
            ll = ll - 0.5 * (yy[t] - mu) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)
        return ll + jac

    r = json.loads(
        zipfile.ZipFile(root + "reference_posteriors/draws/draws/garch-garch11.json.zip").read(
            "garch-garch11.json"
        )
    )
    a1 = np.concatenate([c["alpha1"] for c in r])
    b1 = np.concatenate([c["beta1"] for c in r])
    ref = np.stack(
        [
            np.concatenate([c["mu"] for c in r]),
            np.log(np.concatenate([c["alpha0"] for c in r])),
            np.log(a1 / (1 - a1)),
            np.log((b1 / (1 - a1)) / (1 - b1 / (1 - a1))),
        ],
        1,
    )
    return (
        ds.Target(log_prob, 4, dtype=torch.float64),
        torch.as_tensor(ref.mean(0)),
        torch.as_tensor(ref.std(0)),
    )


def gp():
    import json
    import zipfile

    root = "/work/shared/posteriordb/posterior_database/"
    d = json.loads(zipfile.ZipFile(root + "data/data/gp_pois_regr.json.zip").read("gp_pois_regr.json"))
    x, y = torch.tensor(d["x"], dtype=torch.float64), torch.tensor(d["y"], dtype=torch.float64)

    def log_prob(
        u,
    ):  # u = log(rho, alpha, sigma); gamma(25, 4), half-normal(2), half-normal(1) priors, with Jacobians
        rho, alpha, sigma = u.exp().unbind(-1)
        d2 = (x[:, None] - x[None, :]).to(u) ** 2
        cov = alpha[:, None, None] ** 2 * torch.exp(-0.5 * d2 / rho[:, None, None] ** 2) + sigma[
            :, None, None
        ] * torch.eye(x.numel(), dtype=u.dtype)
        chol, info = torch.linalg.cholesky_ex(
            cov
        )  # -inf where the covariance is not numerically positive definite
        chol = torch.where((info == 0)[:, None, None], chol, torch.eye(x.numel(), dtype=u.dtype))
        ll = torch.distributions.MultivariateNormal(
            torch.zeros_like(y).to(u), scale_tril=chol, validate_args=False
        ).log_prob(y.to(u))
        ll = torch.where(info == 0, ll, torch.full_like(ll, -math.inf))
        lp = (
            torch.distributions.Gamma(25.0, 4.0, validate_args=False).log_prob(rho)
            + torch.distributions.HalfNormal(2.0).log_prob(alpha)
            + torch.distributions.HalfNormal(1.0).log_prob(sigma)
        )
        return ll + lp + u.sum(-1)

    r = json.loads(
        zipfile.ZipFile(root + "reference_posteriors/draws/draws/gp_pois_regr-gp_regr.json.zip").read(
            "gp_pois_regr-gp_regr.json"
        )
    )
    ref = np.log(np.concatenate([np.stack([c["rho"], c["alpha"], c["sigma"]], 1) for c in r]))
    return (
        ds.Target(log_prob, 3, dtype=torch.float64),
        torch.as_tensor(ref.mean(0)),
        torch.as_tensor(ref.std(0)),
    )


def ar2_exact():
    """Exact AR(2) posterior moments and log Z by quadrature over sigma (phi | sigma, y is conjugate)."""
    g = torch.Generator().manual_seed(1)
    T, phi, sigma = 200, (0.5, -0.3), 0.5
    y = torch.zeros(T, dtype=torch.float64)
    e = torch.randn(T, generator=g, dtype=torch.float64)
    for t in range(2, T):
        y[t] = phi[0] * y[t - 1] + phi[1] * y[t - 2] + sigma * e[t]
    X = torch.stack([y[1:-1], y[:-2]], 1)
    z = y[2:]
    n = z.numel()
    s = torch.linspace(0.3, 0.9, 6001, dtype=torch.float64)
    XtX, Xtz, ztz = X.T @ X, X.T @ z, z @ z
    logw, means, covs = [], [], []
    for si in s:
        prec = XtX / si**2 + torch.eye(2, dtype=torch.float64)
        V = torch.linalg.inv(prec)
        m = V @ Xtz / si**2
        # log p(z | sigma) = log N(z; 0, sigma^2 I + X X^T), via the Gaussian identity
        lml = (
            -0.5 * n * math.log(2 * math.pi * si**2)
            - 0.5 * ztz / si**2
            + 0.5 * m @ prec @ m
            - 0.5 * torch.logdet(prec)
        )
        logw.append(lml + math.log(2) - 0.5 * math.log(2 * math.pi) - 0.5 * si**2)  # half-normal(1) prior
        means.append(m)
        covs.append(V)
    logw = torch.stack(logw)
    w = torch.softmax(logw, 0)
    M = torch.stack(means)
    C = torch.stack(covs)
    Ephi = (w[:, None] * M).sum(0)
    Ephi2 = (w[:, None] * (C.diagonal(dim1=1, dim2=2) + M**2)).sum(0)
    Es = (w * s).sum()
    Es2 = (w * s**2).sum()
    print("exact mean", np.round([*Ephi.tolist(), float(Es)], 4))
    print("exact sd  ", np.round([*(Ephi2 - Ephi**2).sqrt().tolist(), float((Es2 - Es**2).sqrt())], 4))
    ds_ = s[1] - s[0]
    print(
        "exact log Z",
        float(torch.logsumexp(logw, 0) + math.log(ds_)),
        "(trapezoid-free Riemann sum; grid 0.3..0.9, edges weight",
        float(w[0] + w[-1]),
        ")",
    )


if __name__ == "__main__":
    which, method = sys.argv[1], sys.argv[2]
    opts = eval("dict(" + (sys.argv[3] if len(sys.argv) > 3 else "") + ")")
    if which == "reg":
        target, m, sd, log_z = regression()
    elif which == "earnings":
        target, m, sd = earnings()
        log_z = math.nan
    elif which == "garch":
        target, m, sd = garch()
        log_z = math.nan
    elif which.startswith("narrow"):  # N((3, 3), 0.001^2 I), log-density shifted by the number after "narrow"
        shift, c = float(which[6:]), torch.tensor([3.0, 3.0], dtype=torch.float64)
        target = ds.Target(
            lambda x: -0.5 * (((x - c.to(x)) / 1e-3) ** 2).sum(-1) + shift, 2, dtype=torch.float64
        )
        m, sd, log_z = c, torch.full((2,), 1e-3, dtype=torch.float64), shift + math.log(2 * math.pi * 1e-6)
    elif which == "gp":
        target, m, sd = gp()
        log_z = math.nan
    elif which == "kidiq":
        target, m, sd = kidiq()
        log_z = math.nan
    else:
        target, m, sd, log_z = ar2(), None, None, None
        if method == "exact":
            ar2_exact()
            raise SystemExit
    t0 = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            idata = ds.sample(
                target,
                method,
                num_samples=opts.pop("num_samples", 4000),
                seed=opts.pop("seed", 0),
                progress=False,
                **opts,
            )
        except Exception as e:
            print(f"CRASH {type(e).__name__}: {e}  after {time.time() - t0:.0f}s")
            raise SystemExit from e
    print(f"{which} {method} {time.time() - t0:.0f}s")
    for w in caught:
        if issubclass(w.category, RuntimeWarning):
            print("WARN", str(w.message)[:400])
    x = flat(idata)
    a = idata.posterior.attrs
    print("mean", np.round(x.mean(0), 4))
    print("sd  ", np.round(x.std(0), 4))
    if m is not None:
        print("exact mean", np.round(m.numpy(), 4))
        print("exact sd  ", np.round(sd.numpy(), 4))
        print("z-err of mean (in posterior sd)", np.round((x.mean(0) - m.numpy()) / sd.numpy(), 3))
        print("sd ratio", np.round(x.std(0) / sd.numpy(), 3), "exact logZ", round(log_z, 3))
    print("nan in draws", bool(np.isnan(x).any()))
    for k in ("log_normalizer", "log_normalizer_se", "pareto_k", "ess", "reliable", "num_target_evals"):
        if k in a:
            print(k, a[k])
    if "diffusion" in idata.groups():
        gp = idata["diffusion"]
        for k in ("log_normalizer", "ess", "ess_psis", "pareto_k", "num_modes", "model_choice", "used"):
            if k in gp:
                print(" round", k, np.round(gp[k].values.ravel().astype(float), 3).tolist())
    if method != "diffusion" and "sample_stats" in idata.groups():
        np.save(f"/tmp/dc/{which}_{method}.npy", x)
