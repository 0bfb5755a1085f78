r"""Posteriors with exact answers for the tests of SMC moves on correlated targets (and the benchmark).

* :class:`NIGRegression`: a Gaussian linear model :math:`y = X\beta + \varepsilon`,
  :math:`\varepsilon \sim \mathcal N(0, \sigma^2 I)`, with the conjugate normal-inverse-gamma prior
  :math:`\sigma^2 \sim \mathrm{IG}(a_0, b_0)`, :math:`\beta \mid \sigma^2 \sim \mathcal N(m_0, \sigma^2 V_0)`
  (here :math:`m_0 = 0`), sampled in :math:`(\beta, \log\sigma)` with the log-Jacobian
  :math:`\log 2 + 2\log\sigma` of :math:`\sigma^2 = e^{2\log\sigma}`. The posterior is NIG with
  :math:`V_n = (V_0^{-1} + X^\top X)^{-1}`, :math:`m_n = V_n X^\top y`, :math:`a_n = a_0 + n/2`,
  :math:`b_n = b_0 + \tfrac12(y^\top y - m_n^\top V_n^{-1} m_n)`: :math:`\beta` is multivariate
  t with :math:`2a_n` degrees of freedom, mean :math:`m_n` and covariance :math:`b_n V_n/(a_n - 1)`;
  :math:`\sigma^2 \sim \mathrm{IG}(a_n, b_n)`, so :math:`E\sigma = \sqrt{b_n}\,\Gamma(a_n -
  \tfrac12)/\Gamma(a_n)` and :math:`E\sigma^2 = b_n/(a_n-1)`; the evidence is
  :math:`\log p(y) = -\tfrac n2\log 2\pi + \tfrac12\log(|V_n|/|V_0|) + a_0\log b_0 - a_n\log b_n
  + \log\Gamma(a_n) - \log\Gamma(a_0)`. The target carries ``log_prior`` and ``log_likelihood``,
  so SMC tempers the likelihood from exact prior draws.
* :func:`regression`: 5 equicorrelated (0.85) predictors, n = 100; :func:`ar5`: a persistent AR(5)
  series of length 200, its conditional likelihood given the first 5 values a regression on the lags.
* :func:`collinear`: a diamonds-like regression on 24 collinear polynomial and product columns.
* :func:`mixture6`: three 6-d Gaussian components with weights 0.5 / 0.3 / 0.2 and different full
  covariances, far apart relative to their widths, with the reference N(0, 36 I).
"""

import math

import torch

import diffstat as ds
from diffstat.targets import GaussianMixture

F64 = torch.float64
D = torch.distributions


class NIGRegression(ds.Target):
    """The NIG-conjugate linear model in ``(beta, log sigma)``; exact answers as attributes."""

    def __init__(self, X, y, *, prior_scale=3.0, a0=3.0, b0=2.0):
        X, y = torch.as_tensor(X, dtype=F64), torch.as_tensor(y, dtype=F64)
        self.X, self.y, self.a0, self.b0 = X, y, float(a0), float(b0)
        n, p = X.shape
        self.p = p
        self.V0 = prior_scale**2 * torch.eye(p, dtype=F64)
        self.chol0 = torch.linalg.cholesky(self.V0)
        prec_n = torch.linalg.inv(self.V0) + X.T @ X
        self.Vn = torch.linalg.inv(prec_n)
        self.mn = self.Vn @ (X.T @ y)
        self.an = self.a0 + n / 2
        self.bn = self.b0 + 0.5 * float(y @ y - self.mn @ prec_n @ self.mn)
        self.beta_mean = self.mn
        self.beta_sd = torch.sqrt(self.bn / (self.an - 1) * self.Vn.diagonal())
        self.sigma_mean = math.exp(
            0.5 * math.log(self.bn) + math.lgamma(self.an - 0.5) - math.lgamma(self.an)
        )
        self.sigma_sd = math.sqrt(self.bn / (self.an - 1) - self.sigma_mean**2)
        self.log_evidence = (
            -0.5 * n * math.log(2 * math.pi)
            + 0.5 * (torch.logdet(self.Vn) - torch.logdet(self.V0)).item()
            + self.a0 * math.log(self.b0)
            - self.an * math.log(self.bn)
            + math.lgamma(self.an)
            - math.lgamma(self.a0)
        )
        super().__init__(lambda z: self.log_prior(z) + self.log_likelihood(z, count=False), p + 1, dtype=F64)

    def log_prior(self, z):
        beta, s = z[:, :-1], z[:, -1]
        var = torch.exp(2 * s)
        lp_sigma2 = D.InverseGamma(self.a0, self.b0).log_prob(var) + math.log(2.0) + 2 * s
        scale_tril = torch.exp(s)[:, None, None] * self.chol0
        return lp_sigma2 + D.MultivariateNormal(
            torch.zeros(self.p, dtype=F64), scale_tril=scale_tril
        ).log_prob(beta)

    def log_likelihood(self, z, count=True):
        if count:
            self.num_target_evals += z.shape[0]
        beta, s = z[:, :-1], z[:, -1]
        resid = self.y - beta @ self.X.T
        n = self.y.shape[0]
        return -0.5 * (resid**2).sum(-1) * torch.exp(-2 * s) - n * s - 0.5 * n * math.log(2 * math.pi)

    def log_prior_and_likelihood(self, z):
        return self.log_prior(z), self.log_likelihood(z)

    def sample_reference(self, n, generator, device=None):
        """Exact prior draws: sigma^2 = b0 / Gamma(a0), beta = sigma chol0 xi."""
        u = torch.randn(n, self.p + 1, generator=generator, dtype=F64)
        # Gamma(a0, 1) by Marsaglia-Tsang on the generator (torch's gamma sampler takes no generator).
        g = _gamma(self.a0, n, generator)
        var = self.b0 / g
        beta = torch.sqrt(var)[:, None] * (u[:, :-1] @ self.chol0.T)
        return torch.cat([beta, 0.5 * torch.log(var)[:, None]], -1)


