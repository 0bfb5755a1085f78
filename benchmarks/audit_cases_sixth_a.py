"""Audit cases of the sixth round, set A (``docs/audit.md``): each entry maps a name to a function
returning ``(target, exact)`` as in ``audit_cases.py``.

Pyro models of real-posterior shape. Where there is no closed form or grid, the answers come from
Pyro's own NUTS (``pyro.infer.MCMC``, jit), independent of the package: ``python
benchmarks/audit_sixth_a_reference.py NAME [WARMUP DRAWS]`` runs 4 chains (seeds 0 to 3, one process,
chains in turn; 1000 warm-up and 2000 draws unless given) and prints the means and sds hard-coded
below, with the largest R-hat, the smallest bulk ESS (arviz) and the divergences. A model with a
``reference`` attribute is sampled in that equivalent parametrisation (the centred volatility
series through its non-centred innovations: the centred one gave R-hat 1.035 and 122 divergences).
"""

from __future__ import annotations

import math

import numpy as np
import torch

F64 = torch.float64


def _t(x):
    return torch.as_tensor(x, dtype=F64)


def _a(text: str) -> np.ndarray:
    return np.array(text.split(), dtype=float)


# ----------------------------------------------------------------------------- stochastic volatility
def _sv_model_data(steps: int = 40):
    import pyro
    import pyro.distributions as dist

    rng = np.random.default_rng(61)
    h = np.zeros(steps)
    h[0] = -1.0 + 0.3 / math.sqrt(1 - 0.9**2) * rng.standard_normal()
    for t in range(1, steps):
        h[t] = -1.0 + 0.9 * (h[t - 1] + 1.0) + 0.3 * rng.standard_normal()
    y = np.exp(h / 2) * rng.standard_normal(steps)
    off = _t(np.eye(steps, k=1) + np.eye(steps, k=-1))
    inner = _t(np.r_[0.0, np.ones(steps - 2), 0.0])

    def model(y):
        mu = pyro.sample("mu", dist.Normal(_t(0.0), 1.0))
        phi = pyro.sample("phi", dist.Uniform(_t(-1.0), 1.0))
        sigma = pyro.sample("sigma", dist.HalfNormal(_t(0.5)))
        # h_1 ~ N(mu, sigma / sqrt(1 - phi^2)), h_t ~ N(mu + phi (h_{t-1} - mu), sigma): the joint
        # Gaussian's precision is tridiagonal
        prec = (torch.diag(1 + phi**2 * inner) - phi * off) / sigma**2
        h = pyro.sample(
            "h", dist.MultivariateNormal(mu * torch.ones(steps, dtype=F64), precision_matrix=prec)
        )
        pyro.sample("y", dist.Normal(torch.zeros_like(h), torch.exp(h / 2)).to_event(1), obs=y)

    def noncentred(y):  # the same posterior, for the reference: h = mu + sigma AR(1) filter of z
        mu = pyro.sample("mu", dist.Normal(_t(0.0), 1.0))
        phi = pyro.sample("phi", dist.Uniform(_t(-1.0), 1.0))
        sigma = pyro.sample("sigma", dist.HalfNormal(_t(0.5)))
        z = pyro.sample("z", dist.Normal(torch.zeros(steps, dtype=F64), 1.0).to_event(1))
        h = [mu + sigma / torch.sqrt(1 - phi**2) * z[0]]
        for t in range(1, steps):
            h.append(mu + phi * (h[-1] - mu) + sigma * z[t])
        h = pyro.deterministic("h", torch.stack(h))
        pyro.sample("y", dist.Normal(torch.zeros_like(h), torch.exp(h / 2)).to_event(1), obs=y)

    model.reference = noncentred
    noncentred.deterministic = ["h"]
    return model, (_t(y),)


