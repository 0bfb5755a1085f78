"""Walk-jump and SMS off their home ground: no silent garbage. On Neal's funnel the training-free
smoothed score fails in the neck (the Laplace fits follow the joint mode, not the mass, and a fit
far down the neck overflowed and poisoned the shared mode bank with NaN); the result must say so."""

import math
import warnings

import pytest
import torch

import diffstat as ds
from diffstat.smoothing.scores import LaplaceSmoothedScore
from diffstat.targets import Funnel, two_modes

F64 = torch.float64


def funnel_target(dim=10):
    ref = torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(dim, dtype=F64), 3.0 * torch.ones(dim, dtype=F64)), 1
    )
    return ds.Target(Funnel(dim).unnormalized_log_prob, dim, reference=ref, dtype=F64)


def test_laplace_score_stays_finite_down_the_funnel_neck():
    target = funnel_target()
    gen = torch.Generator().manual_seed(0)
    provider = LaplaceSmoothedScore(target, generator=gen, cheap_fraction=0.0, explore=64)
    y = torch.zeros(40, 10, dtype=F64)
    y[:, 0] = torch.linspace(-30.0, 6.0, 40)
    y[:, 1:] = 0.3 * torch.randn(40, 9, generator=gen, dtype=F64)
    for _ in range(4):
        x_hat = provider.denoise(y, 1.0)
        assert torch.isfinite(x_hat).all()
        assert len(provider.bank) == 0 or torch.isfinite(provider.bank.modes).all()
    # its own check flags the neck (p(x | y) far from Gaussian) and passes Gaussian modes
    ess = provider.last_info["fit_ess"]
    assert float((ess[:10] < 0.2).double().mean()) >= 0.5  # y1 in [-30, -22]
    mix = two_modes(8)
    q = LaplaceSmoothedScore(ds.Target(mix.unnormalized_log_prob, 8, dtype=F64), generator=gen, explore=64)
    q.denoise(mix.sample(100, gen) + torch.randn(100, 8, generator=gen, dtype=F64), 1.0)
    assert float(q.last_info["fit_ess"].min()) > 0.99


def test_mode_bank_refuses_non_finite_modes():
    # in a walk-jump run on the funnel a Newton estimate at x1 ~ -1e17 (a near-singular curvature
    # down the neck) entered the shared bank; every chain's fit from it overflowed, and 0 * NaN made
    # every jump NaN (run_all --fast: 2000 of 2000 draws)
    from diffstat.smoothing.laplace import ModeBank

    bank = ModeBank()
    eye = torch.eye(2, dtype=F64).expand(3, 2, 2)
    bank.add(torch.tensor([[0.0, 0.0], [math.nan, 1.0], [math.inf, 0.0]], dtype=F64), eye)
    assert len(bank) == 1 and torch.isfinite(bank.modes).all()
    bad_prec = eye.clone()
    bad_prec[0, 0, 0] = math.nan
    bank.add(torch.tensor([[5.0, 5.0]], dtype=F64), bad_prec[:1])
    assert len(bank) == 1


def test_walk_jump_on_the_funnel_reports_divergence():
    target = funnel_target()
    with pytest.warns(RuntimeWarning, match="walk-jump diverged"):
        idata = ds.sample(
            target,
            "walk_jump",
            num_samples=5,
            num_chains=20,
            num_warmup=40,
            seed=0,
            progress=False,
            estimator="laplace",
        )  # the training-free estimator's failure (no longer the default)
    x = idata.posterior.x.values
    div = idata.sample_stats.diverging.values
    assert div.shape == x.shape[:2] and div.dtype == bool
    assert div.sum() == idata.posterior.attrs["num_divergent"] > 0
    assert math.isclose(float(idata.walk_jump.num_divergent.sum()), float(div.sum()))
    # every draw that is not marked is finite
    assert torch.isfinite(torch.as_tensor(x)[~torch.as_tensor(div)]).all()


