"""Small helpers shared by the samplers: argument checks, progress bars, log-weight algebra."""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = [
    "check_options",
    "check_positive_int",
    "check_probability",
    "progress_bar",
    "log_mean_exp",
    "ess_from_log_weights",
    "normalized_weights",
    "log_normalizer_estimate",
]


def check_options(options: dict, allowed: set, method: str) -> None:
    """``ValueError`` naming any option ``method`` does not know (a typo would silently do nothing)."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) for method {method!r}: {', '.join(unknown)}; known: {', '.join(sorted(allowed))}"
        )


def check_positive_int(value, name: str) -> int:
    """Return ``value`` as an int, or raise ``ValueError`` if it is not a positive integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_probability(value, name: str, *, open_interval: bool = True) -> float:
    """Return ``value`` as a float in (0, 1) (or [0, 1]), or raise ``ValueError``."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}") from None
    ok = 0.0 < value < 1.0 if open_interval else 0.0 <= value <= 1.0
    if not ok:
        raise ValueError(f"{name} must lie in {'(0, 1)' if open_interval else '[0, 1]'}, got {value}")
    return value


def progress_bar(total: int, desc: str, progress: bool):
    """A tqdm progress bar, silent when ``progress`` is False."""
    return tqdm(total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)


def log_mean_exp(log_w: torch.Tensor, dim: int = -1) -> torch.Tensor:
    r"""Stable :math:`\log \frac1n \sum_i e^{w_i}` along ``dim``."""
    return torch.logsumexp(log_w, dim=dim) - math.log(log_w.shape[dim])


def normalized_weights(log_w: torch.Tensor) -> torch.Tensor:
    """Self-normalised weights from log weights ``(n,)``; invariant to adding a constant."""
    return torch.softmax(log_w, dim=-1)


def ess_from_log_weights(log_w: torch.Tensor) -> torch.Tensor:
    r"""Kish effective sample size :math:`(\sum w)^2 / \sum w^2` of log weights ``(..., n)``."""
    return torch.exp(2 * torch.logsumexp(log_w, -1) - torch.logsumexp(2 * log_w, -1))


def log_normalizer_estimate(log_w: torch.Tensor) -> tuple[float, float]:
    r"""Importance-sampling estimate of :math:`\log Z` and its delta-method standard error.

    With :math:`\hat Z = \frac1n \sum_i w_i`, :math:`\mathrm{se}(\log \hat Z) \approx
    \mathrm{sd}(w) / (\sqrt{n}\, \bar w)`, computed stably on the log scale.
    """
    log_w = log_w.detach().double().flatten()
    log_w = log_w[torch.isfinite(log_w) | (log_w == -math.inf)]
    n = log_w.numel()
    log_z = float(log_mean_exp(log_w))
    rel = torch.exp(log_w - log_z)  # w_i / mean(w)
    se = float(rel.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
    return log_z, se
