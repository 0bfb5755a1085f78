"""The coverage check of the diffusion sampler's proposal at the exploration's SMC particles
(diffstat/diffusion/coverage.py): a proposal wider than the target passes with no particle missed
(its ratio p / q is bounded below 100), a narrower one fails; in the sampler, the centred Eight
Schools, whose funnel's neck the proposal misses, is bridged from the prior instead and is right."""

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import scipy.stats
import torch

import diffstat as ds
from diffstat.diffusion.coverage import MISSED_RATIO, coverage_check, coverage_reason

F64 = torch.float64
DIM = 10


class Gaussian:
    """N(0, scale^2 I_DIM) with its exact log-density."""

    def __init__(self, scale: float):
        self.scale = scale

    def log_prob(self, x):
        return -0.5 * (x / self.scale).pow(2).sum(-1) - DIM * (
            math.log(self.scale) + 0.5 * math.log(2 * math.pi)
        )


def _target():
    """Unnormalised N(0, I_DIM): log Z = (DIM / 2) log(2 pi)."""
    return ds.Target(lambda x: -0.5 * (x**2).sum(-1), DIM, dtype=F64), 0.5 * DIM * math.log(2 * math.pi)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_wider_proposal_misses_nothing_and_a_narrower_one_fails(seed):
    """Exact draws of N(0, I_10) as the particles. Under q = N(0, 1.2^2 I) the ratio p / (Z q) is at
    most 1.2^10 = 6.2 < 100 everywhere, so no particle is missed (exactly 0); under q = N(0, 0.7^2 I)
    log(p / (Z q)) = 0.52 |x|^2 - 3.57, above log 100 where |x|^2 > 15.7, chi-square(10) mass 0.109:
    the share is that within binomial error, and the check fails with a reason that gives it."""
    target, log_z = _target()
    x = torch.randn(2000, DIM, generator=torch.Generator().manual_seed(seed), dtype=F64)
    wide = coverage_check(target, x, Gaussian(1.2), log_z)
    assert wide["missed"] == 0.0 and wide["points"] == 2000 and wide["evals"] == 2000
    assert coverage_reason(wide) is None
    narrow = coverage_check(target, x, Gaussian(0.7), log_z)
    threshold = (math.log(MISSED_RATIO) - DIM * math.log(0.7)) / (0.5 / 0.49 - 0.5)  # 15.7, on |x|^2
    share = scipy.stats.chi2(DIM).sf(threshold)
    assert abs(narrow["missed"] - share) < 4 * math.sqrt(share * (1 - share) / 2000)
    assert f"{narrow['missed']:.0%} of the 2000 particles" in coverage_reason(narrow)


def test_particles_where_the_target_is_not_finite_are_left_out():
    target = ds.Target(lambda x: torch.where(x[:, 0] > 3, -math.inf, -0.5 * (x**2).sum(-1)), DIM, dtype=F64)
    x = torch.zeros(4, DIM, dtype=F64)
    x[0, 0] = 5.0
    check = coverage_check(target, x, Gaussian(1.0), 0.5 * DIM * math.log(2 * math.pi))
    assert check["points"] == 3 and check["missed"] == 0.0


Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], dtype=F64)
SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], dtype=F64)
#: log p(y) of the centred Eight Schools by quadrature over tau (mu integrated in closed form).
LOG_Z = -31.31135


def centred_schools(y, sigma):
    """mu ~ N(0, 5), tau ~ HalfCauchy(5), theta_j ~ N(mu, tau), y_j ~ N(theta_j, sigma_j)."""
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(torch.tensor(5.0, dtype=F64)))
    with pyro.plate("schools", 8):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def exact_log_tau_mean() -> float:
    """E[log tau | y] by quadrature on a grid of log tau (the same marginal as LOG_Z)."""
    u = torch.linspace(-25.0, 10.0, 200_001, dtype=F64)
    tau = u.exp()
    v = SIGMA**2 + tau[:, None] ** 2
    prec = 1 / 25.0 + (1 / v).sum(1)
    m = (Y / v).sum(1) / prec
    log_w = -0.5 * v.log().sum(1) - 0.5 * (Y**2 / v).sum(1) + 0.5 * prec * m**2 - 0.5 * prec.log()
    log_w = log_w - torch.log1p((tau / 5) ** 2) + u
    return float((torch.softmax(log_w, 0) * u).sum())


def test_where_the_proposal_misses_the_centred_eight_schools_neck_the_bridge_starts_from_the_prior():
    """Seed 0 at defaults: the last round's proposal puts less than 1/100 of the posterior's density on
    about 29% of the exploration's SMC particles (the funnel's neck; 5% passes), so the rounds are
    not used: the SMC bridge tempers from the prior, as the exploration's SMC did, and its log Z and
    E[log tau] agree with quadrature, where the rounds' log Z is about 0.3 too low (the neck's mass).
    The run still warns: the bridge's last stage mixes slowly in the neck."""
    target = ds.Target.from_pyro(centred_schools, Y, SIGMA)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = ds.sample(target, "diffusion", num_samples=1000, seed=0, progress=False)
    attrs = idata.posterior.attrs
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert attrs["coverage_points"] == 256 and attrs["coverage_missed"] > 0.15
    assert any("particles of the exploration's SMC run" in m for m in said), said
    assert any("The SMC bridge from the reference that replaced them" in m for m in said), said
    assert attrs["bridge_start"] == "reference" and attrs["correction"] == "smc"
    assert abs(attrs["log_normalizer"] - LOG_Z) < 3 * attrs["log_normalizer_se"] + 0.02
    assert attrs["importance_log_normalizer"] - LOG_Z < -0.15  # what the rounds alone said
    log_tau = np.log(idata.posterior["tau"].values.ravel())
    assert abs(log_tau.mean() - exact_log_tau_mean()) < 4 * log_tau.std() / np.sqrt(500)  # ESS >= 500
