"""The diffusion sampler's SMC bridge (``diffstat/diffusion/bridge.py``): where every importance round
misses, adaptive tempered SMC from the rounds' Gaussian mixture to the target gives the answer; where
the bridge itself is starved, the run still warns.

The end-to-end runs use ``method="gaussian_is"`` (the same pipeline as ``"diffusion"`` without a
score model to train) on a 40-d Gaussian with correlation 0.9 and scales 0.5 to 2, whose exact log Z
(0), means and sds are known; 256 proposals a round make every importance round miss (Pareto k about
0.9, Kish ESS below 20).
"""

import math
import warnings

import numpy as np
import pytest
import torch

import diffstat as ds
from diffstat.diffusion.bridge import (
    FIT_MARGIN,
    LAPLACE_NEWTON_STEPS,
    ProposalDistribution,
    bridge_now,
    smc_bridge,
    with_laplace,
)
from diffstat.diffusion.gaussians import GaussianMixtureProposal
from diffstat.diffusion.importance import MAX_PARETO_K, MIN_ROUND_ESS

DIM = 40
SCALES = torch.linspace(0.5, 2.0, DIM, dtype=torch.float64)
COV = (0.9 * torch.ones(DIM, DIM, dtype=torch.float64) + 0.1 * torch.eye(DIM, dtype=torch.float64)) * (
    SCALES[:, None] * SCALES[None]
)
MEAN = torch.linspace(-1.0, 1.0, DIM, dtype=torch.float64)
#: Small rounds: every importance round misses on the 40-d Gaussian.
FEW = dict(
    num_explore=200,
    screen_ratio=1,
    smc_explore=0,
    explore_steps=10,
    chains_per_mode=32,
    refresh_chains=32,
    num_proposals=256,
    max_rounds=2,
)


def _gaussian_target(shift: float = 0.0) -> ds.Target:
    gauss = torch.distributions.MultivariateNormal(MEAN, COV)
    return ds.Target(lambda x: gauss.log_prob(x) + shift, DIM, dtype=torch.float64)


def test_proposal_distribution_is_the_mixture_and_a_bridge_from_the_target_is_exact():
    """Exact identities: the Distribution's density is the mixture's, its draws have the mixture's
    moments (i.i.d., 20,000 draws: mean error below 5 standard errors); and a bridge whose start is
    the target itself up to a constant reaches beta = 1 in one stage with log Z that constant
    exactly (every incremental weight equal) and a zero genealogy error."""
    means = torch.tensor([[-2.0, 0.0], [3.0, 1.0]], dtype=torch.float64)
    chols = torch.stack([torch.eye(2, dtype=torch.float64), 0.5 * torch.eye(2, dtype=torch.float64)])
    mix = GaussianMixtureProposal(means, chols, torch.tensor([0.3, 0.7], dtype=torch.float64))
    q = ProposalDistribution(mix)
    x = torch.randn(5, 2, dtype=torch.float64)
    assert torch.equal(q.log_prob(x), mix.log_prob(x))
    torch.manual_seed(0)
    draws = q.sample((20_000,))
    exact_mean = 0.3 * means[0] + 0.7 * means[1]
    sd = draws.std(0)
    assert draws.shape == (20_000, 2)
    assert ((draws.mean(0) - exact_mean).abs() < 5 * sd / math.sqrt(20_000)).all()

    chol = torch.linalg.cholesky(COV)
    start = ProposalDistribution(
        GaussianMixtureProposal(MEAN[None], chol[None], torch.ones(1, dtype=torch.float64))
    )
    out = smc_bridge(torch.Generator().manual_seed(0), _gaussian_target(3.0), start, budget=20_000)
    assert len(out.stages["beta"]) == 1 and out.log_z == pytest.approx(3.0, abs=1e-9)
    assert out.log_z_se == 0.0 and out.num_evals <= 20_000


