"""The audit's third round (``docs/audit.md``): Pyro models as a statistician writes them, each with
an exact answer computed here without the package, on the model's own parameters:

* a conditionally Gaussian model (varying intercepts, an AR(1) latent series) is Gaussian given
  one or two scale parameters, so its moments are a quadrature over those of closed-form Gaussian
  posteriors and evidences (``audit_exact.gaussian_given``);
* a model of three or four parameters is integrated on a grid in the frame of its Laplace
  approximation, +-12 to 16 sds, 33 to 81 points an axis (``audit_exact.grid_moments``), refused
  where the grid's edge holds over 1e-7 of the mass;
* the change point is conjugate given the switch, and the LKJ model is a grid over the three
  correlations themselves.

``THIRD_ROUND[name]()`` returns ``(target, dict(sites=...))`` as ``audit_cases.CASES`` does; a site
coordinate whose exact sd is 0 (the constant entries of a Cholesky factor) is not scored.
"""

from __future__ import annotations

import math

import numpy as np
import torch

import diffstat as ds
from audit_exact import gaussian_given, grid_moments, log_mass, mixture_moments, normal_lp

F64 = torch.float64


def _t(x):
    return torch.as_tensor(x, dtype=F64)


# ----------------------------------------------------------------------------- varying intercepts
def radon_centred(groups: int = 12):
    """Radon-like varying intercepts, centred: y_i ~ N(alpha_g[i] + beta floor_i, sigma), alpha_j ~
    N(mu, tau), mu, beta ~ N(0, 5), tau, sigma ~ HalfNormal(1); 111 houses in 12 counties of 1 to
    25 houses. Exact: (mu, beta, alpha) | tau, sigma is Gaussian; quadrature over log tau, log
    sigma (360 x 120 points)."""
    import pyro
    import pyro.distributions as dist

    rng = np.random.default_rng(31)
    sizes = np.array([1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25])[:groups]
    county = np.repeat(np.arange(groups), sizes)
    floor = (rng.random(county.size) < 0.3).astype(float)
    alpha = 1.3 + 0.3 * rng.standard_normal(groups)
    y = alpha[county] - 0.6 * floor + 0.8 * rng.standard_normal(county.size)

    def model(county, floor, y):
        mu = pyro.sample("mu", dist.Normal(_t(0.0), 5.0))
        tau = pyro.sample("tau", dist.HalfNormal(_t(1.0)))
        beta = pyro.sample("beta", dist.Normal(_t(0.0), 5.0))
        sigma = pyro.sample("sigma", dist.HalfNormal(_t(1.0)))
        with pyro.plate("counties", groups):
            a = pyro.sample("alpha", dist.Normal(mu, tau))
        with pyro.plate("houses", len(y)):
            pyro.sample("y", dist.Normal(a[..., county] + beta * floor, sigma), obs=y)

    design = np.zeros((y.size, groups + 2))  # theta = (mu, beta, alpha_1..J)
    design[:, 1] = floor
    design[np.arange(y.size), 2 + county] = 1.0
    log_tau, log_sigma = np.linspace(-12, 1.5, 360), np.linspace(-1.2, 0.4, 120)
    lt, ls = [g.ravel() for g in np.meshgrid(log_tau, log_sigma, indexing="ij")]
    prec = np.zeros((lt.size, groups + 2, groups + 2))
    itau2 = np.exp(-2 * lt)
    prec[:, 0, 0] = 1 / 25 + groups * itau2
    prec[:, 1, 1] = 1 / 25
    for j in range(groups):
        prec[:, 2 + j, 2 + j] = itau2
        prec[:, 0, 2 + j] = prec[:, 2 + j, 0] = -itau2
    mean, var, log_ev = gaussian_given(prec, design, y, np.exp(2 * ls))
    log_w = log_ev + normal_lp(np.exp(lt), 1.0) + lt + normal_lp(np.exp(ls), 1.0) + ls
    scales = np.exp(np.c_[lt, ls])
    m, s = mixture_moments(log_w, np.c_[mean, scales], np.c_[var, 0 * scales])
    sites = {"mu": (m[0], s[0]), "beta": (m[1], s[1]), "alpha": (m[2:-2], s[2:-2])}
    sites.update(tau=(m[-2], s[-2]), sigma=(m[-1], s[-1]))
    cell = (log_tau[1] - log_tau[0]) * (log_sigma[1] - log_sigma[0])
    log_z = log_mass(log_w, cell) + 2 * math.log(2.0)  # the half-normals' factor 2
    target = ds.Target.from_pyro(model, torch.as_tensor(county), _t(floor), _t(y))
    return target, dict(sites=sites, log_z=log_z)


