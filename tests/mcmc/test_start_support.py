"""MCMC starts for a log-density written as -inf outside a constraint (``mcmc.sampler.search_support``)."""

import math
import warnings

import pytest
import torch

import diffstat as ds
from diffstat.mcmc.sampler import search_support

F64 = torch.float64


def half_normal(x):
    """Standard normal on the positive orthant, -inf outside (the way a new user writes x > 0)."""
    return torch.where((x > 0).all(-1), -0.5 * (x**2).sum(-1), torch.full_like(x[:, 0], -math.inf))


def test_all_reference_starts_outside_the_support_draw_more_and_sample_right():
    """Seed 0's four N(0, I) starts are all outside the orthant (chance (7/8)^4 = 0.59), which was a
    ValueError; further reference draws give starts inside and NUTS gets the half-normal's moments
    (mean sqrt(2/pi), sd sqrt(1 - 2/pi)) within 5 Monte Carlo errors of 4,000 correlated draws."""
    target = ds.Target(half_normal, 3, dtype=F64)
    first = target.sample_reference(4, torch.Generator().manual_seed(0))
    assert not bool(torch.isfinite(half_normal(first)).any())  # the case this test is about
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # divergences at the wall are expected
        idata = ds.sample(target, "nuts", num_samples=1000, seed=0, progress=False)
    x = torch.as_tensor(idata.posterior["x"].values).reshape(-1, 3)
    mean, sd = math.sqrt(2 / math.pi), math.sqrt(1 - 2 / math.pi)
    assert bool(torch.isfinite(torch.as_tensor(idata.sample_stats["lp"].values)).all())
    assert float((x.mean(0) - mean).abs().max()) < 5 * sd / math.sqrt(4000 / 4)  # ESS >= 1000 per coordinate
    assert float((x.std(0) / sd - 1).abs().max()) < 0.1


def test_a_support_no_reference_draw_reaches_is_refused_with_advice():
    """-inf except beyond 40 in every coordinate: no draw of 4,096 lands there, so the run is refused
    before sampling, and the message says how to reparametrise."""
    target = ds.Target(
        lambda x: torch.where((x > 40).all(-1), -x.sum(-1), torch.full_like(x[:, 0], -math.inf)), 2, dtype=F64
    )
    with pytest.raises(ValueError, match=r"-inf at all .* u = log x"):
        ds.sample(target, "hmc", num_samples=100, seed=0, progress=False)


def test_only_the_starts_outside_the_support_are_replaced():
    """search_support keeps the finite starts as they are and gives each -inf one a finite reference
    draw (a chain started outside never moves, and its rejections shrink the shared step size)."""
    target = ds.Target(half_normal, 3, dtype=F64)
    x0 = torch.tensor([[1.0, 2.0, 0.5], [-1.0, 1.0, 1.0], [0.3, 0.2, 0.1], [1.0, -2.0, 3.0]], dtype=F64)
    finite = torch.isfinite(half_normal(x0))
    out = search_support(target, x0, finite, torch.Generator().manual_seed(0), None)
    assert torch.equal(out[finite], x0[finite])
    assert bool(torch.isfinite(half_normal(out)).all())
    assert not torch.equal(out[1], out[3])  # distinct fresh draws, not one copied
