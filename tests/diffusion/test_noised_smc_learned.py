"""The learned guidance of ``method="pdds"`` (``num_rounds``): exactness for any network, the
correction's vanishing at zero noise, a trained network's lower weight variance, unbiasedness."""

from __future__ import annotations

import math

import pytest
import torch

import diffstat as ds
from diffstat.diffusion import noised_smc as ns
from diffstat.diffusion.gaussians import Whitening
from diffstat.diffusion.noised_smc_bank import ModeBank, bank_log_g
from diffstat.diffusion.noised_smc_learned import LearnedGuidance, LearnedPath, fit_guidance, mixing_weight
from diffstat.diffusion.noised_smc_path import NoisedPath
from tests.diffusion.test_noised_smc import LOG_Z, MU, gaussian_target, identity, log_z_hat, run_path

D = torch.distributions
F64 = torch.float64


def poor_network(dim, scale=0.3, seed=0, bank=None):
    """An untrained network whose output layer is random (a zero layer would make h = 0)."""
    net = LearnedGuidance(dim, F64, seed=seed, bank=bank)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = net.energy.net.out
        out.weight.copy_(scale * torch.randn(out.weight.shape, generator=gen, dtype=F64))
        out.bias.copy_(scale * torch.randn(out.bias.shape, generator=gen, dtype=F64))
    net.requires_grad_(False)
    return net


@pytest.mark.parametrize("guidance", ["simple", "power"])
def test_learned_weights_telescope_to_the_path_importance_weight(guidance):
    white = Whitening.from_moments(torch.tensor([0.5, 0.0, 0.2], dtype=F64), 0.5 * torch.eye(3, dtype=F64))
    base = NoisedPath(gaussian_target(), white, 0.2, guidance)
    path = LearnedPath(base, poor_network(3))
    log_w, log_path = run_path(path, torch.Generator().manual_seed(1), 12, 50)
    torch.testing.assert_close(log_w, log_path, rtol=0, atol=1e-9)
    broken, log_path_b = run_path(path, torch.Generator().manual_seed(1), 12, 50, broken=True)
    assert float((broken - log_path_b).abs().max()) > 1e-3  # the identity catches a wrong weight
    # the driver (one tempering smc_step per level) accumulates the same weights
    out = ns.noised_smc(
        torch.Generator().manual_seed(4), path, 50, num_steps=12, num_mcmc_steps=0, resample_threshold=0.0
    )
    _, log_path = run_path(path, torch.Generator().manual_seed(4), 12, 50)
    torch.testing.assert_close(out.log_weights, log_path, rtol=0, atol=1e-9)
    log_pi = path.target.log_prob(path.whitening.from_white(out.particles.x))
    torch.testing.assert_close(out.particles.target_lp, log_pi, rtol=0, atol=1e-10)


def test_learned_guidance_gradient_is_the_autograd_gradient_and_differs_from_the_base():
    base = NoisedPath(gaussian_target(), identity(3), 0.2, "power")
    path = LearnedPath(base, poor_network(3))
    rho = torch.tensor(0.3, dtype=F64)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    gs, gb = path.evaluate(x, rho), base.evaluate(x, rho)
    eps = 1e-6
    for j in range(3):
        e = torch.zeros(3, dtype=F64)
        e[j] = eps
        fd = (path.evaluate(x + e, rho).log_g - path.evaluate(x - e, rho).log_g) / (2 * eps)
        torch.testing.assert_close(gs.grad_g[:, j], fd, rtol=0, atol=1e-6)
    assert float((gs.log_g - gb.log_g).abs().min()) > 1e-3  # the network does change the guidance


def test_correction_is_exactly_zero_at_zero_noise():
    base = NoisedPath(gaussian_target(), identity(3), 0.2, "power")
    path = LearnedPath(base, poor_network(3, scale=10.0))
    one = torch.tensor(1.0, dtype=F64)
    assert float(mixing_weight(one, 0.2)) == 0.0
    assert float(mixing_weight(torch.tensor(0.5, dtype=F64), 0.2)) > 0.8
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    gs, gb = path.evaluate(x, one), base.evaluate(x, one)
    for a, b in zip(gs, gb, strict=True):
        assert torch.equal(a, b)


def two_mode_bank():
    """A bank of two anisotropic modes (whitened), as the pilot would build it."""
    rot = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(7), dtype=F64))[0]
    means = torch.tensor([[1.0, 0.0, 0.5], [-1.0, 0.5, 0.0]], dtype=F64)
    evals = torch.tensor([[0.05, 0.1, 0.2], [0.3, 0.3, 0.1]], dtype=F64)
    return ModeBank(
        means, torch.stack([rot, torch.eye(3, dtype=F64)]), evals, torch.log(torch.tensor([0.7, 0.3]))
    )


