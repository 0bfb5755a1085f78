"""Small helpers shared by the samplers: argument checks, progress bars, log-weight algebra."""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = [
    "rows_finite",
    "check_options",
    "check_bool",
    "check_option_types",
    "option_kinds",
    "check_positive_int",
    "check_nonnegative_int",
    "check_seed",
    "check_probability",
    "check_device",
    "progress_bar",
    "log_mean_exp",
    "ess_from_log_weights",
    "normalized_weights",
    "log_normalizer_estimate",
    "pareto_smooth",
    "pareto_k",
]


def check_options(options: dict, allowed: set, method: str) -> None:
    """``ValueError`` naming any option ``method`` does not know (a typo would silently do nothing)."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) for method {method!r}: {', '.join(unknown)}; "
            f"known: {', '.join(sorted(allowed))}"
        )


def check_bool(value, name: str) -> bool:
    """Return ``value`` as a bool, or raise ``ValueError`` unless it is ``True`` or ``False`` (a numpy
    bool too): a string such as ``"no"`` is truthy and would switch the option on silently."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def option_kinds(parameters) -> dict[str, str]:
    """``name -> "bool" | "int"`` for the options whose type can be checked: those annotated ``bool``
    or ``int`` (either or ``None``), from ``inspect.Parameter`` or ``dataclasses.Field`` objects (whose
    annotations, under ``from __future__ import annotations``, are strings)."""
    kinds = {}
    for p in parameters:
        annotation = getattr(p, "annotation", getattr(p, "type", None))
        if isinstance(annotation, type):
            annotation = annotation.__name__
        types = {t.strip() for t in str(annotation).split("|")} - {"None"}
        if types in ({"bool"}, {"int"}):
            kinds[p.name] = types.pop()
    return kinds


def check_option_types(options: dict, kinds: dict[str, str], method: str) -> None:
    """``ValueError`` for an option whose value is not of its kind (:func:`option_kinds`): a bool option
    given anything but ``True`` or ``False``, an integer option given a float or a bool (``int()``
    would truncate it silently). ``None`` passes (an optional option's default)."""
    for name, value in options.items():
        kind = kinds.get(name)
        if value is None or kind is None:
            continue
        if kind == "bool":
            check_bool(value, f"{method}: option {name}")
        elif isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{method}: option {name} must be an integer, got {value!r}")


def check_positive_int(value, name: str) -> int:
    """Return ``value`` as an int, or raise ``ValueError`` if it is not a positive integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_nonnegative_int(value, name: str) -> int:
    """Return ``value`` as an int, or raise ``ValueError`` if it is not an integer >= 0 (a count that
    may be zero: warm-up iterations, moves; a float would be truncated silently)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def check_seed(seed) -> int:
    """Return ``seed`` as an int, or raise ``ValueError`` unless it is an integer in [0, 2**63): the
    range ``torch.Generator.manual_seed`` takes (a larger one overflows inside torch, a bool or a
    float is a mistake)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    return int(seed)


def check_device(device) -> torch.device:
    """Return ``device`` as a ``torch.device`` (None: the CPU), or raise ``ValueError`` unless it names
    a device this torch build can run on now: the CPU, a CUDA device whose index exists, or MPS where
    it is available. Checked before any work: otherwise an unavailable device fails later inside
    torch (creating its generator) with an error that does not name the argument."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda', got {device!r}") from err
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count and (dev.index is None or dev.index < count):
            return dev
        have = f"{count} CUDA device(s)" if count else "no usable CUDA device"
        raise ValueError(f"device={device!r} is not available: this machine has {have}; use device='cpu'")
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return dev
        raise ValueError(f"device={device!r} is not available: MPS is not available here; use device='cpu'")
    raise ValueError(f"device={device!r} is not supported: use 'cpu', 'cuda' or 'mps'")


def check_probability(value, name: str, *, open_interval: bool = True) -> float:
    """Return ``value`` as a float in (0, 1) (or [0, 1]), or raise ``ValueError``."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}") from None
    ok = 0.0 < value < 1.0 if open_interval else 0.0 <= value <= 1.0
    if not ok:
        raise ValueError(f"{name} must lie in {'(0, 1)' if open_interval else '[0, 1]'}, got {value}")
    return value


def rows_finite(t: torch.Tensor) -> torch.Tensor:
    """``(n,)``: True where every entry of the row of ``t: (n, dim)`` is finite, the same mask as
    ``torch.isfinite(t).all(-1)``. Computed as the finiteness of the row sums of ``t * 0`` (0 for
    a finite entry, NaN for an infinite or NaN one, and no overflow): a reduction of booleans over
    the last dimension is slow on the CPU, about 0.1 ms at 1,000 x 10 and 0.5 ms at 1,000 x 34,
    10 to 25 times this (``docs/mala_overhead.md``), more than the logistic target's gradient."""
    return torch.isfinite((t * 0).sum(-1))


