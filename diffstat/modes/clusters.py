r"""Clusters of weighted particles, by recursive weighted 2-means splits kept only where they
separate the cloud: the within-mode covariance of the tempering moves
(:func:`~diffstat.tempering.moves.particle_metric`, whose module notes give the splitting rule and
why) and of the climbs of the check for missed modes (:func:`~diffstat.modes.coverage.draws_metric`).
"""

from __future__ import annotations

import torch

__all__ = ["MAX_CLUSTERS", "cluster_particles", "weighted_covariance"]

#: At most this many clusters for the within-mode covariance (splits are recursive 2-means).
MAX_CLUSTERS = 8
#: A 2-means split is kept when the within-cluster variance along the centres' line is under this
#: share of the total: 1 - 2/pi = 0.36 for a Gaussian, 0.5 for a Laplace, 0.25 for a uniform; two
#: equal Gaussians need to lie 4 sd apart to go under it.
_SPLIT_RATIO = 0.2
#: A split leaving either side under this share of the weight is refused: a few outlying particles
#: of a heavy tail are not a mode (and a mode this light holds too few particles to be scaled alone).
_MIN_SHARE = 0.05
#: Random starts of each 2-means split (k-means++ second centre); the best split is kept.
_RESTARTS = 3
#: Lloyd iterations of each 2-means split.
_LLOYD_ITERATIONS = 10


def weighted_covariance(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Covariance ``(d, d)`` of ``x: (n, d)`` under the normalised weights ``w: (n,)``."""
    mean = w @ x
    xc = x - mean
    return (w.unsqueeze(-1) * xc).T @ xc


def _two_means(generator, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """The best of :data:`_RESTARTS` weighted 2-means splits of ``x`` (bool ``(n,)``), on coordinates
    scaled to unit weighted variance, or None when none separates the cloud (the within-cluster
    variance along the centres' line is not under :data:`_SPLIT_RATIO` of the total there)."""
    mean = w @ x
    # A coordinate in which every weighted particle agrees (weight on one particle, say, the others
    # outside a hard boundary) keeps its scale: dividing by a zero sd would overflow the zero-weight
    # particles' distances to inf, and 0 * inf is a NaN probability in the k-means++ draw.
    sd = (w @ (x - mean) ** 2).sqrt()
    z = (x - mean) / torch.where(sd > 0, sd, torch.ones_like(sd))
    best, best_ratio = None, _SPLIT_RATIO
    for _ in range(_RESTARTS):
        far = torch.multinomial(w * (z**2).sum(-1) + 1e-300, 1, generator=generator)
        centres = torch.stack([torch.zeros_like(z[0]), z[far[0]]])
        for _ in range(_LLOYD_ITERATIONS):
            side = ((z - centres[1]) ** 2).sum(-1) < ((z - centres[0]) ** 2).sum(-1)
            m = torch.stack([w * ~side, w * side])  # (2, n)
            mass = m.sum(-1)
            if bool((mass < _MIN_SHARE).any()):
                break
            centres = (m @ z) / mass.unsqueeze(-1)
        else:
            u = centres[1] - centres[0]
            proj = z @ (u / u.norm().clamp_min(1e-300))
            total = w @ (proj - w @ proj) ** 2
            within = sum(mi @ (proj - (mi @ proj) / mi.sum()) ** 2 for mi in m)
            ratio = float(within / total.clamp_min(1e-300))
            if ratio < best_ratio:
                best, best_ratio = side, ratio
    return best


def cluster_particles(
    x: torch.Tensor, log_w: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Cluster labels ``(n,)`` (0 to K-1, K at most :data:`MAX_CLUSTERS`) of particles ``x: (n, d)``
    with log weights ``(n,)``, by recursive weighted 2-means splits kept only where they separate
    the cloud (module docstring). A group under ``2(d+1)`` particles is not split."""
    w = torch.softmax(log_w, -1)
    groups, done = [torch.ones_like(w, dtype=torch.bool)], []
    while groups and len(groups) + len(done) < MAX_CLUSTERS:
        g = groups.pop(0)
        wg = w * g
        if not float(wg.sum()) > 0 or int(g.sum()) < 2 * (x.shape[1] + 1):
            done.append(g)
            continue
        side = _two_means(generator, x[g], wg[g] / wg.sum())
        if side is None:
            done.append(g)
            continue
        idx = torch.nonzero(g).flatten()
        for s in (side, ~side):
            sub = torch.zeros_like(g)
            sub[idx[s]] = True
            groups.append(sub)
    labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for c, g in enumerate(done + groups):
        labels[g] = c
    return labels
