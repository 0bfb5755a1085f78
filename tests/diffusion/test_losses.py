"""Score-matching losses against closed forms.

Gaussian data p_0 = N(0, s0^2 I), a linear model s(x) = -c x, a fixed time: every loss has a closed
expectation, and all are minimised at the true score coefficient c* = 1 / (alpha^2 s0^2 + sigma^2).
Implicit and sliced score matching of s(x) = -A x on N(0, Sigma) have expectation
(tr(A^T A Sigma) / 2 - tr A) / d. Tolerances from the spread of independent batch estimates.
"""

import math

import pytest
import torch

from diffstat.diffusion import (
    VE,
    VP,
    dsm_loss,
    implicit_score_matching_loss,
    mixed_loss,
    sliced_score_matching_loss,
    tsm_loss,
)
from diffstat.diffusion.losses import loss_weight

S0, D, T = 1.5, 2, 0.3


def _batches(fn, generator, num_batches=20):
    values = torch.stack([fn(generator) for _ in range(num_batches)]).double()
    return float(values.mean()), float(values.std() / math.sqrt(num_batches))


def _time(process):
    return T if isinstance(process, VP) else 0.7  # sigma_t about 0.8 for both


def _closed_forms(process, c):
    t = torch.tensor(_time(process), dtype=torch.float64)
    a, s = float(process.alpha(t)), float(process.sigma(t))
    w = s**2 / (a**2 + s**2)
    dsm = c**2 * a**2 * S0**2 + (1 / s - c * s) ** 2
    tsm = (1 / (S0**2 * a) - c * a) ** 2 * S0**2 + c**2 * s**2
    mixed = ((1 - w) / (S0**2 * a) - c * a) ** 2 * S0**2 + (w / s - c * s) ** 2
    return {"dsm": 0.5 * dsm, "tsm": 0.5 * tsm, "mixed": 0.5 * mixed}, 1 / (a**2 * S0**2 + s**2)


@pytest.mark.parametrize("process", [VP(), VE(sigma_max=5.0)], ids=repr)
def test_dsm_tsm_mixed_expectations(process, generator):
    n = 5000
    for c in (0.2, 0.7):
        model = lambda x, t, c=c: -c * x  # noqa: E731
        exact, _ = _closed_forms(process, c)
        losses = {
            "dsm": lambda g, model=model: dsm_loss(
                model,
                process,
                S0 * torch.randn(n, D, generator=g, dtype=torch.float64),
                g,
                t=_time(process),
                weighting="none",
            ),
            "tsm": lambda g, model=model: _tsm(tsm_loss, model, process, g, n),
            "mixed": lambda g, model=model: _tsm(mixed_loss, model, process, g, n),
        }
        for name, fn in losses.items():
            mean, se = _batches(fn, generator)
            assert abs(mean - exact[name]) < 4.5 * se, (name, c, mean, exact[name], se)
            # able to fail: the same estimate against the closed form at another c
            wrong = _closed_forms(process, c + 0.1)[0][name]
            assert abs(mean - wrong) > 4.5 * se, (name, c)


def _tsm(loss, model, process, g, n):
    x0 = S0 * torch.randn(n, D, generator=g, dtype=torch.float64)
    return loss(model, process, x0, -x0 / S0**2, g, t=_time(process), weighting="none")


@pytest.mark.parametrize("process", [VP(), VE(sigma_max=5.0)], ids=repr)
def test_closed_forms_are_minimised_at_the_true_score(process):
    _, c_star = _closed_forms(process, 0.0)
    for name in ("dsm", "tsm", "mixed"):
        values = [_closed_forms(process, c_star + dc)[0][name] for dc in (-1e-3, 0.0, 1e-3)]
        assert values[1] < values[0] and values[1] < values[2]