def progress_bar(total: int, desc: str, progress: bool):
    """A tqdm progress bar, silent when ``progress`` is False."""
    return tqdm(total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)


def log_mean_exp(log_w: torch.Tensor, dim: int = -1) -> torch.Tensor:
    r"""Stable :math:`\log \frac1n \sum_i e^{w_i}` along ``dim``."""
    return torch.logsumexp(log_w, dim=dim) - math.log(log_w.shape[dim])


def normalized_weights(log_w: torch.Tensor) -> torch.Tensor:
    """Self-normalised weights from log weights ``(n,)``; invariant to adding a constant."""
    return torch.softmax(log_w, dim=-1)


def ess_from_log_weights(log_w: torch.Tensor) -> torch.Tensor:
    r"""Kish effective sample size :math:`(\sum w)^2 / \sum w^2` of log weights ``(..., n)``."""
    return torch.exp(2 * torch.logsumexp(log_w, -1) - torch.logsumexp(2 * log_w, -1))


def pareto_smooth(log_w: torch.Tensor) -> tuple[torch.Tensor, float]:
    r"""Pareto-smoothed importance weights (PSIS, Vehtari et al. 2024; computed by
    :func:`arviz.psislw`) of log weights ``(n,)``: the largest
    :math:`M = \min(n/5, 3\sqrt n)` weights are replaced by the expected order statistics of a
    generalised Pareto fitted to them, which lowers the variance of self-normalised estimates at a
    small bias. Returns the smoothed log weights ``(n,)`` (normalised to sum to one; zero weights
    stay zero) and the fitted shape :math:`\hat k`. The weights have :math:`\lfloor 1/k \rfloor`
    finite moments: above 0.5 their variance is infinite and one batch's Kish ESS overstates the
    precision, above 0.7 the estimate is unreliable even smoothed. For :math:`p = \mathcal N(0,
    s^2)` and :math:`q = \mathcal N(0, 1)`, :math:`k = 1 - 1/s^2`. Where no tail can be fitted
    (fewer than 20 positive weights, all equal, or a failed fit) :math:`\hat k` is NaN and the
    weights are only normalised: a diagnostic never ends a run."""
    import warnings

    import arviz as az

    lw = log_w.detach().double().flatten()
    finite = torch.isfinite(lw)
    out = torch.full_like(lw, -math.inf)
    vals = lw[finite]
    out[finite] = vals - torch.logsumexp(vals, 0)
    if vals.numel() < 20 or float(vals.max() - vals.min()) == 0.0:
        return out.to(log_w), math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            smoothed, k = az.psislw(vals.cpu().numpy().copy())
        except Exception:  # noqa: BLE001 - a diagnostic must not end the run
            return out.to(log_w), math.nan
    out[finite] = torch.as_tensor(smoothed, dtype=out.dtype, device=out.device)
    return out.to(log_w), float(k)


def pareto_k(log_w: torch.Tensor) -> float:
    r"""The Pareto :math:`\hat k` of importance log weights ``(n,)`` (:func:`pareto_smooth`): above
    0.7 the weights' variance is effectively infinite and estimates and their standard errors are
    unreliable. NaN when it cannot be computed."""
    return pareto_smooth(log_w)[1]


def log_normalizer_estimate(log_w: torch.Tensor) -> tuple[float, float]:
    r"""Importance-sampling estimate of :math:`\log Z` and its delta-method standard error.

    With :math:`\hat Z = \frac1n \sum_i w_i`, :math:`\mathrm{se}(\log \hat Z) \approx
    \mathrm{sd}(w) / (\sqrt{n}\, \bar w)`, computed stably on the log scale.
    """
    log_w = log_w.detach().double().flatten()
    log_w = log_w[torch.isfinite(log_w) | (log_w == -math.inf)]
    n = log_w.numel()
    log_z = float(log_mean_exp(log_w))
    rel = torch.exp(log_w - log_z)  # w_i / mean(w)
    se = float(rel.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
    return log_z, se


def pad_stack(arrays: list, axis: int) -> np.ndarray:
    """Arrays (tensors or numpy) of the same rank stacked along a new ``axis``, each padded with NaN
    to the largest shape (independent runs of unequal length as chains)."""
    arrays = [np.asarray(torch.as_tensor(a).detach().cpu().double()) for a in arrays]
    shape = np.max([a.shape for a in arrays], axis=0)
    out = np.full((len(arrays), *shape), np.nan)
    for i, a in enumerate(arrays):
        out[(i, *(slice(0, n) for n in a.shape))] = a
    return np.moveaxis(out, 0, axis)
