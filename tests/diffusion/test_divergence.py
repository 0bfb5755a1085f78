"""The exact divergence of the probability flow (:mod:`diffstat.diffusion.divergence`) against the
per-dimension backward loop it replaced and against a closed form, in float64."""

import pytest
import torch
from torch import nn

from diffstat.diffusion import VE, VP, ScoreMLP, noised_mixture_score, probability_flow
from diffstat.diffusion import divergence as dv
from diffstat.diffusion.proposals import ode_log_density
from diffstat.targets.mixture import GaussianMixture

F64 = torch.float64


def loop_divergence(score_fn, process, y, t):
    """The code before: one backward pass per coordinate."""
    with torch.enable_grad():
        y = y.detach().requires_grad_(True)
        tt = t.expand(y.shape[0])
        v = process.probability_flow_drift(y, tt, score_fn(y, tt))
        div = torch.zeros(y.shape[0], dtype=y.dtype)
        for i in range(y.shape[1]):
            (gi,) = torch.autograd.grad(v[:, i].sum(), y, retain_graph=True)
            div = div + gi[:, i]
    return v.detach(), div.detach()


def _perturbed(model, seed=1):
    """Weights moved off the initialisation (whose zero output layer makes the trace trivial)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def _points(n, dim, seed=2):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


T = torch.tensor(0.3, dtype=F64)


@pytest.mark.parametrize("dim", [1, 3, 10])
@pytest.mark.parametrize("chunk", [1, 4])
def test_autograd_method_equals_the_loop_on_a_random_mlp(dim, chunk):
    # a plain MLP (not the package's): the autograd path; chunk 4 batches the cotangents, and dim 10
    # is above it and not a multiple of it
    gen = torch.Generator().manual_seed(dim)
    net = nn.Sequential(nn.Linear(dim + 1, 32), nn.Tanh(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, dim))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    net = net.double()

    def score(y, t):
        return net(torch.cat([y, t.unsqueeze(-1)], -1))

    process, y = VP(), _points(23, dim)
    v0, d0 = loop_divergence(score, process, y, T)
    tt = T.expand(y.shape[0])
    v1, d1 = dv.autograd_divergence(lambda z: process.probability_flow_drift(z, tt, score(z, tt)), y, chunk)
    assert torch.equal(v0, v1)
    assert float((d1 - d0).abs().max()) < 1e-10
    assert float(d0.abs().max()) > 1.0  # not a trivial trace


@pytest.mark.parametrize("process", [VP(t_max=0.6), VE()], ids=repr)
@pytest.mark.parametrize("dim", [1, 40])
@pytest.mark.parametrize(
    "options",
    [{}, {"parameterization": "noise"}, {"residual": False, "activation": "tanh"}, {"activation": "gelu"}],
    ids=["preconditioned", "noise", "plain-tanh", "gelu"],
)
def test_layer_method_equals_the_loop_on_the_package_network(process, dim, options, monkeypatch):
    # blocks of 7 rows for dim 40 (several blocks and a short last one), 140 rows for dim 1
    monkeypatch.setattr(dv, "JACOBIAN_ELEMENTS", 24 * 7 * 40)
    monkeypatch.setattr(dv, "LAYERWISE_MIN_DIM", 1)
    model = _perturbed(ScoreMLP(dim, 24, 3, process=process, seed=0, **options).double())
    y = _points(37, dim)
    v0, d0 = loop_divergence(model, process, y, T)
    v1, d1 = dv.velocity_and_divergence(model, process, y, T)
    assert torch.equal(v0, v1)  # the same forward pass: the ODE's path is unchanged
    assert float((d1 - d0).abs().max()) < 1e-10
    assert float(d0.abs().max()) > 0.01


def test_layer_method_without_a_process_and_in_float32(monkeypatch):
    monkeypatch.setattr(dv, "LAYERWISE_MIN_DIM", 1)
    model = _perturbed(ScoreMLP(5, 16, 2, seed=0).double())
    y, process = _points(11, 5), VP()
    assert (
        float(
            (dv.velocity_and_divergence(model, process, y, T)[1] - loop_divergence(model, process, y, T)[1])
            .abs()
            .max()
        )
        < 1e-10
    )
    # the sampler's float32 model: the two methods differ by float32 rounding only
    model32 = _perturbed(ScoreMLP(30, 32, 3, process=process, seed=0))
    y = _points(50, 30)
    d0, d1 = loop_divergence(model32, process, y, T)[1], dv.velocity_and_divergence(model32, process, y, T)[1]
    assert float((d1 - d0).abs().max()) < 1e-5 * float(d0.abs().max())


def test_divergence_of_the_exact_gaussian_score_is_its_closed_form():
    # one Gaussian N(m, diag(s^2)) noised by VP: s_t = -(x - a m) / (a^2 s^2 + sig^2), so
    # div v = -beta/2 dim + beta/2 sum 1 / (a^2 s^2 + sig^2); able to fail: another scale is rejected
    scales = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    process = VP()

    def exact(sc):
        a, sig2, beta = process.alpha(T), process.sigma(T) ** 2, process.beta(T)
        return -0.5 * beta * 3 + 0.5 * beta * (1.0 / (a**2 * sc**2 + sig2)).sum()

    mix = GaussianMixture([[0.3, -1.0, 2.0]], [1.0], covs=torch.diag(scales**2).unsqueeze(0))
    _, div = dv.velocity_and_divergence(noised_mixture_score(mix, process), process, _points(8, 3), T)
    assert float((div - exact(scales)).abs().max()) < 1e-12
    assert float((div - exact(1.1 * scales)).abs().min()) > 0.01


def test_both_call_sites_give_the_same_log_densities_by_either_method(monkeypatch):
    monkeypatch.setattr(dv, "LAYERWISE_MIN_DIM", 1)
    # probability_flow (the draws' log q) and ode_log_density (at given points) with the network
    # itself (layer method) and wrapped in a lambda (autograd method)
    process = VP(t_max=0.6)
    model = _perturbed(ScoreMLP(4, 16, 2, process=process, seed=0).double())
    wrapped = lambda y, t: model(y, t)  # noqa: E731
    y_T = _points(20, 4)
    x0, lq = probability_flow(model, process, y_T, num_steps=10, log_prob=True)
    x1, lq1 = probability_flow(wrapped, process, y_T, num_steps=10, log_prob=True)
    assert float((x0 - x1).abs().max()) < 1e-12 and float((lq - lq1).abs().max()) < 1e-10
    l0 = ode_log_density(model, process, x0, num_steps=10)
    assert float((l0 - ode_log_density(wrapped, process, x0, num_steps=10)).abs().max()) < 1e-10
    assert float((l0 - lq).abs().max()) < 0.05  # forward and backward solves of one flow agree


def test_small_dimensions_take_the_loop():
    # below LAYERWISE_MIN_DIM the loop, bitwise; from it on the layer method
    process, model = VP(), _perturbed(ScoreMLP(dv.LAYERWISE_MIN_DIM - 1, 16, 2, seed=0).double())
    y = _points(9, dv.LAYERWISE_MIN_DIM - 1)
    assert torch.equal(
        dv.velocity_and_divergence(model, process, y, T)[1], loop_divergence(model, process, y, T)[1]
    )
    assert not dv._structured(model, process)
    assert dv._structured(ScoreMLP(dv.LAYERWISE_MIN_DIM, 16, 2, seed=0), process)


def test_a_score_of_the_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match="score_fn must return shape"):
        dv.velocity_and_divergence(lambda y, t: y[:, :1], VP(), _points(4, 3), T)
