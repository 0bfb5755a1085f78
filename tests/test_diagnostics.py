"""MCMC diagnostics: R-hat, ESS and E-BFMI against arviz and closed forms on synthetic chains, and
the one RuntimeWarning of ``ds.sample`` provoked by each failure (stuck chain, chains in two
modes, divergences) but silent on a healthy run."""

import warnings

import arviz as az
import numpy as np
import pytest
import torch

import diffstat as ds
from diffstat.diagnostics import (
    ESS_PER_CHAIN,
    RANK_CHAINS,
    e_bfmi,
    ess_needed,
    many_chain_diagnostics,
    mcmc_diagnostics,
    rank_diagnostics,
)
from diffstat.rank_stats import rank_chain_subset, split_rhat
from diffstat.targets import Funnel

F64 = torch.float64


def ar1(seed, rho, chains, n, dim=1):
    """Stationary AR(1) chains x_t = rho x_{t-1} + sqrt(1 - rho^2) e_t, shape (chains, n, dim)."""
    rng = np.random.default_rng(seed)
    x = np.empty((chains, n, dim))
    x[:, 0] = rng.normal(size=(chains, dim))
    e = rng.normal(size=(chains, n, dim)) * np.sqrt(1 - rho**2)
    for t in range(1, n):
        x[:, t] = rho * x[:, t - 1] + e[:, t]
    return x


