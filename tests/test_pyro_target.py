"""Tests of ``ds.Target.from_pyro`` (diffstat/pyro_target.py): the batched unconstrained
log-density against Pyro's own one-point potential, the log-Jacobian, the prior reference, the
posterior output, the gamma-precision posterior through MALA and HMC, and bad input."""

import contextlib
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.mcmc.util import initialize_model
from torch.distributions import biject_to, constraints, transforms

import diffstat as ds
from diffstat.pyro_target import PyroTarget
from diffstat.targets import GammaPrecision, NormalNormal

F64 = torch.float64


def rich_model(x, mask):
    """A plate of 3 groups inside a plate of 5 rows, a vector site, a positive site, a simplex in
    a plate, a factor, a masked and a scaled observed site."""
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfCauchy(1.0))
    with pyro.plate("groups", 3, dim=-1):
        w = pyro.sample("w", dist.Dirichlet(torch.tensor([1.0, 2.0, 3.0, 4.0])))
        theta = pyro.sample("theta", dist.Normal(mu[..., 0], sigma))
        with pyro.plate("rows", 5, dim=-2), poutine.mask(mask=mask):
            pyro.sample("x", dist.Normal(theta + w[..., 0], sigma), obs=x)
    pyro.factor("penalty", -0.5 * (mu**2).sum(-1))
    with poutine.scale(scale=0.5):
        pyro.sample("z", dist.Normal(mu[..., 1], 1.0), obs=torch.tensor(0.3))


def event_model(x):
    """A vector latent with ``to_event`` as the location of a plated site next to a scalar
    latent: misaligned by the particle plate, so it needs ``vmap``."""
    mu = pyro.sample("mu", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    s = pyro.sample("s", dist.Gamma(2.0, 1.0))
    with pyro.plate("g", 3):
        a = pyro.sample("a", dist.Normal(mu, s))
        with pyro.plate("d", x.shape[0]):
            pyro.sample("obs", dist.Normal(a, 1.0), obs=x)


def rich_args():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, generator=g, dtype=F64)
    mask = torch.ones(5, 1, dtype=torch.bool)
    mask[1] = False
    return x, mask


