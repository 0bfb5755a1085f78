"""The check for modes a run's draws miss (diffstat.modes.coverage) and SMC's warning built on it."""

import math
import warnings

import pytest
import torch

import diffstat as ds
from diffstat.modes.coverage import draws_metric, laplace_log_mass_at, missed_modes
from diffstat.tempering.auto_reference import pilot_evals
from diffstat.targets.funnel import Funnel
from diffstat.targets.two_modes import two_modes

F64 = torch.float64


def three_modes(dim=5):
    """Weights 0.5 / 0.3 / 0.2 at 0, 8 e_1 and 8 e_2; covariances 0.5 I, a sheared one, 2 I."""
    w = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    mus = torch.zeros(3, dim, dtype=F64)
    mus[1, 0], mus[2, 1] = 8.0, 8.0
    shear = torch.eye(dim, dtype=F64)
    shear[0, 1] = 0.9
    covs = torch.stack([0.5 * torch.eye(dim, dtype=F64), shear @ shear.T, 2.0 * torch.eye(dim, dtype=F64)])
    comps = torch.distributions.MultivariateNormal(mus, covs)

    def log_prob(x):
        return torch.logsumexp(comps.log_prob(x[:, None, :]) + w.log(), -1)

    return ds.Target(log_prob, dim), comps, w


def test_laplace_mass_is_exact_for_a_gaussian_and_minus_inf_off_a_mode():
    cov = torch.tensor([[2.0, 0.6], [0.6, 0.5]], dtype=F64)
    gauss = torch.distributions.MultivariateNormal(torch.tensor([1.0, -2.0], dtype=F64), cov)
    target = ds.Target(lambda x: gauss.log_prob(x) + 3.0, 2)
    lm = laplace_log_mass_at(target, torch.tensor([[1.0, -2.0], [5.0, 5.0]], dtype=F64))
    assert abs(float(lm[0]) - 3.0) < 1e-12  # log Z = 3 exactly at the mode
    # An off-mode point of a log-density curving up in a direction is no mode.
    saddle = ds.Target(lambda x: -(x[:, 0] ** 2) + x[:, 1] ** 2, 2)
    assert laplace_log_mass_at(saddle, torch.zeros(1, 2, dtype=F64))[0] == -math.inf


def test_draws_from_one_mode_miss_the_others_share_and_draws_from_all_miss_nothing():
    target, comps, w = three_modes()
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    starts = torch.randn(256, 5, dtype=F64)  # N(0, I): the reference SMC uses by default
    found = comps.sample((2000,))[:, 0]  # exact draws of the mode at 0 alone, evidence log 0.5
    res = missed_modes(target, found, math.log(0.5), starts, gen)
    assert res.centres.shape[0] == 2 and abs(res.share - 0.5) < 0.02  # exact 0.5: Gaussian modes
    assert res.num_evals > 0
    pick = torch.multinomial(w, 2000, replacement=True, generator=gen)
    every = comps.sample((2000,))[torch.arange(2000), pick]
    res = missed_modes(target, every, 0.0, starts, gen)
    assert res.share == 0.0 and res.centres.shape[0] == 0


def test_no_missed_mode_on_a_funnel_or_a_correlated_gaussian():
    gen = torch.Generator().manual_seed(1)
    funnel = Funnel(10).as_target(dtype=F64)
    torch.manual_seed(1)
    res = missed_modes(funnel, Funnel(10).sample(2000).to(F64), 0.0, torch.randn(256, 10, dtype=F64), gen)
    assert res.share == 0.0  # the funnel's neck climbs to no mode with a negative definite Hessian
    cov = 0.9 * torch.ones(8, 8, dtype=F64) + 0.1 * torch.eye(8, dtype=F64)
    gauss = torch.distributions.MultivariateNormal(torch.full((8,), 3.0, dtype=F64), cov)
    target = ds.Target(gauss.log_prob, 8)
    res = missed_modes(target, gauss.sample((2000,)), 0.0, torch.randn(256, 8, dtype=F64), gen)
    assert res.share == 0.0


