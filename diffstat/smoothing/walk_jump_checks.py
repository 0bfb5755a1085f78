r"""Walk-jump's check of its corrected draws against the target's own log-density, and its warning.

A walker can leave the region where the smoothed score holds without a divergent walk step: on
many_well(32) at the defaults (docs/sms.md, "Walk-jump: lost walkers") 825 of 2,000 walkers ended
beyond 5 in some coordinate (4,000 exact draws stay within 4.6), 381 of them with no divergent step
after warm-up. Out there the learned score is far too weak, then points outward, and their kinetic
energy stays near its stationary value; their jumps landed farther out still (:math:`|x|` up to
394), and the correction on :math:`p(x\mid y)` cannot bring them back (from such a :math:`y` the
posterior itself lies far out). Their log-densities, though, are far below any the target's own
draws reach, and that is what this module checks.

The floor (:func:`log_prob_floor`): an anchor from reference log-densities less
:math:`\max(20, 5 s)`, :math:`s` a robust standard deviation of the reference (IQR / 1.349). 20 nats
is a density ratio of 2e-9; 5 sd below the anchor is out of reach of a correct draw in any dimension
(the log-density of a Gaussian draw in :math:`d` dimensions has sd :math:`\sqrt{d/2}`: 500 draws'
floor spares 100,000 fresh ones at d = 2 and 200, ``tests/smoothing/test_walk_jump_checks.py``).

The reference (:func:`draw_floor`): the held-out particles of a learned score fitted in the run,
draws of the target with their log-densities (no new evaluation) and not among the draws judged,
with their minimum as the anchor (a stray particle only lowers the floor). Otherwise (a kept score's
log-densities may be in another normalisation: its check allows a constant) the run's draws not
already marked, with their lower quartile as the anchor: up to a quarter of them may be far off and
still not move it; beyond that this reference cannot see them. Only corrected draws (``num_mala`` >
0) are held to the floor: an uncorrected jump is a posterior mean, which lies between separated
modes by design.
"""

from __future__ import annotations

import math

import torch

__all__ = ["log_prob_floor", "draw_floor", "divergence_message"]

#: The floor's margin below its anchor: max(_FLOOR_NATS, _FLOOR_SDS robust sd) (module doc).
_FLOOR_NATS, _FLOOR_SDS = 20.0, 5.0

#: The anchor's quantile when the run's own draws are the reference: its breakdown point (module doc),
#: and a minor mode holding more than a quarter of the mass lies above it.
_FLOOR_QUANTILE = 0.25

#: A run with this share of its draws marked or more is called unreliable as a whole: where walk-jump is
#: right (tests/smoothing, narrow_wide(10), nine modes, ionosphere) none is marked, and on many_well(32),
#: 36% marked, the unmarked draws' log-densities still reached 14 nats below the lowest of 4,000 exact
#: draws' (walkers on their way out).
_UNRELIABLE_SHARE = 0.1


def log_prob_floor(reference: torch.Tensor, quantile: float) -> float:
    r"""The lowest log-density a draw of the target can be expected to have, from ``reference: (m,)``,
    log-densities of the target's own points: the ``quantile`` of the finite ones (0: their minimum)
    less :math:`\max(20, 5 s)`, with :math:`s` = IQR / 1.349 (module doc). ``-inf`` (nothing below)
    with fewer than 8 finite values."""
    ref = reference[torch.isfinite(reference)].double().cpu()
    if ref.numel() < 8:
        return -math.inf
    q = torch.quantile(ref, torch.tensor([quantile, 0.25, 0.75], dtype=torch.float64))
    return float(q[0]) - max(_FLOOR_NATS, _FLOOR_SDS * float(q[2] - q[1]) / 1.349)


def draw_floor(
    lp: torch.Tensor, marked: torch.Tensor, num_mala: int, particles_lp: torch.Tensor | None = None
) -> tuple[float, str]:
    """:func:`log_prob_floor` of a run with draws' log-densities ``lp`` (any shape): from
    ``particles_lp: (m,)``, a learned score's held-out particles, when 8 or more are finite, else from the
    draws not already ``marked`` (same shape as ``lp``); with the reference in words. NaN (nothing below)
    for uncorrected jumps (``num_mala`` 0)."""
    if num_mala == 0:
        return math.nan, ""
    if particles_lp is not None and int(torch.isfinite(particles_lp).sum()) >= 8:
        return log_prob_floor(particles_lp, 0.0), "the lowest of the smoothed score's held-out particles"
    return log_prob_floor(lp[~marked], _FLOOR_QUANTILE), "the lower quartile of the other draws"


def divergence_message(
    num_div: int, n: int, counts: tuple[int, int, int], floor: float, reference: str, rejected: bool
) -> str:
    """The warning of a run with ``num_div`` of ``n`` draws marked: how many for each reason (``counts``:
    draws after a walk divergence or with a non-finite or unreliable jump, draws below the ``floor`` set
    from ``reference``, walk steps reset), or a ``rejected`` score (all marked), and whether the run as a
    whole is unreliable (more than half, or a tenth or more, marked)."""
    num_walk, num_low, num_steps = counts
    why = ["all of them for that reason"] if rejected else []
    if num_walk and not rejected:
        why.append(
            f"{num_walk} follow a divergent walk step or have a non-finite or unreliable jump "
            f"({num_steps} walk steps reset)"
        )
    if num_low and not rejected:
        why.append(
            f"{num_low} have a log-density below {floor:.4g}, more than max({_FLOOR_NATS:g}, "
            f"{_FLOOR_SDS:g} sd) below {reference}: out of reach of a draw of the target"
        )
    share, whole = num_div / n, ""
    if share > 0.5:
        whole = "Most draws are marked: the run as a whole is unreliable. "
    elif share >= _UNRELIABLE_SHARE:
        whole = (
            f"{share:.0%} of the draws are marked: the run as a whole is unreliable (the unmarked draws "
            "come from walkers that went through the same regions). "
        )
    prefix = "the smoothed score passed was fitted to another target; " if rejected else ""
    return (
        f"{prefix}walk-jump diverged: {num_div} of {n} draws are marked in sample_stats 'diverging': "
        + "; ".join(why)
        + ". "
        + whole
        + "The walkers reached regions where the smoothed score does not hold (a learned score far from "
        "its particles, a training-free estimate far in the tails) or the step is too large for the "
        "curvature of log q_sigma: lower step_size, raise sigma, give a learned score more work "
        "(estimator_options), or pass smoothed_score=."
    )
