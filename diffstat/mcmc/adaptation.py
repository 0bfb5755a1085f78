"""Warm-up adaptation: step size by dual averaging, diagonal mass matrix by Welford variances."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["DualAveraging", "WelfordVariance", "warmup_windows"]


@dataclass
class DualAveraging:
    r"""Nesterov dual averaging of :math:`\log h` toward a target acceptance rate
    (Hoffman and Gelman 2014, section 3.2.1).

    After :math:`t` updates with acceptance statistics :math:`a_i`,

    .. math::
        \bar H_t = (1 - \tfrac{1}{t + t_0}) \bar H_{t-1} + \tfrac{1}{t + t_0} (\delta - a_t),\quad
        \log h_t = \mu - \tfrac{\sqrt t}{\gamma} \bar H_t,\quad
        \log \bar h_t = t^{-\kappa} \log h_t + (1 - t^{-\kappa}) \log \bar h_{t-1},

    with :math:`\mu = \log(10 h_0)`; the defaults :math:`\gamma = 0.05, t_0 = 10, \kappa = 0.75` are
    Stan's. ``h`` may be a scalar tensor (one step size shared by all chains) or ``(k,)`` (one per
    temperature or group). Everything stays a tensor: no host synchronisation per step.
    """

    step_size: torch.Tensor
    target_accept: float
    gamma: float = 0.05
    t0: float = 10.0
    kappa: float = 0.75

    def __post_init__(self):
        self.restart(self.step_size)

    def restart(self, step_size: torch.Tensor) -> None:
        self.step_size = step_size.clone()
        self.mu = torch.log(10 * step_size)
        self.h_bar = torch.zeros_like(step_size)
        self.log_avg = torch.log(step_size)
        self.t = 0

    def update(self, accept_stat: torch.Tensor) -> torch.Tensor:
        """Feed an acceptance statistic (same shape as the step size); return the new step size."""
        self.t += 1
        t = self.t
        w = 1.0 / (t + self.t0)
        self.h_bar = (1 - w) * self.h_bar + w * (self.target_accept - accept_stat)
        log_h = self.mu - math.sqrt(t) / self.gamma * self.h_bar
        eta = t ** (-self.kappa)
        self.log_avg = eta * log_h + (1 - eta) * self.log_avg
        self.step_size = torch.exp(log_h)
        return self.step_size

    @property
    def final_step_size(self) -> torch.Tensor:
        """The averaged step size to use after warm-up."""
        return torch.exp(self.log_avg)


class WelfordVariance:
    """Running mean and variance over a stream of batches ``(n, dim)`` (Welford's algorithm,
    merged batch-wise by Chan et al.'s formula)."""

    def __init__(self, dim: int, dtype=torch.float64, device=None):
        self.count = 0
        self.mean = torch.zeros(dim, dtype=dtype, device=device)
        self.m2 = torch.zeros(dim, dtype=dtype, device=device)

    def update(self, x: torch.Tensor) -> None:
        x = x.to(self.mean.dtype)
        n_b = x.shape[0]
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * n_b / n
        self.m2 = self.m2 + m2_b + delta**2 * self.count * n_b / n
        self.count = n

    def variance(self, regularize: bool = True) -> torch.Tensor:
        """Sample variance; regularised toward 1e-3 as Stan does, (n var + 5e-3) / (n + 5)."""
        var = self.m2 / max(self.count - 1, 1)
        if regularize:
            n = self.count
            var = (n / (n + 5.0)) * var + 1e-3 * (5.0 / (n + 5.0))
        return var


def warmup_windows(num_warmup: int) -> list[int]:
    """Warm-up iterations at which the mass matrix is re-estimated.

    An initial 15% tunes the step size only; the mass matrix is then estimated over two slow
    windows (to 40% and to 90% of warm-up, the second using only draws after the first); the last
    10% tunes the step size for the final mass matrix.
    """
    if num_warmup < 20:
        return []
    return [int(0.4 * num_warmup), int(0.9 * num_warmup)]
