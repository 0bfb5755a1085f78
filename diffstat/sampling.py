"""The front door: ``ds.sample(target, method, ...)`` and the registry of samplers behind it.

A sampler is a function ``fn(target, *, num_samples, num_chains, generator, progress, device,
**options) -> SamplerResult`` registered under a method name with :func:`register_sampler`; the
front validates the common arguments, seeds the generator, times and counts the run, and turns
the result into ``arviz.InferenceData`` (:mod:`diffstat.io`).
"""

from __future__ import annotations

import dataclasses
import inspect
import time
import warnings
from dataclasses import dataclass, field
from collections.abc import Callable

import torch

from diffstat._util import (
    check_device,
    check_option_types,
    check_options,
    check_positive_int,
    check_seed,
    option_kinds,
)
from diffstat.target import Target, resolve_reference

__all__ = ["sample", "register_sampler", "SamplerResult", "available_methods", "resolve_reference"]

_REGISTRY: dict[str, Callable[..., SamplerResult]] = {}
#: Modules that register samplers when imported; imported lazily by ``sample``.
_SAMPLER_MODULES = (
    "diffstat.mcmc.sampler",
    "diffstat.tempering",
    "diffstat.diffusion.sampler",
    "diffstat.smoothing",
)


@dataclass
class SamplerResult:
    """What a sampler hands back to the front.

    draws : (chain, draw, dim) tensor in the target's (unconstrained) coordinates, equally weighted.
    sample_stats : name -> (chain, draw, ...) arrays; must contain ``lp``.
    groups : extra InferenceData groups, name -> {variable -> array whose first axis is the stage}.
    attrs : extra ``posterior.attrs`` (``log_normalizer``, ``log_normalizer_se``, settings chosen).
    diagnose : run the MCMC diagnostics of :mod:`diffstat.diagnostics` on the draws (R-hat, ESS,
        divergences, stuck chains, E-BFMI): their figures go into ``posterior.attrs`` and one
        ``RuntimeWarning`` lists every problem found. Set by the MCMC samplers, by PT (the cold
        chains of its independent runs are MCMC chains) and by walk-jump with one walker per chain
        (each chain is one Langevin walk, so chains in different modes show in R-hat).
    diagnose_stats : the ``sample_stats`` the diagnostics read (None: all of them); walk-jump leaves
        out its ``diverging``, marks of its own that it warns about, not an integrator's divergences.
    diagnose_advice : a sentence added to the diagnostics' warning: what to change for this method.
    """

    draws: torch.Tensor
    sample_stats: dict[str, object]
    groups: dict[str, dict[str, object]] = field(default_factory=dict)
    attrs: dict[str, object] = field(default_factory=dict)
    diagnose: bool = False
    diagnose_stats: tuple[str, ...] | None = None
    diagnose_advice: str = ""


#: Arguments every sampler receives from the front door (not user options).
_COMMON = {"target", "num_samples", "num_chains", "generator", "progress", "device"}
_OPTIONS: dict[str, frozenset] = {}
#: method -> option -> "bool" | "int": the options whose type the front door checks.
_KINDS: dict[str, dict[str, str]] = {}


def register_sampler(name: str, options=None, typed_by=None):
    """Decorator registering ``fn`` as the sampler behind ``ds.sample(target, name, ...)``.

    ``options``: the names of the options the method accepts. Without it they are read from
    ``fn``'s keyword parameters; a sampler taking ``**options`` then checks its own. The front door
    refuses an unknown option with a ``ValueError`` listing the valid ones, before any work.
    ``typed_by``: the function or dataclass whose annotations type the options (default ``fn``); an
    option annotated ``bool`` or ``int`` given another type (``"yes"``, ``10.5``) is refused likewise.
    """

    def decorator(fn):
        _REGISTRY[name] = fn
        params = inspect.signature(fn).parameters.values()
        if options is not None:
            _OPTIONS[name] = frozenset(options)
        elif not any(p.kind is p.VAR_KEYWORD for p in params):
            _OPTIONS[name] = frozenset(p.name for p in params) - _COMMON
        source = typed_by if typed_by is not None else fn
        fields = dataclasses.fields(source) if dataclasses.is_dataclass(source) else None
        kinds = option_kinds(fields if fields is not None else inspect.signature(source).parameters.values())
        _KINDS[name] = {k: v for k, v in kinds.items() if k not in _COMMON}
        return fn

    return decorator


