r"""Pooling independent runs of a particle method (SMC, AIS, PDDS, the diffusion sampler).

Each run :math:`r` gives an estimate :math:`\hat Z_r` of the normalising constant, unbiased on the
natural scale, with a standard error :math:`s_r` of :math:`\log\hat Z_r` (from its genealogy or its
weights). With :math:`R` runs:

* the pooled estimate is :math:`\hat Z = \frac1R\sum_r \hat Z_r` (still unbiased), with the
  delta-method error :math:`\sqrt{\sum_r (\hat Z_r/\sum_q \hat Z_q)^2 s_r^2}` (:func:`combine_runs`);
* from two runs on, the runs' own spread gives a second error,
  :math:`\mathrm{sd}(\hat Z_r/\hat Z)/\sqrt R`, and the larger of the two is reported
  (:func:`pooled_log_z`: a genealogy misses what no particle saw, a spread of a few runs is itself noisy);
* the runs agree when Cochran's :math:`Q = \sum_r (\log\hat Z_r - \bar\ell)^2/s_r^2` (:math:`\bar\ell`
  the inverse-variance mean) is within the :math:`1 -` :data:`CHI2_ALPHA` quantile of
  :math:`\chi^2_{R-1}` (Cochran 1954; :func:`runs_agreement`). Runs that each report a small error
  but land far apart have missed different parts of the target: a mode found by one run and missed
  by another shifts the latter's :math:`\log\hat Z` by the log of that mode's share;
* the runs' draws agree when the rank-normalised split R-hat across runs (Vehtari et al. 2021) is at
  most :func:`max_runs_rhat` in every coordinate. Independent runs of a sound sampler differ in their
  mode shares only by the noise of the per-mode evidence, which makes R-hat exceed 1 by about
  :math:`c/n` for :math:`n` particles per run (:math:`c` up to 14 on a 6-d three-mode mixture:
  1.051 at 250 particles, 1.014 at 1,000, over 12 seeds each); runs that found different modes lie
  far beyond (1.04 to 1.39 at 1,000 particles on two- and nine-mode targets from N(0, I)). This
  catches what the log Z test cannot: a run whose large error bar hides the mode it found alone;
* runs from references of different widths (:mod:`diffstat.tempering.dispersed`) are also compared
  group against group (:func:`wider_runs_p`): the mean :math:`\log\hat Z` of the runs from the
  widest reference against that of the runs from the narrowest, over its standard error from the
  runs' own errors, one-sided at :data:`CHI2_ALPHA` (runs that missed mass in the target's tails
  estimate a smaller :math:`Z`). One degree of freedom aimed at that difference has more power than
  Cochran's Q spread over :math:`R - 1`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats

from diffstat._util import pad_stack
from diffstat.rank_stats import rank_diagnostics

__all__ = [
    "CHI2_ALPHA",
    "cochran_q",
    "combine_runs",
    "max_runs_rhat",
    "pooled_log_z",
    "runs_agreement",
    "runs_rhat",
    "stack_stages",
    "wider_runs_p",
]

#: Level of the runs-against-their-errors consistency test: one false alarm in a thousand calls.
CHI2_ALPHA = 1e-3
#: R-hat across runs beyond :math:`1 + c/n` flags runs of :math:`n` particles that disagree: about
#: twice the largest excess seen from sound runs (module docstring), and never under 1.01.
RHAT_PER_PARTICLE = 30.0


def combine_runs(log_zs: list[float], ses: list[float]) -> tuple[float, float]:
    r"""Pool independent runs: :math:`\hat Z = \frac1R\sum_r \hat Z_r`, with the delta-method
    standard error :math:`\sqrt{\sum_r (\hat Z_r / \sum \hat Z)^2\, s_r^2}`."""
    lz = torch.tensor(log_zs, dtype=torch.float64)
    w = torch.softmax(lz, 0)
    log_z = float(torch.logsumexp(lz, 0) - math.log(len(log_zs)))
    return log_z, float(torch.sqrt((w**2 * torch.tensor(ses, dtype=torch.float64) ** 2).sum()))


def pooled_log_z(log_zs: list[float], ses: list[float]) -> tuple[float, float, str]:
    """Pooled log Z of independent runs, its standard error and where the error came from
    (``"genealogy"``: the runs' own errors; ``"runs"``: their spread, when larger)."""
    log_z, se = combine_runs(log_zs, ses)
    if len(log_zs) < 2 or not math.isfinite(log_z):
        return log_z, se, "genealogy"
    ratio = torch.exp(torch.tensor(log_zs, dtype=torch.float64) - log_z)
    se_runs = float(ratio.std() / math.sqrt(len(log_zs)))
    return (log_z, se_runs, "runs") if se_runs > se else (log_z, se, "genealogy")


def cochran_q(log_zs: list[float], ses: list[float]) -> tuple[float, int]:
    r"""Cochran's :math:`Q = \sum_r (\ell_r - \bar\ell)^2/s_r^2` of estimates :math:`\ell_r` with
    standard errors :math:`s_r` (:math:`\bar\ell` their inverse-variance mean) and its degrees of
    freedom, one less than the number of estimates; ``(0, 0)`` for fewer than two. Every
    :math:`\ell_r` finite and every :math:`s_r` finite and positive (the callers' filter)."""
    if len(log_zs) < 2:
        return 0.0, 0
    lz, prec = np.asarray(log_zs, dtype=float), np.asarray(ses, dtype=float) ** -2.0
    mean = float((prec * lz).sum() / prec.sum())
    return float((prec * (lz - mean) ** 2).sum()), len(lz) - 1


def runs_agreement(log_zs: list[float], ses: list[float]) -> float:
    """The p-value of Cochran's Q (:func:`cochran_q`) for the runs' log Z estimates against their
    standard errors (module docstring); 1 with fewer than two runs or where an estimate or error is
    not finite and positive (nothing to test)."""
    lz, se = np.asarray(log_zs, dtype=float), np.asarray(ses, dtype=float)
    if len(lz) < 2 or not (np.all(np.isfinite(lz)) and np.all(np.isfinite(se)) and np.all(se > 0)):
        return 1.0
    q, dof = cochran_q(log_zs, ses)
    return float(stats.chi2.sf(q, dof))


def wider_runs_p(log_zs: list[float], ses: list[float], scales: list[float] | None) -> float:
    r"""One-sided p-value that the runs from the widest reference (sd ``scales[r]`` for run ``r``)
    estimate a larger log Z than those from the narrowest: their mean log Z's difference over
    :math:`\sqrt{\sum s_r^2/k^2}` summed over both groups of :math:`k` runs (module docstring); 1
    where the runs share one width or an estimate or error is not finite and positive."""
    lz, se = np.asarray(log_zs, dtype=float), np.asarray(ses, dtype=float)
    if scales is None or len(set(scales)) < 2:
        return 1.0
    if not (np.all(np.isfinite(lz)) and np.all(np.isfinite(se)) and np.all(se > 0)):
        return 1.0
    wide, narrow = np.asarray(scales) == max(scales), np.asarray(scales) == min(scales)
    diff = lz[wide].mean() - lz[narrow].mean()
    sd = math.sqrt((se[wide] ** 2).sum() / wide.sum() ** 2 + (se[narrow] ** 2).sum() / narrow.sum() ** 2)
    return float(stats.norm.sf(diff / sd))


def max_runs_rhat(num_particles: int) -> float:
    """The largest R-hat across runs of ``num_particles`` each that passes (module docstring)."""
    return max(1.01, 1.0 + RHAT_PER_PARTICLE / num_particles)


def runs_rhat(draws: torch.Tensor) -> float:
    """The largest rank-normalised split R-hat over the coordinates of ``draws: (run, draw, dim)``,
    each run's draws equally weighted; NaN with one run or fewer than 4 draws a run."""
    if draws.shape[0] < 2 or draws.shape[1] < 4:
        return math.nan
    rhat = rank_diagnostics(draws.detach().cpu().double().numpy())[0]
    return float(np.nanmax(rhat)) if np.isfinite(rhat).any() else math.nan


def stack_stages(per_run: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """Per-stage arrays of independent runs as ``(stage, chain)``, NaN-padded to the longest run."""
    return {key: pad_stack([r[key] for r in per_run], axis=1) for key in per_run[0]}
