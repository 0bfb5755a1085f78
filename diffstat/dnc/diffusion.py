r"""The diffusion combiner: an energy-based diffusion model per shard, the product sampled by an
annealed (SMC-corrected) MCMC on the sum of the energies (Trojan, Fearnhead and Nemeth 2024; Du
et al. 2023).

1. **Whiten** the shards' draws by one common affine map and
2. **fit** one energy-based diffusion model per shard, a noised-Gaussian energy plus a residual network
   trained with the mixed TSM/DSM loss on the stored scores, half of each batch's times log-uniform near
   :math:`t = 0` (:mod:`diffstat.dnc.energy`).
3. **Sample** :math:`\pi_t(z) \propto \exp(-\sum_k E_k(z, t))`. Start from the product of the
   noised Gaussian parts at ``t_start`` (at :math:`t \to 0` the Gaussian product of the shards),
   then move down a grid of times to ``t_min`` (uniform in :math:`\log\sigma_t`), moving every
   particle by MALA steps with a per-chain Metropolis-Hastings accept at each time (proposal
   :math:`y = z + h\nabla\log\pi_t + \sqrt{2h}\,\xi`, whose density has :math:`4h` in the
   denominator: the trap in Du et al.'s public code). Finally MCMC at :math:`t = t_{\min}` (MALA
   with a dual-averaged step size) on the summed energy.

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

import math
import time

import torch

from diffstat._util import check_positive_int, ess_from_log_weights, progress_bar
from diffstat.dnc.gaussian import CombineResult, gaussian_product, sample_moments
from diffstat.dnc.energy import ProductEnergy, fit_shard_energies, focus_weights, load_shard_energy, whitening
from diffstat.dnc.mode_weights import calibrate_mode_weights
from diffstat.mcmc.adaptation import DualAveraging
from diffstat.mcmc.base import MCMCState
from diffstat.mcmc.mala import MALA_TARGET_ACCEPT, mala_step
from diffstat.tempering.resampling import systematic

__all__ = ["combine_diffusion"]


def _sum_log_probs(log_probs, x: torch.Tensor) -> torch.Tensor:
    """Sum of the shards' log-densities at ``x (n, dim)`` (callables ``x -> lp`` or ``x -> (lp, grad)``)."""
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for f in log_probs:
        out = f(x)
        total = total + (out[0] if isinstance(out, tuple) else out).detach().to(total)
    return total


def _mala_level(generator, state, lpg, h, num_steps):
    """``num_steps`` MALA steps at one level; returns the state, the mean acceptance per step
    (a tensor) and the number of evaluations."""
    acc = []
    for _ in range(num_steps):
        state, info = mala_step(generator, state, lpg, h)
        acc.append(info.acceptance_rate.mean())
    return state, torch.stack(acc).mean()


#: Options of the learned product, passed on when ``fit_energies`` starts the exact SMC from it.
_LEARNED_OPTIONS = tuple(
    "hidden depth num_steps batch_size lr small_t_fraction loss num_reference ema_decay focus_width "
    "focus_fraction t_min t_start num_levels mcmc_per_level num_final_steps resample_threshold reweight "
    "executor max_retries fits energy_models calibrate calibrate_options calibration_log_probs".split()
)


