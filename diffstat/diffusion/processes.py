r"""Noising processes: variance-preserving (VP / Ornstein-Uhlenbeck) and variance-exploding (VE).

Both are linear SDEs :math:`dX_t = f(t) X_t\,dt + g(t)\,dW_t` whose transition from time 0 is
Gaussian, :math:`X_t \mid X_0 \sim \mathcal N(\alpha_t X_0, \sigma_t^2 I)`, so that

* the noised law is :math:`p_t = (\alpha_t)_\# p_0 * \mathcal N(0, \sigma_t^2 I)`;
* the denoising score matching target is :math:`\nabla \log p_{t|0}(x_t \mid x_0) = -z / \sigma_t`
  for :math:`x_t = \alpha_t x_0 + \sigma_t z`;
* the time reversal is :math:`dX = [f(X, t) - g(t)^2 \nabla\log p_t(X)]\,dt + g(t)\,d\bar W`
  run from :math:`t_{\max}` down to :math:`t_{\min}` (:meth:`reverse_drift`);
* the probability-flow ODE :math:`\dot x = f(x, t) - \tfrac12 g(t)^2 \nabla\log p_t(x)` has the
  same marginals :math:`p_t` (:meth:`probability_flow_drift`).

Times are tensors of shape ``(n,)`` (one per point) or 0-d; every method returns the same shape
as ``t`` (or ``(n, dim)`` for drifts). Plain Python floats are accepted and become 0-d tensors
of the default dtype.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "VP",
    "VE",
    "process_from_dict",
    "noised_mixture_score",
    "as_time",
    "normal_draws",
    "uniform_draws",
]


def as_time(t, like: torch.Tensor | None = None) -> torch.Tensor:
    """A time ``t`` (number or tensor) as a tensor, on ``like``'s device and dtype where given."""
    if isinstance(t, torch.Tensor):
        return t if like is None else t.to(device=like.device, dtype=like.dtype)
    if like is not None:
        return torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return torch.as_tensor(float(t), dtype=torch.get_default_dtype())


