"""The fuzz test of the API contract (issue 14): every registered method of ``ds.sample`` and every
combiner of ``ds.dnc.combine`` against every bad input, each refused with a ``ValueError`` that says
what is wrong before any work. The methods and combiners are read from the registries, so a new one
is covered without editing this file. Bad input refused by ``ds.Target`` itself (at construction)
is in ``tests/test_bad_inputs.py``; here the same densities are built with ``validate=False``, so
that each method's own first look at its starting points must refuse them."""

import warnings

import numpy as np
import pytest
import torch

import diffstat as ds
from diffstat.dnc.combine import COMBINERS, combiner_options
from diffstat.mcmc.sampler import KERNELS, SUPPORT_SEARCH
from test_bad_inputs import (
    flat,
    gaussian,
    nan_gradient,
)  # the bad densities, defined once

METHODS = ds.available_methods()
COMBINER_NAMES = sorted(COMBINERS)
D = 3
F64 = torch.float64
#: Points a method may evaluate before refusing: its validation of up to 16 starting points and,
#: where the density is one constant there, the same points and 1000 times farther out (the flatness
#: check): the refusal must come at the first look, not after a run.
FIRST_LOOK = 3 * 16


def allowance(method: str, case: str) -> int:
    """FIRST_LOOK, and for an MCMC method facing -inf at every start also the ``SUPPORT_SEARCH``
    further reference draws it tries before refusing (-inf at four starts is as often a support
    the starts missed, a constraint written as -inf outside, as a broken density)."""
    search = case == "minus-inf-everywhere" and method in KERNELS
    return FIRST_LOOK + (SUPPORT_SEARCH if search else 0)


class Counted:
    """A log-density that counts the points it is called at."""

    def __init__(self, fn):
        self.fn, self.points = fn, 0

    def __call__(self, x):
        self.points += x.shape[0]
        return self.fn(x)


def minus_inf_everywhere(x):
    return torch.full(x.shape[:1], -torch.inf, dtype=x.dtype) + 0.0 * x.sum(-1)


def half_output(x):
    return (-0.5 * (x**2).sum(-1)).half()


def integer_output(x):
    return (-0.5 * (x**2).sum(-1)).round().long()


#: name -> (log-density, what the ValueError says). Each is finite-looking enough to pass a
#: careless check and would waste a run (or give NaN draws) if it got through.
BAD_DENSITIES = {
    "minus-inf-everywhere": (minus_inf_everywhere, "-inf"),
    "nan-gradient": (nan_gradient, "gradient of log_prob is NaN"),
    "improper-flat": (flat, "flat"),
    "half-output": (half_output, "dtype"),
    "integer-output": (integer_output, "dtype|differentiable"),
}


def _sample(target, method, **kwargs):
    kwargs = {"num_samples": 8, "seed": 0, "progress": False, **kwargs}
    return ds.sample(target, method, **kwargs)


# ---------------------------------------------------------------------- every method
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", sorted(BAD_DENSITIES))
def test_bad_log_density_is_refused_at_the_first_look(method, case):
    """Built without validation, the density reaches the method: its first look refuses it."""
    fn, match = BAD_DENSITIES[case]
    counted = Counted(fn)
    target = ds.Target(counted, D, dtype=F64, validate=False)
    with pytest.raises(ValueError, match=match):
        _sample(target, method)
    assert counted.points <= allowance(method, case)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", sorted(BAD_DENSITIES))
def test_bad_log_density_never_reaches_a_method(method, case):
    """The user's path: ``ds.Target`` refuses the density, or ``ds.sample`` does at its first look."""
    fn, match = BAD_DENSITIES[case]
    counted = Counted(fn)
    with pytest.raises(ValueError, match=match):
        _sample(ds.Target(counted, D, dtype=F64), method)
    assert counted.points <= 12 + allowance(method, case)  # the construction probe (4, 8 far), the first look


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [2**70, 2**63, -1, 1.5, True, "0", None])
def test_bad_seed_is_refused(method, seed):
    counted = Counted(gaussian)
    target = ds.Target(counted, D, dtype=F64)
    before = counted.points
    with pytest.raises(ValueError, match="seed"):
        _sample(target, method, seed=seed)
    assert counted.points == before


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "arguments, match",
    [
        (dict(num_samples=0), "num_samples"),
        (dict(num_samples=2.5), "num_samples"),
        (dict(num_chains=0), "num_chains"),
        (dict(num_chains=True), "num_chains"),
    ],
    ids=["num_samples-0", "num_samples-float", "num_chains-0", "num_chains-bool"],
)
def test_bad_counts_are_refused(method, arguments, match):
    counted = Counted(gaussian)
    target = ds.Target(counted, D, dtype=F64)
    before = counted.points
    with pytest.raises(ValueError, match=match):
        _sample(target, method, **arguments)
    assert counted.points == before