def ar1_latent(steps: int = 60, obs_sd: float = 0.7):
    """A latent AR(1) series observed with noise (a state-space model, centred): phi ~ U(-1, 1),
    sigma ~ HalfNormal(1), x ~ N(0, K) with the stationary AR(1) covariance K_st = sigma^2
    phi^|s-t| / (1 - phi^2) (Pyro's per-step loop costs 10 times as much), y_t ~ N(x_t, 0.7); 62
    dimensions. Exact: x | phi, sigma is Gaussian (tridiagonal precision); quadrature over phi and
    log sigma (300 x 100 points)."""
    import pyro
    import pyro.distributions as dist

    rng = np.random.default_rng(32)
    x = np.zeros(steps)
    x[0] = 0.5 / math.sqrt(1 - 0.64) * rng.standard_normal()
    for t in range(1, steps):
        x[t] = 0.8 * x[t - 1] + 0.5 * rng.standard_normal()
    y = x + obs_sd * rng.standard_normal(steps)

    lags = (torch.arange(steps)[:, None] - torch.arange(steps)[None, :]).abs().to(F64)

    def model(y):
        phi = pyro.sample("phi", dist.Uniform(_t(-1.0), 1.0))
        sigma = pyro.sample("sigma", dist.HalfNormal(_t(1.0)))
        cov = sigma**2 * phi**lags / (1 - phi**2)  # the stationary AR(1) covariance
        x = pyro.sample("x", dist.MultivariateNormal(torch.zeros(steps), covariance_matrix=cov))
        pyro.sample("y", dist.Normal(x, obs_sd).to_event(1), obs=y)

    phis, log_s = np.linspace(-0.995, 0.9995, 300), np.linspace(-3.0, 0.5, 100)
    design, parts = np.eye(steps), []
    for phi in phis:
        q = np.diag(np.r_[1.0, np.full(steps - 2, 1 + phi**2), 1.0])
        q -= phi * (np.eye(steps, k=1) + np.eye(steps, k=-1))
        prec = q[None] / np.exp(2 * log_s)[:, None, None]
        mean, var, log_ev = gaussian_given(prec, design, y, np.full(log_s.size, obs_sd**2))
        log_w = log_ev + normal_lp(np.exp(log_s), 1.0) + log_s
        parts.append((log_w, np.c_[mean, np.full_like(log_s, phi), np.exp(log_s)], var))
    log_w = np.concatenate([p[0] for p in parts])
    means = np.concatenate([p[1] for p in parts])
    var = np.concatenate([np.c_[p[2], np.zeros((log_s.size, 2))] for p in parts])
    m, s = mixture_moments(log_w, means, var)
    sites = {"x": (m[:steps], s[:steps]), "phi": (m[-2], s[-2]), "sigma": (m[-1], s[-1])}
    # the half-normal's factor 2 and the uniform's 1/2 cancel
    log_z = log_mass(log_w, (phis[1] - phis[0]) * (log_s[1] - log_s[0]))
    return ds.Target.from_pyro(model, _t(y)), dict(sites=sites, log_z=log_z)