@contextlib.contextmanager
def float64_default():
    """Run Pyro's reference computations with float64 constants, as the target runs the model."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def pyro_loop(model, args, target, u, max_plate_nesting):
    """Per-point log-density from Pyro's own HMC potential (its transforms, its log-Jacobian),
    one point at a time, with its gradient. The model's constants are made float64 as in the
    target (which runs the model with its dtype as torch's default)."""
    with float64_default():
        _, potential_fn, _, _ = initialize_model(model, model_args=args, max_plate_nesting=max_plate_nesting)
        values, grads = [], []
        for point in u:
            point = point.clone().requires_grad_(True)
            params = {
                s.name: point[s.offset : s.offset + s.size].reshape(s.unconstrained_shape)
                for s in target.sites.values()
            }
            lp = -potential_fn(params)
            values.append(lp.detach())
            grads.append(torch.autograd.grad(lp, point)[0])
    return torch.stack(values), torch.stack(grads)


# ---------------------------------------------------------------------- batched = one at a time
@pytest.mark.parametrize("vectorize", ["plate", "vmap"])
def test_batched_log_density_equals_pyro_loop(vectorize):
    x, mask = rich_args()
    target = ds.Target.from_pyro(rich_model, x, mask, vectorize=vectorize)
    assert target.vectorize == vectorize and target.dtype == F64
    assert {k: s.shape for k, s in target.sites.items()} == {
        "mu": (2,),
        "sigma": (),
        "w": (3, 4),
        "theta": (3,),
    }
    assert target.dim == 2 + 1 + 3 * 3 + 3  # the simplex of 4 has 3 free coordinates
    with torch.random.fork_rng():
        torch.manual_seed(0)
        u = target.prior_draws(64)
    lp, grad = target.log_prob_and_grad(u)
    assert target.num_target_evals == 64
    lp_loop, grad_loop = pyro_loop(rich_model, (x, mask), target, u, max_plate_nesting=2)
    assert torch.allclose(lp, lp_loop, rtol=0, atol=1e-10)
    assert torch.allclose(grad, grad_loop, rtol=0, atol=1e-9)
    # a wrong density is caught by the same comparison: drop the masked row's exclusion
    wrong = ds.Target.from_pyro(rich_model, x, torch.ones(5, 1, dtype=torch.bool), vectorize=vectorize)
    assert (wrong.log_prob(u) - lp_loop).abs().max() > 1e-3


def test_vmap_fallback_for_a_model_the_plate_breaks():
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    with pytest.raises(ValueError, match="batch of particles"):
        ds.Target.from_pyro(event_model, x, vectorize="plate")
    target = ds.Target.from_pyro(event_model, x)
    assert target.vectorize == "vmap"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        u = target.prior_draws(16)
    lp, grad = target.log_prob_and_grad(u)
    lp_loop, grad_loop = pyro_loop(event_model, (x,), target, u, max_plate_nesting=2)
    assert torch.allclose(lp, lp_loop, rtol=0, atol=1e-10)
    assert torch.allclose(grad, grad_loop, rtol=0, atol=1e-9)
    post = target.to_posterior(u.reshape(2, 8, -1))
    assert post["mu"].shape == (2, 8, 3) and post["s"].shape == (2, 8) and (post["s"] > 0).all()


def test_dependent_support():
    """``Uniform(0, a)`` with a latent ``a``: the bijection follows each particle's ``a``."""

    def model():
        a = pyro.sample("a", dist.Gamma(2.0, 1.0))
        pyro.sample("b", dist.Uniform(0.0, a))

    target = ds.Target.from_pyro(model, dtype=F64)
    u = torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    a, s = u[:, 0].exp(), torch.sigmoid(u[:, 1])
    # log Gamma(a; 2, 1) + log|da/du| + log(1/a) + log|db/du| with b = a * sigmoid(u_b)
    exact = torch.log(a) - a + u[:, 0] - torch.log(a) + torch.log(a * s * (1 - s))
    assert torch.allclose(target.log_prob(u), exact, rtol=0, atol=1e-12)
    b = target.constrain(u)["b"]
    assert torch.allclose(b, a * s) and (b < a).all()


# ---------------------------------------------------------------------- the log-Jacobian
def _integral(target, grid):
    lp = target.log_prob(grid[:, None])
    return torch.trapezoid(lp.exp(), grid)


@pytest.mark.parametrize(
    "prior, lo, hi",
    [
        (dist.Gamma(3.0, 1.5), -25.0, 6.0),
        (dist.Beta(2.0, 0.7), -25.0, 40.0),
        (dist.LogNormal(0.3, 0.5), -4.0, 5.0),
    ],
)
def test_unconstrained_density_integrates_to_one(prior, lo, hi):
    def model():
        pyro.sample("theta", prior)

    target = ds.Target.from_pyro(model, dtype=F64)
    grid = torch.linspace(lo, hi, 20001, dtype=F64)
    assert abs(float(_integral(target, grid)) - 1.0) < 1e-6
    # without the log-Jacobian the same quadrature is far from 1: the check can fail
    bijection = biject_to(prior.support)

    def no_jacobian_log_prob(u):
        return target.log_prob(u) - bijection.log_abs_det_jacobian(u[:, 0], bijection(u[:, 0]))

    no_jacobian = ds.Target(no_jacobian_log_prob, 1, dtype=F64)
    assert abs(float(_integral(no_jacobian, grid)) - 1.0) > 0.05


def test_simplex_matches_transformed_distribution():
    concentration = torch.tensor([0.7, 2.0, 3.5], dtype=F64)

    def model():
        pyro.sample("p", dist.Dirichlet(concentration))

    target = ds.Target.from_pyro(model, dtype=F64)
    assert target.dim == 2 and target.sites["p"].shape == (3,)
    u = torch.randn(50, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    pushed = torch.distributions.TransformedDistribution(
        torch.distributions.Dirichlet(concentration), [transforms.StickBreakingTransform().inv]
    )
    assert torch.allclose(target.log_prob(u), pushed.log_prob(u), rtol=0, atol=1e-10)
    p = target.constrain(u)["p"]
    assert torch.allclose(p.sum(-1), torch.ones(50, dtype=F64)) and (p > 0).all()


# ---------------------------------------------------------------------- prior, likelihood, evidence
def test_normal_normal_prior_likelihood_and_evidence():
    g = torch.Generator().manual_seed(4)
    exact = NormalNormal(0.8 + torch.randn(12, generator=g, dtype=F64), prior_mean=0.5, prior_sd=2.0, sd=1.3)
    target = ds.Target.from_pyro(exact.model, exact.data)
    grid = torch.linspace(-12.0, 12.0, 8001, dtype=F64)[:, None]
    log_prior, log_lik = target.log_prior_and_likelihood(grid)
    assert target.num_target_evals == grid.shape[0]
    # the model's joint, from a Pyro trace conditioned on each point (mu is unconstrained)
    with float64_default():
        traces = [
            poutine.trace(poutine.condition(exact.model, {"mu": m[0]})).get_trace(exact.data)
            for m in grid[::400]
        ]
        joint = torch.stack([trace.log_prob_sum() for trace in traces])
    assert torch.allclose((log_prior + log_lik)[::400], joint, rtol=0, atol=1e-10)
    assert torch.allclose(log_prior + log_lik, exact.log_prob(grid), rtol=0, atol=1e-10)
    assert torch.allclose(target.reference.log_prob(grid), log_prior, rtol=0, atol=0)
    assert torch.allclose(
        log_prior, dist.Normal(torch.tensor(0.5, dtype=F64), 2.0).log_prob(grid[:, 0]), rtol=0, atol=1e-12
    )
    log_z = torch.logsumexp(log_prior + log_lik, 0) + math.log(float(grid[1, 0] - grid[0, 0]))
    assert abs(float(log_z) - exact.log_marginal_likelihood()) < 1e-8
    # tempering the likelihood only: prior * likelihood^beta at beta = 0 is the normalised prior
    assert abs(float(torch.logsumexp(log_prior, 0)) + math.log(float(grid[1, 0] - grid[0, 0]))) < 1e-8


def test_gamma_precision_evidence_by_quadrature():
    exact = GammaPrecision(
        torch.randn(20, generator=torch.Generator().manual_seed(5), dtype=F64) * 0.7, 2.0, 1.5, mean=0.1
    )
    target = ds.Target.from_pyro(exact.model, exact.data)
    grid = torch.linspace(-12.0, 8.0, 20001, dtype=F64)[:, None]
    lp = target.log_prob(grid)
    assert torch.allclose(lp, exact.as_target().log_prob(grid), rtol=0, atol=1e-10)
    log_z = float(torch.log(torch.trapezoid((lp - lp.max()).exp(), grid[:, 0])) + lp.max())
    assert abs(log_z - exact.log_marginal_likelihood()) < 1e-8


def test_reference_draws_are_prior_draws_and_reproducible():
    exact = GammaPrecision(torch.randn(8, generator=torch.Generator().manual_seed(6), dtype=F64), 3.0, 2.0)
    target = ds.Target.from_pyro(exact.model, exact.data)
    a = target.sample_reference(4000, torch.Generator().manual_seed(7))
    b = target.sample_reference(4000, torch.Generator().manual_seed(7))
    assert a.shape == (4000, 1) and torch.equal(a, b)
    tau = a[:, 0].exp()  # prior Gamma(3, 2): mean 1.5, sd sqrt(3) / 2
    assert abs(float(tau.mean()) - 1.5) < 4 * math.sqrt(3) / 2 / math.sqrt(4000)
    assert target.num_target_evals == 0  # drawing and log_prior are not target evaluations
    target.log_prior(a)
    assert target.num_target_evals == 0
    target.log_likelihood(a)
    assert target.num_target_evals == 4000


def test_posterior_output_and_round_trip():
    x, mask = rich_args()
    target = ds.Target.from_pyro(rich_model, x, mask)
    with torch.random.fork_rng():
        torch.manual_seed(8)
        u = target.prior_draws(12)
    post = target.to_posterior(u.reshape(3, 4, -1))
    assert {k: v.shape for k, v in post.items()} == {
        "mu": (3, 4, 2),
        "sigma": (3, 4),
        "w": (3, 4, 3, 4),
        "theta": (3, 4, 3),
    }
    assert (post["sigma"] > 0).all() and np.allclose(post["w"].sum(-1), 1.0)
    values = target.constrain(u)
    assert torch.allclose(target.unconstrain(values), u, atol=1e-10)
    assert np.allclose(post["theta"].reshape(12, 3), values["theta"].numpy())


def test_float32_and_float64():
    exact = GammaPrecision(torch.randn(10, generator=torch.Generator().manual_seed(9), dtype=F64), 2.0, 1.0)
    t64 = ds.Target.from_pyro(exact.model, exact.data)
    t32 = ds.Target.from_pyro(exact.model, exact.data, dtype=torch.float32)
    assert t64.dtype == F64 and t32.dtype == torch.float32
    u = torch.linspace(-2.0, 3.0, 11, dtype=F64)[:, None]
    lp32, grad32 = t32.log_prob_and_grad(u.float())
    assert lp32.dtype == torch.float32 and grad32.dtype == torch.float32
    assert torch.allclose(lp32.double(), t64.log_prob(u), rtol=1e-5)
    assert t32.sample_reference(5, torch.Generator().manual_seed(0)).dtype == torch.float32


# ---------------------------------------------------------------------- sampling
@pytest.mark.parametrize(
    "method, options",
    [
        ("mala", dict(num_chains=32, num_samples=500)),
        ("hmc", dict(num_chains=16, num_samples=400, num_leapfrog=3)),
    ],
)
def test_gamma_precision_posterior_mean(method, options):
    exact = GammaPrecision(
        torch.randn(10, generator=torch.Generator().manual_seed(0), dtype=F64) / 2.0, 2.0, 1.0
    )
    target = ds.Target.from_pyro(exact.model, exact.data)
    idata = ds.sample(target, method, seed=1, progress=False, **options)
    tau = idata.posterior["tau"].values
    assert list(idata.posterior.data_vars) == ["tau"]
    assert tau.shape == (options["num_chains"], options["num_samples"]) and (tau > 0).all()
    assert abs(tau.mean() / exact.posterior_mean() - 1.0) < 0.03
    assert idata.posterior.attrs["num_target_evals"] > 0


def test_gamma_precision_missing_jacobian_is_rejected():
    """The same check rejects the density of log(tau) without its log-Jacobian (that density is
    Gamma(a_N - 1, b_N) in tau, so its mean is 1/a_N = 14% low)."""
    exact = GammaPrecision(
        torch.randn(10, generator=torch.Generator().manual_seed(0), dtype=F64) / 2.0, 2.0, 1.0
    )
    target = ds.Target.from_pyro(exact.model, exact.data)
    wrong = ds.Target(lambda u: target.log_prob(u) - u[:, 0], 1, name="log_tau", dtype=F64)
    idata = ds.sample(wrong, "mala", num_chains=32, num_samples=500, seed=1, progress=False)
    tau = np.exp(idata.posterior["log_tau"].values)
    assert abs(tau.mean() / exact.posterior_mean() - 1.0) > 0.03


# ---------------------------------------------------------------------- LKJCholesky with Dirichlet
ETA, ALPHA = 2.0, torch.tensor([1.0, 2.0, 3.0, 4.0])
COUNTS = torch.tensor([1, 2, 2, 3])  # the observed categories 0..3, counted


def lkj_dirichlet(y):
    """A 3-d LKJCholesky and a 4-d Dirichlet with categorical data: the posterior of ``p`` is
    Dirichlet(alpha + counts); ``L`` is untouched by the data, so LKJ(eta) is its posterior."""
    pyro.sample("L", dist.LKJCholesky(3, ETA))
    p = pyro.sample("p", dist.Dirichlet(ALPHA))
    with pyro.plate("n", y.shape[0]):
        pyro.sample("y", dist.Categorical(p), obs=y)


def _z(x: np.ndarray, truth: float) -> float:
    """|mean - truth| in Monte Carlo standard errors, the MCSE from arviz's bulk ESS of ``x:
    (chain, draw)``."""
    import arviz as az

    return abs(float(x.mean()) - truth) / (float(x.std()) / math.sqrt(float(az.ess(x))))


def test_lkj_and_dirichlet_posterior_by_nuts():
    """NUTS, float32 (the model's default here), 4 chains: the simplex's posterior means
    (alpha + counts) / sum and, for each off-diagonal correlation r of L L^T, whose LKJ(eta)
    marginal on (-1, 1) is Beta(eta - 1 + d/2, eta - 1 + d/2): E r = 0 and E r^2 = 1 / (2a + 1)."""
    y = torch.repeat_interleave(torch.arange(4), COUNTS)
    target = ds.Target.from_pyro(lkj_dirichlet, y)
    assert target.dtype == torch.float32 and target.dim == 3 + 3
    idata = ds.sample(target, "nuts", num_chains=4, num_samples=400, seed=2, progress=False)
    p, L = idata.posterior["p"].values, idata.posterior["L"].values
    assert p.shape == (4, 400, 4) and L.shape == (4, 400, 3, 3)
    assert np.isfinite(p).all() and np.isfinite(L).all() and np.isfinite(idata.sample_stats["lp"]).all()
    post = (ALPHA + COUNTS) / (ALPHA + COUNTS).sum()
    assert max(_z(p[..., k], float(post[k])) for k in range(4)) < 4.0
    # the check has power: the prior means alpha / sum(alpha) are rejected
    prior = ALPHA / ALPHA.sum()
    assert max(_z(p[..., k], float(prior[k])) for k in range(4)) > 4.0
    corr = L @ np.swapaxes(L, -1, -2)
    a = ETA - 1 + 3 / 2
    for i, j in [(1, 0), (2, 0), (2, 1)]:
        r = corr[..., i, j]
        assert _z(r, 0.0) < 4.0 and _z(r**2, 1 / (2 * a + 1)) < 4.0, (i, j)


def test_float32_prior_draws_on_a_support_boundary_are_drawn_again():
    """In float32 an LKJCholesky(3, 0.5) draw can round onto a correlation of +-1, whose
    unconstrained value is infinite and whose image is then NaN (the cause of NaN reference draws
    that ended tempering runs): such draws are drawn again, and the rest are unchanged."""

    def model():
        pyro.sample("L", dist.LKJCholesky(3, 0.5))
        pyro.sample("p", dist.Dirichlet(ALPHA))

    target = ds.Target.from_pyro(model, dtype=torch.float32)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        raw = dist.LKJCholesky(3, torch.tensor(0.5)).sample((20000,))
    assert not torch.isfinite(biject_to(constraints.corr_cholesky).inv(raw)).all()  # the cause
    with torch.random.fork_rng():
        torch.manual_seed(0)
        u = target.prior_draws(20000)
    assert torch.isfinite(u).all()
    z = target.constrain(u)
    assert torch.isfinite(z["L"]).all() and torch.isfinite(z["p"]).all()
    assert torch.isfinite(target.log_prob(u)).all()


def test_tempering_a_model_without_observed_sites():
    """No observed site: the likelihood is 0 with a zero gradient, the evidence is exactly 1 and
    SMC returns the prior (this crashed in autograd before: the likelihood had no graph)."""

    def model():
        pyro.sample("L", dist.LKJCholesky(3, ETA))
        pyro.sample("p", dist.Dirichlet(ALPHA))

    target = ds.Target.from_pyro(model, dtype=F64)
    u = target.prior_draws(5).requires_grad_(True)
    prior, lik = target.log_prior_and_likelihood(u)
    (grad,) = torch.autograd.grad(lik.sum(), u)
    assert torch.equal(lik.detach(), torch.zeros(5, dtype=F64)) and torch.equal(grad, torch.zeros_like(u))
    idata = ds.sample(target, "smc", num_samples=2000, seed=0, progress=False)
    assert idata.posterior.attrs["log_normalizer"] == 0.0
    p = idata.posterior["p"].values.reshape(-1, 4)
    se = np.sqrt((ALPHA / ALPHA.sum() * (1 - ALPHA / ALPHA.sum()) / (ALPHA.sum() + 1)).numpy() / 2000)
    assert (np.abs(p.mean(0) - (ALPHA / ALPHA.sum()).numpy()) < 5 * se).all()


# ---------------------------------------------------------------------- bad input
def _no_latent(x):
    with pyro.plate("data", 3):
        pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)


def _discrete(x):
    k = pyro.sample("k", dist.Bernoulli(0.3))
    pyro.sample("x", dist.Normal(k, 1.0), obs=x)


def _subsampled(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", 3, subsample_size=2) as idx:
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x[idx])


def _not_vectorised(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    pyro.sample("x", dist.Normal(mu.item(), 1.0), obs=x)


def _needs_y(x, y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    pyro.sample("x", dist.Normal(mu, 1.0), obs=x + y)


@pytest.mark.parametrize(
    "model, args, kwargs, message",
    [
        ("not a model", (), {}, "callable"),
        (_no_latent, (torch.zeros(3),), {}, "no latent"),
        (_discrete, (torch.tensor(0.5),), {}, "discrete"),
        (_subsampled, (torch.zeros(3),), {}, "subsamples"),
        (_not_vectorised, (torch.tensor(0.5),), {}, "batch of particles"),
        (_needs_y, (torch.tensor(0.5),), {}, "arguments failed"),
        (_needs_y, (torch.tensor(0.5), torch.zeros(2)), {"z": 1}, "arguments failed"),
        (_no_latent, (torch.zeros(3),), {"dtype": torch.float16}, "dtype"),
        (_discrete, (torch.tensor(0.5),), {"vectorize": "loop"}, "vectorize"),
    ],
)
def test_bad_input_raises(model, args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ds.Target.from_pyro(model, *args, **kwargs)


def test_is_a_target():
    target = ds.Target.from_pyro(NormalNormal(torch.zeros(3, 2, dtype=F64)).model)
    assert isinstance(target, PyroTarget) and isinstance(target, ds.Target)
    assert target.dim == 2 and target.sites["mu"].shape == (2,)


def test_output_dtype_with_data_in_a_closure():
    """Data held by the model (not passed) keep their float64; the density is still float32."""
    exact = GammaPrecision(torch.randn(6, generator=torch.Generator().manual_seed(10), dtype=F64))
    target = ds.Target.from_pyro(exact.model, dtype=torch.float32)
    lp, grad = target.log_prob_and_grad(torch.zeros(3, 1))
    assert lp.dtype == torch.float32 and grad.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda():
    exact = GammaPrecision(
        torch.randn(10, generator=torch.Generator().manual_seed(0), dtype=F64) / 2.0, 2.0, 1.0
    )
    target = ds.Target.from_pyro(exact.model, exact.data.cuda())
    assert target.device.type == "cuda"
    lp_cpu = ds.Target.from_pyro(exact.model, exact.data).log_prob(torch.zeros(4, 1, dtype=F64))
    assert torch.allclose(target.log_prob(torch.zeros(4, 1, dtype=F64, device="cuda")).cpu(), lp_cpu)
    idata = ds.sample(target, "mala", num_chains=32, num_samples=500, seed=1, progress=False, device="cuda")
    assert abs(idata.posterior["tau"].values.mean() / exact.posterior_mean() - 1.0) < 0.03


def schools_model(y, sigma, deterministic=True):
    """Non-centred Eight Schools, reporting ``theta = mu + tau * eta`` (per school), ``tau2`` (a
    function of one global) and ``J`` (no latent in it) as deterministic sites."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("school", y.shape[0]):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        theta = mu + tau * eta
        if deterministic:
            pyro.deterministic("theta", theta)
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)
    if deterministic:
        pyro.deterministic("tau2", tau**2)
        pyro.deterministic("J", torch.tensor(float(y.shape[0])))


@pytest.mark.parametrize("vectorize", ["plate", "vmap"])
def test_deterministic_sites_are_reported(vectorize):
    y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], dtype=F64)
    sigma = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], dtype=F64)
    target = ds.Target.from_pyro(schools_model, y, sigma, vectorize=vectorize)
    plain = ds.Target.from_pyro(schools_model, y, sigma, False, vectorize=vectorize)
    assert set(target.sites) == {"mu", "tau", "eta"} and target.dim == 10
    assert target.deterministic == {"theta": (8,), "tau2": (), "J": ()}
    with torch.random.fork_rng():
        torch.manual_seed(2)
        u = target.prior_draws(12)
    # a deterministic site leaves the density alone
    assert torch.equal(target.log_prob(u), plain.log_prob(u))
    post = target.to_posterior(u.reshape(3, 4, -1))
    assert {k: v.shape for k, v in post.items()} == {
        "mu": (3, 4),
        "tau": (3, 4),
        "eta": (3, 4, 8),
        "theta": (3, 4, 8),
        "tau2": (3, 4),
        "J": (3, 4),
    }
    expected = post["mu"][..., None] + post["tau"][..., None] * post["eta"]
    assert np.allclose(post["theta"], expected, rtol=0, atol=1e-12)
    assert np.allclose(post["tau2"], post["tau"] ** 2, rtol=1e-12) and (post["J"] == 8.0).all()
    assert set(plain.to_posterior(u.reshape(3, 4, -1))) == {"mu", "tau", "eta"}


@pytest.mark.parametrize("vectorize", ["plate", "vmap"])
def test_a_point_with_a_non_finite_coordinate_is_nan_without_running_the_model(vectorize):
    """A sampler's trajectory that overflowed hands the target NaN or inf coordinates. The model is
    not run there (under ``vmap`` a distribution's support check at NaN raises a RuntimeError that
    ended HMC on the audit's hierarchical logistic regression, docs/audit.md): those rows are NaN
    with a zero gradient, and the other rows are exactly what they are alone."""
    x = torch.linspace(-1, 1, 5, dtype=F64).unsqueeze(-1).expand(5, 3)
    mask = torch.ones(5, 1, dtype=torch.bool)
    target = ds.Target.from_pyro(rich_model, x, mask, vectorize=vectorize)
    u = 0.3 * torch.randn(4, target.dim, generator=torch.Generator().manual_seed(0), dtype=F64)
    u[1, 0], u[3, -1] = float("nan"), float("inf")
    lp, grad = target.log_prob_and_grad(u)
    alone_lp, alone_grad = target.log_prob_and_grad(u[[0, 2]])
    assert torch.isnan(lp[[1, 3]]).all() and torch.equal(grad[[1, 3]], torch.zeros_like(grad[[1, 3]]))
    assert torch.equal(lp[[0, 2]], alone_lp) and torch.equal(grad[[0, 2]], alone_grad)
