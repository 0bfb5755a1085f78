r"""The smoothed-score interface that every provider implements, and the closed-form provider.

A provider maps points ``y: (n, dim)`` and a noise level ``sigma`` to :math:`\nabla\log q_\sigma(y)`
(``provider(y, sigma)``) and to the empirical-Bayes denoiser :math:`\mathbb E[X\mid Y = y] = y +
\sigma^2\nabla\log q_\sigma(y)` (``provider.denoise(y, sigma)``), each defined from the other;
``last_info`` holds the last call's per-point diagnostics. The sources are listed in
:mod:`diffstat.smoothing.scores`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["SmoothedScore", "ExactSmoothedScore"]


class SmoothedScore:
    r"""Interface: ``__call__(y (n, dim), sigma) -> grad log q_sigma(y) (n, dim)``.

    Subclasses implement :meth:`denoise` (the posterior mean :math:`\mathbb E[X\mid y]`) or
    :meth:`__call__`; each defines the other through Tweedie's formula. ``last_info`` holds the
    diagnostics of the last call, each ``(n,)``.
    """

    #: Does this provider call the target (and so count evaluations)?
    uses_target: bool = False

    def __init__(self):
        self.last_info: dict[str, torch.Tensor] = {}

    def __call__(self, y: torch.Tensor, sigma: float) -> torch.Tensor:
        return (self.denoise(y, sigma) - y) / float(sigma) ** 2

    def denoise(self, y: torch.Tensor, sigma: float) -> torch.Tensor:
        r""":math:`\mathbb E[X \mid Y = y] = y + \sigma^2 \nabla\log q_\sigma(y)`, ``(n, dim)``."""
        return y + float(sigma) ** 2 * self(y, sigma)

    def reset(self) -> None:
        """Forget per-chain state (warm starts); called at the start of each sampler run."""
        self.last_info = {}


class ExactSmoothedScore(SmoothedScore):
    """A closed-form smoothed score ``fn(y, sigma) -> (n, dim)``; zero spread."""

    def __init__(self, fn: Callable[[torch.Tensor, float], torch.Tensor]):
        super().__init__()
        if not callable(fn):
            raise ValueError(
                f"smoothed_score must be callable (y, sigma) -> (n, dim), got {type(fn).__name__}"
            )
        self.fn = fn
        self._checked = False

    def __call__(self, y: torch.Tensor, sigma: float) -> torch.Tensor:
        out = self.fn(y, float(sigma))
        if not torch.is_tensor(out) or out.shape != y.shape:
            shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise ValueError(f"smoothed_score must return a tensor of shape {tuple(y.shape)}, got {shape}")
        if not self._checked:  # the first call only: no host synchronisation per step
            bad = torch.isfinite(y).all(-1) & ~torch.isfinite(out).all(-1)
            if bool(bad.any()):
                raise ValueError(
                    f"smoothed_score returned NaN or infinite values at {int(bad.sum())} of {y.shape[0]} "
                    "finite starting points"
                )
            self._checked = True
        self.last_info = {"spread": torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)}
        return out.to(y.dtype)
