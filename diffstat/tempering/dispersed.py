r"""Over-dispersed references for SMC's independent runs (Gelman and Rubin 1992, for SMC).

Where neither the user (``reference=``) nor the target gives a reference, SMC tempers from
:math:`\mathcal N(0, I)`, and a target wider than that along a curve can leave every run alike too
narrow: the geometric path holds the particles in at intermediate temperatures and the moves cannot
follow the target out when it opens up at the end (a banana; ``docs/smc_banana.md``). All runs then
agree, and the between-run checks (:mod:`diffstat.tempering.runs`) stay silent. Run :math:`r`
instead tempers from :math:`\mathcal N(0, c_r^2 I)` with :math:`c_r` cycling through
:data:`DISPERSED_SCALES`. Each run is still an exact SMC sampler of the same target, so sound runs
agree and the pooled draws and :math:`\hat Z` (the runs' mean) stay valid; where the runs from the
narrower reference lost mass that those from the wider one found, the runs disagree: Cochran's Q on
their log Z estimates, the R-hat across their draws, or the one-sided test of the wider runs' log Z
against the narrower ones' (:func:`~diffstat.tempering.runs.wider_runs_p`) reports it, and the
warning names the widths (:func:`disagreement_note`).

A target with its own reference, a model tempered in its likelihood (from its prior) and a
``reference=`` keep that reference in every run.
"""

from __future__ import annotations

import math

import torch

from diffstat.tempering.path import GeometricPath, make_path
from diffstat.tempering.runs import CHI2_ALPHA

__all__ = ["DISPERSED_SCALES", "check_scales", "disagreement_note", "run_paths", "ScaledNormalPath"]

#: The runs' reference sds, cycled over the runs (runs 1, 3 from N(0, I), runs 2, 4 from N(0, 16 I)):
#: the widest of 3, 4 and 5 whose runs cost at most 1.5 times the evaluations of four runs from
#: N(0, I) on every sound audit target (``docs/smc_banana.md``, section 7).
DISPERSED_SCALES = (1.0, 4.0)


class ScaledNormalPath(GeometricPath):
    r"""The geometric path from :math:`\mathcal N(0, c^2 I)` to ``target``; its reference draws are
    ``c`` times the target's N(0, I) draws (``target.sample_reference``, the generator's stream)."""

    def __init__(self, target, scale: float, device=None):
        zeros = torch.zeros(target.dim, dtype=target.dtype, device=device)
        ref = torch.distributions.Independent(torch.distributions.Normal(zeros, scale + zeros), 1)
        super().__init__(target, ref)
        self.scale = float(scale)

    def sample_reference(self, n: int, generator: torch.Generator, device=None) -> torch.Tensor:
        return self.scale * self.target.sample_reference(n, generator, device)


def check_scales(scales) -> tuple[float, ...] | None:
    """``reference_scales`` as a tuple of positive finite floats (None stays None); ``ValueError``
    naming what is wrong otherwise."""
    if scales is None:
        return None
    try:
        out = tuple(float(c) for c in ([scales] if isinstance(scales, (int, float)) else scales))
    except (TypeError, ValueError):
        raise ValueError(f"reference_scales must be a sequence of positive numbers, got {scales!r}") from None
    if not out or not all(math.isfinite(c) and c > 0 for c in out):
        raise ValueError(f"reference_scales must be a non-empty sequence of positive numbers, got {scales!r}")
    return out


def run_paths(target, reference, scales, num_runs: int, device) -> tuple[GeometricPath, list, list | None]:
    """The path from the narrowest reference (the checks after the runs use it), each run's path, and each
    run's reference sd (None where the runs share the user's, the target's or the prior's
    reference). ``scales`` is the ``reference_scales`` option (checked): None means
    :data:`DISPERSED_SCALES` where the default N(0, I) applies, else one shared reference."""
    path = make_path(target, reference)
    path.resolve(device)  # N(0, I), or a Gaussian fitted where N(0, I) is far from the mass
    default = path.reference_source == "N(0, I)"
    if not default:
        if scales is not None and any(c != 1.0 for c in scales):
            raise ValueError(
                "reference_scales widens the default N(0, I) reference; this run has its own reference "
                "(reference=, the target's, the prior of likelihood tempering, or a Gaussian fitted where "
                "N(0, I) is far from the posterior): leave reference_scales "
                "out, or scale that reference yourself"
            )
        return path, [path] * num_runs, None
    scales = DISPERSED_SCALES if scales is None else scales
    per_run = [scales[i % len(scales)] for i in range(num_runs)]
    paths = {c: path if c == 1.0 else ScaledNormalPath(target, c, device) for c in set(per_run)}
    return paths[min(per_run)], [paths[c] for c in per_run], per_run


def _label(scale: float) -> str:
    return "N(0, I)" if scale == 1.0 else f"N(0, {scale:g}^2 I)"


def disagreement_note(per_run: list | None, log_zs: list[float], draws: torch.Tensor, wider_p: float):
    """For runs from references of different widths: the reason to warn where the runs from the
    widest found a larger log Z (``wider_p``, :func:`~diffstat.tempering.runs.wider_runs_p`, under
    :data:`~diffstat.tempering.runs.CHI2_ALPHA`), and what any disagreement means (each width's
    runs, their log Z and the draws' mean sd; moves too slow to carry the narrower runs' particles
    out); ``("", "")`` where the runs share one reference."""
    if per_run is None or len(set(per_run)) < 2:
        return "", ""
    parts, lzs = [], {}
    for c in sorted(set(per_run)):
        idx = [i for i, s in enumerate(per_run) if s == c]
        lzs[c] = sum(log_zs[i] for i in idx) / len(idx)
        sd = float(draws[idx].reshape(-1, draws.shape[-1]).double().std(0).mean())
        runs = ", ".join(str(i + 1) for i in idx)
        parts.append(f"runs {runs} from {_label(c)}: mean log Z {lzs[c]:.3f}, mean sd of the draws {sd:.3f}")
    lo, hi = min(per_run), max(per_run)
    reason = ""
    if wider_p < CHI2_ALPHA:
        reason = (
            f"the runs from {_label(hi)} found more mass than those from {_label(lo)} (mean log Z "
            f"{lzs[hi] - lzs[lo]:+.3f}, one-sided p = {wider_p:.1e} < {CHI2_ALPHA})"
        )
    note = (
        " The runs started from references of different widths (" + "; ".join(parts) + "). Where the "
        "runs from the wider reference found a wider posterior or a larger log Z, the moves did not "
        "carry the particles from the narrower one out to the whole target: raise num_mcmc_steps, or "
        "give a reference= wider than the posterior."
    )
    return reason, note