# python benchmarks/audit_sixth_a_reference.py sv 500 1000 (the non-centred series): max R-hat 1.0239, min
# bulk ESS 234, 149 divergent, so NOT a reference to 0.15 sd (the centred run, same settings, gave mu
# -1.342, sigma 0.379: 0.22 sd and 0.34 sd away; R-hat 1.035, ESS 102, 122 divergent)
SV_REF = {
    "mu": (-1.263, 0.3594),
    "phi": (-0.03892, 0.5721),
    "sigma": (0.3047, 0.2183),
    "h": (
        _a(
            "-1.449 -1.284 -1.454 -1.211 -1.392 -1.206 -1.441 -1.347 -1.406 -1.334 -1.403 -1.341 -1.245 "
            "-1.426 -1.168 -1.438 -1.244 -1.385 -1.076 -1.265 -1.306 -1.116 -1.379 -0.9762 -1.309 "
            "-1.241 -1.403 -1.106 -1.463 -1.253 -1.449 -1.298 -1.411 -1.241 -1.39 -1.239 -1.456 -1.257 "
            "-1.439 -1.216"
        ),
        _a(
            "0.5643 0.51 0.5545 0.4605 0.4939 0.455 0.5304 0.5221 0.5045 0.4661 0.5006 0.445 0.4398 "
            "0.5263 0.4721 0.5653 0.4835 0.5408 0.432 0.4742 0.4959 0.4405 0.5661 0.4474 0.4852 0.5156 "
            "0.5283 0.4415 0.5523 0.4913 0.5152 0.5232 0.533 0.4578 0.4937 0.4637 0.5382 0.5017 0.5504 "
            "0.4799"
        ),
    ),
}


def stochastic_volatility():
    """Stochastic volatility, centred: mu ~ N(0, 1), phi ~ U(-1, 1), sigma ~ HalfNormal(0.5), h an
    AR(1) about mu started at its stationary law, y_t ~ N(0, exp(h_t / 2)); 40 steps simulated with
    mu = -1, phi = 0.9, sigma = 0.3 (43 dimensions). Reference: Pyro NUTS (see the module)."""
    import diffstat as ds

    model, data = _sv_model_data()
    return ds.Target.from_pyro(model, *data), dict(sites=SV_REF)


# ----------------------------------------------------------------------------- horseshoe regression
def _horseshoe_model_data(n: int = 40, p: int = 10):
    import pyro
    import pyro.distributions as dist

    rng = np.random.default_rng(62)
    x = rng.standard_normal((n, p))
    beta = np.r_[2.0, -1.5, 1.0, np.zeros(p - 3)]
    y = x @ beta + rng.standard_normal(n)

    def model(x, y):
        sigma = pyro.sample("sigma", dist.HalfNormal(_t(1.0)))
        tau = pyro.sample("tau", dist.HalfCauchy(_t(0.1)))
        with pyro.plate("coefs", p):
            lam = pyro.sample("lambda", dist.HalfCauchy(_t(1.0)))
            z = pyro.sample("z", dist.Normal(_t(0.0), 1.0))
        beta = pyro.deterministic("beta", z * tau * lam)
        pyro.sample("y", dist.Normal(x @ beta, sigma).to_event(1), obs=y)

    return model, (_t(x), _t(y))


HORSESHOE_REF = None


def horseshoe():
    """Sparse linear regression with the horseshoe prior, non-centred: n = 40, p = 10, true
    coefficients (2, -1.5, 1, 0, ...), sigma ~ HalfNormal(1), beta_j = z_j tau lambda_j, z ~ N(0, 1),
    lambda ~ HalfCauchy(1), tau ~ HalfCauchy(0.1) (22 dimensions). Scored on sigma, z and the mean of
    tau (lambda's posterior sd is infinite, tau's heavy-tailed). Reference: Pyro NUTS."""
    import diffstat as ds

    model, data = _horseshoe_model_data()
    return ds.Target.from_pyro(model, *data), dict(sites=HORSESHOE_REF)


