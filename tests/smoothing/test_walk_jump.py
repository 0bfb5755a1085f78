"""Walk-jump: the law of the jumps on a Gaussian (closed form), mode weights with a training-free
score, and rejections (a walk that cannot cross, a wrong smoothed score)."""

import math

import pytest
import torch

import diffstat as ds
from diffstat.smoothing import isotropic_mixture_smoothed_score
from diffstat.smoothing.walk_jump import walk_jump
from diffstat.targets import GaussianMixture
from diffstat.targets.two_modes import two_modes

#: ArviZ warns when there are more chains than draws: intended here (independent runs).
pytestmark = pytest.mark.filterwarnings("ignore:More chains")

HEAVY = 2.0 / 3.0


def fast_target(gm: GaussianMixture) -> ds.Target:
    """The isotropic two-mode mixture from its log-density only (fast closed form)."""
    d = gm.dim
    means, log_w = gm.means, torch.log(gm.weights)

    def log_prob(x):
        sq = ((x[:, None, :] - means) ** 2).sum(-1)
        return torch.logsumexp(log_w - 0.5 * sq / 0.05 - 0.5 * d * math.log(2 * math.pi * 0.05), -1)

    return ds.Target(log_prob, d, dtype=torch.float64)


def heavy_weight(gm, idata):
    x = torch.as_tensor(idata.posterior["x"].values).reshape(-1, gm.dim)
    return float((gm.assign(x) == 0).double().mean())


@pytest.mark.parametrize("walk", ["underdamped", "mala"])
def test_jumps_gaussian_closed_form(walk):
    r"""For X ~ N(mu, tau^2 I), Y ~ N(mu, (tau^2 + sigma^2) I) and the jump
    E[X | Y] = mu + tau^2 (Y - mu) / (tau^2 + sigma^2) ~ N(mu, tau^4 / (tau^2 + sigma^2) I).
    The last jump of each of 2000 independent walkers: mean and variance within 4 MC sd. BAOAB is
    exact in position for a Gaussian; the MH walk (smoothed_log_prob) is exact for any target."""
    mu = torch.tensor([0.5, -1.0], dtype=torch.float64)
    tau2, sigma = 0.8, 1.0
    gm = GaussianMixture(mu[None], torch.ones(1), scales=[math.sqrt(tau2)])
    smoothed = gm.noised(1.0, sigma)
    options = (
        dict(smoothed_log_prob=lambda y, s: smoothed.log_prob(y))
        if walk == "mala"
        else dict(estimator="laplace")
    )
    idata = ds.sample(
        gm.as_target(dtype=torch.float64),
        "walk_jump",
        num_samples=5,
        num_chains=2000,
        seed=2,
        progress=False,
        sigma=sigma,
        walk=walk,
        num_warmup=60,
        thin=4,
        **options,
    )
    x = torch.as_tensor(idata.posterior["x"].values)[:, -1]
    n = x.shape[0]
    var = tau2**2 / (tau2 + sigma**2)
    assert ((x.mean(0) - mu).abs() / math.sqrt(var / n) < 4).all(), x.mean(0)
    assert ((x.var(0) / var - 1).abs() < 4 * math.sqrt(2 / n)).all(), x.var(0)
    if walk == "mala":
        assert 0.3 < float(idata.sample_stats["acceptance_rate"].mean()) < 0.95


def test_walk_jump_training_free_two_modes_d8():
    """From the log-density only, sigma = 2, 500 walkers all started in the light mode: the jumps put
    the heavy weight within 0.1 of 2/3 (MC sd about 0.02 with autocorrelation)."""
    gm = two_modes(8)
    idata = ds.sample(
        fast_target(gm),
        "walk_jump",
        num_samples=50,
        num_chains=500,
        seed=4,
        progress=False,
        sigma=2.0,
        num_warmup=100,
        init=gm.means[1],
        estimator="laplace",
    )
    weight = heavy_weight(gm, idata)
    assert abs(weight - HEAVY) < 0.1, weight
    attrs = idata.posterior.attrs
    assert attrs["smoothed_score"] == "LaplaceSmoothedScore" and attrs["num_hessian_evals"] > 0
    assert idata.walk_jump["num_modes"].shape == (50,)
    assert float(idata.walk_jump["num_modes"].mean()) > 1.0  # bimodal posteriors are met


