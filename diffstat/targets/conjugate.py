r"""Conjugate models with closed-form posteriors and exact evidence, as Pyro models and as plain
log-densities, for testing samplers and evidence estimators.

:class:`NormalNormal`
    Unknown mean, known sd, independently per coordinate:
    :math:`\mu \sim N(m_0, s_0^2)`, :math:`x_i \mid \mu \sim N(\mu, \sigma^2)`, :math:`i=1..N`.
    Posterior :math:`N(m_N, s_N^2)` with :math:`s_N^{-2} = s_0^{-2} + N\sigma^{-2}` and
    :math:`m_N = s_N^2 (m_0 s_0^{-2} + \sum_i x_i \sigma^{-2})`.
:class:`GammaPrecision`
    Normal data with known mean and unknown precision:
    :math:`\tau \sim \mathrm{Gamma}(a, b)` (rate ``b``), :math:`x_i \mid \tau \sim N(\mu, 1/\tau)`.
    Posterior :math:`\mathrm{Gamma}(a + N/2,\ b + \sum_i (x_i - \mu)^2 / 2)`.

Each gives the exact posterior mean and variance, exact posterior draws, the exact log marginal
likelihood :math:`\log p(x)`, a Pyro ``model`` (for :meth:`diffstat.Target.from_pyro`) and a plain
:class:`~diffstat.target.Target` (``as_target``) whose ``log_normalizer`` is :math:`\log p(x)`.
"""

from __future__ import annotations

import math

import torch

from diffstat.target import Target

__all__ = ["NormalNormal", "GammaPrecision"]

_LOG_2PI = math.log(2 * math.pi)


def _as_data(data, dtype) -> torch.Tensor:
    x = torch.as_tensor(data)
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    x = x if dtype is None else x.to(dtype)
    if x.numel() == 0 or not torch.isfinite(x).all():
        raise ValueError("data must be a non-empty array of finite numbers")
    return x


def _positive(value, name: str) -> float:
    value = float(value)
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive number, got {value}")
    return value


