"""The diffusion sampler (method="diffusion"), its proposals and the per-mode Gaussian baseline."""

import math

import pytest
import torch

import diffstat as ds
from diffstat.tempering.auto_reference import pilot_evals
from diffstat.diffusion.networks import ScoreMLP
from diffstat.diffusion.processes import VP, noised_mixture_score
from diffstat.diffusion.proposals import (
    DefensiveMixture,
    DiffusionProposal,
    GaussianMixtureProposal,
    Whitening,
    ode_log_density,
)
from diffstat.diffusion.reverse import probability_flow
from diffstat.diffusion.sampler_config import DiffusionConfig
from diffstat.metrics import mmd
from diffstat.targets import GaussianMixture, nine_modes

LOG_Z = 1.3


def _mode_weights(mix, x):
    return torch.bincount(mix.assign(x), minlength=mix.num_components).double() / x.shape[0]


def _tv(p, q):
    return 0.5 * float((p - q).abs().sum())


def test_gaussian_mixture_proposal_density_is_exact(generator):
    mix = GaussianMixture(
        torch.tensor([[0.0, 1.0, 2.0], [30.0, -1.0, 0.5]]),
        [0.3, 0.7],
        covs=torch.stack(
            [torch.eye(3) * 0.5, torch.tensor([[1.0, 0.3, 0.0], [0.3, 2.0, 0.1], [0.0, 0.1, 0.7]])]
        ),
    )
    prop = GaussianMixtureProposal(mix.means, mix.chol, mix.weights)
    x = prop.sample(1000, generator)
    assert torch.allclose(prop.log_prob(x), mix.log_prob(x), atol=1e-12)
    # stratified counts: exactly round(w_k n) draws per component
    assert torch.bincount(mix.assign(x), minlength=2).tolist() == [300, 700]


def test_ode_log_density_with_the_exact_score():
    """Forward ODE with the exact noised-mixture score returns the exact density at t_min, and
    agrees with the reverse solver's log-density at the reverse solver's own points."""
    mix = GaussianMixture(torch.tensor([[-1.0, 0.0], [1.5, 1.0]]), [0.3, 0.7], scales=[0.3, 0.6])
    process = VP()
    score = noised_mixture_score(mix, process)
    gen = torch.Generator().manual_seed(0)
    x = mix.sample(200, gen)
    t_min = torch.tensor(process.t_min, dtype=torch.float64)
    exact = mix.noised(float(process.alpha(t_min)), float(process.sigma(t_min))).log_prob(x)
    err = (ode_log_density(score, process, x, num_steps=40) - exact).abs()
    assert float(err.max()) < 0.05  # RK4 converged; what is left is the prior's mismatch at t_max
    y0, log_q = probability_flow(
        score, process, process.prior_sample(100, 2, gen, dtype=torch.float64), num_steps=40, log_prob=True
    )
    assert torch.allclose(ode_log_density(score, process, y0, num_steps=40), log_q, atol=1e-3)


def test_defensive_mixture_density_integrates_to_one():
    """The mixture proposal's log-density (forward ODE at the Gaussian points) is a density."""
    process = VP()
    model = ScoreMLP(2, 16, 1, process=process, seed=0)
    with torch.no_grad():  # an untrained but non-trivial model
        model.net.out.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
    whitening = Whitening(
        torch.tensor([0.5, -0.5], dtype=torch.float64),
        torch.diag(torch.tensor([1.5, 0.8], dtype=torch.float64)),
    )
    diffusion = DiffusionProposal(lambda y, t: model(y, t), process, whitening, num_steps=40)
    gauss = GaussianMixtureProposal(
        torch.tensor([[2.0, 0.0]], dtype=torch.float64),
        0.7 * torch.eye(2, dtype=torch.float64)[None],
        torch.ones(1, dtype=torch.float64),
    )
    mixture = DefensiveMixture(diffusion, gauss, weight=0.7)
    grid = torch.linspace(-7.0, 8.0, 70, dtype=torch.float64)
    xy = torch.cartesian_prod(grid, grid)
    log_q = torch.logaddexp(math.log(0.7) + diffusion.log_prob(xy), math.log(0.3) + gauss.log_prob(xy))
    mass = float(torch.exp(log_q).sum() * (grid[1] - grid[0]) ** 2)
    assert abs(mass - 1.0) < 0.02
    x, lq, from_diffusion = mixture.sample(200, torch.Generator().manual_seed(2))
    assert int(from_diffusion.sum()) == 140
    ref = torch.logaddexp(math.log(0.7) + diffusion.log_prob(x), math.log(0.3) + gauss.log_prob(x))
    assert torch.allclose(lq, ref, atol=1e-3)


