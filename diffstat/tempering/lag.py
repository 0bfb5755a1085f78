r"""Do the particles lag the path where the moves cannot follow? A check of AIS's final particles
against their own weights (no evaluation).

With moves that bring each particle to :math:`\pi_{\beta_k}` at every temperature (exact
transitions), the final particle :math:`x_K` is a posterior draw whatever its history, and its
weight, a function of the earlier states, is independent of it. Moves that fall behind the path
leave the particles where earlier temperatures put them, and the weights carry the correction. Two
weighted shifts of a per-particle value :math:`v` measure it,

.. math::
    s(v) = \frac{\sum_i W_i v_i - \frac1n\sum_i v_i}{\mathrm{sd}_W(v)},

the weighted (posterior) mean minus the particles' own mean, in weighted sds; with weights
independent of the positions :math:`s` is noise of sd :math:`\sqrt{1/\mathrm{ESS} - 1/n}`
(:math:`\sum_i (W_i - 1/n) v_i` has variance :math:`\mathrm{sd}(v)^2 \sum_i (W_i - 1/n)^2`):

- the **lag**, :math:`s(\ell)` of the log-density :math:`\ell = \log\tilde\pi` (the one function
  every target has): positive where the particles sit below the posterior in log-density, whether
  their cloud is wider than the posterior (harmless: importance sampling from a wider cloud is
  reliable, and the weights drop the stragglers) or kept out of a region where the density rises
  (a funnel's neck);
- the **acceptance shift**, :math:`s(a)` of each particle's mean acceptance over the last tenth of
  the temperatures (AIS moves once per temperature, and one acceptance is too noisy): negative
  where the moves reject more where the weights are larger, that is where the weights say the
  posterior lies and the moves (whose step sizes the pilot fixed) cannot go. That is the second
  case: the weights then correct the lag by importance sampling over a region the cloud never
  filled, which no statistic of the weights alone (ESS, Pareto :math:`\hat k`) sees, and
  :math:`\hat Z` comes out low.

Both are computed within the modes (the clusters of
:func:`~diffstat.modes.clusters.cluster_particles`, pooled with their weights): a mixture whose
particles the run spread evenly among its modes, the weights then restoring the modes' shares (a
correction that is reliable where each mode holds particles, and the missed-mode check's concern
where one holds none), lags between the modes but not within them. Within clusters the shift is
:math:`\sum_c P_c (\bar v_{W,c} - \bar v_c) / (\sum_c P_c \mathrm{sd}_{W,c}(v)^2)^{1/2}` with
:math:`P_c` a cluster's weight, and the noise variances add likewise.

A run is flagged when both hold: a lag above ``MAX_LAG`` and ``MIN_LAG_Z`` noise sds, and an
acceptance shift below ``-MIN_ACCEPT_Z`` noise sds. Measurements behind the thresholds (the audit's
latent AR(1) model, where AIS was silently off, and posteriordb): ``docs/ais_lag.md``.
"""

from __future__ import annotations

import math

import torch

from diffstat.modes.clusters import cluster_particles

__all__ = [
    "MAX_LAG",
    "MIN_ACCEPT_Z",
    "MIN_LAG_Z",
    "is_lagging",
    "lag_message",
    "run_shifts",
    "weighted_shift",
]

#: A lag above this many weighted sds of the log-density can be flagged: the weights then correct a
#: shift twice the 0.15 sd to which an answer is scored right (above what is left between the modes
#: of a mixture that the clusters did not separate; ``docs/ais_lag.md``).
MAX_LAG = 0.3
#: ... when it is also above this many of its noise sds (module notes), so that the noise of few
#: effective particles is not flagged ...
MIN_LAG_Z = 4.0
#: ... and the acceptance shift below minus this many of its noise sds (the moves reject where the
#: weights are large).
MIN_ACCEPT_Z = 3.0
#: Clusterings tried (module notes): the most clusters found is kept (a 10-d mixture of three modes,
#: AIS's final particles: some tries find no split).
_TRIES = 8