def test_smc_warns_of_the_modes_every_run_missed_and_not_where_a_reference_covers_them():
    target, _, _ = three_modes()
    with pytest.warns(RuntimeWarning, match="no draw reaches") as caught:
        idata = ds.sample(target, "smc", num_samples=500, seed=0, progress=False, reference_scales=(1.0,))
    attrs = idata.posterior.attrs
    # From N(0, I) all four runs stay in the mode at 0 and agree: only the mode check sees the rest.
    assert abs(attrs["log_normalizer"] - math.log(0.5)) < 0.1
    assert abs(attrs["missed_mode_share"] - 0.5) < 0.05
    assert not any("different parts" in str(w.message) for w in caught)
    wide = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(5), 6.0), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        idata = ds.sample(target, "smc", num_samples=500, seed=0, progress=False, reference=wide)
    assert idata.posterior.attrs["missed_mode_share"] == 0.0
    assert abs(idata.posterior.attrs["log_normalizer"]) < 0.15


def test_smc_finds_the_far_mode_of_two_modes_16_that_its_runs_lost():
    target = two_modes(16, weights=(3, 1)).as_target(dtype=F64)
    with pytest.warns(RuntimeWarning, match="no draw reaches"):
        idata = ds.sample(target, "smc", num_samples=1000, seed=0, progress=False, reference_scales=(1.0,))
    assert abs(idata.posterior.attrs["missed_mode_share"] - 0.25) < 0.02


def test_the_check_is_an_option():
    target, _, _ = three_modes()
    with pytest.raises(ValueError, match="check_modes"):
        ds.sample(target, "smc", num_samples=50, seed=0, progress=False, check_modes="no")
    idata = ds.sample(target, "smc", num_samples=200, seed=0, progress=False, check_modes=False)
    assert "missed_mode_share" not in idata.posterior.attrs
    # The check runs after the draws: they are the same with it, only the evaluations grow by its own.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checked = ds.sample(target, "smc", num_samples=200, seed=0, progress=False)
    assert torch.equal(torch.as_tensor(checked.posterior.x.values), torch.as_tensor(idata.posterior.x.values))
    a, b = checked.posterior.attrs, idata.posterior.attrs
    # the first run on the target also paid the default reference's pilot (cached on the target)
    assert a["num_target_evals"] == b["num_target_evals"] - pilot_evals(target) + a["mode_check_evals"]


# ---------------------------------------------------------------------------- reference width
def banana(x):
    """A 2-d banana (Haario et al.): x_1 ~ N(0, 10^2), x_2 | x_1 ~ N(0.03 (x_1^2 - 100), 1); log Z = 0."""
    x1, x2 = x[:, 0], x[:, 1]
    return -0.5 * x1**2 / 100 - 0.5 * (x2 - 0.03 * (x1**2 - 100)) ** 2 - math.log(2 * math.pi * 10)


def test_the_width_ratio_is_the_draws_sd_over_the_reference_sd_along_the_widest_direction():
    from diffstat.tempering.mode_check import reference_width_ratio
    from diffstat.tempering.path import make_path

    gen = torch.Generator().manual_seed(0)
    path = make_path(ds.Target(lambda x: -0.5 * (x**2).sum(-1), 3, dtype=F64))  # reference N(0, I)
    draws = torch.randn(20000, 3, generator=gen, dtype=F64) * torch.tensor([1.0, 6.0, 0.5], dtype=F64)
    assert abs(reference_width_ratio(path, draws, gen, None) - 6.0) < 0.3
    rotated = draws @ torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=F64))[0]
    assert abs(reference_width_ratio(path, rotated, gen, None) - 6.0) < 0.3


