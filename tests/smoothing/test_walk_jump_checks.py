"""Walk-jump's marks on draws that are far off without a divergent walk step: walkers lost where the
smoothed score has gone flat (as a learned score does beyond its particles) jump to draws far below
the log-density of the target's own draws, and are marked, with a warning that says so."""

import math
import warnings

import pytest
import torch

import diffstat as ds
from diffstat.smoothing.walk_jump_checks import draw_floor, log_prob_floor

#: ArviZ warns when there are more chains than draws: intended here (independent runs).
pytestmark = pytest.mark.filterwarnings("ignore:More chains")

DIM, RADIUS = 4, 6.0
#: The start of the MCMC diagnostics' warning on one-walker chains (diffstat.diagnostics).
_DIAGNOSED = "ds.sample(..., 'walk_jump'): the result is unreliable"


def flat_far_score(y: torch.Tensor, sigma: float) -> torch.Tensor:
    r"""The smoothed score of :math:`\mathcal N(0, I)`, :math:`-y / (1 + \sigma^2)`, within ``RADIUS`` of the
    mode and 0 beyond: a walker out there feels no pull back, its kinetic energy stays at 1 (no
    divergence), and its jump is where it is."""
    inside = (y.norm(dim=-1, keepdim=True) < RADIUS).to(y.dtype)
    return -inside * y / (1 + sigma**2)


def run(num_far: int, num_mala: int = 10) -> tuple:
    """20 one-walker chains of 10 jumps at sigma = 1, each corrected by ``num_mala`` MALA steps on
    p(x | y), ``num_far`` of them started at 50 in every coordinate (the last ones), the others at the
    mode. Returns the marks ``(20, 10)``, the attrs and the RuntimeWarnings' messages."""
    target = ds.Target(lambda x: -0.5 * (x**2).sum(-1), DIM, dtype=torch.float64)
    init = torch.zeros(20, DIM, dtype=torch.float64)
    init[20 - num_far :] = 50.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        idata = ds.sample(target, "walk_jump", num_samples=10, num_chains=20, seed=3, progress=False,
                          smoothed_score=flat_far_score, init=init, num_mala=num_mala)  # fmt: skip
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    # the marks' warning only: chains of 10 draws are also called unreliable by the MCMC diagnostics
    messages = [m for m in messages if not m.startswith(_DIAGNOSED)]
    return torch.as_tensor(idata.sample_stats["diverging"].values), idata.posterior.attrs, messages


def test_lost_walkers_marked():
    """Three of 20 chains lost far out: exactly their 30 draws are marked, for their log-density (no
    walk step diverged), and the warning gives the count and calls the run unreliable (15% marked).
    Before this check the run was silent: no draw marked, no warning."""
    marks, attrs, messages = run(3)
    assert marks[17:].all() and not marks[:17].any()
    assert attrs["num_divergent"] == 30 and attrs["num_low_log_prob"] == 30
    assert attrs["num_divergent_steps"] == 0
    (message,) = messages
    assert "30 of 200 draws are marked" in message and "30 have a log-density below" in message
    assert "the run as a whole is unreliable" in message


def test_right_draws_unmarked():
    """The same walk with every chain at the mode: nothing marked, no warning, and the floor well below
    the draws' lowest log-density. Uncorrected jumps (posterior means, which may lie between modes by
    design) are not held to a floor: the lost walkers' jumps are not marked then."""
    marks, attrs, messages = run(0)
    assert not marks.any() and attrs["num_low_log_prob"] == 0 and not messages
    assert attrs["log_prob_floor"] < -20
    marks, attrs, _ = run(3, num_mala=0)
    assert not marks.any() and math.isnan(attrs["log_prob_floor"])


@pytest.mark.parametrize("dim", [2, 200])
def test_log_prob_floor_spares_target_draws(dim):
    """The floor from 500 draws of N(0, I_d) (their log-densities, their minimum or lower quartile) is
    below every one of 100,000 fresh draws' (a false mark would need a draw max(20, 5 sd) below the
    reference), and above a point 10 sd of the log-density (and 30 nats) below the median."""
    gen = torch.Generator().manual_seed(dim)
    lp = lambda n: -0.5 * (torch.randn(n, dim, generator=gen, dtype=torch.float64) ** 2).sum(-1)  # noqa: E731
    reference, fresh = lp(500), lp(100_000)
    for quantile in (0.0, 0.25):
        floor = log_prob_floor(reference, quantile)
        assert floor < float(fresh.min())
        assert floor > float(reference.median()) - max(10 * math.sqrt(dim / 2), 30)
    assert log_prob_floor(torch.full((5,), -1.0), 0.25) == -math.inf  # too few to judge


def test_draw_floor_reference():
    """A fitted score's held-out particles set the floor from their minimum (the draws, half of them far
    off, do not move it); without them the draws' lower quartile does; uncorrected jumps get none."""
    gen = torch.Generator().manual_seed(1)
    particles = -0.5 * (torch.randn(400, 8, generator=gen, dtype=torch.float64) ** 2).sum(-1)
    lp = torch.cat([particles[:100], torch.full((100,), -1e4, dtype=torch.float64)]).reshape(4, 50)
    marked = torch.zeros(4, 50, dtype=torch.bool)
    floor, words = draw_floor(lp, marked, 20, particles)
    assert floor == log_prob_floor(particles, 0.0) and "held-out particles" in words
    assert (lp < floor).sum() == 100
    floor, words = draw_floor(lp, marked, 20)
    assert floor == log_prob_floor(lp.reshape(-1), 0.25) and "lower quartile" in words
    assert math.isnan(draw_floor(lp, marked, 0, particles)[0])
