"""Reverse samplers with the exact score of a Gaussian mixture: the probability-flow density
(exact and Hutchinson trace) against the exact mixture density, and every sampler's moments and
mode weights against the exact ones, within Monte Carlo error."""

import math

import pytest
import torch

from diffstat.diffusion import (
    VE,
    VP,
    EnergyMLP,
    annealed_langevin,
    ddpm_ancestral,
    euler_maruyama,
    noised_mixture_score,
    predictor_corrector,
    probability_flow,
    probability_flow_log_prob,
)
from diffstat.diffusion.divergence import autograd_divergence
from diffstat.targets.mixture import GaussianMixture

MIX = GaussianMixture([[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]], [0.5, 0.3, 0.2], scales=[0.4, 0.6, 0.5])
OTHER = GaussianMixture([[-1.5, 0.5], [1.5, 0.0], [0.0, -1.0]], [0.3, 0.5, 0.2], scales=[0.4, 0.6, 0.5])
# well separated modes for the mode-weight checks (misassignment negligible)
SEPARATED = GaussianMixture([[-3.0, 0.0], [3.0, 1.0], [0.0, -3.0]], [0.5, 0.3, 0.2], scales=[0.5, 0.7, 0.6])
WRONG_WEIGHTS = GaussianMixture(
    [[-3.0, 0.0], [3.0, 1.0], [0.0, -3.0]], [0.4, 0.35, 0.25], scales=[0.5, 0.7, 0.6]
)


def _at(process, mixture, t):
    t = torch.tensor(t, dtype=torch.float64)
    return mixture.noised(float(process.alpha(t)), float(process.sigma(t)))


def _grid(h=0.2, lim=4.6):
    g = torch.arange(-lim, lim + 1e-9, h, dtype=torch.float64)
    return torch.cartesian_prod(g, g), h * h


@pytest.mark.parametrize("process", [VP(), VP(schedule="cosine"), VE()], ids=repr)
def test_flow_density_integrates_to_one_and_equals_the_mixture(process):
    x, cell = _grid()
    score = noised_mixture_score(MIX, process)
    log_q, x_T = probability_flow_log_prob(score, process, x, num_steps=40, return_prior_point=True)
    assert float(log_q.exp().sum() * cell) == pytest.approx(1.0, abs=2e-3)
    # The exact flow carries p_{t_min} onto p_{t_max}, so after replacing the prior by the exact
    # p_{t_max} at x_T the log-density must be exactly log p_{t_min}(x), up to the RK4 error.
    exact = _at(process, MIX, process.t_min).log_prob(x)
    corrected = log_q - process.prior_log_prob(x_T) + _at(process, MIX, process.t_max).log_prob(x_T)
    high = exact > -8.0
    assert float((corrected - exact)[high].abs().max()) < 0.01
    if isinstance(process, VP) and process.schedule == "linear":  # alpha_T = 0.0066: prior error small
        assert float((log_q - exact)[high].abs().max()) < 0.02
    # able to fail: the flow of another mixture's score does not give this density
    wrong, x_T = probability_flow_log_prob(
        noised_mixture_score(OTHER, process), process, x[high], num_steps=40, return_prior_point=True
    )
    wrong = wrong - process.prior_log_prob(x_T) + _at(process, OTHER, process.t_max).log_prob(x_T)
    assert float((wrong - exact[high]).abs().max()) > 0.5


def test_reverse_flow_log_density_exact_and_hutchinson(generator):
    vp = VP()
    score = noised_mixture_score(MIX, vp)
    x_T = vp.prior_sample(1000, 2, generator, dtype=torch.float64)
    x0, log_q = probability_flow(score, vp, x_T, num_steps=40, log_prob=True)
    x0_plain, none = probability_flow(score, vp, x_T, num_steps=40)
    assert none is None
    torch.testing.assert_close(x0, x0_plain)
    err = log_q - _at(vp, MIX, vp.t_min).log_prob(x0)
    assert float(err.abs().quantile(0.99)) < 0.02
    # Hutchinson: same points, unbiased log-density
    x0_h, log_q_h = probability_flow(
        score, vp, x_T, num_steps=40, log_prob=True, trace="hutchinson", generator=generator
    )
    torch.testing.assert_close(x0_h, x0)
    diff = log_q_h - log_q
    assert float(diff.std()) > 0.01  # it is random ...
    assert abs(float(diff.mean())) < 4.5 * float(diff.std()) / math.sqrt(1000)  # ... and unbiased
    with pytest.raises(ValueError, match="generator"):
        probability_flow(score, vp, x_T, log_prob=True, trace="hutchinson")


def test_exact_divergence_of_an_energy_model():
    # second-order autograd through -grad E: compare with central differences, float64
    model = EnergyMLP(3, 16, 2, process=VP()).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = torch.full((5,), 0.2, dtype=torch.float64)
    _, div = autograd_divergence(lambda y: model(y, t), x)
    h = 1e-5
    with torch.no_grad():
        fd = sum(
            (model(x + h * e, t)[:, i] - model(x - h * e, t)[:, i]) / (2 * h)
            for i, e in enumerate(torch.eye(3, dtype=torch.float64))
        )
    torch.testing.assert_close(div, fd, rtol=1e-6, atol=1e-6)


