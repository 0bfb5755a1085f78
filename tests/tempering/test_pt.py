"""Parallel tempering: the swap move, the ladder rule, mode weights, the output contract."""

import math
import warnings

import pytest
import torch

import diffstat as ds
from diffstat.targets import GaussianMixture
from diffstat.mcmc.metric import DenseMetric
from diffstat.tempering.auto_reference import pilot_evals
from diffstat.tempering.path import GeometricPath, get_kernel, move
from diffstat.tempering.pt import equalize_ladder, geometric_ladder, swap_step, whitened_move

D = torch.distributions
F64 = torch.float64
LOG_Z = 2.3
WEIGHTS = (0.5, 0.3, 0.2)
#: The front door's warning for a run the MCMC diagnostics find unreliable.
UNRELIABLE = r"'pt'\): the result is unreliable"


def gaussian_target(dim=2, mean=1.5, scale=0.5):
    """exp(LOG_Z) N(mean 1, scale^2 I); with the N(0, I) reference, pi_beta is Gaussian."""
    m = torch.full((dim,), mean, dtype=F64)
    target = ds.Target(lambda x: D.Normal(m, scale).log_prob(x).sum(-1) + LOG_Z, dim, dtype=F64)

    def tempered(beta):
        prec = (1 - beta) + beta / scale**2
        return beta * mean / scale**2 / prec, 1.0 / prec

    return target, tempered


def mixture6(weights=WEIGHTS):
    means = torch.tensor([[2.5, 2.5, 0, 0, 0, 0], [-2.5, -2.5, 0, 0, 0, 0], [0, 0, 2.5, 2.5, 0, 0]])
    return GaussianMixture(means, weights, scales=[0.7, 1.0, 0.85], log_normalizer=LOG_Z)


def weights_agree(draws, gm, weights, tol=0.05) -> bool:
    share = torch.bincount(gm.assign(draws), minlength=len(weights)).to(F64) / draws.shape[0]
    return bool(((share - torch.tensor(weights, dtype=F64)).abs() < tol).all())


# ---------------------------------------------------------------------------- swaps
def test_swap_probabilities_and_permutation(generator):
    target, _ = gaussian_target()
    path = GeometricPath(target)
    betas = torch.tensor([0.0, 0.2, 0.5, 1.0], dtype=F64)
    c, r = 3, 4
    num_swapped = 0
    ps = path.evaluate(torch.randn(c * r, 2, generator=generator, dtype=F64))
    for parity in (0, 1):
        new, prob, proposed = swap_step(torch.Generator().manual_seed(4), ps, betas, c, parity)
        delta = ps.delta.reshape(c, r)
        expected = torch.exp(((betas[1:] - betas[:-1]) * (delta[:, :-1] - delta[:, 1:])).clamp(max=0.0))
        assert torch.equal(proposed, torch.arange(r - 1) % 2 == parity)
        assert torch.allclose(
            prob, torch.where(proposed, expected, torch.zeros_like(expected)), rtol=0, atol=1e-14
        )
        # Within each proposed pair the two states are exchanged or kept; other positions are kept.
        old_x, new_x = ps.x.reshape(c, r, 2), new.x.reshape(c, r, 2)
        in_pair = torch.zeros(r, dtype=torch.bool)
        for p in torch.nonzero(proposed).flatten().tolist():
            in_pair[p] = in_pair[p + 1] = True
            swapped = (new_x[:, p] == old_x[:, p + 1]).all(-1)
            kept = ~swapped
            num_swapped += int(swapped.sum())
            assert torch.equal(new_x[swapped, p + 1], old_x[swapped, p])
            assert torch.equal(new_x[kept, p], old_x[kept, p]) and torch.equal(
                new_x[kept, p + 1], old_x[kept, p + 1]
            )
        assert torch.equal(new_x[:, ~in_pair], old_x[:, ~in_pair])
    assert num_swapped > 0


