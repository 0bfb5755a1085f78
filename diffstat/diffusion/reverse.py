r"""Reverse-time samplers: from draws of the prior at ``t_max`` to (approximate) draws of
:math:`p_{t_{\min}}`, given a score ``score_fn(x, t) -> (n, dim)`` (a trained model, or an exact
score in tests).

All samplers use the uniform grid :math:`t_{\max} = t_0 > t_1 > \dots > t_N = t_{\min}` of
``process.time_grid(num_steps)``, step :math:`h = t_k - t_{k+1}`, and draw their noise from the
``generator``. They are batched over the ``n`` points (every point at the same time) and cost
``num_steps`` score evaluations per point (times 4 for RK4, times ``1 + num_corrector`` for
predictor-corrector).

* :func:`euler_maruyama`: the reverse SDE :math:`x \leftarrow x - h\,[f(x, t) - g(t)^2 s(x,
  t)] + g(t)\sqrt h\,\xi`.
* :func:`predictor_corrector` (Song et al. 2021): before each Euler-Maruyama predictor step,
  ``num_corrector`` Langevin steps :math:`x \leftarrow x + \epsilon s + \sqrt{2\epsilon}\,\xi` on
  :math:`p_t`, with the step :math:`\epsilon = 2(r\, \overline{\lVert\xi\rVert} /
  \overline{\lVert s\rVert})^2` set by the signal-to-noise ratio :math:`r` = ``snr`` from norms
  averaged over the batch (one step for all points at a time, as in Song et al.'s code).
* :func:`ddpm_ancestral` (Ho et al. 2020): the exact Gaussian posterior
  :math:`p(x_{s} \mid x_t, x_0)` with :math:`x_0` replaced by its Tweedie estimate
  :math:`\hat x_0 = (x + \sigma_t^2 s)/\alpha_t`: mean :math:`(x + \sigma_{t|s}^2 s)/\alpha_{t|s}`,
  variance :math:`\sigma_{t|s}^2 \sigma_s^2/\sigma_t^2`, where :math:`\alpha_{t|s} =
  \alpha_t/\alpha_s` and :math:`\sigma_{t|s}^2 = \sigma_t^2 - \alpha_{t|s}^2 \sigma_s^2`.
* :func:`annealed_langevin` (NCSN, Song and Ermon 2019): Langevin at a decreasing sequence of
  noise levels, step :math:`a_i = \epsilon\,\sigma_i^2/\sigma_L^2`,
  :math:`x \leftarrow x + \tfrac{a_i}{2} s + \sqrt{a_i}\,\xi`.
* :func:`probability_flow`: RK4 on :math:`\dot x = f(x,t) - \tfrac12 g(t)^2 s(x,t)` with, on
  request, the log-density of the returned points by the instantaneous change of variables
  :math:`\frac{d}{dt}\log p_t(x(t)) = -\operatorname{div} v(x(t), t)`:

  .. math:: \log q(x(t_{\min})) = \log \pi(x(t_{\max})) + \int_{t_{\min}}^{t_{\max}}
            \operatorname{div} v(x(t), t)\, dt,

  integrated by the same RK4 steps. The divergence is exact
  (:func:`diffstat.diffusion.divergence.velocity_and_divergence`) or Hutchinson's
  :math:`\mathbb E[\varepsilon^\top \nabla v\, \varepsilon]` with Rademacher probes held fixed
  along each trajectory (FFJORD), unbiased for the log-density up to the
  discretisation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffstat._util import check_positive_int
from diffstat.diffusion.divergence import velocity_and_divergence
from diffstat.diffusion.processes import normal_draws

__all__ = [
    "probability_flow",
    "probability_flow_log_prob",
    "euler_maruyama",
    "predictor_corrector",
    "annealed_langevin",
    "ddpm_ancestral",
]

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_x(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a tensor of shape (n, dim), got {getattr(x, 'shape', type(x))}")
    return x.detach()


def _score(score_fn: ScoreFn, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    s = score_fn(x, t.expand(x.shape[0]))
    if s.shape != x.shape:
        raise ValueError(f"score_fn must return shape {tuple(x.shape)}, got {tuple(s.shape)}")
    return s


def _hutchinson(v: torch.Tensor, x: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """Hutchinson's estimate of ``div v`` at ``x`` (which requires grad) with probes ``(m, n, dim)``."""
    est = torch.zeros(x.shape[0], dtype=v.dtype, device=v.device)
    for eps in probes:
        (g,) = torch.autograd.grad((v * eps).sum(), x, retain_graph=True)
        est = est + (g * eps).sum(-1)
    return est / probes.shape[0]


