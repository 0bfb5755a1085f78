r"""Smoothed scores :math:`\nabla \log q_\sigma` of :math:`q_\sigma = p * \mathcal N(0, \sigma^2 I)`.

Walk-jump and SMS need, for points ``y: (n, dim)`` and a noise level ``sigma``, the score of the
Gaussian-smoothed target and the empirical-Bayes denoiser (Tweedie, Robbins, Miyasawa)

.. math::
    \hat x(y) = \mathbb E[X \mid Y = y] = y + \sigma^2 \nabla \log q_\sigma(y),
    \qquad p(x \mid y) \propto p(x)\, \mathcal N(x; y, \sigma^2 I).

Every provider here is a :class:`SmoothedScore`: ``provider(y, sigma) -> (n, dim)`` and
``provider.denoise(y, sigma)``; after each call ``provider.last_info`` holds per-point diagnostics
(``spread``: the estimator's standard error of :math:`\mathbb E[X\mid y]`, root mean square over
coordinates; for the Laplace estimator also ``num_modes``). The sources:

- :class:`ExactSmoothedScore` (:mod:`~diffstat.smoothing.base`, with the interface): a closed form
  passed as ``smoothed_score=`` (for an isotropic mixture, :func:`isotropic_mixture_smoothed_score`;
  for a Gaussian mixture, :meth:`diffstat.targets.GaussianMixture.smoothed_score`).
- :class:`LaplaceSmoothedScore` (:mod:`~diffstat.smoothing.laplace_score`): training-free, from the
  log-density only; the multi-start
  estimator with a mode bank shared by all chains, which keeps the relative masses of the posterior
  modes right (REFERENCES.md, "Measured here: training-free SMS"). Its building blocks, damped
  Newton ascent and mode exploration, live in :mod:`diffstat.smoothing.laplace`.
- :class:`ImportanceSmoothedScore` and :class:`MCMCSmoothedScore`: the simple training-free
  baselines (self-normalised importance sampling from :math:`\mathcal N(y, \sigma^2 I)`; warm-started
  MALA on :math:`p(x\mid y)`). Both get the mode weights wrong on the two-mode target; they are kept
  as the baselines the Laplace estimator must beat.
- :class:`~diffstat.smoothing.learned.LearnedSmoothedScore`: a noise-conditional network of
  :mod:`diffstat.diffusion`.

All target evaluations go through the :class:`~diffstat.Target` and are counted there. This module
is the front: the classes above and :func:`resolve_smoothed_score`, which picks one for a sampler.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffstat.smoothing.base import ExactSmoothedScore, SmoothedScore
from diffstat.smoothing.laplace_score import LaplaceSmoothedScore

__all__ = [
    "SmoothedScore",
    "ExactSmoothedScore",
    "LaplaceSmoothedScore",
    "resolve_smoothed_score",
    "isotropic_mixture_smoothed_score",
]


def isotropic_mixture_smoothed_score(
    means, weights, variances
) -> Callable[[torch.Tensor, float], torch.Tensor]:
    r"""The exact smoothed score of :math:`\sum_k w_k \mathcal N(\mu_k, v_k I)`, a fast closed form:
    :math:`q_\sigma = \sum_k w_k \mathcal N(\mu_k, (v_k + \sigma^2) I)`, so

    .. math:: \nabla\log q_\sigma(y) = \sum_k r_k(y)\, \frac{\mu_k - y}{v_k + \sigma^2},\qquad
        r_k \propto w_k (v_k + \sigma^2)^{-d/2} e^{-\lVert y - \mu_k\rVert^2 / (2 (v_k + \sigma^2))}.

    ``means: (K, d)``, ``weights: (K,)``, ``variances: (K,)``; returns ``fn(y (n, d), sigma)``.
    """
    means = torch.as_tensor(means, dtype=torch.float64)
    log_w = torch.log(
        torch.as_tensor(weights, dtype=torch.float64) / torch.as_tensor(weights, dtype=torch.float64).sum()
    )
    variances = torch.as_tensor(variances, dtype=torch.float64).expand(means.shape[0])
    d = means.shape[1]

    def fn(y: torch.Tensor, sigma: float) -> torch.Tensor:
        mu, lw, v = (t.to(device=y.device, dtype=y.dtype) for t in (means, log_w, variances))
        var = v + float(sigma) ** 2  # (K,)
        sq = (y**2).sum(-1, keepdim=True) - 2 * y @ mu.T + (mu**2).sum(-1)  # (n, K)
        r = torch.softmax(lw - 0.5 * d * torch.log(var) - 0.5 * sq / var, -1)
        return (r / var) @ mu - y * (r / var).sum(-1, keepdim=True)

    return fn


def resolve_smoothed_score(
    target, smoothed_score=None, *, estimator: str = "auto", generator=None, **options
) -> SmoothedScore:
    """The provider a sampler uses: ``smoothed_score`` (a callable or a :class:`SmoothedScore`), else
    ``estimator``: ``"learned"`` (the default, ``"auto"``): a score network fitted from the log-density by
    :func:`~diffstat.smoothing.fit.fit_smoothed_score` with ``options`` (or, given ``options["x0"]`` and
    ``options["grad0"]``, :meth:`LearnedSmoothedScore.fit` to those draws); or the training-free
    ``"laplace"`` and the baselines ``"importance"``, ``"mcmc"``, built with ``options``. The
    learned score is the default because its cost is paid once (a particle population and a short
    training) and it can be kept and reused, while the training-free ones pay per draw and per step."""
    # Exact information comes only through the explicit smoothed_score=, never from an attribute
    # of the target (a benchmark target must not hand its answer to the sampler unasked).
    if smoothed_score is None and estimator == "exact":
        raise ValueError("estimator='exact' needs smoothed_score=(y, sigma) -> grad log q_sigma(y)")
    if smoothed_score is None and estimator in (None, "auto"):
        estimator = "learned"
    if isinstance(smoothed_score, SmoothedScore):
        return smoothed_score
    if smoothed_score is not None:
        return ExactSmoothedScore(smoothed_score)
    if estimator == "laplace":
        return LaplaceSmoothedScore(target, generator=generator, **options)
    if estimator in ("importance", "mcmc"):
        from diffstat.smoothing.baselines import ImportanceSmoothedScore, MCMCSmoothedScore

        cls = ImportanceSmoothedScore if estimator == "importance" else MCMCSmoothedScore
        return cls(target, generator=generator, **options)
    if estimator == "learned":
        from diffstat.smoothing.learned import LearnedSmoothedScore

        if "x0" in options:  # a score fitted to given draws (and scores)
            return LearnedSmoothedScore.fit(generator=generator, **options)
        from diffstat.smoothing.fit import fit_smoothed_score

        return fit_smoothed_score(target, generator=generator, **options)
    raise ValueError(
        f"unknown smoothed-score estimator {estimator!r}; use 'auto', 'exact', 'laplace', 'importance', "
        "'mcmc' or 'learned'"
    )