def _swaps_keep_each_temperature_exact(swap, n=20_000, num_rounds=6) -> bool:
    """Replica r of each of ``n`` chains starts as an exact draw of pi_{beta_r}; after
    ``num_rounds`` of swaps every position's mean and variance still match (|z| < 4.5)."""
    target, tempered = gaussian_target()
    betas = torch.tensor([0.0, 0.1, 0.3, 0.6, 1.0], dtype=F64)
    gen = torch.Generator().manual_seed(8)
    mean, var = (torch.tensor(v, dtype=F64) for v in zip(*[tempered(float(b)) for b in betas]))
    x = mean[None, :, None] + var.sqrt()[None, :, None] * torch.randn(n, 5, 2, generator=gen, dtype=F64)
    ps = GeometricPath(target).evaluate(x.reshape(-1, 2))
    for i in range(num_rounds):
        ps, _, _ = swap(gen, ps, betas, n, i % 2)
    x = ps.x.reshape(n, 5, 2)
    z_mean = (x.mean(0) - mean[:, None]) / (var[:, None] / n).sqrt()
    z_var = (x.var(0) - var[:, None]) / (var[:, None] * math.sqrt(2.0 / n))
    return bool((z_mean.abs() < 4.5).all() and (z_var.abs() < 4.5).all())


def test_swaps_leave_every_tempered_distribution_invariant():
    assert _swaps_keep_each_temperature_exact(swap_step)


def test_invariance_check_rejects_swaps_that_ignore_the_densities():
    def always_swap(gen, ps, betas, n, parity):  # equal betas: every proposed swap is accepted
        return swap_step(gen, ps, torch.zeros_like(betas), n, parity)

    assert not _swaps_keep_each_temperature_exact(always_swap)


# ---------------------------------------------------------------------------- ladder
def test_ladder_update_equalises_the_communication_barrier():
    betas = torch.tensor([0.0, 0.2, 0.5, 1.0], dtype=F64)
    new, barrier = equalize_ladder(betas, torch.tensor([0.1, 0.5, 0.3], dtype=F64))
    # Lambda = (0, 0.1, 0.6, 0.9) at betas; equal thirds 0.3 and 0.6 fall at 0.32 and 0.5.
    assert torch.allclose(new, torch.tensor([0.0, 0.32, 0.5, 1.0], dtype=F64), atol=1e-5)
    assert math.isclose(barrier, 0.9, abs_tol=1e-9)
    ladder = geometric_ladder(5, 1e-2)
    assert torch.allclose(ladder, torch.tensor([0.0, 1e-2, 10 ** (-4 / 3), 10 ** (-2 / 3), 1.0], dtype=F64))


# ---------------------------------------------------------------------------- mode weights
# The diagnostics' warning is right here and filtered: 400 draws of 32 runs give a bulk ESS of
# 1100 to 1800 (seed-dependent), short of the 100 per chain (3200) asked, because a cold chain
# changes mode only through swaps; the mode shares, the point of this test, are still within 0.05
# (over 3 standard errors of a share at that ESS). Reaching 3200 would triple the run time.
@pytest.mark.filterwarnings("ignore:.*the result is unreliable:RuntimeWarning")  # no colon in it
def test_pt_recovers_the_mode_weights_of_a_6d_mixture():
    gm = mixture6()
    idata = ds.sample(gm.as_target(dtype=F64), "pt", num_samples=400, num_chains=32, seed=0, progress=False)
    draws = torch.as_tensor(idata.posterior.x.values).reshape(-1, 6)
    assert weights_agree(draws, gm, WEIGHTS)
    swap = idata.tempering.swap_rate.values[:-1]
    assert swap.max() - swap.min() < 0.1  # the adapted ladder equalises the swap rates
    attrs = idata.posterior.attrs
    assert abs(attrs["log_normalizer"] - LOG_Z) <= 3 * attrs["log_normalizer_se"]  # stepping stones
    # A wrong target (the same modes weighted 0.35 / 0.35 / 0.3) is rejected by the same check.
    wrong = mixture6((0.35, 0.35, 0.3))
    idata = ds.sample(
        wrong.as_target(dtype=F64), "pt", num_samples=400, num_chains=32, seed=0, progress=False
    )
    assert not weights_agree(torch.as_tensor(idata.posterior.x.values).reshape(-1, 6), gm, WEIGHTS)