def _z_scores(x, mixture):
    """z-scores of mode weights (by assignment), means and variances against ``mixture``."""
    n = x.shape[0]
    w = torch.bincount(mixture.assign(x), minlength=mixture.num_components).double() / n
    z_w = (w - mixture.weights) / torch.sqrt(mixture.weights * (1 - mixture.weights) / n)
    var = torch.diagonal(mixture.cov)
    z_m = (x.mean(0) - mixture.mean) / torch.sqrt(var / n)
    # variance of the sample variance of a non-Gaussian law: (m4 - var^2)/n, m4 from exact draws
    ref = mixture.sample(200000, torch.Generator().manual_seed(0))
    m4 = ((ref - ref.mean(0)) ** 4).mean(0)
    z_v = (x.var(0) - var) / torch.sqrt((m4 - var**2) / n)
    return torch.cat([z_w, z_m, z_v]).abs()


SAMPLERS = {
    "euler_maruyama": lambda s, p, x, g: euler_maruyama(s, p, x, num_steps=200, generator=g),
    "predictor_corrector": lambda s, p, x, g: predictor_corrector(s, p, x, num_steps=100, generator=g),
    "ddpm_ancestral": lambda s, p, x, g: ddpm_ancestral(s, p, x, num_steps=100, generator=g),
    "probability_flow": lambda s, p, x, g: probability_flow(s, p, x, num_steps=30)[0],
}


# The deterministic flow is checked with VP only: it keeps the error of the VE prior N(0, 100 I)
# against p_T (a 0.025 shift of mode weight here), which the stochastic samplers forget.
CASES = [
    (name, process)
    for process in (VP(), VE(sigma_max=10.0))
    for name in SAMPLERS
    if not (name == "probability_flow" and isinstance(process, VE))
]


@pytest.mark.parametrize("name,process", CASES, ids=[f"{n}-{type(p).__name__}" for n, p in CASES])
def test_samplers_reproduce_moments_and_mode_weights(name, process):
    gen = torch.Generator().manual_seed(11)
    x_T = process.prior_sample(4000, 2, gen, dtype=torch.float64)
    x = SAMPLERS[name](noised_mixture_score(SEPARATED, process), process, x_T, gen)
    z = _z_scores(x, _at(process, SEPARATED, process.t_min))
    assert float(z.max()) < 4.5, z


def test_sampler_check_rejects_a_wrong_score():
    vp = VP()
    gen = torch.Generator().manual_seed(11)
    x = euler_maruyama(
        noised_mixture_score(WRONG_WEIGHTS, vp),
        vp,
        vp.prior_sample(4000, 2, gen, dtype=torch.float64),
        num_steps=200,
        generator=gen,
    )
    assert float(_z_scores(x, _at(vp, SEPARATED, vp.t_min)).max()) > 4.5


def test_annealed_langevin_reproduces_the_smoothed_mixture():
    ve = VE(sigma_max=10.0)
    gen = torch.Generator().manual_seed(12)
    sigmas = torch.logspace(math.log10(8.0), math.log10(0.05), 30, dtype=torch.float64)
    x = 8.0 * torch.randn(3000, 2, generator=gen, dtype=torch.float64)
    x = annealed_langevin(
        noised_mixture_score(SEPARATED, ve),
        sigmas,
        x,
        steps_per_level=20,
        step_scale=1e-3,
        generator=gen,
        process=ve,
    )
    assert float(_z_scores(x, SEPARATED.noised(1.0, 0.05)).max()) < 4.5
    # the same with the score called at the noise level itself (no process)
    exact_by_sigma = lambda y, s: SEPARATED.smoothed_score(y, float(s[0]))  # noqa: E731
    x = annealed_langevin(
        exact_by_sigma, sigmas[-3:], x, steps_per_level=5, step_scale=1e-3, generator=gen, denoise=True
    )
    assert x.shape == (3000, 2) and torch.isfinite(x).all()


def test_bad_input(generator):
    vp = VP()
    score = noised_mixture_score(MIX, vp)
    x = torch.zeros(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="num_steps"):
        euler_maruyama(score, vp, x, num_steps=0, generator=generator)
    with pytest.raises(ValueError, match="shape"):
        ddpm_ancestral(score, vp, torch.zeros(4), num_steps=3, generator=generator)
    with pytest.raises(ValueError, match="trace"):
        probability_flow(score, vp, x, log_prob=True, trace="approx")
    with pytest.raises(ValueError, match="decreasing"):
        annealed_langevin(score, [0.1, 1.0], x, steps_per_level=2, step_scale=0.1, generator=generator)
    with pytest.raises(ValueError, match="score_fn"):
        euler_maruyama(lambda y, t: y[:, :1], vp, x, num_steps=2, generator=generator)
