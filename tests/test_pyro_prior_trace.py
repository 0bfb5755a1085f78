"""Construction of a Pyro target runs the model at seeded prior draws, with Pyro's validation on
(``diffstat.pyro_checks.prior_trace``): it neither depends on nor advances torch's global RNG, and a
draw at which a distribution's parameter is NaN is a NaN point, not a reason to refuse the model.

Regression: ``tests/test_pyro_nan_sites.py`` failed about once in nine runs with ``ValueError:
Expected parameter scale ... Normal(loc: 2.98, scale: nan)``: the prior trace drew ``mu`` from the
global RNG, as the preceding tests had left it, and ``nan_above``'s observation has scale NaN at
``mu > 1.6`` (prior mass 0.055). Global seeds 66 and 67 are two such states."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.util import is_validation_enabled

import diffstat as ds
from diffstat.pyro_checks import NUM_TRACE_DRAWS, prior_trace

F64 = torch.float64


def nan_above(y, edge=1.6, seen=None):
    """mu ~ N(0, 1), y ~ N(mu, 1), with the observation's scale NaN where mu > edge; ``seen``
    collects the values of mu of the runs with Pyro's validation on (construction's only)."""
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0), 1.0))
    if seen is not None and is_validation_enabled():
        seen.append(float(mu))
    pyro.sample("y", dist.Normal(mu, torch.where(mu > edge, torch.nan, 1.0)), obs=y)


@pytest.mark.parametrize("vectorize", ["plate", "vmap"])
@pytest.mark.parametrize("global_seed", [66, 67])
def test_construction_does_not_draw_from_the_global_rng(global_seed, vectorize):
    torch.manual_seed(global_seed)
    first = dist.Normal(torch.tensor(0.0, dtype=F64), 1.0).sample()
    assert first > 1.6  # the global state at which the prior trace used to raise
    torch.manual_seed(global_seed)
    target = ds.Target.from_pyro(nan_above, torch.tensor(0.3, dtype=F64), vectorize=vectorize)
    assert target.dim == 1 and target.vectorize == vectorize
    assert torch.equal(dist.Normal(torch.tensor(0.0, dtype=F64), 1.0).sample(), first)  # stream untouched
    lp = target.log_prob(torch.tensor([[2.0], [0.0]], dtype=F64))
    assert torch.isnan(lp[0]) and torch.isfinite(lp[1])  # NaN above the edge, as in a run


def test_a_draw_in_the_nan_region_is_followed_by_the_next_seed():
    """Half the prior has a NaN scale: the first seeded draws met it (so the test exercises the
    retry: ``prior_trace`` called directly, since the target's probe points, seeded alike, would
    refuse such a model before), the last one did not, and its trace is returned."""
    seen = []
    target = ds.Target.from_pyro(nan_above, torch.tensor(0.3, dtype=F64), edge=float("inf"), seen=seen)
    seen.clear()
    target.model_kwargs = {"edge": 0.0, "seen": seen}
    trace = prior_trace(target)
    assert 2 <= len(seen) <= NUM_TRACE_DRAWS and seen[0] > 0.0 and seen[-1] <= 0.0
    assert float(trace.nodes["mu"]["value"]) == seen[-1] and torch.isfinite(trace.log_prob_sum())


def test_a_model_nan_at_every_draw_is_still_refused():
    seen = []
    with pytest.raises(
        ValueError, match=r"at all 10 seeded prior draws\): ValueError: Expected parameter scale"
    ):
        ds.Target.from_pyro(nan_above, torch.tensor(0.3, dtype=F64), edge=-float("inf"), seen=seen)
    assert len(seen) == NUM_TRACE_DRAWS == 10


def test_a_failure_that_is_not_a_nan_point_is_refused_at_the_first_draw():
    """An observation outside its support (a negative Poisson count): the validated run raises, the
    unvalidated log-density is not NaN, so no other draw is tried."""
    seen = []

    def negative_count(k, seen):
        rate = pyro.sample("rate", dist.Gamma(torch.tensor(2.0), 1.0))
        seen.append(float(rate))
        pyro.sample("k", dist.Poisson(rate), obs=k)

    with pytest.raises(
        ValueError, match=r"arguments failed: ValueError: .* at site 'k':\s+Expected value argument"
    ):
        ds.Target.from_pyro(negative_count, torch.tensor(-1.0, dtype=F64), seen=seen)
    assert len(seen) == 2  # one unvalidated run and its validated replay
