"""A run of a Pyro model that met NaN log-densities names the sites whose ``log_prob`` was NaN
(``diffstat.pyro_checks.nan_sites``), so that an overflow inside a distribution far in a tail is told
from a fault in the model's own code."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

import diffstat as ds
from diffstat.pyro_checks import NUM_NAN_POINTS, keep_nan_points, nan_sites

F64 = torch.float64


def nan_above(y, edge=1.6):
    """mu ~ N(0, 1), y ~ N(mu, 1), with the observation's scale NaN where mu > edge."""
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0), 1.0))
    tau = pyro.sample("tau", dist.HalfNormal(torch.tensor(1.0)))
    pyro.sample("y", dist.Normal(mu, torch.where(mu > edge, torch.nan, 1.0)), obs=y)
    pyro.sample("z", dist.Normal(tau, 1.0), obs=y)


@pytest.mark.parametrize("vectorize", ["plate", "vmap"])
def test_nan_sites_names_the_site_whose_log_prob_is_nan(vectorize):
    target = ds.Target.from_pyro(nan_above, torch.tensor(0.3, dtype=F64), vectorize=vectorize)
    u = torch.tensor([[2.0, 0.1], [0.0, 0.1]], dtype=F64)  # mu > 1.6 at the first point only
    assert nan_sites(target, u) == ["'y' (Normal)"]
    assert nan_sites(target, u[1:]) == []  # a point without NaN names no site


def test_the_last_finite_nan_points_are_kept():
    lp = torch.tensor([0.0, torch.nan, torch.nan, -1.0] + [torch.nan] * 5, dtype=F64)
    u = torch.arange(9, dtype=F64).unsqueeze(-1).repeat(1, 2)
    u[2, 0] = torch.inf  # a sampler's own non-finite point: not the model's NaN
    kept = keep_nan_points(None, lp, u)
    assert kept.shape == (NUM_NAN_POINTS, 2) and kept[:, 0].tolist() == [5.0, 6.0, 7.0, 8.0]
    assert keep_nan_points(kept, torch.zeros(9, dtype=F64), u) is kept  # no NaN: the old ones stay


def test_a_run_that_met_nan_names_the_site_and_a_clean_run_names_none():
    target = ds.Target.from_pyro(nan_above, torch.tensor(0.3, dtype=F64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = ds.sample(target, "nuts", num_samples=200, seed=1, progress=False)
    assert idata.posterior.attrs["num_nan_evals"] > 0
    nan_warnings = [str(w.message) for w in caught if "returned NaN" in str(w.message)]
    assert len(nan_warnings) == 1 and "in site(s) 'y' (Normal)" in nan_warnings[0]
    clean = ds.Target.from_pyro(nan_above, torch.tensor(0.3, dtype=F64), edge=float("inf"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds.sample(clean, "nuts", num_samples=200, seed=1, progress=False)
    assert clean.nan_points is None and not [w for w in caught if "returned NaN" in str(w.message)]


def test_a_transformed_distribution_is_named_itself_not_its_base():
    def weibull(t):
        log_scale = pyro.sample("log_scale", dist.Normal(torch.tensor(0.0), 1.0))
        with pyro.plate("data", len(t)):
            pyro.sample("t", dist.Weibull(torch.exp(log_scale), 1.5).mask(True), obs=t)

    target = ds.Target.from_pyro(weibull, torch.tensor([0.5, 2.0], dtype=F64))
    u = torch.tensor([[-800.0], [0.0]], dtype=F64)  # t / scale overflows: inf - inf in log_prob
    assert torch.isnan(target.log_prob(u)[0]) and target.nan_points.tolist() == [[-800.0]]
    assert nan_sites(target, target.nan_points) == ["'t' (Weibull)"]