# ----------------------------------------------------------------------------- small GLMs, by grid
def ordered_logistic(n: int = 120):
    """Ordered-logistic regression, 4 categories: y_i ~ OrderedLogistic(beta x_i, c), beta ~ N(0,
    2.5), the cutpoints c ordered, c = OrderedTransform(v), v ~ N(0, 5) i.i.d. Exact: 4-d grid on
    (beta, v)."""
    import pyro
    import pyro.distributions as dist
    from pyro.distributions.transforms import OrderedTransform

    rng = np.random.default_rng(33)
    x = rng.standard_normal(n)
    cut = np.array([-1.0, 0.5, 2.0])
    latent = 1.2 * x + rng.logistic(size=n)
    y = (latent[:, None] > cut).sum(1)

    def model(x, y):
        beta = pyro.sample("beta", dist.Normal(_t(0.0), 2.5))
        base = dist.Normal(torch.zeros(3), 5.0).to_event(1)
        c = pyro.sample("cutpoints", dist.TransformedDistribution(base, OrderedTransform()))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.OrderedLogistic(beta * x, c), obs=y)

    xt, yt = _t(x), torch.as_tensor(y)

    def cutpoints(u):
        return torch.cumsum(torch.cat([u[:, 1:2], u[:, 2:].exp()], 1), 1)

    def log_density(u):
        c = cutpoints(u)
        cdf = torch.sigmoid(c[:, None, :] - u[:, :1, None] * xt[None, :, None])  # P(y <= k)
        cdf = torch.cat([torch.zeros_like(cdf[..., :1]), cdf, torch.ones_like(cdf[..., :1])], -1)
        p = cdf[..., 1:] - cdf[..., :-1]
        lik = torch.log(p.gather(-1, yt.expand(len(u), -1)[..., None])[..., 0]).sum(-1)
        return lik + normal_lp(u[:, 0], 2.5) + normal_lp(u[:, 1:], 5.0).sum(-1)

    funcs = {"beta": lambda u: u[:, 0], "cutpoints": cutpoints}
    sites, log_z = grid_moments(log_density, [1.0, -1.0, 0.0, 0.0], funcs)
    return ds.Target.from_pyro(model, xt, yt), dict(sites=sites, log_z=log_z)


def negbin_regression(n: int = 60):
    """Negative-binomial regression with overdispersion: y_i ~ NB(mean exp(b0 + b x_i), shape phi)
    as Pyro's NegativeBinomial(total_count=phi, logits=eta - log phi); b0 ~ N(0, 5), b ~ N(0, 2.5)
    (2 covariates), phi ~ Gamma(2, 0.1). Exact: 4-d grid on (b0, b1, b2, log phi)."""
    import pyro
    import pyro.distributions as dist

    rng = np.random.default_rng(34)
    x = rng.standard_normal((n, 2))
    mu = np.exp(1.0 + x @ np.array([0.5, -0.3]))
    y = rng.negative_binomial(3.0, 3.0 / (3.0 + mu)).astype(float)

    def model(x, y):
        b0 = pyro.sample("b0", dist.Normal(_t(0.0), 5.0))
        b = pyro.sample("b", dist.Normal(torch.zeros(2), 2.5).to_event(1))
        phi = pyro.sample("phi", dist.Gamma(_t(2.0), 0.1))
        eta = b0[..., None] + (b[..., None, :] * x).sum(-1)
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.NegativeBinomial(phi[..., None], logits=eta - phi.log()[..., None]), obs=y)

    xt, yt = _t(x), _t(y)

    def log_density(u):
        eta = u[:, :1] + u[:, 1:3] @ xt.T
        lphi = u[:, 3:]
        phi = lphi.exp()
        lik = (
            torch.lgamma(yt + phi)
            - torch.lgamma(phi)
            - torch.lgamma(yt + 1)
            + phi * (lphi - torch.logaddexp(lphi, eta))
            + yt * (eta - torch.logaddexp(lphi, eta))
        ).sum(-1)
        prior = normal_lp(u[:, 0], 5.0) + normal_lp(u[:, 1:3], 2.5).sum(-1)
        prior = prior + 2 * math.log(0.1) + lphi[:, 0] - 0.1 * phi[:, 0] + lphi[:, 0]  # with Jacobian
        return lik + prior

    funcs = {"b0": lambda u: u[:, 0], "b": lambda u: u[:, 1:3], "phi": lambda u: u[:, 3].exp()}
    sites, log_z = grid_moments(log_density, [1.0, 0.5, -0.3, 1.0], funcs)
    return ds.Target.from_pyro(model, xt, yt), dict(sites=sites, log_z=log_z)


