"""The posteriordb ports far from the posterior: -inf or finite, never NaN.

A flat or ordered parameter's reference and its factor cancel in the joint; computed through the
plain inverse of the constraint's bijection they were both non-finite, and their sum NaN, where the
constrained value had been rounded onto the support's boundary (an ordered gap below the float
spacing) or overflowed (Pyro's positive-ordered map is an exp of an exp). The samplers reject NaN
points, and ``ds.sample`` warns that the draws may miss mass there: on the bball_drive HMMs the
diffusion sampler's restocking chains met 25 such points (seed 0) and every run warned.
"""

import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from torch.distributions import TransformedDistribution, biject_to

from diffstat import posteriordb as pdb
from diffstat.posteriordb.models import Pushforward

HMMS = ("bball_drive_event_0-hmm_drive_0", "bball_drive_event_1-hmm_drive_1", "hmm_example-hmm_example")


@pytest.mark.parametrize("name", HMMS)
def test_hmm_ports_are_never_nan_far_out(name):
    """At 1,000 reference draws moved by N(0, s^2 I), s = 3, 10, 30 in unconstrained units (before
    the fix: 30, 438 and 804 NaN of 1,000 on hmm_drive_0; 13, 268, 496 on hmm_example)."""
    post = pdb.load(name)
    u = post.target.unconstrain(post.reference_sites())
    g = torch.Generator().manual_seed(0)
    for s in (3.0, 10.0, 30.0):
        x = u + s * torch.randn(u.shape, generator=g, dtype=u.dtype)
        lp = post.target.log_prob(x)
        assert not torch.isnan(lp).any(), (s, int(torch.isnan(lp).sum()))
        assert not (lp == float("inf")).any()


@pytest.mark.parametrize("name", HMMS)
def test_hmm_ports_at_a_rounded_gap_and_an_overflow(name):
    """An ordered site's second coordinate at -60 (its gap exp(-60) below the spacing of the first
    value: the constrained pair is equal) gives a finite log-density, and at 50 (a positive-ordered
    value exp(x0 + exp(50)) overflows to inf) no NaN; the first was NaN on every HMM, the second on
    the positive-ordered ones. (Beyond 709.78 the target's own Jacobian, exp of the coordinate, is
    +inf and the sum still NaN.)"""
    post = pdb.load(name)
    t = post.target
    u = t.unconstrain(post.reference_sites())[:1]
    ordered = [s for s in t.sites.values() if s.size == 2 and s.name not in ("theta1", "theta2")]
    assert ordered
    for site in ordered:
        for value in (-60.0, 50.0):
            x = u.clone()
            x[0, site.offset + 1] = value
            lp = t.log_prob(x)
            assert not torch.isnan(lp).any() and lp.item() < float("inf"), (site.name, value)
            assert value > 0 or torch.isfinite(lp).all()


@pytest.mark.parametrize(
    "support", [constraints.positive, constraints.ordered_vector, constraints.positive_ordered_vector]
)
def test_pushforward_log_prob_equals_the_parents_where_finite(support):
    """The parent's ``TransformedDistribution.log_prob`` (to rounding) at 500 reference draws,
    and finite at values where the parent's is NaN: 0, inf and equal ordered entries."""
    vector = support is not constraints.positive
    base = dist.Normal(torch.zeros(2 if vector else (), dtype=torch.float64), 1.5)
    base = base.to_event(1) if vector else base
    ref = Pushforward(base, support, validate_args=False)
    plain = TransformedDistribution(base, [biject_to(support)], validate_args=False)
    torch.manual_seed(0)
    z = ref.sample((500,))
    torch.testing.assert_close(ref.log_prob(z), plain.log_prob(z), rtol=1e-13, atol=1e-13)
    odd = torch.tensor([[1.0, 1.0], [0.0, 2.0], [1.0, float("inf")]], dtype=torch.float64)
    odd = odd if vector else odd.flatten()[[0, 2, 5]]  # 1.0, 0.0, inf: three scalars
    assert torch.isnan(plain.log_prob(odd)).any()
    assert torch.isfinite(ref.log_prob(odd)).all()
    z = odd.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(ref.log_prob(z).sum(), z)
    assert not torch.isnan(grad).any()