class NormalNormal:
    r"""Normal data with unknown mean and known sd, a normal prior on the mean.

    Parameters
    ----------
    data : array (N,) or (N, d)
        Observations; with ``(N, d)`` the mean is a vector of ``d`` independent coordinates.
    prior_mean, prior_sd : float
        :math:`m_0, s_0` of the prior :math:`\mu \sim N(m_0, s_0^2)` (each coordinate).
    sd : float
        Known observation sd :math:`\sigma`.
    dtype : torch.dtype, optional
        Of the data and the results; defaults to the data's floating dtype.
    """

    def __init__(self, data, prior_mean: float = 0.0, prior_sd: float = 1.0, sd: float = 1.0, *, dtype=None):
        self.data = _as_data(data, dtype)
        if self.data.dim() not in (1, 2):
            raise ValueError(f"data must have shape (N,) or (N, d), got {tuple(self.data.shape)}")
        self.prior_mean = float(prior_mean)
        self.prior_sd = _positive(prior_sd, "prior_sd")
        self.sd = _positive(sd, "sd")
        self.num_data = self.data.shape[0]
        #: Shape of the latent mean: () for (N,) data, (d,) for (N, d) data.
        self.shape = tuple(self.data.shape[1:])
        self.dim = int(math.prod(self.shape))

    def posterior_var(self) -> torch.Tensor:
        r""":math:`s_N^2 = (s_0^{-2} + N \sigma^{-2})^{-1}`, shape ``self.shape``."""
        var = 1.0 / (self.prior_sd**-2 + self.num_data * self.sd**-2)
        return torch.full(self.shape, var, dtype=self.data.dtype)

    def posterior_mean(self) -> torch.Tensor:
        r""":math:`m_N = s_N^2 (m_0 / s_0^2 + \sum_i x_i / \sigma^2)`, shape ``self.shape``."""
        return self.posterior_var() * (self.prior_mean / self.prior_sd**2 + self.data.sum(0) / self.sd**2)

    def sample_posterior(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` exact posterior draws, shape ``(n, *self.shape)``."""
        eps = torch.randn((n,) + self.shape, generator=generator, dtype=self.data.dtype)
        return self.posterior_mean() + self.posterior_var().sqrt() * eps

    def log_marginal_likelihood(self) -> float:
        r"""Exact :math:`\log p(x)`, summed over coordinates.

        Per coordinate :math:`x \sim N(m_0 \mathbf 1, \Sigma)`, :math:`\Sigma = \sigma^2 I +
        s_0^2 \mathbf 1 \mathbf 1^\top`; with :math:`r = x - m_0` and :math:`c = s_0^2 / (\sigma^2
        + N s_0^2)` (Sherman-Morrison), :math:`r^\top\Sigma^{-1}r = (r^\top r - c\,(\mathbf 1^\top
        r)^2)/\sigma^2` and :math:`\log\det\Sigma = 2N\log\sigma + \log(1 + N s_0^2/\sigma^2)`.
        """
        n, s2, t2 = self.num_data, self.sd**2, self.prior_sd**2
        r = (self.data - self.prior_mean).reshape(n, -1)
        quad = ((r**2).sum(0) - t2 / (s2 + n * t2) * r.sum(0) ** 2) / s2
        logdet = n * math.log(s2) + math.log1p(n * t2 / s2)
        return float((-0.5 * (n * _LOG_2PI + logdet + quad)).sum())

    @property
    def log_normalizer(self) -> float:
        """The log normalising constant of :meth:`log_prob`: the log evidence."""
        return self.log_marginal_likelihood()

    def log_prob(self, mu: torch.Tensor) -> torch.Tensor:
        r"""Unnormalised posterior :math:`\log p(\mu) + \log p(x \mid \mu)` at ``mu: (n, dim)``,
        shape ``(n,)``; it integrates to :math:`p(x)`."""
        x = self.data.reshape(self.num_data, 1, self.dim).to(mu)
        prior = (
            -0.5 * ((mu - self.prior_mean) / self.prior_sd) ** 2 - math.log(self.prior_sd) - 0.5 * _LOG_2PI
        )
        lik = -0.5 * ((x - mu) / self.sd) ** 2 - math.log(self.sd) - 0.5 * _LOG_2PI
        return prior.sum(-1) + lik.sum((0, -1))

    def model(self, data: torch.Tensor | None = None) -> None:
        """The Pyro model: site ``"mu"`` (shape ``self.shape``), observed site ``"x"``."""
        import pyro
        import pyro.distributions as dist

        data = self.data if data is None else data
        prior = dist.Normal(self.prior_mean, self.prior_sd)
        if self.shape:
            mu = pyro.sample("mu", prior.expand(self.shape).to_event(len(self.shape)))
        else:
            mu = pyro.sample("mu", prior)
        with pyro.plate("data", data.shape[0]):
            like = dist.Normal(mu, self.sd)
            pyro.sample("x", like.to_event(len(self.shape)) if self.shape else like, obs=data)

    def as_target(self, name: str = "mu", dtype: torch.dtype | None = None) -> Target:
        """A plain :class:`Target` on R^dim, with the exact ``log_normalizer`` for tests to read."""
        target = Target(self.log_prob, self.dim, name=name, dtype=dtype or self.data.dtype)
        target.log_normalizer = self.log_normalizer
        return target


class GammaPrecision:
    r"""Normal data with known mean and a Gamma prior on the precision.

    Parameters
    ----------
    data : array
        Observations, any shape (``N`` = number of elements).
    concentration, rate : float
        :math:`a, b` of the prior :math:`\tau \sim \mathrm{Gamma}(a, b)` (mean :math:`a/b`).
    mean : float
        Known mean :math:`\mu` of the data.
    dtype : torch.dtype, optional
        Of the data and the results; defaults to the data's floating dtype.
    """

    def __init__(self, data, concentration: float = 2.0, rate: float = 1.0, mean: float = 0.0, *, dtype=None):
        self.data = _as_data(data, dtype).flatten()
        self.concentration = _positive(concentration, "concentration")
        self.rate = _positive(rate, "rate")
        self.mean = float(mean)
        self.num_data = self.data.numel()
        self.dim = 1

    def posterior_params(self) -> tuple[float, float]:
        r""":math:`(a + N/2,\ b + \sum_i (x_i - \mu)^2 / 2)`."""
        ss = float(((self.data - self.mean) ** 2).sum())
        return self.concentration + 0.5 * self.num_data, self.rate + 0.5 * ss

    def posterior_mean(self) -> float:
        r""":math:`E[\tau \mid x] = a_N / b_N`."""
        a, b = self.posterior_params()
        return a / b

    def posterior_var(self) -> float:
        r""":math:`\mathrm{Var}[\tau \mid x] = a_N / b_N^2`."""
        a, b = self.posterior_params()
        return a / b**2

    def sample_posterior(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` exact posterior draws of the precision, shape ``(n,)``."""
        a, b = self.posterior_params()
        alpha = torch.full((n,), a, dtype=self.data.dtype)
        return torch._standard_gamma(alpha, generator=generator) / b

    def log_marginal_likelihood(self) -> float:
        r"""Exact :math:`\log p(x) = a\log b - \log\Gamma(a) + \log\Gamma(a_N) - a_N \log b_N
        - \tfrac N2 \log 2\pi`."""
        a, b = self.concentration, self.rate
        a_n, b_n = self.posterior_params()
        log_prior_normalizer = a * math.log(b) - math.lgamma(a)
        return log_prior_normalizer + math.lgamma(a_n) - a_n * math.log(b_n) - 0.5 * self.num_data * _LOG_2PI

    @property
    def log_normalizer(self) -> float:
        """The log normalising constant of :meth:`log_prob`: the log evidence."""
        return self.log_marginal_likelihood()

    def log_prob(self, u: torch.Tensor) -> torch.Tensor:
        r"""Unnormalised posterior of :math:`u = \log\tau` at ``u: (n, 1)``, shape ``(n,)``:
        :math:`\log p(x \mid e^u) + \log \mathrm{Gamma}(e^u; a, b) + u` (the last term is the
        log-Jacobian of :math:`\tau = e^u`); it integrates to :math:`p(x)`."""
        u = u[:, 0]
        a, b = self.concentration, self.rate
        ss, n = float(((self.data - self.mean) ** 2).sum()), self.num_data
        log_prior = a * math.log(b) - math.lgamma(a) + (a - 1) * u - b * u.exp()
        log_lik = 0.5 * n * (u - _LOG_2PI) - 0.5 * ss * u.exp()
        return log_prior + log_lik + u

    def model(self, data: torch.Tensor | None = None) -> None:
        """The Pyro model: positive site ``"tau"`` (shape ``()``), observed site ``"x"``."""
        import pyro
        import pyro.distributions as dist

        data = self.data if data is None else data
        tau = pyro.sample("tau", dist.Gamma(self.concentration, self.rate))
        with pyro.plate("data", data.shape[0]):
            pyro.sample("x", dist.Normal(self.mean, tau.rsqrt()), obs=data)

    def as_target(self, name: str = "log_tau", dtype: torch.dtype | None = None) -> Target:
        """A plain :class:`Target` on R (``u = log tau``), with the exact ``log_normalizer``."""
        target = Target(self.log_prob, 1, name=name, dtype=dtype or self.data.dtype)
        target.log_normalizer = self.log_normalizer
        return target
