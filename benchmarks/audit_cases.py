"""The audit's cases (``benchmarks/bench_audit.py``, ``docs/audit.md``): targets that no test or
benchmark uses, each with its exact answer: closed forms for the torch targets; for Eight Schools the
posterior given tau is Gaussian, so its moments are a 1-d quadrature over tau; the Gamma/Dirichlet
Pyro model is conjugate; the GLMs have none (``bench_audit.nuts_reference``).

``CASES[name]()`` returns ``(target, exact)``; ``exact`` holds ``mean`` and ``sd`` arrays (torch
targets), or ``sites``: name -> (means, sds), and where known ``log_z``, mode ``weights`` and ``assign``.
The third round's Pyro models are in ``audit_cases_pyro.py``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

import diffstat as ds
from audit_cases_pyro import THIRD_ROUND
from audit_cases_sixth_a import SIXTH_A
from audit_cases_sixth_b import SIXTH_B
from diffstat.targets import GaussianMixture, narrow_wide

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


# ----------------------------------------------------------------------------- second round
def ring(radius: float = 5.0, width: float = 0.2, dtype=F64):
    """A 2-d ring: log p = -(|x| - r)^2 / (2 w^2), normalised by its exact log Z (the mass below
    r = 0 is under 1e-100): Z = 2 pi r w sqrt(2 pi); E x = 0, E x_1^2 = (r^2 + 3 w^2) / 2."""

    def log_prob(x):
        return -0.5 * ((x.norm(dim=-1) - radius) / width) ** 2

    sd = math.sqrt((radius**2 + 3 * width**2) / 2)
    log_z = math.log(2 * math.pi * radius * width * math.sqrt(2 * math.pi))
    return ds.Target(log_prob, 2, dtype=dtype), dict(mean=np.zeros(2), sd=np.full(2, sd), log_z=log_z)


def laplace(dim: int = 4, dtype=F64):
    """Independent standard Laplace coordinates (a kink at 0), normalised: sd sqrt(2), log Z 0."""

    def log_prob(x):
        return -x.abs().sum(-1) - dim * math.log(2.0)

    return ds.Target(log_prob, dim, dtype=dtype), dict(
        mean=np.zeros(dim), sd=np.full(dim, math.sqrt(2.0)), log_z=0.0
    )


def log_gamma_1d(shape: float = 3.0, dtype=F64):
    """One dimension: x = log g, g ~ Gamma(shape, 1); mean digamma(shape), sd sqrt(trigamma), log Z 0."""
    from scipy.special import polygamma

    def log_prob(x):
        return (shape * x - x.exp()).sum(-1) - math.lgamma(shape)

    mean, var = float(polygamma(0, shape)), float(polygamma(1, shape))
    return ds.Target(log_prob, 1, dtype=dtype), dict(
        mean=np.array([mean]), sd=np.array([var**0.5]), log_z=0.0
    )


def correlated_2d(rho: float = 0.995, scales=(1.0, 100.0), dtype=F64):
    """A 2-d Gaussian with correlation ``rho`` and sds ``scales`` (a ridge at 1:100), log Z 0."""
    cov = torch.tensor(
        [[scales[0] ** 2, rho * scales[0] * scales[1]], [rho * scales[0] * scales[1], scales[1] ** 2]],
        dtype=F64,
    )
    prec = torch.linalg.inv(cov)
    const = -math.log(2 * math.pi) - 0.5 * math.log(float(torch.det(cov)))

    def log_prob(x):
        return const - 0.5 * ((x @ prec.to(x.dtype)) * x).sum(-1)

    return ds.Target(log_prob, 2, dtype=dtype), dict(mean=np.zeros(2), sd=np.array(scales), log_z=0.0)


def symmetric_modes():
    """0.5 N((-4, 0), I) + 0.5 N((4, 0), I): two equal modes 8 sds apart, log Z 0."""
    means = torch.tensor([[-4.0, 0.0], [4.0, 0.0]], dtype=F64)
    return mixture_case(GaussianMixture(means, [0.5, 0.5], scales=[1.0, 1.0], log_normalizer=0.0))


def beta_boundary():
    """Pyro: p ~ Beta(0.5, 0.5) with 0 successes in 3 Bernoulli trials: Beta(0.5, 3.5), mass piled
    at the boundary 0 (mean 1/8, sd 0.148)."""
    import pyro
    import pyro.distributions as dist

    def model(y):
        p = pyro.sample("p", dist.Beta(torch.tensor(0.5, dtype=F64), torch.tensor(0.5, dtype=F64)))
        with pyro.plate("trials", y.shape[0]):
            pyro.sample("y", dist.Bernoulli(p), obs=y)

    a, b = 0.5, 3.5
    sd = math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
    y = torch.zeros(3, dtype=F64)
    return ds.Target.from_pyro(model, y), dict(sites={"p": (np.array(a / (a + b)), np.array(sd))})


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
    "ring": ring,
    "laplace4": lambda: laplace(4),
    "log_gamma1": log_gamma_1d,
    "ridge2": correlated_2d,
    "sym_modes": symmetric_modes,
    "beta_boundary": beta_boundary,
    **THIRD_ROUND,
    **SIXTH_A,
    **SIXTH_B,
}
