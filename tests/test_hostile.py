"""The front door under hostile but legitimate use: each test here is a bug found by trying
``ds.sample`` and ``ds.dnc.combine`` with unusual valid input, or invalid input that reached a
method and crashed mid-run inside torch, instead of a ``ValueError`` naming the problem before any
work (the contract of ``/work/shared/API.md``). Inputs the contract already covered are in
``tests/test_fuzz.py``."""

import warnings

import numpy as np
import pytest
import torch

import diffstat as ds
from diffstat.dnc.combine import COMBINERS
from test_bad_inputs import gaussian
from test_fuzz import Counted, _sample  # the helpers, defined once

METHODS = ds.available_methods()
COMBINER_NAMES = sorted(COMBINERS)
F64 = torch.float64


# ---------------------------------------------------------------------- devices
def _unavailable_devices() -> list:
    """Device names no run can use here: a CUDA index past the last one, MPS where it is absent, a
    device type diffstat does not run on, and a name that is no device at all."""
    devices = [f"cuda:{torch.cuda.device_count()}", "meta", "gpu"]
    if not torch.cuda.is_available():
        devices.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        devices.append("mps")
    return devices


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("device", _unavailable_devices())
def test_unavailable_device_is_refused_before_any_work(method, device):
    """An unavailable device crashed in torch's generator constructor ("Cannot get CUDA generator
    without ATen_cuda library") and an unknown name in ``torch.device``: both are now a
    ValueError naming the argument, before the log-density is evaluated."""
    counted = Counted(gaussian)
    target = ds.Target(counted, 2, dtype=F64)
    before = counted.points
    with pytest.raises(ValueError, match="device"):
        _sample(target, method, device=device)
    assert counted.points == before


@pytest.mark.parametrize("method", COMBINER_NAMES)
@pytest.mark.parametrize("device", _unavailable_devices())
def test_combiner_unavailable_device_is_refused(method, device):
    g = torch.Generator().manual_seed(0)
    shards = [torch.randn(40, 2, generator=g, dtype=F64) for _ in range(3)]
    with pytest.raises(ValueError, match="device"):
        ds.dnc.combine(shards, method, num_samples=8, seed=0, progress=False, device=device)


# ---------------------------------------------------------------------- hard boundaries
def halfspace(x):
    """N(0, I) restricted to x_0 > 0: -inf on half of the reference's mass."""
    lp = gaussian(x)
    return torch.where(x[:, 0] > 0, lp, torch.full_like(lp, -torch.inf))


def beta_2_3(x):
    """Independent Beta(2, 3) coordinates on (0, 1)^d, -inf outside (most of N(0, I)'s mass)."""
    inside = ((x > 0) & (x < 1)).all(-1)
    xs = torch.where(inside[:, None], x, torch.full_like(x, 0.5))
    lp = (torch.log(xs) + 2 * torch.log1p(-xs)).sum(-1)
    return torch.where(inside, lp, torch.full_like(lp, -torch.inf))


HARD_BOUNDARIES = {
    "halfspace": (halfspace, lambda v: v[..., 0] > 0),
    "beta": (beta_2_3, lambda v: ((v > 0) & (v < 1)).all(-1)),
}


@pytest.mark.parametrize("method", ["ais", "smc", "pt"])
@pytest.mark.parametrize("case", sorted(HARD_BOUNDARIES))
def test_tempering_on_a_hard_boundary(method, case):
    """A log-density that is -inf on much of the reference's mass: early stages leave a group of
    particles with all its weight on one particle, whose zero spread made the 2-means split of the
    particle clustering divide by zero and draw from NaN probabilities ("probability tensor
    contains either inf, nan or element < 0": SMC on the half-space, AIS on the Beta box). Every
    draw now lies in the support, with a finite ``lp``."""
    fn, inside = HARD_BOUNDARIES[case]
    options = {"ais": dict(num_temperatures=10), "pt": dict(num_warmup=30)}.get(method, {})
    idata = _sample(ds.Target(fn, 2, dtype=F64), method, num_samples=32, **options)
    draws = idata.posterior["x"].values
    assert inside(draws).all()
    assert np.isfinite(idata.sample_stats["lp"].values).all()


