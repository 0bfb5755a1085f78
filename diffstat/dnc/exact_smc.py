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
particles' weighted covariance (a dense Cholesky factor: MALA runs in coordinates where the
particles are white, so one step size suits every direction; shards of a regression with
correlated covariates need it). At :math:`\beta = 1` the particles are resampled once more and
moved ``num_final_steps`` times on the exact posterior. This is the standard SMC sampler of Del
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
from typing import NamedTuple

import torch

from diffstat.dnc.gaussian import CombineResult, gaussian_product, sample_moments
from diffstat.dnc.options import SMCOptions, from_kwargs
from diffstat.mcmc.base import MCMCState
from diffstat.mcmc.mala import MALA_TARGET_ACCEPT, mala_step
from diffstat.tempering.moves import weighted_covariance
from diffstat.tempering.resampling import ess, systematic
from diffstat.tempering.smc import next_beta

__all__ = [
    "sum_of_log_probs",
    "laplace_refine",
    "SMCState",
    "SMCInfo",
    "smc_init",
    "smc_step",
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


def _weighted_moments(x: torch.Tensor, log_w: torch.Tensor):
    w = torch.softmax(log_w, 0)
    mean, cov = w @ x, weighted_covariance(x, w)
    scale = torch.diagonal(cov).mean()
    return mean, 0.5 * (cov + cov.T) + 1e-10 * scale * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)


class _Path:
    """The geometric path from the reference Gaussian ``q`` to the exact product: at ``x (n, dim)``,
    the exact log-density ``lp`` and gradient ``g``, the reference's ``lq`` and ``gq``; the tempered
    log-density in white coordinates ``u`` (``x = m + L u``); ``num_evals`` counts the points at
    which the shards' log-densities were evaluated."""

    def __init__(self, exact, q_mean, q_prec, num_evals: int = 0):
        self.exact, self.q_mean, self.q_prec = exact, q_mean, q_prec
        self.num_evals = num_evals

    def evaluate(self, x):
        lp, g = self.exact(x)
        d = x - self.q_mean
        gq = -d @ self.q_prec
        lq = 0.5 * (d * gq).sum(-1)
        self.num_evals += x.shape[0]
        return lp, g, lq, gq

    def tempered(self, beta, m, chol):
        """``u -> (log pi_beta, grad_u)``, remembering the parts at the last proposal."""

        def fn(u):
            x = m + u @ chol.T
            self.last = self.evaluate(x)
            lp, g, lq, gq = self.last
            return beta * lp + (1 - beta) * lq, (beta * g + (1 - beta) * gq) @ chol

        return fn


class SMCState(NamedTuple):
    """Particles ``x (n, dim)`` (float64), the path's parts at them ``(lp, g, lq, gq)``, the
    temperature ``beta`` and log-weights ``log_w (n,)``, the MALA step size, and the running
    estimate of the product's log-normaliser."""

    x: torch.Tensor
    parts: tuple
    beta: torch.Tensor
    log_w: torch.Tensor
    step_size: torch.Tensor
    log_normalizer: float


class SMCInfo(NamedTuple):
    """One stage: its ``beta``, the ESS fraction after reweighting, the mean MALA acceptance,
    whether the particles were resampled, and the points evaluated (``num_evals``)."""

    beta: float
    ess: float
    acceptance_rate: torch.Tensor
    resampled: bool
    num_evals: int


def _move(generator, x, path, cur, beta, log_w, h, num_steps):
    """``num_steps`` dense-preconditioned MALA steps on pi_beta; returns x, parts, h, mean acceptance."""
    m, cov = _weighted_moments(x, log_w)
    chol = torch.linalg.cholesky(cov)
    fn = path.tempered(beta, m, chol)
    u = torch.linalg.solve_triangular(chol, (x - m).T, upper=False).T
    lp, g, lq, gq = cur
    state = MCMCState(u, beta * lp + (1 - beta) * lq, (beta * g + (1 - beta) * gq) @ chol)
    accs = []
    for _ in range(num_steps):
        state, info = mala_step(generator, state, fn, h)
        a = info.is_accepted
        cur = tuple(
            torch.where(a.unsqueeze(-1) if old.dim() == 2 else a, new, old)
            for new, old in zip(path.last, cur)
        )
        acc = info.acceptance_rate.mean()
        accs.append(acc)
        # Robbins-Monro on log h toward MALA's optimal acceptance
        h = h * torch.exp(torch.clamp(2.0 * (acc - MALA_TARGET_ACCEPT), -1.0, 1.0))
    x = m + state.x @ chol.T
    return x, cur, h, torch.stack(accs).mean()


