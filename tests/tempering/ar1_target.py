"""The audit's latent AR(1) posterior (``benchmarks/audit_cases_pyro.py``, ``ar1_latent``) in torch, for
the tempering tests: 60 states observed with noise, phi ~ U(-1, 1), sigma ~ HalfNormal(1), x
stationary AR(1), in Pyro's unconstrained coordinates (u, log sigma, x), phi = 2 sigmoid(u) - 1, with
``log_prior`` and ``log_likelihood`` (AIS tempers the likelihood, as for the Pyro model), and its exact
evidence and posterior mean of sigma by quadrature (x given phi and sigma is Gaussian)."""

import math

import numpy as np
import torch

import diffstat as ds

F64 = torch.float64
_NO_SHAPE = torch.Size()


def ar1_data(steps: int = 60, obs_sd: float = 0.7, seed: int = 32) -> torch.Tensor:
    """The audit's observations: phi = 0.8, sigma = 0.5, noise sd ``obs_sd``."""
    rng = np.random.default_rng(seed)
    x = np.zeros(steps)
    x[0] = 0.5 / math.sqrt(1 - 0.64) * rng.standard_normal()
    for t in range(1, steps):
        x[t] = 0.8 * x[t - 1] + 0.5 * rng.standard_normal()
    return torch.tensor(x + obs_sd * rng.standard_normal(steps), dtype=F64)


class AR1Prior(torch.distributions.Distribution):
    """The prior of (u, log sigma, x_1..x_T): a normalised distribution on R^(T+2)."""

    arg_constraints: dict = {}
    support = torch.distributions.constraints.real_vector
    has_rsample = False

    def __init__(self, steps: int):
        self.steps = steps
        super().__init__(torch.Size(), torch.Size([steps + 2]), validate_args=False)

    def sample(self, sample_shape=_NO_SHAPE) -> torch.Tensor:
        n = int(np.prod(sample_shape))
        phi = 2 * torch.rand(n, dtype=F64) - 1
        sigma = torch.randn(n, dtype=F64).abs()
        x = torch.empty(n, self.steps, dtype=F64)
        x[:, 0] = sigma / torch.sqrt(1 - phi**2) * torch.randn(n, dtype=F64)
        for t in range(1, self.steps):
            x[:, t] = phi * x[:, t - 1] + sigma * torch.randn(n, dtype=F64)
        u = torch.log1p(phi) - torch.log1p(-phi)
        return torch.cat([u[:, None], sigma.log()[:, None], x], 1).reshape(*sample_shape, self.steps + 2)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        shape, z = z.shape[:-1], z.reshape(-1, self.steps + 2)
        s, log_sigma, x = torch.sigmoid(z[:, 0]), z[:, 1], z[:, 2:]
        phi, sigma = 2 * s - 1, log_sigma.exp()
        q = (1 - phi**2) * x[:, 0] ** 2 + ((x[:, 1:] - phi[:, None] * x[:, :-1]) ** 2).sum(-1)
        lp = torch.log(s * (1 - s)) + 0.5 * math.log(2 / math.pi) - sigma**2 / 2 + log_sigma  # phi, sigma
        lp = lp - self.steps * (log_sigma + 0.5 * math.log(2 * math.pi)) + 0.5 * torch.log1p(-(phi**2))
        return (lp - q / (2 * sigma**2)).reshape(shape)


class AR1(ds.Target):
    """The posterior, with the prior as its reference (module notes)."""

    def __init__(self, steps: int = 60, obs_sd: float = 0.7):
        self.y, self.obs_sd, self.prior = ar1_data(steps, obs_sd), obs_sd, AR1Prior(steps)
        super().__init__(
            lambda z: self.log_prior(z) + self.log_likelihood(z), steps + 2, reference=self.prior, dtype=F64
        )

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        return self.prior.log_prob(z)

    def log_likelihood(self, z: torch.Tensor) -> torch.Tensor:
        r = (self.y - z[:, 2:]) / self.obs_sd
        return -0.5 * (r**2).sum(-1) - len(self.y) * math.log(self.obs_sd * math.sqrt(2 * math.pi))

    def exact(self, num_phi: int = 300, num_sigma: int = 100) -> tuple[float, float]:
        """``(log Z, posterior mean of sigma)`` by quadrature over phi in (-0.995, 0.9995) and log sigma
        in (-3, 0.5) (the audit's grid), y marginally N(0, K + obs_sd^2 I), K the stationary covariance."""
        steps = len(self.y)
        phis = torch.linspace(-0.995, 0.9995, num_phi, dtype=F64)
        log_s = torch.linspace(-3.0, 0.5, num_sigma, dtype=F64)
        lags = (torch.arange(steps)[:, None] - torch.arange(steps)[None, :]).abs().to(F64)
        log_w, sigma, noise = [], log_s.exp(), self.obs_sd**2 * torch.eye(steps, dtype=F64)
        zero = torch.zeros(steps, dtype=F64)
        for phi in phis:
            cov = (sigma**2)[:, None, None] * phi**lags / (1 - phi**2) + noise
            log_ev = torch.distributions.MultivariateNormal(zero, cov).log_prob(self.y)
            log_w.append(log_ev + math.log(0.5) + 0.5 * math.log(2 / math.pi) - sigma**2 / 2 + log_s)
        log_w = torch.stack(log_w)  # (phi, sigma)
        cell = float((phis[1] - phis[0]) * (log_s[1] - log_s[0]))
        w = torch.softmax(log_w.flatten(), 0).reshape(log_w.shape)
        return float(torch.logsumexp(log_w.flatten(), 0)) + math.log(cell), float((w * log_s.exp()).sum())
