"""Particle denoising diffusion sampler (``method="pdds"``): exact guidance, weights that telescope
to the path importance weight, log Z unbiased for any guidance, a broken weight detected, and the
front door."""

import math
import warnings

import pytest
import torch

import diffstat as ds
from diffstat.diffusion import noised_smc as ns
from diffstat.diffusion.noised_smc_bank import bank_log_g, build_mode_bank
from diffstat.diffusion.gaussians import Whitening
from diffstat.diffusion.noised_smc_path import NoisedPath, noise_schedule
from diffstat.targets import GaussianMixture

D = torch.distributions
F64 = torch.float64
LOG_Z = 1.7
MU = torch.tensor([1.0, -0.5, 0.3], dtype=F64)


def gaussian_target(scale=0.3, mu=MU):
    return ds.Target(lambda x: D.Normal(mu, scale).log_prob(x).sum(-1) + LOG_Z, mu.numel(), dtype=F64)


def identity(dim):
    return Whitening.from_moments(torch.zeros(dim, dtype=F64), torch.eye(dim, dtype=F64))


def exact_log_gt(x, rho, scale, mu=MU):
    """log g_t of N(mu, scale^2 I) against N(0, I): the noised target over the reference, times Z."""
    a, lam = rho.sqrt(), 1 - rho
    noised = D.Normal(a * mu, (a**2 * scale**2 + lam).sqrt()).log_prob(x).sum(-1)
    return noised - D.Normal(0.0, 1.0).log_prob(x).sum(-1) + LOG_Z