def weibull_censored(n: int = 80):
    """Weibull survival regression with right censoring: T_i ~ Weibull(scale exp(a + b x_i), shape
    k), observed where T_i < C_i ~ U(0.5, 3), else the survival exp(-(C_i / scale)^k) as a
    ``pyro.factor``; a, b ~ N(0, 2), k ~ Gamma(2, 1). Exact: 3-d grid on (a, b, log k)."""
    import pyro
    import pyro.distributions as dist

    rng = np.random.default_rng(35)
    x = rng.standard_normal(n)
    t = np.exp(0.3 - 0.5 * x) * rng.weibull(1.5, n)
    c = rng.uniform(0.5, 3.0, n)
    seen = t < c
    data = [_t(v) for v in (x[seen], t[seen], x[~seen], c[~seen])]

    def model(x_obs, t_obs, x_cens, c_cens):
        a = pyro.sample("a", dist.Normal(_t(0.0), 2.0))
        b = pyro.sample("b", dist.Normal(_t(0.0), 2.0))
        k = pyro.sample("k", dist.Gamma(_t(2.0), 1.0))
        with pyro.plate("observed", len(t_obs)):
            pyro.sample("t", dist.Weibull(torch.exp(a + b * x_obs), k), obs=t_obs)
        with pyro.plate("censored", len(c_cens)):
            pyro.factor("survival", -((c_cens / torch.exp(a + b * x_cens)) ** k))

    def log_density(u):
        a, b, lk = u[:, :1], u[:, 1:2], u[:, 2:3]
        k = lk.exp()
        z_obs = (data[1].log() - a - b * data[0]) * k  # log(t / scale)^k
        lik = (lk + (k - 1) * data[1].log() - k * (a + b * data[0]) - z_obs.exp()).sum(-1)
        lik = lik - torch.exp(k * (data[3].log() - a - b * data[2])).sum(-1)
        prior = normal_lp(u[:, 0], 2.0) + normal_lp(u[:, 1], 2.0) + math.log(1.0) + 2 * lk[:, 0] - k[:, 0]
        return lik + prior

    funcs = {"a": lambda u: u[:, 0], "b": lambda u: u[:, 1], "k": lambda u: u[:, 2].exp()}
    sites, log_z = grid_moments(log_density, [0.3, -0.5, 0.4], funcs, num=61)
    return ds.Target.from_pyro(model, *data), dict(sites=sites, log_z=log_z)


