"""AIS and the moves along the tempered path: telescoping weights, detailed balance, invariance of
a Gaussian, log Z against exact values, the output contract."""

import math

import pytest
import torch

import diffstat as ds
from diffstat._util import log_mean_exp
from diffstat.mcmc.base import MCMCInfo, MCMCState, metropolis_accept
from diffstat.mcmc.hmc import hmc_step
from diffstat.mcmc.mala import mala_step
from diffstat.targets import GaussianMixture
from diffstat.tempering.ais import ais, schedule
from diffstat.tempering.path import GeometricPath, move, tempered_state

D = torch.distributions
F64 = torch.float64
LOG_Z = 2.3


def gaussian_target(dim=3, mean=1.5, scale=0.5, log_z=LOG_Z):
    """exp(log_z) N(mean 1, scale^2 I), reference N(0, I): the tempered density at beta is the
    Gaussian with precision (1 - beta) + beta / scale^2 and mean beta mean / scale^2 / precision."""
    m = torch.full((dim,), mean, dtype=F64)
    lp = lambda x: D.Normal(m, scale).log_prob(x).sum(-1) + log_z  # noqa: E731
    target = ds.Target(lp, dim, dtype=F64)

    def tempered(beta):
        prec = (1 - beta) + beta / scale**2
        return beta * mean / scale**2 / prec, 1.0 / prec

    return target, tempered


def mixture(dim):
    means = torch.zeros(3, dim)
    means[0, 0], means[1, 0], means[2, 1] = 3.0, -3.0, 3.0
    return GaussianMixture(means, [0.5, 0.3, 0.2], scales=[0.7, 1.0, 0.85], log_normalizer=LOG_Z)


