"""The checks :class:`~diffstat.pyro_target.PyroTarget` makes on a model before any sampling.

The validation half of :mod:`diffstat.pyro_target` (whose structure half is
:mod:`diffstat.pyro_sites`): the target's keywords and the dtype and device of the model's
arguments (:func:`check_arguments`), a run of the model at seeded prior draws with Pyro's
validation on (:func:`prior_trace`), a hint naming observations that a distribution cannot score
because they are not floating point (:func:`non_float_observations`), and the comparison of a
batched evaluation with one-point runs of the plain model (:func:`check_vectorised`); and, at run
time, the rows of a batch at which the model's linear algebra fails (:func:`rows_or_nan`), and the
sites at which the log-density was NaN (:func:`keep_nan_points`, :func:`nan_sites`).
"""

from __future__ import annotations

import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from diffstat._util import rows_finite

__all__ = [
    "MODES",
    "check_arguments",
    "non_float_observations",
    "prior_trace",
    "check_vectorised",
    "check_batched",
    "rows_or_nan",
    "keep_nan_points",
    "nan_sites",
]

#: The ways to batch a model over particles, in the order they are tried (module docstring of
#: :mod:`diffstat.pyro_target`).
MODES = ("plate", "vmap")


def check_arguments(model, arguments: tuple, dtype: torch.dtype | None, vectorize: str | None):
    """``(dtype, device)`` of a model run with ``arguments`` (its positional and keyword values), or a
    ``ValueError`` for a model that is not callable, an unknown ``vectorize``, a dtype other than
    float32 or float64, or tensor arguments on several devices. ``dtype`` None: the promoted dtype
    of the floating-point tensor arguments, else ``torch.get_default_dtype()``; the device: the
    tensor arguments', CPU if none."""
    if not callable(model):
        raise ValueError(f"model must be a callable Pyro model, got {type(model).__name__}")
    if vectorize is not None and vectorize not in MODES:
        raise ValueError(f"vectorize must be one of {MODES} or None, got {vectorize!r}")
    if dtype is None:
        dtype = torch.get_default_dtype()
        floats = [a.dtype for a in arguments if torch.is_tensor(a) and a.is_floating_point()]
        for i, a in enumerate(floats):
            dtype = a if i == 0 else torch.promote_types(dtype, a)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    devices = {a.device for a in arguments if torch.is_tensor(a)}
    if len(devices) > 1:
        raise ValueError(f"the model's tensor arguments lie on several devices: {sorted(map(str, devices))}")
    return dtype, devices.pop() if devices else torch.device("cpu")


def non_float_observations(trace) -> str:
    """A hint naming the observed sites of ``trace`` whose values are not floating point ("" if none)."""
    if trace is None:
        return ""
    sites = [
        f"{name!r} ({site['value'].dtype})"
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and site["is_observed"] and torch.is_tensor(site["value"])
        and not site["value"].is_floating_point()
    ]  # fmt: skip
    if not sites:
        return ""
    return (
        f". Observed site(s) {', '.join(sites)} hold non-floating values, which this distribution cannot "
        "score: pass the observations as floating-point tensors (y.double())"
    )


#: Seeded prior draws at which construction runs the model before refusing it.
NUM_TRACE_DRAWS = 10


def prior_trace(target):
    """A trace of ``target``'s model (a :class:`~diffstat.pyro_target.PyroTarget`) at a prior draw,
    its log-density computed with Pyro's validation on, so that a model that fails with its
    arguments is refused here (``ValueError``, with :func:`non_float_observations`'s hint).

    The draws are seeded, ``0, 1, ...`` in a fork of torch's global RNG, so that construction
    neither depends on the caller's stream nor advances it. Each is run without validation, then
    replayed with it. A draw at which the validated run raises where the unvalidated one gives a
    NaN log-density (a distribution's parameter NaN at that draw, as ``Normal(mu, nan)`` far in a
    tail), or at which the model's linear algebra fails, is a NaN point: the samplers, validation
    off, reject it like any NaN, so the next seed is tried, up to :data:`NUM_TRACE_DRAWS` (ten
    draws all in a region of prior mass 1/2 happen once in 1024 models; a model NaN at every draw
    is refused); any other failure refuses the model at once.
    """
    first = None
    for seed in range(NUM_TRACE_DRAWS):
        trace, err, nan_point = _traced_draw(target, seed)
        if err is None:
            return trace
        first = first or (trace, err)
        if not nan_point:
            break
    trace, err = first
    where = f" (at all {NUM_TRACE_DRAWS} seeded prior draws)" if nan_point else ""
    raise ValueError(
        "running the model with the given arguments failed"
        f"{where}: {type(err).__name__}: {str(err).rstrip('.')}" + non_float_observations(trace)
    ) from err


def _traced_draw(target, seed: int):
    """``(trace, error, nan_point)`` of the model at the prior draw of ``seed`` (:func:`prior_trace`):
    the validated trace and None, or the failed run's trace (None if none) and its exception."""
    trace, nan_point, args, kwargs = None, False, target.model_args, target.model_kwargs
    devices = [target.device] if target.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            with target._model_context(validate=False):
                trace = poutine.trace(target.model).get_trace(*args, **kwargs)
                nan_point = bool(torch.isnan(trace.log_prob_sum()))
            with target._model_context(validate=True):
                replayed = poutine.trace(poutine.replay(target.model, trace=trace))
                checked = replayed.get_trace(*args, **kwargs)
                checked.log_prob_sum()
    except torch.linalg.LinAlgError as err:
        return trace, err, True
    except Exception as err:  # noqa: BLE001  (any failure of the user's model is a bad argument)
        return trace, err, nan_point
    return checked, None, False


