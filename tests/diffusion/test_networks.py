"""Score and energy networks: shapes, parameterisation, reproducible initialisation, and the EBM
identity score = -grad energy (finite differences, float64)."""

import pytest
import torch

from diffstat.diffusion import VE, VP, EnergyMLP, ScoreMLP


def _randomise(model, seed=3, scale=0.3):
    """Non-zero output layer (it starts at zero) so the network part is not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.mark.parametrize("cls", [ScoreMLP, EnergyMLP])
@pytest.mark.parametrize("process", [None, VP(), VE()], ids=repr)
def test_shapes_dtypes_and_time_broadcast(cls, process):
    model = cls(5, hidden=16, depth=2, process=process)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    out = model(x, torch.full((4,), 0.3))
    assert out.shape == (4, 5) and out.dtype == torch.float32
    torch.testing.assert_close(model(x, 0.3), out)
    torch.testing.assert_close(model(x, torch.tensor(0.3)), out)
    assert model(x.double(), 0.3).dtype == torch.float64  # cast in and out
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(4, 3), 0.3)
    with pytest.raises(ValueError, match="t must"):
        model(x, torch.full((3,), 0.3))


def test_initial_model_is_the_gaussian_score():
    # Zero output layer: s = -x / (alpha^2 sigma_data^2 + sigma^2), E = |x|^2 / (2 (...)).
    for process in (VP(), VE()):
        x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        t = torch.linspace(0.01, 0.9, 6, dtype=torch.float64)
        var = (process.alpha(t) ** 2 * 4.0 + process.sigma(t) ** 2)[:, None]
        score = ScoreMLP(3, 8, 2, process=process, sigma_data=2.0).double()
        energy = EnergyMLP(3, 8, 2, process=process, sigma_data=2.0).double()
        torch.testing.assert_close(score(x, t), -x / var)
        torch.testing.assert_close(energy.energy(x, t), (x**2 / var).sum(-1) / 2)
        torch.testing.assert_close(energy(x, t), -x / var)


def test_noise_parameterisation():
    vp = VP()
    model = _randomise(ScoreMLP(2, 8, 2, process=vp, parameterization="noise").double())
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = torch.full((5,), 0.05, dtype=torch.float64)
    c_in = torch.rsqrt(vp.alpha(t) ** 2 + vp.sigma(t) ** 2)[:, None]
    _, _, e, _ = model._inputs(x, t)
    torch.testing.assert_close(model(x, t), -model.net(c_in * x, e) / vp.sigma(t)[:, None])
    with pytest.raises(ValueError, match="process"):
        ScoreMLP(2, parameterization="noise")


@pytest.mark.parametrize("process", [None, VP(), VE()], ids=repr)
def test_energy_score_is_minus_energy_gradient(process):
    # Central finite differences of the energy, float64, against the autograd score.
    model = _randomise(EnergyMLP(3, hidden=16, depth=3, process=process).double())
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, 3, dtype=torch.float64, generator=gen)
    t = torch.rand(8, dtype=torch.float64, generator=gen) * 0.9 + 0.05
    h = 1e-6
    fd = torch.stack(
        [
            (model.energy(x + h * e, t) - model.energy(x - h * e, t)) / (2 * h)
            for e in torch.eye(3, dtype=torch.float64)
        ],
        -1,
    )
    with torch.no_grad():
        score = model(x, t)
    assert not score.requires_grad
    torch.testing.assert_close(score, -fd, rtol=1e-6, atol=1e-8)
    # The check can fail: a model whose score is not a gradient (ScoreMLP) violates the symmetry
    # of the Jacobian that any -grad E has.
    jac = torch.autograd.functional.jacobian(lambda y: model(y, t[:1]).sum(0), x[:1]).squeeze(1)
    torch.testing.assert_close(jac, jac.T)
    free = _randomise(ScoreMLP(3, hidden=16, depth=3, process=process).double())
    jac_free = torch.autograd.functional.jacobian(lambda y: free(y, t[:1]).sum(0), x[:1]).squeeze(1)
    assert (jac_free - jac_free.T).abs().max() > 1e-3


def test_energy_score_is_differentiable_for_training():
    model = _randomise(EnergyMLP(2, 8, 2, process=VP()))
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(5))
    loss = (model(x, 0.2) ** 2).sum()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert all(torch.isfinite(g).all() for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_initialisation_is_reproducible_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = ScoreMLP(4, 16, 2, seed=7)
    b = ScoreMLP(4, 16, 2, seed=7)
    c = ScoreMLP(4, 16, 2, seed=8)
    d = EnergyMLP(4, 16, 2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.random.get_rng_state(), state)
    for pa, pb, pd in zip(a.parameters(), b.parameters(), d.parameters()):
        assert torch.equal(pa, pb) and torch.equal(pa, pd)
    assert not torch.equal(a.net.hidden_layers[0].weight, c.net.hidden_layers[0].weight)


def test_bad_arguments():
    with pytest.raises(ValueError, match="dim"):
        ScoreMLP(0)
    with pytest.raises(ValueError, match="activation"):
        ScoreMLP(2, activation="relu6")
    with pytest.raises(ValueError, match="process"):
        EnergyMLP(2, process="VP")
    with pytest.raises(ValueError, match="parameterization"):
        ScoreMLP(2, parameterization="x0")