def _per_row(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a time-indexed quantity ``(n,)`` or ``()`` against ``x: (n, dim)``."""
    return v.unsqueeze(-1) if v.dim() == 1 else v


def normal_draws(shape, generator: torch.Generator | None, dtype, device) -> torch.Tensor:
    """Standard normal draws made on the generator's device, then moved to ``device``."""
    gen_device = generator.device if generator is not None else torch.device(device or "cpu")
    z = torch.randn(shape, generator=generator, dtype=dtype, device=gen_device)
    return z.to(device) if device is not None else z


def uniform_draws(shape, generator: torch.Generator | None, dtype, device) -> torch.Tensor:
    """Uniform draws on [0, 1) made on the generator's device, then moved to ``device``."""
    gen_device = generator.device if generator is not None else torch.device(device or "cpu")
    u = torch.rand(shape, generator=generator, dtype=dtype, device=gen_device)
    return u.to(device) if device is not None else u


class _Process:
    """Shared machinery; subclasses define ``log_alpha``, ``sigma``, ``beta`` / ``diffusion``."""

    t_min: float
    t_max: float

    def _check_times(self, t_min: float, t_max: float) -> None:
        if not (math.isfinite(t_min) and math.isfinite(t_max) and 0.0 <= t_min < t_max):
            raise ValueError(f"need 0 <= t_min < t_max, got t_min={t_min}, t_max={t_max}")
        self.t_min, self.t_max = float(t_min), float(t_max)

    # --- marginals ------------------------------------------------------------------------
    def alpha(self, t) -> torch.Tensor:
        r""":math:`\alpha_t`, the scale of :math:`X_0` in :math:`X_t`."""
        return torch.exp(self.log_alpha(t))

    def marginal_sample(self, x0: torch.Tensor, t, generator: torch.Generator | None):
        r"""Draw :math:`x_t = \alpha_t x_0 + \sigma_t z`, :math:`z \sim \mathcal N(0, I)`.

        Parameters
        ----------
        x0 : (n, dim)
        t : (n,) or 0-d
        generator : torch.Generator

        Returns
        -------
        xt, z : (n, dim) each
        """
        t = as_time(t, x0)
        z = normal_draws(x0.shape, generator, x0.dtype, x0.device)
        xt = _per_row(self.alpha(t), x0) * x0 + _per_row(self.sigma(t), x0) * z
        return xt, z

    def sample_time(self, n: int, generator: torch.Generator | None, dtype=None, device=None) -> torch.Tensor:
        """``n`` times uniform on ``[t_min, t_max]``, shape ``(n,)``."""
        u = uniform_draws((n,), generator, dtype or torch.get_default_dtype(), device)
        return self.t_min + (self.t_max - self.t_min) * u

    def time_grid(self, num_steps: int, dtype=None, device=None) -> torch.Tensor:
        """``num_steps + 1`` equally spaced times from ``t_max`` down to ``t_min``."""
        return torch.linspace(
            self.t_max, self.t_min, num_steps + 1, dtype=dtype or torch.get_default_dtype(), device=device
        )

    # --- SDE ------------------------------------------------------------------------------
    def reverse_drift(self, x: torch.Tensor, t, score: torch.Tensor) -> torch.Tensor:
        r"""Drift :math:`f(x, t) - g(t)^2 s` of the reverse-time SDE (in forward time; a step from
        :math:`t` to :math:`t - h` moves by :math:`-h` times this plus :math:`g\sqrt h\,\xi`)."""
        t = as_time(t, x)
        return self.drift(x, t) - _per_row(self.diffusion(t) ** 2, x) * score

    def probability_flow_drift(self, x: torch.Tensor, t, score: torch.Tensor) -> torch.Tensor:
        r"""Velocity :math:`f(x, t) - \tfrac12 g(t)^2 s` of the probability-flow ODE."""
        t = as_time(t, x)
        return self.drift(x, t) - 0.5 * _per_row(self.diffusion(t) ** 2, x) * score

    # --- prior ----------------------------------------------------------------------------
    def prior_scale(self) -> float:
        """Standard deviation of the isotropic Gaussian prior at ``t_max``."""
        raise NotImplementedError

    def prior_sample(
        self, n: int, dim: int, generator: torch.Generator | None, dtype=None, device=None
    ) -> torch.Tensor:
        r"""Draws ``(n, dim)`` from the prior :math:`\mathcal N(0, s_T^2 I)` that stands in for
        :math:`p_{t_{\max}}`."""
        return self.prior_scale() * normal_draws(
            (n, dim), generator, dtype or torch.get_default_dtype(), device
        )

    def prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised log-density of the prior at ``x: (n, dim)``, shape ``(n,)``."""
        s = self.prior_scale()
        d = x.shape[-1]
        return -0.5 * (x**2).sum(-1) / s**2 - d * (math.log(s) + 0.5 * math.log(2 * math.pi))

    def to_dict(self) -> dict:
        raise NotImplementedError


class VP(_Process):
    r"""Variance-preserving (Ornstein-Uhlenbeck) process
    :math:`dX = -\tfrac12 \beta(t) X\,dt + \sqrt{\beta(t)}\,dW`.

    :math:`\alpha_t = \exp(-\tfrac12 \int_0^t \beta)`, :math:`\sigma_t^2 = 1 - \alpha_t^2`, prior
    :math:`\mathcal N(0, I)`.

    Parameters
    ----------
    beta_min, beta_max : float
        ``"linear"``: :math:`\beta(t) = \beta_{\min} + (\beta_{\max} - \beta_{\min}) t`, so
        :math:`\int_0^t \beta = \beta_{\min} t + (\beta_{\max}-\beta_{\min}) t^2/2` (with the
        defaults 0.1, 20: :math:`\alpha_1 = 0.0066`). ``"cosine"`` (Nichol and Dhariwal 2021):
        :math:`\alpha_t = \cos\phi(t) / \cos\phi(0)`, :math:`\phi(t) = \frac{t + s}{1 + s}\frac\pi2`,
        :math:`s = 0.008`, so :math:`\beta(t) = \frac{\pi}{1+s}\tan\phi(t)`; since this diverges at
        :math:`t = 1`, :math:`\beta` is capped at ``beta_max`` (defaults: :math:`\alpha_1 = 0.057`;
        ``beta_min`` is unused).
    schedule : ``"linear"`` or ``"cosine"``
    t_min, t_max : float
        Time interval used for training and sampling; ``t_min > 0`` keeps :math:`\sigma_t > 0`.
    """

    _COSINE_S = 0.008  # the offset of Nichol and Dhariwal, which keeps beta(0) > 0

    def __init__(
        self,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        schedule: str = "linear",
        t_min: float = 1e-3,
        t_max: float = 1.0,
    ):
        if schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule must be 'linear' or 'cosine', got {schedule!r}")
        if not (0.0 <= beta_min <= beta_max and beta_max > 0.0):
            raise ValueError(f"need 0 <= beta_min <= beta_max, beta_max > 0; got {beta_min}, {beta_max}")
        self._check_times(t_min, t_max)
        self.beta_min, self.beta_max, self.schedule = float(beta_min), float(beta_max), schedule
        if schedule == "cosine":
            s = self._COSINE_S
            self._phi0 = s / (1 + s) * math.pi / 2
            if math.pi / (1 + s) * math.tan(self._phi0) >= beta_max:
                raise ValueError("beta_max is below the cosine schedule's beta(0)")
            self._phi_star = math.atan(beta_max * (1 + s) / math.pi)  # beta reaches beta_max here
            self._t_star = self._phi_star * 2 * (1 + s) / math.pi - s
            self._int_star = -2 * (math.log(math.cos(self._phi_star)) - math.log(math.cos(self._phi0)))

    def _phi(self, t):
        s = self._COSINE_S
        return (t + s) / (1 + s) * (math.pi / 2)

    def beta(self, t) -> torch.Tensor:
        r""":math:`\beta(t)`."""
        t = as_time(t)
        if self.schedule == "linear":
            return self.beta_min + (self.beta_max - self.beta_min) * t
        raw = math.pi / (1 + self._COSINE_S) * torch.tan(self._phi(t.clamp(max=self._t_star)))
        return torch.where(t < self._t_star, raw, torch.full_like(t, self.beta_max))

    def integrated_beta(self, t) -> torch.Tensor:
        r""":math:`\int_0^t \beta(u)\,du = -2 \log\alpha_t`."""
        t = as_time(t)
        if self.schedule == "linear":
            return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2
        tc = t.clamp(max=self._t_star)
        head = -2 * (torch.log(torch.cos(self._phi(tc))) - math.log(math.cos(self._phi0)))
        return head + self.beta_max * (t - tc)

    def log_alpha(self, t) -> torch.Tensor:
        return -0.5 * self.integrated_beta(t)

    def sigma(self, t) -> torch.Tensor:
        r""":math:`\sigma_t = \sqrt{1 - \alpha_t^2}` (by ``expm1``, accurate as :math:`t \to 0`)."""
        return torch.sqrt(-torch.expm1(-self.integrated_beta(t)))

    def time_at_sigma(self, sigma) -> torch.Tensor:
        r"""The time :math:`t` with :math:`\sigma_t` = ``sigma`` (inverse of :meth:`sigma`)."""
        sigma = as_time(sigma)
        if ((sigma <= 0) | (sigma >= 1)).any():
            raise ValueError("a VP process has 0 < sigma_t < 1")
        integ = -torch.log1p(-(sigma**2))
        if self.schedule == "linear":
            a = 0.5 * (self.beta_max - self.beta_min)
            if a == 0:
                return integ / self.beta_min
            return (-self.beta_min + torch.sqrt(self.beta_min**2 + 4 * a * integ)) / (2 * a)
        s = self._COSINE_S
        head = torch.arccos(
            (math.cos(self._phi0) * torch.exp(-0.5 * integ.clamp(max=self._int_star))).clamp(-1, 1)
        )
        t_head = head * 2 * (1 + s) / math.pi - s
        return torch.where(
            integ <= self._int_star, t_head, self._t_star + (integ - self._int_star) / self.beta_max
        )

    def drift(self, x: torch.Tensor, t) -> torch.Tensor:
        r""":math:`f(x, t) = -\tfrac12 \beta(t) x`, ``(n, dim)``."""
        return -0.5 * _per_row(self.beta(as_time(t, x)), x) * x

    def diffusion(self, t) -> torch.Tensor:
        r""":math:`g(t) = \sqrt{\beta(t)}`."""
        return torch.sqrt(self.beta(t))

    def prior_scale(self) -> float:
        return 1.0

    def to_dict(self) -> dict:
        return {
            "kind": "VP",
            "beta_min": self.beta_min,
            "beta_max": self.beta_max,
            "schedule": self.schedule,
            "t_min": self.t_min,
            "t_max": self.t_max,
        }

    def __repr__(self) -> str:
        return (
            f"VP(beta_min={self.beta_min}, beta_max={self.beta_max}, schedule={self.schedule!r}, "
            f"t_min={self.t_min}, t_max={self.t_max})"
        )


class VE(_Process):
    r"""Variance-exploding process :math:`X_t = X_0 + \sigma(t) Z`,
    :math:`\sigma(t) = \sigma_{\min} (\sigma_{\max}/\sigma_{\min})^t`.

    As an SDE: :math:`dX = g(t)\,dW` with :math:`g(t)^2 = \frac{d\sigma^2}{dt} =
    2\sigma(t)^2 \log(\sigma_{\max}/\sigma_{\min})`, no drift, :math:`\alpha_t = 1`. (The law at
    ``t`` is :math:`p_0 * \mathcal N(0, \sigma(t)^2 I)` for every ``t``, which the SDE preserves.)
    The prior is :math:`\mathcal N(0, \sigma(t_{\max})^2 I)`.
    """

    def __init__(
        self, sigma_min: float = 0.01, sigma_max: float = 10.0, t_min: float = 0.0, t_max: float = 1.0
    ):
        if not (0.0 < sigma_min < sigma_max):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self._check_times(t_min, t_max)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def log_alpha(self, t) -> torch.Tensor:
        return torch.zeros_like(as_time(t))

    def sigma(self, t) -> torch.Tensor:
        return self.sigma_min * torch.exp(self._log_ratio * as_time(t))

    def time_at_sigma(self, sigma) -> torch.Tensor:
        r"""The time :math:`t` with :math:`\sigma(t)` = ``sigma``."""
        sigma = as_time(sigma)
        if (sigma <= 0).any():
            raise ValueError("sigma must be positive")
        return torch.log(sigma / self.sigma_min) / self._log_ratio

    def drift(self, x: torch.Tensor, t) -> torch.Tensor:
        return torch.zeros_like(x)

    def diffusion(self, t) -> torch.Tensor:
        return self.sigma(t) * math.sqrt(2 * self._log_ratio)

    def prior_scale(self) -> float:
        return self.sigma_min * math.exp(self._log_ratio * self.t_max)

    def to_dict(self) -> dict:
        return {
            "kind": "VE",
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "t_min": self.t_min,
            "t_max": self.t_max,
        }

    def __repr__(self) -> str:
        return (
            f"VE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, "
            f"t_min={self.t_min}, t_max={self.t_max})"
        )


def process_from_dict(spec: dict) -> VP | VE:
    """Rebuild a process from :meth:`to_dict` output
    (used by :func:`~diffstat.diffusion.training.load_model`)."""
    if not isinstance(spec, dict) or spec.get("kind") not in ("VP", "VE"):
        raise ValueError(f"not a process description: {spec!r}")
    kwargs = {k: v for k, v in spec.items() if k != "kind"}
    return (VP if spec["kind"] == "VP" else VE)(**kwargs)


def noised_mixture_score(mixture, process):
    r"""Exact score :math:`\nabla\log p_t` of a noised Gaussian mixture, as a ``score_fn(x, t)``.

    :math:`p_t` is the law of :math:`\alpha_t X + \sigma_t Z` with :math:`X` from ``mixture``
    (a :class:`~diffstat.targets.GaussianMixture`), i.e. ``mixture.noised(alpha_t, sigma_t)``.
    ``t`` may be 0-d or ``(n,)``; points that share a time share one noised mixture (cached), so
    the reverse samplers (one time per step) and the losses (few distinct times) stay cheap.
    Differentiable in ``x`` (the probability-flow trace uses it).
    """
    cache: dict[float, object] = {}

    def noised(tv: float):
        if tv not in cache:
            tt = torch.tensor(tv, dtype=torch.float64)
            cache[tv] = mixture.noised(float(process.alpha(tt)), float(process.sigma(tt)))
        return cache[tv]

    def score_fn(x: torch.Tensor, t) -> torch.Tensor:
        t = as_time(t, x)
        if t.dim() == 0 or bool((t == t.reshape(-1)[0]).all()):
            return noised(float(t.reshape(-1)[0])).score(x)
        out = torch.empty_like(x)
        values, inverse = torch.unique(t, return_inverse=True)
        for j, tv in enumerate(values.tolist()):
            rows = inverse == j
            out[rows] = noised(tv).score(x[rows])
        return out

    return score_fn
