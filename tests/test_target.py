"""Target: counting, gradients, and the four bad inputs refused before any work."""

import math

import numpy as np
import pytest
import torch

import diffstat as ds


def gaussian_log_prob(x):
    return -0.5 * (x**2).sum(-1)


def test_counts_points_not_calls():
    target = ds.Target(gaussian_log_prob, 3, dtype=torch.float64)
    assert target.num_target_evals == 0  # the construction probe is not counted
    x = torch.randn(7, 3, dtype=torch.float64)
    target.log_prob(x)
    lp, grad = target.log_prob_and_grad(x)
    assert target.num_target_evals == 14
    torch.testing.assert_close(grad, -x)
    torch.testing.assert_close(lp, -0.5 * (x**2).sum(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_both_float_types(dtype):
    target = ds.Target(gaussian_log_prob, 2, dtype=dtype)
    idata = ds.sample(target, "mala", num_samples=50, seed=0, progress=False)
    assert idata.posterior["x"].dtype == (np.float32 if dtype == torch.float32 else np.float64)


class Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x):
        self.calls += 1
        return self.fn(x)


@pytest.mark.parametrize(
    "log_prob, dim, message",
    [
        (lambda x: torch.full((x.shape[0],), float("nan")) + x.sum(-1), 2, "NaN"),
        (lambda x: torch.full((x.shape[0],), float("inf")) + x.sum(-1), 2, r"\+inf"),
        (lambda x: -0.5 * (x**2), 2, "shape"),  # forgot to sum
        (lambda x: -0.5 * (x @ torch.eye(3)).pow(2).sum(-1), 2, "dim"),  # written for dim 3
        (lambda x: -0.5 * (x[:, :2] ** 2).sum(-1), 4, "does not depend"),  # dim larger than used
        (lambda x: torch.as_tensor(-0.5 * (x.detach().numpy() ** 2).sum(-1)), 2, "differentiable"),
    ],
    ids=["nan", "posinf", "shape", "dim-too-small", "dim-too-large", "not-differentiable"],
)
def test_bad_input_refused_at_construction(log_prob, dim, message):
    with pytest.raises(ValueError, match=message):
        ds.Target(log_prob, dim)


def test_bad_initial_points_refused_before_sampling():
    # Valid at the construction probe (near 0), NaN where the chains start: sample refuses.
    counter = Counter(lambda x: torch.where(x[:, 0] > 5, torch.nan, -0.5 * (x**2).sum(-1)))
    target = ds.Target(counter, 2)
    calls_before = counter.calls
    with pytest.raises(ValueError, match="NaN"):
        ds.sample(target, "mala", num_samples=10, seed=0, init=torch.full((4, 2), 10.0), progress=False)
    assert counter.calls == calls_before + 1  # only the validation call ran


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=0), "dim"),
        (dict(dim=2.5), "dim"),
        (dict(dim=2, reference=torch.distributions.Normal(0.0, 1.0)), "reference"),
        (dict(dim=2, name=""), "name"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ds.Target(gaussian_log_prob, **kwargs)


def test_not_callable():
    with pytest.raises(ValueError, match="callable"):
        ds.Target(3.0, 2)


def test_reference_draws_and_density():
    ref = torch.distributions.MultivariateNormal(torch.ones(2), 4 * torch.eye(2))
    target = ds.Target(gaussian_log_prob, 2, reference=ref)
    x = target.sample_reference(20000, torch.Generator().manual_seed(0))
    assert abs(float(x.mean()) - 1.0) < 4 * 2 / np.sqrt(40000)
    torch.testing.assert_close(target.reference_log_prob(x), ref.log_prob(x))
    # Without a reference: the standard normal, normalised.
    plain = ds.Target(gaussian_log_prob, 2)
    z = torch.zeros(1, 2)
    assert float(plain.reference_log_prob(z)) == pytest.approx(-np.log(2 * np.pi))


def test_a_target_works_inside_torch_func_transforms_and_counts_nans_outside():
    """``torch.func.hessian`` and ``vmap(grad)`` through ``Target.log_prob`` give the exact Hessian
    and scores of a standard normal, also when called twice (the NaN counter once kept a functorch
    tensor past its transform and the second call failed an internal assertion); NaNs outside the
    transforms are still counted."""
    target = ds.Target(lambda x: -0.5 * (x**2).sum(-1), 2, dtype=torch.float64)

    def f(x):
        return target.log_prob(x[None])[0]

    x = torch.ones(2, dtype=torch.float64)
    for _ in range(2):
        assert torch.equal(torch.func.hessian(f)(x), -torch.eye(2, dtype=torch.float64))
        assert torch.equal(
            torch.func.vmap(torch.func.grad(f))(torch.ones(3, 2, dtype=torch.float64)),
            -torch.ones(3, 2, dtype=torch.float64),
        )
    nan_far = ds.Target(
        lambda x: torch.where(x[:, 0] > 5, math.nan, -0.5 * (x**2).sum(-1)), 2, dtype=torch.float64
    )
    nan_far.log_prob(torch.full((3, 2), 6.0, dtype=torch.float64))
    assert nan_far.num_nan_evals == 3


def test_nans_at_points_with_non_finite_coordinates_are_not_the_log_densitys():
    """A float32 leapfrog that overflows proposes points with infinite coordinates, where any
    log-density is NaN: not counted against the log-density (the front door's NaN warning tells the
    user to fix their model), while a NaN at a finite point is."""
    target = ds.Target(lambda x: -0.5 * (x**2).sum(-1), 2, dtype=torch.float32)
    x = torch.tensor([[math.inf, 0.0], [math.nan, 1.0], [1.0, 2.0]])
    lp, _ = target.log_prob_and_grad(x)
    target.log_prob(x)
    assert bool(torch.isnan(lp[:2]).any()) and target.num_nan_evals == 0
    nan_far = ds.Target(lambda x: torch.where(x[:, 0] > 5, math.nan, -(x**2).sum(-1)), 2)
    nan_far.log_prob_and_grad(torch.tensor([[6.0, 0.0], [math.inf, 0.0], [0.0, 0.0]]))
    assert nan_far.num_nan_evals == 1


def funnel_with_distributions(x):
    """Neal's funnel written with torch.distributions: the scale exp(x_0) underflows to 0 far down
    the neck, where a validated Normal raises."""
    return torch.distributions.Normal(0.0, 3.0).log_prob(x[:, 0]) + torch.distributions.Normal(
        0.0, torch.exp(x[:, 0])
    ).log_prob(x[:, 1])


def test_a_run_meets_invalid_distribution_arguments_as_rejected_points_not_errors():
    target = ds.Target(funnel_with_distributions, 2, dtype=torch.float64)
    far = torch.tensor([[-800.0, 0.1], [0.0, 0.5]], dtype=torch.float64)
    with pytest.raises(ValueError, match="scale"):  # validated as the user has it: an error
        funnel_with_distributions(far)
    lp, grad = target.log_prob_and_grad(far)
    assert not torch.isfinite(lp[0]) and torch.isfinite(lp[1]) and torch.isfinite(grad[1]).all()
    assert torch.equal(lp[1:], funnel_with_distributions(far[1:]).detach())
    assert not torch.isfinite(target.log_prob(far)[0]) and target.num_nan_evals == 2
    assert torch.distributions.Distribution._validate_args  # the user's setting is restored
    with pytest.raises(ValueError, match="scale"):  # starting points are checked with validation on
        target.validate(far)