def _gamma(a: float, n: int, generator) -> torch.Tensor:
    """``n`` Gamma(a, 1) draws (a >= 1) by Marsaglia and Tsang (2000), from ``generator``."""
    d = a - 1 / 3
    c = 1 / math.sqrt(9 * d)
    out = torch.empty(0, dtype=F64)
    while out.numel() < n:
        x = torch.randn(2 * n, generator=generator, dtype=F64)
        u = torch.rand(2 * n, generator=generator, dtype=F64)
        v = (1 + c * x) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * x**2 + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        out = torch.cat([out, (d * v)[ok]])
    return out[:n]


def regression(seed=0, n=100, p=5, rho=0.85):
    g = torch.Generator().manual_seed(seed)
    cov = rho * torch.ones(p, p, dtype=F64) + (1 - rho) * torch.eye(p, dtype=F64)
    X = torch.randn(n, p, generator=g, dtype=F64) @ torch.linalg.cholesky(cov).T
    beta = torch.tensor([1.0, -0.5, 0.8, 0.0, 0.3], dtype=F64)[:p]
    y = X @ beta + 0.7 * torch.randn(n, generator=g, dtype=F64)
    return NIGRegression(X, y)


def ar5(seed=0, T=200, phi=(1.2, -0.1, -0.2, 0.1, -0.1)):
    g = torch.Generator().manual_seed(seed)
    phi = torch.tensor(phi, dtype=F64)
    k = phi.numel()
    burn = 200
    y = torch.zeros(T + burn, dtype=F64)
    eps = 0.5 * torch.randn(T + burn, generator=g, dtype=F64)
    for t in range(k, T + burn):
        y[t] = (phi * y[t - k : t].flip(0)).sum() + eps[t]
    y = y[burn:]
    lags = torch.stack([y[k - j - 1 : T - j - 1] for j in range(k)], -1)
    return NIGRegression(lags, y[k:])


def mixture6(weights=(0.5, 0.3, 0.2), log_normalizer=1.3):
    """Three 6-d components, means 6.9 to 7.3 apart, covariances: the heaviest 0.8^2 times
    equicorrelation 0.5, the next 1.0^2 times a correlation of alternating sign (0.4), the lightest
    0.7^2 I; reference N(0, 36 I)."""
    means = torch.tensor(
        [[3.0, 3.0, 0, 0, 0, 0], [-3.0, 0.0, 3.0, 0, 0, 0], [0.0, -3.0, -2.0, 0, 0, 2.0]], dtype=F64
    )
    eye = torch.eye(6, dtype=F64)
    sign = torch.tensor([1.0, -1.0] * 3, dtype=F64)
    covs = torch.stack(
        [
            0.8**2 * (0.5 * torch.ones(6, 6, dtype=F64) + 0.5 * eye),
            1.0**2 * (0.4 * torch.outer(sign, sign) + 0.6 * eye),
            0.7**2 * eye,
        ]
    )
    gm = GaussianMixture(means, weights, covs=covs, log_normalizer=log_normalizer)
    ref = D.Independent(D.Normal(torch.zeros(6, dtype=F64), 6.0 * torch.ones(6, dtype=F64)), 1)
    return gm, gm.as_target(reference=ref, dtype=F64)


def mixture6_iso(weights=(0.5, 0.3, 0.2), log_normalizer=1.3):
    """The 6-d mixture of ``test_smc.py`` (isotropic components 0.7 / 1.0 / 0.85) from N(0, 36 I)."""
    means = torch.tensor(
        [[2.5, 2.5, 0, 0, 0, 0], [-2.5, -2.5, 0, 0, 0, 0], [0, 0, 2.5, 2.5, 0, 0]], dtype=F64
    )
    gm = GaussianMixture(means, weights, scales=[0.7, 1.0, 0.85], log_normalizer=log_normalizer)
    ref = D.Independent(D.Normal(torch.zeros(6, dtype=F64), 6.0 * torch.ones(6, dtype=F64)), 1)
    return gm, gm.as_target(reference=ref, dtype=F64)


def collinear(seed=5, n=500, degree=8, prior_scale=10.0):
    """A diamonds-like regression (the analogue of posteriordb's diamonds, ``docs/smc_collinear.md``):
    an intercept and ``3 * degree`` standardised columns :math:`a^k` (:math:`k = 1..` ``degree``),
    :math:`b a^k` and :math:`b^2 a^k` (:math:`k = 0..` ``degree`` - 1), :math:`a \\sim U(0.2, 2.2)`,
    :math:`b \\sim N(0, 1)`; coefficients N(0, 0.5^2), noise sd 0.7. At the defaults (25 coefficients,
    n = 500) the condition number of :math:`X^\\top X` is 1.7e12 and the posterior's correlation
    matrix has least eigenvalue 4e-6 (largest |correlation| 0.93)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, generator=g, dtype=F64) * 2 + 0.2
    b = torch.randn(n, generator=g, dtype=F64)
    cols = [a**k for k in range(1, degree + 1)] + [b * a**k for k in range(degree)]
    cols += [(b**2) * a**k for k in range(degree)]
    X = torch.stack(cols, 1)
    X = torch.cat([torch.ones(n, 1, dtype=F64), (X - X.mean(0)) / X.std(0)], 1)
    beta = torch.randn(X.shape[1], generator=g, dtype=F64) * 0.5
    y = X @ beta + 0.7 * torch.randn(n, generator=g, dtype=F64)
    return NIGRegression(X, y, prior_scale=prior_scale)
