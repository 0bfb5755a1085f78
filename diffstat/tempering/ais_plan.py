r"""The plan of an AIS run, fixed before it starts: a pilot along the path measures its
thermodynamic length, which sets the temperatures and preconditioners (:func:`plan_schedule`), and
by default the reference is refitted to pilots' particles until the path from it settles
(:func:`_fit_reference`). Used by :mod:`diffstat.tempering.ais`; measurements in ``docs/ais.md``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from diffstat.tempering.auto_reference import stages_advice
from diffstat.tempering.path import GeometricPath, make_path
from diffstat.tempering.schedules import (
    PilotRun,
    pilot_reference,
    pilot_run,
    schedule,
    thermodynamic_schedule,
)

__all__ = ["LENGTH_FACTOR", "MIN_TEMPERATURES", "MAX_TEMPERATURES", "Plan", "plan_schedule"]

#: The adaptive schedule's number of temperatures is this times the squared thermodynamic length
#: (clipped to [MIN_TEMPERATURES, MAX_TEMPERATURES]): with exact moves the log-weight variance is
#: about Lambda^2 / K, and one MALA move per temperature leaves the particles lagging the path by an
#: autocorrelation time of a few moves, which multiplies it by about 1 + 2 tau (5 to 10 on the
#: posteriordb suite); K = 8 Lambda^2 keeps the variance near 1 (docs/ais.md).
LENGTH_FACTOR = 8.0
MIN_TEMPERATURES = 200
MAX_TEMPERATURES = 2000
#: The pilot's reference is refitted (each time to the particles of a pilot along the path from the
#: last fit) until a refit moves no mean by more than SETTLED_SHIFT of its (widened) sd and shortens
#: the path by less than 1 - REFIT_GAIN, at most MAX_REFITS times with 3 moves per stage, then as
#: many with decorrelating moves (``_fit_reference``). Half an sd of the widened fit is within the
#: noise of a 256-particle fit's mean by far in few dimensions (0.1 sd), and the path shortens by a
#: few percent between fits that agree.
MAX_REFITS = 3
REFIT_GAIN = 0.8
SETTLED_SHIFT = 0.5


class Plan(NamedTuple):
    """A run's path, temperatures ``(K,)``, the options they fix (the pilot's ``preconditioners``)
    and their attrs."""

    path: GeometricPath
    betas: torch.Tensor
    options: dict
    attrs: dict


def plan_schedule(generator, path, options: dict, total: int, device, dtype, fit: bool):
    """``(plans, kind, attrs)``: the run's :class:`Plan` (from the pilot's fitted reference when
    ``fit``, then the prior's as a fallback), the kind of schedule, and the pilots' attrs; pops the
    schedule options from ``options``."""
    betas = options.pop("betas", None)
    num_temperatures = options.pop("num_temperatures", None)
    kind = options.pop("schedule", "adaptive")
    num_pilot = options.pop("num_pilot", min(256, max(64, total // 4)))
    if betas is not None:
        return [Plan(path, betas, {}, {})], "betas", {}
    if kind != "adaptive":
        k = MIN_TEMPERATURES if num_temperatures is None else num_temperatures
        return [Plan(path, schedule(k, kind, dtype=dtype, device=device), {}, {})], kind, {}
    pilot_options = dict(
        kernel=options.get("kernel", "mala"),
        num_leapfrog=options.get("num_leapfrog", 5),
        target_accept=options.get("target_accept"),
        device=device,
    )
    pilot = _pilot_run(generator, path, num_pilot, pilot_options)
    attrs = {
        "pilot_evals": int(pilot.num_evals),
        "num_pilot": int(num_pilot),
        "pilot_stages_total": len(pilot.betas) - 1,
    }
    plans = [_plan(path, pilot, num_temperatures)]
    if fit:
        fitted, fitted_pilot = _fit_reference(generator, path, pilot, num_pilot, pilot_options, attrs)
        if fitted is not path:
            plans.insert(0, _plan(fitted, fitted_pilot, num_temperatures))
    return plans, kind, attrs


def _pilot_run(generator, path, num_pilot: int, pilot_options: dict) -> PilotRun:
    """:func:`~diffstat.tempering.schedules.pilot_run`, its out-of-stages error completed by what
    helps where the path starts from the default reference
    (:func:`~diffstat.tempering.auto_reference.stages_advice`)."""
    try:
        return pilot_run(generator, path, num_pilot, **pilot_options)
    except RuntimeError as err:
        default = getattr(path, "reference_source", None) in ("N(0, I)", "fitted")
        if not (default and str(err).startswith("the AIS pilot did not reach")):
            raise
        raise RuntimeError(f"{err}, or: {stages_advice(path)}") from err


def _plan(path, pilot: PilotRun, num_temperatures: int | None) -> Plan:
    r"""The temperatures at equal thermodynamic length along the pilot's path, by default
    ``LENGTH_FACTOR`` :math:`\Lambda^2` of them (within [``MIN_TEMPERATURES``, ``MAX_TEMPERATURES``]),
    with the pilot's preconditioners."""
    lam = float(pilot.length[-1])
    if num_temperatures is None:
        num_temperatures = min(max(math.ceil(LENGTH_FACTOR * lam**2), MIN_TEMPERATURES), MAX_TEMPERATURES)
    betas = thermodynamic_schedule(pilot, num_temperatures)
    attrs = {
        "pilot_stages": len(pilot.betas) - 1,
        "thermodynamic_length": lam,
        "expected_log_weight_variance": lam**2 / len(betas),
    }
    return Plan(path, betas, {"preconditioners": (pilot.betas, pilot.chol, pilot.log_step_size)}, attrs)


