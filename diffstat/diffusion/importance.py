r"""Importance rounds judged and pooled: the per-round summary (log Z, Kish and PSIS ESS, Pareto
:math:`\hat k`, mode weights), the rule that says a round *missed*, and the pooling of the rounds
that did not, all on log scales (the rule is stated in :mod:`diffstat.diffusion.sampler`).

A round missed when Pareto :math:`\hat k > 0.7` (the weights' tail is too heavy for the error to
fall at a usable rate, Vehtari et al. 2024), when its Kish ESS is below 20, or when a weight is
:math:`+\infty`. :func:`pool_rounds` weights the used rounds' :math:`\hat Z_r` by their Kish ESS
(any convex combination of unbiased estimates is unbiased) and their draws by their smoothed ESS.
The per-mode resampling helpers draw the held-out and restocking particles of the next round.
"""

from __future__ import annotations

import math

import scipy.stats
import torch

from diffstat._util import ess_from_log_weights, log_normalizer_estimate, pareto_smooth
from diffstat.tempering.runs import cochran_q

__all__ = [
    "MAX_PARETO_K",
    "MIN_ROUND_ESS",
    "MIN_PROPOSAL_WIDTH",
    "importance_summary",
    "round_missed",
    "pool_rounds",
    "round_agreement",
    "missed_warning",
    "unreliable_reasons",
    "unreliable_warning",
    "resample_per_mode",
    "unique_rows",
]

#: Above this Pareto k a round's weights are too heavy-tailed to trust (Vehtari et al. 2024).
MAX_PARETO_K = 0.7
#: Below this Kish ESS a round rests on a handful of points: fewer than the 20 weights the Pareto
#: tail fit needs, and a variance estimated from them is off by about sqrt(2/19) = 30%.
MIN_ROUND_ESS = 20.0
#: Below this p-value of Cochran's Q the used rounds' log Z estimates disagree beyond their standard
#: errors (:func:`round_agreement`): one in a thousand runs of a sound sampler is flagged, while a
#: proposal that misses mass can leave its rounds several errors apart (the funnel, seed 2: 5.2).
MIN_AGREEMENT_P = 1e-3
#: A run whose last round wastes more than this share of its proposals (Kish ESS fraction below it)
#: after every round of learning has a proposal that does not match the target's shape: on Neal's
#: funnel the last rounds end at 0.01 to 0.11 with log Z 0.6 to 1.2 nats low, while runs that are
#: right end at 0.15 to 1.0 (``docs/diffusion_sampler.md``).
MIN_FINAL_ESS_FRACTION = 0.1
#: Below this proposal width (:func:`~diffstat.diffusion.gaussians.proposal_width`, at least 1 for a
#: proposal fitted to draws of its mode) a mode's Gaussian is at least three times narrower than the
#: mode can be, and its equal-looking weights hide the mass it never proposes.
MIN_PROPOSAL_WIDTH = 0.1


def importance_summary(
    log_w: torch.Tensor, modes: torch.Tensor, num_modes: int
) -> dict[str, torch.Tensor | float]:
    r"""Summary of one round's log weights ``(n,)`` with mode assignments ``(n,)``: log Z and its
    standard error, the Kish ESS of the weights and of their Pareto-smoothed version with its
    :math:`\hat k` (:func:`~diffstat._util.pareto_smooth`; the smoothed log weights as ``log_w_psis``), the
    mode weights :math:`\sum_{i \in k} \bar w_i` and the ESS of the weights within each mode ``(K,)``.

    A NaN weight counts as zero (a log-density undefined there); a weight of :math:`+\infty` counts
    as zero too but is reported in ``num_infinite``, which makes the round missed
    (:func:`round_missed`). A round without a finite weight has log Z :math:`-\infty`, an infinite
    standard error, zero ESS and zero mode weights, and never a NaN."""
    log_w = log_w.double()
    num_infinite = int((log_w == math.inf).sum())
    log_w = torch.nan_to_num(log_w, nan=-math.inf, posinf=-math.inf, neginf=-math.inf)
    zeros = torch.zeros(num_modes, dtype=log_w.dtype, device=log_w.device)
    if not bool(torch.isfinite(log_w).any()):
        return {
            "log_z": -math.inf,
            "se": math.inf,
            "ess": 0.0,
            "ess_psis": 0.0,
            "pareto_k": math.nan,
            "log_w_psis": log_w,
            "mode_weights": zeros,
            "ess_per_mode": zeros,
            "num_infinite": num_infinite,
        }
    log_z, se = log_normalizer_estimate(log_w)
    w = torch.softmax(log_w, 0)
    mode_weights = zeros.index_add(0, modes, w)
    ess_mode = torch.stack(
        [
            ess_from_log_weights(log_w[modes == k]) if bool((modes == k).any()) else log_w.new_zeros(())
            for k in range(num_modes)
        ]
    )
    smoothed, k = pareto_smooth(log_w)
    return {
        "log_z": log_z,
        "se": se if math.isfinite(se) else math.inf,
        "ess": float(ess_from_log_weights(log_w)),
        "ess_psis": float(ess_from_log_weights(smoothed)),
        "pareto_k": k,
        "log_w_psis": smoothed,
        "mode_weights": mode_weights,
        "ess_per_mode": torch.nan_to_num(ess_mode),
        "num_infinite": num_infinite,
    }


