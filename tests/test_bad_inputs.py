"""Bad input is refused before any work, for every registered method: a ``ValueError`` that says
what is wrong (the fuzz test of the API contract)."""

import pytest
import torch

import diffstat as ds

METHODS = ds.available_methods()
D = 3


def gaussian(x):
    return -0.5 * (x**2).sum(-1)


def minus_inf_everywhere(x):
    return torch.full(x.shape[:1], -torch.inf, dtype=x.dtype) + 0.0 * x.sum(-1)


class _NaNGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return -0.5 * (x**2).sum(-1)

    @staticmethod
    def backward(ctx, g):
        return torch.full((g.shape[0], D), float("nan"), dtype=g.dtype)


def nan_gradient(x):
    return _NaNGradient.apply(x)


def flat(x):
    return 0.0 * x.sum(-1)


@pytest.mark.parametrize("method", METHODS)
def test_log_density_minus_inf_everywhere_is_refused(method):
    target = ds.Target(minus_inf_everywhere, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="-inf"):
        ds.sample(target, method, num_samples=10, seed=0, progress=False)
    assert target.num_target_evals <= 16  # refused at the first look, not after a run


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [2**70, -1, 1.5, True])
def test_bad_seed_is_refused(method, seed):
    target = ds.Target(gaussian, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="seed"):
        ds.sample(target, method, num_samples=10, seed=seed, progress=False)
    assert target.num_target_evals == 0


@pytest.mark.parametrize("method", METHODS)
def test_unknown_option_is_refused(method):
    target = ds.Target(gaussian, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="num_stepz"):
        ds.sample(target, method, num_samples=10, seed=0, progress=False, num_stepz=3)
    assert target.num_target_evals == 0


@pytest.mark.parametrize("method", ["ais", "smc", "pt"])
def test_reference_without_independent_is_refused(method):
    target = ds.Target(gaussian, D, dtype=torch.float64)
    ref = torch.distributions.Normal(torch.zeros(D, dtype=torch.float64), torch.ones(D, dtype=torch.float64))
    with pytest.raises(ValueError, match="Independent"):
        ds.sample(target, method, num_samples=10, seed=0, progress=False, reference=ref)


@pytest.mark.parametrize(
    "log_prob, match",
    [(nan_gradient, "gradient of log_prob is NaN"), (flat, "flat")],
    ids=["nan-gradient", "improper-flat"],
)
def test_bad_log_density_is_refused_at_construction(log_prob, match):
    with pytest.raises(ValueError, match=match):
        ds.Target(log_prob, D, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.float16, torch.bfloat16])
def test_non_float_dtypes_are_refused(dtype):
    with pytest.raises(ValueError, match="dtype"):
        ds.Target(gaussian, D, dtype=dtype)


def test_reference_batch_of_scalars_is_refused_at_construction():
    ref = torch.distributions.Normal(torch.zeros(D), torch.ones(D))
    with pytest.raises(ValueError, match="Independent"):
        ds.Target(gaussian, D, reference=ref)


def test_a_proper_target_with_a_flat_region_is_accepted():
    """The flatness check looks far out: a uniform density on a large box is proper and accepted."""

    def box(x):
        inside = (x.abs() < 50).all(-1)
        return torch.where(inside, 0.0 * x.sum(-1), torch.full_like(x[:, 0], -torch.inf))

    ds.Target(box, D, dtype=torch.float64)
