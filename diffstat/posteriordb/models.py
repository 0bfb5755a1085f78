r"""Pyro ports of the posteriordb Stan models, written to batch over particles.

Every model reproduces its Stan program's log-density in the constrained parameters, up to a
constant: same priors, same likelihood, same transformed data. Site names are the Stan parameter
names (``beta`` of shape ``(D,)``, ``sigma``, ``theta1``...), so ``beta[2]`` of the reference is
``beta[1]`` of the site.

Stan's improper flat priors. Pyro cannot sample an improper prior, and the tempering methods start
from the prior. A parameter that is flat in Stan is therefore drawn from a wide, proper *reference*
:math:`\rho` (a normal in its unconstrained coordinate, scaled from the data, never from the
reference posterior), and a ``pyro.factor`` named ``"<site>_flat"`` adds :math:`-\log\rho(z)`, so the
model's joint density is exactly Stan's. Consequences: the posterior is Stan's; the target's
``log_prior`` is the proper reference; its ``log_likelihood`` is the Stan likelihood minus
:math:`\log\rho`, and likelihood tempering follows :math:`\rho^{1-\beta}\pi^{\beta}`.

Truncated priors on constrained parameters (``sigma ~ cauchy(0, 2.5)`` with ``<lower=0>``) are the
half distributions, which differ from Stan's unnormalised density by a constant.

Each builder takes the data set (name -> float64 array) and returns ``(model, args)``: the Stan
transformed data are computed here, in numpy, and the model runs ``model(*args)``.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from diffstat.posteriordb.references import Pushforward, flat

__all__ = ["BUILDERS", "Pushforward", "flat", "forward_log_lik", "linear_recurrence"]

#: Width (in its unconstrained coordinate) of the reference drawn for a flat parameter, in units of
#: the data scale: 10 data scales is wide for every regression of the suite.
FLAT_WIDTH = 10.0


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


# ---------------------------------------------------------------------- linear regressions
def linear_regression(X, y, beta_scale, log_sd_y, sigma_prior: str):
    """``y ~ normal(X beta, sigma)``, ``beta`` flat; ``sigma`` flat on (0, inf) or half-Cauchy(0, 2.5)."""
    beta = flat("beta", torch.zeros_like(beta_scale), beta_scale, event_dim=1)
    if sigma_prior == "flat":
        sigma = flat("sigma", log_sd_y, torch.full_like(log_sd_y, 2.0), constraints.positive)
    else:
        sigma = pyro.sample("sigma", dist.HalfCauchy(torch.tensor(2.5)))
    loc = beta @ X.T
    pyro.sample("y", dist.Normal(loc, sigma[..., None].expand(loc.shape)).to_event(1), obs=y)


def _regression(y, columns, sigma_prior="flat"):
    """Builder output for a regression with an intercept and the given predictor columns."""
    X = np.column_stack([np.ones_like(y)] + list(columns))
    rms = lambda a: np.sqrt(np.mean(a**2))
    beta_scale = FLAT_WIDTH * rms(y) / np.array([rms(c) for c in X.T])
    return linear_regression, (_t(X), _t(y), _t(beta_scale), _t(np.log(np.std(y))), sigma_prior)


def _sd(a):
    return np.std(a, ddof=1)  # Stan's sd()


def _earnings(d, kind):
    h, m, e = d["height"], d["male"], d["earn"]
    if kind == "earn_height":
        return _regression(e, [h])
    y = np.log10(e) if kind == "log10earn_height" else np.log(e)
    z = (h - h.mean()) / _sd(h)
    cols = {
        "log10earn_height": [h],
        "logearn_height": [h],
        "logearn_height_male": [h, m],
        "logearn_interaction": [h, m, h * m],
        "logearn_interaction_z": [z, m, z * m],
        "logearn_logheight_male": [np.log(h), m],
    }[kind]
    return _regression(y, cols)


def _kidiq(d, kind):
    y, hs, iq = d["kid_score"], d["mom_hs"], d["mom_iq"]
    if kind == "kidscore_momhs":
        return _regression(y, [hs], "half_cauchy")
    if kind == "kidscore_momiq":
        return _regression(y, [iq], "half_cauchy")
    if kind == "kidscore_momhsiq":
        return _regression(y, [hs, iq], "half_cauchy")
    if kind == "kidscore_interaction":
        return _regression(y, [hs, iq, hs * iq], "half_cauchy")
    if kind == "kidscore_mom_work":
        w = d["mom_work"]
        return _regression(y, [(w == 2) * 1.0, (w == 3) * 1.0, (w == 4) * 1.0])
    a, b = {
        "kidscore_interaction_c": (hs - hs.mean(), iq - iq.mean()),
        "kidscore_interaction_c2": (hs - 0.5, iq - 100),
        "kidscore_interaction_z": ((hs - hs.mean()) / (2 * _sd(hs)), (iq - iq.mean()) / (2 * _sd(iq))),
    }[kind]
    return _regression(y, [a, b, a * b])


def _mesquite(d, kind):
    d1, d2, ch, th, de, g, w = (
        d[k] for k in ("diam1", "diam2", "canopy_height", "total_height", "density", "group", "weight")
    )
    if kind == "mesquite":
        return _regression(w, [d1, d2, ch, th, de, g])
    lcv, lca, lcs = np.log(d1 * d2 * ch), np.log(d1 * d2), np.log(d1 / d2)
    cols = {
        "logmesquite": [np.log(d1), np.log(d2), np.log(ch), np.log(th), np.log(de), g],
        "logmesquite_logva": [lcv, lca, g],
        "logmesquite_logvas": [lcv, lca, lcs, np.log(th), np.log(de), g],
        "logmesquite_logvash": [lcv, lca, lcs, np.log(th), g],
        "logmesquite_logvolume": [lcv],
    }[kind]
    return _regression(np.log(w), cols)


def _nes(d):
    age = d["age_discrete"]
    cols = [
        d["real_ideo"],
        d["race_adj"],
        (age == 2) * 1.0,
        (age == 3) * 1.0,
        (age == 4) * 1.0,
        d["educ1"],
        d["gender"],
        d["income"],
    ]
    return _regression(d["partyid7"], cols)


def blr(X, y):
    """sblri-blr: ``beta ~ normal(0, 10)``, ``sigma ~ normal(0, 10)`` on (0, inf)."""
    beta = pyro.sample("beta", dist.Normal(torch.zeros(X.shape[1]), 10.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(10.0)))
    loc = beta @ X.T
    pyro.sample("y", dist.Normal(loc, sigma[..., None].expand(loc.shape)).to_event(1), obs=y)


def kilpisjarvi(x, y, prior, log_sd_y):
    """``alpha ~ normal(pmualpha, psalpha)``, ``beta ~ normal(pmubeta, psbeta)``, ``sigma`` flat."""
    alpha = pyro.sample("alpha", dist.Normal(prior[0], prior[1]))
    beta = pyro.sample("beta", dist.Normal(prior[2], prior[3]))
    sigma = flat("sigma", log_sd_y, torch.full_like(log_sd_y, 2.0), constraints.positive)
    loc = alpha[..., None] + beta[..., None] * x
    pyro.sample("y", dist.Normal(loc, sigma[..., None].expand(loc.shape)).to_event(1), obs=y)


# ---------------------------------------------------------------------- time series
def linear_recurrence(a: torch.Tensor, b: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """``x[t] = a[t] x[t-1] + b[t]`` from ``x[0] = x0``: ``a, b: (..., T-1)``, ``x0: (...)`` ->
    ``(..., T)``, by a parallel prefix scan of the affine maps (log2 T steps instead of a loop of T,
    the same products, no division)."""
    shift, length = 1, a.shape[-1]
    while shift < length:
        b = torch.cat([b[..., :shift], a[..., shift:] * b[..., :-shift] + b[..., shift:]], -1)
        a = torch.cat([a[..., :shift], a[..., shift:] * a[..., :-shift]], -1)
        shift *= 2
    return torch.cat([x0[..., None], a * x0[..., None] + b], -1)


def garch11(y, sigma1, log_var_y, mu_scale):
    """GARCH(1, 1): ``sigma[t]^2 = alpha0 + alpha1 (y[t-1] - mu)^2 + beta1 sigma[t-1]^2``; flat priors
    on ``mu``, ``alpha0 > 0``, ``alpha1`` in (0, 1), ``beta1`` in (0, 1 - alpha1)."""
    mu = flat("mu", torch.zeros_like(mu_scale), mu_scale)
    alpha0 = flat("alpha0", log_var_y, torch.full_like(log_var_y, 2.0), constraints.positive)
    alpha1 = pyro.sample("alpha1", dist.Uniform(0.0, 1.0))
    upper = 1.0 - alpha1
    beta1 = pyro.sample("beta1", dist.Uniform(torch.zeros_like(upper), upper))
    pyro.factor("beta1_flat", torch.log(upper))  # Uniform(0, 1 - alpha1) has density 1 / (1 - alpha1)
    shocks = alpha0[..., None] + alpha1[..., None] * (y[:-1] - mu[..., None]) ** 2
    var = linear_recurrence(beta1[..., None].expand(shocks.shape), shocks, (sigma1**2).expand(mu.shape))
    sigma = var.sqrt()
    pyro.sample("y", dist.Normal(mu[..., None].expand(sigma.shape), sigma).to_event(1), obs=y)


def arma11(y):
    """ARMA(1, 1) with ``err[0] = 0``; ``mu ~ normal(0, 10)``, ``phi, theta ~ normal(0, 2)``,
    ``sigma ~ cauchy(0, 2.5)`` on (0, inf)."""
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0), 10.0))
    phi = pyro.sample("phi", dist.Normal(torch.tensor(0.0), 2.0))
    theta = pyro.sample("theta", dist.Normal(torch.tensor(0.0), 2.0))
    sigma = pyro.sample("sigma", dist.HalfCauchy(torch.tensor(2.5)))
    drive = y[1:] - mu[..., None] - phi[..., None] * y[:-1]
    err = linear_recurrence(-theta[..., None].expand(drive.shape), drive, y[0] - (mu + phi * mu))
    scale = sigma[..., None].expand(err.shape)
    pyro.sample("err", dist.Normal(torch.zeros_like(err), scale).to_event(1), obs=err)


# ---------------------------------------------------------------------- hidden Markov models
def forward_log_lik(log_theta: torch.Tensor, log_emission: torch.Tensor) -> torch.Tensor:
    r"""The forward algorithm, :math:`\log \sum_z p(y_1 \mid z_1) \prod_{t>1} \theta_{z_{t-1} z_t}
    p(y_t \mid z_t)`, with Stan's start (no initial distribution: ``gamma[1, k]`` is the first
    emission). The N - 1 transition-times-emission matrices are multiplied in the (logsumexp, +)
    semiring by a pairwise tree: log2 N rounds of batched ops instead of a loop of N.
    ``log_theta: (..., K, K)`` (row = from), ``log_emission: (..., N, K)`` -> ``(...,)``."""
    mats = log_theta[..., None, :, :] + log_emission[..., 1:, None, :]  # (..., N-1, K, K): step t
    while mats.shape[-3] > 1:  # multiply neighbours in the (logsumexp, +) semiring, in order
        odd = mats[..., -1:, :, :] if mats.shape[-3] % 2 else None
        left, right = mats[..., 0:-1:2, :, :], mats[..., 1::2, :, :]
        mats = torch.logsumexp(left[..., :, :, None] + right[..., None, :, :], dim=-2)
        mats = mats if odd is None else torch.cat([mats, odd], -3)
    gamma = torch.logsumexp(log_emission[..., 0, :, None] + mats[..., 0, :, :], dim=-2)
    return torch.logsumexp(gamma, dim=-1)


def _ordered(name, support, loc, means):
    """An ordered vector with Stan's ``normal(means[k], 1)`` on each component (restricted to the
    ordered set): a reference times the factor prior / reference. The reference is a standard
    normal in the unconstrained coordinates: Pyro's positive-ordered map nests two exponentials
    (``exp(x0 + exp(x1))``), and a wider one overflows to inf at a few of 1,000 draws."""
    base = dist.Normal(loc, 1.0).to_event(1)
    ref = Pushforward(base, support)
    z = pyro.sample(name, ref)
    pyro.factor(f"{name}_prior", dist.Normal(means, 1.0).log_prob(z).sum(-1) - ref.log_prob(z))
    return z


def hmm_example(y):
    """Two-state HMM, ``y[t] ~ normal(mu[z_t], 1)``, flat simplex rows, ``mu`` positive ordered with
    ``mu[1] ~ normal(3, 1)``, ``mu[2] ~ normal(10, 1)``; the states are summed out."""
    theta1 = pyro.sample("theta1", dist.Dirichlet(torch.ones(2)))
    theta2 = pyro.sample("theta2", dist.Dirichlet(torch.ones(2)))
    mu = _ordered("mu", constraints.positive_ordered_vector, torch.zeros(2), torch.tensor([3.0, 10.0]))
    log_theta = torch.stack([theta1, theta2], -2).log()
    log_em = dist.Normal(mu[..., None, :], 1.0).log_prob(y[:, None])
    pyro.factor("y_forward", forward_log_lik(log_theta, log_em))


def hmm_drive(u, v, alpha, tau, rho, emission: str):
    """bball drive HMMs: Dirichlet rows ``theta[k] ~ dirichlet(alpha[k])``; ``phi``, ``lambda``
    ordered (``exponential``: positive ordered rates; ``normal``: ordered means, sds tau and rho)
    with ``normal(0, 1)``, ``normal(3, 1)`` priors on their components."""
    theta1 = pyro.sample("theta1", dist.Dirichlet(alpha[0]))
    theta2 = pyro.sample("theta2", dist.Dirichlet(alpha[1]))
    support = constraints.positive_ordered_vector if emission == "exponential" else constraints.ordered_vector
    means = torch.tensor([0.0, 3.0])
    phi = _ordered("phi", support, torch.zeros(2), means)
    lam = _ordered("lambda", support, torch.zeros(2), means)
    log_theta = torch.stack([theta1, theta2], -2).log()
    phi, lam = phi[..., None, :], lam[..., None, :]
    if emission == "exponential":
        # a rate that overflowed to inf (an exp of an exp) held at the largest float: -inf, not NaN
        big = torch.finfo(phi.dtype).max
        log_em = dist.Exponential(phi.clamp(max=big)).log_prob(u[:, None])
        log_em = log_em + dist.Exponential(lam.clamp(max=big)).log_prob(v[:, None])
    else:
        log_em = dist.Normal(phi, tau).log_prob(u[:, None]) + dist.Normal(lam, rho).log_prob(v[:, None])
    pyro.factor("uv_forward", forward_log_lik(log_theta, log_em))


# ---------------------------------------------------------------------- Gaussian process
def gp_regr(x, y):
    """``y ~ multi_normal(0, K)``, ``K = alpha^2 exp(-(x_i - x_j)^2 / (2 rho^2)) + sigma I`` (Stan adds
    ``sigma``, not its square); ``rho ~ gamma(25, 4)``, ``alpha ~ normal(0, 2)``, ``sigma ~ normal(0, 1)``."""
    rho = pyro.sample("rho", dist.Gamma(torch.tensor(25.0), 4.0))
    alpha = pyro.sample("alpha", dist.HalfNormal(torch.tensor(2.0)))
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(1.0)))
    sq = (x[:, None] - x[None, :]) ** 2
    a, r, s = (p[..., None, None] for p in (alpha, rho, sigma))
    cov = a**2 * torch.exp(-sq / (2 * r**2)) + s * torch.eye(x.shape[0])
    # A kernel matrix that is numerically not positive definite is outside the support, as Stan
    # rejects such a proposal: log-density -inf there (identity factor to keep the graph finite).
    tril, info = torch.linalg.cholesky_ex(cov)
    bad = info != 0
    eye = torch.eye(x.shape[0], dtype=cov.dtype)
    tril = torch.where(bad[..., None, None], eye, tril)
    pyro.sample("y", dist.MultivariateNormal(torch.zeros_like(y), scale_tril=tril), obs=y)
    pyro.factor("y_not_positive_definite", torch.where(bad, -torch.inf, 0.0))


# ---------------------------------------------------------------------- the table
def _scalar(d, k):
    return _t(float(np.asarray(d[k]).reshape(-1)[0]))


BUILDERS = {
    **{
        k: (lambda d, k=k: _earnings(d, k))
        for k in (
            "earn_height",
            "log10earn_height",
            "logearn_height",
            "logearn_height_male",
            "logearn_interaction",
            "logearn_interaction_z",
            "logearn_logheight_male",
        )
    },
    **{
        k: (lambda d, k=k: _kidiq(d, k))
        for k in (
            "kidscore_interaction",
            "kidscore_momhs",
            "kidscore_momhsiq",
            "kidscore_momiq",
            "kidscore_interaction_c",
            "kidscore_interaction_c2",
            "kidscore_interaction_z",
            "kidscore_mom_work",
        )
    },
    **{
        k: (lambda d, k=k: _mesquite(d, k))
        for k in (
            "mesquite",
            "logmesquite",
            "logmesquite_logva",
            "logmesquite_logvas",
            "logmesquite_logvash",
            "logmesquite_logvolume",
        )
    },
    "nes": _nes,
    "blr": lambda d: (blr, (_t(d["X"]), _t(d["y"]))),
    "kilpisjarvi": lambda d: (
        kilpisjarvi,
        (
            _t(d["x"]),
            _t(d["y"]),
            _t([float(d[k]) for k in ("pmualpha", "psalpha", "pmubeta", "psbeta")]),
            _t(np.log(np.std(d["y"]))),
        ),
    ),
    "garch11": lambda d: (
        garch11,
        (
            _t(d["y"]),
            _scalar(d, "sigma1"),
            _t(np.log(np.var(d["y"]))),
            _t(FLAT_WIDTH * np.sqrt(np.mean(d["y"] ** 2))),
        ),
    ),
    "arma11": lambda d: (arma11, (_t(d["y"]),)),
    "hmm_example": lambda d: (hmm_example, (_t(d["y"]),)),
    "hmm_drive_0": lambda d: (
        hmm_drive,
        (_t(d["u"]), _t(d["v"]), _t(d["alpha"]), _t(1.0), _t(1.0), "exponential"),
    ),
    "hmm_drive_1": lambda d: (
        hmm_drive,
        (_t(d["u"]), _t(d["v"]), _t(d["alpha"]), _scalar(d, "tau"), _scalar(d, "rho"), "normal"),
    ),
    "gp_regr": lambda d: (gp_regr, (_t(d["x"]), _t(d["y"]))),
}