def round_missed(summary: dict) -> bool:
    r"""Whether a round (an :func:`importance_summary`) missed the target: Pareto :math:`\hat k`
    above ``MAX_PARETO_K``, a Kish ESS below ``MIN_ROUND_ESS``, an infinite weight, or a
    proposal narrower than ``MIN_PROPOSAL_WIDTH`` for a mode holding weight. A NaN
    :math:`\hat k` (no tail to fit) decides nothing by itself: with fewer than 20 positive weights
    the ESS rule already applies, and with equal weights the round is perfect."""
    heavy = bool(summary["pareto_k"] > MAX_PARETO_K)
    narrow = summary.get("proposal_width", math.inf) < MIN_PROPOSAL_WIDTH
    return heavy or narrow or not summary["ess"] >= MIN_ROUND_ESS or summary.get("num_infinite", 0) > 0


def _convex(weights: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """Log of ``weights (R,)`` restricted to ``used`` and normalised; equal over ``used`` where they
    sum to zero there (never NaN)."""
    w = torch.where(used, weights.clamp_min(0.0), torch.zeros_like(weights))
    w = w if float(w.sum()) > 0 else used.double()
    return torch.log(w / w.sum())


def round_agreement(rounds: list[dict], used: torch.Tensor) -> tuple[float, int]:
    r"""Cochran's :math:`Q = \sum_r (\ell_r - \bar\ell)^2/s_r^2` of the used rounds' log Z estimates
    :math:`\ell_r` with standard errors :math:`s_r` (:math:`\bar\ell` their inverse-variance mean) and
    its degrees of freedom (used rounds with a finite positive error, minus one; 0 when fewer than
    two). Each round's :math:`\hat Z_r` is unbiased for the same Z, so where the errors are honest
    :math:`Q` is about :math:`\chi^2` with that many degrees of freedom (Cochran 1954); a proposal
    that misses part of the target's mass misses a different part in each round, and the rounds then
    lie many standard errors apart (Neal's funnel: 0.3 and 0.9 nats at errors of 0.03 to 0.15).
    Computed by :func:`~diffstat.tempering.runs.cochran_q`."""
    rows = [
        r
        for r, s in enumerate(rounds)
        if bool(used[r]) and math.isfinite(s["log_z"]) and 0.0 < s["se"] < math.inf
    ]
    return cochran_q([rounds[r]["log_z"] for r in rows], [rounds[r]["se"] for r in rows])


def pool_rounds(rounds: list[dict]) -> dict:
    r"""Pool the rounds' summaries (:func:`importance_summary`) by the rule of the module
    docstring, in log space. Returns ``used (R,)`` bool, ``reliable`` (False when every round
    missed and the round of largest Kish ESS stands in alone), ``log_z`` and ``log_z_se`` of the
    pool, and ``log_mu (R,)``, the log share of each round in the returned draws (:math:`-\infty`
    for a round left out).

    The standard error is the delta method's (``log_z_se_delta``) times the Birge ratio
    :math:`\max(1, \sqrt{Q/\nu})` of :func:`round_agreement` (Birge 1932: errors scaled until the
    rounds' scatter is what they claim); ``agreement_p`` is :math:`P(\chi^2_\nu > Q)` (1 with one
    round) and ``rounds_agree`` whether it is at least ``MIN_AGREEMENT_P``."""
    missed = torch.tensor([round_missed(s) for s in rounds])
    reliable = not bool(missed.all())
    used = ~missed
    if not reliable:
        best = max(range(len(rounds)), key=lambda r: (rounds[r]["ess"], r))  # the later round on a tie
        used = torch.arange(len(rounds)) == best
    ess = torch.tensor([s["ess"] for s in rounds], dtype=torch.float64)
    log_lam = _convex(ess, used)
    log_zr = torch.tensor([s["log_z"] for s in rounds], dtype=torch.float64)
    terms = torch.where(used, log_lam + log_zr, torch.full_like(log_zr, -math.inf))
    log_z = float(torch.logsumexp(terms, 0))
    se_r = torch.tensor([s["se"] for s in rounds], dtype=torch.float64)
    if math.isfinite(log_z):  # se(log Z) = sqrt(sum_r (lambda_r Z_r / Z)^2 se_r^2), every ratio at most 1
        share = torch.exp(terms - log_z)
        log_z_se = float(torch.sqrt((torch.where(used, share * se_r, torch.zeros_like(se_r)) ** 2).sum()))
    else:
        log_z_se = math.inf
    ess_psis = torch.tensor([s["ess_psis"] for s in rounds], dtype=torch.float64)
    log_z_se = log_z_se if math.isfinite(log_z_se) else math.inf
    log_mu = _convex(ess_psis, used)
    q, dof = round_agreement(rounds, used)
    p_value = float(scipy.stats.chi2.sf(q, dof)) if dof else 1.0
    return {
        "used": used,
        "reliable": reliable,
        "log_z": log_z,
        "log_z_se": log_z_se * max(1.0, math.sqrt(q / dof)) if dof else log_z_se,
        "log_z_se_delta": log_z_se,
        "agreement_p": p_value,
        "rounds_agree": p_value >= MIN_AGREEMENT_P,
        "log_mu": log_mu,
    }


def missed_warning(rounds: list[dict], pool: dict) -> str:
    """The text of the warning when every round missed."""
    ks = ", ".join(f"{s['pareto_k']:.2f}" for s in rounds)
    ess = ", ".join(f"{s['ess']:.1f}" for s in rounds)
    sizes = ", ".join(str(s["num_proposals"]) for s in rounds)
    width = ", ".join(f"{s.get('proposal_width', math.inf):.3g}" for s in rounds)
    best = int(torch.nonzero(pool["used"]).flatten()[0])
    return (
        f"diffusion: every round missed the target (Pareto k = {ks} against the limit {MAX_PARETO_K}; "
        f"Kish ESS = {ess} of {sizes} proposals against the minimum {MIN_ROUND_ESS:.0f}; proposal width = "
        f"{width} against the minimum {MIN_PROPOSAL_WIDTH}): the proposals did "
        f"not cover the posterior, and the draws and log Z come from round {best} alone and are unreliable "
        "(attrs reliable = 0). Give the mode search and the restocking more work (num_explore, "
        "explore_steps, restock_steps, chains_per_mode, refresh_chains), more rounds (max_rounds), or use "
        "MCMC ('nuts') or SMC ('smc')."
    )


def unreliable_reasons(
    rounds: list[dict], pool: dict, min_final: float = MIN_FINAL_ESS_FRACTION
) -> list[str]:
    """Why a pool whose rounds did not all miss is still unreliable (empty when nothing is wrong): the
    used rounds' log Z estimates disagree beyond their errors (:func:`round_agreement`), or the last
    round's Kish ESS fraction is below ``min_final``."""
    reasons = []
    if not pool["rounds_agree"]:
        used = [r for r in range(len(rounds)) if bool(pool["used"][r])]
        est = ", ".join(f"{rounds[r]['log_z']:.3f} +- {rounds[r]['se']:.3f}" for r in used)
        reasons.append(
            f"the rounds' log Z estimates ({est}) disagree beyond their standard errors (Cochran's Q, "
            f"p = {pool['agreement_p']:.1e} < {MIN_AGREEMENT_P}; the error is scaled by their scatter)"
        )
    last = rounds[-1]
    fraction = last["ess"] / max(last["num_proposals"], 1)
    if fraction < min_final:
        reasons.append(
            f"the last round's ESS is {fraction:.3f} of its proposals (below {min_final:.2g}) after "
            f"{len(rounds)} rounds of learning"
        )
    return reasons


def unreliable_warning(reasons: list[str]) -> str:
    """The text of the warning for :func:`unreliable_reasons`."""
    return (
        "diffusion: " + "; and ".join(reasons) + ". The proposals do not match the target's shape and "
        "miss part of its mass, so log Z is likely too low and the draws lack that part (attrs reliable = "
        "0). Targets with a neck or a heavy tail (Neal's funnel) need MCMC with divergence checks "
        "('nuts'), a reparameterisation, or more rounds (max_rounds) and larger rounds (num_proposals)."
    )


def resample_per_mode(
    log_w: torch.Tensor, modes: torch.Tensor, num_modes: int, per_mode: int, generator
) -> torch.Tensor:
    """Indices ``(<= K per_mode,)`` of ``per_mode`` draws per mode from the self-normalised weights
    within that mode (modes without finite weight are skipped)."""
    picks = []
    for k in range(num_modes):  # a loop over modes (few), not over particles
        rows = torch.nonzero((modes == k) & torch.isfinite(log_w)).flatten()
        if rows.numel() == 0:
            continue
        p = torch.softmax(log_w[rows].double(), 0)
        picks.append(
            rows[
                torch.multinomial(p.to(generator.device), per_mode, replacement=True, generator=generator).to(
                    rows.device
                )
            ]
        )
    return torch.cat(picks) if picks else torch.zeros(0, dtype=torch.long, device=log_w.device)


def unique_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct rows of ``x: (n, dim)`` and the index of one occurrence of each."""
    uniq, inverse = torch.unique(x, dim=0, return_inverse=True)
    first = torch.full((uniq.shape[0],), x.shape[0], dtype=torch.long, device=x.device).scatter_reduce(
        0, inverse, torch.arange(x.shape[0], device=x.device), reduce="amin"
    )
    return uniq, first
