"""Pooling independent runs (``diffstat.tempering.runs``) and SMC's default of four runs."""

import math
import warnings

import arviz as az
import numpy as np
import pytest
import torch
from correlated_targets import regression
from scipy import stats

import diffstat as ds
from diffstat.targets import narrow_wide, two_modes
from diffstat.tempering.runs import (
    CHI2_ALPHA,
    combine_runs,
    max_runs_rhat,
    pooled_log_z,
    runs_agreement,
    runs_rhat,
)

F64 = torch.float64


def test_pooled_log_z_is_the_log_of_the_mean_z_with_the_larger_error():
    log_zs, ses = [-1.0, -1.2, -0.9, -1.1], [0.01, 0.01, 0.01, 0.01]
    z = np.exp(log_zs)
    log_z, se = combine_runs(log_zs, ses)
    assert math.isclose(log_z, math.log(z.mean()), rel_tol=0, abs_tol=1e-14)
    assert math.isclose(se, math.sqrt(((z / z.sum()) ** 2 * 0.01**2).sum()), rel_tol=1e-12)
    # The runs' spread (sd of Z_r / Z over sqrt R) is far above the errors they claim: it is reported.
    log_z2, se2, method = pooled_log_z(log_zs, ses)
    assert log_z2 == log_z and method == "runs"
    assert math.isclose(se2, float(np.std(z / z.mean(), ddof=1) / 2), rel_tol=1e-12)
    # Runs that agree to within their errors keep the genealogy's error; one run has no spread.
    assert pooled_log_z([-1.0, -1.0001], [0.1, 0.1])[2] == "genealogy"
    assert pooled_log_z([-1.0], [0.1]) == (-1.0, 0.1, "genealogy")


def test_runs_agreement_is_cochrans_q():
    log_zs, ses = [0.0, 0.0, 0.0, 1.0], [0.1, 0.1, 0.1, 0.2]
    prec = np.array(ses) ** -2.0
    mean = (prec * log_zs).sum() / prec.sum()
    q = (prec * (np.array(log_zs) - mean) ** 2).sum()
    assert math.isclose(runs_agreement(log_zs, ses), stats.chi2.sf(q, 3), rel_tol=1e-12)
    assert runs_agreement(log_zs, ses) < CHI2_ALPHA  # 4.4 errors apart
    assert runs_agreement([0.0, 0.05, -0.05, 0.0], [0.05] * 4) > 0.5
    # Nothing to test: one run, an error of zero, a non-finite estimate.
    assert runs_agreement([0.0], [0.1]) == 1.0
    assert runs_agreement([0.0, 1.0], [0.0, 0.1]) == 1.0
    assert runs_agreement([0.0, -math.inf], [0.1, 0.1]) == 1.0


def test_smc_runs_that_disagree_are_flagged():
    """narrow_wide(4) (heavy narrow mode of weight 0.75, log Z 0) with 200 particles per run: on seed 3
    two runs lose much of the narrow mode (log Z -1.12 and -0.78, each with an error under 0.2) and
    two do not (-0.02, +0.02); the runs' disagreement is the warning. At 1,000 particles the runs
    agree (seed 0) and nothing is said."""
    target = narrow_wide(4).as_target(dtype=F64)
    with pytest.warns(RuntimeWarning, match="disagree beyond their standard errors"):
        idata = ds.sample(target, "smc", num_samples=200, seed=3, progress=False)
    per_run = np.nansum(idata.tempering.log_z_increment.values, 0)
    assert per_run.max() - per_run.min() > 0.7 and idata.posterior.attrs["runs_agreement_p"] < CHI2_ALPHA
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        idata = ds.sample(target, "smc", num_samples=1000, seed=0, progress=False)
    assert idata.posterior.attrs["runs_agreement_p"] > CHI2_ALPHA
    assert abs(idata.posterior.attrs["log_normalizer"]) < 3 * idata.posterior.attrs["log_normalizer_se"]


def test_runs_rhat_is_arviz_rank_rhat_and_its_limit_scales_with_the_particles():
    g = torch.Generator().manual_seed(0)
    draws = torch.randn(4, 300, 3, generator=g, dtype=F64)
    draws[1, :, 2] += 1.5  # one run off by 1.5 sd in one coordinate
    expected = az.rhat(az.convert_to_dataset(draws.numpy()), method="rank")["x"].values
    assert math.isclose(runs_rhat(draws), float(expected.max()), rel_tol=1e-9)
    assert runs_rhat(draws) > max_runs_rhat(300) > runs_rhat(draws[:, :, :2])
    assert math.isnan(runs_rhat(draws[:1]))
    assert max_runs_rhat(1000) == 1.03 and max_runs_rhat(10**6) == 1.01


def test_smc_runs_that_found_different_modes_are_flagged_by_their_draws():
    """two_modes(16) (weights 2/3 and 1/3, 8 apart), every run from N(0, I): the far mode's share of the
    tempered densities is tiny when the modes separate, so a run keeps it or loses it by chance. Seed
    0: one run holds it with 80% of its draws, three lose it; their log Z estimates (1.19 +- 0.9, and
    -0.63, -0.52, -0.44 near log 2/3) do not disagree beyond the first's wide error bar (p = 0.015),
    but their draws do (R-hat across runs 1.31)."""
    target = two_modes(16).as_target(dtype=F64)
    with pytest.warns(RuntimeWarning, match=r"their draws disagree \(R-hat across runs"):
        idata = ds.sample(target, "smc", num_samples=1000, seed=0, progress=False, reference_scales=(1.0,))
    attrs = idata.posterior.attrs
    assert attrs["rhat_max"] > 1.2 and attrs["runs_agreement_p"] > CHI2_ALPHA


def test_a_warning_of_every_run_is_said_once():
    """Moves capped at 2 random-walk steps hit the cap in every run; the four runs say so once."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds.sample(
            regression(), "smc", num_samples=200, seed=0, progress=False, max_mcmc_steps=2, kernel="rwm"
        )
    capped = [w for w in caught if "max_mcmc_steps" in str(w.message)]
    assert len(capped) == 1 and capped[0].category is RuntimeWarning
