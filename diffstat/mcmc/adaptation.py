"""Warm-up adaptation pieces: step size by dual averaging, the metric by pooled running moments,
Stan's windowed schedule, and the automatic choice between a diagonal and a dense metric."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["DualAveraging", "WelfordCovariance", "WelfordVariance", "choose_metric", "stan_windows"]


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

    def restart(self, step_size: torch.Tensor, shrink_factor: float = 10.0) -> None:
        """Start over from ``step_size``, shrinking toward ``shrink_factor * step_size`` (Stan's 10
        favours larger steps while there is time to correct; a short window needs 1)."""
        self.step_size = step_size.clone()
        self.mu = torch.log(shrink_factor * step_size)
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


#: The running moments merge the batches fed to them this many at a time (sooner once the batches
#: held reach MERGE_ELEMENTS numbers, 32 MiB in float64): one merge of a stack of batches costs about
#: what one batch's did, so warm-up's two accumulators cost a copy per step each instead of about 13
#: small tensor operations (0.2 s of a 1,000-chain MALA run of 2.3 s on a 10-d Gaussian under
#: cProfile, ``docs/mala_overhead.md``). The moments are those of all the draws in any grouping
#: (Chan et al.), up to rounding.
MERGE_BATCHES = 32
MERGE_ELEMENTS = 2**22


class _RunningMoments:
    """Batches ``(n, dim)`` copied into a float64 buffer and merged a stack at a time, by the
    subclass's ``_merge(rows)`` (Chan et al.'s pairwise update of count, mean and second moments),
    when MERGE_BATCHES are held or the moments are read. The buffer is allocated once and each batch
    converted into its rows by one copy (a list of copies joined by ``torch.cat`` cost an allocation
    per step and a second copy of every number, 0.9 ms per merge at 32 x 1,000 x 10)."""

    def __init__(self, dim: int, dtype=torch.float64, device=None):
        self._count = 0
        self._mean = torch.zeros(dim, dtype=dtype, device=device)
        self._buffer = self._mean.new_empty((0, dim))
        self._rows = 0  # rows of the buffer held
        self._batches = 0  # batches held

    def update(self, x: torch.Tensor) -> None:
        """Add the rows of a batch ``x: (n, dim)`` (copied: ``x`` may change afterwards)."""
        end = self._rows + x.shape[0]
        if end > self._buffer.shape[0]:  # room for MERGE_BATCHES batches of this size, within the cap
            rows = max(end, min(MERGE_BATCHES * x.shape[0], MERGE_ELEMENTS // max(x.shape[1], 1) + 1))
            buffer = self._buffer.new_empty((rows, self._buffer.shape[1]))
            buffer[: self._rows] = self._buffer[: self._rows]
            self._buffer = buffer
        self._buffer[self._rows : end] = x
        self._rows, self._batches = end, self._batches + 1
        if self._batches >= MERGE_BATCHES or self._rows * self._buffer.shape[1] >= MERGE_ELEMENTS:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            batch = self._buffer[: self._rows]
            self._rows = self._batches = 0
            self._merge(batch)

    @property
    def count(self) -> int:
        """Rows seen."""
        self._flush()
        return self._count

    @property
    def mean(self) -> torch.Tensor:
        """Their mean ``(dim,)``."""
        self._flush()
        return self._mean


class WelfordVariance(_RunningMoments):
    """Running mean and variance over a stream of batches ``(n, dim)`` (Welford's algorithm,
    merged batch-wise by Chan et al.'s formula)."""

    def __init__(self, dim: int, dtype=torch.float64, device=None):
        super().__init__(dim, dtype, device)
        self._m2 = torch.zeros(dim, dtype=dtype, device=device)

    def _merge(self, x: torch.Tensor) -> None:
        n_b = x.shape[0]
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        n = self._count + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * n_b / n
        self._m2 = self._m2 + m2_b + delta**2 * self._count * n_b / n
        self._count = n

    @property
    def m2(self) -> torch.Tensor:
        """The sum of squared deviations from the mean ``(dim,)``."""
        self._flush()
        return self._m2

    def variance(self, regularize: bool = True, floor=1e-3) -> torch.Tensor:
        """Sample variance, regularised as Stan does, (n var + 5 floor) / (n + 5); ``floor``: a
        scalar or ``(dim,)`` (Stan's is 1e-3)."""
        var = self.m2 / max(self.count - 1, 1)
        if regularize:
            n = self.count
            var = (n / (n + 5.0)) * var + floor * (5.0 / (n + 5.0))
        return var


class WelfordCovariance(_RunningMoments):
    """Running mean and full covariance over a stream of batches ``(n, dim)``, pooled over chains
    (Chan et al.'s pairwise merge of a batch's scatter matrix into the running one)."""

    def __init__(self, dim: int, dtype=torch.float64, device=None):
        super().__init__(dim, dtype, device)
        self._scatter = torch.zeros(dim, dim, dtype=dtype, device=device)

    def _merge(self, x: torch.Tensor) -> None:
        n_b = x.shape[0]
        mean_b = x.mean(0)
        centred = x - mean_b
        n = self._count + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * n_b / n
        cross = torch.outer(delta, delta) * (self._count * n_b / n)
        self._scatter = self._scatter + centred.T @ centred + cross
        self._count = n

    @property
    def scatter(self) -> torch.Tensor:
        """The scatter matrix ``(dim, dim)``: the sum of outer products of deviations from the mean."""
        self._flush()
        return self._scatter

    def covariance(self, regularize: bool = True, floor=1e-3) -> torch.Tensor:
        r"""Sample covariance :math:`S`, shrunk as Stan does, :math:`\tfrac{n}{n+5} S +
        \tfrac{5}{n+5} \operatorname{diag}(f)`, so that a short window cannot give a singular
        metric; ``floor`` :math:`f` is a scalar or ``(dim,)`` (Stan's is :math:`10^{-3}`)."""
        n = self.count
        cov = self.scatter / max(n - 1, 1)
        if regularize:
            f = torch.as_tensor(floor, dtype=cov.dtype, device=cov.device).expand(cov.shape[0])
            cov = (n / (n + 5.0)) * cov + (5.0 / (n + 5.0)) * torch.diag(f)
        return cov

    def variance(self, regularize: bool = True, floor=1e-3) -> torch.Tensor:
        """The diagonal of :meth:`covariance` (Stan's diagonal regularisation is the same)."""
        return self.covariance(regularize, floor).diagonal().clone()


def stan_windows(num_warmup: int, init_buffer: int = 75, term_buffer: int = 50, base_window: int = 25):
    """Stan's warm-up schedule: ``(init_buffer, windows, term_buffer)``.

    An initial fast window of ``init_buffer`` iterations adapts the step size only (and lets the
    chains forget their starts); slow windows of doubling length (25, 50, 100, ...) each end with a
    metric estimated from the draws of that window alone; the last slow window is stretched to end
    ``term_buffer`` iterations before the end, which adapt the step size to the final metric.
    Windows are ``(start, end)`` iteration ranges. When ``init_buffer + base_window + term_buffer``
    exceeds ``num_warmup``, Stan's rule applies: 15% / 75% / 10%. Fewer than 20 warm-up iterations
    adapt the step size only (no window), as in Stan.
    """
    if num_warmup < 20:
        return num_warmup, [], 0
    if init_buffer + base_window + term_buffer > num_warmup:
        init_buffer = int(0.15 * num_warmup)
        term_buffer = int(0.1 * num_warmup)
        base_window = num_warmup - init_buffer - term_buffer
    last = num_warmup - term_buffer
    windows, start, size = [], init_buffer, base_window
    while start < last:
        end = start + size
        if end + 2 * size > last:  # the next window would not fit: stretch this one to the end
            end = last
        windows.append((start, end))
        start, size = end, 2 * size
    return init_buffer, windows, term_buffer


#: ``metric="auto"`` goes dense up to this dimension (a dense step costs O(dim^2), its estimate
#: needs many more draws than dim).
AUTO_DENSE_MAX_DIM = 200
#: ... when some correlation exceeds this in absolute value (a diagonal metric then leaves the
#: kernel a target elongated along a diagonal, whose step size is set by its narrowest direction),
AUTO_MAX_CORRELATION = 0.5
#: ... or the correlation matrix has a condition number above this (many moderate correlations
#: that add up, as in a regression on collinear predictors; a diagonal metric then costs about
#: sqrt(condition) times more leapfrog steps). Counted only with more than 10 dim draws: sample noise
#: alone gives about ((1 + sqrt(d/n)) / (1 - sqrt(d/n)))^2, under 4 at n = 10 d, under 20 at an
#: effective n of 2.5 d.
AUTO_MAX_CONDITION = 30.0


def choose_metric(kind: str, cov: torch.Tensor, count: int) -> str:
    """``"diag"`` or ``"dense"`` for a metric option ``kind`` given a pooled covariance estimate.

    ``"auto"`` picks dense when ``dim <= AUTO_DENSE_MAX_DIM`` and the estimated correlations are
    strong (:data:`AUTO_MAX_CORRELATION`, :data:`AUTO_MAX_CONDITION`; the condition number counts
    only with more than ``10 dim`` draws, below which it reflects sample noise).
    """
    if kind != "auto":
        return kind
    dim = cov.shape[0]
    if dim < 2 or dim > AUTO_DENSE_MAX_DIM:
        return "diag"
    sd = cov.diagonal().sqrt()
    corr = cov / torch.outer(sd, sd)
    off = corr - torch.diag(corr.diagonal())
    if float(off.abs().max()) > AUTO_MAX_CORRELATION:
        return "dense"
    if count > 10 * dim:
        eig = torch.linalg.eigvalsh(corr)
        if float(eig[-1] / eig[0].clamp_min(1e-300)) > AUTO_MAX_CONDITION:
            return "dense"
    return "diag"