def mixture_weights(n: int = 80):
    """A three-component normal mixture with marginalised labels: y_i ~ sum_k w_k N(m_k, sigma),
    known locations m = (-2.5, 0, 2.5), w ~ Dirichlet(1, 1, 1), sigma ~ HalfNormal(2), written with
    MixtureSameFamily. Exact: 3-d grid on (log w_1/w_3, log w_2/w_3, log sigma)."""
    import pyro
    import pyro.distributions as dist

    rng = np.random.default_rng(36)
    locs = np.array([-2.5, 0.0, 2.5])
    y = locs[rng.choice(3, n, p=[0.5, 0.3, 0.2])] + 0.8 * rng.standard_normal(n)
    lt, yt = _t(locs), _t(y)

    def model(y):
        w = pyro.sample("w", dist.Dirichlet(torch.ones(3)))
        sigma = pyro.sample("sigma", dist.HalfNormal(_t(2.0)))
        with pyro.plate("data", len(y)):
            mix = dist.MixtureSameFamily(dist.Categorical(w), dist.Normal(lt, sigma))
            pyro.sample("y", mix, obs=y)

    def weights(u):
        return torch.softmax(torch.cat([u[:, :2], torch.zeros_like(u[:, :1])], 1), 1)

    def log_density(u):
        w, ls = weights(u), u[:, 2:]
        comp = -0.5 * ((yt[None, :, None] - lt) / ls.exp()[..., None]) ** 2 - ls[..., None]
        lik = torch.logsumexp(comp + w.log()[:, None, :], -1).sum(-1) - 0.5 * n * math.log(2 * math.pi)
        # Dirichlet(1, 1, 1) density 2; half-normal 2 N(0, 4); the Jacobians
        prior = 2 * math.log(2.0) + normal_lp(ls[:, 0].exp(), 2.0) + ls[:, 0] + w.log().sum(-1)
        return lik + prior

    funcs = {"w": weights, "sigma": lambda u: u[:, 2].exp()}
    sites, log_z = grid_moments(log_density, [0.9, 0.4, -0.2], funcs, num=81, width=16.0)
    return ds.Target.from_pyro(model, yt), dict(sites=sites, log_z=log_z)


# ----------------------------------------------------------------------------- closed forms
def lkj_correlation(n: int = 40, eta: float = 2.0):
    """Standardised 3-d data y_i ~ MVN(0, L L^T), L ~ LKJCholesky(3, 2). Exact: a grid over the
    three correlations (161^3 points on (-1, 1)^3, LKJ density det(R)^(eta - 1)), mapped to L."""
    import pyro
    import pyro.distributions as dist

    rng = np.random.default_rng(37)
    r_true = np.array([[1.0, 0.6, -0.3], [0.6, 1.0, 0.1], [-0.3, 0.1, 1.0]])
    y = rng.standard_normal((n, 3)) @ np.linalg.cholesky(r_true).T

    def model(y):
        chol = pyro.sample("L", dist.LKJCholesky(3, _t(eta)))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.MultivariateNormal(torch.zeros(3), scale_tril=chol), obs=y)

    s = y.T @ y
    g = np.linspace(-1, 1, 161)[1:-1]
    a, b, c = np.meshgrid(g, g, g, indexing="ij")  # r12, r13, r23
    det = 1 - a**2 - b**2 - c**2 + 2 * a * b * c
    ok = det > 0
    a, b, c, det = a[ok], b[ok], c[ok], det[ok]
    adj = (  # tr(adj(R) S): R^-1 = adj(R) / det(R)
        (1 - c**2) * s[0, 0]
        + (1 - b**2) * s[1, 1]
        + (1 - a**2) * s[2, 2]
        + 2 * (b * c - a) * s[0, 1]
        + 2 * (a * c - b) * s[0, 2]
        + 2 * (a * b - c) * s[1, 2]
    )
    log_w = (eta - 1 - n / 2) * np.log(det) - 0.5 * adj / det
    l11 = np.sqrt(1 - a**2)
    l21 = (c - a * b) / l11
    entries = np.zeros((a.size, 9))
    entries[:, 0], entries[:, 3], entries[:, 4] = 1.0, a, l11
    entries[:, 6], entries[:, 7], entries[:, 8] = b, l21, np.sqrt(np.maximum(1 - b**2 - l21**2, 0))
    m, sd = mixture_moments(log_w, entries, np.zeros_like(entries))
    sd[[0, 1, 2, 5]] = 0.0  # constant entries, not scored
    return ds.Target.from_pyro(model, _t(y)), dict(sites={"L": (m, sd)})


