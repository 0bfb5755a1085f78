"""Noising processes: closed forms against numerical integration, the SDE against its marginals,
inverses, forward sampling and the prior."""

import math

import pytest
import torch

from diffstat.diffusion import VE, VP, noised_mixture_score, process_from_dict
from diffstat.targets.mixture import GaussianMixture

PROCESSES = [
    VP(),
    VP(schedule="cosine"),
    VP(beta_min=1.0, beta_max=1.0),
    VE(),
    VE(sigma_min=0.05, sigma_max=20.0, t_min=1e-3, t_max=0.9),
]
TIMES = torch.tensor([1e-3, 0.02, 0.3, 0.7, 0.89, 0.905, 0.95], dtype=torch.float64)  # 0.9008: cosine cap


@pytest.mark.parametrize("process", PROCESSES[:3], ids=repr)
def test_vp_alpha_is_exp_of_integrated_beta(process):
    # alpha_t = exp(-1/2 int_0^t beta), by a fine trapezoid rule on beta(t); sigma^2 = 1 - alpha^2.
    for t in TIMES.tolist():
        u = torch.linspace(0, t, 20001, dtype=torch.float64)
        integral = torch.trapezoid(process.beta(u), u)
        assert float(process.alpha(torch.tensor(t, dtype=torch.float64))) == pytest.approx(
            math.exp(-0.5 * float(integral)), rel=1e-7
        )
    a, s = process.alpha(TIMES), process.sigma(TIMES)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(TIMES), rtol=0, atol=1e-14)


def test_vp_schedules_known_values():
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert float(VP().alpha(t)[1]) == pytest.approx(math.exp(-0.5 * (0.1 + 0.5 * 19.9)))
    cos = VP(schedule="cosine")
    s = 0.008
    t_mid = torch.tensor(0.5, dtype=torch.float64)  # before the cap: the Nichol-Dhariwal cosine
    expected = math.cos((0.5 + s) / (1 + s) * math.pi / 2) / math.cos(s / (1 + s) * math.pi / 2)
    assert float(cos.alpha(t_mid)) == pytest.approx(expected, rel=1e-12)
    assert float(cos.beta(t)[1]) == 20.0
    assert float(VP().alpha(t)[0]) == 1.0 and float(VP().sigma(t)[0]) == 0.0


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_sde_coefficients_generate_the_marginals(process):
    # For dX = a(t) X dt + g(t) dW: d alpha/dt = a alpha and d sigma^2/dt = 2 a sigma^2 + g^2.
    # a(t) is read from drift(x, t) at x = 1, so this ties drift/diffusion to alpha/sigma.
    h = 1e-6
    t = TIMES[
        (TIMES > process.t_min + 2 * h) & (TIMES < process.t_max - 2 * h) & ((TIMES - 0.9008).abs() > 1e-3)
    ]
    a = process.drift(torch.ones(t.shape[0], 1, dtype=torch.float64), t).squeeze(-1)
    d_alpha = (process.alpha(t + h) - process.alpha(t - h)) / (2 * h)
    d_var = (process.sigma(t + h) ** 2 - process.sigma(t - h) ** 2) / (2 * h)
    torch.testing.assert_close(d_alpha, a * process.alpha(t), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(
        d_var, 2 * a * process.sigma(t) ** 2 + process.diffusion(t) ** 2, rtol=1e-6, atol=1e-9
    )


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_time_at_sigma_inverts_sigma(process):
    t = TIMES[(TIMES > 0) & (TIMES <= process.t_max)]
    torch.testing.assert_close(process.time_at_sigma(process.sigma(t)), t, rtol=1e-9, atol=1e-9)


def test_reverse_and_flow_drifts():
    # With p_0 = N(0, I), every VP marginal is N(0, I): score -x, so the probability-flow velocity
    # vanishes and the reverse drift is +beta/2 x.
    vp = VP()
    x = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.full((7,), 0.4, dtype=torch.float64)
    torch.testing.assert_close(vp.probability_flow_drift(x, t, -x), torch.zeros_like(x))
    torch.testing.assert_close(vp.reverse_drift(x, t, -x), 0.5 * vp.beta(t)[:, None] * x)
    ve = VE()
    torch.testing.assert_close(
        ve.reverse_drift(x, 0.4, -x), ve.diffusion(torch.tensor(0.4, dtype=torch.float64)) ** 2 * x
    )


@pytest.mark.parametrize("process", [VP(), VE()], ids=repr)
def test_marginal_sample_moments(process, generator):
    n = 20000
    x0 = torch.tensor([[1.5, -2.0]], dtype=torch.float64).expand(n, 2)
    t = torch.full((n,), 0.3, dtype=torch.float64)
    xt, z = process.marginal_sample(x0, t, generator)
    a, s = float(process.alpha(t[0])), float(process.sigma(t[0]))
    torch.testing.assert_close(xt, a * x0 + s * z)
    z_mean = (xt.mean(0) - a * x0[0]) / (s / math.sqrt(n))
    z_var = (xt.var(0) / s**2 - 1) / math.sqrt(2 / n)
    assert z_mean.abs().max() < 4.5 and z_var.abs().max() < 4.5


@pytest.mark.parametrize("process", [VP(), VE(t_max=0.8)], ids=repr)
def test_prior(process, generator):
    x = process.prior_sample(20000, 3, generator, dtype=torch.float64)
    s = process.prior_scale()
    assert x.shape == (20000, 3) and x.dtype == torch.float64
    assert ((x.var(0) / s**2 - 1).abs() / math.sqrt(2 / 20000)).max() < 4.5
    exact = torch.distributions.Normal(0.0, s).log_prob(x).sum(-1)
    torch.testing.assert_close(process.prior_log_prob(x), exact)
    if isinstance(process, VE):
        assert s == pytest.approx(float(process.sigma(torch.tensor(0.8, dtype=torch.float64))))


def test_noised_mixture_score_matches_the_mixture(generator):
    mix = GaussianMixture([[-1.0, 0.0], [2.0, 1.0]], [0.3, 0.7], scales=[0.5, 0.8])
    vp = VP()
    score = noised_mixture_score(mix, vp)
    x = torch.randn(6, 2, dtype=torch.float64, generator=generator)
    t = torch.tensor([0.1, 0.1, 0.5, 0.5, 0.9, 0.1], dtype=torch.float64)
    out = score(x, t)
    for i in range(6):
        ti = t[i : i + 1]
        exact = mix.noised(float(vp.alpha(ti)), float(vp.sigma(ti))).score(x[i : i + 1])
        torch.testing.assert_close(out[i : i + 1], exact)


def test_round_trip_and_bad_input():
    for p in PROCESSES:
        assert process_from_dict(p.to_dict()).to_dict() == p.to_dict()
    with pytest.raises(ValueError, match="schedule"):
        VP(schedule="quadratic")
    with pytest.raises(ValueError, match="t_min"):
        VP(t_min=0.5, t_max=0.2)
    with pytest.raises(ValueError, match="sigma_min"):
        VE(sigma_min=2.0, sigma_max=1.0)
    with pytest.raises(ValueError):
        VP().time_at_sigma(torch.tensor(1.5))
    with pytest.raises(ValueError, match="process"):
        process_from_dict({"kind": "XX"})
