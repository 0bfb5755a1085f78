"""The learned smoothed score, the default when no smoothed score is given (issue 17): fitted from the
log-density of the unequal two-mode target (weights 2:1, covariance 0.05 I, d = 8), it gives SMS the
heavy weight and the within-mode variance; a kept score draws a second batch with no target evaluation
beyond the final correction and its check; it survives a save/load round trip bit for bit; it is
rejected on a target it was not fitted to; and the fit's warnings name the sampler that was called and
options it takes."""

import math
import warnings

import pytest
import torch

import diffstat as ds
from diffstat.smoothing import LearnedSmoothedScore, fit_smoothed_score
from diffstat.targets.two_modes import two_modes

pytestmark = pytest.mark.filterwarnings("ignore:More chains")

HEAVY, TAU2, DIM = 2.0 / 3.0, 0.05, 8
#: Fewer measurements and steps than the defaults (M about 200, 8 steps), as in test_sms.py: CPU time.
FAST = {"num_measurements": 64, "steps_per_measurement": 4}
#: Cheaper than the defaults (2,048 particles, 1,000 steps), to keep the file under 90 s on 2 cores.
FIT = dict(num_particles=2048, train_steps=1000)


@pytest.fixture(scope="module")
def problem():
    gm = two_modes(DIM)
    target = gm.as_target(dtype=torch.float64)
    score = fit_smoothed_score(target, seed=0, **FIT)
    return gm, target, score


def mode_summary(gm, idata) -> tuple[float, float, int]:
    """Heavy weight, mean within-mode variance per coordinate of the heavy mode, number of draws."""
    x = torch.as_tensor(idata.posterior["x"].values).reshape(-1, gm.dim)
    comp = gm.assign(x)
    return float((comp == 0).double().mean()), float(x[comp == 0].var(0).mean()), x.shape[0]


def acceptable(weight: float, var0: float, n: int) -> bool:
    """Weight within 4 MC sd (sd sqrt(w (1 - w) / n), 0.015 at n = 1000) plus 0.02 for the fit's
    bias, and the heavy mode's variance within 15% of 0.05 (its sd is under 2% here)."""
    return abs(weight - HEAVY) < 4 * math.sqrt(HEAVY * (1 - HEAVY) / n) + 0.02 and abs(var0 / TAU2 - 1) < 0.15


def test_fitted_score_two_modes_d8(problem):
    """First batch: the fit's evaluations plus SMS's stay under 1e4 per draw; weight and variance right;
    the held-out Fisher divergence at small noise is small."""
    gm, target, score = problem
    assert score.info["fisher_divergence"] < 0.05 and score.info["population"] == "modes"
    target.num_target_evals = 0
    idata = ds.sample(
        target, "sms", num_samples=500, num_chains=2, seed=1, progress=False, smoothed_score=score, **FAST
    )
    weight, var0, n = mode_summary(gm, idata)
    assert acceptable(weight, var0, n), (weight, var0)
    per_draw = (score.info["num_target_evals"] + idata.posterior.attrs["num_target_evals"]) / n
    assert per_draw < 1e4, per_draw
    assert not idata.sample_stats["diverging"].values.any()


def test_second_batch_costs_only_the_correction(problem):
    """A kept score: the run's evaluations are exactly the check's and the final MALA's (31 per draw)."""
    gm, target, score = problem
    target.num_target_evals = 0
    idata = ds.sample(
        target, "sms", num_samples=500, num_chains=2, seed=2, progress=False, smoothed_score=score, **FAST
    )
    attrs = idata.posterior.attrs
    n = 1000
    assert attrs["score_fitted_here"] == 0 and attrs["score_training_evals"] == 0
    assert attrs["num_target_evals"] == attrs["score_check_evals"] + attrs["correction_evals"]
    assert attrs["correction_evals"] == n * (attrs["num_mala"] + 1)
    assert attrs["num_target_evals"] / n <= 50
    assert acceptable(*mode_summary(gm, idata))
    # walk-jump from the same score: walkers start at its particles, 21 evaluations per draw; 4 chains
    # of 250 draws (each chain 250 walkers jumped once: the contract's shape, no more chains than draws)
    target.num_target_evals = 0
    wj = ds.sample(target, "walk_jump", num_samples=250, seed=3, progress=False, smoothed_score=score)
    assert (wj.posterior.sizes["chain"], wj.posterior.sizes["draw"]) == (4, 250)
    assert wj.posterior.attrs["walkers_per_chain"] == 250
    assert wj.posterior.attrs["num_target_evals"] == wj.posterior.attrs["score_check_evals"] + 21 * 1000
    assert acceptable(*mode_summary(gm, wj))