def change_point(years: int = 70, a: float = 1.0, b: float = 1.0):
    """Poisson counts with one change of rate, the switch year marginalised by logsumexp (coal-
    mining style): y_t ~ Poisson(early if t < s else late), s uniform on 1..69, early, late ~
    Gamma(1, 1). Exact: given s the rates are conjugate Gammas; a mixture over s."""
    import pyro
    import pyro.distributions as dist

    rng = np.random.default_rng(38)
    t = np.arange(years)
    y = rng.poisson(np.where(t < 40, 3.0, 1.0)).astype(float)
    switch = torch.arange(1, years)

    def model(y):
        early = pyro.sample("early", dist.Gamma(_t(a), b))
        late = pyro.sample("late", dist.Gamma(_t(a), b))
        before = torch.arange(len(y)) < switch[:, None]  # (switch, year)
        rates = torch.where(before, early, late)
        log_lik = dist.Poisson(rates).log_prob(y).sum(-1)
        pyro.factor("y", torch.logsumexp(log_lik, -1) - math.log(len(switch)))

    s1 = np.cumsum(y)[:-1]  # counts before each switch s = 1..years-1
    n1 = np.arange(1, years)
    s2, n2 = y.sum() - s1, years - n1
    ae, be, al, bl = a + s1, b + n1, a + s2, b + n2
    from scipy.special import gammaln

    log_w = gammaln(ae) - ae * np.log(be) + gammaln(al) - al * np.log(bl)
    m, sd = mixture_moments(log_w, np.c_[ae / be, al / bl], np.c_[ae / be**2, al / bl**2])
    sites = {"early": (m[0], sd[0]), "late": (m[1], sd[1])}
    log_prior = 2 * (a * math.log(b) - gammaln(a))  # the Gamma priors' normalisers
    log_z = log_mass(log_w, 1.0 / len(switch)) + log_prior - gammaln(y + 1).sum()
    return ds.Target.from_pyro(model, _t(y)), dict(sites=sites, log_z=log_z)


THIRD_ROUND = {
    "radon_c": radon_centred,
    "ar1_latent": ar1_latent,
    "ordered_logit": ordered_logistic,
    "negbin": negbin_regression,
    "weibull_cens": weibull_censored,
    "mixture_w": mixture_weights,
    "lkj3": lkj_correlation,
    "change_point": change_point,
}


def check_against_the_target(
    names=("change_point", "weibull_cens", "negbin", "ordered_logit", "mixture_w", "lkj3"),
):
    """The exact answers above against the same grid quadrature of the package's own density of
    each model (its unconstrained coordinates, ``Target.log_prob``, constrained by
    ``Target.constrain``): the largest mean difference in sds, sd ratio and log Z difference. Both
    sides agreeing checks the hand-written densities and the Pyro models against each other."""
    print("| case | max mean diff (sd) | max sd diff | log Z exact | log Z diff |")
    print("| --- | --- | --- | --- | --- |")
    for name in names:
        target, exact = THIRD_ROUND[name]()
        start = target.unconstrain(
            {k: _t(np.reshape(m, (1, *target.sites[k].shape))) for k, (m, _) in exact["sites"].items()}
        )
        funcs = {k: (lambda u, k=k, t=target: t.constrain(u)[k].reshape(len(u), -1)) for k in exact["sites"]}
        num, width = {2: (161, 32.0), 3: (61, 20.0), 4: (25, 16.0)}[target.dim]
        sites, log_z = grid_moments(target.log_prob, start.reshape(-1), funcs, num=num, width=width)
        diffs = []
        for k, (m, sd) in sites.items():
            em, es = (np.ravel(v) for v in exact["sites"][k])
            keep = es > 0
            em, es = em[keep], es[keep]
            diffs.append((np.max(np.abs(em - m[keep]) / sd[keep]), np.max(np.abs(es / sd[keep] - 1))))
        dm, ds_ = np.max(diffs, 0)
        lz = exact.get("log_z", float("nan"))
        print(f"| {name} | {dm:.1e} | {ds_:.1e} | {lz:.4f} | {log_z - lz:.1e} |", flush=True)


if __name__ == "__main__":
    check_against_the_target()
