"""The check for modes that every run missed, after SMC, AIS and PT (:mod:`diffstat.modes.coverage`).

Each of these methods tempers from a reference, and a mode that the reference's mass does not lead
to can be missed by every run alike (its between-run checks then agree). ``check_modes=True`` (the
default) climbs from ``NUM_CHECK_STARTS`` widened reference draws after the run, at a few thousand
to a few tens of thousands of evaluations (counted), and warns where modes that no draw reaches
hold more than ``MAX_MISSED_SHARE`` of the mass by a Laplace estimate.
"""

from __future__ import annotations

import math
import warnings

import torch

from diffstat._util import check_bool
from diffstat.modes.coverage import MAX_MISSED_SHARE, MissedModes, missed_modes

__all__ = ["NUM_CHECK_STARTS", "check_missed_modes", "pop_check_modes"]

#: Reference draws the check climbs from: enough that a basin holding a few percent of the widened
#: starts is reached by several, at about 3,000 to 30,000 evaluations on the posteriordb suite.
NUM_CHECK_STARTS = 256


def pop_check_modes(options: dict) -> bool:
    """The ``check_modes`` option (default True), removed from ``options``; ``ValueError`` unless a bool."""
    return check_bool(options.pop("check_modes", True), "check_modes")


def check_missed_modes(
    method: str, target, path, draws: torch.Tensor, log_z: float, generator, device
) -> dict:
    """Run the check on the pooled ``draws (..., dim)`` of a run with evidence ``log_z`` (skipped
    where it is not finite), warn, and return the attrs ``missed_mode_share`` and ``mode_check_evals``."""
    if not math.isfinite(log_z):
        return {}
    starts = path.sample_reference(NUM_CHECK_STARTS, generator, device)
    try:
        missed = missed_modes(target, draws.reshape(-1, draws.shape[-1]), log_z, starts, generator)
    except (ValueError, RuntimeError) as err:  # the model refused a point that the climbs reached
        warnings.warn(
            f"{method}: the check for missed modes stopped ({type(err).__name__}: {str(err)[:200]}); the "
            "draws are as they are, unchecked for modes that the run missed. check_modes=False skips it",
            RuntimeWarning,
            stacklevel=3,
        )
        return {}
    if missed.share > MAX_MISSED_SHARE:
        warnings.warn(_message(method, missed, log_z), RuntimeWarning, stacklevel=3)
    return {"missed_mode_share": missed.share, "mode_check_evals": missed.num_evals}


def _message(method: str, missed: MissedModes, log_z: float) -> str:
    where = "; ".join(
        f"log-mass {float(lm):.2f} near ({', '.join(f'{v:.3g}' for v in c[:4].tolist())}"
        + (", ...)" if c.numel() > 4 else ")")
        for c, lm in zip(missed.centres[:3], missed.log_masses[:3])
    )
    return (
        f"{method}: gradient ascent from widened reference draws found {missed.centres.shape[0]} mode(s) "
        f"that no draw reaches, holding about {missed.share:.0%} of the mass by a Laplace estimate "
        f"({where}). The draws miss them and log Z = {log_z:.3f} is that of the modes found only. Give a "
        "reference= that covers the posterior (wider than it; the default is the target's reference, else "
        "N(0, I)), or use method='diffusion'"
    )