class ConjugateNormal(ds.Target):
    """theta ~ N(0, tau^2 I), y_i | theta ~ N(theta, sigma^2 I), i = 1..m, with ``log_prior`` and
    ``log_likelihood`` (so tempering acts on the likelihood) and exact evidence."""

    def __init__(self, dim=4, m=20, tau=2.0, sigma=0.5, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randn(dim, generator=g, dtype=F64) + sigma * torch.randn(
            m, dim, generator=g, dtype=F64
        )
        self.tau, self.sigma = tau, sigma
        self.prior = D.Independent(D.Normal(torch.zeros(dim, dtype=F64), tau * torch.ones(dim, dtype=F64)), 1)
        super().__init__(
            lambda u: self.log_prior(u) + self.log_likelihood(u), dim, reference=self.prior, dtype=F64
        )

    def log_prior(self, u):
        return self.prior.log_prob(u)

    def log_likelihood(self, u):
        return D.Normal(u[:, None, :], self.sigma).log_prob(self.y[None]).sum((-1, -2))

    def evidence(self) -> float:
        m = self.y.shape[0]
        cov = self.sigma**2 * torch.eye(m, dtype=F64) + self.tau**2
        return float(D.MultivariateNormal(torch.zeros(m, dtype=F64), cov).log_prob(self.y.T).sum())


def log_z_agrees(estimates, ses, truth, tol) -> bool:
    """The acceptance rule for log Z: the mean error over seeds is within ``tol`` nats, and each
    run's error is within 3 of its reported standard errors."""
    err = torch.tensor(estimates, dtype=F64) - truth
    return bool(err.mean().abs() < tol and (err.abs() <= 3 * torch.tensor(ses, dtype=F64)).all())


# ---------------------------------------------------------------------------- exact identities
def test_ais_weights_telescope_to_the_importance_weight_without_moves(generator):
    target, _ = gaussian_target()
    path = GeometricPath(target)
    x0 = path.sample_reference(300, generator)
    out = ais(generator, path, x0, schedule(50), num_mcmc_steps=0)
    exact = target.log_prob(x0) - D.Normal(0.0, 1.0).log_prob(x0).sum(-1)
    assert torch.allclose(out.log_weights, exact, rtol=0, atol=1e-10)
    assert torch.equal(out.particles.x, x0)
    # The per-stage evidence increments multiply to the importance-sampling estimate.
    assert math.isclose(float(out.stages["log_z_increment"].sum()), float(log_mean_exp(exact)), abs_tol=1e-10)


def test_ais_log_weight_in_sample_stats_is_the_draws_importance_weight_without_moves():
    target, _ = gaussian_target()
    # plain importance sampling from the prior N(0, I) (not a fitted reference): ESS 3 of 200
    with pytest.warns(RuntimeWarning, match="collapsed"):
        idata = ds.sample(
            target,
            "ais",
            num_samples=200,
            seed=1,
            progress=False,
            num_mcmc_steps=0,
            num_temperatures=30,
            fit_reference=False,
        )
    x = torch.as_tensor(idata.posterior.x.values[0])
    exact = target.log_prob(x) - D.Normal(0.0, 1.0).log_prob(x).sum(-1)
    assert torch.allclose(torch.as_tensor(idata.sample_stats.log_weight.values[0]), exact, rtol=0, atol=1e-10)


def _broken_mala(generator, state, log_prob_and_grad, step_size, inv_mass=None):
    """Du et al.'s slip: the proposal density divides by 2h where the proposal variance 2h needs 4h."""
    x, g, h = state.x, state.grad, step_size
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    y = x + h * g + math.sqrt(2 * h) * noise
    lp_y, g_y = log_prob_and_grad(y)
    log_q = lambda a, b, gb: -((a - b - h * gb) ** 2).sum(-1) / (2 * h)  # noqa: E731
    ratio = lp_y - state.log_prob + log_q(x, y, g_y) - log_q(y, x, g)
    return metropolis_accept(generator, state, MCMCState(y, lp_y, g_y), ratio, x.shape[0])


def _detailed_balance_gap(kernel, beta=0.4, h=0.3) -> float:
    """max |log pi(x) K(x -> y) - log pi(y) K(y -> x)| over proposals y made by ``kernel`` on the
    tempered density, with K = q a: q the exact Gaussian proposal density N(x + h g(x), 2h I), a
    the kernel's acceptance probability one way and the Metropolis-Hastings one the other way."""
    target, _ = gaussian_target()
    path = GeometricPath(target)
    gen = torch.Generator().manual_seed(5)
    ps = path.evaluate(1.5 * torch.randn(64, 3, generator=gen, dtype=F64))
    _, info = move(kernel, torch.Generator().manual_seed(9), ps, path, beta, h)
    noise = torch.randn(
        ps.x.shape, generator=torch.Generator().manual_seed(9), dtype=F64
    )  # the kernel's draw
    sx = tempered_state(ps, beta)
    y = sx.x + h * sx.grad + math.sqrt(2 * h) * noise
    sy = tempered_state(path.evaluate(y), beta)
    log_q = lambda a, b, gb: D.Normal(b + h * gb, math.sqrt(2 * h)).log_prob(a).sum(-1)  # noqa: E731
    forward = sx.log_prob + log_q(y, sx.x, sx.grad)
    backward = sy.log_prob + log_q(sx.x, y, sy.grad)
    lhs = forward + torch.log(info.acceptance_rate)
    rhs = backward + torch.clamp(forward - backward, max=0.0)
    return float((lhs - rhs).abs().max())


def test_mala_on_the_tempered_density_satisfies_detailed_balance():
    assert _detailed_balance_gap(mala_step) < 1e-10
    assert _detailed_balance_gap(_broken_mala) > 1e-3  # the same check rejects a wrong kernel


def _stays_gaussian(kernel, beta=0.3, n=20_000, num_moves=5, h=0.5) -> bool:
    """Start ``n`` exact draws of the tempered Gaussian, make ``num_moves`` moves, and test every
    coordinate's mean and variance against the exact ones (|z| < 4.5)."""
    target, tempered = gaussian_target(dim=2, scale=0.5)
    mean, var = tempered(beta)
    gen = torch.Generator().manual_seed(2)
    path = GeometricPath(target)
    ps = path.evaluate(mean + math.sqrt(var) * torch.randn(n, 2, generator=gen, dtype=F64))
    for _ in range(num_moves):
        ps, _ = move(kernel, gen, ps, path, beta, h)
    # The cached densities are those of the points (an accepted move needs no second evaluation).
    fresh = path.evaluate(ps.x)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(fresh, ps))
    z_mean = (ps.x.mean(0) - mean) / math.sqrt(var / n)
    z_var = (ps.x.var(0) - var) / (var * math.sqrt(2.0 / n))
    return bool((z_mean.abs() < 4.5).all() and (z_var.abs() < 4.5).all())


