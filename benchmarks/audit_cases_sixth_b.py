"""Audit cases of the sixth round, set B (``docs/audit.md``): each entry maps a name to a function
returning ``(target, exact)`` as in ``audit_cases.py``.

Set B is the geometry and scale a new user brings, written as plain log-density callables
(``ds.Target(log_prob, dim)``, no reference given): a posterior far from the origin, tiny scales,
scales over four decades, a bimodal hyperbolic ridge, skewed log-Gamma coordinates, a correlated
three-component mixture, heavy Student t tails, and a constraint written as ``-inf`` outside the
positive orthant. Every answer is exact by construction (closed forms; the ridge by quadrature on a
fine 2-d grid); none comes from the package.
"""

from __future__ import annotations

import math

import numpy as np
import torch

import diffstat as ds

F64 = torch.float64
LOG_2PI = math.log(2 * math.pi)


def _gaussian(mean, cov, log_z: float, dtype=F64):
    """The unnormalised N(mean, cov) density exp(log_z) N(x; mean, cov) and its exact answer."""
    mean = torch.as_tensor(mean, dtype=F64)
    cov = torch.as_tensor(cov, dtype=F64)
    prec = torch.linalg.inv(cov)
    dim = len(mean)
    const = log_z - 0.5 * dim * LOG_2PI - 0.5 * float(torch.logdet(cov))

    def log_prob(x):
        d = x - mean.to(x.dtype)
        return const - 0.5 * ((d @ prec.to(x.dtype)) * d).sum(-1)

    exact = dict(mean=mean.numpy(), sd=torch.diagonal(cov).sqrt().numpy(), log_z=log_z)
    return ds.Target(log_prob, dim, dtype=dtype), exact


def far_gauss():
    """N(m, I) in 5-d, m = 1000 (1, -1, 1, -1, 1), written unnormalised as -|x - m|^2 / 2 (a
    posterior far from the origin, as unstandardised data give): log Z = (5/2) log(2 pi)."""
    m = 1000.0 * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0], dtype=F64)

    def log_prob(x):
        return -0.5 * ((x - m.to(x.dtype)) ** 2).sum(-1)

    exact = dict(mean=m.numpy(), sd=np.ones(5), log_z=2.5 * LOG_2PI)
    return ds.Target(log_prob, 5, dtype=F64), exact


def tiny_scale():
    """A 3-d Gaussian with sds (1e-3, 2e-3, 5e-4), mean (0.5, -2, 3) and correlation 0.9 between the
    first two coordinates, unnormalised (exp(-Mahalanobis^2 / 2)): log Z = (3/2) log(2 pi) +
    (1/2) log det S = -18.797."""
    sd = torch.tensor([1e-3, 2e-3, 5e-4], dtype=F64)
    corr = torch.eye(3, dtype=F64)
    corr[0, 1] = corr[1, 0] = 0.9
    cov = sd[:, None] * corr * sd[None, :]
    log_z = 1.5 * LOG_2PI + 0.5 * float(torch.logdet(cov))
    return _gaussian([0.5, -2.0, 3.0], cov, log_z)


def scales200():
    """A 200-d independent Gaussian, mean 0, sds log-spaced from 1e-2 to 1e2, unnormalised:
    log Z = 100 log(2 pi) + sum log sd = 100 log(2 pi) (the log sds are symmetric about 0)."""
    sd = torch.logspace(-2, 2, 200, dtype=F64)

    def log_prob(x):
        return -0.5 * ((x / sd.to(x.dtype)) ** 2).sum(-1)

    log_z = 100 * LOG_2PI + float(torch.log(sd).sum())
    return ds.Target(log_prob, 200, dtype=F64), dict(mean=np.zeros(200), sd=sd.numpy(), log_z=log_z)


AB_Y, AB_NOISE = 1.5, 0.5