def weighted_shift(
    log_weights: torch.Tensor, values: torch.Tensor, labels: torch.Tensor | None = None
) -> tuple[float, float]:
    """``(shift, noise)`` (module notes) of per-particle ``values (n,)`` under log weights ``(n,)``,
    over the particles where both are finite, within the clusters ``labels (n,)`` (None: one): each
    cluster's weighted minus unweighted mean, pooled with the cluster's weight, over the pooled
    within-cluster weighted sd. ``(nan, nan)`` with fewer than two such particles, or where the
    values do not vary under the weights within the clusters."""
    keep = torch.isfinite(log_weights) & torch.isfinite(values)
    lw, v = log_weights[keep].double(), values[keep].double()
    groups = torch.zeros_like(lw, dtype=torch.long) if labels is None else labels[keep]
    diff = var = noise2 = 0.0
    mass = torch.softmax(lw, 0) if lw.numel() else lw
    for c in torch.unique(groups):
        rows = groups == c
        if int(rows.sum()) < 2 or not float(mass[rows].sum()) > 0:
            continue
        w, vc, share = torch.softmax(lw[rows], 0), v[rows], float(mass[rows].sum())
        mean = (w * vc).sum()
        var_c = float((w * (vc - mean) ** 2).sum())
        diff += share * float(mean - vc.mean())
        var += share * var_c
        noise2 += share**2 * var_c * max(float((w**2).sum()) - 1.0 / vc.numel(), 0.0)  # 1 / ESS - 1 / n
    if not var > 0:
        return math.nan, math.nan
    return diff / math.sqrt(var), math.sqrt(noise2 / var)


def run_shifts(
    x: torch.Tensor, log_weights: torch.Tensor, log_density: torch.Tensor, acceptance: torch.Tensor
):
    """``(lag, acceptance shift)``, each ``(shift, noise)``, of a run's final particles ``x (n, d)``
    with their log weights, log-densities and acceptances ``(n,)``, within the clusters of
    :func:`~diffstat.modes.clusters.cluster_particles` (module notes): the most clusters of
    ``_TRIES`` clusterings, each with a generator of its own (seeds 0, 1, ...; the run's is left as
    it was), since one set of 2-means starts can miss a split."""
    labels = None
    if bool(torch.isfinite(x).all()) and bool(torch.isfinite(log_weights).any()):
        log_w = torch.nan_to_num(log_weights, nan=-math.inf)
        tries = [
            cluster_particles(x, log_w, torch.Generator(device=x.device).manual_seed(s))
            for s in range(_TRIES)
        ]
        labels = max(tries, key=lambda t: int(t.max()))  # a split is kept only where it separates the cloud
    return weighted_shift(log_weights, log_density, labels), weighted_shift(log_weights, acceptance, labels)


def is_lagging(lag: tuple[float, float], accept: tuple[float, float]) -> bool:
    """Whether a run is flagged, from its ``(shift, noise)`` of the log-density and of the acceptance
    (module notes; NaN: not flagged)."""
    (shift, noise), (a_shift, a_noise) = lag, accept
    lagging = shift > MAX_LAG and shift > MIN_LAG_Z * noise
    return bool(lagging and a_shift < -MIN_ACCEPT_Z * a_noise)


def lag_message(
    method: str, lag: tuple[float, float], accept: tuple[float, float], log_z: float, k: int
) -> str:
    """The warning of a run flagged by :func:`is_lagging` (``k`` temperatures)."""
    return (
        f"{method}: the particles lag the path where the moves cannot follow: at beta = 1 their mean "
        f"log-density is {lag[0]:.2f} sd below the weighted (posterior) mean ({lag[0] / lag[1]:.1f} times "
        f"its noise), and the moves accept less where the weights are larger (by {-accept[0]:.2f} sd, "
        f"{-accept[0] / accept[1]:.1f} times its noise): the weights correct the lag by importance "
        "sampling over a region (a funnel's neck, a curve) that the particles did not fill, which the ESS "
        f"does not see. log Z = {log_z:.3f} is likely too low and the draws off. Raise num_temperatures "
        f"(now {k}), or use method='smc' or 'nuts'."
    )