def _ula(generator, state, log_prob_and_grad, step_size, inv_mass=None):
    """Unadjusted Langevin: MALA's proposal, always accepted (not invariant)."""
    x = state.x
    y = (
        x
        + step_size * state.grad
        + math.sqrt(2 * step_size) * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    )
    lp_y, g_y = log_prob_and_grad(y)
    ones = torch.ones(x.shape[0], dtype=torch.bool)
    return MCMCState(y, lp_y, g_y), MCMCInfo(ones.to(x.dtype), ones, ~ones, x.shape[0])


@pytest.mark.parametrize("kernel", [mala_step, hmc_step], ids=["mala", "hmc"])
def test_moves_leave_the_tempered_gaussian_invariant(kernel):
    assert _stays_gaussian(kernel)


def test_invariance_check_rejects_an_unadjusted_kernel():
    assert not _stays_gaussian(_ula)


# ---------------------------------------------------------------------------- log Z
@pytest.mark.parametrize("dim", [2, 10])
def test_ais_log_normalizer_on_gaussian_mixtures(dim):
    target = mixture(dim).as_target(dtype=F64)
    runs = [
        ds.sample(target, "ais", num_samples=500, seed=s, progress=False).posterior.attrs for s in range(3)
    ]
    est, ses = [a["log_normalizer"] for a in runs], [a["log_normalizer_se"] for a in runs]
    assert log_z_agrees(est, ses, LOG_Z, tol=0.25)
    # A wrong target, the same mixture with log Z larger by 0.5, is rejected by the same rule
    # (its estimates are these plus 0.5, exactly: the path's weights shift by beta-steps summing to 1).
    assert not log_z_agrees(est, ses, LOG_Z + 0.5, tol=0.25)


@pytest.mark.parametrize("fit_reference", [False, True], ids=["likelihood", "fitted-reference"])
def test_ais_evidence_of_a_conjugate_model_tempering_the_likelihood(fit_reference):
    # from the prior, tempering the likelihood; and from the pilot's fitted Gaussian (the default),
    # along the geometric path from it: Z is the same integral either way
    target = ConjugateNormal()
    assert GeometricPath(target).kind == "likelihood"
    runs = [
        ds.sample(
            target, "ais", num_samples=500, seed=s, progress=False, fit_reference=fit_reference
        ).posterior.attrs
        for s in range(3)
    ]
    est, ses = [a["log_normalizer"] for a in runs], [a["log_normalizer_se"] for a in runs]
    assert runs[0]["path"] == ("geometric" if fit_reference else "likelihood")
    assert runs[0]["reference"] == ("pilot" if fit_reference else "prior")
    assert log_z_agrees(est, ses, target.evidence(), tol=0.25)
    assert not log_z_agrees(est, ses, target.evidence() - 0.5, tol=0.25)


def test_fitted_reference_shortens_the_path_from_a_diffuse_prior():
    # a prior of sd 100 for a posterior of sd 0.11 (4-d): from the prior the path has length about
    # 14 and 200 temperatures leave an ESS of 12 to 21 of 300 (log Z off by up to 0.7); from the
    # pilot's fitted Gaussian it has length 0.8 to 0.9 and the ESS is 290 of 300, at the same number
    # of temperatures and, the refits' pilots aside, of evaluations
    target = ConjugateNormal(tau=100.0)
    opts = dict(num_samples=300, num_temperatures=200, progress=False)
    runs = {
        fit: [ds.sample(target, "ais", seed=s, fit_reference=fit, **opts).posterior.attrs for s in range(3)]
        for fit in (True, False)
    }
    fitted, prior = runs[True], runs[False]
    est, ses = [a["log_normalizer"] for a in fitted], [a["log_normalizer_se"] for a in fitted]
    assert log_z_agrees(est, ses, target.evidence(), tol=0.05)
    assert not log_z_agrees(est, ses, target.evidence() - 0.1, tol=0.05)
    for f, p in zip(fitted, prior):
        assert f["reference"] == "pilot" and p["reference"] == "prior"
        assert f["thermodynamic_length"] < 0.2 * p["thermodynamic_length"]
        assert f["log_weight_variance"] < 0.1 * p["log_weight_variance"]
        assert f["ess"] > 250 and f["log_normalizer_reliable"] and not p["log_normalizer_reliable"]
        assert f["num_target_evals"] < 1.1 * p["num_target_evals"]