def test_every_round_missed_and_the_bridge_gives_log_z_and_moments(monkeypatch):
    """Every importance round misses (their pooled log Z is several nats low: the old code returned
    it with a warning and ``reliable`` 0); the bridge returns log Z within 4 of its standard errors
    of the exact 0 (and not of a value 0.5 off: the check can fail), means within 4 Monte Carlo
    errors (counting the surviving Eves, at most the draws, as the effective sample size) and sds
    within 15%, without a warning, within 1,000,000 evaluations."""
    # the diagonal restocking alone (without restock.laplace_frames), whose rounds miss here
    monkeypatch.setattr("diffstat.diffusion.rounds.laplace_frames", lambda target, bank: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        idata = ds.sample(_gaussian_target(), "gaussian_is", num_samples=1000, seed=0, progress=False, **FEW)
    a, group = idata.posterior.attrs, idata["diffusion"]
    k, ess = group["pareto_k"].values, group["ess"].values
    assert ((k > MAX_PARETO_K) | (ess < MIN_ROUND_ESS)).all()  # every importance round missed
    assert a["correction"] == "smc" and a["reliable"] == 1
    assert a["importance_log_normalizer"] < -1.0  # what importance sampling alone gave
    se = a["log_normalizer_se"]
    assert 0 < se < 0.2 and abs(a["log_normalizer"]) < 4 * se and abs(a["log_normalizer"] - 0.5) > 4 * se
    x = torch.as_tensor(idata.posterior["x"].values).reshape(-1, DIM)
    sd = COV.diagonal().sqrt()
    n_eff = min(a["bridge_eves"], 1000)
    assert ((x.mean(0) - MEAN).abs() / sd).max() < 4 / math.sqrt(n_eff)
    assert ((x.std(0) / sd - 1).abs()).max() < 0.15
    assert a["num_target_evals"] <= 1_000_000
    beta = group["bridge_beta"].values  # one row: the first round missed by its fits' error (bridge_now)
    assert beta[-1, -1] == 1.0 and a["num_rounds"] == 1 and a["rounds_stopped_early"] == 1


@pytest.mark.parametrize("starve", [dict(max_evals=10_000), dict(bridge_moves=0)])
def test_a_starved_bridge_still_warns(starve):
    """A bridge left 3,000 evaluations (128 particles that can hardly move) or no moves at all
    degenerates (few surviving Eves, duplicated draws, a last stage that did not move): it warns,
    naming the bridge's own failure, and ``reliable`` is 0."""
    with pytest.warns(RuntimeWarning, match="SMC bridge"):
        idata = ds.sample(
            _gaussian_target(), "gaussian_is", num_samples=200, seed=0, progress=False, **FEW, **starve
        )
    a = idata.posterior.attrs
    assert a["correction"] == "smc" and a["reliable"] == 0
    assert a["num_target_evals"] <= starve.get("max_evals", 1_000_000)


def test_with_laplace_adds_the_exact_gaussian_at_half_of_each_modes_weight():
    """On the 40-d correlated Gaussian the Laplace component is the target itself, inflated: its mean
    is the exact mean and its covariance ``inflate`` times the exact covariance (to 1e-8), from a
    moment Gaussian centred 0.5 off; the moment Gaussian keeps half the weight. A log-density whose
    Hessian is not negative definite there (a saddle of x_0^2 - x_1^2) leaves the mixture as it was.
    Evaluations: 11 per mode."""
    target = _gaussian_target()
    start = GaussianMixtureProposal(
        (MEAN + 0.5)[None], torch.eye(DIM, dtype=torch.float64)[None], torch.ones(1, dtype=torch.float64)
    )
    mix = with_laplace(target, start, 1.2)
    assert mix.num_components == 2
    assert torch.allclose(mix.weights, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.allclose(mix.means[1], MEAN, atol=1e-8)
    cov = mix.chols[1] @ mix.chols[1].T
    assert torch.allclose(cov, 1.2 * COV, rtol=1e-8, atol=1e-10)
    assert target.num_target_evals == LAPLACE_NEWTON_STEPS + 1
    saddle = ds.Target(lambda x: x[:, 0] ** 2 - x[:, 1] ** 2, 2, dtype=torch.float64)
    two = GaussianMixtureProposal(
        torch.zeros(1, 2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)[None], torch.ones(1)
    )
    assert with_laplace(saddle, two, 1.2) is two


def _summary(ess: float, n: int, k: float) -> dict:
    return {"ess": ess, "num_proposals": n, "pareto_k": k}


def test_bridge_now_separates_misses_that_rounds_repeat_from_those_they_repair():
    """First rounds measured at the defaults (``docs/diffusion_sampler.md``, "Bridging after a hopeless
    round"; Kish ESS of n proposals, Pareto k, the next fit to m chains a mode): sonar (61-d, 4.5 of
    4,096, k 1.43, m 256) and a 50-d Gaussian (2.9, k 1.24), which no later round repaired, bridge
    now; ionosphere (34-d, 24.0, k 0.81), the 10-d funnel's second round (4.5 of 2,048, k 1.03, m 128)
    and the 2-d Gaussian of sd 0.001 (1 of 1,000, k infinite, m 32), which later rounds repaired or
    improved, do not, nor would ionosphere's at any ESS below 20. No finite weight (ESS 0), an ESS of
    20 or k up to 1 never stop the rounds; the boundary is at ``FIT_MARGIN`` times the floor."""
    assert bridge_now(_summary(4.51, 4096, 1.43), 61, 256) and bridge_now(_summary(2.93, 4096, 1.24), 50, 256)
    assert not bridge_now(_summary(23.97, 4096, 0.81), 34, 256)
    assert not bridge_now(_summary(19.99, 4096, 1.5), 34, 256) and not bridge_now(
        _summary(1.0, 4096, 9), 34, 256
    )
    assert not bridge_now(_summary(4.5, 2048, 1.03), 10, 128) and not bridge_now(
        _summary(1.0, 1000, math.inf), 2, 32
    )
    for ess, k in ((0.0, math.nan), (20.0, 1.43), (4.51, 1.0)):
        assert not bridge_now(_summary(ess, 4096, k), 61, 256)
    floor = 40 * 43 / (2 * 256)
    assert bridge_now(_summary(256 * math.exp(-0.99 * FIT_MARGIN * floor), 256, 2.0), 40, 256)
    assert not bridge_now(_summary(256 * math.exp(-1.01 * FIT_MARGIN * floor), 256, 2.0), 40, 256)


def test_a_round_that_missed_by_its_fits_error_leaves_the_rounds_budget_to_the_bridge(monkeypatch):
    """On the 40-d Gaussian with three rounds allowed (seed 3), the first round misses by far (k 1.20,
    Kish ESS 2.7) and by less than its Gaussian fit's sampling error (bridge_now): the rounds stop
    after it (the code before ran all three, each missing) and the bridge is right with what they
    left; the narrow 2-d Gaussian, whose first round missed by thousands of nats, still runs both its
    rounds before the bridge, whose stages fill the last row of the per-round records."""
    # the diagonal restocking alone (without restock.laplace_frames), whose rounds miss here
    monkeypatch.setattr("diffstat.diffusion.rounds.laplace_frames", lambda target, bank: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        idata = ds.sample(
            _gaussian_target(),
            "gaussian_is",
            num_samples=500,
            seed=3,
            progress=False,
            **(FEW | {"max_rounds": 3}),
        )
    a = idata.posterior.attrs
    assert a["num_rounds"] == 1 and a["rounds_stopped_early"] == 1 and a["correction"] == "smc"
    assert a["reliable"] == 1 and abs(a["log_normalizer"]) < 4 * a["log_normalizer_se"]
    assert a["num_target_evals"] <= 1_000_000
    center = torch.full((2,), 3.0, dtype=torch.float64)
    narrow = ds.Target(lambda x: -0.5 * (((x - center.to(x)) / 1e-3) ** 2).sum(-1), 2, dtype=torch.float64)
    tiny = dict(smc_explore=0, screen_ratio=1, num_explore=100, explore_steps=3, restock_steps=2)
    tiny |= dict(chains_per_mode=16, refresh_chains=32, num_proposals=1000, max_rounds=2, refresh_steps=5)
    idata = ds.sample(narrow, "gaussian_is", num_samples=200, seed=0, progress=False, **tiny)
    a, beta = idata.posterior.attrs, idata["diffusion"]["bridge_beta"].values
    assert a["num_rounds"] == 2 and a["rounds_stopped_early"] == 0 and a["correction"] == "smc"
    assert np.isnan(beta[0]).all() and beta[-1, -1] == 1.0
