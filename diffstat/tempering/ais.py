r"""Annealed importance sampling (Neal 2001): ``ds.sample(target, "ais", ...)``.

Independent particles :math:`x_0 \sim \rho` follow a fixed schedule
:math:`0 = \beta_0 < \beta_1 < \dots < \beta_K = 1` along the geometric path
(:mod:`diffstat.tempering.path`). At temperature :math:`k` each particle's log weight gains
:math:`(\beta_k - \beta_{k-1})\,\delta(x_{k-1})` and the particle then makes ``num_mcmc_steps``
MCMC moves leaving :math:`\pi_{\beta_k}` invariant:

.. math::
    \log w = \sum_{k=1}^K (\beta_k - \beta_{k-1})\, \delta(x_{k-1}),
    \qquad \mathbb E[w] = Z,

so :math:`\hat Z = \frac1n\sum_i w_i`, with the importance-sampling (delta-method) standard error of
:func:`diffstat._util.log_normalizer_estimate` (the particles are independent). Without moves the
weights telescope to :math:`\delta(x_0) = \log\tilde\pi(x_0) - \log\rho(x_0)`: plain importance
sampling from the reference.

Default schedule: geometric, :math:`\beta_k = \beta_{\min}^{1 - k/K}` (:math:`\beta_{\min} =
10^{-4}`, :math:`\beta_0 = 0`), dense at small :math:`\beta` where a concentrated likelihood
changes the density fastest; ``schedule="sigmoid"`` is the schedule of Grosse, Maddison and
Salakhutdinov (2013), :math:`\tilde\beta_k = \sigma(\kappa (2k/K - 1))` rescaled to run from 0
to 1 (:math:`\kappa = 4`), dense at both ends; ``"linear"`` equal steps; ``betas=`` any increasing
sequence ending at 1. Measured here (K = 200, 500 particles, 5 to 8 seeds): on a conjugate normal
model whose posterior is 18 times narrower than the prior, geometric errs by at most 0.12 nats and
sigmoid by up to 0.25; on 2- and 10-d Gaussian mixtures from N(0, I), sigmoid has RMSE 0.01 to 0.03
and geometric 0.03 to 0.05.

Step sizes are per temperature: one step size, carried from temperature to temperature and adapted
after every move from the mean acceptance probability, and (``adapt_scale``) a diagonal
preconditioner from the weighted particle variance.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from diffstat._util import check_options, check_positive_int, check_probability, log_normalizer_estimate, progress_bar
from diffstat.sampling import SamplerResult, register_sampler
from diffstat.tempering.path import (
    GeometricPath,
    PathState,
    adaptive_moves,
    default_step_size,
    get_kernel,
    incremental_log_weights,
    make_path,
)
from diffstat.tempering.resampling import ess, resample
from diffstat.tempering.smc import _check_betas, _check_initial, initial_particles, preconditioner

__all__ = ["AISOutput", "ais", "schedule", "ais_sampler"]

#: Steepness of the sigmoid schedule (Grosse et al. 2013 use 4).
_SIGMOID_STEEPNESS = 4.0
#: Smallest positive temperature of the (default) geometric schedule.
_GEOMETRIC_BETA_MIN = 1e-4


class AISOutput(NamedTuple):
    """Result of AIS: the final particles (a :class:`PathState`), their log weights ``(n,)``,
    per-temperature tensors ``stages`` (``beta``, ``ess`` fraction, ``log_z_increment``,
    ``acceptance_rate``, ``step_size``) and each particle's acceptance at the last temperature."""

    particles: PathState
    log_weights: torch.Tensor
    stages: dict[str, torch.Tensor]
    acceptance: torch.Tensor


def schedule(num_temperatures: int, kind: str = "geometric", *, dtype=torch.float64, device=None) -> torch.Tensor:
    """``num_temperatures`` inverse temperatures ``(K,)`` in (0, 1], increasing, the last 1 (the
    starting 0 is implicit)."""
    k_total = check_positive_int(num_temperatures, "num_temperatures")
    k = torch.arange(k_total + 1, dtype=dtype, device=device) / k_total
    if kind == "sigmoid":
        s = torch.sigmoid(_SIGMOID_STEEPNESS * (2 * k - 1))
        b = (s - s[0]) / (s[-1] - s[0])
    elif kind == "geometric":
        b = _GEOMETRIC_BETA_MIN ** (1 - k)
        b[0] = 0.0
    elif kind == "linear":
        b = k
    else:
        raise ValueError(f"schedule must be 'sigmoid', 'geometric' or 'linear', got {kind!r}")
    b[-1] = 1.0
    return b[1:]


