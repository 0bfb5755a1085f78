r"""The warning side of the check for missed modes (:func:`~diffstat.modes.coverage.missed_modes`),
shared by the samplers that run it: tempering (SMC, AIS, PT: :mod:`diffstat.tempering.mode_check`)
and MCMC (:mod:`diffstat.mcmc.sampler`).

Each passes the run's pooled draws, its evidence estimate (None for MCMC, which has none) and
``NUM_CHECK_CANDIDATES`` reference draws, of which the ``NUM_CHECK_STARTS`` highest after two climbing
steps (and as many at random) climb on; a ``RuntimeWarning`` names the missed modes and
their share of the mass above ``MAX_MISSED_SHARE``, or the misweight above ``MAX_MISWEIGHT``, with
the method's own advice; the attrs ``missed_mode_share``, ``mode_misweight`` and
``mode_check_evals`` record it.
"""

from __future__ import annotations

import warnings

import torch

from diffstat._util import check_bool
from diffstat.modes.coverage import MAX_MISSED_SHARE, MAX_MISWEIGHT, MissedModes, missed_modes

__all__ = ["NUM_CHECK_CANDIDATES", "NUM_CHECK_STARTS", "check_missed_modes", "pop_check_modes"]

#: Reference draws the check climbs from: enough that a basin holding a few percent of the widened
#: starts is reached by several, at about 3,000 to 12,000 evaluations on the posteriordb suite.
NUM_CHECK_STARTS = 256

#: Reference draws screened for the starts (:func:`~diffstat.modes.coverage.missed_modes`'s ``keep``):
#: 8 per start. On ``narrow_wide(11, scales=(0.35, 1))``, whose heavy mode's basin holds 0.2% of the
#: widened draws, the check found the mode on 3 of 12 seeds from 256 unscreened starts (about 4,000
#: evaluations), on 10 of 12 screening 1,024 (7,000) and on 12 of 12 screening 2,048 (10,000); on
#: ``narrow_wide(12, scales=(0.3, 1))`` on 0 and 4 of 12 (``docs/audit.md``).
NUM_CHECK_CANDIDATES = 8 * NUM_CHECK_STARTS


def pop_check_modes(options: dict) -> bool:
    """The ``check_modes`` option (default True), removed from ``options``; ``ValueError`` unless a bool."""
    return check_bool(options.pop("check_modes", True), "check_modes")


def check_missed_modes(
    method: str,
    target,
    draws: torch.Tensor,
    log_z: float | None,
    starts: torch.Tensor,
    generator: torch.Generator,
    *,
    missed_advice: str,
    misweight_advice: str,
) -> dict:
    """Run the check on the pooled ``draws (..., dim)`` from ``starts (m, dim)``, warn with the
    advice given, and return the attrs (module notes). A model that raises at a point the climbs
    reach stops the check with a warning; the draws are still returned."""
    try:
        missed = missed_modes(
            target, draws.reshape(-1, draws.shape[-1]), log_z, starts, generator, keep=NUM_CHECK_STARTS
        )
    except (ValueError, RuntimeError) as err:
        warnings.warn(
            f"{method}: the check for missed modes stopped ({type(err).__name__}: {str(err)[:200]}); the "
            "draws are returned unchecked for modes that the run missed. check_modes=False skips the check",
            RuntimeWarning,
            stacklevel=4,
        )
        return {}
    if missed.share > MAX_MISSED_SHARE:
        warnings.warn(_missed_message(method, missed) + missed_advice, RuntimeWarning, stacklevel=4)
    elif missed.misweight > MAX_MISWEIGHT:
        warnings.warn(
            f"{method}: the draws weigh the target's modes wrongly: their shares of the draws differ "
            f"from the modes' Laplace masses by {missed.misweight:.2f} in total variation. "
            + misweight_advice,
            RuntimeWarning,
            stacklevel=4,
        )
    return {
        "missed_mode_share": missed.share,
        "mode_misweight": missed.misweight,
        "mode_check_evals": missed.num_evals,
    }


def _missed_message(method: str, missed: MissedModes) -> str:
    where = "; ".join(
        f"log-mass {float(lm):.2f} near ({', '.join(f'{v:.3g}' for v in c[:4].tolist())}"
        + (", ...)" if c.numel() > 4 else ")")
        for c, lm in zip(missed.centres[:3], missed.log_masses[:3])
    )
    return (
        f"{method}: gradient ascent from widened reference draws found {missed.centres.shape[0]} mode(s) "
        f"that no draw reaches, holding about {missed.share:.0%} of the mass by a Laplace estimate "
        f"({where}). "
    )
