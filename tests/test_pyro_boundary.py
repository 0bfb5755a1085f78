"""A finite unconstrained point that a site's bijection maps onto its support's boundary in floating
point has density 0 there (``-inf``), not the NaN the distribution computes (``diffstat.pyro_sites.
off_support``; found by the third audit round, ``docs/audit.md``)."""

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import OrderedTransform

import diffstat as ds

F64 = torch.float64


def ordered(y):
    beta = pyro.sample("beta", dist.Normal(torch.tensor(0.0), 2.5))
    base = dist.Normal(torch.zeros(3), 5.0).to_event(1)
    c = pyro.sample("c", dist.TransformedDistribution(base, OrderedTransform()))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.OrderedLogistic(beta * torch.linspace(-1, 1, len(y)), c), obs=y)


def centred(y):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0), 5.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(1.0)))
    pyro.sample("y", dist.Normal(mu, sigma).expand([len(y)]).to_event(1), obs=y)


def test_equal_cutpoints_from_a_rounded_increment_are_minus_inf_not_nan():
    """exp(-22) is below the float spacing at 1.5e7, so c_3 == c_2: the distributions give NaN
    (inf - inf through the inverse ordered transform); the point is on the support's boundary."""
    target = ds.Target.from_pyro(ordered, torch.tensor([0, 1, 2, 3, 1, 2]), dtype=F64)
    u = torch.tensor([[1.0, 25.0, 16.5, -22.0], [1.0, -1.0, 0.4, 0.5]], dtype=F64)
    lp = target.log_prob(u)
    assert lp[0] == -math.inf and torch.isfinite(lp[1])
    assert target.num_nan_evals == 0
    prior, lik = target.log_prior_and_likelihood(u)
    assert prior[0] == -math.inf and lik[0] == -math.inf and torch.isfinite(prior[1] + lik[1])
    # inside the support the value is the model's own: prior N(0, 2.5) x N(0, 5)^3 on (beta, v)
    c = OrderedTransform()(u[1, 1:])
    p = torch.sigmoid(
        torch.cat([c, torch.tensor([math.inf], dtype=F64)]) - 1.0 * torch.linspace(-1, 1, 6)[:, None]
    )
    probs = torch.diff(torch.cat([torch.zeros(6, 1, dtype=F64), p], 1), dim=1)
    lik_exact = probs[torch.arange(6), torch.tensor([0, 1, 2, 3, 1, 2])].log().sum()
    prior_exact = dist.Normal(0.0, 2.5).log_prob(u[1, 0]) + dist.Normal(0.0, 5.0).log_prob(u[1, 1:]).sum()
    assert torch.allclose(lp[1], lik_exact + prior_exact, atol=1e-10)


def test_a_scale_that_underflows_or_overflows_is_minus_inf_not_nan():
    """sigma = exp(-800) = 0 makes Normal(mu, 0).log_prob NaN (0 / 0, -log 0); exp(800) = inf is
    off the support too. Both points are -inf; a moderate point is unchanged."""
    y = torch.tensor([0.3, -0.2, 1.1], dtype=F64)
    target = ds.Target.from_pyro(centred, y)
    u = torch.tensor([[0.5, -800.0], [0.5, 800.0], [0.5, -0.3]], dtype=F64)
    lp = target.log_prob(u)
    assert lp[0] == -math.inf and lp[1] == -math.inf and target.num_nan_evals == 0
    s = math.exp(-0.3)
    exact = (
        dist.Normal(0.0, 5.0).log_prob(torch.tensor(0.5, dtype=F64))
        + math.log(2)
        + dist.Normal(0.0, 1.0).log_prob(torch.tensor(s, dtype=F64))
        - 0.3
        + dist.Normal(0.5, s).log_prob(y).sum()
    )
    assert torch.allclose(lp[2], exact, atol=1e-12)


def test_a_nan_inside_the_support_is_still_reported():
    """torch's Weibull.log_prob is NaN where (t / scale)^k overflows, at a point inside every
    support: that NaN is the model's, and stays NaN (counted, so the run warns)."""

    def weibull(t):
        k = pyro.sample("k", dist.Gamma(torch.tensor(2.0), 1.0))
        with pyro.plate("data", len(t)):
            pyro.sample("t", dist.Weibull(torch.tensor(0.01), k), obs=t)

    target = ds.Target.from_pyro(weibull, torch.tensor([5.0, 1.0], dtype=F64))
    lp = target.log_prob(torch.tensor([[6.0], [0.0]], dtype=F64))  # k = 403: 500^403 overflows
    assert torch.isnan(lp[0]) and torch.isfinite(lp[1]) and target.num_nan_evals == 1


def test_a_linalg_error_at_one_point_is_nan_there_not_the_end_of_the_run():
    """A covariance that is not positive-definite at one point (here a correlation left unconstrained,
    |a| > 1; in the audit a 60-step stationary AR(1) covariance with phi near 1) makes
    MultivariateNormal's Cholesky raise for the whole batch: it ended HMC and PT runs. That row is
    NaN (counted, with a zero gradient); the other rows keep their one-point values."""

    def correlated(y):
        a = pyro.sample("a", dist.Normal(torch.tensor(0.0), 0.3))
        cov = torch.stack([torch.stack([torch.ones_like(a), a]), torch.stack([a, torch.ones_like(a)])])
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.MultivariateNormal(torch.zeros(2), covariance_matrix=cov), obs=y)

    target = ds.Target.from_pyro(correlated, torch.tensor([[0.5, 0.4], [-1.0, -0.7]], dtype=F64))
    u = torch.tensor([[0.2], [1.5], [-0.4], [0.9]], dtype=F64)
    alone = torch.stack([target.log_prob(u[i : i + 1])[0] for i in (0, 2, 3)])
    lp, grad = target.log_prob_and_grad(u)
    assert torch.isnan(lp[1]) and torch.equal(grad[1], torch.zeros_like(grad[1]))
    assert torch.allclose(lp[[0, 2, 3]], alone, atol=1e-12) and torch.isfinite(grad[[0, 2, 3]]).all()
    assert target.num_nan_evals == 1