def ais(
    generator: torch.Generator,
    path: GeometricPath,
    x0: torch.Tensor,
    betas: torch.Tensor,
    *,
    kernel: str = "mala",
    num_mcmc_steps: int = 1,
    num_leapfrog: int = 5,
    step_size: float | None = None,
    target_accept: float | None = None,
    adapt_scale: bool = True,
    progress: bool = False,
) -> AISOutput:
    """Run AIS from the reference draws ``x0: (n, dim)`` through ``betas: (K,)`` (ending at 1).

    ``num_mcmc_steps=0`` replaces the moves by the identity (plain importance sampling, whose
    weights are ``log target(x0) - log reference(x0)``).
    """
    betas = _check_betas(betas, x0)
    if int(num_mcmc_steps) < 0:
        raise ValueError(f"num_mcmc_steps must be non-negative, got {num_mcmc_steps}")
    step, default_accept = get_kernel(kernel, num_leapfrog)
    target_accept = default_accept if target_accept is None else check_probability(target_accept, "target_accept")
    h0 = default_step_size(kernel, path.dim) if step_size is None else float(step_size)
    if not h0 > 0:
        raise ValueError(f"step_size must be positive, got {step_size}")
    n, dtype, device = x0.shape[0], x0.dtype, x0.device

    ps = path.evaluate(x0)
    _check_initial(ps)
    log_w = torch.zeros(n, dtype=dtype, device=device)
    log_h = torch.tensor(math.log(h0), dtype=dtype, device=device)
    beta = torch.zeros((), dtype=dtype, device=device)
    records: dict[str, list] = {k: [] for k in ("beta", "ess", "log_z_increment", "acceptance_rate", "step_size")}
    acc = torch.full((n,), math.nan, dtype=dtype, device=device)
    with progress_bar(len(betas), "ais", progress) as bar:
        for new_beta in betas:
            incr = incremental_log_weights(ps, beta, new_beta)
            records["log_z_increment"].append(torch.logsumexp(torch.log_softmax(log_w, -1) + incr, -1))
            log_w = log_w + incr
            records["ess"].append(ess(log_w) / n)
            records["step_size"].append(torch.exp(log_h))
            inv_mass = preconditioner(ps.x, log_w) if adapt_scale and num_mcmc_steps else None
            ps, log_h, acc = adaptive_moves(
                step, generator, ps, path, new_beta, log_h, int(num_mcmc_steps),
                inv_mass=inv_mass, target_accept=target_accept,
            )
            records["beta"].append(new_beta)
            records["acceptance_rate"].append(acc.mean())
            beta = new_beta
            bar.update()
    stages = {key: torch.stack(vals) for key, vals in records.items()}
    return AISOutput(ps, log_w, stages, acc)


_OPTIONS = {
    "reference", "betas", "num_temperatures", "schedule", "kernel", "num_mcmc_steps", "num_leapfrog",
    "step_size", "target_accept", "adapt_scale", "resampling",
}


@register_sampler("ais")
def ais_sampler(target, *, num_samples, num_chains, generator, progress, device, **options) -> SamplerResult:
    """``ds.sample(target, "ais", num_samples=n, ...)``: AIS with ``n`` particles per chain.

    Options: ``reference``; ``betas`` or ``num_temperatures`` (200) with ``schedule``
    (``"geometric"``, ``"sigmoid"``, ``"linear"``); ``kernel`` (``"mala"``), ``num_mcmc_steps``
    (1), ``num_leapfrog`` (5), ``step_size``, ``target_accept``, ``adapt_scale`` (True);
    ``resampling`` (``"systematic"``), the scheme of the final resampling. ``num_chains`` (default
    1) groups of particles run in one batch and are resampled separately; ``log_normalizer`` pools
    all particles.

    The draws are resampled to equal weights; ``log_weight`` in ``sample_stats`` is each draw's
    AIS log weight (that of the particle it was resampled from).
    """
    check_options(options, _OPTIONS, "ais")
    num_chains = 1 if num_chains is None else num_chains
    path = make_path(target, options.pop("reference", None))
    scheme = options.pop("resampling", "systematic")
    betas = options.pop("betas", None)
    num_temperatures = options.pop("num_temperatures", 200)
    kind = options.pop("schedule", "geometric")
    if betas is None:
        betas = schedule(num_temperatures, kind, dtype=target.dtype, device=device)
    x0 = initial_particles(path, num_chains * num_samples, generator, device)
    out = ais(generator, path, x0, betas, progress=progress, **options)
    log_z, se = log_normalizer_estimate(out.log_weights)
    chains = torch.arange(num_chains, device=device).unsqueeze(-1) * num_samples
    idx = torch.stack([resample(generator, lw, scheme) for lw in out.log_weights.reshape(num_chains, num_samples)])
    idx = (idx + chains).flatten()
    ps = out.particles.index(idx)
    shape = (num_chains, num_samples)
    sample_stats = {
        "lp": ps.target_log_prob.reshape(shape),
        "acceptance_rate": out.acceptance[idx].reshape(shape),
        "log_weight": out.log_weights[idx].reshape(shape),
    }
    attrs = {
        "log_normalizer": log_z,
        "log_normalizer_se": se,
        "num_stages": len(out.stages["beta"]),
        "ess": float(ess(out.log_weights)),
        "path": path.kind,
    }
    return SamplerResult(ps.x.reshape(*shape, -1), sample_stats, {"tempering": out.stages}, attrs)