# ---------------------------------------------------------------------------- contract
def test_pt_output_contract_and_evaluation_count():
    target, _ = gaussian_target(dim=3)
    c, r, t, w, steps = 3, 4, 60, 40, 2
    # 60 draws of 3 runs cannot reach a bulk ESS of 300 (100 per chain): the diagnostics rightly warn.
    with pytest.warns(RuntimeWarning, match=UNRELIABLE):
        idata = ds.sample(
            target,
            "pt",
            num_samples=t,
            num_chains=c,
            seed=0,
            progress=False,
            num_temperatures=r,
            num_warmup=w,
            num_mcmc_steps=steps,
        )
    x = torch.as_tensor(idata.posterior.x.values)
    assert x.shape == (c, t, 3)
    lp = torch.as_tensor(idata.sample_stats.lp.values)
    assert torch.allclose(lp, target.log_prob(x.reshape(-1, 3)).reshape(c, t), rtol=0, atol=1e-12)
    for stat in ("acceptance_rate", "diverging", "swap_acceptance"):
        assert idata.sample_stats[stat].shape == (c, t)
    group = idata.tempering
    assert group.beta.shape == (r,) and float(group.beta[0]) == 0.0 and float(group.beta[-1]) == 1.0
    assert {"swap_rate", "acceptance_rate", "step_size", "log_z_increment"} <= set(group.data_vars)
    attrs = idata.posterior.attrs
    assert attrs["num_stages"] == r and attrs["method"] == "pt"
    assert {"rhat_max", "ess_bulk_min", "ess_tail_min", "stuck_chains", "num_divergent"} <= set(attrs)
    # Validation of the c r starting points, their evaluation, then per iteration one exact
    # reference draw per chain and the moves of the other replicas.
    check = attrs["mode_check_evals"]  # the check for missed modes after the run
    check += pilot_evals(target)  # the default reference's pilot (auto_reference)
    assert attrs["num_target_evals"] == 2 * c * r + (t + w) * (c + c * (r - 1) * steps) + check


def _cold_chain_is_gaussian(idata, mean, var, z=4.5) -> bool:
    """Cold-chain mean of each coordinate within ``z`` Monte Carlo standard errors (from the
    ArviZ effective sample size) of the exact one, and the variance within 15%."""
    import arviz as az

    x = idata.posterior.x.values
    ess = az.ess(idata, var_names=["x"]).x.values
    z_mean = (x.mean((0, 1)) - mean) / (math.sqrt(var) / ess**0.5)
    return bool((abs(z_mean) < z).all() and (abs(x.var((0, 1)) / var - 1) < 0.15).all())


def test_pt_with_a_fixed_ladder_and_mcmc_at_every_temperature():
    """Without ladder adaptation and without exact reference draws (MALA at beta = 0 as well)."""
    target, tempered = gaussian_target(dim=3)
    c, r, t, steps = 8, 4, 400, 1
    idata = ds.sample(
        target,
        "pt",
        num_samples=t,
        num_chains=c,
        seed=2,
        progress=False,
        betas=[0.0, 0.3, 0.6, 1.0],
        adapt_ladder=False,
        reference_draws=False,
    )
    assert torch.allclose(
        torch.as_tensor(idata.tempering.beta.values), torch.tensor([0.0, 0.3, 0.6, 1.0], dtype=F64)
    )
    attrs = idata.posterior.attrs
    check = attrs["mode_check_evals"] + pilot_evals(target)  # and the default reference's pilot
    assert attrs["num_target_evals"] == min(16, c * r) + c * r + 2 * t * c * r * steps + check
    mean, var = tempered(1.0)
    assert _cold_chain_is_gaussian(idata, mean, var)
    assert not _cold_chain_is_gaussian(idata, mean + 0.1, var)  # a wrong target is rejected


def test_pt_single_chain_reports_a_batch_standard_error():
    target, _ = gaussian_target(dim=2)
    idata = ds.sample(target, "pt", num_samples=400, num_chains=1, seed=0, progress=False, num_temperatures=5)
    attrs = idata.posterior.attrs
    assert 0 < attrs["log_normalizer_se"] < 0.2
    assert abs(attrs["log_normalizer"] - LOG_Z) <= 3 * attrs["log_normalizer_se"]


def test_pt_refuses_bad_options():
    target, _ = gaussian_target()
    for bad in (dict(betas=[0.1, 0.5, 1.0]), dict(num_temperatures=1), dict(swap="deo"), dict(num_warmup=-1)):
        with pytest.raises(ValueError):
            ds.sample(target, "pt", num_samples=10, seed=0, progress=False, **bad)