def _ab_log_joint(a, b):
    """log N(a; 0, 1) + log N(b; 0, 1) + log N(y; a b, 0.5^2) at y = 1.5."""
    r = (AB_Y - a * b) / AB_NOISE
    return -0.5 * (a**2 + b**2 + r**2) - 1.5 * LOG_2PI - math.log(AB_NOISE)


def ab_exact(num: int = 4001, width: float = 7.0) -> dict:
    """Moments and log evidence of the ``ab_ridge`` posterior by the trapezoid rule on a
    ``num`` x ``num`` grid over [-width, width]^2 (the prior puts under 1e-10 beyond 7); the mean is 0
    and the two branches a b > 0 with a + b of either sign have equal mass by the symmetry
    (a, b) -> (-a, -b)."""
    axis = np.linspace(-width, width, num)
    a, b = np.meshgrid(axis, axis, indexing="ij")
    lp = _ab_log_joint(a, b)
    w = np.exp(lp - lp.max())
    trap = np.ones(num)
    trap[[0, -1]] = 0.5
    w = w * trap[:, None] * trap[None, :]
    cell = (axis[1] - axis[0]) ** 2
    log_z = float(lp.max() + math.log(w.sum() * cell))
    w = w / w.sum()
    mean = np.array([(w * a).sum(), (w * b).sum()])
    sd = np.sqrt(np.array([(w * a**2).sum(), (w * b**2).sum()]) - mean**2)
    return dict(mean=np.zeros(2), sd=sd, log_z=log_z, grid_mean=mean)


def ab_ridge():
    """a, b ~ N(0, 1), y = 1.5 observed with y ~ N(a b, 0.5^2): the posterior lies on the two
    branches of the hyperbola a b = 1.5 (a bimodal curved ridge). Exact: quadrature (``ab_exact``):
    sd 1.2500 in each coordinate, log Z -2.4141 (a 2001-point grid over [-8, 8]^2 and 4e6
    importance draws from the prior agree); weights 0.5 and 0.5 by symmetry, a draw assigned by the
    sign of a + b."""

    def log_prob(x):
        return _ab_log_joint(x[..., 0], x[..., 1])

    exact = ab_exact()
    exact.pop("grid_mean")
    exact.update(weights=np.array([0.5, 0.5]), assign=lambda x: (x.sum(-1) > 0).long())
    return ds.Target(log_prob, 2, dtype=F64), exact


def lognormal5():
    """Five independent log-Gamma coordinates x_k = log g_k, g_k ~ Gamma(shape_k, 1), shapes (0.3,
    0.7, 1.5, 4, 10): left-skewed, the first very (its left tail decays like exp(0.3 x)); mean
    digamma(shape), sd sqrt(trigamma(shape)), log Z 0."""
    from scipy.special import polygamma

    shapes = torch.tensor([0.3, 0.7, 1.5, 4.0, 10.0], dtype=F64)
    const = -float(torch.lgamma(shapes).sum())

    def log_prob(x):
        return (shapes.to(x.dtype) * x - x.exp()).sum(-1) + const

    mean = polygamma(0, shapes.numpy())
    sd = np.sqrt(polygamma(1, shapes.numpy()))
    return ds.Target(log_prob, 5, dtype=F64), dict(mean=mean, sd=sd, log_z=0.0)


def _cov(sd, corr):
    sd = np.asarray(sd, dtype=float)
    return sd[:, None] * np.asarray(corr, dtype=float) * sd[None, :]


def _mix3_parts():
    """Weights, means and covariances of ``mix3_corr``: three components, sds 0.3 to 2, correlations
    up to 0.9 (an AR(1) pattern with 0.9, an equicorrelation of 0.6 and one pair at -0.9)."""
    ar = 0.9 ** np.abs(np.subtract.outer(np.arange(5), np.arange(5)))
    equi = np.full((5, 5), 0.6) + 0.4 * np.eye(5)
    neg = np.eye(5)
    neg[0, 4] = neg[4, 0] = -0.9
    neg[1, 2] = neg[2, 1] = 0.5
    covs = np.stack(
        [
            _cov([0.3, 0.5, 1.0, 1.5, 2.0], ar),
            _cov([2.0, 1.0, 0.5, 0.3, 1.0], equi),
            _cov([0.6, 1.2, 0.8, 2.0, 0.4], neg),
        ]
    )
    means = np.array(
        [
            [0.0, 0.0, 0.0, 0.0, 0.0],
            [4.0, -4.0, 3.0, 0.0, 2.0],
            [1.0, -1.0, 5.0, -4.0, -2.0],
        ]
    )
    return np.array([0.5, 0.3, 0.2]), means, covs