# ----------------------------------------------------------------------------- by grid quadrature
def separation(n: int = 30):
    """Logistic regression, quasi-completely separated along x_1: y ~ Bernoulli(logit(b_0 + x b)),
    b_0, b_1..3 ~ N(0, 2.5^2); x_1 on the integers -2..2, y = 1 where x_1 > 0, 0 where x_1 < 0, a
    coin where x_1 = 0, so the likelihood is flat as b_1 goes to infinity and only the prior holds
    it. Exact: 4-d grid (``audit_exact.grid_moments``, 41 points an axis over +-10 sds)."""
    import pyro
    import pyro.distributions as dist

    import diffstat as ds
    from audit_exact import grid_moments, normal_lp

    rng = np.random.default_rng(63)
    x = np.c_[np.clip(np.round(1.2 * rng.standard_normal(n)), -2, 2), rng.standard_normal((n, 2))]
    y = np.where(x[:, 0] > 0, 1.0, np.where(x[:, 0] < 0, 0.0, rng.integers(0, 2, n)))
    xt, yt = _t(x), _t(y)

    def model(x, y):
        b0 = pyro.sample("b0", dist.Normal(_t(0.0), 2.5))
        b = pyro.sample("b", dist.Normal(torch.zeros(3, dtype=F64), 2.5).to_event(1))
        pyro.sample("y", dist.Bernoulli(logits=b0 + x @ b).to_event(1), obs=y)

    def log_density(u):
        eta = u[:, :1] + u[:, 1:] @ xt.T
        lik = (yt * eta - torch.nn.functional.softplus(eta)).sum(-1)
        return lik + normal_lp(u, 2.5).sum(-1)

    funcs = {"b0": lambda u: u[:, 0], "b": lambda u: u[:, 1:]}
    sites, log_z = grid_moments(log_density, [0.0, 3.0, 0.0, 0.0], funcs, num=41, width=10.0)
    return ds.Target.from_pyro(model, xt, yt), dict(sites=sites, log_z=log_z)


def robust_t(n: int = 50):
    """Robust regression with Student-t errors: y ~ StudentT(nu, a + b x, s), a, b ~ N(0, 5), s ~
    HalfNormal(2), nu ~ Gamma(2, 0.1); 50 points of y = 1 + 2 x + N(0, 0.5^2), three of them moved by
    +8, -10 and +12. Exact: 4-d grid on (a, b, log s, log nu), 41 points an axis over +-10 sds."""
    import pyro
    import pyro.distributions as dist

    import diffstat as ds
    from audit_exact import grid_moments, normal_lp

    rng = np.random.default_rng(64)
    x = rng.standard_normal(n)
    y = 1.0 + 2.0 * x + 0.5 * rng.standard_normal(n)
    y[:3] += [8.0, -10.0, 12.0]
    xt, yt = _t(x), _t(y)

    def model(x, y):
        a = pyro.sample("a", dist.Normal(_t(0.0), 5.0))
        b = pyro.sample("b", dist.Normal(_t(0.0), 5.0))
        s = pyro.sample("s", dist.HalfNormal(_t(2.0)))
        nu = pyro.sample("nu", dist.Gamma(_t(2.0), 0.1))
        pyro.sample("y", dist.StudentT(nu, a + b * x, s).to_event(1), obs=y)

    def log_density(u):
        a, b, ls, lnu = (u[:, i : i + 1] for i in range(4))
        s, nu = ls.exp(), lnu.exp()
        r = (yt - a - b * xt) / s
        lik = (
            torch.lgamma((nu + 1) / 2)
            - torch.lgamma(nu / 2)
            - 0.5 * torch.log(math.pi * nu)
            - ls
            - (nu + 1) / 2 * torch.log1p(r**2 / nu)
        ).sum(-1)
        prior = normal_lp(u[:, 0], 5.0) + normal_lp(u[:, 1], 5.0) + math.log(2.0) + normal_lp(s[:, 0], 2.0)
        prior = prior + 2 * math.log(0.1) + lnu[:, 0] - 0.1 * nu[:, 0]  # Gamma(2, 0.1); Gamma(2) = 1
        return lik + prior + ls[:, 0] + lnu[:, 0]  # the Jacobians

    funcs = {
        "a": lambda u: u[:, 0],
        "b": lambda u: u[:, 1],
        "s": lambda u: u[:, 2].exp(),
        "nu": lambda u: u[:, 3].exp(),
    }
    sites, log_z = grid_moments(
        log_density, [1.0, 2.0, math.log(0.5), math.log(3.0)], funcs, num=41, width=10.0
    )
    return ds.Target.from_pyro(model, xt, yt), dict(sites=sites, log_z=log_z)


