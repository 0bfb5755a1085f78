r"""The steps of SMS: one measurement at a time (sequential), or all at once (joint, JMS).

Sequential (:func:`sms_init`, :func:`sms_step`): measurement :math:`m` is drawn by a Langevin walk
(:mod:`~diffstat.smoothing.walks`) on :math:`p(y_m \mid y_{1:m-1})`, whose score
(:func:`conditional_score`) needs only the smoothed score at the running mean
:math:`\bar y_m`; the walk starts at the previous jump plus :math:`\sigma` noise, and ends with the
jump :math:`\hat x_m = \mathbb E[X \mid \bar y_m]` at noise :math:`\sigma/\sqrt m`.

Joint (:func:`joint_walk`, :func:`jms_init`, :func:`jms_jump`): underdamped Langevin on all
:math:`M` measurements at once, with :math:`\nabla_{y_i}\log p(y_{1:M}) =
\frac1M\nabla\log q_{\sigma/\sqrt M}(\bar y) - (y_i - \bar y)/\sigma^2`, started from a rough draw
(centre plus ``scale`` noise) plus :math:`\sigma` noise per measurement.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from diffstat.mcmc.langevin import Score
from diffstat.smoothing.walks import Walk, underdamped_walk

__all__ = [
    "conditional_score",
    "SMSState",
    "SMSInfo",
    "sms_init",
    "sms_step",
    "joint_walk",
    "jms_init",
    "jms_jump",
]


def conditional_score(
    y: torch.Tensor, sum_prev: torch.Tensor, m: int, sigma: float, smoothed_score
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The score of :math:`p(y_m \mid y_{1:m-1})` at ``y: (n, d)``, given the sum of the previous
    measurements ``sum_prev: (n, d)`` (zero for ``m = 1``, where this is the score of
    :math:`q_\sigma`). Returns ``(score, ybar, psi)`` with :math:`\psi = \nabla\log
    q_{\sigma/\sqrt m}(\bar y_m)`, where

    .. math::
        \nabla_{y_m} \log p(y_m \mid y_{1:m-1}) = \frac{1}{\sigma^2}\Big[\bar y_m - y_m
        + \frac{\sigma^2}{m}\psi\Big],\qquad \bar y_m = \frac1m \sum_{i\le m} y_i.
    """
    ybar = (sum_prev + y) / m
    psi = smoothed_score(ybar, sigma / math.sqrt(m))
    return (ybar - y + (sigma**2 / m) * psi) / sigma**2, ybar, psi


class SMSState(NamedTuple):
    """After ``m`` measurements: their sum ``total: (n, d)`` and the last jump ``jump: (n, d)``
    (before the first, the starting points of the first walk)."""

    total: torch.Tensor
    jump: torch.Tensor
    m: int


class SMSInfo(NamedTuple):
    """One measurement: its noise level :math:`\\sigma/\\sqrt m`, the smoothed score's diagnostics
    of the jump (``provider.last_info``: ``spread``, ``num_modes``, ``fit_ess``, each ``(n,)``, those
    the provider reports) and ``num_evals``, the target evaluations of the step."""

    noise_level: float
    score_info: dict
    num_evals: int


def sms_init(y0: torch.Tensor) -> SMSState:
    """Before the first measurement, whose walk starts at ``y0: (n, d)`` (draws near :math:`q_\\sigma`)."""
    return SMSState(torch.zeros_like(y0), y0, 0)


def sms_step(
    generator: torch.Generator,
    state: SMSState,
    provider,
    sigma: float,
    make_walk: Callable[[Score], Walk],
    num_steps: int,
    target,
) -> tuple[SMSState, SMSInfo]:
    """Measurement ``m = state.m + 1``: ``num_steps`` steps of ``make_walk(score)`` on the conditional
    score from the last jump plus :math:`\\sigma` noise (from ``state.jump`` itself for ``m = 1``),
    then the jump at :math:`\\bar y_m`. ``target`` only counts evaluations."""
    evals0, m = target.num_target_evals, state.m + 1
    y = state.jump
    if m > 1:
        y = y + sigma * torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device)
    walk = make_walk(lambda z: conditional_score(z, state.total, m, sigma, provider)[0])
    walk_state = walk.init(generator, y)
    for _ in range(num_steps):
        walk_state, _ = walk.step(generator, walk_state)
    total = state.total + walk.position(walk_state)
    x_hat = provider.denoise(total / m, sigma / math.sqrt(m))
    info = SMSInfo(sigma / math.sqrt(m), provider.last_info, target.num_target_evals - evals0)
    return SMSState(total, x_hat, m), info


def joint_walk(provider, sigma: float, num_measurements: int, step_size: float, friction: float) -> Walk:
    """Underdamped Langevin on the joint density of ``num_measurements`` measurements, flattened to
    ``(n, num_measurements * d)``."""
    big_m, s_m = num_measurements, sigma / math.sqrt(num_measurements)

    def joint_score(flat: torch.Tensor) -> torch.Tensor:
        yy = flat.reshape(flat.shape[0], big_m, -1)
        yb = yy.mean(1)
        psi = provider(yb, s_m)
        return (psi[:, None] / big_m - (yy - yb[:, None]) / sigma**2).reshape(flat.shape)

    return underdamped_walk(joint_score, step_size, friction)


def jms_init(
    generator: torch.Generator, walk: Walk, center: torch.Tensor, scale: float, sigma: float, shape
) -> object:
    """The joint walk's start: ``center + scale`` noise, the same per measurement, plus ``sigma`` noise
    each; ``shape = (n, M, d)``."""
    n, big_m, d = shape
    like = {"generator": generator, "dtype": center.dtype, "device": center.device}
    x_rough = center + scale * torch.randn(n, 1, d, **like)
    ys = x_rough + sigma * torch.randn(n, big_m, d, **like)
    return walk.init(generator, ys.reshape(n, -1))


def jms_jump(walk: Walk, walk_state, provider, sigma: float, num_measurements: int):
    """``(ybar (n, d), jump (n, d))`` at the joint walk's measurements."""
    y = walk.position(walk_state)
    ybar = y.reshape(y.shape[0], num_measurements, -1).mean(1)
    return ybar, provider.denoise(ybar, sigma / math.sqrt(num_measurements))