def test_weightings_scale_the_loss(generator):
    vp = VP()
    model = lambda x, t: -0.5 * x  # noqa: E731
    x0 = torch.randn(64, D, generator=generator, dtype=torch.float64)
    t = torch.full((64,), T, dtype=torch.float64)
    state = generator.get_state()
    base = dsm_loss(model, vp, x0, generator, t=t, weighting="none")
    for weighting, factor in (
        ("sigma2", vp.sigma(t[0]) ** 2),
        ("g2", vp.beta(t[0])),
        ("alpha2", vp.alpha(t[0]) ** 2),
        (lambda tt: 3.0 * torch.ones_like(tt), 3.0),
    ):
        generator.set_state(state)
        weighted = dsm_loss(model, vp, x0, generator, t=t, weighting=weighting)
        torch.testing.assert_close(weighted, base * factor)
    with pytest.raises(ValueError, match="weighting"):
        loss_weight(vp, t, "snr")
    with pytest.raises(ValueError, match="grad0"):
        tsm_loss(model, vp, x0, None, generator)
    with pytest.raises(ValueError, match="grad0"):
        mixed_loss(model, vp, x0, x0[:3], generator)


def test_times_are_drawn_in_the_process_interval(generator):
    seen = []
    model = lambda x, t: seen.append(t) or -x  # noqa: E731
    dsm_loss(model, VP(t_min=0.2, t_max=0.5), torch.zeros(4000, 1), generator)
    t = seen[0]
    assert t.shape == (4000,) and float(t.min()) >= 0.2 and float(t.max()) <= 0.5
    assert abs(float(t.mean()) - 0.35) < 4.5 * 0.3 / math.sqrt(12 * 4000)


A = torch.tensor([[1.0, 0.5, 0.0], [-0.3, 0.8, 0.2], [0.4, 0.0, 1.5]], dtype=torch.float64)
SIGMA = torch.tensor([[1.0, 0.3, 0.0], [0.3, 2.0, -0.4], [0.0, -0.4, 0.5]], dtype=torch.float64)


def _gaussian(generator, n=4000):
    return torch.randn(n, 3, generator=generator, dtype=torch.float64) @ torch.linalg.cholesky(SIGMA).T


@pytest.mark.parametrize(
    "loss",
    [
        lambda m, x, g: implicit_score_matching_loss(m, x),
        lambda m, x, g: sliced_score_matching_loss(m, x, g),
        lambda m, x, g: sliced_score_matching_loss(m, x, g, projection="gaussian", num_projections=2),
        lambda m, x, g: sliced_score_matching_loss(m, x, g, variance_reduced=False),
    ],
    ids=["ism", "ssm-rademacher", "ssm-gaussian", "ssm-plain"],
)
def test_implicit_and_sliced_score_matching_expectation(loss, generator):
    model = lambda x, t: -x @ A.T  # noqa: E731
    exact = float(0.5 * torch.trace(A.T @ A @ SIGMA) - torch.trace(A)) / 3
    mean, se = _batches(lambda g: loss(model, _gaussian(g), g).detach(), generator)
    assert abs(mean - exact) < 4.5 * max(se, 1e-12)
    wrong = float(0.5 * torch.trace(A.T @ A @ SIGMA) + torch.trace(A)) / 3  # sign error in the divergence
    assert abs(mean - wrong) > 4.5 * max(se, 1e-12)


def test_ism_and_ssm_have_gradients_and_use_the_process(generator):
    # With a process the data are noised first: for s = -x on N(0, I) data and a VP process, X_t is
    # N(0, I) for every t, so ISM = (1/2 E|x|^2 - d)/d = -1/2 at any t (weighting 'none').
    model = torch.nn.Linear(2, 2, dtype=torch.float64)
    x0 = torch.randn(64, 2, generator=generator, dtype=torch.float64)
    for loss in (
        implicit_score_matching_loss(lambda x, t: model(x), x0, generator, process=VP()),
        sliced_score_matching_loss(lambda x, t: model(x), x0, generator, process=VP()),
    ):
        grads = torch.autograd.grad(loss, list(model.parameters()))
        assert all(torch.isfinite(g).all() for g in grads)
    vals = torch.stack(
        [
            implicit_score_matching_loss(
                lambda x, t: -x,
                torch.randn(2000, 2, generator=generator, dtype=torch.float64),
                generator,
                process=VP(),
                weighting="none",
            ).detach()
            for _ in range(10)
        ]
    )
    assert abs(float(vals.mean()) + 0.5) < 4.5 * float(vals.std()) / math.sqrt(10)
