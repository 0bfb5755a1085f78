"""Polynomial shard energies: exact for polynomial log-densities, and the product of skewed,
disagreeing shards recovered from their draws, scores and log-densities at the draws only."""

import numpy as np
import pytest
import torch

import diffstat as ds
from diffstat.dnc.surrogate import MAX_PRODUCT_MISFIT, fit_polynomial_shard, monomials

from tests.dnc.test_exact_smc import A_K, B_K, MIX, LogGammaShard, _exact_moments, _z_scores


def test_monomial_gradients_match_autograd():
    u = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(
        True
    )
    from diffstat.dnc.surrogate import _index_sets

    values, grads = monomials(u, _index_sets(3, 3))
    assert values.shape == (7, 3 + 6 + 10)
    for j in range(values.shape[1]):
        (g,) = torch.autograd.grad(values[:, j].sum(), u, retain_graph=True)
        torch.testing.assert_close(grads[:, :, j], g, rtol=0, atol=1e-12)


def test_fit_is_exact_for_a_cubic_log_density():
    """Values and gradients of a cubic at the draws determine it: the fit reproduces it anywhere."""
    gen = torch.Generator().manual_seed(1)
    coef = torch.randn(3, dtype=torch.float64, generator=gen)

    def cubic(x):
        return (
            -0.5 * (x**2).sum(-1)
            + coef[0] * x[:, 0] ** 3
            + coef[1] * x[:, 0] * x[:, 1] ** 2
            + coef[2] * x[:, 1]
        )

    x = torch.randn(200, 2, dtype=torch.float64, generator=gen) * 0.7 + 0.3
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(cubic(xg).sum(), xg)
    shard = fit_polynomial_shard(x, grad, cubic(x) + 5.0)
    far = torch.randn(50, 2, dtype=torch.float64, generator=gen) * 4.0  # well outside the draws
    lp, g = shard(far)
    farg = far.clone().requires_grad_(True)
    (g_exact,) = torch.autograd.grad(cubic(farg).sum(), farg)
    torch.testing.assert_close(lp, cubic(far) + 5.0, rtol=0, atol=1e-7)
    torch.testing.assert_close(g, g_exact, rtol=0, atol=1e-7)
    assert shard.misfit < 1e-9
    with pytest.raises(ValueError, match="too few"):
        fit_polynomial_shard(x[:3], grad[:3], cubic(x[:3]))


# moderately skewed shards (shapes 2.8 to 14) that disagree as RAND HIE's do: the product lies up
# to 4.0 shard sds from a shard's mean. A cubic cannot follow a log-gamma much further (with B_K
# the product lies 12.7 shard sds out, and the fitted product is 39 posterior sds off).
A2, B2 = 4 * A_K + 2, B_K**0.2


def _shard_draws(n=1500, seed=3):
    gen = torch.Generator().manual_seed(seed)
    draws = []
    for a, b in zip(A2, B2):  # exact shard draws: y = log Gamma(a, b), x = MIX y
        y = torch.log(torch._standard_gamma(a.expand(n, 2).contiguous(), generator=gen)) - torch.log(b)
        draws.append(y @ MIX.T)
    return draws


def _scores_and_values(draws):
    """Each log-gamma shard's score and log-density at its draws."""
    scores, values = [], []
    for f, x in zip([LogGammaShard(a, b) for a, b in zip(A2, B2)], draws):
        xg = x.clone().requires_grad_(True)
        lp = f(xg)
        scores.append(torch.autograd.grad(lp.sum(), xg)[0])
        values.append(lp.detach())
    return scores, values


def test_product_from_draws_scores_and_values():
    """Skewed log-gamma shards that disagree: the Gaussian product is measurably off, the cubic
    fits to each shard's draws, scores and log-densities there recover the product's mean."""
    draws = _shard_draws()
    scores, values = _scores_and_values(draws)
    mean, cov = _exact_moments(A2, B2)
    idata = ds.dnc.combine(
        draws, "diffusion", scores=scores, num_samples=2000, seed=4, progress=False, draw_log_probs=values
    )
    x = torch.as_tensor(idata.posterior["x"].values).reshape(-1, 2)
    assert idata.posterior.attrs["shard_energies"] == "polynomial of degree 3"
    assert idata.posterior.attrs["polynomial_misfit"] < MAX_PRODUCT_MISFIT  # unimodal: no warning
    assert _z_scores(x, mean, cov, 500).abs().max() < 4.0
    gauss = ds.dnc.combine(draws, "gaussian", num_samples=2000, seed=4, progress=False)
    xg = torch.as_tensor(gauss.posterior["x"].values).reshape(-1, 2)
    assert _z_scores(xg, mean, cov, 2000).abs().max() > 4.0
    # the check can fail: quadratic energies (a Gaussian per shard, fitted to the scores) are off
    # too, and their misfit at the draws says so
    with pytest.warns(RuntimeWarning, match="polynomial shard energies miss"):
        quad = ds.dnc.combine(
            draws,
            "diffusion",
            scores=scores,
            num_samples=2000,
            seed=4,
            progress=False,
            draw_log_probs=values,
            surrogate_degree=2,
        )
    xq = torch.as_tensor(quad.posterior["x"].values).reshape(-1, 2)
    assert _z_scores(xq, mean, cov, 500).abs().max() > 4.0