def _fit_reference(generator, path, pilot, num_pilot, pilot_options, attrs):
    """The path from a reference fitted to the pilot's particles
    (:func:`~diffstat.tempering.schedules.pilot_reference`), refitted to the particles of the pilot
    along it until the fit settles: the shortest fitted path measured, with its pilot (``attrs``
    are updated), or the prior's path when no fit could be run.

    A pilot along a long path lags it (3 moves per stage) and ends off the posterior
    (posteriordb's mesquite: means 6.2 sd off, sds 1.4 to 3.1 times too wide); along the shorter
    path from its fit it tracks better, and the next fit is close (length 13.7, then 5.2, 1.56,
    1.50, where a fit to Stan's draws gives 1.44; docs/ais.md). The prior's path is not a candidate:
    its length is measured by the pilot that lags it most (mesquite_logvolume: 5.0 measured, a
    log-weight variance of 10^17 run). The fit has settled when a refit moves no mean by more than
    ``SETTLED_SHIFT`` of its sd and shortens the path by less than ``1 - REFIT_GAIN``; where it has
    not after ``MAX_REFITS`` refits, the refits start again with moves until decorrelated
    (:func:`~diffstat.tempering.moves.decorrelating_moves`, as SMC's), which follow a posterior
    that 3 moves a stage do not (earnings-earn_height: a correlation of -0.998 on the dollar
    scale). The refits also stop where the target is NaN or +inf at a draw of the fitted reference
    (a region the pilot's particles did not reach)."""
    attrs |= {"prior_thermodynamic_length": float(pilot.length[-1]), "num_refits": 0}
    best_path, best, previous = path, None, None
    for steps in (3, None):
        options = pilot_options | {"num_mcmc_steps": steps}
        for _ in range(MAX_REFITS):
            reference = pilot_reference(pilot.particles)
            if reference is None:
                return best_path, best or pilot
            fitted = make_path(path.target, reference)
            before = path.target.num_target_evals
            try:
                pilot = pilot_run(generator, fitted, num_pilot, **options)
            except ValueError as err:
                attrs["pilot_evals"] += path.target.num_target_evals - before
                attrs["reference_fallback"] = str(err)
                return best_path, best or pilot
            attrs["pilot_evals"] += int(pilot.num_evals)
            attrs["num_refits"] += 1
            attrs["pilot_stages_total"] += len(pilot.betas) - 1
            attrs["refit_moves"] = "decorrelating" if steps is None else steps
            length = float(pilot.length[-1])
            settled = previous is not None and (
                _mean_shift(reference, previous[0]) < SETTLED_SHIFT and length >= REFIT_GAIN * previous[1]
            )
            if best is None or length < float(best.length[-1]):
                best_path, best = fitted, pilot
            if settled:
                return best_path, best
            previous = (reference, length)
    return best_path, best


def _mean_shift(reference, previous) -> float:
    """The largest change of a mean between two fitted references, in sds of the new one."""
    sd = reference.covariance_matrix.diagonal().sqrt()
    return float(((reference.loc - previous.loc).abs() / sd).max())