def probability_flow(
    score_fn: ScoreFn,
    process,
    x: torch.Tensor,
    *,
    num_steps: int = 50,
    log_prob: bool = False,
    trace: str = "exact",
    generator: torch.Generator | None = None,
    num_probes: int = 1,
):
    r"""Integrate the probability-flow ODE from ``t_max`` to ``t_min`` with RK4.

    Parameters
    ----------
    score_fn : ``(x (n, dim), t (n,)) -> (n, dim)``, differentiable in ``x`` when ``log_prob``
    process : VP or VE
    x : (n, dim) points at ``t_max`` (from ``process.prior_sample``)
    num_steps : int
        RK4 steps (4 score evaluations each). 40 or more for accurate log-densities.
    log_prob : bool
        Also return the log-density of the returned points under the pushforward of the prior.
    trace : ``"exact"`` (:mod:`~diffstat.diffusion.divergence`; low ``dim``) or ``"hutchinson"``
    generator : torch.Generator
        Source of the Hutchinson probes (required then).
    num_probes : int
        Hutchinson probes per point.

    Returns
    -------
    x0 : (n, dim)
    log_q : (n,) or None
    """
    x = _check_x(x)
    num_steps = check_positive_int(num_steps, "num_steps")
    if trace not in ("exact", "hutchinson"):
        raise ValueError(f"trace must be 'exact' or 'hutchinson', got {trace!r}")
    ts = process.time_grid(num_steps, dtype=x.dtype, device=x.device)

    if not log_prob:

        def velocity(y, t):
            return process.probability_flow_drift(y, t, _score(score_fn, y, t))

        with torch.no_grad():
            for k in range(num_steps):
                x = _rk4_step(velocity, x, ts[k], ts[k + 1])
        return x, None

    x0, delta = _flow_with_divergence(score_fn, process, x, ts, trace, generator, num_probes)
    return x0, process.prior_log_prob(x) + delta


def probability_flow_log_prob(
    score_fn: ScoreFn,
    process,
    x: torch.Tensor,
    *,
    num_steps: int = 50,
    trace: str = "exact",
    generator: torch.Generator | None = None,
    num_probes: int = 1,
    return_prior_point: bool = False,
):
    r"""Log-density at given points ``x: (n, dim)`` of the probability-flow model at ``t_min``.

    Integrates the ODE forward, ``t_min -> t_max`` (RK4, ``num_steps``), from :math:`x` to
    :math:`x_T` and returns :math:`\log q(x) = \log\pi(x_T) + \int_{t_{\min}}^{t_{\max}}
    \operatorname{div} v\,dt` (module notes), shape ``(n,)``; with ``return_prior_point`` also
    :math:`x_T`. This is what an importance sampler needs to evaluate the flow's density at points
    drawn from another proposal (for instance a defensive mixture component). Up to the
    discretisation of both solves, it agrees with the ``log_q`` of :func:`probability_flow`.
    """
    x = _check_x(x)
    num_steps = check_positive_int(num_steps, "num_steps")
    if trace not in ("exact", "hutchinson"):
        raise ValueError(f"trace must be 'exact' or 'hutchinson', got {trace!r}")
    ts = process.time_grid(num_steps, dtype=x.dtype, device=x.device).flip(0)
    x_t, delta = _flow_with_divergence(score_fn, process, x, ts, trace, generator, num_probes)
    log_q = process.prior_log_prob(x_t) - delta
    return (log_q, x_t) if return_prior_point else log_q


