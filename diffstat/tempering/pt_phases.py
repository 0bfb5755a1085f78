r"""The two phases of a parallel-tempering run (:mod:`diffstat.tempering.pt`), each a loop of
:func:`~diffstat.tempering.pt.pt_step` iterations.

:func:`warmup` tunes the step sizes per temperature by dual averaging and, at the ends of rounds
that double in length, the ladder and the preconditioners (:mod:`diffstat.tempering.ladder`).
:func:`record` runs the recorded iterations: the cold replicas' draws and their statistics, and
the log-evidence by stepping stones over the ladder (Xie et al. 2011),
:math:`\log\hat Z = \sum_r \log \overline{\exp\{(\beta_{r+1}-\beta_r)\,\delta(x_r)\}}`, pooled over
chains, with the standard error of an MCMC mean and checks of its reliability (:func:`stepping_stones`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from diffstat._util import pareto_k
from diffstat.rank_stats import _ess, _split_chains
from diffstat.tempering.ladder import (
    RoundSums,
    end_of_round,
    equalize_ladder,
    is_dense,
    warmup_windows,
    with_factors,
)
from diffstat.tempering.runs import CHI2_ALPHA, runs_agreement

__all__ = ["Evidence", "PTOutput", "evidence_problems", "warmup", "record", "stepping_stones"]

#: Reference draws for the beta = 0 replicas are made this many iterations at a time.
_REFERENCE_BLOCK = 256


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
    evidence: Evidence
    global_barrier: float

    @property
    def log_normalizer(self) -> float:
        return self.evidence.log_z

    @property
    def log_normalizer_se(self) -> float:
        return self.evidence.se


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
    r"""``num_samples`` recorded iterations: the cold replicas' draws, and every replica's stepping-stone
    term :math:`(\beta_{r+1} - \beta_r)\,\delta(x_r)` for the evidence (:func:`stepping_stones`).
    ``reference``: whether the beta = 0 replicas are exact draws, and warm-up's block of them; the
    other arguments as for :func:`warmup`."""
    c, r, dim = layout.num_chains, state.betas.numel(), state.particles.x.shape[1]
    dtype, device = state.betas.dtype, state.betas.device
    terms = torch.empty(num_samples, c, r - 1, dtype=dtype, device=device)
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
        terms[j] = dbeta * state.particles.delta.reshape(c, r)[:, :-1]
        bar.update()
    evidence = stepping_stones(terms)
    _, barrier = equalize_ladder(state.betas, 1 - sums.swap_rate)
    nan = torch.full((1,), math.nan, dtype=dtype, device=device)
    temperatures = {
        "beta": state.betas,
        "swap_rate": torch.cat([sums.swap_rate, nan]),
        "acceptance_rate": sums.acc / num_samples,
        "step_size": state.step_size,
        "log_z_increment": torch.cat([evidence.increments, nan]),
    }
    draws, lp, acc_cold, div_cold, swap_cold = (
        t.transpose(0, 1) for t in (draws, lp, acc_cold, div_cold, swap_cold)
    )
    return PTOutput(draws, lp, acc_cold, div_cold, swap_cold, temperatures, evidence, barrier)


class Evidence(NamedTuple):
    r"""The stepping-stone estimate (:func:`stepping_stones`): ``increments (R-1,)`` pooled over
    chains, ``log_z`` their sum, its standard error ``se``; each chain's own estimate ``chain_log_z
    (C,)`` with its error ``chain_se (C,)``; ``agreement_p``, the p-value of Cochran's Q of the
    chains' estimates against their errors (1 with one chain), and ``pareto_k``, the largest Pareto
    :math:`\hat k` over the pairs of the weights :math:`w_r` (over 0.7: a mean of them, and its
    error, are unreliable)."""

    increments: torch.Tensor
    log_z: float
    se: float
    chain_log_z: torch.Tensor
    chain_se: torch.Tensor
    agreement_p: float
    pareto_k: float


def _mean_se(y: torch.Tensor) -> float:
    """Monte Carlo standard error of the mean of the chains ``y: (C, T)``: their sd over the square
    root of the multi-chain ESS of split chains (Vehtari et al. 2021, eq. 10-11, as R-hat's: the
    chains' autocorrelations, and their disagreement through the between-chain variance); NaN
    below 4 draws a chain."""
    if y.shape[1] < 4:
        return math.nan
    sd = float(y.std())
    if not sd > 0:
        return 0.0
    ess = float(_ess(_split_chains(y.detach().cpu().double().numpy()[None]))[0])
    return sd / math.sqrt(ess)


def stepping_stones(terms: torch.Tensor) -> Evidence:
    r"""The stepping-stone log-evidence and its standard error from ``terms: (T, C, R-1)``, each
    iteration's :math:`(\beta_{r+1} - \beta_r)\,\delta(x_r)` per chain and pair.

    :math:`\log\hat Z = \sum_r \log \bar w_r`, :math:`\bar w_r` the mean of :math:`w_r =
    e^{(\beta_{r+1} - \beta_r)\delta(x_r)}` over all iterations and chains. To first order
    (delta method) :math:`\log\hat Z - \log Z \approx \bar u - (R - 1)` with :math:`u_t =
    \sum_r w_{r,t}/\bar w_r`, one scalar per chain and iteration, so the standard error is that
    of an MCMC mean of :math:`u` (:func:`_mean_se`): the replicas at neighbouring temperatures and
    successive iterations are correlated, which the sum over :math:`r` within an iteration and the
    autocorrelation across iterations account for. The reported error is the larger of that and
    the spread of the chains' own estimates over :math:`\sqrt C`: with few chains either can be
    small by chance. Each chain's estimate gets the same error from its own draws; Cochran's Q of
    the chains' estimates against them (:func:`~diffstat.tempering.runs.runs_agreement`) tests
    whether the chains disagree beyond their own errors. A pair whose weights are heavy-tailed
    (Pareto :math:`\hat k > 0.7`, Vehtari et al. 2024) makes :math:`\bar w_r` low with an error
    that does not show it (all chains miss the same rare large weights), which no spread detects."""
    t, c, r1 = terms.shape
    increments = torch.logsumexp(terms.reshape(t * c, r1), 0) - math.log(t * c)
    chain_increments = torch.logsumexp(terms, 0) - math.log(t)  # (C, R-1)
    chain_log_z = chain_increments.sum(1)
    u = torch.exp(terms - increments).sum(-1).T  # (C, T)
    se = _mean_se(u)
    own = torch.exp(terms - chain_increments).sum(-1).T
    chain_se = torch.tensor([_mean_se(own[i : i + 1]) for i in range(c)], dtype=terms.dtype)
    if c > 1:  # the larger, or the spread where the series are too short for an ESS
        spread = float(chain_log_z.std() / math.sqrt(c))
        se = se if se >= spread else spread
    agreement = runs_agreement(chain_log_z.tolist(), chain_se.tolist())
    ks = [pareto_k(terms[:, :, i].reshape(-1)) for i in range(r1)]
    khat = max((k for k in ks if not math.isnan(k)), default=math.nan)
    return Evidence(increments, float(increments.sum()), se, chain_log_z, chain_se, agreement, khat)


#: Above this Pareto k of a pair's weights the stepping-stone estimate is flagged (as AIS's weights).
MAX_PARETO_K = 0.7


def evidence_problems(ev: Evidence) -> str:
    """Why the evidence ``ev`` and its standard error are unreliable ('' when they are not): chains
    whose estimates disagree beyond their own errors (Cochran's Q at ``CHI2_ALPHA``), or a pair of
    temperatures whose weights are heavy-tailed."""
    reasons = []
    if ev.agreement_p < CHI2_ALPHA:
        lo, hi = int(ev.chain_log_z.argmin()), int(ev.chain_log_z.argmax())
        est = ", ".join(f"{ev.chain_log_z[i]:.3f} +- {ev.chain_se[i]:.3f}" for i in (lo, hi))
        reasons.append(
            f"the {len(ev.chain_log_z)} chains' log Z estimates (lowest and highest: {est}) disagree "
            "beyond their standard errors (Cochran's Q, "
            f"p = {ev.agreement_p:.1e} < {CHI2_ALPHA})"
        )
    if ev.pareto_k > MAX_PARETO_K:
        reasons.append(
            f"the stepping-stone weights of a pair of temperatures are heavy-tailed (Pareto k "
            f"{ev.pareto_k:.2f} > {MAX_PARETO_K}): its mean is likely too low, by more than the error shows"
        )
    if not reasons:
        return ""
    return (
        f"PT: log Z = {ev.log_z:.3f} +- {ev.se:.3f} is unreliable: "
        + "; ".join(reasons)
        + ". Raise num_samples or num_temperatures, or give a reference= closer to the target"
    )