@pytest.fixture(scope="module")
def nine_mode_run():
    mix = nine_modes(log_normalizer=LOG_Z)
    target = mix.as_target(dtype=torch.float64)
    idata = ds.sample(
        target,
        "diffusion",
        num_samples=10_000,
        seed=1,
        progress=False,
        max_rounds=2,
        train_steps=1500,
        num_proposals=6000,
    )
    return mix, target, idata


def test_diffusion_sampler_on_nine_modes(nine_mode_run):
    """Acceptance: mode weights within 0.05 in TV, MMD to exact draws near the exact-vs-exact
    level, log Z within 0.2 (and within 4 standard errors)."""
    mix, _, idata = nine_mode_run
    attrs = idata.posterior.attrs
    x = torch.as_tensor(idata.posterior["x"].values).reshape(-1, 2)
    assert attrs["num_modes"] == 9
    assert _tv(_mode_weights(mix, x), mix.weights) < 0.05
    assert abs(attrs["log_normalizer"] - LOG_Z) < 0.2
    assert abs(attrs["log_normalizer"] - LOG_Z) < 4 * attrs["log_normalizer_se"] + 0.02
    # MMD^2 (unbiased, Gaussian kernel of width 1, the modes' scale) against exact draws, next to
    # five exact-vs-exact replicates; draws from the wrong weights (reversed) must stand out
    gen = torch.Generator().manual_seed(7)
    level = max(
        abs(mmd(mix.sample(2000, gen), mix.sample(2000, gen), bandwidth=1.0, squared=True)) for _ in range(5)
    )
    exact = mix.sample(2000, gen)
    pick = torch.randperm(x.shape[0], generator=gen)[:2000]
    assert mmd(x[pick], exact, bandwidth=1.0, squared=True) < 5 * level
    wrong = GaussianMixture(mix.means, mix.weights.flip(0), covs=mix.covs)
    assert mmd(wrong.sample(2000, gen), exact, bandwidth=1.0, squared=True) > 5 * level


def test_diffusion_output_contract(nine_mode_run):
    mix, target, idata = nine_mode_run
    attrs = idata.posterior.attrs
    assert attrs["method"] == "diffusion" and attrs["num_target_evals"] > 0
    stats = idata.sample_stats
    x = torch.as_tensor(idata.posterior["x"].values)
    assert tuple(x.shape) == (1, 10_000, 2)
    assert torch.allclose(torch.as_tensor(stats["lp"].values[0]), mix.unnormalized_log_prob(x[0]), atol=1e-8)
    assert "log_weight" in stats and bool(torch.isfinite(torch.as_tensor(stats["log_weight"].values)).all())
    group = idata["diffusion"]
    for name in (
        "ess",
        "ess_fraction",
        "log_normalizer",
        "num_modes",
        "num_target_evals",
        "mode_weights",
        "ess_per_mode",
    ):
        assert group[name].dims[0] == "stage"
    evals = group["num_target_evals"].values
    # the rounds' evaluations, then the Stein check's gradients at the distinct resampled draws and the
    # coverage check's log-densities at the exploration's SMC particles
    assert 0 < attrs["stein_evals"] <= 4096
    assert (evals[1:] > evals[:-1]).all() and evals[-1] + attrs["stein_evals"] + attrs[
        "coverage_evals"
    ] == attrs["num_target_evals"]
    # one pooled model for nine modes: the held-out check kept it (0) or fell back to the Gaussians (-1)
    choice = group["model_choice"].values
    assert choice.shape == (len(evals), 1) and (choice[0] == -2).all() and set(choice[1:].ravel()) <= {-1, 0}
    default_weight = DiffusionConfig().diffusion_weight
    assert group["diffusion_share"].values[-1] == pytest.approx(
        default_weight if choice[-1, 0] == 0 else 0.0, abs=1e-3
    )
    assert float(group["ess_per_mode"].values[-1].min()) > 10  # every mode is covered


