"""The Gaussian-mixture proposal's log-density is computed in chunks of points when the bank is
large (memory K d n): the same values as all points at once, to rounding."""

import torch

from diffstat.diffusion import gaussians as G


def test_chunked_log_density_equals_the_whole_and_bounds_the_tensor(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    k, d, n = 50, 8, 3000
    means = 3 * torch.randn(k, d, generator=gen, dtype=torch.float64)
    a = 0.2 * torch.randn(k, d, d, generator=gen, dtype=torch.float64) + torch.eye(d, dtype=torch.float64)
    mix = G.GaussianMixtureProposal(
        means, torch.linalg.cholesky(a @ a.transpose(1, 2)), torch.rand(k, generator=gen, dtype=torch.float64)
    )
    x = 3 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    whole = mix.component_log_prob(x)
    shapes = []
    solve = torch.linalg.solve_triangular
    monkeypatch.setattr(G, "_MAX_ELEMENTS", k * d * 700)  # chunks of 700 points: 5 of them
    monkeypatch.setattr(
        torch.linalg, "solve_triangular", lambda a, b, **kw: shapes.append(b.shape) or solve(a, b, **kw)
    )
    chunked = mix.component_log_prob(x)
    assert [s[-1] for s in shapes] == [700, 700, 700, 700, 200]
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-10)
    # the mixture's density itself, against a direct sum over components
    direct = torch.stack(
        [
            torch.distributions.MultivariateNormal(means[j], scale_tril=mix.chols[j]).log_prob(x)
            + torch.log(mix.weights[j])
            for j in range(k)
        ],
        1,
    )
    torch.testing.assert_close(chunked, direct, rtol=0, atol=1e-9)
