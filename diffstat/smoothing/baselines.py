r"""The simple training-free smoothed scores, kept as the baselines the Laplace estimator must beat.

Both estimate :math:`\mathbb E[X\mid y]` under :math:`p(x\mid y) \propto p(x)\,\mathcal N(x; y,
s^2 I)` by Monte Carlo; on the unequal two-mode target both get the posterior mode weights wrong
(SMS ends at heavy weight 0.50 and 0.49 for 0.667 at d = 8: ``benchmarks/bench_sms.py --estimator``).
"""

from __future__ import annotations

import math

import torch

from diffstat._util import check_positive_int
from diffstat.mcmc.base import MCMCState
from diffstat.mcmc.mala import mala_step
from diffstat.smoothing.base import SmoothedScore

__all__ = ["ImportanceSmoothedScore", "MCMCSmoothedScore"]


class ImportanceSmoothedScore(SmoothedScore):
    r"""Baseline: self-normalised importance sampling from :math:`\mathcal N(y, s^2 I)`.

    With :math:`x_i \sim \mathcal N(y, s^2 I)` the Gaussian factor cancels and
    :math:`\mathbb E[X\mid y] \approx \sum_i w_i x_i`, :math:`w \propto p(x_i)`. Its ESS collapses
    with the dimension (about 1 at d = 8 on the two-mode target; REFERENCES.md). ``spread`` is the
    SNIS standard error :math:`\sqrt{\sum_i w_i^2 \lVert x_i - \hat x\rVert^2 / d}`.
    """

    uses_target = True

    def __init__(self, target, *, num_samples: int = 256, generator: torch.Generator | None = None):
        super().__init__()
        self.target = target
        self.num_samples = check_positive_int(num_samples, "num_samples")
        self.generator = generator

    def denoise(self, y: torch.Tensor, sigma: float) -> torch.Tensor:
        n, d = y.shape
        k = self.num_samples
        if self.generator is None:
            self.generator = torch.Generator(device=y.device).manual_seed(0)
        x = y[:, None] + float(sigma) * torch.randn(
            n, k, d, generator=self.generator, dtype=y.dtype, device=y.device
        )
        log_w = self.target.log_prob(x.reshape(-1, d)).detach().reshape(n, k)
        w = torch.softmax(torch.nan_to_num(log_w, nan=-math.inf), -1)
        x_hat = (w[..., None] * x).sum(1)
        spread = torch.sqrt((w**2 * ((x - x_hat[:, None]) ** 2).sum(-1)).sum(-1) / d)
        self.last_info = {"spread": spread, "ess": 1.0 / (w**2).sum(-1)}
        return x_hat


class MCMCSmoothedScore(SmoothedScore):
    r"""Baseline: warm-started MALA on :math:`p(x\mid y) \propto p(x)\,\mathcal N(x; y, s^2 I)`.

    Each chain keeps its last point between calls (started at ``y`` on the first), runs
    ``num_steps`` MALA steps and averages the last ``num_steps // 2``. A chain inherits its starting
    basin, so the mode weights follow the starts, not the posterior (REFERENCES.md). The step size
    is :math:`h = \text{step\_scale}\cdot s^2` capped by a per-call dual-averaging-free rule: halved
    for the next call when the mean acceptance falls below 0.4, grown when above 0.8. ``spread`` is
    the standard deviation of the averaged draws over the square root of their number.
    """

    uses_target = True

    def __init__(
        self, target, *, num_steps: int = 8, step_scale: float = 0.1, generator: torch.Generator | None = None
    ):
        super().__init__()
        self.target = target
        self.num_steps = check_positive_int(num_steps, "num_steps")
        self.step_scale = float(step_scale)
        self.generator = generator
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.prev = None
        self._scale = self.step_scale

    def denoise(self, y: torch.Tensor, sigma: float) -> torch.Tensor:
        s2 = float(sigma) ** 2
        if self.generator is None:
            self.generator = torch.Generator(device=y.device).manual_seed(0)
        if self.prev is None or self.prev.shape != y.shape:
            self.prev = y.clone()

        def log_prob_and_grad(x):
            lp, g = self.target.log_prob_and_grad(x)
            return lp - ((x - y) ** 2).sum(-1) / (2 * s2), g - (x - y) / s2

        state = MCMCState(self.prev, *log_prob_and_grad(self.prev))
        keep = max(self.num_steps // 2, 1)
        draws, acc = [], []
        for i in range(self.num_steps):
            state, info = mala_step(self.generator, state, log_prob_and_grad, self._scale * s2)
            acc.append(info.acceptance_rate)
            if i >= self.num_steps - keep:
                draws.append(state.x)
        draws = torch.stack(draws, 1)
        mean_acc = float(torch.stack(acc).mean())
        self._scale *= 0.5 if mean_acc < 0.4 else (1.5 if mean_acc > 0.8 else 1.0)
        self.prev = state.x
        x_hat = draws.mean(1)
        spread = (
            torch.sqrt(draws.var(1, unbiased=True).mean(-1) / keep) if keep > 1 else torch.zeros_like(y[:, 0])
        )
        self.last_info = {"spread": spread, "acceptance_rate": torch.stack(acc).mean(0)}
        return x_hat
