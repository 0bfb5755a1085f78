r"""The two phases of a parallel-tempering run (:mod:`diffstat.tempering.pt`), each a loop of
:func:`~diffstat.tempering.pt.pt_step` iterations.

:func:`warmup` tunes the step sizes per temperature by dual averaging and, at the ends of rounds
that double in length, the ladder and the preconditioners (:mod:`diffstat.tempering.ladder`).
:func:`record` runs the recorded iterations: the cold replicas' draws and their statistics, and
the log-evidence by stepping stones over the ladder (Xie et al. 2011),
:math:`\log\hat Z = \sum_r \log \overline{\exp\{(\beta_{r+1}-\beta_r)\,\delta(x_r)\}}`, pooled over
chains, with the standard error from the spread of independent units (:func:`stepping_stones`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from diffstat.tempering.ladder import (
    RoundSums,
    end_of_round,
    equalize_ladder,
    is_dense,
    warmup_windows,
    with_factors,
)

__all__ = ["PTOutput", "warmup", "record", "stepping_stones"]

#: Reference draws for the beta = 0 replicas are made this many iterations at a time.
_REFERENCE_BLOCK = 256
#: With a single chain, the evidence's standard error comes from this many batches of iterations.
_SE_BATCHES = 8


class PTOutput(NamedTuple):
    """Cold-chain draws ``(C, T, dim)``; their target log-densities, local acceptance, divergences and
    the coldest pair's swap acceptance (NaN where not proposed), each ``(C, T)``; per temperature
    ``betas``, ``swap_rate`` (pair r to r+1, NaN for the last), ``acceptance_rate``, ``step_size``,
    ``log_z_increment`` (NaN for the last); ``log_normalizer`` and its ``se``; ``global_barrier``."""

    draws: torch.Tensor
    lp: torch.Tensor
    acceptance: torch.Tensor
    diverging: torch.Tensor
    swap_acceptance: torch.Tensor
    temperatures: dict[str, torch.Tensor]
    log_normalizer: float
    log_normalizer_se: float
    global_barrier: float


def _reference_draws(generator, path, it: int, c: int, block, device):
    """Exact reference draws ``(C, dim)`` for iteration ``it``, made ``_REFERENCE_BLOCK`` iterations at
    a time (reference sampling has a per-call overhead); returns them and the block."""
    if it % _REFERENCE_BLOCK == 0:
        block = path.sample_reference(c * _REFERENCE_BLOCK, generator, device)
        block = block.reshape(_REFERENCE_BLOCK, c, -1)
    return block[it % _REFERENCE_BLOCK], block


def warmup(generator, state, step_fn, adapt, num_warmup, adapt_what, exact, path, layout, bar):
    """``num_warmup`` iterations tuning the step sizes per temperature by dual averaging, with the
    ladder and preconditioners updated at the ends of rounds (:func:`end_of_round`). Returns the
    state and the current block of reference draws.

    ``step_fn(generator, state, parity, reference_x=...)``: one iteration (:func:`pt_step` with its
    settings bound); ``adapt``: the dual averaging of the step sizes ``(R,)``; ``adapt_what``:
    whether the ladder and the preconditioners are adapted; ``exact``: whether the beta = 0
    replicas are exact reference draws; ``layout``: which rows hold which temperature."""
    c, r, dim = layout.num_chains, state.betas.numel(), state.particles.x.shape[1]
    dtype, device = state.betas.dtype, state.betas.device
    updates, windows = warmup_windows(num_warmup, *adapt_what)
    is_ref_temp = torch.zeros(r, dtype=torch.bool, device=device)
    is_ref_temp[0] = exact
    sums, block = RoundSums.zeros(r, dim, dtype, device, is_dense(state)), None
    for it in range(num_warmup):
        ref_x, block = _reference_draws(generator, path, it, c, block, device) if exact else (None, block)
        state, info = step_fn(generator, state, it % 2, reference_x=ref_x)
        acc_t = info.acceptance.reshape(c, r).mean(0)
        h = adapt.update(torch.where(is_ref_temp, torch.full_like(acc_t, adapt.target_accept), acc_t))
        state = state._replace(step_size=h)
        sums = sums.add(info, state.particles.x.reshape(c, r, -1), moments=True)
        if it + 1 in windows:
            moments = [sums.m1, sums.m2, sums.count]
            update = it + 1 in updates
            betas, inv_mass = end_of_round(
                update, state.betas, sums.swap_rate, adapt, state.inv_mass, moments
            )
            state = with_factors(state._replace(betas=betas, step_size=adapt.step_size, inv_mass=inv_mass))
            sums = RoundSums.zeros(r, dim, dtype, device, is_dense(state))
        bar.update()
    return state._replace(step_size=adapt.final_step_size if num_warmup else state.step_size), block


def record(generator, state, step_fn, num_samples, num_warmup, reference, path, layout, bar) -> PTOutput:
    """``num_samples`` recorded iterations: the cold replicas' draws, and stepping-stone sums per unit
    (each chain, or with one chain, ``_SE_BATCHES`` batches of iterations) for the evidence.
    ``reference``: whether the beta = 0 replicas are exact draws, and warm-up's block of them; the
    other arguments as for :func:`warmup`."""
    c, r, dim = layout.num_chains, state.betas.numel(), state.particles.x.shape[1]
    dtype, device = state.betas.dtype, state.betas.device
    num_batches = 1 if c > 1 else min(_SE_BATCHES, num_samples)
    ss_lse = torch.full((c, num_batches, r - 1), -math.inf, dtype=dtype, device=device)
    draws = torch.empty(num_samples, c, dim, dtype=dtype, device=device)
    lp, acc_cold, swap_cold = (torch.empty(num_samples, c, dtype=dtype, device=device) for _ in range(3))
    div_cold = torch.empty(num_samples, c, dtype=torch.bool, device=device)
    (exact, block), dbeta = reference, state.betas[1:] - state.betas[:-1]
    sums = RoundSums.zeros(r, dim, dtype, device)
    for j in range(num_samples):
        it = num_warmup + j
        ref_x, block = _reference_draws(generator, path, it, c, block, device) if exact else (None, block)
        state, info = step_fn(generator, state, it % 2, reference_x=ref_x)
        sums = sums.add(info, state.particles.x.reshape(c, r, -1), moments=False)
        acc_cold[j] = info.acceptance[layout.cold_rows]
        div_cold[j] = info.diverging[layout.cold_rows]
        swap_cold[j] = torch.where(info.proposed[-1], info.swap_prob[:, -1], math.nan)
        draws[j] = state.particles.x.reshape(c, r, -1)[:, -1]
        lp[j] = state.particles.target_log_prob[layout.cold_rows]
        b = j * num_batches // num_samples
        ss_lse[:, b] = torch.logaddexp(ss_lse[:, b], dbeta * state.particles.delta.reshape(c, r)[:, :-1])
        bar.update()
    pooled, se = stepping_stones(ss_lse, num_samples)
    _, barrier = equalize_ladder(state.betas, 1 - sums.swap_rate)
    nan = torch.full((1,), math.nan, dtype=dtype, device=device)
    temperatures = {
        "beta": state.betas,
        "swap_rate": torch.cat([sums.swap_rate, nan]),
        "acceptance_rate": sums.acc / num_samples,
        "step_size": state.step_size,
        "log_z_increment": torch.cat([pooled, nan]),
    }
    draws, lp, acc_cold, div_cold, swap_cold = (
        t.transpose(0, 1) for t in (draws, lp, acc_cold, div_cold, swap_cold)
    )
    return PTOutput(draws, lp, acc_cold, div_cold, swap_cold, temperatures, float(pooled.sum()), se, barrier)


def stepping_stones(ss_lse: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, float]:
    r"""The stepping-stone log-evidence increments pooled over all units, ``(R-1,)``, and the
    standard error of their sum from the spread of the per-unit sums over the square root of the
    number of units. ``ss_lse: (C, B, R-1)``: per chain and batch of iterations (``B`` batches
    splitting ``num_samples`` iterations as evenly as they go), :math:`\log\sum\exp\{(\beta_{r+1} -
    \beta_r)\,\delta(x_r)\}` over the batch's iterations; each unit is a (chain, batch) pair."""
    c, num_batches, r1 = ss_lse.shape
    batch_size = torch.bincount(torch.arange(num_samples) * num_batches // num_samples, minlength=num_batches)
    units = ss_lse.reshape(c * num_batches, r1)
    pooled = torch.logsumexp(units, 0) - math.log(c * num_samples)  # (R-1,)
    per_unit = (units - torch.log(batch_size.to(units)).repeat(c).unsqueeze(-1)).sum(1)
    # one unit (one run of one draw) has no spread to estimate: its standard error is unknown (NaN)
    se = float(per_unit.std() / math.sqrt(per_unit.numel())) if per_unit.numel() > 1 else math.nan
    return pooled, se
