r"""The warning side of the check for missed modes (:func:`~diffstat.modes.coverage.missed_modes`),
shared by the samplers that run it: tempering (SMC, AIS, PT: :mod:`diffstat.tempering.mode_check`)
and MCMC (:mod:`diffstat.mcmc.sampler`).

Each passes the run's pooled draws, its evidence estimate (None for MCMC, which has none) and
:func:`num_check_starts` reference draws, of which the first
``NUM_CHECK_STARTS`` climb and a quarter as many more, the highest of the rest after
``SCREEN_STEPS`` climbing steps; a ``RuntimeWarning`` names the missed modes and
their share of the mass above ``MAX_MISSED_SHARE``, or the misweight above ``MAX_MISWEIGHT``, with
the method's own advice; the attrs ``missed_mode_share``, ``mode_misweight`` and
``mode_check_evals`` record it.
"""

from __future__ import annotations

import warnings

import torch

from diffstat._util import check_bool
from diffstat.modes.coverage import MAX_MISSED_SHARE, MAX_MISWEIGHT, MissedModes, missed_modes

__all__ = ["NUM_CHECK_STARTS", "check_missed_modes", "num_check_starts", "pop_check_modes"]

#: Reference draws the check climbs from: enough that a basin holding a few percent of the scaled
#: starts is reached by several, at about 3,000 to 12,000 evaluations on the posteriordb suite.
NUM_CHECK_STARTS = 256

#: Reference draws screened, for every run alike: each takes ``SCREEN_STEPS`` climbing steps and the
#: ``NUM_CHECK_STARTS // 4`` highest climb on (module notes of :mod:`diffstat.modes.coverage`). A
#: narrow basin that holds 0.1% to 0.2% of the starts is reached only among thousands, and a short
#: run (MCMC's) misses such a mode as readily as a long one, so the number does not shrink with the
#: run (``docs/audit.md``, fourth round).
SCREEN_STEPS = 2
NUM_SCREENED = 16 * NUM_CHECK_STARTS
#: The fewest and most starts of :func:`num_check_starts` (both ``NUM_SCREENED``).
MIN_SCREENED = MAX_SCREENED = NUM_SCREENED


def num_check_starts(run_evals: int) -> int:
    """Reference draws for the check after a run of ``run_evals`` target evaluations:
    ``NUM_SCREENED`` whatever the run's length (the notes above)."""
    del run_evals  # the same for every run
    return NUM_SCREENED


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
    reach stops the check with a warning; the draws are still returned. The climbs start far out,
    where real models overflow: their NaN evaluations are ``num_nan_exploration`` in the attrs, left
    out of the run's NaN warning (:func:`diffstat.sampling.sample`) as the diffusion sampler's mode
    search's are."""
    nan_before = target.num_nan_evals
    try:
        missed = missed_modes(
            target, draws.reshape(-1, draws.shape[-1]), log_z, starts, generator,
            keep=NUM_CHECK_STARTS, screen_steps=SCREEN_STEPS,
        )  # fmt: skip
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
        "num_nan_exploration": int(target.num_nan_evals - nan_before),
    }


def _missed_message(method: str, missed: MissedModes) -> str:
    where = "; ".join(
        f"log-mass {float(lm):.2f} near ({', '.join(f'{v:.3g}' for v in c[:4].tolist())}"
        + (", ...)" if c.numel() > 4 else ")")
        for c, lm in zip(missed.centres[:3], missed.log_masses[:3])
    )
    return (
        f"{method}: gradient ascent from scaled reference draws found {missed.centres.shape[0]} mode(s) "
        f"that no draw reaches, holding about {missed.share:.0%} of the mass by a Laplace estimate "
        f"({where}). "
    )