def test_kernel_is_the_particles_smoothed_score(problem):
    """Above ``kernel_sigma`` the score is the exact gradient of log (1/n) sum_i N(y; x_i, sigma^2 I) over
    the kept particles (autograd in float64; the kernel runs in float32)."""
    _, _, score = problem
    x = score.particles["x"].double()
    y = x[:64] + torch.randn(64, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for sigma in (score.kernel_sigma, 2 * score.kernel_sigma):
        yg = y.clone().requires_grad_(True)
        log_q = torch.logsumexp(-((yg[:, None] - x[None]) ** 2).sum(-1) / (2 * sigma**2), -1)
        (exact,) = torch.autograd.grad(log_q.sum(), yg)
        err = (score(y, sigma) - exact).norm(dim=-1) / exact.norm(dim=-1)
        assert float(err.max()) < 1e-3, float(err.max())


def test_save_load_round_trip(problem, tmp_path):
    gm, target, score = problem
    path = tmp_path / "score.pt"
    score.save(path)
    torch.load(path, weights_only=True)  # plain tensors and values only
    loaded = LearnedSmoothedScore.load(path)
    y = torch.randn(64, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for sigma in (0.05, 1.0, 5.0, 100.0):
        assert torch.equal(loaded(y, sigma), score(y, sigma))
    assert loaded.info["fisher_divergence"] == score.info["fisher_divergence"]
    assert torch.equal(loaded.particles["held_x"], score.particles["held_x"])
    assert loaded.geometry["sigma"] == pytest.approx(score.geometry["sigma"])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError):
        LearnedSmoothedScore.load(bad)
    with pytest.raises(FileNotFoundError):
        LearnedSmoothedScore.load(tmp_path / "missing.pt")


def test_wrong_score_rejected(problem):
    """The score of the 2:1 mixture used on the 1:2 mixture (same modes and shapes: the score at small
    noise is the same, the mode weights are not): the held-out log-density check rejects it, every draw
    is marked, and the weight check fails on its draws."""
    gm, _, score = problem
    wrong_gm = two_modes(DIM, weights=(1.0, 2.0))
    wrong_target = wrong_gm.as_target(dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="fitted to another target"):
        idata = ds.sample(
            wrong_target,
            "sms",
            num_samples=250,
            num_chains=2,
            seed=4,
            progress=False,
            smoothed_score=score,
            **FAST,
        )
    assert idata.sample_stats["diverging"].values.all()
    assert idata.posterior.attrs["score_log_prob_mismatch"] > 0.01
    weight_light_target = float(
        (wrong_gm.assign(torch.as_tensor(idata.posterior["x"].values).reshape(-1, DIM)) == 0).double().mean()
    )
    assert abs(weight_light_target - 1.0 / 3.0) > 0.2  # the draws follow the fitted, wrong, weights


def test_default_estimator_fits_a_score():
    """Without smoothed_score=, SMS fits one from the log-density and says so (a tiny fit: the
    attributes, not the accuracy, are checked here)."""
    target = two_modes(2).as_target(dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        idata = ds.sample(
            target,
            "sms",
            num_samples=20,
            num_chains=1,
            seed=0,
            progress=False,
            estimator_options=dict(num_particles=256, train_steps=50),
        )
    attrs = idata.posterior.attrs
    assert attrs["smoothed_score"] == "LearnedSmoothedScore" and attrs["score_fitted_here"] == 1
    assert attrs["score_training_evals"] > 0
    assert attrs["num_target_evals"] == attrs["score_training_evals"] + attrs["correction_evals"]


def test_bad_fit_is_warned_about():
    """Two training steps leave the network near its initial Gaussian score: the held-out Fisher
    divergence flags it."""
    target = two_modes(2).as_target(dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="Fisher divergence"):
        score = fit_smoothed_score(target, seed=0, num_particles=256, train_steps=2)
    assert score.info["fisher_divergence"] > 0.1


def test_training_free_budget_cap():
    """The Laplace estimator, kept as an option, stops at its evaluation budget with a warning: SMS ends
    at the measurement where it ran out (reported), walk-jump with the draws made so far."""
    target = two_modes(4).as_target(dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="spent its budget"):
        idata = ds.sample(
            target,
            "sms",
            num_samples=20,
            num_chains=1,
            seed=0,
            progress=False,
            estimator="laplace",
            num_measurements=64,
            num_mala=2,
            max_evals_per_draw=300,
        )
    attrs = idata.posterior.attrs
    assert attrs["budget_hit"] == 1 and attrs["num_measurements"] < 64
    assert torch.isfinite(torch.as_tensor(idata.posterior["x"].values)).all()
    with pytest.warns(RuntimeWarning, match="spent its budget"):
        wj = ds.sample(
            target,
            "walk_jump",
            num_samples=10,
            num_chains=10,
            seed=0,
            progress=False,
            estimator="laplace",
            max_evals_per_draw=50,
        )
    assert wj.posterior.attrs["budget_hit"] == 1 and 1 <= wj.posterior.sizes["draw"] < 10


def test_fit_warnings_speak_to_the_caller():
    """The population's diffusion pipeline misses part of a funnel's mass (cheap settings): an sms or
    walk_jump user is told so in the sampler's own name ("sms: the population that trains the smoothed
    score ..."), with options that sampler takes (``estimator_options``), never "diffusion: ..."; the
    options named are accepted as given; fit_smoothed_score's wording passes them as its keywords."""
    from diffstat.smoothing.populations import FitWarning
    from diffstat.targets import Funnel

    target = Funnel(3).as_target(dtype=torch.float64)
    chains = dict(num_chains=8, num_warmup=50, max_tree_depth=6)  # the NUTS fallback, cheap too
    pop_options = dict(chains_per_mode=64, num_proposals=1024, fallback_options=chains)
    cheap = dict(num_particles=256, train_steps=50, population_options=pop_options)
    run = dict(num_samples=20, num_chains=1, seed=0, progress=False, num_mala=2)
    for method, extra in (("sms", dict(num_measurements=8)), ("walk_jump", {})):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            idata = ds.sample(target, method, estimator_options=cheap, **run, **extra)
        assert idata.posterior.attrs["score_population"] == "nuts (fallback from modes)"
        texts = [str(w.message) for w in caught]
        assert not any(t.startswith("diffusion:") for t in texts), texts
        population = [w.message for w in caught if "population that trains" in str(w.message)]
        assert len(population) == 1 and isinstance(population[0], FitWarning), texts
        assert str(population[0]).startswith(f"{method}: the population that trains the smoothed score")
        assert "the particles were replaced by those of NUTS chains started from them" in str(population[0])
        assert (
            "estimator_options={'population_options': {'chains_per_mode': 128, 'num_proposals': 2048"
            in str(population[0])
        )
    more = dict(cheap, population_options=dict(cheap["population_options"], **population[0].options))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ds.sample(target, "walk_jump", estimator_options=more, **run)  # the named options are accepted
    direct = str(population[0].for_caller("fit_smoothed_score"))
    assert (
        direct.startswith("fit_smoothed_score: ") and "population_options={'chains_per_mode': 128" in direct
    )
    assert "estimator_options" not in direct
