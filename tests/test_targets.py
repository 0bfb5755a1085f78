"""Benchmark targets against independent exact answers: log normalisers by quadrature or by
importance sampling with an analytic truth, exact draws against exact moments (tolerances from
Monte Carlo error), analytic gradients; each statistical check is also shown to reject a wrong
answer."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.integrate import trapezoid

import diffstat as ds
from diffstat.targets import (
    BananaMixture,
    Funnel,
    GaussianMixture,
    LogisticRegression,
    ManyWell,
    banana_mixture,
    gmm40,
    ionosphere,
    load_dataset,
    narrow_wide,
    nine_modes,
    sonar,
    two_modes,
)

Z = 4.5  # z-score bound for a handful of simultaneous checks


def zscore(values: torch.Tensor, truth) -> torch.Tensor:
    """(mean - truth) / standard error, per column of ``values: (n, k)``."""
    n = values.shape[0]
    return (values.mean(0) - truth) / (values.std(0) / math.sqrt(n))


def is_log_z(log_p: torch.Tensor, log_q: torch.Tensor) -> tuple[float, float]:
    """Importance-sampling estimate of log Z and its delta-method standard error."""
    log_w = log_p - log_q
    w = torch.exp(log_w - log_w.max())
    est = float(torch.log(w.mean()) + log_w.max())
    se = float(w.std() / (w.mean() * math.sqrt(len(w))))
    return est, se


def trapezoid_2d(log_f: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    """log of the 2-d trapezoid integral of exp(log_f) on the grid ``x (a,) x y (b,)``."""
    shift = log_f.max()
    f = torch.exp(log_f - shift).numpy()
    outer = trapezoid(trapezoid(f, y.numpy(), axis=1), x.numpy())
    return math.log(outer) + float(shift)


# ---------------------------------------------------------------------------------- funnel
def test_funnel_normalised_by_2d_quadrature():
    funnel = Funnel(dim=2)
    x1 = torch.linspace(-36.0, 36.0, 2401, dtype=torch.float64)  # +-12 sd of the neck
    u = torch.linspace(-12.0, 12.0, 801, dtype=torch.float64)  # x2 = e^{x1/2} u, Jacobian e^{x1/2}
    g1, gu = torch.meshgrid(x1, u, indexing="ij")
    pts = torch.stack([g1, torch.exp(0.5 * g1) * gu], -1).reshape(-1, 2)
    log_f = funnel.log_prob(pts).reshape(g1.shape) + 0.5 * g1
    assert abs(trapezoid_2d(log_f, x1, u)) < 1e-8


def test_funnel_log_z_by_importance_sampling_d10():
    """log Z of as_target() is log_normalizer: proposal x1 ~ N(0, 3.5^2), x_i | x1 ~ N(0, 1.3^2 e^{x1})
    keeps the weights bounded (by 3.5/3 * 1.3^9)."""
    funnel = Funnel(dim=10, log_normalizer=0.7)
    target = funnel.as_target()
    gen = torch.Generator().manual_seed(0)
    n = 20000
    x1 = 3.5 * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    rest = 1.3 * torch.exp(0.5 * x1) * torch.randn(n, 9, generator=gen, dtype=torch.float64)
    x = torch.cat([x1, rest], 1)
    log_q = torch.distributions.Normal(0.0, 3.5).log_prob(x1[:, 0]) + torch.distributions.Normal(
        0.0, 1.3 * torch.exp(0.5 * x1)
    ).log_prob(rest).sum(-1)
    est, se = is_log_z(target.log_prob(x), log_q)
    assert target.num_target_evals == n
    assert abs(est - 0.7) < 4 * se
    assert abs(est - 0.8) > 4 * se  # a log Z off by 0.1 would be rejected
    assert se < 0.02


def test_funnel_draws_match_exact_moments():
    funnel = Funnel(dim=10)
    x = funnel.sample(100_000, torch.Generator().manual_seed(1))
    z_std = x[:, 1:] * torch.exp(-0.5 * x[:, :1])  # exactly N(0, 1), independent of x1
    checks = [
        zscore(x, funnel.mean),
        zscore(x[:, :1] ** 2, funnel.variance[:1]),
        zscore(x.abs(), funnel.mean_abs),
        zscore(z_std**2, 1.0),
        zscore(z_std * x[:, :1], 0.0),
    ]
    assert max(float(c.abs().max()) for c in checks) < Z
    wrong = Funnel(dim=10, scale=2.8).sample(100_000, torch.Generator().manual_seed(1))
    assert float(zscore(wrong[:, :1] ** 2, funnel.variance[:1]).abs().max()) > 10  # rejected


def test_funnel_gradient_is_analytic():
    funnel = Funnel(dim=5)
    target = funnel.as_target(dtype=torch.float64)
    x = funnel.sample(50, torch.Generator().manual_seed(2))
    lp, grad = target.log_prob_and_grad(x)
    x1, rest = x[:, 0], x[:, 1:]
    g1 = -x1 / 9 + 0.5 * (rest**2).sum(-1) * torch.exp(-x1) - 0.5 * 4
    expected = torch.cat([g1[:, None], -rest * torch.exp(-x1)[:, None]], 1)
    assert torch.isfinite(lp).all() and not hasattr(target, "exact")  # no hidden answers
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------- many-well
def test_manywell_log_z_by_2d_quadrature_and_literature():
    well = ManyWell(dim=2)
    u = torch.linspace(-4.0, 4.0, 3201, dtype=torch.float64)
    v = torch.linspace(-12.0, 12.0, 1201, dtype=torch.float64)
    gu, gv = torch.meshgrid(u, v, indexing="ij")
    log_f = well.unnormalized_log_prob(torch.stack([gu, gv], -1).reshape(-1, 2)).reshape(gu.shape)
    assert abs(trapezoid_2d(log_f, u, v) - well.log_normalizer) < 1e-7
    big = ManyWell(dim=32)
    assert big.log_normalizer == pytest.approx(16 * well.log_normalizer, abs=1e-9)
    assert abs(big.log_normalizer - 164.6957) < 1e-4  # the published value (DDS, FAB), 4 decimals
    assert big.num_modes == 2**16


def test_manywell_draws_match_1d_law():
    well = ManyWell(dim=8)
    grid = np.linspace(-4.0, 4.0, 40001)
    dens = np.exp(-(-0.5 * grid - 6 * grid**2 + grid**4) - 9.5)  # independent of the class
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(grid))])
    mass = cdf[-1]
    cdf /= mass
    mean = trapezoid(grid * dens, grid) / mass
    second = trapezoid(grid**2 * dens, grid) / mass
    right = 1 - np.interp(well.boundary, grid, cdf)

    x = well.sample(50_000, torch.Generator().manual_seed(3))
    u = x[:, 0::2].reshape(-1)
    assert stats.kstest(u.numpy(), lambda t: np.interp(t, grid, cdf)).pvalue > 1e-3
    checks = [
        zscore(u[:, None], mean),
        zscore(u[:, None] ** 2, second),
        zscore((u > well.boundary).double()[:, None], right),
        zscore(x[:, 1::2], 0.0),
        zscore(x[:, 1::2] ** 2, 1.0),
    ]
    assert max(float(c.abs().max()) for c in checks) < Z
    assert well.well_probability == pytest.approx(right, abs=1e-6)
    # the rejection envelope bounds the density everywhere on its support (exactness of the draws)
    edges, bound = well._envelope
    t = torch.linspace(float(edges[0]), float(edges[-1]), 1_000_001, dtype=torch.float64)
    cell = (torch.searchsorted(edges, t, right=True) - 1).clamp(0, len(bound) - 1)
    assert bool((-(-0.5 * t - 6 * t**2 + t**4) <= bound[cell] + 1e-12).all())
    assert torch.allclose(well.mean[0::2], torch.tensor(mean, dtype=torch.float64), atol=1e-6)
    # a wrongly tilted double well is rejected by the same KS test
    wrong = ManyWell(dim=2, a=-0.7).sample_well_coordinate(50_000, torch.Generator().manual_seed(3))
    assert stats.kstest(wrong.numpy(), lambda t: np.interp(t, grid, cdf)).pvalue < 1e-6


def test_manywell_mode_labels_and_weights():
    well = ManyWell(dim=8)
    labels = torch.arange(well.num_modes)
    assert float(torch.logsumexp(well.log_mode_weight(labels), 0)) == pytest.approx(0.0, abs=1e-12)
    x = well.sample(20_000, torch.Generator().manual_seed(4))
    lab = well.assign(x)
    assert ((lab[:, None] >> torch.arange(4)) & 1).bool().equal(well.wells(x))
    count = well.wells(x).sum(-1).double()[:, None]  # Binomial(4, q)
    q = well.well_probability
    assert abs(float(zscore(count, 4 * q))) < Z
    target = well.as_target(dtype=torch.float64)
    lp, grad = target.log_prob_and_grad(x[:100])
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(lp, well.log_prob(x[:100]) + well.log_normalizer)


# ---------------------------------------------------------------------------------- Gaussian mixtures
def test_two_modes_matches_slips_definition():
    mix = two_modes(dim=16, a=1.5)
    ones = torch.ones(16, dtype=torch.float64)
    torch.testing.assert_close(mix.means, torch.stack([-1.0 * ones, 2.0 * ones]))  # -a + a/3, a + a/3
    torch.testing.assert_close(mix.weights, torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    torch.testing.assert_close(mix.covs[0], 0.05 * torch.eye(16, dtype=torch.float64))
    torch.testing.assert_close(mix.mean, torch.zeros(16, dtype=torch.float64), atol=1e-14, rtol=0)
    assert two_modes(dim=128, weights=(3, 1)).weights.tolist() == [0.75, 0.25]
    x = mix.sample(30_000, torch.Generator().manual_seed(5))
    heavy = (mix.assign(x) == 0).double()[:, None]
    assert abs(float(zscore(heavy, 2 / 3))) < Z
    with pytest.raises(ValueError, match="variance"):
        two_modes(dim=8, variance=0.0)


def test_narrow_wide_modes_are_separated():
    mix = narrow_wide(dim=10)
    assert mix.weights.tolist() == [0.75, 0.25]
    assert torch.sqrt(mix.covs[:, 0, 0]).tolist() == pytest.approx([0.4, 1.0])
    gen = torch.Generator().manual_seed(6)
    comp = torch.multinomial(mix.weights, 20_000, replacement=True, generator=gen)
    x = mix.means[comp] + torch.sqrt(mix.covs[comp, 0, 0])[:, None] * torch.randn(
        20_000, 10, generator=gen, dtype=torch.float64
    )
    nearest = torch.cdist(x, mix.means).argmin(1)
    assert bool((nearest == comp).all())  # nearest mean recovers every component label
    assert bool((mix.assign(x) == comp).all())


def test_nine_modes_and_gmm40_normalised_by_2d_quadrature():
    # the trapezoid rule on a Gaussian of sd s with step h errs by about exp(-2 pi^2 s^2 / h^2)
    for mix, half, n in [
        (nine_modes(log_normalizer=1.3), 12.0, 241),
        (gmm40(log_normalizer=-2.0), 48.0, 385),
    ]:
        t = torch.linspace(-half, half, n, dtype=torch.float64)
        g1, g2 = torch.meshgrid(t, t, indexing="ij")
        log_f = mix.as_target().log_prob(torch.stack([g1, g2], -1).reshape(-1, 2)).reshape(g1.shape)
        assert abs(trapezoid_2d(log_f, t, t) - mix.log_normalizer) < 1e-6
    nine = nine_modes()
    assert nine.weights.tolist() == pytest.approx([(k + 1) / 45 for k in range(9)])
    assert torch.sqrt(nine.covs[:, 0, 0]).tolist() == pytest.approx([0.3 + 0.075 * k for k in range(9)])
    g = gmm40()
    assert g.num_components == 40 and bool((g.means.abs() <= 40).all())
    assert torch.equal(g.means, gmm40().means)  # fixed seed: the same mixture every time


# ---------------------------------------------------------------------------------- bananas
def test_banana_normalised_by_2d_quadrature():
    mix = BananaMixture(
        [[-2.0, 0.0], [2.0, 1.0]], [0.3, 0.7], scales=[[1.0, 0.5], [0.8, 0.3]], curvature=[1.0, -0.5]
    )
    u = torch.linspace(-10.0, 10.0, 1001, dtype=torch.float64)
    v = torch.linspace(-25.0, 45.0, 3501, dtype=torch.float64)
    gu, gv = torch.meshgrid(u, v, indexing="ij")
    log_f = mix.log_prob(torch.stack([gu, gv], -1).reshape(-1, 2)).reshape(gu.shape)
    assert abs(trapezoid_2d(log_f, u, v)) < 1e-6


def test_banana_log_z_by_importance_sampling():
    """Proposal: the same bananas with every scale 1.2 times larger (written here from the
    definition), so p/q <= 1.2^dim; log Z of as_target() is log_normalizer."""
    mix = banana_mixture(dim=6, log_normalizer=-1.5)
    gen = torch.Generator().manual_seed(7)
    n, wide = 20_000, 1.2 * mix.scales
    comp = torch.multinomial(mix.weights, n, replacement=True, generator=gen)
    z = wide[comp] * torch.randn(n, 6, generator=gen, dtype=torch.float64)
    shift = lambda s1, b, z1: b * (z1**2 - s1**2)  # noqa: E731
    x = z.clone()
    x[:, 1] += shift(mix.scales[comp, 0], mix.curvature[comp], z[:, 0])
    x += mix.means[comp]
    y = x[:, None, :] - mix.means[None]  # (n, K, d)
    zk = y.clone()
    zk[..., 1] -= shift(mix.scales[:, 0], mix.curvature, y[..., 0])
    log_q = torch.logsumexp(
        torch.log(mix.weights) + torch.distributions.Normal(0.0, wide).log_prob(zk).sum(-1), -1
    )
    est, se = is_log_z(mix.as_target().log_prob(x), log_q)
    assert abs(est + 1.5) < 4 * se
    assert abs(est + 1.4) > 4 * se  # off by 0.1: rejected


def test_banana_draws_match_exact_moments_and_weights():
    mix = banana_mixture(dim=4)
    x = mix.sample(100_000, torch.Generator().manual_seed(8))
    comp = mix.assign(x)
    onehot = torch.nn.functional.one_hot(comp, 2).double()
    centred = x - mix.mean
    checks = [
        zscore(x, mix.mean),
        zscore(centred**2, torch.diagonal(mix.cov)),
        zscore(centred[:, :1] * centred[:, 1:2], mix.cov[0, 1]),
        zscore(onehot, mix.weights),
    ]
    assert max(float(c.abs().max()) for c in checks) < Z
    # within the heavy mode the twisted coordinate has variance s2^2 + 2 b^2 s1^4 = 0.25 + 2
    heavy = x[comp == 0] - mix.means[0]
    assert abs(float(zscore(heavy[:, 1:2] ** 2, 2.25))) < Z
    wrong = banana_mixture(dim=4, curvature=(0.8, -0.8)).sample(100_000, torch.Generator().manual_seed(8))
    assert float(zscore((wrong - mix.mean)[:, 1:2] ** 2, mix.cov[1, 1]).abs()) > 10  # rejected
    lp, grad = mix.as_target(dtype=torch.float64).log_prob_and_grad(x[:200])
    assert torch.isfinite(grad).all() and torch.isfinite(lp).all()


def test_banana_through_mala():
    mix = BananaMixture([[0.0, 0.0, 0.0]], scales=[[1.0, 0.5, 0.5]], curvature=0.5)
    target = mix.as_target(dtype=torch.float64)
    idata = ds.sample(target, "mala", num_samples=300, num_chains=4, seed=0, progress=False)
    draws = torch.as_tensor(idata.posterior["x"].values)
    assert draws.shape == (4, 300, 3)
    lp = torch.as_tensor(idata.sample_stats["lp"].values)
    torch.testing.assert_close(lp.reshape(-1), mix.log_prob(draws.reshape(-1, 3)))
    assert idata.posterior.attrs["num_target_evals"] > 4 * 300


# ---------------------------------------------------------------------------------- logistic regression
def test_shipped_data_match_repository_copy():
    repo = Path(__file__).resolve().parents[1] / "data"
    for name, shape in [("ionosphere", (351, 33)), ("sonar", (208, 60))]:
        X, y = load_dataset(name)
        assert X.shape == shape and set(np.unique(y)) == {0.0, 1.0}
        if (repo / f"{name}.csv").exists():
            table = np.loadtxt(repo / f"{name}.csv", delimiter=",", skiprows=1)
            np.testing.assert_array_equal(np.column_stack([X, y]), table)
    assert ionosphere().dim == 34 and sonar().dim == 61
    Xs = sonar().X[:, 1:]
    torch.testing.assert_close(Xs.mean(0), torch.zeros(60, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(Xs.std(0, unbiased=False), torch.ones(60, dtype=torch.float64))


def test_logistic_log_prob_and_gradient_are_exact():
    post = ionosphere(prior_scale=2.0)
    gen = torch.Generator().manual_seed(9)
    beta = 0.3 * torch.randn(7, post.dim, generator=gen, dtype=torch.float64)
    logits = beta @ post.X.T
    expected = torch.distributions.Bernoulli(logits=logits).log_prob(post.y).sum(
        -1
    ) + torch.distributions.Normal(
        torch.tensor(0.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    ).log_prob(beta).sum(-1)
    torch.testing.assert_close(post.log_prob(beta), expected, rtol=1e-12, atol=1e-10)
    target = post.as_target(dtype=torch.float64)
    _, grad = target.log_prob_and_grad(beta)
    torch.testing.assert_close(
        grad, (post.y - torch.sigmoid(logits)) @ post.X - beta / 4.0, rtol=1e-10, atol=1e-10
    )
    assert target.num_target_evals == 7


def test_logistic_shards_multiply_to_the_posterior():
    post = sonar()
    shards = post.split(4, generator=torch.Generator().manual_seed(10))
    assert sum(s.num_data for s in shards) == post.num_data
    beta = torch.randn(5, post.dim, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    diff = sum(s.log_prob(beta) for s in shards) - post.log_prob(beta)
    assert float(diff.max() - diff.min()) < 1e-9  # constant in beta: the product is the posterior
    wrong = [
        LogisticRegression(s.X, s.y, post.prior_scale, intercept=False) for s in shards
    ]  # full prior each
    diff = sum(s.log_prob(beta) for s in wrong) - post.log_prob(beta)
    assert float(diff.max() - diff.min()) > 1.0  # rejected
    target = post.as_target(reference=post.prior(), dtype=torch.float64)
    assert target.reference_log_prob(beta).shape == (5,)


def test_logistic_generic_data_and_bad_input():
    gen = torch.Generator().manual_seed(12)
    X = torch.randn(50, 2, generator=gen, dtype=torch.float64)
    y = (X[:, 0] > 0).double()
    post = LogisticRegression(X, y, prior_scale=1.5, intercept=False)
    assert post.dim == 2
    lp = post.as_target(dtype=torch.float32).log_prob(torch.zeros(3, 2))  # float32 works
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all()
    with pytest.raises(ValueError, match="constant"):
        LogisticRegression(torch.ones(10, 1), torch.zeros(10), standardize=True)
    with pytest.raises(ValueError, match="0/1"):
        LogisticRegression(X, 2 * y)
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("iris")


def test_isotropic_fast_path_equals_the_general_path():
    """The isotropic shortcut of GaussianMixture gives the same density and score as the
    triangular-solve path (float64), and full covariances do not take it."""
    from diffstat.targets import GaussianMixture

    gen = torch.Generator().manual_seed(0)
    means = torch.randn(3, 5, generator=gen, dtype=torch.float64) * 2
    iso = GaussianMixture(means, [0.5, 0.3, 0.2], scales=[0.5, 1.0, 0.7])
    general = GaussianMixture(means, [0.5, 0.3, 0.2], scales=[0.5, 1.0, 0.7])
    general.iso_var = None
    x = torch.randn(200, 5, generator=gen, dtype=torch.float64) * 2
    torch.testing.assert_close(iso.log_prob(x), general.log_prob(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(iso.score(x), general.score(x), rtol=0, atol=1e-12)
    cov = torch.eye(5, dtype=torch.float64) + 0.3
    assert GaussianMixture(means[:1], covs=cov[None]).iso_var is None
    assert (
        GaussianMixture(means[:1], covs=torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))[None]).iso_var
        is None
    )


@pytest.mark.parametrize("weights", [[0.5, -0.1], [0.0, 0.0], [1.0, 2.0, 3.0]])
def test_mixtures_reject_bad_weights(weights):
    means = [[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(means, weights, scales=[1.0, 1.0])
    with pytest.raises(ValueError, match="weights"):
        BananaMixture(means, weights)


def test_gaussian_mixture_moments_match_exact_draws(generator):
    """The shared mixture moments (mean, covariance) against 200k exact draws, within 5 MCSE."""
    mix = GaussianMixture(
        [[-2.0, 0.0], [1.0, 1.0]], [0.3, 0.7], covs=[[[1.0, 0.5], [0.5, 1.0]], [[0.25, 0.0], [0.0, 2.0]]]
    )
    x = mix.sample(200_000, generator)
    mcse = x.std(0) / math.sqrt(x.shape[0])
    assert ((x.mean(0) - mix.mean).abs() < 5 * mcse).all()
    centred = x - mix.mean
    products = centred[:, :, None] * centred[:, None, :]  # unbiased for the covariance, entrywise
    cov_se = products.std(0) / math.sqrt(x.shape[0])
    assert ((products.mean(0) - mix.cov).abs() < 5 * cov_se).all()
    wrong = GaussianMixture(mix.means, mix.weights.flip(0), covs=mix.covs)
    assert not ((x.mean(0) - wrong.mean).abs() < 5 * mcse).all()