def test_cluster_particles_with_one_weighted_particle():
    """The layer of the fix: a cloud whose weight sits on one particle is one cluster (no split of a
    cloud of no spread), not a NaN draw."""
    from diffstat.tempering.moves import cluster_particles

    g = torch.Generator().manual_seed(0)
    x = 3.0 * torch.randn(21, 2, generator=g, dtype=F64)
    log_w = torch.full((21,), -torch.inf, dtype=F64)
    log_w[4] = 0.0
    labels = cluster_particles(x, log_w, g)
    assert labels.shape == (21,) and int(labels.max()) == 0


# ---------------------------------------------------------------------- Pyro models
def test_pyro_site_without_a_bijection_is_refused():
    """A Wishart (positive definite) latent: torch registers no bijection for its support, and
    ``from_pyro`` let ``NotImplementedError`` out of ``biject_to``; now a ValueError naming the site
    and its support."""
    import pyro
    import pyro.distributions as dist

    def model():
        cov = pyro.sample("cov", dist.Wishart(torch.tensor(4.0, dtype=F64), torch.eye(2, dtype=F64)))
        obs = torch.tensor([0.5, 0.2], dtype=F64)
        pyro.sample("obs", dist.MultivariateNormal(torch.zeros(2, dtype=F64), covariance_matrix=cov), obs=obs)

    with pytest.raises(ValueError, match="'cov'.*(Wishart).*PositiveDefinite"):
        ds.Target.from_pyro(model)


def _pyro_positive_model(y):
    import pyro
    import pyro.distributions as dist

    s = pyro.sample("s", dist.HalfNormal(torch.tensor(1.0, dtype=F64)))
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 10.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, s), obs=y)


# ---------------------------------------------------------------------- references without moments
def _references_without_moments() -> dict:
    z, o = torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64)
    affine = torch.distributions.transforms.AffineTransform(1.0, 2.0)
    return {
        # mean and variance raise NotImplementedError
        "transformed": torch.distributions.Independent(
            torch.distributions.TransformedDistribution(torch.distributions.Normal(z, o), [affine]), 1
        ),
        # mean NaN, variance inf
        "cauchy": torch.distributions.Independent(torch.distributions.StudentT(1.0, z, o), 1),
    }


@pytest.mark.parametrize("case", ["transformed", "cauchy"])
def test_pdds_reference_without_finite_moments(case):
    """PDDS's pilot read ``reference.mean`` and ``reference.variance`` guarded by ``hasattr``, which
    does not catch the ``NotImplementedError`` a distribution without moments raises (every
    Pyro model's prior: ``pdds`` crashed on every ``from_pyro`` target), and a Cauchy's NaN mean
    made every start NaN. Such a reference now runs the pilot centred at 0, unpreconditioned."""
    reference = _references_without_moments()[case]
    idata = _sample(ds.Target(gaussian, 2, dtype=F64), "pdds", num_samples=16, reference=reference)
    assert np.isfinite(idata.posterior["x"].values).all()
    with pytest.raises(ValueError, match="whitening='reference'"):
        _sample(ds.Target(gaussian, 2, dtype=F64), "pdds", reference=reference, whitening="reference")


def test_pdds_on_a_pyro_model():
    """The user's path to the bug above: ``pdds`` on a Pyro model (prior without moments)."""
    y = torch.tensor([0.3, 1.2, -0.4, 2.1, 0.8], dtype=F64)
    idata = _sample(ds.Target.from_pyro(_pyro_positive_model, y), "pdds", num_samples=16)
    assert (idata.posterior["s"].values > 0).all() and np.isfinite(idata.posterior["mu"].values).all()


def test_unknown_pdds_whitening_is_refused_before_any_work():
    counted = Counted(gaussian)
    target = ds.Target(counted, 2, dtype=F64)
    before = counted.points
    with pytest.raises(ValueError, match="whitening"):
        _sample(target, "pdds", whitening="pilott")
    assert counted.points == before


# ---------------------------------------------------------------------- divide and conquer
def _degenerate_shards(case: str) -> list:
    g = torch.Generator().manual_seed(0)
    good = [torch.randn(40, 2, generator=g, dtype=F64) for _ in range(3)]
    a = torch.randn(40, 1, generator=g, dtype=F64)
    bad = {
        "constant-coordinate": torch.cat([a, torch.zeros_like(a)], 1),  # a coordinate never moves
        "stuck-chain": torch.ones(40, 2, dtype=F64),  # every draw the same point
        "collinear": torch.cat([a, 2.0 * a], 1),  # x_1 = 2 x_0 exactly
    }[case]
    return [good[0], bad, good[2]]