def check_vectorised(batched: torch.Tensor, single: torch.Tensor, dtype: torch.dtype) -> None:
    """``ValueError`` unless the log-densities of a batched evaluation ``batched: (n,)`` match those of
    one-point runs of the plain model at the same points ``single: (n,)``: within 1e-4 in float32
    and 1e-9 in float64, relative and absolute, with NaN matching NaN. The margin is for rounding
    (the same sums taken in another order); the faults it is for (``.item()``, Python control
    flow on latent values, a reduction over all the dimensions of a latent value) change the value."""
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    if not torch.allclose(batched, single, rtol=tol, atol=tol, equal_nan=True):
        raise ValueError(
            f"the model is not vectorised over particles: its log-density at a batch of points "
            f"{batched.tolist()} differs from the same points one at a time {single.tolist()}"
        )


#: Prior draws at which construction checks a batched evaluation against one-point runs.
NUM_CHECK_POINTS = 3


def check_batched(target) -> None:
    """``ValueError`` unless a batched evaluation of ``target`` (a
    :class:`~diffstat.pyro_target.PyroTarget`) at prior draws matches one-point runs of the plain
    model (:func:`check_vectorised`)."""
    device = target.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(1)
        u = target.prior_draws(NUM_CHECK_POINTS)
    with torch.no_grad():
        batched = target._log_density(u)
        single = torch.stack([sum(target._terms(v, None)) for v in u])
    check_vectorised(batched, single, target.dtype)


def rows_or_nan(terms, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``terms(u)``, a tuple of ``(n,)`` tensors, with NaN in the rows that the model cannot
    evaluate. A row with a non-finite coordinate (a sampler's trajectory that overflowed) is NaN
    without being run: the model sees zeros there (a point of every unconstrained support), since
    a model run under ``vmap`` may raise at NaN instead of returning it, ending the batch of every
    point. A row where ``torch.linalg.LinAlgError`` ends a batched run (a covariance that is not
    numerically positive-definite at one point, a ``MultivariateNormal`` of an AR(1) with phi near
    1) is NaN too: the batch is halved until the failing rows stand alone, ``O(k log n)`` extra runs
    for ``k`` failures. The samplers reject a NaN row and the run's warning reports it; NaN rows
    carry a zero gradient. The mask costs a few elementwise operations and no host
    synchronisation."""
    finite = rows_finite(u.detach())
    safe = torch.where(finite.unsqueeze(-1), u, torch.zeros_like(u))
    return tuple(torch.where(finite, t, torch.nan) for t in _halving(terms, safe))


def _halving(terms, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``terms(u)``, the rows at which it raises ``torch.linalg.LinAlgError`` NaN (:func:`rows_or_nan`)."""
    try:
        return terms(u)
    except torch.linalg.LinAlgError:
        if u.shape[0] == 1:
            nan = u[:, 0] * 0.0 + torch.nan
            return nan, nan
        half = u.shape[0] // 2
        parts = zip(_halving(terms, u[:half]), _halving(terms, u[half:]))
        return tuple(torch.cat(p) for p in parts)


#: Points kept at which the log-density was NaN: enough to name the sites, few enough to re-run cheaply.
NUM_NAN_POINTS = 4


def keep_nan_points(kept: torch.Tensor | None, lp: torch.Tensor, u: torch.Tensor) -> torch.Tensor | None:
    """The last :data:`NUM_NAN_POINTS` rows of ``u: (n, dim)`` with all coordinates finite at which
    ``lp: (n,)`` is NaN, or ``kept`` if there are none (a sampler's non-finite point is its own
    divergence, not the model's NaN)."""
    bad = torch.isnan(lp.detach()) & torch.isfinite(u.detach()).all(-1)
    if not bool(bad.any()):
        return kept
    return u.detach()[bad][-NUM_NAN_POINTS:].clone()


_WRAPPERS = ("Independent", "MaskedDistribution", "ExpandedDistribution")


def _distribution_name(fn) -> str:
    """The name of a site's distribution, unwrapped from ``Independent``, masks and expansions (not
    from a transformed distribution's base: a Weibull is not its base Exponential)."""
    while type(fn).__name__ in _WRAPPERS:
        fn = fn.base_dist
    return type(fn).__name__


def nan_sites(target, u: torch.Tensor) -> list[str]:
    """The sample sites of ``target`` (a :class:`~diffstat.pyro_target.PyroTarget`) whose
    log-density is NaN at some of the points ``u: (k, dim)``, in the model's order, each as
    ``"'name' (Distribution)"``; a point at which the model's linear algebra fails is reported as
    such. One model run per point (``vectorize="vmap"``) or one for all."""
    runs = [(u, u.shape[0])] if target.vectorize == "plate" else [(v, None) for v in u]
    found: dict[str, str] = {}
    with torch.no_grad():
        for v, n in runs:
            try:
                trace, _ = target._run(target._split(v), n=n)
            except torch.linalg.LinAlgError:
                found["linear algebra"] = "LinAlgError: a matrix that is not positive-definite"
                continue
            for name, site in trace.nodes.items():
                if site["type"] == "sample" and not site_is_subsample(site):
                    if bool(torch.isnan(site["fn"].log_prob(site["value"])).any()):
                        found.setdefault(name, _distribution_name(site["fn"]))
    return [f"{name!r} ({kind})" for name, kind in found.items()]
