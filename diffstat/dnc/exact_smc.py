r"""Sequential Monte Carlo from a Gaussian to the exact product of the shards' log-densities.

When the shards' log-densities :math:`\log p_k` can be evaluated (the pipeline has them: each
shard's target), their sum is the full posterior up to a constant, and every combiner's error can
be removed. Particles start as exact draws of a Gaussian :math:`q = \mathcal N(\mu, c^2\Sigma)`
(the Gaussian product of the shards, or a Gaussian fitted to the learned product) and move along
the geometric path

.. math::
    \pi_\beta(\theta) \propto q(\theta)^{1-\beta}\, \Big(\prod_k p_k(\theta)\Big)^{\beta},
    \qquad 0 = \beta_0 < \beta_1 < \dots < \beta_S = 1,

with the next :math:`\beta` chosen so that the conditional ESS of the incremental weights
:math:`\exp\{(\beta' - \beta)(\sum_k\log p_k - \log q)\}` is ``target_ess`` times the number of
particles (:func:`~diffstat.tempering.smc.next_beta`), systematic resampling when the ESS falls
below ``resample_threshold``, and ``num_mcmc_steps`` MALA steps per stage, preconditioned by the
particles' weighted covariance (a dense metric, unshrunk once the ESS exceeds 10 dimensions: one
step size then suits every direction; shards of a regression with correlated covariates need it).
At :math:`\beta = 1` the particles are resampled once more and moved ``num_final_steps`` times on
the exact posterior. The run is :func:`~diffstat.tempering.to_target.temper_to_target` (each stage
the tempering samplers' own :func:`~diffstat.tempering.core.tempered_step`, its step size adapted by
the same Robbins-Monro rule) on a :class:`~diffstat.tempering.path.GeometricPath` from :math:`q`;
this module only builds the start and the path. This is the standard SMC sampler of Del
Moral, Doucet and Jasra (2006) with the adaptive tempering of Jasra et al. (2011); the weights are
the importance correction, so the draws are consistent for the full posterior whatever :math:`q`.

Why start from a Gaussian and not from the shards' draws: the product of disagreeing shards lives
in their tails (RAND HIE: the Laplace product is 2 posterior sds off), so no shard draw is a good
proposal, while a Gaussian widened by ``inflation`` covers the full posterior and has a density.
Defaults: ``laplace=True`` first moves the Gaussian to the Laplace approximation of the exact
product (Newton's method from gradients, :func:`laplace_refine`): for a regression posterior on
many rows it is close to exact, so one tempering stage often suffices; ``inflation = 1.2`` widens
it enough to cover the posterior's skewed tail; ``target_ess = 0.5`` is the usual choice (Zhou,
Johansen and Aston 2016); ``num_final_steps = 5`` MALA steps at :math:`\beta = 1` leave a
duplicate of the last resampling unmoved with probability about :math:`0.43^5 \approx 1.5\%`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import torch

from diffstat.dnc.gaussian import CombineResult, gaussian_product, sample_moments
from diffstat.dnc.options import SMCOptions, from_kwargs
from diffstat.tempering.core import MoveConfig, cloud_metric, stack_stage_infos
from diffstat.tempering.path import GeometricPath
from diffstat.tempering.to_target import temper_to_target

__all__ = [
    "sum_of_log_probs",
    "laplace_refine",
    "exact_product_smc",
    "combine_exact",
]


def sum_of_log_probs(log_probs: list[Callable]) -> Callable:
    r""":math:`x \mapsto (\sum_k \log p_k(x), \sum_k \nabla\log p_k(x))` for ``x: (n, dim)``, from
    callables ``x -> (lp, grad)`` (a Target's ``log_prob_and_grad``) or ``x -> lp`` (differentiated
    here by autograd); float64."""

    def fn(x: torch.Tensor):
        x = x.detach().double()
        lp = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        grad = torch.zeros_like(x)
        for f in log_probs:
            out = f(x)
            if isinstance(out, tuple):
                lp_k, g_k = out
            else:
                with torch.enable_grad():
                    xg = x.clone().requires_grad_(True)
                    lp_k = f(xg)
                    (g_k,) = torch.autograd.grad(lp_k.sum(), xg)
            lp = lp + lp_k.detach().to(lp)
            grad = grad + g_k.detach().to(grad)
        return lp, grad

    return fn


def laplace_refine(
    log_prob_and_grad: Callable,
    mean: torch.Tensor,
    cov: torch.Tensor,
    *,
    num_iter: int = 20,
    eps: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    r"""Mode and Laplace covariance of a log-density from its gradients, starting at a Gaussian.

    Newton's method in the coordinates :math:`u` with :math:`x = m + L u`, :math:`LL^\top` the
    start covariance: the Hessian :math:`H_u` is the central difference of the gradient at
    :math:`u \pm \epsilon e_j` (all :math:`2d + 1` points in one call), the step
    :math:`-H_u^{-1}\nabla_u` is halved until the log-density increases. It stops when the step is
    below :math:`10^{-8}` start sds, or returns the start unchanged where the Hessian is not negative
    definite (a product that is not log-concave near its mode: the SMC then starts from the given
    Gaussian). Returns ``(mode, covariance, number of points evaluated)``.

    ``eps = 1e-3`` start sds: central differences err by :math:`O(\epsilon^2)` times the third
    derivative, far below the Monte Carlo error of any combiner.
    """
    dtype = torch.float64
    chol = torch.linalg.cholesky(0.5 * (cov + cov.T).to(dtype))
    dim = mean.shape[0]
    offsets = torch.cat(
        [
            torch.zeros(1, dim, dtype=dtype),
            eps * torch.eye(dim, dtype=dtype),
            -eps * torch.eye(dim, dtype=dtype),
        ]
    ).to(mean.device)
    x = mean.to(dtype)
    evals = 0
    for _ in range(num_iter):
        lp, g = log_prob_and_grad(x + offsets @ chol.T)
        evals += offsets.shape[0]
        g_u = g @ chol
        hess = (g_u[1 : dim + 1] - g_u[dim + 1 :]) / (2 * eps)
        hess = 0.5 * (hess + hess.T)
        neg_chol, not_pd = torch.linalg.cholesky_ex(-hess)
        if int(not_pd) != 0 or not bool(torch.isfinite(lp[0])):
            return mean.to(dtype), cov.to(dtype), evals
        step = torch.cholesky_solve(g_u[0][:, None], neg_chol)[:, 0]
        improved = False
        for _ in range(10):  # halve until the log-density increases
            lp_new, _ = log_prob_and_grad((x + chol @ step)[None])
            evals += 1
            if bool(lp_new[0] >= lp[0]):
                improved = True
                break
            step = 0.5 * step
        if not improved:  # at the mode to rounding error: keep x and its Hessian
            break
        x = x + chol @ step
        if float(step.abs().max()) < 1e-8:
            break
    cov_u = torch.cholesky_inverse(neg_chol)
    return x, chol @ cov_u @ chol.T, evals


class _SummedShards:
    r"""The exact product as the tempering path's target: ``log_prob_and_grad`` sums the shards'
    log-densities (a NaN is read as :math:`-\infty`, outside the support) and counts the points."""

    reference = None
    dtype = torch.float64

    def __init__(self, exact: Callable, dim: int):
        self.exact, self.dim, self.num_target_evals = exact, dim, 0

    def log_prob_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.num_target_evals += x.shape[0]
        lp, grad = self.exact(x)
        return torch.where(torch.isnan(lp), -math.inf, lp), grad


def _start(log_probs, mean, cov, options: SMCOptions) -> tuple[GeometricPath, int]:
    r"""The geometric path from :math:`q = \mathcal N(\mu, c^2\Sigma)` (after the Laplace refinement
    with ``options.laplace``) to the summed shard log-densities, and the refinement's evaluations."""
    dtype = torch.float64
    mean, cov = mean.to(dtype), cov.to(dtype)
    exact = sum_of_log_probs(log_probs)
    laplace_evals = 0
    if options.laplace:
        mean, cov, laplace_evals = laplace_refine(exact, mean, cov)
    q_chol = torch.linalg.cholesky(options.inflation**2 * 0.5 * (cov + cov.T))
    reference = torch.distributions.MultivariateNormal(mean, scale_tril=q_chol)
    return GeometricPath(_SummedShards(exact, mean.shape[0]), reference), laplace_evals