def method_options(name: str) -> frozenset | None:
    """The options ``ds.sample(target, name, ...)`` accepts, where the method declares them."""
    _load_samplers()
    return _OPTIONS.get(name)


def _load_samplers() -> None:
    import importlib

    for module in _SAMPLER_MODULES:
        importlib.import_module(module)


def available_methods() -> list[str]:
    """Names of every registered sampling method."""
    _load_samplers()
    return sorted(_REGISTRY)


def sample(
    target: Target,
    method: str,
    *,
    num_samples: int,
    seed: int,
    num_chains: int | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    **options,
):
    """Draw from ``target`` with ``method``; return ``arviz.InferenceData``.

    Parameters
    ----------
    target : Target
        The unnormalised log-density (``ds.Target`` or ``ds.Target.from_pyro``).
    method : str
        One of :func:`available_methods`: ``"nuts"``, ``"hmc"``, ``"mala"``, ``"rwm"``,
        ``"ais"``, ``"smc"``, ``"pt"``, ``"pdds"``, ``"diffusion"``, ``"gaussian_is"``,
        ``"walk_jump"``, ``"sms"``.
    num_samples : int
        Draws per chain (for particle methods with one chain: the number of particles returned).
    seed : int
        Seeds a ``torch.Generator``: the same seed gives the same draws on the same machine.
    num_chains : int, optional
        Independent chains; each method has its own default.
    progress : bool
        Show a tqdm progress bar.
    device : str or torch.device, optional
        Where the computation runs (``"cpu"``, ``"cuda"``); the log-density must accept tensors there.
    **options
        Options of the method (see each sampler's docstring).

    MCMC methods, PT and walk-jump with one walker per chain are diagnosed after the run
    (:func:`diffstat.diagnostics.mcmc_diagnostics`):
    ``posterior.attrs`` gains ``rhat_max``, ``ess_bulk_min``, ``ess_tail_min``, ``num_divergent``,
    ``divergent_fraction``, ``stuck_chains``, ``low_lp_chains`` (counts) and, where energies are
    recorded, ``e_bfmi_min``; one ``RuntimeWarning`` lists every problem found and what to do.
    """
    num_samples, num_chains, seed, device = _check_arguments(
        target, method, num_samples, num_chains, seed, device, options
    )
    generator = torch.Generator(device=device).manual_seed(int(seed))

    from diffstat import io

    evals_before, nan_before = target.num_target_evals, target.num_nan_evals
    posinf_before = target.num_posinf_evals
    start = time.perf_counter()
    result = _REGISTRY[method](
        target,
        num_samples=num_samples,
        num_chains=num_chains,
        generator=generator,
        progress=progress,
        device=device,
        **options,
    )
    elapsed = time.perf_counter() - start
    attrs = {
        "method": method,
        "num_target_evals": int(target.num_target_evals - evals_before),
        "sampling_time": float(elapsed),
        "seed": int(seed),
    }
    attrs.update(result.attrs, num_nan_evals=int(target.num_nan_evals - nan_before))
    attrs["num_posinf_evals"] = int(target.num_posinf_evals - posinf_before)
    _warn_if_nan(method, attrs, target)
    if result.diagnose:
        _diagnose(method, result, attrs)
    return io.to_inference_data(target, result, attrs)


