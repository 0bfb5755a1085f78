"""The Stein check of the diffusion sampler's draws (diffstat/diffusion/stein.py): exact draws pass,
draws of the wrong spread fail in the coordinate that is off; in the sampler a failure warns and sets
``reliable`` 0 without starting the SMC bridge, and a check that passes leaves the draws as they were."""

import warnings

import pytest
import torch

import diffstat as ds
import diffstat.diffusion.sampler as sampler_module
import diffstat.diffusion.stein as stein_module
from diffstat.diffusion.stein import STEIN_TOLERANCE, stein_check, stein_reason

F64 = torch.float64


def _gaussian(dim: int):
    return ds.Target(lambda x: -0.5 * (x**2).sum(-1), dim, dtype=F64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_draws_pass_and_narrow_draws_fail(seed):
    """4,096 exact draws of N(0, I_20), equally weighted, pass (every |z| below 5); the same draws
    with one coordinate shrunk by 0.9 (variance 0.81: S = 0.19, about 10 standard errors) fail in
    that coordinate alone, and the reason names it; with the weights that make them exact again
    (p / q for the shrunk proposal), they pass."""
    g = torch.Generator().manual_seed(seed)
    target = _gaussian(20)
    x = torch.randn(4096, 20, generator=g, dtype=F64)
    check = stein_check(target, x, torch.zeros(4096, dtype=F64), torch.Generator().manual_seed(seed))
    assert not bool(check["fails"].any()) and float(check["z"].max()) < 5
    assert check["evals"] <= 4096 and check["stat"].abs().max() < STEIN_TOLERANCE
    narrow = x.clone()
    narrow[:, 3] *= 0.9
    check = stein_check(target, narrow, torch.zeros(4096, dtype=F64), torch.Generator().manual_seed(seed))
    assert check["fails"].tolist() == [j == 3 for j in range(20)]
    assert abs(float(check["stat"][3]) - 0.19) < 0.06
    assert "x[3]" in stein_reason(check) and "1 of 20" in stein_reason(check)
    log_w = -0.5 * narrow[:, 3] ** 2 + 0.5 * (narrow[:, 3] / 0.9) ** 2  # p / q, q = N(0, 0.81) in x[3]
    check = stein_check(target, narrow, log_w, torch.Generator().manual_seed(seed))
    assert not bool(check["fails"].any()) and stein_reason(check) is None


def test_too_wide_draws_fail_and_heavy_tails_pass():
    """Draws 1.15 times too wide fail (S = 1 - 1.3225 < 0); exact draws of a 4-d Student-t with 5
    degrees of freedom (x d/dx log p is bounded there) pass."""
    g = torch.Generator().manual_seed(3)
    x = 1.15 * torch.randn(4096, 4, generator=g, dtype=F64)
    check = stein_check(_gaussian(4), x, torch.zeros(4096, dtype=F64), torch.Generator().manual_seed(0))
    assert bool(check["fails"].all()) and float(check["stat"].max()) < -0.2
    nu, d = 5.0, 4
    t = ds.Target(lambda x: -0.5 * (nu + d) * torch.log1p((x**2).sum(-1) / nu), d, dtype=F64)
    chi2 = (torch.randn(4096, 5, generator=g, dtype=F64) ** 2).sum(-1)
    xt = torch.randn(4096, d, generator=g, dtype=F64) * torch.sqrt(nu / chi2)[:, None]
    check = stein_check(t, xt, torch.zeros(4096, dtype=F64), torch.Generator().manual_seed(0))
    assert not bool(check["fails"].any())


#: A cheap per-mode Gaussian importance run (no score model) on a correlated 3-d Gaussian.
FEW = dict(
    num_explore=200,
    max_rounds=2,
    gaussian_rounds=2,
    num_proposals=1000,
    chains_per_mode=32,
    refresh_chains=32,
)


def _correlated():
    cov = 0.5 * torch.eye(3, dtype=F64) + 0.5
    return ds.Target(
        torch.distributions.MultivariateNormal(torch.ones(3, dtype=F64), cov).log_prob, 3, dtype=F64
    )


def test_a_passing_check_leaves_the_draws_and_a_failing_one_warns(monkeypatch):
    """On a correlated Gaussian the check passes (no warning, ``reliable`` 1) and the draws are the
    ones the run gives with the check replaced by a no-op (the generator's state is restored), the
    evaluations differing by its ``stein_evals`` alone. With its thresholds at zero every coordinate
    fails: a RuntimeWarning naming Stein's identity, ``reliable`` 0, and no SMC bridge."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        idata = ds.sample(_correlated(), "gaussian_is", num_samples=300, seed=4, progress=False, **FEW)
    a = idata.posterior.attrs
    assert a["reliable"] == 1 and a["correction"] == "importance" and 0 < a["stein_evals"] <= 4096
    assert a["stein_max_z"] < 5

    def no_check(generator, target, x, log_w, budget):
        zero = torch.zeros(x.shape[1], dtype=F64)
        return {"stat": zero, "se": zero, "z": zero, "fails": zero > 0, "evals": 0}, None

    monkeypatch.setattr(sampler_module, "stein_checked", no_check)
    plain = ds.sample(_correlated(), "gaussian_is", num_samples=300, seed=4, progress=False, **FEW)
    assert torch.equal(
        torch.as_tensor(plain.posterior["x"].values), torch.as_tensor(idata.posterior["x"].values)
    )
    assert plain.posterior.attrs["num_target_evals"] == a["num_target_evals"] - a["stein_evals"]
    monkeypatch.undo()
    monkeypatch.setattr(stein_module, "STEIN_Z", 0.0)
    monkeypatch.setattr(stein_module, "STEIN_TOLERANCE", 0.0)
    with pytest.warns(RuntimeWarning, match="Stein's identity"):
        idata = ds.sample(_correlated(), "gaussian_is", num_samples=300, seed=4, progress=False, **FEW)
    a = idata.posterior.attrs
    assert a["reliable"] == 0 and a["correction"] == "importance"


def test_a_density_cut_off_at_a_boundary_is_not_checked():
    """A half-normal in x_0 (log p = -inf for x_0 <= 0) breaks the identity's integration by parts:
    right draws (mean of x_0 within 0.05 of sqrt(2 / pi), log Z within 0.05 of log pi) would fail
    it (z = 42 at defaults, seed 0). The proposals meet -inf at finite points, so the sampler skips
    the check: no warning, ``reliable`` 1, ``stein_evals`` 0; exact draws of it do fail the check."""
    import math

    def half_normal(x):
        base = -0.5 * (x**2).sum(-1)
        return torch.where(x[:, 0] > 0, base, torch.full_like(base, -math.inf))

    target = ds.Target(half_normal, 2, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        idata = ds.sample(target, "gaussian_is", num_samples=300, seed=0, progress=False, **FEW)
    a = idata.posterior.attrs
    assert a["reliable"] == 1 and a["stein_evals"] == 0
    assert abs(float(idata.posterior["x"].values[..., 0].mean()) - math.sqrt(2 / math.pi)) < 0.05
    assert abs(a["log_normalizer"] - math.log(math.pi)) < 0.05
    exact = torch.randn(4096, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact[:, 0] = exact[:, 0].abs()
    check = stein_check(target, exact, torch.zeros(4096, dtype=F64), torch.Generator().manual_seed(0))
    assert bool(check["fails"][0]) and not bool(check["fails"][1])