@pytest.mark.parametrize("method", COMBINER_NAMES)
@pytest.mark.parametrize("case", ["constant-coordinate", "stuck-chain", "collinear"])
def test_shard_with_singular_covariance_is_refused(method, case):
    """A shard whose draws do not spread in every direction (a stuck chain, a coordinate that never
    moves, an exactly redundant coordinate): every moment-based combiner crashed inverting its
    covariance (``torch.linalg.inv``: "the input matrix is singular"). Refused by the shared
    validation of the draws, naming the shard, before any combiner runs."""
    with pytest.raises(ValueError, match="shard 1: .*(never change|span only 1 of 2)"):
        ds.dnc.combine(_degenerate_shards(case), method, num_samples=8, seed=0, progress=False)


def test_strongly_correlated_shard_is_accepted():
    """The rank check is not a correlation threshold: correlation 0.9999 is a valid shard."""
    g = torch.Generator().manual_seed(1)
    shards = []
    for _ in range(2):
        a, b = torch.randn(2, 200, 1, generator=g, dtype=F64)
        shards.append(torch.cat([a, a + 0.014 * b], 1))
    idata = ds.dnc.combine(shards, "gaussian", num_samples=8, seed=0, progress=False)
    assert np.isfinite(idata.posterior["x"].values).all()


# ---------------------------------------------------------------------- float types
W64 = torch.tensor([1.0, 2.0], dtype=torch.float64)


def computes_in_float64(x):
    """A log-density whose parameters are float64: float32 points give a float64 value."""
    return -0.5 * ((x * W64) ** 2).sum(-1)


def computes_in_float32(x):
    """A log-density that computes in float32 whatever the points' type."""
    return -0.5 * ((x.float() * W64.float()) ** 2).sum(-1)


def _smoothed_score(y, sigma):
    """The exact smoothed score of N(0, diag(1, 1/4)): walk-jump and SMS skip their estimator."""
    return -y / (W64.to(y) ** -2 + sigma**2)


