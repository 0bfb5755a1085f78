"""The barrier test and the groupings built on it (diffstat.modes.barriers): exact cases on two
separated Gaussians, and a radius that joins across a barrier as it should."""

import torch

from diffstat.modes.barriers import group_by_barrier, group_by_leaders, no_barrier
from diffstat.targets import GaussianMixture


def _two_gaussians():
    return GaussianMixture(torch.tensor([[-3.0, 0.0], [3.0, 0.0]]), [0.5, 0.5], scales=[0.5, 0.5]).as_target(
        dtype=torch.float64
    )


def test_no_barrier_exact_cases():
    target = _two_gaussians()
    a = torch.tensor([[-3.2, 0.1], [-3.0, 0.0], [-2.7, -0.2]], dtype=torch.float64)
    b = torch.tensor([[-2.8, -0.3], [3.0, 0.0], [2.9, 0.2]], dtype=torch.float64)
    lp_a, lp_b = target.log_prob(a), target.log_prob(b)
    before = target.num_target_evals
    ok = no_barrier(target.log_prob, a, lp_a, b, lp_b, num_points=3, tol=0.5)
    # same mode: log p is concave along the segment, no barrier; across modes: a deep barrier
    assert ok.tolist() == [True, False, False]
    assert target.num_target_evals - before == 9  # 3 segments x 3 interior points, counted


def test_grouping_separates_and_joins():
    target = _two_gaussians()
    gen = torch.Generator().manual_seed(3)
    x = torch.cat(
        [
            torch.tensor([-3.0, 0.0]) + 0.05 * torch.randn(20, 2, generator=gen),
            torch.tensor([3.0, 0.0]) + 0.05 * torch.randn(10, 2, generator=gen),
        ]
    ).double()
    label = group_by_barrier(target.log_prob, x, target.log_prob(x))
    assert label[:20].unique().numel() == 1 and label[20:].unique().numel() == 1 and label[0] != label[20]


def test_group_by_leaders_in_order_with_radius_and_cap():
    """Leaders are taken in the order given; a point within ``radius`` joins without a barrier
    test (here across the barrier), and points beyond ``max_groups`` groups get -1."""
    target = _two_gaussians()
    x = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [-2.9, 0.1], [2.8, -0.1]], dtype=torch.float64)
    label, leaders = group_by_leaders(target.log_prob, x, radius=0.01)
    assert label.tolist() == [0, 1, 0, 1] and torch.equal(leaders, x[:2])
    # a radius of 7 puts the other mode's points in the first group, barrier or not
    label, _ = group_by_leaders(target.log_prob, x, radius=7.0)
    assert label.tolist() == [0, 0, 0, 0]
    label, leaders = group_by_leaders(target.log_prob, x, radius=0.01, max_groups=1)
    assert label.tolist() == [0, -1, 0, -1] and leaders.shape == (1, 2)