def test_walk_jump_rejections():
    """The same check rejects a walk whose sigma is too small to cross (sigma = 0.5 from the light
    mode: weight 0), and a walk driven by the smoothed score of the wrong mixture (weights 1:2)."""
    gm = two_modes(8)
    exact = isotropic_mixture_smoothed_score(
        gm.means, gm.weights, torch.full((2,), 0.05, dtype=torch.float64)
    )
    stuck = ds.sample(
        fast_target(gm),
        "walk_jump",
        num_samples=20,
        num_chains=300,
        seed=4,
        progress=False,
        sigma=0.5,
        num_warmup=100,
        init=gm.means[1],
        smoothed_score=exact,
    )
    assert abs(heavy_weight(gm, stuck) - HEAVY) > 0.1
    wrong_gm = two_modes(8, weights=(1.0, 2.0))
    wrong = isotropic_mixture_smoothed_score(
        wrong_gm.means, wrong_gm.weights, torch.full((2,), 0.05, dtype=torch.float64)
    )
    idata = ds.sample(
        fast_target(gm),
        "walk_jump",
        num_samples=20,
        num_chains=300,
        seed=4,
        progress=False,
        sigma=2.0,
        num_warmup=100,
        init=gm.means[1],
        smoothed_score=wrong,
    )
    assert abs(heavy_weight(gm, idata) - HEAVY) > 0.1
    right = ds.sample(
        fast_target(gm),
        "walk_jump",
        num_samples=20,
        num_chains=300,
        seed=4,
        progress=False,
        sigma=2.0,
        num_warmup=100,
        init=gm.means[1],
        smoothed_score=exact,
    )
    assert abs(heavy_weight(gm, right) - HEAVY) < 0.1


def test_chains_of_walkers():
    """``walkers_per_chain`` W: a chain's draws are its own W walkers' jumps in turn, trimmed to
    ``num_samples``. Two chains started in the two modes (16 apart, sigma 0.5: no walker crosses): every
    draw of a chain lies in its own mode, and the shape is (num_chains, num_samples) however W divides it."""
    gm = two_modes(8)
    exact = isotropic_mixture_smoothed_score(
        gm.means, gm.weights, torch.full((2,), 0.05, dtype=torch.float64)
    )
    for num_samples in (6, 7):
        idata = ds.sample(
            fast_target(gm),
            "walk_jump",
            num_samples=num_samples,
            num_chains=2,
            walkers_per_chain=3,
            seed=0,
            progress=False,
            sigma=0.5,
            num_warmup=20,
            init=gm.means,
            smoothed_score=exact,
        )
        x = torch.as_tensor(idata.posterior["x"].values)
        assert x.shape == (2, num_samples, 8) and idata.posterior.attrs["walkers_per_chain"] == 3
        comp = gm.assign(x.reshape(-1, 8)).reshape(2, num_samples)
        assert (comp[0] == 0).all() and (comp[1] == 1).all()
        assert idata.sample_stats["diverging"].shape == (2, num_samples)


def test_walk_jump_bad_input(generator):
    target = GaussianMixture(torch.zeros(1, 2), torch.ones(1), scales=[1.0]).as_target(dtype=torch.float64)
    for options in (
        dict(walk="mala"),
        dict(walk="hmc"),
        dict(sigma=0.0),
        dict(thin=0),
        dict(init=torch.zeros(3)),
        dict(walkers_per_chain=0),
    ):
        with pytest.raises(ValueError):
            walk_jump(target, num_samples=4, num_chains=2, generator=generator, **options)
