r"""Group points by mode where :math:`\log p` has a barrier between them: the barrier test that the
diffusion sampler's mode search (:func:`~diffstat.diffusion.modes.explore_modes`) and divide and
conquer's basins (:mod:`diffstat.dnc.mode_weights`) share.

Two points share a mode only when :math:`\log p` has no barrier on the segment between them,

.. math:: \min_{0<s<1} \log p\big((1-s)a + s b\big) \ge \min(\log p(a), \log p(b)) - \tau,

checked at ``num_points`` interior points :math:`s = j/(m+1)` (:func:`no_barrier`). Two leader
clusterings use it: :func:`group_by_barrier` (leaders by decreasing :math:`\log p`, each point
against its nearest leader, then :func:`merge_groups` to follow curved modes) for climbed peaks of
an exact target, and :func:`group_by_leaders` (points in the given order, each leader against every
free point, a Euclidean radius joining without a test) for end points of a fixed-step ascent on a
learned density. Peaks, not samples, are compared: in high dimension samples sit about :math:`d/2`
nats below their peak, under the saddle between nearby modes. Defaults: :math:`\tau` = 0.5 nats and
three interior points, three target evaluations per pair checked (a peak is exact to the climb's
tolerance, so a small margin suffices); divide and conquer passes its own (8 points, 1 nat: its
learned energies are off by a few tenths of a nat). The climbs are in :mod:`diffstat.modes.climb`.
"""

from __future__ import annotations

import math

import torch

__all__ = ["no_barrier", "group_by_barrier", "merge_groups", "group_by_leaders"]


def no_barrier(
    log_prob,
    a: torch.Tensor,
    lp_a: torch.Tensor,
    b: torch.Tensor,
    lp_b: torch.Tensor,
    *,
    num_points: int = 3,
    tol: float = 0.5,
) -> torch.Tensor:
    r"""True where :math:`\log p` has no barrier on the segment from ``a`` to ``b`` (both
    ``(n, dim)``): at the ``num_points`` interior points :math:`s = j/(m+1)` the log-density stays
    above :math:`\min(\log p(a), \log p(b)) - \tau`. Costs ``n * num_points`` evaluations."""
    if a.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=a.device)
    s = torch.linspace(0, 1, num_points + 2, dtype=a.dtype, device=a.device)[1:-1]
    pts = a[:, None, :] + s[None, :, None] * (b - a)[:, None, :]  # (n, m, dim)
    with torch.no_grad():
        lp = log_prob(pts.reshape(-1, a.shape[1])).reshape(a.shape[0], num_points)
    lp = torch.nan_to_num(lp, nan=-math.inf)
    return lp.min(-1).values >= torch.minimum(lp_a, lp_b) - tol


def group_by_barrier(
    log_prob, x: torch.Tensor, lp: torch.Tensor, *, tol: float = 0.5, num_points: int = 3, max_new: int = 32
) -> torch.Tensor:
    r"""Group points ``x: (n, dim)`` by mode; returns labels ``(n,)`` (long, ``0..K-1``).

    Leader clustering in decreasing :math:`\log p`, batched: in each round every unassigned point
    is checked (:func:`no_barrier`) against its nearest untried leader (Euclidean distance in
    coordinates standardised by the points' spread) and joins it if no barrier separates them.
    The best of the points that failed against every leader become new leaders, up to
    ``max_new`` per round, each only if it is separated by a barrier from the round's other new
    leaders. Groups are then merged by :func:`merge_groups`, which follows curved modes.
    """
    n = x.shape[0]
    scale = x.std(0).clamp_min(1e-12) if n > 1 else torch.ones_like(x[0])
    xs = x / scale
    order = torch.argsort(lp, descending=True)
    leaders = [int(order[0])]
    label = torch.full((n,), -1, dtype=torch.long, device=x.device)
    label[leaders[0]] = 0
    tried = torch.zeros(n, 0, dtype=torch.bool, device=x.device)
    while True:
        tried = torch.cat(
            [tried, torch.zeros(n, len(leaders) - tried.shape[1], dtype=torch.bool, device=x.device)], 1
        )
        todo = torch.nonzero((label < 0) & ~tried.all(-1)).flatten()
        if todo.numel():
            lead = torch.tensor(leaders, device=x.device)
            dist = torch.cdist(xs[todo], xs[lead]).masked_fill(tried[todo], math.inf)
            k = dist.argmin(-1)
            ok = no_barrier(
                log_prob, x[todo], lp[todo], x[lead[k]], lp[lead[k]], num_points=num_points, tol=tol
            )
            tried[todo, k] = True
            label[todo[ok]] = k[ok]
        homeless = torch.nonzero((label < 0) & tried.all(-1)).flatten()
        if homeless.numel() == 0:
            if bool((label >= 0).all()):
                break
            continue
        homeless = homeless[torch.argsort(lp[homeless], descending=True)][:max_new]
        new = [int(homeless[0])]
        for j in homeless[1:].tolist():
            prev = torch.tensor(new, device=x.device)
            nearest = prev[torch.cdist(xs[j : j + 1], xs[prev]).argmin()]
            if not bool(
                no_barrier(
                    log_prob,
                    x[j : j + 1],
                    lp[j : j + 1],
                    x[nearest : nearest + 1],
                    lp[nearest : nearest + 1],
                    num_points=num_points,
                    tol=tol,
                )
            ):
                new.append(j)
        for j in new:
            label[j] = len(leaders)
            leaders.append(j)
    return merge_groups(log_prob, x, lp, label, tol=tol, num_points=num_points)