#: Short runs of every method (the MCMC defaults are already short at 8 draws).
SHORT = {
    "ais": dict(num_temperatures=10),
    "diffusion": dict(
        num_explore=100, train_steps=50, refit_steps=10, max_rounds=1, gaussian_rounds=0,
        num_proposals=128, chains_per_mode=8, refresh_chains=8, ode_steps=10, hidden=16, depth=2,
    ),
    "gaussian_is": dict(
        num_explore=100, max_rounds=1, num_proposals=128, chains_per_mode=8, refresh_chains=8
    ),
    "sms": dict(smoothed_score=_smoothed_score),
    "walk_jump": dict(smoothed_score=_smoothed_score),
}  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "fn, dtype",
    [(computes_in_float64, torch.float32), (computes_in_float32, torch.float64)],
    ids=["float32-points-float64-value", "float64-points-float32-value"],
)
def test_log_density_in_the_other_float_type(method, fn, dtype):
    """API.md: float32 and float64 both work. A log-density whose value comes back in the other
    float type than its points (float64 parameters, or a model computing in float32) crashed MALA,
    HMC, SMS, AIS, SMC, PT and PDDS mid-run with torch dtype errors ("addmv input tensors must have
    the same dtype"). The Target casts the value to the points' type, once for every sampler."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # short runs are flagged unreliable
        idata = _sample(ds.Target(fn, 2, dtype=dtype), method, **SHORT.get(method, {}))
    assert np.isfinite(idata.posterior["x"].values).all()
    assert np.isfinite(idata.sample_stats["lp"].values).all()


# ---------------------------------------------------------------------- option values
BAD_OPTION_VALUES = [
    ("hmc", dict(num_leapfrog=0), "num_leapfrog"),
    ("hmc", dict(max_leapfrog=0), "max_leapfrog"),
    ("mala", dict(num_warmup=2.5), "num_warmup"),
    ("mala", dict(init=torch.full((4, 2), float("nan"))), "init"),
    ("ais", dict(num_temperatures=0), "num_temperatures"),
    ("ais", dict(num_mcmc_steps=-1), "num_mcmc_steps"),
    ("ais", dict(num_pilot=0), "num_pilot"),
    ("ais", dict(kernel="nuts"), "kernel"),
    ("smc", dict(target_ess=1.5), "target_ess"),
    ("smc", dict(kernel="nuts"), "kernel"),
    ("pt", dict(num_temperatures=0), "num_temperatures"),
    ("pt", dict(num_temperatures=1), "num_temperatures"),
    ("pt", dict(num_warmup=-1), "num_warmup"),
    ("pt", dict(step_size=-1.0), "step_size"),
    ("pt", dict(target_accept=1.5), "target_accept"),
    ("pdds", dict(pilot_chains=0), "pilot_chains"),
    ("pdds", dict(pilot_steps=-1), "pilot_steps"),
    ("pdds", dict(num_steps=0), "num_steps"),
    ("pdds", dict(mode_scale=-1.0), "mode_scale"),
]


@pytest.mark.parametrize(
    "method, options, match", BAD_OPTION_VALUES, ids=[f"{m}-{next(iter(o))}" for m, o, _ in BAD_OPTION_VALUES]
)
def test_bad_option_value_is_refused_before_any_work(method, options, match):
    """A bad option value was refused only where a sampler used it, after its first evaluations
    (HMC's start and step-size search, AIS's pilot, SMC's and PT's starting points); PT with
    ``num_temperatures=0`` drew zero starting points and blamed the log-density ("-inf at all 0
    initial points", as PDDS with ``pilot_chains=0``), PDDS ran with a negative ``pilot_steps``
    or zero ``num_steps``, and a NaN ``init`` was reported as a log-density returning NaN. Each is now
    a ValueError naming the option before the log-density is evaluated."""
    counted = Counted(gaussian)
    target = ds.Target(counted, 2, dtype=F64)
    before = counted.points
    with pytest.raises(ValueError, match=match):
        _sample(target, method, **options)
    assert counted.points == before


# ---------------------------------------------------------------------- silent errors
def shifted_narrow(x):
    """N(2, 0.25 I) unnormalised: log Z = dim * log(0.5 sqrt(2 pi)), far from SMC's N(0, I) start."""
    return -0.5 * (((x - 2.0) / 0.5) ** 2).sum(-1)


def test_smc_warns_when_few_eves_survive():
    """SMC with 16 particles in d = 50 returned log Z = 6.55 with standard error 0.72 where the
    exact value is 11.29 (6.6 standard errors off), with no warning: only 2 initial particles had
    descendants, too few for the genealogy variance estimate (the module docstring already said
    so; PDDS already warned). Now a RuntimeWarning names it; a run with 256 particles in d = 10
    (37 Eves, log Z within its error bar) stays silent."""
    dim = 50
    with pytest.warns(RuntimeWarning, match="only 2 distinct initial particles survive"):
        idata = _sample(ds.Target(shifted_narrow, dim, dtype=F64), "smc", num_samples=16, num_chains=1)
    exact = dim * np.log(0.5 * np.sqrt(2 * np.pi))
    attrs = idata.posterior.attrs
    assert abs(attrs["log_normalizer"] - exact) > 4 * attrs["log_normalizer_se"]  # what it hid
    dim = 10
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        idata = _sample(ds.Target(shifted_narrow, dim, dtype=F64), "smc", num_samples=256)
    attrs = idata.posterior.attrs
    exact = dim * np.log(0.5 * np.sqrt(2 * np.pi))
    assert attrs["num_eves"] >= 20 and abs(attrs["log_normalizer"] - exact) < 4 * attrs["log_normalizer_se"]


@pytest.mark.parametrize("method", ["walk_jump", "sms"])
def test_infinite_sigma_is_refused(method):
    """``sigma=inf`` passed the ``sigma > 0`` check: walk-jump returned NaN draws (with a warning).
    Refused before any work."""
    counted = Counted(gaussian)
    target = ds.Target(counted, 2, dtype=F64)
    before = counted.points
    with pytest.raises(ValueError, match="sigma must be positive and finite"):
        _sample(target, method, sigma=float("inf"), smoothed_score=lambda y, s: -y / (1 + s**2))
    assert counted.points == before


@pytest.mark.parametrize("method", ["walk_jump", "sms"])
def test_nan_smoothed_score_is_refused(method):
    """A user's ``smoothed_score`` that returns NaN: SMS returned NaN draws (marked diverging, with a
    warning). Its first call now checks the values as well as the shape."""
    with pytest.raises(ValueError, match="smoothed_score returned NaN"):
        _sample(
            ds.Target(gaussian, 2, dtype=F64),
            method,
            smoothed_score=lambda y, s: torch.full_like(y, torch.nan),
        )


# ---------------------------------------------------------------------- round 2: diagnostics that warn
def two_separated_modes(x):
    """0.5 N(4 * 1, I) + 0.5 N(-4 * 1, I) in d = 2: modes 11 sds apart."""
    return torch.logsumexp(torch.stack([-0.5 * ((x - 4.0) ** 2).sum(-1), -0.5 * ((x + 4.0) ** 2).sum(-1)]), 0)


def _two_modes_smoothed_score(y, sigma):
    """The exact score of ``two_separated_modes`` smoothed by N(0, sigma^2 I): modes N(+-4, 1 + sigma^2)."""
    v = 1.0 + sigma**2
    w = torch.softmax(torch.stack([-0.5 * ((y - 4.0) ** 2).sum(-1), -0.5 * ((y + 4.0) ** 2).sum(-1)]) / v, 0)
    return (w[0, :, None] * (4.0 - y) + w[1, :, None] * (-4.0 - y)) / v


def test_walk_jump_chains_in_different_modes_warn():
    """Walk-jump at sigma = 1 on two modes 11 sds apart: each chain (one walker) stayed in the mode it
    started in (two chains at +4, two at -4; R-hat 1.79), so the mode weights were those of the starts,
    and the run was silent (walk-jump's chains were never diagnosed). Its one-walker chains are now
    diagnosed as MCMC chains; a long walk on a Gaussian stays silent."""
    target = ds.Target(two_separated_modes, 2, dtype=F64)
    with pytest.warns(RuntimeWarning, match=r"(?s)R-hat .* the chains disagree.*raise sigma"):
        idata = _sample(target, "walk_jump", num_samples=200, smoothed_score=_two_modes_smoothed_score)
    means = idata.posterior["x"].values[..., 0].mean(1)
    assert (means > 3).any() and (means < -3).any()  # the premise: chains in different modes
    assert idata.posterior.attrs["rhat_max"] > 1.5
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        idata = _sample(
            ds.Target(gaussian, 2, dtype=F64), "walk_jump", num_samples=1000, thin=4,
            smoothed_score=lambda y, s: -y / (1 + s**2),
        )  # fmt: skip
    assert idata.posterior.attrs["rhat_max"] < 1.01 and idata.posterior.attrs["ess_bulk_min"] > 400


def test_ais_with_few_particles_says_so_not_collapsed():
    """AIS with 8 particles on N(0, I): ESS 8.0 of 8, even weights, was reported as "AIS weights
    collapsed" (the ESS bar of 100 cannot be met by 8 particles). Now the warning says too few
    particles; weights that do collapse (plain importance sampling, no moves) still say collapsed."""
    target = ds.Target(gaussian, 2, dtype=F64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = _sample(target, "ais")
    (message,) = [str(w.message) for w in caught if w.category is RuntimeWarning]
    assert message.startswith("AIS with too few particles") and "collapsed" not in message
    assert idata.posterior.attrs["ess"] > 7.5 and not idata.posterior.attrs["log_normalizer_reliable"]
    wide = torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(2, dtype=F64), 20.0 * torch.ones(2, dtype=F64)), 1
    )
    with pytest.warns(RuntimeWarning, match="AIS weights collapsed"):
        _sample(target, "ais", num_samples=64, num_mcmc_steps=0, schedule="geometric", reference=wide)