@pytest.mark.parametrize("rho", [0.02, 0.5, 0.95])
def test_laplace_guidance_is_exact_for_a_gaussian_and_power_up_to_a_constant(rho):
    rho = torch.tensor(rho, dtype=F64)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=F64).requires_grad_(True)
    exact = exact_log_gt(x, rho, 0.3)
    (grad,) = torch.autograd.grad(exact.sum(), x)
    x = x.detach()
    lap = NoisedPath(gaussian_target(), identity(3), 0.3**2, "laplace").evaluate(x, rho)
    torch.testing.assert_close(lap.log_g, exact.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(lap.grad_g, grad, rtol=0, atol=1e-10)
    power = NoisedPath(gaussian_target(), identity(3), 0.3**2, "power").evaluate(x, rho)
    diff = power.log_g - exact.detach()
    assert float(diff.max() - diff.min()) < 1e-10  # a constant offset, which SMC ignores
    torch.testing.assert_close(power.grad_g, grad, rtol=0, atol=1e-10)
    simple = NoisedPath(gaussian_target(), identity(3), 1.0, "simple").evaluate(x, rho)
    assert float((simple.grad_g - grad).abs().max()) > 0.1  # the simple guidance is not exact here


def run_path(path, generator, num_steps, n, broken=False):
    """Propose and reweight along the path with no resampling and no moves, and compute each
    particle's path importance weight independently from the densities; returns both ``(n,)``."""
    rho = noise_schedule(num_steps, path.mode_scale_sq)
    x = torch.randn(n, path.dim, generator=generator, dtype=F64)
    gs = path.evaluate(x, rho[-1])
    log_w = gs.log_g.clone()
    # path weight = pi_z(x_0) prod_k p_fwd(x_{k+1} | x_k) / (N(x_K; 0, I) prod_k q(x_k | x_{k+1}))
    log_path = -D.Normal(0.0, 1.0).log_prob(x).sum(-1)
    for k in range(num_steps - 1, -1, -1):
        c = torch.sqrt(rho[k + 1] / rho[k])
        lam = 1 - c**2
        x_new = ns.guided_proposal(generator, gs, c, lam)
        new = path.evaluate(x_new, rho[k])
        incr = ns.incremental_log_weight(gs, new, c, lam)
        if broken:  # forget the lambda |v|^2 / 2 term of the Gaussian ratio
            incr = incr - 0.5 * lam * (gs.grad_g**2).sum(-1)
        log_w = log_w + incr
        q_mean = c * gs.x + lam * gs.grad_g
        log_path += D.Normal(c * x_new, lam.sqrt()).log_prob(gs.x).sum(-1)
        log_path -= D.Normal(q_mean, lam.sqrt()).log_prob(x_new).sum(-1)
        gs = new
    log_pi_z = path.target.log_prob(path.whitening.from_white(gs.x)) + path.whitening.log_det
    return log_w, log_path + log_pi_z


@pytest.mark.parametrize("guidance", ["simple", "power", "laplace"])
def test_weights_telescope_to_the_path_importance_weight(guidance):
    white = Whitening.from_moments(torch.tensor([0.5, 0.0, 0.2], dtype=F64), 0.5 * torch.eye(3, dtype=F64))
    path = NoisedPath(gaussian_target(), white, 0.2, guidance)
    log_w, log_path = run_path(path, torch.Generator().manual_seed(1), 12, 50)
    torch.testing.assert_close(log_w, log_path, rtol=0, atol=1e-9)
    broken, log_path_b = run_path(path, torch.Generator().manual_seed(1), 12, 50, broken=True)
    assert float((broken - log_path_b).abs().max()) > 1e-3  # the identity catches a wrong weight


def test_reference_target_gives_constant_weights_and_exact_log_z():
    target = ds.Target(lambda x: D.Normal(0.0, 1.0).log_prob(x).sum(-1) + LOG_Z, 4, dtype=F64)
    path = NoisedPath(target, identity(4), 1.0, "simple")
    out = ns.noised_smc(torch.Generator().manual_seed(0), path, 64, num_steps=10, num_mcmc_steps=1)
    assert abs(out.log_normalizer - LOG_Z) < 1e-12
    assert float(out.stages["ess"].min()) > 1 - 1e-12 and out.num_resampling == 0


def log_z_hat(path, runs, n=32, num_steps=8, broken=False):
    """``runs`` independent estimates of log Z from ``n`` particles each: without resampling the
    particles are independent, so one batch of ``runs * n`` particles is split into groups."""
    log_w, _ = run_path(path, torch.Generator().manual_seed(5), num_steps, runs * n, broken=broken)
    return torch.logsumexp(log_w.reshape(runs, n), 1) - math.log(n)


def test_log_z_unbiased_for_a_poor_guidance_and_a_wrong_weight_detected():
    # A poor guidance (PDDS simple guidance on a narrow, off-centre Gaussian) and few steps: the
    # weights vary a lot, yet Z-hat / Z averages to 1 within its Monte Carlo error.
    path = NoisedPath(gaussian_target(0.5), identity(3), 1.0, "simple")
    ratio = torch.exp(log_z_hat(path, 400) - LOG_Z)
    z = (ratio.mean() - 1) / (ratio.std() / math.sqrt(len(ratio)))
    assert abs(float(z)) < 4, float(z)
    assert float(ratio.std()) > 0.05  # the weights do vary: the test has something to check
    bad = torch.exp(log_z_hat(path, 400, broken=True) - LOG_Z)
    z_bad = (bad.mean() - 1) / (bad.std() / math.sqrt(len(bad)))
    assert abs(float(z_bad)) > 4, float(z_bad)


def test_exact_guidance_weights_become_constant_as_the_steps_shrink():
    path = NoisedPath(gaussian_target(0.3), identity(3), 0.3**2, "laplace")
    sds = []
    for num_steps in (16, 64, 256):
        log_w, _ = run_path(path, torch.Generator().manual_seed(2), num_steps, 200)
        sds.append(float(log_w.std()))
    # only the time discretisation varies the weights: sd ~ 1 / sqrt(steps), halving per 4x steps
    ratios = [sds[1] / sds[0], sds[2] / sds[1]]
    assert all(0.3 < r < 0.7 for r in ratios), sds
    wrong = NoisedPath(gaussian_target(0.3), identity(3), 1.0, "simple")
    log_w, _ = run_path(wrong, torch.Generator().manual_seed(2), 256, 200)
    assert float(log_w.std()) > 3 * sds[2], (float(log_w.std()), sds)


ANISO = GaussianMixture(
    [[2.0, 0.0, 0.0], [-1.0, 1.5, 0.5]],
    [0.8, 0.2],
    covs=[[[0.04, 0.01, 0.0], [0.01, 0.09, 0.0], [0.0, 0.0, 0.02]], 0.5 * torch.eye(3, dtype=F64)],
    log_normalizer=LOG_Z,
)


def test_mode_bank_recovers_an_anisotropic_mixture_and_its_guidance_is_exact():
    """From points near each mode, the bank finds the means, covariances and weights (a Gaussian
    mixture is its own Laplace mixture), and its guidance is the exact noised g_t of the mixture."""
    target = ANISO.as_target(dtype=F64)
    path = NoisedPath(target, identity(3), 1.0, "power")
    gen = torch.Generator().manual_seed(0)
    z = ANISO.sample(400, gen) + 0.2 * torch.randn(400, 3, generator=gen, dtype=F64)
    lp, grad = path.log_pi_and_grad(z)
    bank, unseen = build_mode_bank(path.log_pi_and_grad, z, lp, grad)
    assert unseen == 0.0  # 400 points, two modes: none alone
    assert bank.means.shape[0] == 2
    order = torch.argsort(bank.log_mass, descending=True)
    torch.testing.assert_close(bank.means[order], ANISO.means, rtol=0, atol=1e-6)
    covs = torch.einsum("jab,jb,jcb->jac", bank.evecs, bank.evals, bank.evecs)[order]
    torch.testing.assert_close(covs, ANISO.covs, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.softmax(bank.log_mass[order], 0), ANISO.weights, rtol=0, atol=1e-4)
    torch.testing.assert_close(
        torch.logsumexp(bank.log_mass, 0), torch.tensor(LOG_Z, dtype=F64), rtol=0, atol=1e-4
    )
    rho = torch.tensor(0.3, dtype=F64)
    x = torch.randn(8, 3, generator=gen, dtype=F64)
    log_g, _ = bank_log_g(bank, x, rho)
    noised = ANISO.noised(float(rho.sqrt()), float((1 - rho).sqrt()))
    exact = noised.log_prob(x) + LOG_Z - D.Normal(0.0, 1.0).log_prob(x).sum(-1)
    torch.testing.assert_close(log_g, exact, rtol=0, atol=1e-3)
    bank_path = NoisedPath(target, identity(3), 1.0, "bank", bank)
    full = bank_path.evaluate(x, rho)  # bank times the residual, which is 1 here
    torch.testing.assert_close(full.log_g, exact, rtol=0, atol=1e-3)


MIXTURE = GaussianMixture([[-2.0, 0.0], [2.0, 1.0]], [0.7, 0.3], scales=[0.5, 0.8], log_normalizer=LOG_Z)


def test_front_door_mixture_log_z_and_mode_weights():
    target = MIXTURE.as_target(dtype=F64)
    idata = ds.sample(
        target, "pdds", num_samples=1000, seed=0, progress=False, num_steps=32, num_mcmc_steps=2
    )
    attrs = idata.posterior.attrs
    err = attrs["log_normalizer"] - LOG_Z
    assert abs(err) < max(3 * attrs["log_normalizer_se"], 0.02), (err, attrs["log_normalizer_se"])
    x = torch.as_tensor(idata.posterior["x"].values.reshape(-1, 2))
    share = float((MIXTURE.assign(x) == 0).double().mean())
    assert abs(share - 0.7) < 0.05, share  # sd of a share of 1000 resampled draws is about 0.015
    assert idata["diffusion"]["noise"].shape[0] == 33
    assert attrs["num_target_evals"] > 0


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match="unknown option"):
        ds.sample(MIXTURE.as_target(dtype=F64), "pdds", num_samples=10, seed=0, num_step=3)