# ---------------------------------------------------------------------------- contract
def test_ais_output_contract_and_evaluation_count():
    target, _ = gaussian_target()
    n, chains, k = 200, 2, 20
    idata = ds.sample(
        target,
        "ais",
        num_samples=n,
        num_chains=chains,
        seed=0,
        progress=False,
        num_temperatures=k,
        num_mcmc_steps=2,
    )
    x = torch.as_tensor(idata.posterior.x.values)
    assert x.shape == (chains, n, 3)
    lp = torch.as_tensor(idata.sample_stats.lp.values)
    assert torch.allclose(lp, target.log_prob(x.reshape(-1, 3)).reshape(chains, n), rtol=0, atol=1e-12)
    for key in ("log_weight", "acceptance_rate"):
        assert idata.sample_stats[key].shape == (chains, n)
    group = idata.tempering  # (stage, chain): the chains are independent runs, each with its pilot
    assert group.beta.shape == (k, chains) and bool((group.beta[-1] == 1.0).all())
    assert {"ess", "log_z_increment", "acceptance_rate", "step_size"} <= set(group.data_vars)
    attrs = idata.posterior.attrs
    assert attrs["num_stages"] == k and attrs["method"] == "ais"
    per_run = torch.as_tensor(group.log_z_increment.sum("stage").values)
    assert math.isclose(attrs["log_normalizer"], float(log_mean_exp(per_run)), abs_tol=1e-9)
    # Per run: 16 validation points, the initial particles, and every move's proposals; plus the
    # pilots' evaluations and the check for missed modes.
    check = attrs["mode_check_evals"]
    assert attrs["num_target_evals"] == chains * (16 + n * (1 + k * 2)) + attrs["pilot_evals"] + check
    one = ds.sample(
        target, "ais", num_samples=n, seed=0, progress=False, num_temperatures=k, num_mcmc_steps=2
    )
    a1 = one.posterior.attrs
    # the adaptive schedule's pilots (along the prior's path, then along the path from each fitted
    # reference), each: its own 16 validation points, particles, and 3 moves per stage.
    pilots = 1 + a1["num_refits"]
    pilot = pilots * (16 + a1["num_pilot"]) + a1["num_pilot"] * 3 * a1["pilot_stages_total"]
    assert a1["pilot_evals"] == pilot and a1["num_refits"] >= 1 and a1["reference"] == "pilot"
    assert a1["num_target_evals"] == 16 + n * (1 + k * 2) + pilot + a1["mode_check_evals"]
    fixed = ds.sample(
        target, "ais", num_samples=n, seed=0, progress=False, num_temperatures=k, schedule="linear"
    )
    assert (
        fixed.posterior.attrs["num_target_evals"]
        == 16 + n * (1 + k) + fixed.posterior.attrs["mode_check_evals"]
    )
    assert "pilot_evals" not in fixed.posterior.attrs


def test_ais_refuses_bad_options():
    target, _ = gaussian_target()
    for bad in (
        dict(betas=[0.5, 0.2, 1.0]),
        dict(betas=[0.5, 0.9]),
        dict(num_temperature=10),
        dict(kernel="nuts"),
        dict(schedule="cosine"),
    ):
        with pytest.raises(ValueError):
            ds.sample(target, "ais", num_samples=10, seed=0, progress=False, **bad)
