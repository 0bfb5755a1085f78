"""The SMC to the exact product of shard log-densities: skewed shards that disagree, whose product
is known in closed form (log-gamma variables), reached from a badly placed Gaussian start."""

import math

import pytest
import torch

import diffstat as ds
from diffstat.dnc.exact_smc import exact_product_smc, laplace_refine, sum_of_log_probs

# shard k: log p_k(y) = a_k y - b_k e^y per coordinate (the log of a Gamma(a_k, b_k) variable);
# the product is log Gamma(A, B), A = sum a_k, B = sum b_k: mean digamma(A) - log B, variance trigamma(A).
A_K = torch.tensor([[0.6, 2.0], [3.0, 0.5], [1.2, 1.5], [0.2, 0.4]], dtype=torch.float64)
B_K = torch.tensor([[5.0, 0.2], [0.1, 3.0], [1.0, 0.5], [0.4, 0.1]], dtype=torch.float64)
MIX = torch.tensor([[1.0, 0.0], [0.8, 0.6]], dtype=torch.float64)  # x = MIX y: correlated coordinates


class LogGammaShard:
    """log p_k(x) with y = MIX^{-1} x (a constant Jacobian)."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def __call__(self, x):
        y = torch.linalg.solve(MIX, x.T).T
        return (self.a * y - self.b * torch.exp(y)).sum(-1)


def _exact_moments(a_k=A_K, b_k=B_K):
    a, b = a_k.sum(0), b_k.sum(0)
    mean_y = torch.digamma(a) - torch.log(b)
    var_y = torch.polygamma(1, a)
    return MIX @ mean_y, MIX @ torch.diag(var_y) @ MIX.T


def _z_scores(x, mean, cov, n_eff):
    return (x.mean(0) - mean) / torch.sqrt(torch.diagonal(cov) / n_eff)


def _run(shards, seed, n=2000, laplace=False):
    gen = torch.Generator().manual_seed(seed)
    mean, cov = _exact_moments()
    # a start 3 sds off in both coordinates and half as wide: the product lives in its tail
    start = mean + 3 * torch.sqrt(torch.diagonal(cov))
    return exact_product_smc(gen, shards, start, 0.25 * cov, n, laplace=laplace)


def test_laplace_refine_finds_the_exact_mode_and_curvature():
    """log Gamma(A, B) per coordinate: mode y = log(A / B), Hessian -A; from a start 3 sds off."""
    shards = [LogGammaShard(a, b) for a, b in zip(A_K, B_K)]
    mean, cov = _exact_moments()
    mode, lap_cov, evals = laplace_refine(
        sum_of_log_probs(shards), mean + 3 * torch.sqrt(torch.diagonal(cov)), cov
    )
    a, b = A_K.sum(0), B_K.sum(0)
    assert torch.allclose(mode, MIX @ torch.log(a / b), atol=1e-8)
    assert torch.allclose(lap_cov, MIX @ torch.diag(1 / a) @ MIX.T, rtol=1e-5)
    assert 0 < evals < 200
    # not log-concave (a bimodal product): the start comes back unchanged
    bimodal = [
        lambda x: torch.logsumexp(
            torch.stack([-0.5 * ((x - 2) ** 2).sum(-1), -0.5 * ((x + 2) ** 2).sum(-1)]), 0
        )
    ]
    eye = torch.eye(2, dtype=torch.float64)
    m0, c0, _ = laplace_refine(sum_of_log_probs(bimodal), torch.zeros(2, dtype=torch.float64), eye)
    assert torch.equal(m0, torch.zeros(2, dtype=torch.float64)) and torch.equal(c0, eye)


def test_smc_reaches_the_exact_skewed_product():
    shards = [LogGammaShard(a, b) for a, b in zip(A_K, B_K)]
    x, lp, info = _run(shards, seed=0)
    mean, cov = _exact_moments()
    # resampled, moved particles are correlated: count a quarter of them as independent
    assert _z_scores(x, mean, cov, 500).abs().max() < 4.0
    sd_ratio = torch.sqrt(torch.diagonal(torch.cov(x.T)) / torch.diagonal(cov))
    assert ((sd_ratio - 1).abs() < 0.1).all()
    # the first coordinate is skewed to the left (log-gamma): skewness -psi''(A)/psi'(A)^1.5
    a = A_K.sum(0)[0]
    skew_exact = float(torch.polygamma(2, a) / torch.polygamma(1, a) ** 1.5)
    c = x[:, 0] - x[:, 0].mean()
    skew = float((c**3).mean() / (c**2).mean() ** 1.5)
    # skewness sd about sqrt(6 / 500) = 0.11; a Gaussian (skewness 0) would fail
    assert abs(skew - skew_exact) < 0.35 and skew_exact < -0.4
    assert info["betas"][-1] == 1.0 and info["num_stages"] >= 2
    assert torch.allclose(lp, sum_of_log_probs(shards)(x)[0])
    # log Z of the product: prod_j Gamma(A_j) / B_j^A_j (the Jacobian |det MIX| = 0.6 included)
    a_all, b_all = A_K.sum(0), B_K.sum(0)
    log_z = float((torch.lgamma(a_all) - a_all * torch.log(b_all)).sum()) + math.log(0.6)
    assert abs(info["log_normalizer"] - log_z) < 0.1


def test_smc_rejects_a_wrong_product():
    """A product that is missing one shard moves the mean far beyond the tolerance above."""
    shards = [LogGammaShard(a, b) for a, b in zip(A_K[1:], B_K[1:])]
    x, _, _ = _run(shards, seed=0)
    mean, cov = _exact_moments()
    assert _z_scores(x, mean, cov, 500).abs().max() > 4.0


def test_combine_diffusion_with_log_probs_is_exact_and_reproducible():
    """The front: ``combine(..., "diffusion", log_probs=...)`` draws the exact product without any fit,
    from shard draws whose Gaussian product is off; the same seed gives the same draws."""
    gen = torch.Generator().manual_seed(3)
    shards = [LogGammaShard(a, b) for a, b in zip(A_K, B_K)]
    draws = []
    for a, b in zip(A_K, B_K):  # exact shard draws: y = log Gamma(a, b)
        y = torch.log(torch._standard_gamma(a.expand(800, 2).contiguous(), generator=gen)) - torch.log(b)
        draws.append(y @ MIX.T)
    kwargs = dict(num_samples=2000, seed=4, progress=False, log_probs=shards)
    idata = ds.dnc.combine(draws, "diffusion", **kwargs)
    x = torch.as_tensor(idata.posterior["x"].values).reshape(-1, 2)
    mean, cov = _exact_moments()
    assert _z_scores(x, mean, cov, 500).abs().max() < 4.0
    attrs = idata.posterior.attrs
    assert attrs["exact_final_target"] == 1 and attrs["fit_time"] == 0.0 and attrs["num_shard_evals"] > 0
    gauss = ds.dnc.combine(draws, "gaussian", num_samples=2000, seed=4, progress=False)
    xg = torch.as_tensor(gauss.posterior["x"].values).reshape(-1, 2)
    assert _z_scores(xg, mean, cov, 2000).abs().max() > 4.0  # the Gaussian product is measurably off
    again = ds.dnc.combine(draws, "diffusion", **kwargs)
    assert (again.posterior["x"].values == idata.posterior["x"].values).all()


def test_log_probs_count_is_checked():
    x = [torch.randn(50, 2, dtype=torch.float64) for _ in range(3)]
    with pytest.raises(ValueError, match="log_probs must hold 3"):
        ds.dnc.combine(
            x, "diffusion", num_samples=10, seed=0, progress=False, log_probs=[LogGammaShard(1.0, 1.0)]
        )