def test_gaussian_is_and_a_wrong_target_is_rejected():
    """The per-mode Gaussian baseline passes the same check against the exact weights, and the
    check rejects the answer when the truth it is compared with is wrong (weights reversed)."""
    mix = nine_modes(log_normalizer=LOG_Z)
    idata = ds.sample(
        mix.as_target(dtype=torch.float64),
        "gaussian_is",
        num_samples=10_000,
        seed=0,
        progress=False,
        num_proposals=8000,
    )
    x = torch.as_tensor(idata.posterior["x"].values).reshape(-1, 2)
    est = _mode_weights(mix, x)
    assert _tv(est, mix.weights) < 0.05
    assert abs(idata.posterior.attrs["log_normalizer"] - LOG_Z) < 0.2
    assert _tv(est, mix.weights.flip(0)) > 0.2
    # and a sampler run on the wrong target (weights reversed) fails the check against the truth
    wrong = GaussianMixture(mix.means, mix.weights.flip(0), covs=mix.covs, log_normalizer=LOG_Z)
    idata = ds.sample(
        wrong.as_target(dtype=torch.float64),
        "gaussian_is",
        num_samples=10_000,
        seed=0,
        progress=False,
        num_proposals=8000,
    )
    x = torch.as_tensor(idata.posterior["x"].values).reshape(-1, 2)
    assert _tv(_mode_weights(mix, x), mix.weights) > 0.2


def test_bad_options_are_refused():
    target = nine_modes().as_target(dtype=torch.float64)
    with pytest.raises(ValueError, match="diffusion_weight"):
        ds.sample(target, "diffusion", num_samples=10, seed=0, progress=False, diffusion_weight=1.5)
    with pytest.raises(ValueError, match="num_proposals"):
        ds.sample(target, "diffusion", num_samples=10, seed=0, progress=False, num_proposals=0)
    with pytest.raises(ValueError, match="does not apply"):
        ds.sample(target, "gaussian_is", num_samples=10, seed=0, progress=False, hidden=64)
    with pytest.raises(ValueError, match="does not apply"):
        ds.sample(target, "gaussian_is", num_samples=10, seed=0, progress=False, t_max=0.5)
    with pytest.raises(ValueError, match="t_max"):
        ds.sample(target, "diffusion", num_samples=10, seed=0, progress=False, t_max=1.5)