def test_few_particles_warn_that_the_error_bar_is_unreliable():
    with pytest.warns(RuntimeWarning, match="distinct initial particles"):
        ds.sample(
            MIXTURE.as_target(dtype=F64),
            "pdds",
            num_samples=16,
            seed=0,
            progress=False,
            num_steps=8,
            pilot_chains=64,
        )


def test_pooled_standard_error_is_the_runs_spread_when_it_is_larger():
    from diffstat.diffusion.noised_smc_check import pooled_log_z

    log_zs = [0.0, math.log(2.0), math.log(3.0)]  # Z-hats 1, 2, 3: pooled Z = 2
    log_z, se, how = pooled_log_z(log_zs, [0.01] * 3)
    assert abs(log_z - math.log(2.0)) < 1e-12 and how == "runs"
    assert abs(se - 0.5 / math.sqrt(3.0)) < 1e-12  # sd(Z_r / Z) = sd(0.5, 1, 1.5) = 0.5
    _, se_g, how_g = pooled_log_z(log_zs, [2.0] * 3)
    assert how_g == "genealogy" and se_g > 0.5 / math.sqrt(3.0)
    assert pooled_log_z([0.3], [0.1]) == (0.3, 0.1, "genealogy")


def fake_run(log_z, se, stuck=0.0, acc=0.57, eves=100, levels=16):
    stages = {"acceptance_rate": torch.full((levels,), acc), "stuck": torch.full((levels,), stuck)}
    return ns.NoisedSMCOutput(None, None, log_z, se, stages, 3, eves)