def sample_quietly(*args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = ds.sample(*args, progress=False, **kwargs)
    return idata, [w for w in caught if issubclass(w.category, RuntimeWarning)]


# ------------------------------------------------------------------------- synthetic chains
def test_rhat_and_ess_match_arviz_per_coordinate():
    x = ar1(0, 0.3, 4, 500, dim=3)
    x[2, :, 1] += 0.5  # coordinate 1: one chain shifted by half an sd
    d = mcmc_diagnostics(x)
    rhat = [az.rhat(x[..., j], method="rank") for j in range(3)]
    bulk = [az.ess(x[..., j], method="bulk") for j in range(3)]
    tail = [az.ess(x[..., j], method="tail") for j in range(3)]
    assert d.rhat_max == pytest.approx(max(rhat), rel=1e-12) and int(np.argmax(rhat)) == 1
    assert d.rhat_max > 1.01 and max(rhat[0], rhat[2]) < 1.01  # only the shifted coordinate fails
    assert d.ess_bulk_min == pytest.approx(min(bulk), rel=1e-12)
    assert d.ess_tail_min == pytest.approx(min(tail), rel=1e-12)
    assert any("R-hat" in m and "coordinate 1" in m for m in d.messages)


def arviz_rank_diagnostics(x):
    """arviz's rank R-hat (on the two halves of a single chain, as mcmc_diagnostics feeds it), bulk
    and tail ESS of every coordinate of ``x: (chain, draw, dim)``."""
    chains, n, _ = x.shape
    split = x if chains > 1 else x[:, : 2 * (n // 2)].reshape(2, n // 2, -1)
    return (
        az.rhat({"x": split}, method="rank")["x"].values,
        az.ess({"x": x}, method="bulk")["x"].values,
        az.ess({"x": x}, method="tail")["x"].values,
    )


@pytest.mark.parametrize(
    "chains, n, rho",
    [(4, 200, 0.3), (1, 101, 0.5), (3, 51, -0.4), (7, 9, 0.0), (2, 8, 0.9), (1, 8, 0.2), (4, 400, 0.97)],
)
def test_rank_diagnostics_reproduce_arviz(chains, n, rho):
    # every branch: one chain (R-hat on quarters), odd and tiny draw counts (Geyer's loop never runs
    # at n = 8 split), strong and negative autocorrelation, and per coordinate: AR(1) draws, heavy
    # ties (three values), ties on a grid, Cauchy tails, a constant, one chain shifted, a NaN, held draws
    rng = np.random.default_rng(chains * 1000 + n)
    x = ar1(n, rho, chains, n, dim=9)
    x[..., 1] = rng.integers(0, 3, size=(chains, n))
    x[..., 2] = np.round(x[..., 2] * 2) / 2
    x[..., 3] = rng.standard_cauchy(size=(chains, n)) ** 3
    x[..., 4] = 1.5
    x[0, :, 5] += 1.0
    x[..., 6] = np.where(np.arange(n) < n // 3, x[..., 6], 0.0)  # ties at the median and quantiles
    x[0, n // 2, 7] = np.nan  # a NaN draw: that coordinate's figures are NaN
    for t in range(1, n):  # repeats, as MCMC rejections leave them: about 40% of steps hold the draw
        x[:, t, 8] = np.where(rng.random(chains) < 0.4, x[:, t - 1, 8], x[:, t, 8])
    for mine, theirs in zip(rank_diagnostics(x), arviz_rank_diagnostics(x)):
        np.testing.assert_allclose(mine, theirs, rtol=1e-10, atol=0)


def test_ess_of_ar1_chains_is_n_1_minus_rho_over_1_plus_rho():
    # Bulk ESS of AR(1) is n (1 - rho) / (1 + rho); the estimator's relative sd at 4 x 2000 draws,
    # rho = 0.5, measured over 40 seeds, is 6.7%: 4 sds is a 27% band.
    n = 4 * 2000
    d = mcmc_diagnostics(ar1(1, 0.5, 4, 2000))
    assert abs(d.ess_bulk_min / (n * 0.5 / 1.5) - 1) < 4 * 0.067
    # the same band rejects the ESS of the wrong correlation (rho = 0.8) and of iid draws
    assert abs(d.ess_bulk_min / (n * 0.2 / 1.8) - 1) > 4 * 0.067
    assert abs(d.ess_bulk_min / n - 1) > 4 * 0.067
    assert d.rhat_max < 1.01 and d.messages == ()


def test_low_ess_is_reported_per_chain():
    # rho = 0.99: ESS about 4 x 300 x 0.005 = 6, far below 100 per chain.
    d = mcmc_diagnostics(ar1(2, 0.99, 4, 300))
    assert d.ess_bulk_min < ESS_PER_CHAIN * 4
    assert any("ESS" in m and "400 for 4 chains" in m for m in d.messages)


def test_ess_threshold_is_100_per_chain_up_to_four_chains():
    assert [ess_needed(c) for c in (1, 2, 4, 1000)] == [100, 200, 400, 400]
    # 1,000 well-mixed chains of 50 iid draws: ESS about 50,000, far above Vehtari et al.'s 400 (100
    # per chain for all 1,000 chains would ask 100,000 and warn)
    many = mcmc_diagnostics(ar1(10, 0.0, 1000, 50, dim=2))
    assert 400 < many.ess_bulk_min < 100 * 1000 and many.messages == ()
    # 4 chains of AR(1) draws with rho = 0.85: ESS about 4000 x 0.15 / 1.85 = 324, above 100 per
    # chain for one chain's worth but below the 400 four chains need
    few = mcmc_diagnostics(ar1(11, 0.85, 4, 1000))
    assert 100 < few.ess_bulk_min < 400
    assert any("ESS" in m and "below 400 for 4 chains" in m for m in few.messages)


def test_e_bfmi_of_ar1_energy_is_2_1_minus_rho():
    # E-BFMI -> 2 (1 - rho) for an AR(1) energy; per-chain sd measured 0.028 at 1000 draws, rho = 0.9
    # (40 seeds), so the mean of 4 chains has sd 0.014.
    energy = ar1(3, 0.9, 4, 1000)[..., 0]
    b = e_bfmi(energy)
    assert abs(b.mean() - 0.2) < 4 * 0.014
    # arviz's estimate (mean square difference over variance) agrees up to the variance's n / (n - 1)
    np.testing.assert_allclose(b, az.bfmi(energy), rtol=1.5 / 1000)
    iid = e_bfmi(ar1(3, 0.0, 4, 1000)[..., 0])
    assert abs(iid.mean() - 0.2) > 4 * 0.014 and abs(iid.mean() - 2.0) < 0.1  # iid: about 2
    stats = {"energy": energy, "lp": -energy}
    d = mcmc_diagnostics(ar1(4, 0.0, 4, 1000), stats)
    assert d.e_bfmi_min == pytest.approx(b.min())
    assert any("E-BFMI" in m for m in d.messages)
    healthy = mcmc_diagnostics(ar1(4, 0.0, 4, 1000), {"energy": ar1(5, 0.0, 4, 1000)[..., 0]})
    assert healthy.messages == () and healthy.e_bfmi_min > 1.5


def test_stuck_and_low_lp_chains():
    x = ar1(6, 0.0, 4, 400, dim=2)
    lp = -0.5 * (x**2).sum(-1)
    acc = np.full((4, 400), 0.6)
    acc[1] = 0.01
    # chain 3 sits in a minor mode whose log-density is 5 nats lower (lp sd is 1 in 2-d)
    d = mcmc_diagnostics(x, {"lp": lp - 5.0 * (np.arange(4) == 3)[:, None], "acceptance_rate": acc})
    assert d.stuck_chains == (1,) and d.low_lp_chains == (3,)
    # a gap of 1 nat (1 sd) is Monte Carlo scale, not flagged
    d1 = mcmc_diagnostics(x, {"lp": lp - 1.0 * (np.arange(4) == 3)[:, None]})
    assert d1.low_lp_chains == () and d1.stuck_chains == ()
    # without acceptance rates, a chain that never moves is stuck
    x[2] = x[2, 0]
    assert mcmc_diagnostics(x).stuck_chains == (2,)


def test_one_chain_uses_split_rhat():
    steady = mcmc_diagnostics(ar1(7, 0.2, 1, 1000))
    assert steady.rhat_max < 1.01 and steady.messages == ()
    drift = ar1(7, 0.2, 1, 1000)
    drift[0, 500:] += 1.0  # the second half moved: split R-hat sees it
    d = mcmc_diagnostics(drift)
    assert d.rhat_max > 1.01 and any("One chain" in m for m in d.messages)


def test_bad_input_and_too_few_draws():
    with pytest.raises(ValueError, match="chain, draw, dim"):
        mcmc_diagnostics(np.zeros((4, 10)))
    with pytest.raises(ValueError, match="lp"):
        mcmc_diagnostics(np.zeros((4, 10, 2)), {"lp": np.zeros((4, 9))})
    with pytest.raises(ValueError, match="energy"):
        e_bfmi(np.zeros(10))
    d = mcmc_diagnostics(ar1(8, 0.0, 4, 5))
    assert np.isnan(d.rhat_max) and any("too few" in m for m in d.messages)


# ------------------------------------------------------------------------- many chains
def test_many_chains_rank_ess_of_a_subset_and_split_rhat_of_all():
    x = ar1(12, 0.3, 200, 61, dim=4)
    x[5, :, 3] += 0.5  # chain 5 (not in the subset) shifted in coordinate 3
    subset = rank_chain_subset(200, RANK_CHAINS)
    assert len(subset) == RANK_CHAINS and 5 not in subset and subset[0] == 0 and subset[-1] == 199
    rhat, bulk, tail = many_chain_diagnostics(x, RANK_CHAINS)
    _, sub_bulk, sub_tail = rank_diagnostics(x[subset])
    np.testing.assert_allclose(bulk, sub_bulk * 200 / RANK_CHAINS, rtol=1e-12)
    np.testing.assert_allclose(tail, sub_tail * 200 / RANK_CHAINS, rtol=1e-12)
    median = np.median(x[subset].reshape(-1, 4), axis=0)
    np.testing.assert_allclose(rhat, np.maximum(split_rhat(x), split_rhat(np.abs(x - median))), rtol=1e-12)
    # the folded draws see chains whose spread differs: a tenth of the chains at twice the sd
    wide = ar1(15, 0.0, 200, 100, dim=1)
    wide[::10] *= 2.0
    assert split_rhat(wide)[0] < 1.01 < many_chain_diagnostics(wide, RANK_CHAINS)[0][0]
    # split_rhat is arviz's split R-hat of the draws, also for a mean far from zero
    x[..., 1] = 1e4 + 1e-2 * x[..., 1]
    for draws in (x, x.astype(np.float32)):  # float32 draws are summed in float64
        arviz_split = [az.rhat(draws[..., j].astype(float), method="split") for j in range(4)]
        np.testing.assert_allclose(split_rhat(draws), arviz_split, rtol=1e-10)
    # up to RANK_CHAINS chains everything is computed on all of them
    assert mcmc_diagnostics(x[:RANK_CHAINS]).ess_bulk_min == pytest.approx(
        rank_diagnostics(x[:RANK_CHAINS])[1].min(), rel=1e-12
    )
    # a NaN draw in a chain outside the subset: that coordinate's figures are NaN, as with all chains
    x[7, 3, 2] = np.nan
    assert all(np.isnan(v[2]) and not np.isnan(v[1]) for v in many_chain_diagnostics(x, RANK_CHAINS))


def test_many_chains_ess_of_ar1_chains():
    # 200 AR(1) chains of 100 draws, rho = 0.5: ESS n (1 - rho) / (1 + rho) = 6667; the scaled
    # 16-chain estimate measured over 40 seeds: mean 1.053 of it, relative sd 0.113, so 4 sds is 0.45
    truth = 200 * 100 * 0.5 / 1.5
    d = mcmc_diagnostics(ar1(13, 0.5, 200, 100))
    assert abs(d.ess_bulk_min / truth - 1) < 4 * 0.113
    # the band rejects the ESS of iid draws and of rho = 0.8
    assert abs(d.ess_bulk_min / (200 * 100) - 1) > 4 * 0.113
    assert abs(d.ess_bulk_min / (200 * 100 * 0.2 / 1.8) - 1) > 4 * 0.113


def test_many_chains_warn_on_chains_outside_the_rank_subset():
    x = ar1(14, 0.0, 1000, 100, dim=2)
    lp = -0.5 * (x**2).sum(-1)
    assert 5 not in rank_chain_subset(1000, RANK_CHAINS)
    far = x.copy()
    # one chain of 1,000 ten sds out: B = 50 * 100 / 1000 over halves of 50, R-hat about 1.04
    far[5] += 10.0
    d = mcmc_diagnostics(far, {"lp": -0.5 * (far**2).sum(-1)})
    assert d.rhat_max > 1.03 and d.low_lp_chains == (5,)
    assert any("R-hat" in m for m in d.messages) and any("far below" in m for m in d.messages)
    # neither would the 16 ranked chains, nor the rank R-hat of all chains (the scores saturate)
    assert rank_diagnostics(far[rank_chain_subset(1000, RANK_CHAINS)])[0].max() < 1.01
    assert rank_diagnostics(far)[0].max() < 1.01
    # a tenth of the chains in a second mode of equal density: R-hat, whichever chains they are
    modes = x.copy()
    modes[1::10] += 12.0
    d = mcmc_diagnostics(modes, {"lp": lp})
    assert d.rhat_max > 1.5 and any("R-hat" in m for m in d.messages)
    assert mcmc_diagnostics(x, {"lp": lp}).messages == ()


# ------------------------------------------------------------------------- through ds.sample
def test_healthy_run_is_silent_and_reports_figures():
    target = ds.Target(lambda x: -0.5 * (x**2).sum(-1), 2, dtype=F64)
    idata, caught = sample_quietly(target, "mala", num_samples=1000, num_chains=4, seed=0)
    assert caught == []
    attrs = idata.posterior.attrs
    assert attrs["rhat_max"] < 1.01 and attrs["ess_bulk_min"] > 400 and attrs["ess_tail_min"] > 400
    assert attrs["num_divergent"] == 0 and attrs["stuck_chains"] == 0 and attrs["low_lp_chains"] == 0
    # the helper on the returned InferenceData agrees
    d = ds.diagnose(idata)
    assert d.ok and d.rhat_max == pytest.approx(attrs["rhat_max"])


def test_chain_stuck_in_a_far_tail_warns_once():
    # x^4 potential: at x = 10 the gradient is 1000 and a MALA step fit for the mode (0.3, no warm-up:
    # the default warm-up's per-chain step sizes and start phase would rescue the chain) overshoots by
    # hundreds, so the chain started there never accepts.
    target = ds.Target(lambda x: -0.25 * (x**4).sum(-1), 2, dtype=F64)
    init = torch.zeros(4, 2, dtype=F64)
    init[3] = 10.0
    with pytest.warns(RuntimeWarning, match=r"(?s)chains stuck \(chain 3.*far below the others") as record:
        idata = ds.sample(
            target,
            "mala",
            num_samples=300,
            num_chains=4,
            seed=0,
            init=init,
            progress=False,
            num_warmup=0,
            step_size=0.3,
        )
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1  # one warning
    assert idata.posterior.attrs["stuck_chains"] == 1 and idata.posterior.attrs["low_lp_chains"] == 1
    # the same run started near the mode is clean
    _, caught = sample_quietly(
        target,
        "mala",
        num_samples=300,
        num_chains=4,
        seed=0,
        init=torch.zeros(2),
        num_warmup=0,
        step_size=0.3,
    )
    assert not any("stuck" in str(w.message) for w in caught)


def test_chains_in_two_modes_warn_rhat():
    def log_prob(x):
        return torch.logaddexp(-0.5 * ((x - 6) ** 2).sum(-1), -0.5 * ((x + 6) ** 2).sum(-1))

    target = ds.Target(log_prob, 2, dtype=F64)
    init = torch.tensor([[6.0, 6.0], [6.0, 6.0], [-6.0, -6.0], [-6.0, -6.0]], dtype=F64)
    with pytest.warns(RuntimeWarning, match=r"(?s)R-hat.*'smc', 'pt' or 'diffusion'"):
        idata = ds.sample(target, "mala", num_samples=300, num_chains=4, seed=0, init=init, progress=False)
    assert idata.posterior.attrs["rhat_max"] > 1.5
    # all four chains in one mode: R-hat is fine (it cannot see the other mode). 2,000 draws: at 300
    # the R-hat of chains in one mode exceeds 1.01 by chance on 4 seeds of 10 (up to 1.025); at 2,000
    # it is under 1.002 unless a chain did cross (seed 3 of 0-9: 1.58, rightly flagged). The check for
    # missed modes sees it: half of the mass, exactly (two equal Gaussian modes).
    idata, caught = sample_quietly(target, "mala", num_samples=2000, num_chains=4, seed=0, init=init[0])
    assert not any("chains disagree" in str(w.message) for w in caught)
    assert any("no draw reaches" in str(w.message) for w in caught)
    assert abs(idata.posterior.attrs["missed_mode_share"] - 0.5) < 0.01


def test_divergences_in_a_funnel_warn():
    target = Funnel(3).as_target(dtype=F64)
    with pytest.warns(RuntimeWarning, match=r"divergent transitions .*target_accept"):
        idata = ds.sample(target, "hmc", num_samples=300, num_chains=4, seed=0, progress=False)
    assert idata.posterior.attrs["num_divergent"] > 0
    assert idata.sample_stats["diverging"].values.sum() == idata.posterior.attrs["num_divergent"]


def test_diagnose_any_inference_data_with_several_variables():
    x = ar1(9, 0.0, 4, 400, dim=3)
    x[1, :, 2] += 1.0  # chain 1 of variable "b" disagrees
    posterior = {"a": x[..., 0], "b": x[..., 1:]}
    idata = az.from_dict(posterior=posterior, sample_stats={"lp": -(x**2).sum(-1)})
    with pytest.warns(
        RuntimeWarning, match=r"MCMC: the result is unreliable:\n  - R-hat .* \(coordinate 2\)"
    ):
        d = ds.diagnose(idata)
    assert d.num_chains == 4 and d.num_draws == 400 and d.rhat_max > 1.01
    clean = az.from_dict(posterior={"a": x[..., 0]})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert ds.diagnose(clean).ok
    with pytest.raises(ValueError, match="InferenceData"):
        ds.diagnose(x)


def test_many_chains_provoked_failures_warn_through_ds_sample():
    # the two provoked failures above with 64 chains, beyond RANK_CHAINS: the far-tail chain (5) is
    # not among the ranked chains
    target = ds.Target(lambda x: -0.25 * (x**4).sum(-1), 2, dtype=F64)
    init = torch.zeros(64, 2, dtype=F64)
    init[5] = 10.0
    with pytest.warns(RuntimeWarning, match=r"(?s)chains stuck \(chain 5\D.*far below the others"):
        ds.sample(target, "mala", num_samples=300, num_chains=64, seed=0, init=init, progress=False,
                  num_warmup=0, step_size=0.3)  # fmt: skip

    def log_prob(x):
        return torch.logaddexp(-0.5 * ((x - 6) ** 2).sum(-1), -0.5 * ((x + 6) ** 2).sum(-1))

    bimodal = ds.Target(log_prob, 2, dtype=F64)
    init = torch.full((64, 2), 6.0, dtype=F64)
    init[1::2] = -6.0
    with pytest.warns(RuntimeWarning, match=r"(?s)R-hat.*'smc', 'pt' or 'diffusion'"):
        idata = ds.sample(bimodal, "mala", num_samples=300, num_chains=64, seed=0, init=init, progress=False)
    assert idata.posterior.attrs["rhat_max"] > 1.5
    _, caught = sample_quietly(bimodal, "mala", num_samples=300, num_chains=64, seed=0, init=init[0])
    assert not any("chains disagree" in str(w.message) for w in caught)
    assert any("no draw reaches" in str(w.message) for w in caught)