#: (method, option, value): a bool option given a string or a number, an integer option a float.
BAD_OPTION_TYPES = [
    ("mala", "adapt_mass", "yes"),
    ("nuts", "adapt_mass", 1),
    ("hmc", "num_leapfrog", 5.0),
    ("mala", "num_warmup", 10.5),
    ("pt", "adapt_ladder", "no"),
    ("pt", "num_warmup", 10.5),
    ("pt", "reference_draws", "False"),
    ("ais", "fit_reference", "no"),
    ("ais", "adapt_scale", "yes"),
    ("ais", "num_mcmc_steps", 2.5),
    ("pdds", "within_modes", "yes"),
    ("diffusion", "bridge", "no"),
    ("gaussian_is", "num_explore", 100.5),
    ("walk_jump", "num_warmup", 10.5),
    ("walk_jump", "num_mala", 2.0),
    ("sms", "num_measurements", 4.5),
    ("smc", "within_modes", "yes"),
    ("smc", "adapt_scale", 0),
    ("smc", "max_mcmc_steps", 10.5),
]


@pytest.mark.parametrize(
    "method, option, value", BAD_OPTION_TYPES, ids=[f"{m}-{o}-{v!r}" for m, o, v in BAD_OPTION_TYPES]
)
def test_option_of_the_wrong_type_is_refused_before_any_work(method, option, value):
    """``adapt_mass="yes"`` ran (any non-empty string is truthy: ``"no"`` switched an option on) and
    ``num_warmup=10.5`` was truncated to 10 by walk-jump and PT. The front door now checks every option
    annotated ``bool`` or ``int`` in the method's signature (or its options' dataclass) before any
    work; numpy integers and bools pass."""
    counted = Counted(gaussian)
    target = ds.Target(counted, 2, dtype=F64)
    before = counted.points
    with pytest.raises(ValueError, match=f"{option} must be"):
        _sample(target, method, **{option: value})
    assert counted.points == before


