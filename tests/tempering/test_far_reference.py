"""The default reference of a geometric path: N(0, I) kept where the posterior is within its reach
(same draws as before), a Gaussian fitted to the peaks where it is far (``auto_reference``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import diffstat as ds
from diffstat.diffusion import modes
from diffstat.tempering.ais_plan import _pilot_run
from diffstat.tempering.auto_reference import REACH, default_reference
from diffstat.tempering.core import initial_particles
from diffstat.tempering.path import GeometricPath, make_path
from diffstat.tempering.smc import adaptive_tempered_smc

F64 = torch.float64
LOG_Z = 2.5 * math.log(2 * math.pi)


def far_gauss():
    """N(m, I) in 5-d, m = 1000 (1, -1, 1, -1, 1), written unnormalised as -|x - m|^2 / 2 (a
    posterior far from the origin, as unstandardised data give): log Z = (5/2) log(2 pi).
    (The sixth audit's case, ``benchmarks/audit_cases_sixth_b.py`` on branch ``audit6b``.)"""
    m = 1000.0 * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0], dtype=F64)

    def log_prob(x):
        return -0.5 * ((x - m.to(x.dtype)) ** 2).sum(-1)

    return ds.Target(log_prob, 5, dtype=F64), m.numpy()


def near_gauss():
    """N(mu, 0.3^2 I) in 3-d, mu = (0.5, -2, 3): 3.6 sds of N(0, I) from the origin."""
    mu = torch.tensor([0.5, -2.0, 3.0], dtype=F64)
    return ds.Target(lambda x: -0.5 * (((x - mu.to(x.dtype)) / 0.3) ** 2).sum(-1), 3, dtype=F64)


def _mean_sd_errors(idata, m):
    x = idata.posterior["x"].values.reshape(-1, m.shape[0])
    return np.abs(x.mean(0) - m).max(), np.abs(x.std(0) - 1.0).max()


# The draws' mean error in sds: the runs' draws after resampling have an ESS of at least ~1000
# (4000 SMC draws, 1000 AIS draws), so 0.15 is about 5 Monte Carlo standard errors; a posterior
# shifted by 0.3 sd (a wrong target) would be rejected.
MEAN_TOL, SD_TOL = 0.15, 0.1


@pytest.mark.parametrize("method", ["smc", "ais"])
def test_far_target_right(method):
    target, m = far_gauss()
    idata = ds.sample(target, method, num_samples=1000, seed=0, progress=False)
    mean_err, sd_err = _mean_sd_errors(idata, m)
    assert mean_err < MEAN_TOL and sd_err < SD_TOL
    # the same check rejects a target whose mean is 0.3 sd off (the test can fail)
    assert _mean_sd_errors(idata, m + 0.3)[0] > MEAN_TOL
    a = idata.posterior.attrs
    assert abs(a["log_normalizer"] - LOG_Z) < 4 * a["log_normalizer_se"] + 0.05
    info = target._default_reference
    assert info["reference"] == "fitted" and info["distance"] > REACH
    assert 0 < info["pilot_evals"] < 1000
    assert a["reference_source"] == "fitted" and a["reference_pilot_evals"] == info["pilot_evals"]
    # SMC's runs from wider references widen N(0, I) only: from a fitted reference they all share it
    assert "reference_scales" not in a


def test_far_mean_fifty_in_ten_dims_right():
    m = 50.0 * torch.ones(10, dtype=F64)
    target = ds.Target(lambda x: -0.5 * ((x - m.to(x.dtype)) ** 2).sum(-1), 10, dtype=F64)
    idata = ds.sample(target, "smc", num_samples=1000, seed=0, progress=False)
    mean_err, sd_err = _mean_sd_errors(idata, m.numpy())
    assert mean_err < MEAN_TOL and sd_err < SD_TOL
    assert target._default_reference["reference"] == "fitted"


def test_fitted_reference_covers_the_posterior():
    """The fit is centred on the mode and twice as wide as the posterior (WIDEN)."""
    target, m = far_gauss()
    ref = default_reference(target)
    assert torch.allclose(ref.mean, torch.as_tensor(m), atol=1e-6)
    assert torch.allclose(ref.covariance_matrix, 4.0 * torch.eye(5, dtype=F64), atol=1e-4)


def _smc(path, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = initial_particles(path, 200, gen, "cpu")
    return adaptive_tempered_smc(gen, path, x0)


def test_near_target_keeps_standard_reference_and_draws():
    """Within reach N(0, I) is kept: the same draws as a path built without the pilot, whose
    evaluations are the only difference in the count (the caller's generator is not consumed)."""
    target = near_gauss()
    auto = make_path(target)
    out = _smc(auto)
    evals = target.num_target_evals
    assert auto.reference_source == "N(0, I)" and auto.reference is None
    pilot = target._default_reference["pilot_evals"]
    assert pilot > 0 and target._default_reference["distance"] < REACH
    plain = GeometricPath(target)
    before = target.num_target_evals
    out2 = _smc(plain)
    assert torch.equal(out.particles.x, out2.particles.x)
    assert torch.equal(out.log_weights, out2.log_weights)
    assert evals - pilot == target.num_target_evals - before


def test_decision_cached_on_target():
    target, _ = far_gauss()
    make_path(target).sample_reference(4, torch.Generator().manual_seed(0))
    n = target.num_target_evals
    path = make_path(target)
    path.sample_reference(4, torch.Generator().manual_seed(0))
    assert target.num_target_evals == n and path.reference_source == "fitted"


def test_given_or_own_reference_untouched():
    target, _ = far_gauss()
    ref = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(5, dtype=F64), 1.0), 1)
    path = make_path(target, ref)
    path.sample_reference(4, torch.Generator().manual_seed(0))
    assert path.reference is ref and path.reference_source == "given"
    assert not hasattr(target, "_default_reference") and target.num_target_evals == 0


def test_out_of_stages_errors_advise_a_reference():
    target, _ = far_gauss()
    plain = GeometricPath(target)  # N(0, I) without the pilot: the crash of the audit
    x0 = initial_particles(plain, 50, torch.Generator().manual_seed(0), "cpu")
    with pytest.raises(RuntimeError, match="pass reference= a distribution near the posterior"):
        adaptive_tempered_smc(torch.Generator().manual_seed(0), plain, x0, max_stages=5)
    with pytest.raises(RuntimeError, match="AIS pilot did not reach.*pass reference="):
        _pilot_run(torch.Generator().manual_seed(0), plain, 50, {"max_stages": 5})
    given = make_path(
        target, torch.distributions.MultivariateNormal(torch.zeros(5, dtype=F64), torch.eye(5, dtype=F64))
    )
    x0 = initial_particles(given, 50, torch.Generator().manual_seed(0), "cpu")
    with pytest.raises(RuntimeError, match="raise max_stages or lower target_ess"):
        adaptive_tempered_smc(torch.Generator().manual_seed(0), given, x0, max_stages=5)


def test_smc_seeds_go_on_without_seeds(monkeypatch):
    target = near_gauss()

    def out_of_stages(*args, **kwargs):
        raise RuntimeError("SMC did not reach beta = 1 in 1000 stages (beta = 0.4); ...")

    monkeypatch.setattr(modes, "adaptive_tempered_smc", out_of_stages)
    assert modes.smc_seeds(torch.Generator().manual_seed(0), target, 64) is None

    def other(*args, **kwargs):
        raise RuntimeError("the user's own error")

    monkeypatch.setattr(modes, "adaptive_tempered_smc", other)
    with pytest.raises(RuntimeError, match="the user's own error"):
        modes.smc_seeds(torch.Generator().manual_seed(0), target, 64)