def test_combine_takes_log_probs_from_inputs_that_carry_them():
    """``ds.dnc.combine(..., "diffusion")`` given ShardResults, or InferenceData with
    ``sample_stats.lp`` and scores, fits cubic shard energies to the carried log-densities: the
    same draws as passing ``draw_log_probs`` by hand. ``draw_log_probs=None`` opts out (the
    learned energies; a few training steps here), and a carried log-density that does not match
    the draws is refused."""
    import arviz as az

    from diffstat.dnc.tasks import ShardResult

    draws = _shard_draws()
    scores, values = _scores_and_values(draws)
    kwargs = dict(num_samples=500, seed=4, progress=False)
    by_hand = ds.dnc.combine(draws, "diffusion", scores=scores, draw_log_probs=values, **kwargs)
    results = [ShardResult(k, x, g, v, 0, 0.0) for k, (x, g, v) in enumerate(zip(draws, scores, values))]
    idatas = [
        az.from_dict(
            posterior={"x": x.reshape(2, -1, 2).numpy()}, sample_stats={"lp": v.reshape(2, -1).numpy()}
        )
        for x, v in zip(draws, values)
    ]
    for inputs, extra in ((results, {}), (idatas, dict(scores=scores))):
        carried = ds.dnc.combine(inputs, "diffusion", **extra, **kwargs)
        assert carried.posterior.attrs["route"] == "cubic"
        # equal up to rounding: two identical calls differ by about 1e-12 (the least-squares fits)
        assert np.allclose(carried.posterior["x"].values, by_hand.posterior["x"].values, rtol=0, atol=1e-9)
    learned = ds.dnc.combine(
        results, "diffusion", draw_log_probs=None, num_steps=5, hidden=8, depth=1, num_levels=2,
        num_final_steps=4, calibrate=False, **kwargs,
    )  # fmt: skip
    assert learned.posterior.attrs["route"] == "learned"
    results[1].log_probs = values[1][:-1]
    with pytest.raises(ValueError, match="shard 1 carries 1499 log-densities for 1500 draws"):
        ds.dnc.combine(results, "diffusion", **kwargs)


def test_the_cubic_route_warns_where_the_shards_are_multimodal():
    """Shards whose log-densities have two modes (+-a, sd 0.5) are no polynomial: the fits miss their
    values at the draws by far more than the skewed log-gamma shards' (above), and the product
    built from them is then not trusted: a warning and ``polynomial_misfit`` in the attrs."""
    gen = torch.Generator().manual_seed(5)
    a = torch.tensor([1.5, 0.0], dtype=torch.float64)

    def two_modes(x):
        return torch.logsumexp(
            torch.stack([-((x - a) ** 2).sum(-1), -((x + a) ** 2).sum(-1)]) / (2 * 0.25), 0
        )

    draws, scores, values = [], [], []
    for _ in range(3):
        sign = torch.where(torch.rand(1500, 1, generator=gen, dtype=torch.float64) < 0.5, 1.0, -1.0)
        x = sign * a + 0.5 * torch.randn(1500, 2, generator=gen, dtype=torch.float64)
        xg = x.clone().requires_grad_(True)
        lp = two_modes(xg)
        scores.append(torch.autograd.grad(lp.sum(), xg)[0])
        draws.append(x)
        values.append(lp.detach())
    with pytest.warns(RuntimeWarning, match="polynomial shard energies miss"):
        idata = ds.dnc.combine(
            draws, "diffusion", scores=scores, draw_log_probs=values, num_samples=500, seed=0, progress=False
        )
    assert idata.posterior.attrs["polynomial_misfit"] > 2 * MAX_PRODUCT_MISFIT
