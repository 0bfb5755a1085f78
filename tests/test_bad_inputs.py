"""Bad input refused by ``ds.Target`` itself, before any method sees it, and a user's own exception
passed through unchanged. The matrix of every method and combiner against every bad input is
``tests/test_fuzz.py``."""

import pytest
import torch

import diffstat as ds

D = 3


def gaussian(x):
    return -0.5 * (x**2).sum(-1)


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


@pytest.mark.parametrize(
    "log_prob, match",
    [
        (nan_gradient, "gradient of log_prob is NaN"),
        (flat, "flat"),
        (lambda x: gaussian(x).half(), "dtype"),
        (lambda x: gaussian(x).bfloat16(), "dtype"),
    ],
    ids=["nan-gradient", "improper-flat", "half-output", "bfloat16-output"],
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


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.float16])
def test_validate_refuses_points_that_are_not_float32_or_float64(dtype):
    target = ds.Target(gaussian, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32 or float64"):
        target.validate(torch.zeros(4, D, dtype=dtype))


def test_the_flatness_check_at_the_start_spares_proper_densities():
    """Chains all started at one point (even the origin, where 1000 x = x) and a uniform box with
    every starting point inside it are sampled, not refused as flat."""
    target = ds.Target(gaussian, D, dtype=torch.float64)
    target.validate(torch.zeros(4, D, dtype=torch.float64))
    target.validate(torch.ones(4, D, dtype=torch.float64))

    def box(x):
        inside = (x.abs() < 50).all(-1)
        return torch.where(inside, 0.0 * x.sum(-1), torch.full_like(x[:, 0], -torch.inf))

    ds.Target(box, D, dtype=torch.float64).validate(torch.randn(8, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="flat"):  # the same check on an improper density
        improper = ds.Target(flat, D, dtype=torch.float64, validate=False)
        improper.validate(torch.randn(8, D, dtype=torch.float64))


class UsersOwnError(Exception):
    pass


@pytest.mark.parametrize("error", [RuntimeError, IndexError, UsersOwnError, ZeroDivisionError])
def test_a_users_exception_reaches_them_unchanged(error):
    """An exception the log-density raises for its own reasons keeps its type and message (not a
    ValueError about dim), however many widths the dimension check tries."""

    def failing(x):
        raise error("the user's own message")

    with pytest.raises(error, match="^the user's own message$") as info:
        ds.Target(failing, D)
    assert type(info.value) is error
    with pytest.raises(error, match="^the user's own message$"):
        ds.Target(failing, D, validate=False).validate(torch.zeros(4, D))


def test_a_users_exception_on_bad_values_reaches_them_unchanged():
    """A RuntimeError raised only for some values (a failed Cholesky, say) is not a dim mismatch."""

    def cholesky_of_x(x):
        m = torch.diag_embed(x - 10.0)  # not positive definite near the origin
        return torch.linalg.cholesky(m).diagonal(dim1=-2, dim2=-1).log().sum(-1)

    with pytest.raises(torch.linalg.LinAlgError) as info:
        ds.Target(cholesky_of_x, D)
    assert "does dim" not in str(info.value)


@pytest.mark.parametrize(
    "log_prob, dim, width",
    [
        (lambda x: -0.5 * (x @ torch.eye(D, dtype=x.dtype)).pow(2).sum(-1), D - 1, D),
        (lambda x: -0.5 * (x[:, :6] ** 2).sum(-1) - 0.5 * x[:, 5] ** 2, 2, 6),
    ],
    ids=["matmul", "index"],
)
def test_a_dim_mismatch_is_a_value_error_chained_to_the_users_error(log_prob, dim, width):
    """Where log_prob accepts points of another width the mismatch is established: a ValueError
    naming the width that works, chained to the user's RuntimeError or IndexError."""
    with pytest.raises(ValueError, match=f"accepts points of dim={width}: pass dim={width}") as info:
        ds.Target(log_prob, dim)
    assert isinstance(info.value.__cause__, (RuntimeError, IndexError))
