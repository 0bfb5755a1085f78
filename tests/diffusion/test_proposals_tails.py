"""Pieces of the diffusion sampler's proposals: the held-out cross-entropy used to check a fitted
model against its mode's Gaussian, the Gaussian stand-in component, and the widened base."""

import math

import torch

from diffstat.diffusion.networks import ScoreMLP
from diffstat.diffusion.processes import VP
from diffstat.diffusion.proposals import (
    DiffusionProposal,
    GaussianComponent,
    Whitening,
    held_out_cross_entropy,
)


def _normal_log_prob(x, mean, scale):
    return (-0.5 * ((x - mean) / scale) ** 2 - math.log(scale) - 0.5 * math.log(2 * math.pi)).sum(-1)


def test_held_out_cross_entropy_estimates_kl():
    """At draws of p = N(0, I_3) (unnormalised by log Z = 0.7), the score of q = N(m, s^2 I) is
    KL(p || q) + log Z: closed form d (log s + (1 + m^2)/(2 s^2) - 1/2); a q shifted by 0.3 or
    widened by 1.3 scores worse than q = p, and an estimate against the wrong closed form fails."""
    gen = torch.Generator().manual_seed(0)
    d, n, log_z = 3, 20_000, 0.7
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    log_p = _normal_log_prob(x, 0.0, 1.0) + log_z
    for m, s in ((0.0, 1.0), (0.3, 1.0), (0.0, 1.3)):
        log_q = _normal_log_prob(x, m, s)
        est = held_out_cross_entropy(log_p, log_q)
        exact = d * (math.log(s) + (1 + m**2) / (2 * s**2) - 0.5) + log_z
        se = float((log_p - log_q).std()) / math.sqrt(n)
        assert abs(est - exact) < 4 * se + 1e-12
        assert abs(est - (exact + 0.05)) > 4 * se or se == 0.0  # the check can fail
    assert held_out_cross_entropy(log_p, _normal_log_prob(x, 0.0, 1.0)) < held_out_cross_entropy(
        log_p, _normal_log_prob(x, 0.3, 1.0)
    )
    # a NaN density counts as a failed proposal, never as a good one
    bad = _normal_log_prob(x, 0.0, 1.0).clone()
    bad[0] = math.nan
    assert held_out_cross_entropy(log_p, bad) == math.inf


def test_gaussian_component_density_is_exact():
    mean = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    chol = torch.tensor([[1.0, 0.0, 0.0], [0.4, 0.7, 0.0], [-0.2, 0.1, 1.5]], dtype=torch.float64)
    comp = GaussianComponent(mean, chol)
    x, log_q = comp.sample(500, torch.Generator().manual_seed(1))
    ref = torch.distributions.MultivariateNormal(mean, scale_tril=chol).log_prob(x)
    assert torch.allclose(log_q, ref, atol=1e-10) and torch.allclose(comp.log_prob(x), ref, atol=1e-10)
    assert float((x.mean(0) - mean).abs().max()) < 4 * 1.6 / math.sqrt(500)


def test_widened_base_pushforward_is_a_density():
    """A flow from the base 0.7 N(0, I) + 0.3 N(0, 1.5^2 I): its log-density integrates to one on
    a 2-d grid, the reverse solve's log-density equals the forward one at the drawn points, and a
    share of about 0.3 of the draws started in the wide component (their spread is larger)."""
    process = VP(t_max=0.6)
    model = ScoreMLP(2, 16, 1, process=process, seed=0)
    with torch.no_grad():  # an untrained but non-trivial model
        model.net.out.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
    whitening = Whitening(
        torch.tensor([0.5, -0.5], dtype=torch.float64),
        torch.tensor([[1.2, 0.0], [0.5, 0.8]], dtype=torch.float64),
    )
    prop = DiffusionProposal(
        lambda y, t: model(y, t), process, whitening, num_steps=40, tail_weight=0.3, tail_scale=1.5
    )
    grid = torch.linspace(-9.0, 10.0, 80, dtype=torch.float64)
    xy = torch.cartesian_prod(grid, grid)
    mass = float(torch.exp(prop.log_prob(xy)).sum() * (grid[1] - grid[0]) ** 2)
    assert abs(mass - 1.0) < 0.02
    x, log_q = prop.sample(300, torch.Generator().manual_seed(2))
    assert torch.allclose(prop.log_prob(x), log_q, atol=1e-3)
    narrow = DiffusionProposal(lambda y, t: model(y, t), process, whitening, num_steps=40)
    assert float(torch.exp(narrow.log_prob(xy)).sum() * (grid[1] - grid[0]) ** 2) > 0.98
    assert float((prop.log_prob(xy) - narrow.log_prob(xy)).abs().max()) > 0.1  # the base is not ignored