def test_walk_jump_on_gaussian_modes_reports_none():
    mix = two_modes(4)
    target = mix.as_target(dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        # 5 draws per chain are too few for the MCMC diagnostics of one-walker chains, which say so
        warnings.filterwarnings("ignore", r"ds\.sample\(\.\.\., 'walk_jump'\): the result is unreliable")
        idata = ds.sample(
            target,
            "walk_jump",
            num_samples=5,
            num_chains=20,
            num_warmup=40,
            seed=0,
            progress=False,
            estimator="laplace",
            estimator_options=dict(explore=64),
        )
    assert not idata.sample_stats.diverging.values.any() and idata.posterior.attrs["num_divergent"] == 0


def test_exploding_walk_is_caught():
    # a step far too large for the curvature of q_sigma (exact score of a narrow Gaussian): the
    # unadjusted walk blows up; the walkers are reset and every draw after a blow-up is marked
    target = ds.Target(lambda x: -0.5 * (x**2).sum(-1) / 0.01, 3, dtype=F64)
    score = lambda y, s: -y / (0.01 + s**2)  # noqa: E731
    with pytest.warns(RuntimeWarning, match="walk-jump diverged"):
        idata = ds.sample(
            target,
            "walk_jump",
            num_samples=5,
            num_chains=8,
            num_warmup=20,
            seed=0,
            progress=False,
            sigma=0.1,
            smoothed_score=score,
            walk="ula",
            step_size=40.0,
        )
    assert idata.sample_stats.diverging.values.mean() > 0.5
    assert idata.posterior.attrs["num_divergent_steps"] > 0
    assert torch.isfinite(torch.as_tensor(idata.posterior.x.values)).all()


def test_mode_exploration_converges_on_a_logistic_posterior():
    # far from the mode a logistic likelihood is flat (saturated), so the full Newton step
    # overshoots; the old ascent oscillated and found no mode (SMS then ran from garbage: jump
    # means ~30 sds off on ionosphere). With monotone steps every start reaches the one mode.
    from diffstat.modes.laplace import log_prob_grad_hessian
    from diffstat.smoothing.laplace import explore_modes
    from diffstat.targets import ionosphere

    model = ionosphere()
    target = ds.Target(model.log_prob, model.dim, reference=model.prior(), dtype=F64)
    gen = torch.Generator().manual_seed(0)
    modes = explore_modes(target, target.sample_reference(8, gen))
    assert modes.modes.shape == (1, model.dim) and int(modes.hits.sum()) == 8
    _, grad, _ = log_prob_grad_hessian(target, modes.modes)
    assert float(grad.norm()) < 1e-6  # a stationary point of the (log-concave) posterior


def test_sms_flags_a_biased_training_free_run():
    # log-gamma coordinates, p(x) = exp(x - e^x): skewed, so p(x | y) is too and the Laplace
    # estimate of E[X | y] (its mode) is biased; exact mean digamma(1) = -0.5772, var pi^2 / 6
    d, n = 4, 200
    target = ds.Target(lambda x: (x - torch.exp(x)).sum(-1), d, dtype=F64)
    with pytest.warns(RuntimeWarning, match="self-check"):
        idata = ds.sample(
            target,
            "sms",
            num_samples=n,
            num_chains=1,
            seed=0,
            progress=False,
            sigma=1.0,
            num_measurements=4,
            num_mala=20,
            estimator="laplace",
        )
    x = torch.as_tensor(idata.posterior.x.values).reshape(-1, d)
    z = (x.mean(0) + 0.5772157) / math.sqrt(math.pi**2 / 6 / n)
    assert float(z.abs().max()) > 4  # the bias the flag is about is real ...
    assert idata.sample_stats.diverging.values.all()  # ... and every draw is marked
    assert idata.posterior.attrs["score_fit_ess"] < 0.9 and len(idata.sms.score_fit_ess) == 4
    # a Gaussian with the same moments passes the check, unflagged
    g = ds.Target(lambda x: -0.5 * ((x + 0.5772157) ** 2).sum(-1) / (math.pi**2 / 6), d, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        idata = ds.sample(
            g,
            "sms",
            num_samples=50,
            num_chains=1,
            seed=0,
            progress=False,
            sigma=1.0,
            num_measurements=4,
            num_mala=20,
            estimator="laplace",
        )
    assert not idata.sample_stats.diverging.values.any() and idata.posterior.attrs["score_fit_ess"] > 0.99