def _check_arguments(target, method: str, num_samples, num_chains, seed, device, options: dict) -> tuple:
    """The front door's checks, before any work: ``(num_samples, num_chains, seed, device)`` validated
    (``num_chains`` None stays None: each method has its own default), or a ``ValueError`` for a
    target that is not a :class:`~diffstat.target.Target`, an unknown method, an option the method
    does not take or of the wrong type (:func:`register_sampler`). A ``reference`` option is
    resolved to a distribution in ``options`` itself (:func:`~diffstat.target.resolve_reference`)."""
    if not isinstance(target, Target):
        raise ValueError(f"target must be a diffstat.Target, got {type(target).__name__}")
    _load_samplers()
    if method not in _REGISTRY:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(sorted(_REGISTRY))}")
    num_samples = check_positive_int(num_samples, "num_samples")
    if num_chains is not None:
        num_chains = check_positive_int(num_chains, "num_chains")
    seed = check_seed(seed)
    device = check_device(device)
    if method in _OPTIONS:
        check_options(options, _OPTIONS[method], method)
    check_option_types(options, _KINDS.get(method, {}), method)
    if "reference" in options:
        options["reference"] = resolve_reference(target, options["reference"])
    return num_samples, num_chains, seed, device


def _nan_sites(target) -> str:
    """For a Pyro model, the sites whose log-density was NaN at the last such points ("" if unknown)."""
    points = getattr(target, "nan_points", None)
    if points is None:
        return ""
    from diffstat.pyro_checks import nan_sites

    sites = nan_sites(target, points)
    return f" (at the last {len(points)} such points, in site(s) {', '.join(sites)})" if sites else ""


def _warn_if_nan(method: str, attrs: dict, target=None) -> None:
    """``RuntimeWarning`` for a run that met NaN log-densities (runtime trouble the first look at
    the starting points cannot see): the samplers reject such points, so no draw is NaN, but a
    NaN that hides probability mass (an overflow such as inf - inf) takes that mass out silently.
    Another for ``+inf`` log-densities (``attrs["num_posinf_evals"]``), which the samplers reject alike.
    The count leaves out the NaNs a sampler reports as met while searching far from the posterior
    (``attrs["num_nan_exploration"]``: the diffusion sampler's mode search and the missed-mode
    check's climbs start at up to four times the reference's scale, where real models overflow);
    ``attrs["num_nan_evals"]`` counts all. For a Pyro model the warning names the sites whose
    log-density was NaN at the last such points (an overflow inside a distribution's ``log_prob``
    far in a tail is then told from a fault of the model's own code)."""
    num_nan = attrs["num_nan_evals"] - attrs.get("num_nan_exploration", 0)
    num_evals = attrs["num_target_evals"]
    if num_nan:
        warnings.warn(
            f"ds.sample(..., {method!r}): the log-density returned NaN at {num_nan} of {num_evals} "
            f"points evaluated during the run{_nan_sites(target)}; they were rejected, so the draws miss "
            "any mass there. "
            "Return -inf outside the support, and look for an overflow (inf - inf, 0 * inf) where "
            "it is NaN",
            RuntimeWarning,
            stacklevel=3,
        )
    if attrs["num_posinf_evals"]:
        warnings.warn(
            f"ds.sample(..., {method!r}): the log-density returned +inf at {attrs['num_posinf_evals']} of "
            f"{num_evals} points evaluated during the run; they were rejected (no sampler can weigh an "
            "infinite density), so the draws miss any mass there. A normalisable density is +inf at "
            "most on a set of measure zero: look for an overflow or a log of zero in a denominator",
            RuntimeWarning,
            stacklevel=3,
        )


def _diagnose(method: str, result: SamplerResult, attrs: dict) -> None:
    """Diagnose an MCMC result: figures into ``attrs``, one ``RuntimeWarning`` for every problem."""
    from diffstat.diagnostics import mcmc_diagnostics, warn_if_unreliable

    keep = result.diagnose_stats
    stats = {k: v for k, v in result.sample_stats.items() if keep is None or k in keep}
    diag = mcmc_diagnostics(result.draws, stats)
    figures = diag.attrs()
    if "diverging" not in stats:  # the sampler's own divergence counts stand
        figures = {k: v for k, v in figures.items() if k not in ("num_divergent", "divergent_fraction")}
    attrs.update(figures)
    warn_if_unreliable(diag, f"ds.sample(..., {method!r})", stacklevel=4, advice=result.diagnose_advice)