def _record(stages: dict[str, torch.Tensor]) -> dict:
    """Per-stage ``betas``, ``ess``, ``acceptance_rate`` from beta = 0 on (float64), and the SMC
    estimate ``log_normalizer``, the sum of the stages' increments."""
    start = {"beta": 0.0, "ess": 1.0, "acceptance_rate": math.nan}
    info = {
        key: torch.cat([torch.tensor([start[field]], dtype=torch.float64), stages[field].double().cpu()])
        for key, field in (("betas", "beta"), ("ess", "ess"), ("acceptance_rate", "acceptance_rate"))
    }
    info["log_normalizer"] = float(stages["log_z_increment"].sum())
    return info


def exact_product_smc(
    generator: torch.Generator,
    log_probs: list[Callable],
    mean: torch.Tensor,
    cov: torch.Tensor,
    num_particles: int,
    **options,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    r"""Draws of :math:`\prod_k p_k` by SMC from :math:`\mathcal N(\mu, c^2\Sigma)` (module notes).

    Parameters
    ----------
    log_probs : list of K callables
        The shards' log-densities in the original coordinates (``x -> (lp, grad)`` or
        ``x -> lp``), any additive constants.
    mean : (dim,), cov : (dim, dim)
        The Gaussian the particles start from (before ``inflation``), or with ``laplace`` where
        the mode search starts.
    num_particles : int
    **options
        :class:`~diffstat.dnc.options.SMCOptions` (``ValueError`` for any other name):
        ``laplace`` (start from the Laplace approximation of the exact product,
        :func:`laplace_refine`: a few hundred single-point evaluations, next to ``num_particles``
        per MALA step); ``inflation`` (:math:`c`, the factor on the Gaussian's standard
        deviations); ``target_ess``, ``resample_threshold`` (conditional-ESS fraction per stage;
        ESS fraction that triggers resampling); ``num_mcmc_steps``, ``num_final_steps`` (MALA steps
        per stage and at :math:`\beta = 1` after the last resampling); ``max_stages`` (a
        ``RuntimeError`` beyond this many stages: a start far too narrow for the target).

    Returns
    -------
    (x, lp, info)
        Equally weighted draws ``(num_particles, dim)`` (float64), the summed exact log-density at
        them ``(num_particles,)``, and ``info``: ``betas``, ``ess`` (fraction, per stage),
        ``acceptance_rate`` (per stage), ``num_stages``, ``num_evals`` (points at which every
        shard's log-density was evaluated), ``log_normalizer`` (of :math:`\prod_k p_k` with the
        given constants, the SMC estimate).
    """
    opts = from_kwargs(SMCOptions, options, "exact_product_smc")
    path, laplace_evals = _start(log_probs, mean, cov, opts)
    moves, final_moves = (
        MoveConfig(num_mcmc_steps=opts.num_mcmc_steps),
        MoveConfig(num_mcmc_steps=opts.num_final_steps),
    )
    state, infos = temper_to_target(
        generator,
        path,
        num_particles,
        moves=lambda final: final_moves if final else moves,
        precondition=cloud_metric("dense", within_modes=False, shrink_until=10.0),
        target_ess=opts.target_ess,
        resample_threshold=opts.resample_threshold,
        max_stages=opts.max_stages,
    )
    if float(state.beta) < 1.0:
        raise RuntimeError(
            f"the SMC to the exact product needed more than {opts.max_stages} stages; the start "
            "Gaussian is far too narrow or the shard log-densities disagree with the draws"
        )
    info = _record(stack_stage_infos(infos))
    info.update(
        laplace=bool(opts.laplace),
        num_stages=len(infos),
        num_evals=int(laplace_evals + path.target.num_target_evals),
        final_step_size=float(torch.exp(state.log_step_size)),
    )
    return state.particles.x, state.particles.target_log_prob, info


def combine_exact(
    subposteriors: list[torch.Tensor],
    log_probs: list[Callable],
    *,
    num_samples: int,
    generator: torch.Generator,
    options: SMCOptions | None = None,
    learned: Callable[[], CombineResult] | None = None,
) -> CombineResult:
    r"""The diffusion combiner given the shards' log-densities (``combine(..., "diffusion",
    log_probs=...)``): :func:`exact_product_smc` from the shards' Gaussian product, or from a
    Gaussian fitted to the draws of ``learned()`` (the learned product, ``fit_energies=True``);
    ``options``: the SMC's settings.

    Returns a CombineResult whose ``lp`` is the exact sum of shard log-densities; ``groups["smc"]``
    the per-stage ``betas``, ``ess``, ``acceptance_rate``; ``attrs`` the learned product's fit
    times (0 without it), ``num_shard_evals`` (points per shard), ``smc_stages``,
    ``log_normalizer``, ``start``.
    """
    k = len(subposteriors)
    if len(log_probs) != k:
        raise ValueError(f"log_probs must hold {k} callables, one per shard")
    start = time.perf_counter()
    attrs = dict(fit_time=0.0, max_fit_time=0.0, num_energy_evals=0, num_modes=0, num_calibrated_modes=0)
    if learned is not None:
        learned_result = learned()
        attrs.update({key: learned_result.attrs[key] for key in attrs})
        mean, cov = sample_moments(learned_result.draws.double())
    else:
        moments = [sample_moments(x.double()) for x in subposteriors]
        mean, cov = gaussian_product([a for a, _ in moments], [b for _, b in moments])
    smc = dataclasses.asdict(options or SMCOptions())
    x, lp, info = exact_product_smc(generator, log_probs, mean, cov, num_samples, **smc)
    dtype = subposteriors[0].dtype
    groups = {"smc": {key: info[key] for key in ("betas", "ess", "acceptance_rate")}}
    attrs.update(
        combine_time=time.perf_counter() - start - attrs["fit_time"],
        exact_final_target=1,
        num_shard_evals=info["num_evals"],
        smc_stages=info["num_stages"],
        log_normalizer=info["log_normalizer"],
        final_step_size=info["final_step_size"],
        start=("the learned product" if learned is not None else "the Gaussian product")
        + (" moved to the Laplace approximation" if info["laplace"] else ""),
    )
    return CombineResult(x.to(dtype), {"lp": lp.to(dtype)}, groups, attrs)