def test_first_preconditioner_is_the_reference_variance(monkeypatch):
    # Before the first warm-up window PT preconditions every temperature by the reference draws'
    # variance. It once took their mean (clamped at 1e-12), freezing the coordinates whose mean came
    # out negative (checked: this test then fails).
    import diffstat.tempering.pt as pt

    seen, step = [], pt.pt_step

    def recording_step(generator, state, *args, **kw):
        seen.append(state.inv_mass)
        return step(generator, state, *args, **kw)

    monkeypatch.setattr(pt, "pt_step", recording_step)
    reference = D.Independent(D.Normal(torch.zeros(3, dtype=F64), 2 * torch.ones(3, dtype=F64)), 1)
    target = ds.Target(lambda x: D.Normal(1.0, 0.5).log_prob(x).sum(-1), 3, dtype=F64, reference=reference)
    # 5 draws without warm-up: the diagnostics rightly warn (too few draws to diagnose, and the
    # untuned steps, 4 times too wide for the target, are all rejected).
    with pytest.warns(RuntimeWarning, match="only 5 draws"):
        ds.sample(target, "pt", num_samples=5, num_warmup=0, num_chains=50, seed=0, progress=False)
    first = seen[0]  # a dense metric per temperature (dim <= 200), its variances the reference's
    var = first.diagonal(dim1=-2, dim2=-1)
    assert var.shape == (10, 3) and bool(((var > 2.5) & (var < 6.0)).all()), var


def test_dense_metric_per_temperature_mixes_a_correlated_posterior(monkeypatch):
    # A Gaussian with correlation 0.9995: with a dense metric per temperature the cold chains mix
    # (bulk ESS several hundred, R-hat near 1); forcing the diagonal metric (as PT had) fails this
    # (measured: R-hat 1.019, means 1.8 MCSE off, and far lower ESS).
    import arviz as az

    import diffstat.tempering.pt as pt

    rho, mean = 0.9995, torch.tensor([1.0, -1.0], dtype=F64)
    mvn = D.MultivariateNormal(mean, 0.25 * torch.tensor([[1.0, rho], [rho, 1.0]], dtype=F64))
    target = ds.Target(mvn.log_prob, 2, dtype=F64)

    def run():
        return ds.sample(target, "pt", num_samples=1000, seed=0, progress=False)

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # healthy runs: the diagnostics stay silent
        idata = run()
    ess = float(az.ess(idata)["x"].min())
    assert float(az.rhat(idata)["x"].max()) < 1.01 and ess > 400, ess
    z = (idata.posterior["x"].mean(("chain", "draw")).values - mean.numpy()) / az.mcse(idata)["x"].values
    assert abs(z).max() < 4
    monkeypatch.setattr(pt, "DENSE_MAX_DIM", 0)
    with pytest.warns(RuntimeWarning, match=UNRELIABLE):  # rightly: the diagonal metric mixes poorly
        diag = run()
    assert float(az.ess(diag)["x"].min()) < ess / 3


# ---------------------------------------------------------------------------- batched dense moves
def _correlated_path(dim=3):
    cov = 0.5 * (0.1 * torch.eye(dim, dtype=F64) + 0.9)
    target = ds.Target(
        D.MultivariateNormal(torch.linspace(-1, 1, dim, dtype=F64), cov).log_prob, dim, dtype=F64
    )
    return GeometricPath(target)


