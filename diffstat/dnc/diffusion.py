r"""The diffusion combiner: an energy-based diffusion model per shard, the product sampled by an
annealed (SMC-corrected) MCMC on the sum of the energies (Trojan, Fearnhead and Nemeth 2024; Du
et al. 2023), with two routes that use the shards' log-densities instead of learned energies.

The route follows the inputs, the most accurate first: with ``log_probs`` (the shards' own
log-density callables) an SMC sampler to their exact sum, the full posterior (step 5; consistent
whatever the shards, and the default of :func:`~diffstat.dnc.pipeline.run_pipeline`); else, with
``draw_log_probs`` and scores (the values and gradients at the draws, which
``ds.dnc.combine`` takes from inputs that carry them), the same SMC on damped cubic shard
energies fitted there (:mod:`diffstat.dnc.surrogate`); else steps 1 to 4, the learned energies
of Trojan et al., which see the shards only where their draws are and are biased when the
product lies in the shards' tails (RAND HIE: d_MAH about 2.3, ``docs/dnc.md``).

1. **Whiten** the shards' draws by one common affine map and
2. **fit** one energy-based diffusion model per shard, a noised-Gaussian energy plus a residual network
   trained with the mixed TSM/DSM loss on the stored scores, half of each batch's times log-uniform near
   :math:`t = 0` (:mod:`diffstat.dnc.energy`).
3. **Sample** :math:`\pi_t(z) \propto \exp(-\sum_k E_k(z, t))` by annealed MCMC from the product
   of the noised Gaussian parts at ``t_start`` down to ``t_min``, then MALA at ``t_min``
   (:mod:`diffstat.dnc.annealing`: an ``init``/``step`` pair over the annealing levels, each level
   one :func:`~diffstat.tempering.core.smc_step`, the step of the tempering samplers).

   Mode weights of a multimodal product are settled by the annealing, at the times where the
   modes part; MCMC at small t cannot move mass between modes. ``reweight=True`` turns the
   annealing into sequential Monte Carlo (incremental weights :math:`\pi_{t_{i+1}}/\pi_{t_i}`,
   resampling when the ESS falls below ``resample_threshold``), which is right for exact energies
   but not for learned ones: score matching fixes only :math:`\nabla_z E_k`, not how
   :math:`E_k` moves with :math:`t`, nor the offset between modes once no draw lies between
   them, so the weights inherit those arbitrary offsets (``docs/dnc.md``). The default is
   therefore the plain annealed MCMC of Trojan et al. and Du et al.

4. **Calibrate the mode weights** (``calibrate=True``, :mod:`diffstat.dnc.mode_weights`). Score
   matching fixes :math:`\nabla_z E_k`, not the offset of :math:`E_k` between separated modes, so
   the annealing's mode weights inherit the learned energies' errors at the times where the
   product's modes part. After half of the final MCMC, the product's modes are found (gradient
   ascent, end points grouped when no barrier lies between them) and every mode's mass is
   estimated from the shards' draw counts (reciprocal importance sampling within each basin), or,
   given ``calibration_log_probs`` (the shards' exact log-densities, called at a few thousand
   points), as :math:`\int_{A_j}\prod_k p_k` by importance sampling; the particles are resampled
   to those masses and the MCMC goes on.

5. **Exact correction** (``log_probs``, :mod:`diffstat.dnc.exact_smc`). Given the shards' exact
   log-densities, their sum is the full posterior: an SMC sampler with adaptive tempering moves
   particles from a Gaussian (the shards' Gaussian product, or with ``fit_energies=True`` a
   Gaussian fitted to the learned product's draws) to it, with dense-preconditioned MALA moves
   and resampling; its weights are the importance correction. By default no energy is fitted
   then (``fit_energies=None``): the SMC does not need the learned product to be consistent,
   and the fits cost most of the time.

Measurements (per-seed figures, what was tried and dropped) are in ``docs/dnc.md``, next to
``benchmarks/bench_dnc.py`` which reproduces them.

Sampling runs in coordinates :math:`w` where the Gaussian product is :math:`\mathcal N(0, I)`
(a constant Jacobian), so one step size suits every direction.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import NamedTuple

import torch

from diffstat._util import progress_bar
from diffstat.dnc.annealing import (
    SAMPLING_DTYPE,
    anneal_init,
    anneal_step,
    resample_within_modes,
    sample_at_t_min,
    start_gaussian,
    time_grid,
)
from diffstat.dnc.energy import ProductEnergy, fit_shard_energies, focus_weights, load_shard_energy, whitening
from diffstat.dnc.gaussian import CombineResult, gaussian_product, sample_moments
from diffstat.dnc.mode_weights import calibrate_mode_weights
from diffstat.dnc.options import DiffusionOptions
from diffstat.mcmc.base import MCMCState
from diffstat.tempering.resampling import systematic

__all__ = ["combine_diffusion"]


def combine_diffusion(
    subposteriors: list[torch.Tensor],
    *,
    num_samples: int,
    generator: torch.Generator,
    scores=None,
    progress: bool = False,
    **options,
) -> CombineResult:
    r"""The diffusion combiner (module notes).

    Parameters
    ----------
    subposteriors : list of K tensors ``(n_k, dim)``
    scores : list of K tensors ``(n_k, dim)``, optional
        :math:`\nabla\log p_k` at the draws: target score matching near :math:`t = 0`. Without
        them the fit falls back to denoising score matching.
    num_samples : int
        Particles (and draws).
    **options
        The settings and inputs of :class:`~diffstat.dnc.options.DiffusionOptions`, which documents
        each (``log_probs``: the shards' exact log-densities, then an SMC to their sum;
        ``draw_log_probs``: polynomial shard energies; ``energy_models`` or ``fits``: no training;
        ``calibrate``, ``calibration_log_probs``: the mode weights). Any other name is a
        ``ValueError`` that lists the valid ones.

    Returns
    -------
    CombineResult
        ``lp``: minus the summed energy at ``t_min`` (or the exact sum with ``log_probs``), in
        original coordinates up to a constant. ``groups["diffusion"]``: per level ``t``,
        ``sigma``, ``ess``, ``acceptance_rate``, ``step_size``, ``resampled``. ``attrs``:
        ``route`` (``"exact"``: SMC to the sum of ``log_probs``; ``"cubic"``: SMC to the sum of
        cubic shard energies; ``"learned"``: annealed MCMC on learned energies),
        ``polynomial_misfit`` (the cubic route: the fits' joint RMS error at the draws in nats,
        :func:`~diffstat.dnc.surrogate.product_misfit`; a ``RuntimeWarning`` above 0.3),
        ``fit_time`` (sum over shards), ``max_fit_time``, ``combine_time``, ``num_energy_evals``,
        ``num_modes`` (modes of the product found by the calibration; 0 when it did not run),
        ``num_calibrated_modes``, ``num_shard_evals`` (points at which each shard's
        ``calibration_log_probs`` was called).
    """
    opts = DiffusionOptions.from_kwargs(options)
    if opts.log_probs is not None:
        result, route = _combine_exact(subposteriors, scores, num_samples, generator, progress, opts), "exact"
    elif opts.draw_log_probs is not None:
        result, route = _combine_surrogate(subposteriors, scores, num_samples, generator, opts), "cubic"
    else:
        result, route = (
            _combine_learned(subposteriors, scores, num_samples, generator, progress, opts),
            "learned",
        )
    result.attrs["route"] = route
    return result


def _combine_surrogate(subposteriors, scores, num_samples, generator, opts) -> CombineResult:
    """Polynomial shard energies fitted at the draws (:mod:`diffstat.dnc.surrogate`; on
    ``executor`` when given), their product sampled by the SMC of :mod:`diffstat.dnc.exact_smc`
    as if it were exact."""
    from diffstat.dnc.exact_smc import combine_exact
    from diffstat.dnc.surrogate import MAX_PRODUCT_MISFIT, fit_polynomial_shards, product_misfit

    start = time.perf_counter()
    log_probs = fit_polynomial_shards(
        subposteriors, scores, opts.draw_log_probs, degree=opts.surrogate_degree,
        executor=opts.executor, max_retries=opts.max_retries,
    )  # fmt: skip
    fit_time = time.perf_counter() - start
    misfit = product_misfit(log_probs)
    if misfit > MAX_PRODUCT_MISFIT:
        warnings.warn(
            f"dnc.combine: the polynomial shard energies miss the shards' log-densities at their own "
            f"draws by {misfit:.2f} nats (root sum of squares over the shards; limit {MAX_PRODUCT_MISFIT}): "
            "a shard is multimodal or too skewed for a polynomial, and the product built from them is "
            "likely biased. Pass the shards' log-density callables (log_probs=, the exact route), or "
            "draw_log_probs=None for the learned energies.",
            RuntimeWarning,
            stacklevel=3,
        )
    result = combine_exact(
        subposteriors, log_probs, num_samples=num_samples, generator=generator, options=opts.smc
    )
    result.attrs.update(
        fit_time=fit_time,
        max_fit_time=fit_time,
        polynomial_misfit=misfit,
        exact_final_target=0,
        shard_energies=f"polynomial of degree {opts.surrogate_degree}",
    )
    return result


def _combine_exact(subposteriors, scores, num_samples, generator, progress, opts) -> CombineResult:
    """The SMC to the exact sum of ``log_probs``, started from the learned product with
    ``fit_energies`` (:func:`~diffstat.dnc.exact_smc.combine_exact`)."""
    from diffstat.dnc.exact_smc import combine_exact

    learned = None
    if opts.fit_energies:
        inner = dataclasses.replace(opts, log_probs=None, draw_log_probs=None, fit_energies=None)
        learned = lambda: _combine_learned(subposteriors, scores, num_samples, generator, progress, inner)  # noqa: E731
    return combine_exact(
        subposteriors,
        opts.log_probs,
        num_samples=num_samples,
        generator=generator,
        options=opts.smc,
        learned=learned,
    )


class _Frame(NamedTuple):
    r"""The combiner's coordinates: :math:`x = m + L z` (the common whitening of the shards) and
    :math:`z = \mu + R w` (``R R^T`` the shards' Gaussian product in ``z``: sampling coordinates)."""

    m: torch.Tensor
    chol: torch.Tensor
    mu: torch.Tensor
    root: torch.Tensor

    def x_of_w(self, w: torch.Tensor) -> torch.Tensor:
        return self.m + (self.mu + w.to(self.mu.dtype) @ self.root.T) @ self.chol.T


def _combine_learned(subposteriors, scores, num_samples, generator, progress, opts) -> CombineResult:
    """Steps 1 to 4 of the module notes: whiten, fit, anneal, calibrate."""
    from diffstat.diffusion.processes import VP

    anneal, k = opts.anneal, len(subposteriors)
    if opts.calibration_log_probs is not None and len(opts.calibration_log_probs) != k:
        raise ValueError(f"calibration_log_probs must hold {k} callables, one per shard")
    frame, zs, moments, fits, models = _whiten_and_fit(subposteriors, scores, generator, progress, opts)
    product = ProductEnergy(models, frame.mu.to(SAMPLING_DTYPE), frame.root.to(SAMPLING_DTYPE))
    process = VP(t_min=anneal.t_min)
    start = time.perf_counter()
    mean0, cov0 = start_gaussian(process, moments, frame.mu, frame.root, anneal.t_start)
    state = anneal_init(generator, product, mean0, cov0, num_samples, anneal)
    times = time_grid(process, anneal.t_start, anneal.t_min, anneal.num_levels)
    calibrate = _calibrator(generator, product, frame, zs, opts) if opts.calibrate else None
    levels = []
    with progress_bar(len(times) + anneal.num_final_steps, "annealed MCMC", progress) as bar:
        for t in times:
            state, info = anneal_step(generator, state, product, t, anneal)
            levels.append(info)
            bar.update()
        mcmc, accs, final_step, cal_info = sample_at_t_min(
            generator, state, product, anneal.num_final_steps, calibrate, bar
        )
    cal_info = cal_info or {"num_modes": 0, "calibrated": []}
    final_ess = float("nan")
    if opts.calibration_log_probs is not None:
        mcmc, accs, final_ess = _exact_within_modes(generator, mcmc, accs, frame, cal_info, opts)
    stats = dict(combine_time=time.perf_counter() - start, final_step_size=final_step, final_is_ess=final_ess)
    return _result(frame, mcmc, accs, levels, process, product, fits, cal_info, stats, opts)


def _whiten_and_fit(subposteriors, scores, generator, progress, opts):
    """Steps 1 and 2: the coordinates, the whitened draws ``zs``, the shards' moments and
    Gaussian product in ``z``, and the fitted models (with the fits' records)."""
    k = len(subposteriors)
    m, chol = whitening(subposteriors)
    chol_inv = torch.linalg.inv(chol)
    zs = [(x - m) @ chol_inv.T for x in subposteriors]
    # grad_z = L^T grad_x, as rows; without scores the fit uses denoising score matching
    gs = [None] * k if scores is None else [g @ chol for g in scores]
    moments = [sample_moments(z) for z in zs]
    mu_p, cov_p = gaussian_product([a for a, _ in moments], [b for _, b in moments])
    frame = _Frame(m, chol, mu_p, torch.linalg.cholesky(cov_p))
    fit, t_min = opts.fit, opts.anneal.t_min
    focus_w, focus = focus_weights(zs, mu_p, cov_p, fit.focus_width, fit.focus_fraction, t_min)
    seeds = torch.randint(0, 2**31 - 1, (k,), generator=generator, device=generator.device).tolist()
    if opts.energy_models is not None:
        if len(opts.energy_models) != k:
            raise ValueError(f"energy_models must hold {k} models, one per shard")
        return frame, zs, moments, [{"fit_time": 0.0}] * k, opts.energy_models
    fits = opts.fits
    if fits is None:
        args = [(zs[i].cpu(), None if gs[i] is None else gs[i].cpu()) for i in range(k)]
        base = dict(fit.training(), t_min=t_min, **focus)
        kwargs = [dict(base, shard=i, seed=seeds[i], focus_weights=focus_w[i]) for i in range(k)]
        fits = fit_shard_energies(args, kwargs, opts.executor, opts.max_retries, progress)
    device = subposteriors[0].device
    return frame, zs, moments, fits, [load_shard_energy(f).to(device) for f in fits]


def _sum_log_probs(log_probs, x: torch.Tensor) -> torch.Tensor:
    """Sum of the shards' log-densities at ``x (n, dim)`` (callables ``x -> lp`` or ``x -> (lp, grad)``)."""
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for f in log_probs:
        out = f(x)
        total = total + (out[0] if isinstance(out, tuple) else out).detach().to(total)
    return total


def _calibrator(generator, product, frame: _Frame, zs, opts):
    """``(mcmc, step) -> (mcmc, info)``: the particles resampled to the calibrated mode weights
    (:func:`~diffstat.dnc.mode_weights.calibrate_mode_weights`), step 4 of the module notes."""
    root_inv = torch.linalg.inv(frame.root).to(SAMPLING_DTYPE)
    device = frame.m.device
    shard_z = [z.to(device) for z in zs]
    exact_lp = None
    if opts.calibration_log_probs is not None:
        exact_lp = lambda z_: _sum_log_probs(
            opts.calibration_log_probs, frame.m + z_.to(frame.m.dtype) @ frame.chol.T
        )  # noqa: E731

    def calibrate(mcmc: MCMCState, step: float):
        log_w, info = calibrate_mode_weights(
            generator, mcmc.x, product, opts.anneal.t_min, shard_z,
            lambda z_: (z_.to(SAMPLING_DTYPE) - product.shift) @ root_inv.T,
            lambda w_: product.shift + w_ @ product.root.T,
            step, exact_log_prob=exact_lp, **dataclasses.asdict(opts.calibration),
        )  # fmt: skip
        if bool((log_w != 0).any()):
            idx = systematic(generator, log_w).to(device)
            mcmc = MCMCState(mcmc.x[idx], mcmc.log_prob[idx], mcmc.grad[idx])
            info["labels"] = info["labels"][idx]
        return mcmc, info

    return calibrate


def _exact_within_modes(generator, mcmc, accs, frame: _Frame, cal_info: dict, opts):
    """Within each mode, importance-resample the learned product to the exact one (the modes'
    masses stay as calibrated): removes the learned energies' bias within the modes."""
    num_samples = mcmc.x.shape[0]
    log_r = _sum_log_probs(opts.calibration_log_probs, frame.x_of_w(mcmc.x)) - mcmc.log_prob.double()
    cal_info["num_shard_evals"] = cal_info.get("num_shard_evals", 0) + num_samples
    idx, final_ess = resample_within_modes(generator, log_r, cal_info.get("labels"))
    mcmc = MCMCState(mcmc.x[idx], mcmc.log_prob[idx], mcmc.grad[idx])
    return mcmc, [a[idx] for a in accs], final_ess


def _result(frame, mcmc, accs, levels, process, product, fits, cal_info, stats, opts) -> CombineResult:
    """The draws in original coordinates, ``lp`` (minus the summed energy, up to the constant
    log-determinant of the whitening), the per-level group and the attributes."""
    dtype = frame.m.dtype
    num_samples = mcmc.x.shape[0]
    acc = torch.stack(accs).mean(0) if accs else torch.full((num_samples,), float("nan"))
    record = {
        "t": [info.t for info in levels],
        "sigma": [float(process.sigma(torch.tensor(info.t))) for info in levels],
        "ess": [float(info.ess) for info in levels],
        "acceptance_rate": [float(info.acceptance_rate) for info in levels],
        "step_size": [float(info.step_size) for info in levels],
        "resampled": [info.resampled for info in levels],
    }
    groups = {"diffusion": {key: torch.tensor(val, dtype=torch.float64) for key, val in record.items()}}
    fit_times = [float(f["fit_time"]) for f in fits]
    attrs = {
        "fit_time": float(sum(fit_times)),
        "max_fit_time": float(max(fit_times)),
        "combine_time": float(stats["combine_time"]),
        "num_energy_evals": int(product.num_evals),
        "final_step_size": float(stats["final_step_size"]),
        "exact_final_target": 0,
        "num_levels": opts.anneal.num_levels,
        "num_modes": int(cal_info["num_modes"]),
        "num_calibrated_modes": len(cal_info["calibrated"]),
        "num_shard_evals": int(cal_info.get("num_shard_evals", 0)),
        "final_is_ess": stats["final_is_ess"],
    }
    stats = {"lp": mcmc.log_prob.to(dtype), "acceptance_rate": acc.to(dtype)}
    return CombineResult(frame.x_of_w(mcmc.x), stats, groups, attrs)