def _flow_with_divergence(score_fn, process, x, ts, trace, generator, num_probes):
    """RK4 along the grid ``ts`` of the state ``(x, l)`` with ``dl/dt = -div v``; returns the end
    point and ``l_end - l_start``."""
    probes = None
    if trace == "hutchinson":
        if generator is None:
            raise ValueError("trace='hutchinson' needs a generator for its probes")
        probes = torch.sign(
            normal_draws(
                (check_positive_int(num_probes, "num_probes"),) + tuple(x.shape), generator, x.dtype, x.device
            )
        )

    def augmented(state, t):
        if trace == "exact":
            v, div = velocity_and_divergence(score_fn, process, state[:, :-1], t)
            return torch.cat([v, -div.unsqueeze(-1)], -1)
        y = state[:, :-1].detach().requires_grad_(True)
        with torch.enable_grad():
            v = process.probability_flow_drift(y, t, _score(score_fn, y, t))
            div = _hutchinson(v, y, probes)
        return torch.cat([v.detach(), -div.detach().unsqueeze(-1)], -1)

    state = torch.cat([x, torch.zeros_like(x[:, :1])], -1)
    for k in range(ts.shape[0] - 1):
        state = _rk4_step(augmented, state, ts[k], ts[k + 1])
    return state[:, :-1], state[:, -1]