@pytest.mark.parametrize("kernel", ["mala", "hmc", "rwm"])
def test_whitened_move_is_the_move_with_the_dense_metric(kernel):
    # One temperature, a full (non-symmetric) Cholesky factor: the same random numbers give the same
    # proposals and decisions as the kernel run with the DenseMetric, up to rounding. A factor used
    # transposed (L^T u for L u) fails this.
    path, gen = _correlated_path(), torch.Generator().manual_seed(0)
    n = 12
    ps = path.evaluate(torch.randn(n, 3, generator=gen, dtype=F64))
    a = torch.randn(3, 3, generator=gen, dtype=F64)
    metric = DenseMetric.from_covariance(a @ a.T + 0.1 * torch.eye(3, dtype=F64))
    # step sizes from tiny to large, so that some proposals are accepted and some rejected
    beta, h = torch.full((n,), 0.7, dtype=F64), torch.logspace(-3.5, 0, n, dtype=F64)
    step, _ = get_kernel(kernel, 5)
    want, want_info = move(step, torch.Generator().manual_seed(1), ps, path, beta, h, metric)
    got, info = whitened_move(step, torch.Generator().manual_seed(1), ps, path, beta, h, metric.chol[None])
    assert torch.equal(info.is_accepted, want_info.is_accepted) and 0 < int(info.is_accepted.sum()) < n
    assert torch.allclose(info.acceptance_rate, want_info.acceptance_rate, rtol=0, atol=1e-12)
    for new, old in zip(got, want):
        assert torch.allclose(new, old, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kernel", ["mala", "hmc", "rwm"])
def test_batched_dense_moves_index_each_replica_by_its_temperature(kernel):
    # Four runs of three temperatures, each with its own diagonal factor, beta and step size: the
    # batched whitened move equals the diagonal moves with each row's own variances (which draw the
    # same random numbers), so each row met its own temperature's factor.
    path, gen = _correlated_path(), torch.Generator().manual_seed(2)
    c, r = 4, 3
    ps = path.evaluate(torch.randn(c * r, 3, generator=gen, dtype=F64))
    var = torch.tensor([[0.2, 0.5, 1.0], [1.5, 0.3, 0.7], [0.4, 2.0, 0.9]], dtype=F64)  # (R, dim)
    beta = torch.tensor([0.2, 0.5, 1.0], dtype=F64).repeat(c)
    h = torch.logspace(-1.5, 0.5, c * r, dtype=F64)  # some proposals accepted, some rejected
    step, _ = get_kernel(kernel, 5)
    inv_mass = var.repeat(c, 1)  # row c r + t has temperature t
    want, want_info = move(step, torch.Generator().manual_seed(3), ps, path, beta, h, inv_mass)
    chol = torch.diag_embed(var.sqrt())
    got, info = whitened_move(step, torch.Generator().manual_seed(3), ps, path, beta, h, chol)
    assert torch.equal(info.is_accepted, want_info.is_accepted)
    assert 0 < int(info.is_accepted.sum()) < c * r
    for new, old in zip(got, want):
        assert torch.allclose(new, old, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------- diagnosis
def test_a_healthy_pt_run_is_diagnosed_silently_with_its_cold_chain_statistics():
    target, _ = gaussian_target(dim=3)
    c, r, t = 4, 5, 500
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        idata = ds.sample(
            target, "pt", num_samples=t, num_chains=c, seed=0, progress=False, num_temperatures=r
        )
    attrs, stats, group = idata.posterior.attrs, idata.sample_stats, idata.tempering
    assert attrs["rhat_max"] < 1.01 and attrs["ess_bulk_min"] > 100 * c and attrs["stuck_chains"] == 0
    # sample_stats are the cold chain's: they average to the coldest temperature's figures
    acc = stats.acceptance_rate.values
    assert math.isclose(acc.mean(), float(group.acceptance_rate[-1]), rel_tol=0, abs_tol=1e-12)
    swap = stats.swap_acceptance.values  # NaN at the iterations that do not propose the coldest pair
    assert int(torch.isnan(torch.as_tensor(swap)).sum()) == c * (t // 2)
    assert math.isclose(float(torch.as_tensor(swap).nanmean()), float(group.swap_rate[-2]), abs_tol=1e-12)


def test_pt_runs_stuck_in_different_modes_are_flagged():
    # Modes at -5 and +5 (sd 0.3) and a ladder of two temperatures: a swap with the reference draw
    # (N(0, I)) is essentially never accepted, so each run's cold chain stays in the mode its warm-up
    # found. The runs disagree, and the diagnostics must say so (PT once returned R-hat 1.2 to 4.4
    # on posteriordb without a word).
    gm = GaussianMixture([[-5.0, 0.0], [5.0, 0.0]], [0.5, 0.5], scales=[0.3, 0.3])
    with pytest.warns(RuntimeWarning, match=r"R-hat .* the chains disagree"):
        idata = ds.sample(
            gm.as_target(dtype=F64),
            "pt",
            num_samples=200,
            num_chains=8,
            seed=0,
            progress=False,
            num_temperatures=2,
        )
    x = idata.posterior.x.values
    side = (x[..., 0] > 0).mean(1)  # each run's share of draws in the right-hand mode
    # runs in both modes (8 runs, each in either mode with probability 1/2), none ever crossing
    assert set(side.tolist()) == {0.0, 1.0}
    assert idata.posterior.attrs["rhat_max"] > 1.5
