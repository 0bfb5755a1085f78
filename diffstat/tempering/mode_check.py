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
  agree). Gradient ascent from ``NUM_CHECK_STARTS`` scaled reference draws (and the best of 16
  times as many screened: :func:`~diffstat.modes.check.num_check_starts`), a few thousand to a
  few tens of thousands of evaluations (counted), and a warning where modes that no draw reaches hold
  more than ``MAX_MISSED_SHARE`` of the mass by a Laplace estimate, or where the draws' shares of
  the modes differ from the modes' Laplace masses by more than ``MAX_MISWEIGHT``.
"""

from __future__ import annotations

import math
import warnings

import torch

from diffstat.modes import check
from diffstat.modes.check import NUM_CHECK_STARTS, num_check_starts, pop_check_modes

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

_MISWEIGHT_ADVICE = (
    "A mode the runs reached but left nearly empty: give a reference= that covers the posterior (wider "
    "than it; the default is the target's reference, else N(0, I)), or use method='diffusion'"
)


def check_missed_modes(
    method: str, target, path, draws: torch.Tensor, log_z: float, generator, device, evals0: int
) -> dict:
    """Run the check (:func:`diffstat.modes.check.check_missed_modes`) on the pooled ``draws (...,
    dim)`` of a run with evidence ``log_z`` (skipped where it is not finite) that began at the
    target's evaluation count ``evals0``, from draws of the path's reference; its attrs."""
    if not math.isfinite(log_z):
        return {}
    starts = path.sample_reference(num_check_starts(target.num_target_evals - evals0), generator, device)
    missed_advice = (
        f"The draws miss them and log Z = {log_z:.3f} is that of the modes found only. Give a reference= "
        "that covers the posterior (wider than it; the default is the target's reference, else N(0, I)), "
        "or use method='diffusion'"
    )
    return check.check_missed_modes(
        method, target, draws, log_z, starts, generator,
        missed_advice=missed_advice, misweight_advice=_MISWEIGHT_ADVICE,
    )  # fmt: skip


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
    method: str, check_modes: bool, target, path, draws, log_z: float, generator, device, evals0: int
) -> dict:
    """Both checks (the missed modes only with ``check_modes``, for a run that began at the target's
    evaluation count ``evals0``): their warnings, and their attrs."""
    attrs = {}
    if check_modes:
        attrs = check_missed_modes(method, target, path, draws, log_z, generator, device, evals0)
    return attrs | check_reference_width(method, path, draws, log_z, generator, device)