def test_smc_warns_that_a_reference_narrower_than_the_posterior_underestimates_log_z():
    target = ds.Target(banana, 2, dtype=F64)
    with pytest.warns(RuntimeWarning, match="times as wide as the reference") as caught:
        idata = ds.sample(target, "smc", num_samples=1000, seed=1, progress=False, reference_scales=(1.0,))
    # From N(0, I) (every run), log Z is low by more than three of its standard errors, and the runs agree.
    attrs = idata.posterior.attrs
    assert attrs["log_normalizer"] < -3 * attrs["log_normalizer_se"] and attrs["reference_width_ratio"] > 4
    assert not any("different parts" in str(w.message) for w in caught)
    wide = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(2, dtype=F64), 20.0), 1)
    with warnings.catch_warnings(record=True) as caught:  # the banana's curve still caps the moves
        warnings.simplefilter("always")
        idata = ds.sample(target, "smc", num_samples=1000, seed=1, progress=False, reference=wide)
    assert not any("as wide as the reference" in str(w.message) for w in caught)
    attrs = idata.posterior.attrs
    assert (
        attrs["reference_width_ratio"] < 1 and abs(attrs["log_normalizer"]) < 3 * attrs["log_normalizer_se"]
    )


def test_the_misweight_is_the_tv_between_laplace_and_draw_shares_of_the_modes():
    target, comps, w = three_modes()
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    starts = torch.randn(256, 5, dtype=F64)
    every = comps.sample((4000,))
    for weights, exact_tv in ((w, 0.0), (torch.tensor([0.9, 0.05, 0.05], dtype=F64), 0.4)):
        pick = torch.multinomial(weights, 4000, replacement=True, generator=gen)
        draws = every[torch.arange(4000), pick]
        res = missed_modes(target, draws, 0.0, starts, gen)
        assert res.share == 0.0 and abs(res.misweight - exact_tv) < 0.03  # Gaussian modes: Laplace exact


def test_smc_warns_where_its_runs_left_the_heavy_mode_of_narrow_wide_nearly_empty():
    from diffstat.targets.two_modes import narrow_wide

    target = narrow_wide(10).as_target(dtype=F64)
    with pytest.warns(RuntimeWarning, match="modes wrongly"):
        idata = ds.sample(target, "smc", num_samples=1000, seed=1, progress=False)
    x = torch.as_tensor(idata.posterior.x.values).reshape(-1, 10)
    heavy = float((x.mean(-1) > 0).double().mean())
    assert heavy < 0.1 and idata.posterior.attrs["mode_misweight"] > 0.5  # exact heavy weight 0.75