@pytest.mark.parametrize("method", METHODS)
def test_unknown_option_is_refused_with_the_valid_ones(method):
    from diffstat.sampling import method_options

    counted = Counted(gaussian)
    target = ds.Target(counted, D, dtype=F64)
    before = counted.points
    with pytest.raises(ValueError, match=r"unknown option.*num_stepz.*known: ") as info:
        _sample(target, method, num_stepz=3)
    assert counted.points == before
    declared = method_options(method)
    if declared is not None:
        assert all(name in str(info.value) for name in declared)


@pytest.mark.parametrize("method", METHODS)
def test_reference_without_independent_is_refused(method):
    """A batch of D scalar normals is not a distribution on R^D: refused, with the fix named."""
    counted = Counted(gaussian)
    target = ds.Target(counted, D, dtype=F64)
    before = counted.points
    ref = torch.distributions.Normal(torch.zeros(D, dtype=F64), torch.ones(D, dtype=F64))
    with pytest.raises(ValueError, match="Independent|reference"):
        _sample(target, method, reference=ref)
    assert counted.points == before


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("support", ["uniform", "gamma"])
def test_reference_with_bounded_support_is_refused(method, support):
    """A reference on a box or the positive orthant: its log-density refuses (Gamma) or cannot
    differentiate (Uniform) points outside it, and a tempering path from it never reaches the
    target's mass beyond it. Refused before any target evaluation, naming the support (these
    crashed mid-run with a distribution's argument check or an autograd error); methods that take
    no reference refuse the option. The Target refuses it too."""
    counted = Counted(gaussian)
    target = ds.Target(counted, D, dtype=F64)
    before = counted.points
    ones = torch.ones(D, dtype=F64)
    base = {
        "uniform": torch.distributions.Uniform(-5 * ones, 5 * ones),
        "gamma": torch.distributions.Gamma(2 * ones, ones),
    }[support]
    reference = torch.distributions.Independent(base, 1)
    with pytest.raises(ValueError, match="support on all of R|unknown option.*reference"):
        _sample(target, method, reference=reference)
    with pytest.raises(ValueError, match="support on all of R"):
        ds.Target(counted, D, dtype=F64, reference=reference)
    assert counted.points == before


class ReferenceUsed(Exception):
    """Raised by :class:`Tripwire` when a method draws from or evaluates the reference."""


class Tripwire(torch.distributions.Independent):
    """A valid reference on R^D that raises :class:`ReferenceUsed` when a method uses it."""

    def __init__(self):
        super().__init__(torch.distributions.Normal(torch.zeros(D, dtype=F64), torch.ones(D, dtype=F64)), 1)

    def sample(self, sample_shape=()):
        raise ReferenceUsed

    rsample = sample

    def log_prob(self, value):
        raise ReferenceUsed

    @property
    def mean(self):
        raise ReferenceUsed

    @property
    def variance(self):
        raise ReferenceUsed


@pytest.mark.parametrize("method", METHODS)
def test_reference_is_used_or_refused(method):
    """``reference=`` is either used by the method or refused with a ValueError naming it: a method
    that cannot use it must not ignore it silently."""
    target = ds.Target(gaussian, D, dtype=F64)
    with pytest.raises((ValueError, ReferenceUsed)) as info:
        _sample(target, method, reference=Tripwire())
    if info.type is ValueError:
        assert "reference" in str(info.value)


def nan_beyond(x):
    """N(0, I), but NaN (an overflow, say) where x_0 > 2: runtime trouble, met only mid-run."""
    lp = gaussian(x)
    return torch.where(x[:, 0] > 2.0, torch.full_like(lp, float("nan")), lp)


def _smoothed_gaussian_score(y, sigma):
    """The exact score of N(0, I) smoothed by N(0, sigma^2 I), so that walk-jump and SMS skip the
    estimator's training population (the fast path the API offers)."""
    return -y / (1.0 + sigma**2)