def test_untrained_network_with_a_bank_is_the_banks_guidance_and_stays_exact():
    bank = two_mode_bank()
    net = LearnedGuidance(3, F64, bank=bank)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    u = torch.tensor([-3.0, -3.0, 0.5, 0.5, 2.0, 2.0], dtype=F64)
    h, grad = net.log_g_and_grad(x, u)
    for rows in ([0, 1], [2, 3], [4, 5]):
        want, want_grad = bank_log_g(bank, x[rows], torch.sigmoid(-u[rows[0]]))
        torch.testing.assert_close(h[rows], want, rtol=0, atol=1e-12)
        torch.testing.assert_close(grad[rows], want_grad, rtol=0, atol=1e-12)
        torch.testing.assert_close(net.score(x[rows], u[rows]), want_grad - x[rows], rtol=0, atol=1e-12)
    base = NoisedPath(gaussian_target(), identity(3), 0.2, "bank", bank)
    path = LearnedPath(base, poor_network(3, bank=bank))
    log_w, log_path = run_path(path, torch.Generator().manual_seed(1), 12, 50)
    torch.testing.assert_close(log_w, log_path, rtol=0, atol=1e-9)


def log_weight_sd(path, seed=2, num_steps=32, n=400):
    log_w, _ = run_path(path, torch.Generator().manual_seed(seed), num_steps, n)
    return float(log_w.std())


def test_network_trained_on_exact_draws_lowers_the_weight_variance():
    # N(MU, 0.3^2 I) in 3-d: the simple guidance g(a x) is far from g_t at mid noise. A network
    # fitted to exact draws and their exact gradients (no resampling, no moves in run_path) must
    # bring the log-weight sd well under the simple guidance's; an untrained network (h = 0) does not.
    target = gaussian_target(0.3)
    base = NoisedPath(target, identity(3), 1.0, "simple")
    gen = torch.Generator().manual_seed(0)
    x0 = MU + 0.3 * torch.randn(4000, 3, generator=gen, dtype=F64)
    grad_log_g = -(x0 - MU) / 0.09 + x0
    net, _ = fit_guidance(gen, x0, grad_log_g, torch.zeros(4000, dtype=F64), 1.0, steps=600)
    sd_simple = log_weight_sd(base)
    sd_learned = log_weight_sd(LearnedPath(base, net))
    sd_untrained = log_weight_sd(LearnedPath(base, LearnedGuidance(3, F64)))
    assert sd_learned < 0.5 * sd_simple, (sd_learned, sd_simple)
    assert not sd_untrained < 0.5 * sd_simple, (sd_untrained, sd_simple)  # the test can fail


def test_log_z_unbiased_under_a_poor_network():
    base = NoisedPath(gaussian_target(0.5), identity(3), 1.0, "simple")
    path = LearnedPath(base, poor_network(3, scale=0.1, seed=1))
    ratio = torch.exp(log_z_hat(path, 400) - LOG_Z)
    z = (ratio.mean() - 1) / (ratio.std() / math.sqrt(len(ratio)))
    assert abs(float(z)) < 4, float(z)
    assert float(ratio.std()) > 0.05  # the weights do vary
    bad = torch.exp(log_z_hat(path, 400, broken=True) - LOG_Z)
    z_bad = (bad.mean() - 1) / (bad.std() / math.sqrt(len(bad)))
    assert abs(float(z_bad)) > 4, float(z_bad)


def test_front_door_two_rounds_count_both_and_refuse_bad_rounds():
    target = ds.Target(
        lambda x: (
            torch.logsumexp(
                torch.stack([D.Normal(-2.0, 0.5).log_prob(x).sum(-1), D.Normal(2.0, 0.5).log_prob(x).sum(-1)])
                + math.log(0.5),
                0,
            )
            + LOG_Z
        ),
        2,
        dtype=F64,
    )
    opts = dict(num_samples=200, num_steps=16, pilot_chains=64, pilot_steps=10, seed=0, progress=False)
    one = ds.sample(target, "pdds", **opts).posterior.attrs
    two = ds.sample(target, "pdds", num_rounds=2, **opts).posterior.attrs
    # the same pilot and the same round 1, then a second run of the same size
    assert two["num_target_evals"] - two["pilot_evals"] == 2 * (one["num_target_evals"] - one["pilot_evals"])
    assert two["round_log_normalizers"] == [one["log_normalizer"]]
    assert abs(two["log_normalizer"] - LOG_Z) < 3 * two["log_normalizer_se"] + 0.02
    with pytest.raises(ValueError, match="num_rounds"):
        ds.sample(target, "pdds", num_rounds=0, **opts)


def test_rounds_fill_the_one_progress_bar(monkeypatch):
    import diffstat._util as util
    from diffstat.diffusion import noised_smc_learned

    bars, real = [], util.tqdm

    def recording(*args, **kwargs):
        bar = real(*args, **kwargs)
        if not kwargs.get("disable", False):
            bars.append(bar)
        return bar

    monkeypatch.setattr(util, "tqdm", recording)
    monkeypatch.setattr(noised_smc_learned, "TRAIN_STEPS", 20)  # the test counts levels, not the fit
    target = ds.Target(lambda x: D.Normal(0.0, 1.0).log_prob(x).sum(-1), 2, dtype=F64)
    opts = dict(num_steps=4, pilot_chains=64, pilot_steps=5, seed=0, progress=True)
    ds.sample(target, "pdds", num_samples=32, num_chains=2, num_rounds=3, **opts)
    assert len(bars) == 1 and bars[0].n == bars[0].total == (2 + 3 - 1) * 5, [(b.n, b.total) for b in bars]