def test_the_climbs_metric_is_the_draws_covariance_within_their_modes():
    """Shrunk toward the diagonal by d / n; pooled within the given modes, or within clusters found
    (two modes 40 apart along e_1: the spread between them, 400, is not the metric's)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1000, 2, generator=gen, dtype=F64) * torch.tensor([1.0, 2.0], dtype=F64)
    cov, lam = torch.cov(x.T), 2 / 1000
    torch.testing.assert_close(draws_metric(x), (1 - lam) * cov + lam * torch.diag(cov.diagonal()))
    two = torch.cat(
        [x[:500] + torch.tensor([20.0, 0.0], dtype=F64), x[500:] - torch.tensor([20.0, 0.0], dtype=F64)]
    )
    labels = (torch.arange(1000) >= 500).long()
    within = torch.cat([x[:500] - x[:500].mean(0), x[500:] - x[500:].mean(0)])
    pooled = within.T @ within / 998
    torch.testing.assert_close(
        draws_metric(two, labels), (1 - lam) * pooled + lam * torch.diag(pooled.diagonal())
    )
    # Found clusters: variances 1 and 4 within, to Monte Carlo error (sd of a variance of 1000 draws: 4.5%)
    torch.testing.assert_close(
        draws_metric(two).diagonal(), torch.tensor([1.0, 4.0], dtype=F64), rtol=0.15, atol=0
    )
    assert draws_metric(x[:1]) is None


def _narrow_correlated(d=6):
    """N(m, S) with sds from 1e-3 to 1 and correlations 0.95, m = (5, ..., 30): a regression's narrow,
    correlated posterior far from N(0, I) starts; and the mixture of it and its mirror N(-m, S)."""
    sd = torch.logspace(-3, 0, d, dtype=F64)
    cov = sd[:, None] * (0.95 * torch.ones(d, d, dtype=F64) + 0.05 * torch.eye(d, dtype=F64)) * sd[None]
    mean = torch.linspace(5.0, 30.0, d, dtype=F64)
    gauss = torch.distributions.MultivariateNormal(mean, cov)
    mirror = torch.distributions.MultivariateNormal(-mean, cov)

    def mix(x):  # logsumexp: torch.logaddexp's second derivative is NaN this far in a tail
        return torch.logsumexp(torch.stack([gauss.log_prob(x), mirror.log_prob(x)], -1), -1) - math.log(2)

    return gauss, ds.Target(gauss.log_prob, d, dtype=F64), ds.Target(mix, d, dtype=F64)


def test_preconditioned_climbs_check_a_narrow_correlated_posterior_cheaply_and_find_its_mirror_mode():
    """Draws of N(m, S) alone: no missed mode, within a bound on the evaluations that isotropic climbs
    exceed 2.5 times over (all 100 steps of most of the 256 starts). With the metric S every climb
    ends within about 20 steps (h grows from 0.1 to 1 in 6 accepted steps, then Newton steps):
    320 climbs x 20 plus a barrier test of 3 evaluations per climbed point, 7,360. On the mixture
    with its mirror mode, which the draws miss (exact share 0.5), the preconditioned check finds it;
    so does the isotropic one: its climbs end short of the peak, and the Newton moves of the starts
    still rising finish them (before those moves its Laplace mass there was far too small)."""
    gauss, target, mix = _narrow_correlated()
    torch.manual_seed(0)
    draws, starts = gauss.sample((2000,)), torch.randn(256, 6, dtype=F64)
    res = missed_modes(target, draws, 0.0, starts, torch.Generator().manual_seed(0))
    flat = missed_modes(target, draws, 0.0, starts, torch.Generator().manual_seed(0), precondition=False)
    assert res.share == 0.0 and flat.share == 0.0 and res.centres.shape[0] == 0
    assert res.num_evals < 7360 and flat.num_evals > 2.5 * 7360
    res = missed_modes(mix, draws, math.log(0.5), starts, torch.Generator().manual_seed(0))
    assert res.centres.shape[0] == 1 and abs(res.share - 0.5) < 1e-3 and abs(res.misweight - 0.5) < 1e-3
    torch.testing.assert_close(res.centres[0], -gauss.mean, rtol=0, atol=1e-2)
    flat = missed_modes(
        mix, draws, math.log(0.5), starts, torch.Generator().manual_seed(0), precondition=False
    )
    assert flat.centres.shape[0] == 1 and abs(flat.share - 0.5) < 1e-3


def test_laplace_mass_where_autograd_gives_a_nan_hessian():
    """``torch.logaddexp`` of terms over 745 nats apart has a NaN second derivative: at each mode of
    this mixture the other term is 2,116 nats down. The Hessian then comes from central differences of
    the gradient, and the Laplace masses are the weights, exactly up to the differences' error."""
    far, near = torch.tensor([40.0, 40.0], dtype=F64), torch.tensor([-6.0, -6.0], dtype=F64)
    normal = torch.distributions.MultivariateNormal(torch.stack([far, near]), torch.eye(2, dtype=F64))

    def log_prob(x):
        lp = normal.log_prob(x[:, None, :])
        return torch.logaddexp(math.log(0.3) + lp[:, 0], math.log(0.7) + lp[:, 1])

    target = ds.Target(log_prob, 2)
    modes = torch.stack([far, near])
    auto = torch.autograd.functional.hessian(lambda x: log_prob(x[None])[0], far)
    assert not bool(torch.isfinite(auto).all())  # what the fallback is for
    lm = laplace_log_mass_at(target, modes)
    assert torch.allclose(lm, torch.tensor([0.3, 0.7], dtype=F64).log(), atol=1e-6)