def test_reliability_checks_flag_disagreeing_runs_stuck_particles_and_few_eves():
    from diffstat.diffusion.noised_smc_check import reliability_problems

    agree = [fake_run(0.1 * (i % 2), 0.1) for i in range(4)]
    assert reliability_problems(agree, 0.05) == []
    apart = [fake_run(0.5 * i, 0.05) for i in range(4)]  # each claims 0.05, they spread by 0.6
    assert any("disagrees" in p for p in reliability_problems(apart, 0.7))
    assert any("did not move" in p for p in reliability_problems([fake_run(0.0, 0.1, stuck=0.2)], 0.0))
    assert any("accept" in p for p in reliability_problems([fake_run(0.0, 0.1, acc=0.01)], 0.0))
    assert any("distinct initial" in p for p in reliability_problems([fake_run(0.0, 0.1, eves=3)], 0.0))


def test_funnel_error_bar_holds_or_the_run_warns():
    """The funnel's neck is out of reach of the moves: log Z is biased far beyond the genealogy error
    bar (the failure this test guards), so the front door must either widen the bar or warn."""
    from diffstat.targets import Funnel

    ref = D.Independent(D.Normal(torch.zeros(10, dtype=F64), 3 * torch.ones(10, dtype=F64)), 1)
    target = ds.Target(Funnel(10).unnormalized_log_prob, 10, reference=ref, dtype=F64)
    opts = dict(num_samples=300, num_chains=4, seed=0, progress=False, num_steps=32, pilot_chains=512)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = ds.sample(target, "pdds", **opts)
    attrs = idata.posterior.attrs
    err, se = attrs["log_normalizer"], attrs["log_normalizer_se"]  # exact log Z = 0
    warned = any("unreliable" in str(w.message) for w in caught if w.category is RuntimeWarning)
    assert abs(err) <= 3 * se or warned, (err, se)
    # the failure is real: the four runs agree with each other (so their spread cannot widen the bar)
    # and miss the neck together, more than 3 s.e. below the exact value; only the warning saves it
    assert err < -0.3 and abs(err) > 3 * se and warned, (err, se)