def _gmix_model_data(n: int = 100):
    import pyro
    import pyro.distributions as dist

    rng = np.random.default_rng(65)
    first = rng.random(n) < 0.35
    y = np.where(first, -1.0 + 0.6 * rng.standard_normal(n), 2.0 + rng.standard_normal(n))

    def model(y):
        mu1 = pyro.sample("mu1", dist.Normal(_t(0.0), 5.0))
        delta = pyro.sample("delta", dist.HalfNormal(_t(5.0)))
        sigma = pyro.sample("sigma", dist.HalfNormal(_t(2.0)).expand([2]).to_event(1))
        w = pyro.sample("w", dist.Beta(_t(2.0), 2.0))
        one = dist.Normal(mu1, sigma[0]).log_prob(y) + torch.log(w)
        two = dist.Normal(mu1 + delta, sigma[1]).log_prob(y) + torch.log1p(-w)
        pyro.factor("y", torch.logsumexp(torch.stack([one, two]), 0).sum())

    return model, (_t(y),)


# python benchmarks/audit_sixth_a_reference.py gmix_ordered: 4 x 2000 after 1000,
# max R-hat 1.0040, min bulk ESS 739, 0 divergent
GMIX_REF = {
    "delta": (2.639, 0.3961),
    "mu1": (-0.7261, 0.3973),
    "sigma": (_a("0.8138 1.125"), _a("0.2726 0.2027")),
    "w": (0.3609, 0.1193),
}


def gmix_ordered():
    """Two-component normal mixture, the label marginalised by logsumexp, means ordered as mu_2 =
    mu_1 + delta: mu_1 ~ N(0, 5), delta ~ HalfNormal(5), sigma_1, sigma_2 ~ HalfNormal(2), w ~
    Beta(2, 2); 100 points of 0.35 N(-1, 0.6^2) + 0.65 N(2, 1). Reference: Pyro NUTS (a 5-d grid in
    the Laplace frame left 4.5e-3 of the mass on its edge: the posterior is far from Gaussian)."""
    import diffstat as ds

    model, data = _gmix_model_data()
    return ds.Target.from_pyro(model, *data), dict(sites=GMIX_REF)


# ----------------------------------------------------------------------------- conditionally Gaussian
def varying_slopes(groups: int = 8):
    """Varying intercepts and slopes, non-centred, independent: y_ij ~ N(a + s_a za_j + (b + s_b
    zb_j) x_ij, sigma), a, b ~ N(0, 5), za, zb ~ N(0, 1), s_a, s_b, sigma ~ HalfNormal(1); 8 groups of
    6 to 13 points (21 dimensions). Exact: given (s_a, s_b, sigma) the coefficients are Gaussian
    (``audit_exact.gaussian_given``, in the centred frame, za = alpha / s_a); quadrature over the
    three log scales (64 x 64 x 40 points)."""
    import pyro
    import pyro.distributions as dist

    import diffstat as ds
    from audit_exact import gaussian_given, log_mass, mixture_moments, normal_lp

    rng = np.random.default_rng(66)
    g = np.repeat(np.arange(groups), np.arange(6, 6 + groups))
    x = rng.standard_normal(g.size)
    alpha, beta = 0.7 * rng.standard_normal(groups), 0.4 * rng.standard_normal(groups)
    y = 1.0 + alpha[g] + (0.5 + beta[g]) * x + 0.8 * rng.standard_normal(g.size)
    gt, xt, yt = torch.as_tensor(g), _t(x), _t(y)

    def model(g, x, y):
        a = pyro.sample("a", dist.Normal(_t(0.0), 5.0))
        b = pyro.sample("b", dist.Normal(_t(0.0), 5.0))
        s_a = pyro.sample("s_a", dist.HalfNormal(_t(1.0)))
        s_b = pyro.sample("s_b", dist.HalfNormal(_t(1.0)))
        sigma = pyro.sample("sigma", dist.HalfNormal(_t(1.0)))
        with pyro.plate("groups", groups):
            za = pyro.sample("za", dist.Normal(_t(0.0), 1.0))
            zb = pyro.sample("zb", dist.Normal(_t(0.0), 1.0))
        mean = a + s_a * za[g] + (b + s_b * zb[g]) * x
        pyro.sample("y", dist.Normal(mean, sigma).to_event(1), obs=y)

    onehot = np.eye(groups)[g]
    design = np.c_[np.ones_like(x), x, onehot, onehot * x[:, None]]  # (a, b, alpha, beta)
    la, lb = np.linspace(-7.0, 1.5, 64), np.linspace(-7.0, 1.5, 64)
    ls = np.linspace(-0.9, 0.3, 40)
    la_, lb_ = [v.ravel() for v in np.meshgrid(la, lb, indexing="ij")]
    prec = np.zeros((la_.size, 2 + 2 * groups, 2 + 2 * groups))
    prec[:, 0, 0] = prec[:, 1, 1] = 1 / 25
    idx = np.arange(groups)
    prec[:, 2 + idx, 2 + idx] = np.exp(-2 * la_)[:, None]
    prec[:, 2 + groups + idx, 2 + groups + idx] = np.exp(-2 * lb_)[:, None]
    scale = np.c_[np.ones((la_.size, 2)), np.repeat(np.exp(np.c_[la_, lb_]), groups, 1)]
    parts = []
    for s in ls:
        mean, var, log_ev = gaussian_given(prec, design, y, np.full(la_.size, math.exp(2 * s)))
        log_w = log_ev + s + normal_lp(math.exp(s), 1.0)
        for lv in (la_, lb_):
            log_w = log_w + lv + normal_lp(np.exp(lv), 1.0)
        scales = np.c_[np.exp(la_), np.exp(lb_), np.full(la_.size, math.exp(s))]
        parts.append((log_w, np.c_[mean / scale, scales], np.c_[var / scale**2, 0 * scales]))
    log_w, means, var = (np.concatenate([p[i] for p in parts]) for i in range(3))
    m, sd = mixture_moments(log_w, means, var)
    k = 2 + groups
    sites = {"a": (m[0], sd[0]), "b": (m[1], sd[1]), "za": (m[2:k], sd[2:k])}
    sites.update({"zb": (m[k:-3], sd[k:-3]), "s_a": (m[-3], sd[-3]), "s_b": (m[-2], sd[-2])})
    sites["sigma"] = (m[-1], sd[-1])
    cell = (la[1] - la[0]) * (lb[1] - lb[0]) * (ls[1] - ls[0])
    log_z = log_mass(log_w, cell) + 3 * math.log(2.0)  # the half-normals' factor 2
    return ds.Target.from_pyro(model, gt, xt, yt), dict(sites=sites, log_z=log_z)