def test_screened_starts_find_a_narrow_heavy_mode_that_the_plain_starts_miss():
    """narrow_wide(10) from N(0, 16 I), draws of the wide light mode alone (evidence log 0.25): the
    heavy mode (sd 0.4, weight 0.75) is climbed to from about 1% of the draws at scale 0.5 and 0.1% at
    scale 1. 256 starts climbed miss it (on 10 of 10 seeds at the old scales 1, 2, 4; on 8 of 10 with
    0.5 too); 4096 screened by two steps, 256 going on, find it on 10 of 10 (docs/mode_check.md), with
    its exact share 0.75 (Gaussian modes: Laplace is exact)."""
    from diffstat.modes.check import MAX_SCREENED, MIN_SCREENED, num_check_starts
    from diffstat.targets.two_modes import narrow_wide

    mixture = narrow_wide(10)
    target = mixture.as_target(dtype=F64)
    gen = torch.Generator().manual_seed(1)
    light = mixture.means[1] + torch.randn(2000, 10, generator=gen, dtype=F64)
    starts = 4.0 * torch.randn(4096, 10, generator=gen, dtype=F64)
    for scales in [(1.0, 2.0, 4.0), (0.5, 1.0, 2.0, 4.0)]:
        plain = missed_modes(
            target, light, math.log(0.25), starts[:256], torch.Generator().manual_seed(1), scales=scales
        )
        assert plain.share == 0.0
    screened = missed_modes(target, light, math.log(0.25), starts, torch.Generator().manual_seed(1), keep=256)
    assert screened.centres.shape[0] == 1 and abs(screened.share - 0.75) < 1e-3
    assert float((screened.centres[0] - 1.5).abs().max()) < 1e-2  # the heavy mode's centre, 1.5 * ones
    # Every run screens the same number of starts, however short (docs/audit.md, fourth round).
    assert num_check_starts(0) == MIN_SCREENED == num_check_starts(10**8) == MAX_SCREENED == 4096


def test_smc_warns_on_the_readme_example_where_every_run_lost_the_heavy_mode():
    """The README's example: narrow_wide(10) from N(0, 16 I). Tempering loses the heavy mode on every
    run alike, so the runs agree; the check's screened starts find it."""
    from diffstat.targets.two_modes import narrow_wide

    mixture = narrow_wide(10)
    wide = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(10, dtype=F64), 4.0), 1)
    target = ds.Target(mixture.unnormalized_log_prob, 10, reference=wide, dtype=F64)
    with pytest.warns(RuntimeWarning, match="no draw reaches"):
        idata = ds.sample(target, "smc", num_samples=1000, seed=0, progress=False)
    attrs = idata.posterior.attrs
    x = torch.as_tensor(idata.posterior.x.values).reshape(-1, 10)
    assert float((mixture.assign(x) == 0).double().mean()) == 0.0  # the heavy mode holds no draw
    assert abs(attrs["missed_mode_share"] - 0.75) < 0.02  # of log Z -1.4 + the heavy mode's log 0.75


def test_screened_starts_find_the_heavy_mode_of_narrow_wide_11_on_every_seed():
    """``narrow_wide(11, scales=(0.35, 1))`` from N(0, I): the heavy mode (3/4 of the mass) holds 0.2%
    of the widened reference draws' basins. Draws of the light mode alone: 256 unscreened starts found
    the heavy mode on 3 of 12 seeds (SMC, AIS and PT at defaults were then silently wrong by a mode
    weight of 0.75 and log Z by -1.4 on half of the seeds). The starts every run screens (4,096, two
    climbing steps each) find it on each of seeds 0-5 with the
    share it misses (exact 0.75); over seeds 0-11 (``docs/mode_check.md``), 4,096 found it on 12, the
    2,200 of an AIS run on 11, the floor of 1,024 (a short run's) on 9."""
    from diffstat.modes.check import MAX_SCREENED, check_missed_modes
    from diffstat.targets.two_modes import narrow_wide

    mix = narrow_wide(11, scales=(0.35, 1.0))
    target = mix.as_target(dtype=F64)
    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        draws = mix.means[1] + torch.randn(1000, 11, generator=gen, dtype=F64)
        starts = torch.randn(MAX_SCREENED, 11, generator=gen, dtype=F64)
        with pytest.warns(RuntimeWarning, match="no draw reaches"):
            attrs = check_missed_modes(
                "SMC", target, draws, math.log(0.25), starts, gen, missed_advice="", misweight_advice=""
            )
        assert abs(attrs["missed_mode_share"] - 0.75) < 0.03
        # within a budget: 2,048 starts all climbing, unscreened, cost 26,500 (seeds 0 and 1)
        assert attrs["mode_check_evals"] < 20_000, attrs["mode_check_evals"]