def test_healthy_runs_do_not_warn_and_decorrelating_hmc_moves_work():
    target = MIXTURE.as_target(dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        idata = ds.sample(
            target,
            "pdds",
            num_samples=500,
            num_chains=3,
            seed=1,
            progress=False,
            num_steps=32,
            num_mcmc_steps=None,
            max_mcmc_steps=10,
            kernel="hmc",
        )
    attrs = idata.posterior.attrs
    assert abs(attrs["log_normalizer"] - LOG_Z) < 3 * attrs["log_normalizer_se"]
    moves = idata["diffusion"]["num_moves"].values
    assert moves.min() >= 2 and moves.max() <= 10
    lp = torch.as_tensor(idata.sample_stats["lp"].values[0, :5])
    x = torch.as_tensor(idata.posterior["x"].values[0, :5])
    torch.testing.assert_close(lp, MIXTURE.as_target(dtype=F64).log_prob(x), rtol=0, atol=1e-9)


def test_local_mala_keeps_the_funnel_invariant_and_moves_in_its_neck():
    """Exact funnel draws stay exact under 20 position-dependent MALA moves (x_1's mean and variance
    within 4 MC s.e.), the same statistic rejects draws whose x_1 has sd 1.6 (a sampler that misses
    the neck), and in the neck (x_1 < -3) the local step accepts where MALA's shared step does not."""
    from diffstat.diffusion.noised_smc_path import local_mala_step
    from diffstat.mcmc.base import MCMCState
    from diffstat.mcmc.mala import mala_step
    from diffstat.targets import Funnel

    funnel, gen = Funnel(10), torch.Generator().manual_seed(3)
    target = funnel.as_target(dtype=F64)
    x0 = funnel.sample(4000, gen)
    neck = x0[:, 0] < -3

    def run(kernel, x):
        state, acc = MCMCState(x, *target.log_prob_and_grad(x)), torch.zeros(x.shape[0], dtype=F64)
        for _ in range(20):
            state, info = kernel(gen, state, target.log_prob_and_grad, torch.tensor(0.3, dtype=F64))
            acc += info.acceptance_rate / 20
        return state.x, acc

    def z_scores(x1):
        n = x1.numel()
        return float(x1.mean() / (3 / math.sqrt(n))), float((x1.var() - 9) / (9 * math.sqrt(2 / n)))

    x, acc = run(local_mala_step, x0)
    assert max(abs(z) for z in z_scores(x[:, 0])) < 4, z_scores(x[:, 0])
    assert float((x - x0).abs().mean()) > 0.1  # the kernel moved the particles
    wrong = 1.6 * torch.randn(4000, generator=gen, dtype=F64)
    assert max(abs(z) for z in z_scores(wrong)) > 4
    _, acc_mala = run(mala_step, x0)
    assert float(acc[neck].mean()) > 0.3 and float(acc_mala[neck].mean()) < 0.1, (
        float(acc[neck].mean()),
        float(acc_mala[neck].mean()),
    )


@pytest.mark.parametrize("guidance", ["power", "laplace"])
def test_the_drivers_weights_are_the_path_importance_weight(guidance):
    """``noised_smc`` (each level one ``tempering.core.smc_step``) with no resampling and no moves
    draws the trajectory of ``run_path`` from the same seed, and its accumulated log weights are the
    path importance weight; its log Z is then their log mean (the increments telescope)."""
    white = Whitening.from_moments(torch.tensor([0.5, 0.0, 0.2], dtype=F64), 0.5 * torch.eye(3, dtype=F64))
    path = NoisedPath(gaussian_target(), white, 0.2, guidance)
    gen = torch.Generator().manual_seed(4)
    out = ns.noised_smc(gen, path, 50, num_steps=12, num_mcmc_steps=0, resample_threshold=0.0)
    _, log_path = run_path(path, torch.Generator().manual_seed(4), 12, 50)
    assert out.num_resampling == 0 and out.stages["log_z_increment"].shape == (13,)
    torch.testing.assert_close(out.log_weights, log_path, rtol=0, atol=1e-9)
    log_mean = torch.logsumexp(out.log_weights, 0) - math.log(50)
    assert abs(out.log_normalizer - float(log_mean)) < 1e-10
    log_pi = path.target.log_prob(path.whitening.from_white(out.particles.x))
    torch.testing.assert_close(out.particles.target_lp, log_pi, rtol=0, atol=1e-10)