def _rk4_step(f, y: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
    """One classical Runge-Kutta step of ``dy/dt = f(y, t)`` from ``t0`` to ``t1``."""
    h = t1 - t0
    k1 = f(y, t0)
    k2 = f(y + 0.5 * h * k1, t0 + 0.5 * h)
    k3 = f(y + 0.5 * h * k2, t0 + 0.5 * h)
    k4 = f(y + h * k3, t1)
    return y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def _em_step(score_fn, process, x, t, t_next, generator, add_noise=True):
    h = t - t_next
    drift = process.reverse_drift(x, t, _score(score_fn, x, t))
    x_mean = x - h * drift
    if not add_noise:
        return x_mean
    return x_mean + process.diffusion(t) * torch.sqrt(h) * normal_draws(x.shape, generator, x.dtype, x.device)


def euler_maruyama(
    score_fn: ScoreFn,
    process,
    x: torch.Tensor,
    *,
    num_steps: int,
    generator: torch.Generator,
    denoise: bool = False,
) -> torch.Tensor:
    """Euler-Maruyama on the reverse-time SDE from ``t_max`` to ``t_min``.

    ``x: (n, dim)`` at ``t_max``; ``denoise=True`` leaves out the noise of the last step (returns
    its mean). Returns ``(n, dim)``.
    """
    x = _check_x(x)
    num_steps = check_positive_int(num_steps, "num_steps")
    ts = process.time_grid(num_steps, dtype=x.dtype, device=x.device)
    with torch.no_grad():
        for k in range(num_steps):
            x = _em_step(
                score_fn,
                process,
                x,
                ts[k],
                ts[k + 1],
                generator,
                add_noise=not (denoise and k == num_steps - 1),
            )
    return x


def predictor_corrector(
    score_fn: ScoreFn,
    process,
    x: torch.Tensor,
    *,
    num_steps: int,
    num_corrector: int = 1,
    snr: float = 0.16,
    generator: torch.Generator,
    denoise: bool = False,
) -> torch.Tensor:
    """Predictor-corrector sampling: ``num_corrector`` Langevin steps on :math:`p_t` (step set by
    ``snr``, module notes), then one Euler-Maruyama step, at each of the ``num_steps`` times.
    Returns ``(n, dim)``."""
    x = _check_x(x)
    num_steps = check_positive_int(num_steps, "num_steps")
    if num_corrector < 0 or not snr > 0:
        raise ValueError(f"need num_corrector >= 0 and snr > 0, got {num_corrector}, {snr}")
    ts = process.time_grid(num_steps, dtype=x.dtype, device=x.device)
    with torch.no_grad():
        for k in range(num_steps):
            t = ts[k]
            for _ in range(num_corrector):
                s = _score(score_fn, x, t)
                xi = normal_draws(x.shape, generator, x.dtype, x.device)
                # batch-averaged norms (Song et al.): a step that depended on each point's own
                # score norm would be state-dependent and bias the Langevin stationary law.
                ratio = xi.norm(dim=-1).mean() / s.norm(dim=-1).mean().clamp_min(torch.finfo(x.dtype).tiny)
                eps = 2 * (snr * ratio) ** 2
                x = x + eps * s + torch.sqrt(2 * eps) * xi
            x = _em_step(
                score_fn, process, x, t, ts[k + 1], generator, add_noise=not (denoise and k == num_steps - 1)
            )
    return x


def ddpm_ancestral(
    score_fn: ScoreFn,
    process,
    x: torch.Tensor,
    *,
    num_steps: int,
    generator: torch.Generator,
    denoise: bool = False,
) -> torch.Tensor:
    """Ancestral sampling through the Gaussian posteriors of the discretised forward chain
    (module notes), for VP and VE alike. ``denoise=True`` returns the last step's mean.
    Returns ``(n, dim)``."""
    x = _check_x(x)
    num_steps = check_positive_int(num_steps, "num_steps")
    ts = process.time_grid(num_steps, dtype=x.dtype, device=x.device)
    with torch.no_grad():
        for k in range(num_steps):
            t, s = ts[k], ts[k + 1]
            a_ts = process.alpha(t) / process.alpha(s)
            sig_t2, sig_s2 = process.sigma(t) ** 2, process.sigma(s) ** 2
            var_ts = sig_t2 - a_ts**2 * sig_s2
            x = (x + var_ts * _score(score_fn, x, t)) / a_ts
            if not (denoise and k == num_steps - 1):
                x = x + torch.sqrt(var_ts * sig_s2 / sig_t2) * normal_draws(
                    x.shape, generator, x.dtype, x.device
                )
    return x


def annealed_langevin(
    score_fn: ScoreFn,
    sigmas,
    x: torch.Tensor,
    *,
    steps_per_level: int,
    step_scale: float,
    generator: torch.Generator,
    process=None,
    denoise: bool = False,
) -> torch.Tensor:
    r"""Annealed Langevin dynamics (NCSN, Algorithm 1 of Song and Ermon 2019).

    Parameters
    ----------
    score_fn : ``(x, c) -> (n, dim)`` with ``c`` the noise level :math:`\sigma_i` (shape ``(n,)``),
        or the time ``process.time_at_sigma(sigma_i)`` when a ``process`` is given (a model
        trained on that process).
    sigmas : decreasing noise levels :math:`\sigma_1 > \dots > \sigma_L`
    x : (n, dim) start (typically :math:`\mathcal N(0, \sigma_1^2 I)`)
    steps_per_level : int
    step_scale : float
        :math:`\epsilon`: the step at level ``i`` is :math:`\epsilon\,\sigma_i^2/\sigma_L^2`.
    denoise : bool
        Finish with the Tweedie step :math:`x + \sigma_L^2 s(x, \sigma_L)`.

    Returns
    -------
    (n, dim)
    """
    x = _check_x(x)
    steps_per_level = check_positive_int(steps_per_level, "steps_per_level")
    sigmas = torch.as_tensor(sigmas, dtype=x.dtype, device=x.device).reshape(-1)
    if sigmas.numel() == 0 or (sigmas <= 0).any() or (sigmas[1:] > sigmas[:-1]).any():
        raise ValueError("sigmas must be a non-empty decreasing sequence of positive noise levels")
    if not step_scale > 0:
        raise ValueError(f"step_scale must be positive, got {step_scale}")
    conds = process.time_at_sigma(sigmas) if process is not None else sigmas
    sigma_last = sigmas[-1]
    with torch.no_grad():
        for sigma, c in zip(sigmas, conds):
            a = step_scale * sigma**2 / sigma_last**2
            for _ in range(steps_per_level):
                xi = normal_draws(x.shape, generator, x.dtype, x.device)
                x = x + 0.5 * a * _score(score_fn, x, c) + torch.sqrt(a) * xi
        if denoise:
            x = x + sigma_last**2 * _score(score_fn, x, conds[-1])
    return x