def combine_diffusion(
    subposteriors: list[torch.Tensor],
    *,
    num_samples: int,
    generator: torch.Generator,
    scores=None,
    progress: bool = False,
    hidden: int = 64,
    depth: int = 3,
    num_steps: int = 6000,
    batch_size: int = 512,
    lr: float = 2e-3,
    small_t_fraction: float = 0.5,
    loss: str = "mixed",
    num_reference: int = 1024,
    ema_decay: float = 0.999,
    focus_width: float | None = 3.0,
    focus_fraction: float = 0.5,
    t_min: float = 1e-3,
    t_start: float = 1.0,
    num_levels: int = 50,
    mcmc_per_level: int = 2,
    num_final_steps: int = 100,
    resample_threshold: float = 0.5,
    reweight: bool = False,
    log_probs=None,
    executor=None,
    max_retries: int = 2,
    fits: list[dict] | None = None,
    energy_models: list | None = None,
    calibrate: bool = True,
    calibrate_options: dict | None = None,
    calibration_log_probs=None,
    fit_energies: bool | None = None,
    smc_options: dict | None = None,
    draw_log_probs=None,
    surrogate_degree: int = 3,
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
    hidden, depth, num_steps, batch_size, lr, small_t_fraction, loss, num_reference, ema_decay
        Network and training settings per shard (:func:`fit_shard_energy`).
    focus_width, focus_fraction : float
        Train with a share ``focus_fraction`` of every batch drawn near the Gaussian product
        (within about ``focus_width`` of its standard deviations), at small times only, where the
        product must be accurate; ``focus_width=None`` trains on the shard draws uniformly.
    t_min, t_start : float
        The annealing runs from ``t_start`` down to ``t_min`` (the "t = 0" of the model).
    num_levels, mcmc_per_level : int
        Times on the grid (uniform in :math:`\log\sigma_t`) and MALA steps per time.
    num_final_steps : int
        MALA steps at ``t_min`` (half of them tune the step size, the rest sample).
    resample_threshold : float
        Resample when the ESS falls below this fraction of ``num_samples``.
    log_probs : list of K callables, optional
        The shards' exact log-densities (``x -> lp`` or ``x -> (lp, grad)``, original
        coordinates): the draws are then those of an SMC sampler to their sum, the exact full
        posterior (:func:`~diffstat.dnc.exact_smc.exact_product_smc`, with ``smc_options``).
    draw_log_probs : list of K tensors ``(n_k,)``, optional
        :math:`\log p_k` at each shard's draws (any constant per shard; the pipeline keeps them).
        With ``scores`` and without ``log_probs``: each shard's energy is a polynomial of degree
        ``surrogate_degree`` fitted to the values and scores at its draws
        (:mod:`diffstat.dnc.surrogate`), and the SMC samples the product of those; no network.
    fit_energies : bool, optional
        With ``log_probs``: start the SMC from a Gaussian fitted to the learned product's draws
        (True) or from the shards' Gaussian product, with no fit (False, the default: the SMC is
        consistent from either start and the fits cost most of the time). Ignored without
        ``log_probs``.
    executor : concurrent.futures.Executor, optional
        Fit the shard models there (with ``max_retries`` retries); default: in this process.
    fits : list of dicts, optional
        Models already fitted by :func:`fit_shard_energy` (on the same whitening): no training.
    calibrate : bool
        After the first half of the MCMC at ``t_min``, move the product's mass between its modes
        to the shares estimated from the shards' draw counts
        (:func:`~diffstat.dnc.mode_weights.calibrate_mode_weights`, with ``calibrate_options``;
        not with ``log_probs``).
    calibration_log_probs : list of K callables, optional
        The shards' exact log-densities (``x -> lp`` or ``x -> (lp, grad)``, original coordinates,
        any constant), called only to weigh the product's modes: then their masses are
        :math:`\int_{A_j}\prod_k p_k` by importance sampling (a few hundred points per shard and
        mode) instead of the draw counts, and at the end the particles are importance-resampled
        within each mode to the exact product (one more call per particle; ``attrs``:
        ``num_shard_evals`` per shard, ``final_is_ess`` as a fraction of ``num_samples``).
    energy_models : list of K objects with ``energy(z, t) -> (n,)``, optional
        Energies of the noised shards in the whitened coordinates of :func:`whitening` (for
        example exact ones, to test the sampler apart from the fit): no training.

    Returns
    -------
    CombineResult
        ``lp``: minus the summed energy at ``t_min`` (or the exact sum with ``log_probs``), in
        original coordinates up to a constant. ``groups["diffusion"]``: per level ``t``,
        ``sigma``, ``ess``, ``acceptance_rate``, ``step_size``, ``resampled``. ``attrs``:
        ``fit_time`` (sum over shards), ``max_fit_time``, ``combine_time``, ``num_energy_evals``,
        ``num_modes`` (modes of the product found by the calibration; 0 when it did not run),
        ``num_calibrated_modes``, ``num_shard_evals`` (points at which each shard's
        ``calibration_log_probs`` was called).
    """
    from diffstat.diffusion.processes import VP

    surrogate_time = None
    if log_probs is None and draw_log_probs is not None:
        from diffstat.dnc.surrogate import fit_polynomial_shards

        start = time.perf_counter()
        log_probs = fit_polynomial_shards(subposteriors, scores, draw_log_probs, degree=surrogate_degree)
        surrogate_time, fit_energies = time.perf_counter() - start, False
    if log_probs is not None:
        from diffstat.dnc.exact_smc import combine_exact

        learned = None
        if fit_energies:
            opts = {k: v for k, v in locals().items() if k in _LEARNED_OPTIONS}
            learned = lambda: combine_diffusion(
                subposteriors,
                num_samples=num_samples,  # noqa: E731
                generator=generator,
                scores=scores,
                progress=progress,
                **opts,
            )
        result = combine_exact(
            subposteriors,
            log_probs,
            num_samples=num_samples,
            generator=generator,
            smc_options=smc_options,
            learned=learned,
        )
        if surrogate_time is not None:
            result.attrs.update(
                fit_time=surrogate_time,
                max_fit_time=surrogate_time,
                exact_final_target=0,
                shard_energies=f"polynomial of degree {surrogate_degree}",
            )
        return result
    num_levels = check_positive_int(num_levels, "num_levels")
    mcmc_per_level = check_positive_int(mcmc_per_level, "mcmc_per_level")
    if not 0 < t_min < t_start <= 1.0:
        raise ValueError(f"need 0 < t_min < t_start <= 1, got t_min={t_min}, t_start={t_start}")
    k = len(subposteriors)
    if calibration_log_probs is not None and len(calibration_log_probs) != k:
        raise ValueError(f"calibration_log_probs must hold {k} callables, one per shard")
    x_all = torch.cat(subposteriors)
    dtype, device = x_all.dtype, x_all.device
    m, chol = whitening(subposteriors)
    chol_inv = torch.linalg.inv(chol)
    zs = [(x - m) @ chol_inv.T for x in subposteriors]
    # grad_z = L^T grad_x, as rows; without scores the fit uses denoising score matching
    gs = [None] * k if scores is None else [g @ chol for g in scores]

    # ---- the Gaussian product of the shards, in z: where the annealing starts
    moments = [sample_moments(z) for z in zs]
    mu_p, cov_p = gaussian_product([a for a, _ in moments], [b for _, b in moments])
    focus_w, focus = focus_weights(zs, mu_p, cov_p, focus_width, focus_fraction, t_min)

    # ---- fit the shard models (in parallel on the executor when given)
    seeds = torch.randint(0, 2**31 - 1, (k,), generator=generator, device=generator.device).tolist()
    fit_kwargs = dict(
        hidden=hidden,
        depth=depth,
        num_steps=num_steps,
        batch_size=batch_size,
        lr=lr,
        t_min=t_min,
        small_t_fraction=small_t_fraction,
        loss=loss,
        num_reference=num_reference,
        ema_decay=ema_decay,
        **focus,
    )
    if energy_models is not None:
        if len(energy_models) != k:
            raise ValueError(f"energy_models must hold {k} models, one per shard")
        fits = [{"fit_time": 0.0} for _ in range(k)]
    elif fits is None:
        args = [(zs[i].cpu(), None if gs[i] is None else gs[i].cpu()) for i in range(k)]
        kwargs = [dict(fit_kwargs, shard=i, seed=seeds[i], focus_weights=focus_w[i]) for i in range(k)]
        fits = fit_shard_energies(args, kwargs, executor, max_retries, progress)
    models = energy_models if energy_models is not None else [load_shard_energy(f).to(device) for f in fits]

    # ---- sampling coordinates: the Gaussian product (in z) is N(0, I) in w
    root = torch.linalg.cholesky(cov_p)
    sdtype = torch.float32
    product = ProductEnergy(models, mu_p.to(sdtype), root.to(sdtype))
    process = VP(t_min=t_min)
    start = time.perf_counter()

    # start: the product of the noised Gaussian parts at t_start (exact Gaussian), in w
    ts = torch.tensor(t_start, dtype=torch.float64)
    a0, s0 = float(process.alpha(ts)), float(process.sigma(ts))
    eye = torch.eye(x_all.shape[1], dtype=dtype, device=device)
    mu0, cov0 = gaussian_product([a0 * a for a, _ in moments], [a0**2 * b + s0**2 * eye for _, b in moments])
    root_inv = torch.linalg.inv(root)
    mu0_w = (mu0 - mu_p) @ root_inv.T
    cov0_w = root_inv @ cov0 @ root_inv.T
    chol0 = torch.linalg.cholesky(0.5 * (cov0_w + cov0_w.T))
    eps = torch.randn(
        num_samples, x_all.shape[1], generator=generator, dtype=dtype, device=generator.device
    ).to(device)
    w = (mu0_w + eps @ chol0.T).to(sdtype)
    log_q0 = -0.5 * (eps**2).sum(-1)
    log_w = torch.zeros(num_samples, dtype=torch.float64, device=device)
    if reweight:
        with torch.no_grad():
            log_w = (-product.energy(w, t_start)).double() - log_q0.double()

    # time grid uniform in log sigma_t from t_start to t_min
    sig = torch.exp(
        torch.linspace(
            math.log(s0),
            math.log(float(process.sigma(torch.tensor(t_min, dtype=torch.float64)))),
            num_levels + 1,
            dtype=torch.float64,
        )
    )
    times = [t_start] + [float(process.time_at_sigma(s)) for s in sig[1:-1]] + [t_min]
    h = torch.tensor(0.5 * min(1.0, float(torch.linalg.eigvalsh(cov0_w).min())), dtype=sdtype)
    record = {key: [] for key in ("t", "sigma", "ess", "acceptance_rate", "step_size", "resampled")}
    state = None
    with progress_bar(len(times) + num_final_steps, "annealed MCMC", progress) as bar:
        for i, t in enumerate(times):
            if i > 0 and reweight:
                with torch.no_grad():
                    log_w = log_w + (-product.energy(state.x, t) - state.log_prob).double()
            ess = ess_from_log_weights(log_w) / num_samples
            resampled = bool(ess < resample_threshold) or (reweight and i == len(times) - 1)
            lpg = product.log_prob_and_grad(t)
            x_now = w if state is None else state.x
            if resampled:
                idx = systematic(generator, log_w).to(device)
                x_now = x_now[idx]
                log_w = torch.zeros_like(log_w)
            state = MCMCState(x_now, *lpg(x_now))
            state, acc = _mala_level(generator, state, lpg, h, mcmc_per_level)
            # Robbins-Monro on log h toward MALA's optimal acceptance; one sync per level
            h = h * torch.exp(torch.clamp(2.0 * (acc - MALA_TARGET_ACCEPT), -1.0, 1.0)).to(sdtype)
            for key, val in (
                ("t", t),
                ("sigma", float(process.sigma(torch.tensor(t)))),
                ("ess", float(ess)),
                ("acceptance_rate", float(acc)),
                ("step_size", float(h)),
                ("resampled", resampled),
            ):
                record[key].append(val)
            bar.update()

        # ---- MCMC at t = t_min on the summed energy (or the exact shard log-densities)
        lpg = product.log_prob_and_grad(t_min)
        x_now = state.x
        state = MCMCState(x_now, *lpg(x_now))
        adapt = DualAveraging(h.clone(), MALA_TARGET_ACCEPT)
        num_adapt = num_final_steps // 2
        final_acc = []
        cal_info = {"num_modes": 0, "calibrated": [], "shares_before": [], "shares_after": []}
        for j in range(num_final_steps):
            if j == num_adapt and calibrate:
                root_inv_s = root_inv.to(sdtype)
                # B023: to_w is called only inside this iteration (by calibrate_mode_weights below)
                to_w = lambda z_: (z_.to(sdtype) - product.shift) @ root_inv_s.T  # noqa: E731, B023
                to_z = lambda w_: product.shift + w_ @ product.root.T  # noqa: E731
                exact_lp = None
                if calibration_log_probs is not None:
                    exact_lp = lambda z_: _sum_log_probs(calibration_log_probs, m + z_.to(dtype) @ chol.T)  # noqa: E731
                log_wc, cal_info = calibrate_mode_weights(
                    generator,
                    state.x,
                    product,
                    t_min,
                    [z.to(device) for z in zs],
                    to_w,
                    to_z,
                    0.5 * float(adapt.final_step_size),
                    exact_log_prob=exact_lp,
                    **(calibrate_options or {}),
                )
                if bool((log_wc != 0).any()):
                    idx = systematic(generator, log_wc).to(device)
                    state = MCMCState(state.x[idx], state.log_prob[idx], state.grad[idx])
                    cal_info["labels"] = cal_info["labels"][idx]
            step = adapt.step_size if j < num_adapt else adapt.final_step_size
            state, info = mala_step(generator, state, lpg, step)
            if j < num_adapt:
                adapt.update(info.acceptance_rate.mean())
            else:
                final_acc.append(info.acceptance_rate)
            bar.update()
    final_ess = float("nan")
    if calibration_log_probs is not None:
        # within each mode, importance-resample the learned product to the exact one (the modes'
        # masses stay as calibrated): removes the learned energies' bias within the modes
        z_now = mu_p + state.x.to(dtype) @ root.T
        log_r = _sum_log_probs(calibration_log_probs, m + z_now @ chol.T) - state.log_prob.double()
        cal_info["num_shard_evals"] = cal_info.get("num_shard_evals", 0) + num_samples
        labels = cal_info.get("labels")
        labels = (
            torch.zeros(num_samples, dtype=torch.long, device=device) if labels is None else labels.to(device)
        )
        log_w = torch.zeros_like(log_r)
        ess_sum = 0.0
        for j in torch.unique(labels).tolist():
            in_j = labels == j
            lw = log_r[in_j] - torch.logsumexp(log_r[in_j], 0)
            log_w[in_j] = lw + math.log(float(in_j.double().mean()))
            ess_sum += float(ess_from_log_weights(lw)) if j >= 0 else 0.0
        final_ess = ess_sum / num_samples
        idx = systematic(generator, log_w).to(device)
        state = MCMCState(state.x[idx], state.log_prob[idx], state.grad[idx])
        final_acc = [a[idx] for a in final_acc]
    combine_time = time.perf_counter() - start
    z_final = mu_p + state.x.to(dtype) @ root.T
    draws = m + z_final @ chol.T
    # lp in original coordinates up to the constant log|det| of the whitening
    lp = state.log_prob.to(dtype)
    acc_final = torch.stack(final_acc).mean(0) if final_acc else torch.full((num_samples,), float("nan"))
    groups = {"diffusion": {key: torch.tensor(val, dtype=torch.float64) for key, val in record.items()}}
    fit_times = [float(f["fit_time"]) for f in fits]
    attrs = {
        "fit_time": float(sum(fit_times)),
        "max_fit_time": float(max(fit_times)),
        "combine_time": float(combine_time),
        "num_energy_evals": int(product.num_evals),
        "final_step_size": float(adapt.final_step_size),
        "exact_final_target": 0,
        "num_levels": num_levels,
        "num_modes": int(cal_info["num_modes"]),
        "num_calibrated_modes": len(cal_info["calibrated"]),
        "num_shard_evals": int(cal_info.get("num_shard_evals", 0)),
        "final_is_ess": final_ess,
    }
    return CombineResult(draws, {"lp": lp, "acceptance_rate": acc_final.to(dtype)}, groups, attrs)