def mix3_corr():
    """0.5 N(m1, S1) + 0.3 N(m2, S2) + 0.2 N(m3, S3) in 5-d, each S correlated differently (sds 0.3
    to 2, correlations up to 0.9 in size), means 6.7 to 7.4 units apart, normalised (log Z 0).
    Exact: mean sum w_k m_k, variance sum w_k (S_k + m_k m_k^T) - mean mean^T, the weights; a draw is
    assigned to its most probable component (exact draws are misassigned at a rate under 1e-4)."""
    w, means, covs = _mix3_parts()
    comps = torch.distributions.MultivariateNormal(
        torch.as_tensor(means, dtype=F64), torch.as_tensor(covs, dtype=F64)
    )
    log_w = torch.log(torch.as_tensor(w, dtype=F64))

    def component_lp(x):
        return comps.log_prob(x[..., None, :]) + log_w

    def log_prob(x):
        return torch.logsumexp(component_lp(x), -1)

    mean = w @ means
    second = np.einsum("k,kij->ij", w, covs + means[:, :, None] * means[:, None, :])
    sd = np.sqrt(np.diagonal(second - np.outer(mean, mean)))
    exact = dict(mean=mean, sd=sd, log_z=0.0, weights=w, assign=lambda x: component_lp(x).argmax(-1))
    return ds.Target(log_prob, 5, dtype=F64), exact


def t3_10d():
    """Multivariate Student t, nu = 3, 10-d, identity scale, normalised: mean 0, sd sqrt(3), log Z
    0. The sample sd of t3 draws has no finite variance, so its error is noisy even for exact draws
    (judge these rows by the mean and log Z)."""
    nu, dim = 3.0, 10
    const = math.lgamma((nu + dim) / 2) - math.lgamma(nu / 2) - 0.5 * dim * math.log(nu * math.pi)

    def log_prob(x):
        return const - 0.5 * (nu + dim) * torch.log1p((x**2).sum(-1) / nu)

    exact = dict(mean=np.zeros(dim), sd=np.full(dim, math.sqrt(nu / (nu - 2))), log_z=0.0)
    return ds.Target(log_prob, dim, dtype=F64), exact


def halfnormal3():
    """The 3-d standard half-normal written the way a new user writes a constraint: -|x|^2 / 2 on the
    positive orthant, -inf outside it (unnormalised): mean sqrt(2 / pi), sd sqrt(1 - 2 / pi), log Z
    = 3 log(sqrt(2 pi) / 2). The right answer, or a ValueError saying how to reparametrise, is fine."""

    def log_prob(x):
        lp = -0.5 * (x**2).sum(-1)
        return torch.where((x > 0).all(-1), lp, torch.full_like(lp, -math.inf))

    exact = dict(
        mean=np.full(3, math.sqrt(2 / math.pi)),
        sd=np.full(3, math.sqrt(1 - 2 / math.pi)),
        log_z=3 * math.log(math.sqrt(2 * math.pi) / 2),
    )
    return ds.Target(log_prob, 3, dtype=F64), exact


SIXTH_B: dict = {
    "far_gauss": far_gauss,
    "tiny_scale": tiny_scale,
    "scales200": scales200,
    "ab_ridge": ab_ridge,
    "lognormal5": lognormal5,
    "mix3_corr": mix3_corr,
    "t3_10d": t3_10d,
    "halfnormal3": halfnormal3,
}