def merge_groups(
    log_prob,
    x: torch.Tensor,
    lp: torch.Tensor,
    label: torch.Tensor,
    *,
    tol: float = 0.5,
    num_points: int = 3,
    num_pairs: int = 3,
    how: str = "closest",
) -> torch.Tensor:
    r"""Merge groups whose representatives are joined by a barrier-free segment; returns compact
    labels ``(n,)``.

    ``how="closest"``: the ``num_pairs`` closest pairs of points of two groups (single linkage
    along the mode, so a curved mode split by leader clustering is rejoined), for end points
    that were each checked against their leader. ``how="medoid"``: one segment between the two
    groups' medoids (the member nearest the coordinate-wise median), robust to a few particles
    that a restocking chain carried into another mode.
    """
    if how not in ("closest", "medoid"):
        raise ValueError(f"how must be 'closest' or 'medoid', got {how!r}")
    _, label = torch.unique(label, return_inverse=True)
    k = int(label.max()) + 1
    if k == 1:
        return label
    scale = x.std(0).clamp_min(1e-12)
    members = [torch.nonzero(label == i).flatten() for i in range(k)]
    if how == "medoid":
        reps = []
        for rows in members:
            med = x[rows].median(0).values
            reps.append(rows[((x[rows] - med) / scale).pow(2).sum(-1).argmin()].reshape(1))
    a_idx, b_idx = [], []
    for i in range(k):
        for j in range(i + 1, k):
            if how == "medoid":
                a_idx.append(reps[i])
                b_idx.append(reps[j])
                continue
            dist = torch.cdist(x[members[i]] / scale, x[members[j]] / scale).flatten()
            best = torch.topk(dist, min(num_pairs, dist.numel()), largest=False).indices
            a_idx.append(members[i][best // members[j].numel()])
            b_idx.append(members[j][best % members[j].numel()])
    a_idx, b_idx = torch.cat(a_idx), torch.cat(b_idx)
    ok = no_barrier(log_prob, x[a_idx], lp[a_idx], x[b_idx], lp[b_idx], num_points=num_points, tol=tol)
    parent = list(range(k))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in zip(label[a_idx[ok]].tolist(), label[b_idx[ok]].tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = torch.tensor([find(i) for i in range(k)], device=x.device)
    return torch.unique(roots[label], return_inverse=True)[1]


def group_by_leaders(
    log_prob,
    x: torch.Tensor,
    *,
    radius: float,
    tol: float = 0.5,
    num_points: int = 3,
    max_groups: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Group points ``x: (n, dim)`` by mode in the order given; returns ``labels (n,)`` (long) and
    the leaders ``(m, dim)``.

    The first ungrouped point leads a new group; every ungrouped point joins it when it lies within
    ``radius`` of it or when :func:`no_barrier` (``num_points``, ``tol``) finds no barrier between
    them (an ascent that has not converged along a flat direction still joins). After
    ``max_groups`` groups the rest are labelled -1. One leader against all free points per round,
    so the cost is that of the groups found, whatever the order of the points.
    """
    labels = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
    lp = log_prob(x)
    leaders = []
    while len(leaders) < max_groups:
        free = (labels < 0).nonzero().squeeze(-1)
        if free.numel() == 0:
            break
        c = x[free[0]]
        pts = x[free]
        join = ((pts - c) ** 2).sum(-1) <= radius**2
        rest = (~join).nonzero().squeeze(-1)
        if rest.numel():
            lead = c.expand(rest.numel(), -1)
            lp_lead = lp[free[0]].expand(rest.numel())
            join[rest] = no_barrier(
                log_prob, lead, lp_lead, pts[rest], lp[free[rest]], num_points=num_points, tol=tol
            )
        labels[free[join]] = len(leaders)
        leaders.append(c)
    return labels, torch.stack(leaders) if leaders else x[:0]