def test_numpy_integer_and_bool_options_are_accepted():
    target = ds.Target(gaussian, 2, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # short runs are flagged unreliable
        idata = _sample(target, "mala", num_warmup=np.int64(10), adapt_mass=np.bool_(False), seed=np.int64(3))
    assert idata.posterior.attrs["seed"] == 3


@pytest.mark.parametrize("option, value", [("reweight", "yes"), ("num_levels", 4.5), ("calibrate", 0)])
def test_combiner_option_of_the_wrong_type_is_refused(option, value):
    g = torch.Generator().manual_seed(0)
    shards = [torch.randn(40, 2, generator=g, dtype=F64) for _ in range(3)]
    with pytest.raises(ValueError, match=f"{option} must be"):
        ds.dnc.combine(shards, "diffusion", num_samples=8, seed=0, progress=False, **{option: value})


@pytest.mark.parametrize("method", COMBINER_NAMES)
def test_combining_shards_that_do_not_overlap_warns(method):
    """Shards N(0, I) and N(10 * e_0, I) (their draws never meet: 7 sds of their difference apart)
    were combined with no warning: their product lies in both shards' far tails, where their draws
    say nothing. Now a RuntimeWarning gives the distance; three shards of one posterior stay silent."""
    if method == "diffusion":
        pytest.skip("the check is the front's, before any combiner: the cheap combiners show it")
    g = torch.Generator().manual_seed(0)
    apart = [torch.randn(200, 2, generator=g, dtype=F64) for _ in range(2)]
    apart[1][:, 0] += 10.0
    with pytest.warns(RuntimeWarning, match=r"shards 0 and 1 are (6\.9|7\.\d) sds apart"):
        idata = ds.dnc.combine(apart, method, num_samples=8, seed=0, progress=False)
    assert idata.posterior.attrs["max_shard_separation"] > 6.5
    theta = torch.randn(3, 1, 2, generator=g, dtype=F64)  # each shard's estimate scatters by its sd
    same = [t + torch.randn(200, 2, generator=g, dtype=F64) for t in theta]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ds.dnc.combine(same, method, num_samples=8, seed=0, progress=False)


#: Words of the warnings that numpy, torch and ArviZ raise on statistics of too few values.
_LIBRARY_NOISE = ("degrees of freedom", "encountered in", "empty slice", "More chains")


def _short_options(method: str) -> dict:
    """The method's short-run options; for SMS and walk-jump the exact smoothed score of N(0, I)."""
    options = dict(SHORT.get(method, {}))
    if method in ("sms", "walk_jump"):
        options["smoothed_score"] = lambda y, s: -y / (1 + s**2)
    return options


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("num_samples", [1, 2])
def test_tiny_runs_leak_no_library_warnings(method, num_samples):
    """At one or two draws in d = 1 torch warned from inside the samplers ("std(): degrees of freedom
    is <= 0" from PT's log Z standard error of one unit, "var(): ..." from AIS's log-weight variance
    of one particle) and ArviZ from the conversion ("More chains (4) than draws (1)", for every
    method with more chains than draws). Now they compute NaN where one value has no spread, and the
    conversion knows its arrays are (chain, draw). A particle method that needs two refuses one."""
    options = _short_options(method)
    target = ds.Target(gaussian, 1, dtype=F64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            idata = _sample(target, method, num_samples=num_samples, **options)
        except ValueError as err:
            assert num_samples == 1 and "at least 2" in str(err)
            return
    noise = [str(w.message) for w in caught if any(s in str(w.message) for s in _LIBRARY_NOISE)]
    assert not noise and not [w for w in caught if issubclass(w.category, UserWarning)]
    assert np.isfinite(idata.posterior["x"].values).all()


def plus_inf_beyond(x):
    """N(0, I), but +inf where x_0 > 2.5: not at the starts, met mid-run."""
    lp = gaussian(x)
    return torch.where(x[:, 0] > 2.5, torch.full_like(lp, torch.inf), lp)


@pytest.mark.parametrize("method", METHODS)
def test_plus_inf_met_mid_run_is_warned(method):
    """A log-density that is +inf off the starting points passed the first look; every sampler then
    rejected the +inf points silently (no draw beyond 2.5, where N(0, 1) has 0.6% of its mass), while
    NaN met mid-run was warned about. Now +inf is counted as NaN is (``num_posinf_evals``) and warned
    about; a method whose first look meets it (its starts cover the region) refuses it."""
    options = _short_options(method)
    target = ds.Target(plus_inf_beyond, 2, dtype=F64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            idata = _sample(target, method, num_samples=64, **options)
        except ValueError as err:
            assert "+inf" in str(err)
            return
    met = idata.posterior.attrs["num_posinf_evals"]
    warned = [str(w.message) for w in caught if "returned +inf" in str(w.message)]
    assert len(warned) == (1 if met else 0) and np.isfinite(idata.sample_stats["lp"].values).all()
    if met:
        assert f"+inf at {met} of" in warned[0]


def _bernoulli_model(y):
    import pyro
    import pyro.distributions as dist

    p = pyro.sample("p", dist.Beta(torch.tensor(1.0, dtype=F64), torch.tensor(1.0, dtype=F64)))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Bernoulli(p), obs=y)


@pytest.mark.parametrize("y", [torch.tensor([1, 0, 1, 1]), torch.tensor([True, False, True, True])])
def test_pyro_observations_of_integer_dtype_are_named(y):
    """A Bernoulli site observed with int64 or bool values: ``from_pyro`` blamed batching ("the model
    cannot be evaluated on a batch of particles (plate: RuntimeError: result type Float can't be cast
    to the desired output type Long ...)") though one point fails alike. The prior trace now computes
    its log-density, and the error names the observed site and its dtype; float observations work,
    and a Poisson site takes its integer counts as they are."""
    with pytest.raises(ValueError, match=r"Observed site\(s\) 'y' \(torch\.(int64|bool)\).*floating"):
        ds.Target.from_pyro(_bernoulli_model, y)
    assert ds.Target.from_pyro(_bernoulli_model, y.double()).dim == 1

    def poisson(counts):
        import pyro
        import pyro.distributions as dist

        lam = pyro.sample("lam", dist.Gamma(torch.tensor(2.0, dtype=F64), torch.tensor(1.0, dtype=F64)))
        with pyro.plate("data", len(counts)):
            pyro.sample("counts", dist.Poisson(lam), obs=counts)

    assert ds.Target.from_pyro(poisson, torch.tensor([3, 1, 4, 1, 5])).dim == 1


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_walk_jump_non_finite_init_is_refused(value):
    """``init`` with NaN or inf entries: MCMC refused it, walk-jump returned NaN draws (marked, with
    three warnings). Refused before any work."""
    counted = Counted(gaussian)
    target = ds.Target(counted, 2, dtype=F64)
    before = counted.points
    with pytest.raises(ValueError, match="init has NaN or infinite entries"):
        init = torch.full((4, 2), value, dtype=F64)
        _sample(target, "walk_jump", init=init, smoothed_score=_smoothed_score)
    assert counted.points == before
