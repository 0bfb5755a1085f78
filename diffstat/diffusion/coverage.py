r"""Does the importance proposal cover the posterior? A check on particles it did not draw.

Importance weights see only where the proposal draws: posterior mass that :math:`q` never reaches
leaves no trace in Pareto :math:`\hat k`, the ESS or the rounds' agreement (a funnel's neck). Points
drawn by another method can see it. The diffusion sampler's mode search runs a short adaptive
tempered SMC from the reference (:func:`~diffstat.diffusion.modes.smc_seeds`); its particles are
approximately draws from :math:`p` that reach where tempering reaches (the prior's mass at small
scales included). At each, the normalised importance ratio

.. math:: w(x) = \frac{p(x)}{\hat Z\, q(x)}

says how well :math:`q` covers :math:`p` there: :math:`\mathbb E_q[w] \approx 1`, and the
posterior mass where :math:`w > K` is the mass that :math:`q` proposes at less than a :math:`K`-th of
its share, which the weights can only restore through draws that :math:`q` rarely makes. Its
estimate, the share :math:`\hat m` of the particles with :math:`w > K`, fails the check where it
exceeds ``MAX_MISSED`` by ``MISSED_Z`` binomial standard errors. A proposal that covers :math:`p`
keeps :math:`\hat m` small: by Markov's inequality :math:`P_p(w > K) \le \mathbb E_p[w]/K
= 1/(K\,\mathrm{ESS}_\infty)`, the inverse of :math:`K` times the ideal ESS fraction. A mode the SMC
lost only leaves a region out, which can make the check miss but not fail; particles it left lagging
outside the posterior's bulk could fail it where :math:`q` is narrower still (not seen on the
posteriordb suite, ``docs/diffusion_coverage.md``). The evaluations are the particles' own
(``len(pilot)``, 256 at the defaults); the proposal's density costs none. The sampler treats a
failure as a reason the rounds are unreliable, and its SMC bridge then tempers from the reference,
the path that reached the missed mass (:mod:`diffstat.diffusion.sampler`).

This is the reverse of importance sampling: :math:`\mathbb E_p[1/w] = \hat Z / Z` over the region
:math:`q` covers, Gelfand and Dey's (1994) identity with :math:`q` as the instrumental density.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "MAX_MISSED",
    "MISSED_RATIO",
    "MISSED_Z",
    "checked_coverage",
    "coverage_attrs",
    "coverage_check",
    "coverage_reason",
]

#: A particle is missed where the proposal puts less than 1/100 of its share there (log w > log 100).
MISSED_RATIO = 100.0
#: Largest missed share that passes: 5% of the posterior mass, a mean error of about 0.1 sd or more
#: where that mass sits in one tail.
MAX_MISSED = 0.05
#: Binomial standard errors above ``MAX_MISSED`` the share must lie to fail (one-sided p 3e-5).
MISSED_Z = 4.0


def coverage_check(target, pilot: torch.Tensor, proposal, log_z: float) -> dict:
    r"""The missed share at the ``pilot (n, dim)`` particles under ``proposal`` (anything with
    ``log_prob``) normalised by ``log_z``: ``missed`` (:math:`\hat m`), ``points`` (n, of them finite),
    ``z`` (standard errors above ``MAX_MISSED``) and ``evals`` (target evaluations spent)."""
    before = target.num_target_evals
    with torch.no_grad():
        lp = target.log_prob(pilot)
        lq = proposal.log_prob(pilot)
    log_w = (lp - lq - log_z)[torch.isfinite(lp)]
    n = int(log_w.numel())
    missed = float((log_w > math.log(MISSED_RATIO)).double().mean()) if n else 0.0
    se = math.sqrt(MAX_MISSED * (1 - MAX_MISSED) / max(n, 1))
    return {
        "missed": missed,
        "points": n,
        "z": (missed - MAX_MISSED) / se,
        "evals": target.num_target_evals - before,
    }


def coverage_reason(check: dict | None) -> str | None:
    """The sentence for a failed check (None where it passed or did not run)."""
    if check is None or check["z"] <= MISSED_Z:
        return None
    share, ratio = f"{check['missed']:.0%}", f"1/{MISSED_RATIO:.0f}"
    return (
        f"the proposal puts less than {ratio} of the posterior's density on {share} of the "
        f"{check['points']} particles of the exploration's SMC run (at most {MAX_MISSED:.0%} passes): "
        "importance weights cannot restore mass that the proposal never draws (a funnel's neck)"
    )


def checked_coverage(target, pilot, infos, used) -> tuple[dict | None, str | None]:
    """:func:`coverage_check` at ``pilot`` of the last used round's proposal with the round's own log Z
    (``infos``: the rounds' :class:`~diffstat.diffusion.rounds.RoundInfo`, ``used`` their flags), and
    its :func:`coverage_reason`; ``(None, None)`` without a pilot or a used round."""
    rounds = [info for info, u in zip(infos, used) if bool(u) and info.proposal is not None]
    if pilot is None or not rounds:
        return None, None
    check = coverage_check(target, pilot, rounds[-1].proposal, float(rounds[-1].summary["log_z"]))
    return check, coverage_reason(check)


def coverage_attrs(check: dict | None) -> dict:
    """The check's ``attrs`` (NaN and 0 where it did not run)."""
    if check is None:
        return {"coverage_missed": math.nan, "coverage_points": 0, "coverage_evals": 0}
    return {
        "coverage_missed": check["missed"],
        "coverage_points": check["points"],
        "coverage_evals": check["evals"],
    }