#: Small settings so that every method makes a short run.
RUN_OPTIONS = {
    "sms": dict(smoothed_score=_smoothed_gaussian_score),
    "walk_jump": dict(smoothed_score=_smoothed_gaussian_score),
    "diffusion": dict(
        num_explore=200, train_steps=100, refit_steps=20, max_rounds=1, gaussian_rounds=0,
        num_proposals=256, chains_per_mode=16, refresh_chains=16, ode_steps=20, hidden=16, depth=2,
    ),
    "gaussian_is": dict(
        num_explore=200, max_rounds=1, num_proposals=256, chains_per_mode=16, refresh_chains=16
    ),
    "ais": dict(num_temperatures=20),
}  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
def test_nan_met_mid_run_is_warned_and_never_drawn(method):
    """Starting points from a narrow reference pass the first look; the run then meets the NaN
    region. No draw is NaN; a run that met a NaN (outside a mode search's far starts, which
    ``attrs["num_nan_exploration"]`` counts) says so with one RuntimeWarning, and only then may
    ``sample_stats`` hold one (an ``lp`` of NaN marks a draw made where the density is NaN: a jump
    of SMS, say, which has no accept step). Per-stage groups are not checked: some use NaN for
    "does not apply" (a swap rate above the hottest replica)."""
    narrow = torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(D, dtype=F64), 0.3 * torch.ones(D, dtype=F64)), 1
    )
    target = ds.Target(nan_beyond, D, dtype=F64, reference=narrow)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = _sample(target, method, num_samples=32, **RUN_OPTIONS.get(method, {}))
    met = target.num_nan_evals
    assert idata.posterior.attrs["num_nan_evals"] == met
    # NaNs met by a mode search far from the posterior are counted but not warned about
    warn_on = met - idata.posterior.attrs.get("num_nan_exploration", 0)
    warned = [w for w in caught if w.category is RuntimeWarning and "returned NaN" in str(w.message)]
    assert len(warned) == (1 if warn_on > 0 else 0)
    if warned:
        assert f"NaN at {warn_on} of" in str(warned[0].message)
    for name, values in idata.posterior.data_vars.items():
        assert not np.isnan(values.values).any(), name
    for name, values in idata.sample_stats.data_vars.items():
        if values.dtype.kind == "f":
            assert met > 0 or not np.isnan(values.values).any(), name


# ---------------------------------------------------------------------- every combiner
def _shards(n=40, k=3, dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=g, dtype=F64) for _ in range(k)]


def _with_nan(shards, value=float("nan")):
    bad = shards[1].clone()
    bad[3, 1] = value
    return [shards[0], bad, *shards[2:]]


#: name -> (shards and scores from good shards, what the ValueError says)
BAD_SHARDS = {
    "nan-draw": (lambda s: (_with_nan(s), None), "non-finite"),
    "inf-draw": (lambda s: (_with_nan(s, float("inf")), None), "non-finite"),
    "one-shard": (lambda s: (s[:1], None), "at least 2"),
    "not-a-list": (lambda s: (s[0], None), "list"),
    "mismatched-dims": (lambda s: ([s[0], s[1][:, :1], *s[2:]], None), "dimension"),
    "too-few-draws": (lambda s: ([s[0], s[1][:3], *s[2:]], None), "at least"),
    "four-dim-draws": (lambda s: ([s[0], s[1].reshape(2, 2, 10, 2), *s[2:]], None), "shape"),
    "nan-score": (lambda s: (s, _with_nan([-x for x in s])), "scores"),
    "score-shape": (lambda s: (s, [-x for x in s[:-1]] + [-s[-1][:5]]), "scores"),
    "scores-count": (lambda s: (s, [-x for x in s[:-1]]), "scores"),
}


@pytest.mark.parametrize("method", COMBINER_NAMES)
@pytest.mark.parametrize("case", sorted(BAD_SHARDS))
def test_bad_shard_draws_are_refused(method, case):
    make, match = BAD_SHARDS[case]
    draws, scores = make(_shards())
    with pytest.raises(ValueError, match=match):
        ds.dnc.combine(draws, method, scores=scores, num_samples=8, seed=0, progress=False)


@pytest.mark.parametrize("method", COMBINER_NAMES)
def test_combiner_unknown_option_is_refused_with_the_valid_ones(method):
    with pytest.raises(ValueError, match=r"unknown option.*bogus_option.*known: ") as info:
        ds.dnc.combine(_shards(), method, num_samples=8, seed=0, progress=False, bogus_option=1)
    assert all(name in str(info.value) for name in combiner_options(method) or ())


@pytest.mark.parametrize("method", COMBINER_NAMES)
@pytest.mark.parametrize("seed", [2**70, -1, 1.5, True, None])
def test_combiner_bad_seed_is_refused(method, seed):
    with pytest.raises(ValueError, match="seed"):
        ds.dnc.combine(_shards(), method, num_samples=8, seed=seed, progress=False)


@pytest.mark.parametrize("method", COMBINER_NAMES)
@pytest.mark.parametrize("num_samples", [0, -3, 2.5, True])
def test_combiner_bad_num_samples_is_refused(method, num_samples):
    with pytest.raises(ValueError, match="num_samples"):
        ds.dnc.combine(_shards(), method, num_samples=num_samples, seed=0, progress=False)


def test_unknown_method_and_combiner_list_the_valid_ones():
    target = ds.Target(gaussian, D, dtype=F64)
    with pytest.raises(ValueError, match="available: " + ", ".join(METHODS)):
        _sample(target, "nutz")
    with pytest.raises(ValueError, match="available: " + ", ".join(COMBINER_NAMES)):
        ds.dnc.combine(_shards(), "consensos", num_samples=8, seed=0)