def smc_init(generator, log_probs, mean, cov, num_particles: int, options: SMCOptions):
    r"""Exact draws of :math:`q = \mathcal N(\mu, c^2\Sigma)` (after the Laplace refinement with
    ``options.laplace``): the state at :math:`\beta = 0` and the path."""
    dtype = torch.float64
    mean, cov = mean.to(dtype), cov.to(dtype)
    exact = sum_of_log_probs(log_probs)
    laplace_evals = 0
    if options.laplace:
        mean, cov, laplace_evals = laplace_refine(exact, mean, cov)
    q_chol = torch.linalg.cholesky(options.inflation**2 * 0.5 * (cov + cov.T))
    # log q is kept without its normaliser: log of the integral of exp(log q)
    log_mass_q = torch.log(torch.diagonal(q_chol)).sum() + 0.5 * mean.shape[0] * math.log(2 * math.pi)
    eps = torch.randn(num_particles, mean.shape[0], generator=generator, dtype=dtype, device=generator.device)
    x = mean + eps.to(mean.device) @ q_chol.T
    path = _Path(exact, mean, torch.cholesky_inverse(q_chol), laplace_evals)
    like = dict(dtype=dtype, device=x.device)
    state = SMCState(
        x, path.evaluate(x), torch.zeros((), **like), torch.zeros(num_particles, **like),
        torch.tensor(0.5, **like), float(log_mass_q),
    )  # fmt: skip
    return state, path


def smc_step(generator, state: SMCState, path: _Path, options: SMCOptions) -> tuple[SMCState, SMCInfo]:
    r"""One stage: the next :math:`\beta` at conditional ESS ``target_ess``, reweighting, resampling
    below ``resample_threshold`` (and always at :math:`\beta = 1`), then MALA moves."""
    x, cur, beta, log_w, h, log_z = state
    evals0 = path.num_evals
    delta = cur[0] - cur[2]
    delta = torch.where(torch.isnan(delta), -math.inf, delta)
    new_beta = next_beta(log_w, delta, beta, options.target_ess)
    incr = (new_beta - beta) * delta
    log_z += float(torch.logsumexp(torch.log_softmax(log_w, 0) + incr, 0))
    log_w, beta = log_w + incr, new_beta
    frac = float(ess(log_w)) / x.shape[0]
    final = float(beta) >= 1.0
    resampled = frac < options.resample_threshold or final
    if resampled:
        idx = systematic(generator, log_w).to(x.device)
        x, cur = x[idx], tuple(c[idx] for c in cur)
        log_w = torch.zeros_like(log_w)
    steps = options.num_final_steps if final else options.num_mcmc_steps
    x, cur, h, acc = _move(generator, x, path, cur, beta, log_w, h, steps)
    info = SMCInfo(float(beta), frac, acc, resampled, path.num_evals - evals0)
    return SMCState(x, cur, beta, log_w, h, log_z), info


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
    state, path = smc_init(generator, log_probs, mean, cov, num_particles, opts)
    record = {"betas": [0.0], "ess": [1.0], "acceptance_rate": [float("nan")]}
    while float(state.beta) < 1.0:
        if len(record["betas"]) > opts.max_stages:
            raise RuntimeError(
                f"the SMC to the exact product needed more than {opts.max_stages} stages; the start "
                "Gaussian is far too narrow or the shard log-densities disagree with the draws"
            )
        state, step = smc_step(generator, state, path, opts)
        record["betas"].append(step.beta)
        record["ess"].append(step.ess)
        record["acceptance_rate"].append(float(step.acceptance_rate))
    info = {key: torch.tensor(v, dtype=torch.float64) for key, v in record.items()}
    info.update(
        laplace=bool(opts.laplace),
        num_stages=len(record["betas"]) - 1,
        num_evals=int(path.num_evals),
        log_normalizer=state.log_normalizer,
        final_step_size=float(state.step_size),
    )
    return state.x, state.parts[0], info


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
