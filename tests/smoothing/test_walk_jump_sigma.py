"""Walk-jump's noise with a learned score whose network failed its check (walk_jump_setup.py, ``walk_sigma``
and ``kernel_noise``): when the walk at 1 moves the walkers' spread, the walk moves to the score's
``kernel_sigma``, where the score is the kernel estimate of the kept particles, and the draws are the
target's; at the network's noise (sigma given) the same run is wrong, so the test can fail. A score that
passed its check, or one whose walk kept the spread, keeps the default noise."""

import math
import warnings

import pytest
import torch

import diffstat as ds
from diffstat.diffusion.processes import VE
from diffstat.smoothing import LearnedSmoothedScore

#: ArviZ warns when there are more chains than draws: intended here (independent runs).
pytestmark = pytest.mark.filterwarnings("ignore:More chains")

DIM = 4
SCALES = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
PROCESS = VE(sigma_min=0.01, sigma_max=20.0)


class Outward(torch.nn.Module):
    """A network whose score points away from the centre, s(u, t) = u: wrong at every noise."""

    def forward(self, u, t):
        return u.clone()


class Exact(torch.nn.Module):
    """The exact smoothed score of N(0, diag(SCALES^2)) (centre 0, scale 1): passes the check."""

    def forward(self, u, t):
        return -u / (SCALES.to(u) ** 2 + PROCESS.sigma(t)[:, None] ** 2)


def target() -> ds.Target:
    return ds.Target(lambda x: -0.5 * ((x / SCALES) ** 2).sum(-1), DIM, dtype=torch.float64)


class SmallNoiseOff(torch.nn.Module):
    """Exact at noise 0.5 and above, below it the smoothed score of noise 0.7: fails the check (at the
    smallest trained noise) and is right at the walk's noise."""

    def forward(self, u, t):
        sigma = PROCESS.sigma(t)[:, None]
        sigma = torch.where(sigma < 0.5, torch.full_like(sigma, 0.7), sigma)
        return -u / (SCALES.to(u) ** 2 + sigma**2)


def score(model, kernel_sigma: float) -> LearnedSmoothedScore:
    """Exact draws as the kept particles (2,000) and the held-out ones (256, with the target's score and
    log-density), as a fit keeps them."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2256, DIM, generator=gen, dtype=torch.float64) * SCALES
    g = -x / SCALES**2
    lp = -0.5 * ((x / SCALES) ** 2).sum(-1)
    parts = {"x": x[:2000], "grad": g[:2000], "held_x": x[2000:], "held_grad": g[2000:], "held_lp": lp[2000:]}
    return LearnedSmoothedScore(
        model, PROCESS, center=torch.zeros(DIM), scale=1.0, variance=4.0, particles=parts,
        info={"kernel_sigma": kernel_sigma},
    )  # fmt: skip


def run(smoothed_score, **options):
    idata = ds.sample(
        target(), "walk_jump", num_samples=500, num_chains=4, seed=3, progress=False,
        smoothed_score=smoothed_score, **options,
    )  # fmt: skip
    x = torch.as_tensor(idata.posterior["x"].values).reshape(-1, DIM)
    return x, idata.posterior.attrs, idata.sample_stats["diverging"].values


def test_failed_network_walks_at_the_kernel_noise():
    """The Outward network fails its check: the default walk runs at kernel_sigma 1.5 (attrs, a warning) and
    the 2,000 draws have the target's means and sds (4 standard errors: the draws are independent jumps of
    walkers started at resampled particles, so a few repeat a particle's neighbourhood; 6 for the sds);
    at sigma = 1, given, the network drives the walk and the draws are wrong (sds up to three times the
    target's, unmarked: the tail holds the walkers within the particles' bounds)."""
    bad = score(Outward(), 1.5)
    with pytest.warns(RuntimeWarning, match="walk ran again at sigma = 1.5"):
        x, attrs, div = run(bad)
    assert (
        attrs["sigma"] == 1.5 and attrs["sigma_rule"] == "kernel" and attrs["score_fisher_divergence"] > 0.1
    )
    n = x.shape[0]
    assert div.sum() == 0 and torch.isfinite(x).all()
    assert ((x.mean(0) / SCALES).abs() < 4 / math.sqrt(n)).all()
    assert ((x.std(0) / SCALES - 1).abs() < 6 / math.sqrt(2 * n)).all()
    with pytest.warns(RuntimeWarning, match="far from the target's at small noise"):
        x1, attrs1, _ = run(bad, sigma=1.0)
    assert attrs1["sigma"] == 1.0 and attrs1["sigma_rule"] == "given"
    assert (x1.std(0) / SCALES - 1).abs().max() > 20 / math.sqrt(2 * n)


def test_passed_network_keeps_the_default_noise():
    """The exact network passes its check: the default noise stays 1 (the network serves), no warning about
    the noise, and the draws are the target's."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x, attrs, div = run(score(Exact(), 1.5))
    assert (
        attrs["sigma"] == 1.0 and attrs["sigma_rule"] == "default" and attrs["score_fisher_divergence"] < 0.1
    )
    assert not [w for w in caught if "walk runs at sigma" in str(w.message)]
    n = x.shape[0]
    assert div.sum() == 0
    assert ((x.mean(0) / SCALES).abs() < 4 / math.sqrt(n)).all()
    assert ((x.std(0) / SCALES - 1).abs() < 6 / math.sqrt(2 * n)).all()


def test_failed_check_but_steady_walk_keeps_the_default_noise():
    """A network off at small noise only: the check fails, the walk at 1 keeps the walkers' spread (distance
    under 0.1), so the noise stays 1 (rule "checked") and the draws are the target's."""
    with pytest.warns(RuntimeWarning, match="far from the target's at small noise"):
        x, attrs, div = run(score(SmallNoiseOff(), 1.5))
    assert attrs["score_fisher_divergence"] > 0.1 and attrs["walk_spread_drift"] < 0.1
    assert attrs["sigma"] == 1.0 and attrs["sigma_rule"] == "checked"
    n = x.shape[0]
    assert div.sum() == 0
    assert ((x.mean(0) / SCALES).abs() < 4 / math.sqrt(n)).all()
    assert ((x.std(0) / SCALES - 1).abs() < 6 / math.sqrt(2 * n)).all()
