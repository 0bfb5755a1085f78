r"""Two checks after SMC, AIS and PT, which temper from a reference: does the reference cover the
posterior, and did every run miss a mode?

- **Width** (:func:`reference_width_ratio`, no evaluations): the draws' spread against the
  reference's, :math:`r = \sqrt{\lambda_{\max}(R^{-1} S)}` with :math:`S` and :math:`R` the
  covariances of the draws and of reference draws. Tempering from a reference narrower than the
  posterior underestimates :math:`\log Z`: the incremental weights :math:`e^{\Delta\beta\,\delta(x)}`
  are largest in the target's tails, where the particles of the earlier stages do not go, and no ESS
  computed from the particles sees it. Measured (``docs/mode_check.md``): on N(0, s^2 I) from N(0, I)
  the errors grow from about 1 standard error at s = 3 to 3 or 4 at s = 5 to 30 in 2-d, and on a 2-d
  banana of width 10 SMC was 0.34 low with no other warning; above ``MAX_WIDTH_RATIO`` (4) a
  ``RuntimeWarning`` says so.
- **Missed modes** (``check_modes=True``, :mod:`diffstat.modes.coverage`): a mode that the
  reference's mass does not lead to can be missed by every run alike (the between-run checks then
  agree). Gradient ascent from ``NUM_CHECK_STARTS`` widened reference draws, a few thousand to a few
  tens of thousands of evaluations (counted), and a warning where modes that no draw reaches hold
  more than ``MAX_MISSED_SHARE`` of the mass by a Laplace estimate, or where the draws' shares of
  the modes differ from the modes' Laplace masses by more than ``MAX_MISWEIGHT``.
"""

from __future__ import annotations

import math
import warnings

import torch

from diffstat._util import check_bool
from diffstat.modes.coverage import MAX_MISSED_SHARE, MAX_MISWEIGHT, MissedModes, missed_modes

__all__ = [
    "MAX_WIDTH_RATIO",
    "after_checks",
    "NUM_CHECK_STARTS",
    "check_missed_modes",
    "check_reference_width",
    "pop_check_modes",
    "reference_width_ratio",
]

#: Draws' spread over the reference's above which the run warns (module notes).
MAX_WIDTH_RATIO = 4.0

#: Reference draws for the reference's covariance (free: the reference is not the target).
_NUM_REFERENCE_DRAWS = 4096

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
    where it is not finite), warn, and return the attrs ``missed_mode_share``, ``mode_misweight`` and
    ``mode_check_evals``."""
    if not math.isfinite(log_z):
        return {}
    starts = path.sample_reference(NUM_CHECK_STARTS, generator, device)
    try:
        missed = missed_modes(target, draws.reshape(-1, draws.shape[-1]), log_z, starts, generator)
    except (ValueError, RuntimeError) as err:  # the model refused a point that the climbs reached
        warnings.warn(
            f"{method}: the check for missed modes stopped ({type(err).__name__}: {str(err)[:200]}); the "
            "draws are returned unchecked for modes that the run missed. check_modes=False skips the check",
            RuntimeWarning,
            stacklevel=3,
        )
        return {}
    if missed.share > MAX_MISSED_SHARE:
        warnings.warn(_message(method, missed, log_z), RuntimeWarning, stacklevel=3)
    elif missed.misweight > MAX_MISWEIGHT:
        warnings.warn(
            f"{method}: the draws weigh the target's modes wrongly: their shares of the draws differ "
            f"from the modes' Laplace masses by {missed.misweight:.2f} in total variation (a mode the runs "
            "reached but left nearly empty). Give a reference= that covers the posterior (wider than it; "
            "the default is the target's reference, else N(0, I)), or use method='diffusion'",
            RuntimeWarning,
            stacklevel=3,
        )
    return {
        "missed_mode_share": missed.share,
        "mode_misweight": missed.misweight,
        "mode_check_evals": missed.num_evals,
    }


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


def reference_width_ratio(path, draws: torch.Tensor, generator, device) -> float:
    r""":math:`\sqrt{\lambda_{\max}(R^{-1} S)}` (module notes) for the pooled ``draws (..., dim)``
    against ``_NUM_REFERENCE_DRAWS`` draws of the path's reference; NaN with fewer than two draws or
    a reference without finite, positive definite covariance."""
    x = draws.reshape(-1, draws.shape[-1]).double()
    ref = path.sample_reference(_NUM_REFERENCE_DRAWS, generator, device).double()
    if x.shape[0] < 2 or not bool(torch.isfinite(ref).all() and torch.isfinite(x).all()):
        return math.nan
    chol, info = torch.linalg.cholesky_ex(torch.atleast_2d(torch.cov(ref.T)))
    if int(info) != 0:
        return math.nan
    white = torch.linalg.solve_triangular(chol, (x - x.mean(0)).T, upper=False)  # L^{-1} (x - m)
    return math.sqrt(float(torch.linalg.eigvalsh(torch.atleast_2d(torch.cov(white))).max()))


def check_reference_width(method: str, path, draws: torch.Tensor, log_z: float, generator, device) -> dict:
    """Warn where the draws are more than ``MAX_WIDTH_RATIO`` times as wide as the reference; the attr
    ``reference_width_ratio``."""
    ratio = reference_width_ratio(path, draws, generator, device)
    if ratio > MAX_WIDTH_RATIO:
        warnings.warn(
            f"{method}: the draws are {ratio:.1f} times as wide as the reference along their widest "
            f"direction. Tempering from a reference narrower than the posterior underestimates log Z "
            f"(= {log_z:.3f} here; its weights are largest in tails that the early stages never reach, "
            "and its standard error does not show it) and can miss the tails. Give a reference= at least as "
            "wide as the posterior (the default is the target's reference, else N(0, I))",
            RuntimeWarning,
            stacklevel=3,
        )
    return {"reference_width_ratio": ratio}


def after_checks(
    method: str, check_modes: bool, target, path, draws, log_z: float, generator, device
) -> dict:
    """Both checks (the missed modes only with ``check_modes``): their warnings, and their attrs."""
    attrs = check_missed_modes(method, target, path, draws, log_z, generator, device) if check_modes else {}
    return attrs | check_reference_width(method, path, draws, log_z, generator, device)