# ----------------------------------------------------------------------------- multinomial logit
def _softmax3_model_data(n: int = 80):
    import pyro
    import pyro.distributions as dist

    rng = np.random.default_rng(67)
    x = np.c_[np.ones(n), rng.standard_normal((n, 3))]
    coef = np.array([[0.5, 1.0, -0.5, 0.0], [-0.3, -0.8, 0.0, 1.2]])
    logits = np.c_[np.zeros(n), x @ coef.T]
    p = np.exp(logits - logits.max(1, keepdims=True))
    y = np.array([rng.choice(3, p=q / q.sum()) for q in p])

    def model(x, y):
        beta = pyro.sample("beta", dist.Normal(_t(0.0), 1.0).expand([2, 4]).to_event(2))
        logits = torch.cat([torch.zeros(len(y), 1, dtype=F64), x @ beta.T], -1)
        pyro.sample("y", dist.Categorical(logits=logits).to_event(1), obs=y)

    return model, (_t(x), torch.as_tensor(y))


SOFTMAX3_REF = None


def softmax3():
    """Multinomial logistic regression, 3 classes, the first the reference (its coefficients 0), an
    intercept and 3 predictors, beta ~ N(0, 1) (2 x 4, 8 dimensions); n = 80. Reference: Pyro NUTS."""
    import diffstat as ds

    model, data = _softmax3_model_data()
    return ds.Target.from_pyro(model, *data), dict(sites=SOFTMAX3_REF)


SIXTH_A: dict = {
    "sv": stochastic_volatility,
    "horseshoe": horseshoe,
    "separation": separation,
    "robust_t": robust_t,
    "gmix_ordered": gmix_ordered,
    "varying_slopes": varying_slopes,
    "softmax3": softmax3,
}
MODELS = {
    "sv": _sv_model_data,
    "horseshoe": _horseshoe_model_data,
    "softmax3": _softmax3_model_data,
    "gmix_ordered": _gmix_model_data,
}
NUTS_OPTIONS = {"horseshoe": dict(target_accept_prob=0.95)}