def test_pareto_k_matches_the_gaussian_tail_index():
    r"""For :math:`p = \mathcal N(0, s^2)`, :math:`q = \mathcal N(0, 1)` the weights
    :math:`\exp(x^2(1 - 1/s^2)/2)` have Pareto tail shape :math:`k = 1 - 1/s^2` (0.75 at
    :math:`s^2 = 4`); a proposal wider than the target (s^2 = 1/2) has no heavy tail, and equal
    weights have none to fit. The fit uses about 420 tail weights, so its sd is about 0.09. The
    smoothed weights are normalised, keep zero weights zero, and change only the largest ones."""
    from diffstat._util import ess_from_log_weights, pareto_smooth

    x = torch.randn(20_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for s2, lo, hi in ((4.0, 0.55, 0.95), (2.0, 0.3, 0.7)):
        log_w = x**2 * (1 - 1 / s2) / 2
        smoothed, k = pareto_smooth(log_w)
        assert lo < k < hi
        assert float(torch.logsumexp(smoothed, 0)) == pytest.approx(0.0, abs=1e-12)
        shift = smoothed - log_w  # one constant (the normalisation) except at the smoothed weights
        changed = (shift - shift.median()).abs() > 1e-9
        assert 0 < int(changed.sum()) <= 3 * math.sqrt(20_000) + 1 and bool(
            (log_w[changed] >= log_w[~changed].max()).all()
        )
        assert float(ess_from_log_weights(smoothed)) > float(
            ess_from_log_weights(log_w)
        )  # the smoothed tail is lighter
    assert pareto_smooth(x**2 * (1 - 1 / 0.5) / 2)[1] < 0.0
    smoothed, k = pareto_smooth(torch.tensor([0.0] * 30 + [-math.inf], dtype=torch.float64))
    assert math.isnan(k) and smoothed.tolist() == [-math.log(30)] * 30 + [-math.inf]
    assert math.isnan(pareto_smooth(log_w[:19])[1])  # too few weights to fit a tail


def test_a_larger_final_round():
    """``final_proposals`` sizes the last round only; the ESS fraction, the proposal counts and
    the target evaluations follow it, and the Pareto k of each round is reported."""
    target = nine_modes(log_normalizer=LOG_Z).as_target(dtype=torch.float64)
    opts = dict(
        num_explore=200,
        max_rounds=2,
        gaussian_rounds=2,
        target_ess=1.0,
        num_proposals=1000,
        chains_per_mode=32,
        refresh_chains=32,
    )
    small = ds.sample(target, "gaussian_is", num_samples=100, seed=0, progress=False, **opts)
    big = ds.sample(
        target, "gaussian_is", num_samples=100, seed=0, progress=False, final_proposals=3000, **opts
    )
    group = big["diffusion"]
    assert (
        group["num_proposals"].values.tolist() == [1000, 3000]
        and big.posterior.attrs["num_proposals"] == 4000
    )
    assert group["ess_fraction"].values == pytest.approx(group["ess"].values / [1000, 3000])
    spent = [r.posterior.attrs["num_target_evals"] - r.posterior.attrs["stein_evals"] for r in (big, small)]
    spent[1] -= pilot_evals(target)  # the first run on the target paid its default reference's pilot
    assert spent[0] - spent[1] == 2000  # less the Stein check's gradients (diffusion/stein.py)
    k = group["pareto_k"].values
    assert k.shape == (2,) and big.posterior.attrs["pareto_k"] == k[-1] and (k < 0.7).all()
    assert (group["ess_psis"].values > 0).all() and (group["ess_psis"].values <= [1000, 3000]).all()
    with pytest.raises(ValueError, match="final_proposals"):
        ds.sample(target, "gaussian_is", num_samples=10, seed=0, progress=False, final_proposals=0)


def test_heavy_tailed_weights_are_flagged():
    r"""Proposals narrower than the target give weights of infinite variance: for
    :math:`p = \mathcal N(0, I)` and Gaussians with standard deviations ``inflate`` = 0.25 times
    the target's, :math:`k = 1 - 0.25^2 = 0.94` (estimated from 16,000 weights and fitted
    moments: 0.81 to 1.11 over seeds 0-5), so the last round's Pareto k exceeds 0.7 and a warning
    says so (importance sampling alone, ``bridge=False``: the SMC bridge would correct the run, see
    ``test_bridge.py``). With the default ``inflate`` 1.2 (wider than the target) k is negative and
    nothing is said."""
    import warnings

    target = ds.Target(lambda x: -0.5 * (x**2).sum(-1), 2, dtype=torch.float64)
    opts = dict(
        num_samples=100,
        seed=0,
        progress=False,
        num_explore=400,
        max_rounds=2,
        target_ess=1.0,
        num_proposals=4000,
        final_proposals=16_000,
        refresh_chains=128,
    )
    with pytest.warns(RuntimeWarning, match="Pareto k"):
        narrow = ds.sample(target, "gaussian_is", inflate=0.25, bridge=False, **opts)
    assert narrow.posterior.attrs["pareto_k"] > 0.7
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        wide = ds.sample(target, "gaussian_is", **opts)
    assert wide.posterior.attrs["pareto_k"] < 0.3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_draws_are_a_systematic_resample_whose_mode_shares_are_the_weights(seed):
    """The returned draws resample the weighted particles systematically: each mode's share of the
    4,000 draws is its weighted share (``attrs["mode_weights"]``) to within 2 draws. A multinomial
    resample misses that bound with probability 0.95 per seed (binomial sd of a 0.7 share: 0.0072)."""
    mix = GaussianMixture(torch.tensor([[-4.0, 0.0], [4.0, 1.0]]), [0.7, 0.3], scales=[0.5, 1.0])
    idata = ds.sample(
        mix.as_target(dtype=torch.float64), "gaussian_is", num_samples=4000, seed=seed, progress=False
    )
    x = torch.as_tensor(idata.posterior["x"].values).reshape(-1, 2)
    share = _mode_weights(mix, x).sort().values
    weights = torch.as_tensor(idata.posterior.attrs["mode_weights"], dtype=torch.float64).sort().values
    assert float((share - weights).abs().max()) <= 2 / 4000
    assert abs(float(share[1]) - 0.7) < 0.02  # and the weights are the target's
