"""The posteriordb ports against their reference draws, without a sampler (Stein identities).

For each port, E[grad log pi(u)] = 0 and E[u_j d_j log pi(u)] = -1 at the 1,000 thinned reference
draws mapped to unconstrained space, raw and whitened (diffstat.posteriordb.checks). Threshold:
|z| < 5 for every z-score. The suite has about 870 z-scores; under a correct port each is close to
N(0, 1), so the chance that any exceeds 5 is about 870 * 5.7e-7 = 5e-4. Mutants (a wrong prior
scale, perturbed data) must be rejected.
"""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import diffstat as ds
from diffstat import posteriordb as pdb
from diffstat.posteriordb.checks import stein_check

Z_MAX = 5.0
NAMES = pdb.names()


def test_suite_is_complete():
    assert len(NAMES) == 37
    for name in (
        "garch-garch11",
        "arma-arma11",
        "hmm_example-hmm_example",
        "gp_pois_regr-gp_regr",
        "kilpisjarvi_mod-kilpisjarvi",
        "sblri-blr",
    ):
        assert name in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_port_matches_reference(name):
    post = pdb.load(name)
    assert post.target.vectorize == "plate"  # batched by broadcasting, not the vmap fallback
    assert set(post.reference_moments) == set(post.param_names)
    assert post.reference_draws.shape == (1000, len(post.param_names))
    check = stein_check(post)
    assert check.num_draws == 1000
    assert check.max_abs_z < Z_MAX, check


@pytest.mark.parametrize("name", NAMES)
def test_log_density_is_finite_on_stan_inits(name):
    """Every site is sampled in unconstrained coordinates: the log-density is finite at Stan's
    initial points, uniform in (-2, 2) (a site left on its constrained scale gives NaN there)."""
    post = pdb.load(name)
    g = torch.Generator().manual_seed(0)
    u = 4 * torch.rand(64, post.target.dim, generator=g, dtype=torch.float64) - 2
    assert torch.isfinite(post.target.log_prob(u)).all()


def _assert_rejected(post):
    assert stein_check(post).max_abs_z > Z_MAX


def test_wrong_prior_scale_in_data_is_rejected():
    d = pdb.data("kilpisjarvi_mod-kilpisjarvi")
    d["psbeta"] = d["psbeta"] * 0.5  # beta ~ normal(0, 1/60) instead of normal(0, 1/30)
    _assert_rejected(pdb.load("kilpisjarvi_mod-kilpisjarvi", data=d))


def _gp_wrong_alpha_prior(x, y):
    """gp_regr with alpha ~ normal(0, 1) instead of normal(0, 2)."""
    rho = pyro.sample("rho", dist.Gamma(torch.tensor(25.0), 4.0))
    alpha = pyro.sample("alpha", dist.HalfNormal(torch.tensor(1.0)))
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(1.0)))
    sq = (x[:, None] - x[None, :]) ** 2
    a, r, s = (p[..., None, None] for p in (alpha, rho, sigma))
    cov = a**2 * torch.exp(-sq / (2 * r**2)) + s * torch.eye(x.shape[0])
    tril = torch.linalg.cholesky(cov)
    pyro.sample("y", dist.MultivariateNormal(torch.zeros_like(y), scale_tril=tril), obs=y)


def test_wrong_prior_scale_in_model_is_rejected():
    post = pdb.load("gp_pois_regr-gp_regr")
    post.target = ds.Target.from_pyro(_gp_wrong_alpha_prior, *post.model_args)
    _assert_rejected(post)


@pytest.mark.parametrize(
    "name, field, change",
    [
        ("kidiq-kidscore_momhs", "kid_score", lambda a: a + 1.0),  # 1/20 of the residual sd
        ("hmm_example-hmm_example", "y", lambda a: a + 0.1),
        ("garch-garch11", "y", lambda a: a * 1.1),
        ("nes1980-nes", "income", lambda a: np.where(np.arange(a.size) < 50, a + 1.0, a)),
    ],
)
def test_perturbed_data_is_rejected(name, field, change):
    d = pdb.data(name)
    d[field] = change(d[field])
    _assert_rejected(pdb.load(name, data=d))


def test_compare_on_reference_draws_and_flatten():
    post = pdb.load("hmm_example-hmm_example")
    sites = {k: v.numpy()[None] for k, v in post.reference_sites().items()}  # (chain=1, draw, ...)
    flat = post.flatten(sites)
    assert np.allclose(flat["mu[2]"][0], post.reference_draws[:, post.param_names.index("mu[2]")])
    result = post.compare(sites)
    # the thinned draws against moments of all 10,000: within a few Monte Carlo errors
    assert result.max_mean_error < 5 / np.sqrt(1000)
    assert result.max_sd_error < 5 / np.sqrt(2 * 1000) * 2
    assert result.passed()
    shifted = dict(sites, mu=sites["mu"] + 0.2 * post.reference_moments["mu[1]"][1])
    assert post.compare(shifted).worst_mean in ("mu[1]", "mu[2]")
    assert not post.compare(shifted).passed(mean_tol=0.1)


def test_target_round_trip_and_names():
    post = pdb.load("garch-garch11")
    u = post.target.unconstrain(post.reference_sites())
    z = post.target.constrain(u)
    expected = post.reference_draws[:, post.param_names.index("beta1")]
    assert np.allclose(z["beta1"].numpy(), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown posterior"):
        pdb.load("no-such-posterior")


# ---------------------------------------------------------------------- the scans against Stan's loops
def test_linear_recurrence_equals_loop():
    from diffstat.posteriordb.models import linear_recurrence

    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 37, generator=g, dtype=torch.float64)
    b = torch.randn(3, 37, generator=g, dtype=torch.float64)
    x0 = torch.randn(3, generator=g, dtype=torch.float64)
    xs = [x0]
    for t in range(37):
        xs.append(a[:, t] * xs[-1] + b[:, t])
    assert torch.allclose(linear_recurrence(a, b, x0), torch.stack(xs, -1), rtol=1e-12, atol=1e-12)


def test_forward_algorithm_equals_stan_loop():
    from diffstat.posteriordb.models import forward_log_lik

    g = torch.Generator().manual_seed(1)
    theta = torch.distributions.Dirichlet(torch.ones(3, dtype=torch.float64)).sample((5, 3))
    log_em = torch.randn(5, 29, 3, generator=g, dtype=torch.float64)
    gamma = log_em[:, 0]
    for t in range(1, 29):  # Stan's loop: gamma[t, k] = log_sum_exp_j(gamma[t-1, j] + log theta[j, k]) + em
        gamma = torch.logsumexp(gamma[:, :, None] + theta.log(), dim=1) + log_em[:, t]
    assert torch.allclose(forward_log_lik(theta.log(), log_em), torch.logsumexp(gamma, -1), rtol=1e-12)
