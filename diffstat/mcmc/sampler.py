r"""MCMC samplers behind ``ds.sample``: ``"hmc"``, ``"nuts"``, ``"mala"`` and ``"rwm"``, one driver.

A run (:func:`run_mcmc`) has three phases, all batched over chains:

1. **Start** (:func:`~diffstat.mcmc.start.find_start`): from reference draws, per-chain gradient
   ascent, then a jitter from the Laplace approximation, so that chains begin in the bulk of the
   posterior rather than where a prior draw put them; the Laplace covariance is warm-up's first
   metric (skipped when ``init=`` gives the starting points, or without warm-up).
2. **Warm-up** (:func:`~diffstat.mcmc.warmup.windowed_warmup`): Stan's windowed adaptation, per-chain
   step sizes by dual averaging, a diagonal or dense metric from draws pooled across chains, and for
   ``"hmc"`` a jittered trajectory length, adapted by ChEES with 32 chains or more
   (:mod:`diffstat.mcmc.chees`).
3. **Sampling** with one shared step size, the final metric and (HMC) jittered trajectory lengths.

A chain whose acceptance rate over the draws is under 5% raises a ``RuntimeWarning``. After the
run (``check_modes=True``, the default) gradient ascent from scaled reference draws looks for modes
that no chain visits (:mod:`diffstat.modes.check`, a few thousand to a few tens of thousands of
counted evaluations): R-hat sees chains that sit in different modes, not chains that all sit in the
same one, and a chain does not leave the mode its start phase climbed to.

Defaults and why: ``num_warmup = num_samples`` (Stan's 1000/1000 ratio); target acceptance 0.8 for
HMC and NUTS (Stan), 0.574 for MALA and 0.234 for random walk (optimal scaling, Roberts and Rosenthal
1998, 2001); ``metric="auto"`` (dense only where the warm-up draws are strongly correlated and
``dim <= 200``, since a dense metric costs O(dim^2) a step and many draws to estimate);
``init_iters=200`` ascent iterations (enough to climb from :math:`\log\pi = -10^4` on the targets
we test, cheap beside warm-up).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from diffstat._util import (
    check_bool,
    check_nonnegative_int,
    check_options,
    check_positive_int,
    check_probability,
    progress_bar,
)
from diffstat.mcmc.adaptation import choose_metric
from diffstat.mcmc.base import init as init_state
from diffstat.mcmc.chees import (
    CHEES_MIN_CHAINS,
    MAX_LEAPFROG,
    ChEESAdaptation,
    JitteredLength,
    jittered_hmc_step,
)
from diffstat.mcmc.hmc import HMC_TARGET_ACCEPT
from diffstat.mcmc.mala import MALA_TARGET_ACCEPT, mala_fixed_step, mala_step
from diffstat.mcmc.metric import DenseMetric
from diffstat.mcmc.nuts import nuts_step
from diffstat.mcmc.rwm import RWM_TARGET_ACCEPT, rwm_step
from diffstat.mcmc.start import find_start, initial_step_sizes
from diffstat.mcmc.warmup import METRICS, windowed_warmup
from diffstat.modes.check import check_missed_modes, num_check_starts
from diffstat.sampling import SamplerResult, register_sampler
from diffstat.target import no_support_message

__all__ = ["KERNELS", "TARGET_ACCEPT", "KernelSpec", "initial_points", "run_mcmc"]


def _hmc_accept_prob(generator, state, log_prob_and_grad, h, inv_mass):
    """One leapfrog step's acceptance probability (Stan initialises HMC step sizes this way)."""
    return jittered_hmc_step(generator, state, log_prob_and_grad, h, inv_mass, num_steps=1)[1].acceptance_rate


def _own_accept_prob(step):
    return lambda generator, state, lpg, h, inv_mass: (
        step(generator, state, lpg, h, inv_mass)[1].acceptance_rate
    )


@dataclass(frozen=True)
class KernelSpec:
    """A kernel as the driver sees it: its step, the acceptance probe used to initialise step sizes,
    its target acceptance, the extra Info fields recorded as ``sample_stats`` (stat -> field), and
    optionally ``fixed(step_size, inv_mass, like) -> step(generator, state, lpg, **kw)``, the step
    with the sampling phase's fixed step size and metric whose per-step constants are computed once
    (the same draws, bit for bit)."""

    step: Callable
    accept_prob: Callable
    target_accept: float
    stats: dict = field(default_factory=dict)
    fixed: Callable | None = None

    def with_fixed(self, step: Callable, step_size, inv_mass, like: torch.Tensor) -> Callable:
        """``step`` (this kernel's, possibly with options bound) with ``step_size`` and ``inv_mass``
        fixed, as ``step(generator, state, lpg, **kw)``."""
        if self.fixed is not None:
            return self.fixed(step_size, inv_mass, like)
        return lambda generator, state, lpg, **kw: step(generator, state, lpg, step_size, inv_mass, **kw)


KERNELS = {
    "hmc": KernelSpec(
        jittered_hmc_step, _hmc_accept_prob, HMC_TARGET_ACCEPT, {"energy": "energy", "n_steps": "n_steps"}
    ),
    "nuts": KernelSpec(
        nuts_step,
        _hmc_accept_prob,
        HMC_TARGET_ACCEPT,
        {"energy": "energy", "n_steps": "num_leapfrog", "tree_depth": "tree_depth"},
    ),
    "mala": KernelSpec(mala_step, _own_accept_prob(mala_step), MALA_TARGET_ACCEPT, fixed=mala_fixed_step),
    "rwm": KernelSpec(rwm_step, _own_accept_prob(rwm_step), RWM_TARGET_ACCEPT),
}
#: Target acceptance rates per kernel (read by the tempering path's inner moves).
TARGET_ACCEPT = {name: spec.target_accept for name, spec in KERNELS.items()}
_COMMON = {
    "num_warmup", "step_size", "target_accept", "adapt_mass", "metric", "thin", "init", "init_iters",
    "check_modes",
}  # fmt: skip
_OPTIONS = {"hmc": _COMMON | {"num_leapfrog", "max_leapfrog"}, "nuts": _COMMON | {"max_tree_depth"}}


def initial_points(target, num_chains: int, generator, device, init_x=None) -> torch.Tensor:
    """Starting points ``(num_chains, dim)``: ``init_x`` if given, else reference draws."""
    if init_x is None:
        return target.sample_reference(num_chains, generator, device)
    x = torch.as_tensor(init_x, dtype=target.dtype, device=device)
    if x.dim() == 1:
        x = x.expand(num_chains, -1).clone()
    if tuple(x.shape) != (num_chains, target.dim):
        raise ValueError(
            f"init must have shape ({num_chains}, {target.dim}) or ({target.dim},), got {tuple(x.shape)}"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError("init has NaN or infinite entries: starting points must be finite")
    return x


#: Reference draws tried, in batches of 256, for the starts outside the support: a constraint written
#: as -inf outside a region holding 1/8 of N(0, I) (three positive coordinates) leaves a start
#: outside with probability 7/8, and 4,096 draws all outside with about 1e-237.
SUPPORT_SEARCH = 4096


def search_support(target, x0: torch.Tensor, finite: torch.Tensor, generator, device) -> torch.Tensor:
    """The reference starts ``x0: (n, dim)`` with those where ``log_prob`` is -inf (``~finite``)
    replaced by further reference draws where it is finite, up to ``SUPPORT_SEARCH`` of them: a
    chain started outside the support never accepts a move, and its rejections drag the step size
    shared in warm-up down for all. The finite points are cycled when too few were found (the start
    phase spreads chains that start alike). ``ValueError`` when none is finite."""
    found, need = [x0[finite]], int((~finite).sum())
    for _ in range(SUPPORT_SEARCH // 256):
        if sum(len(f) for f in found[1:]) >= need:
            break
        x = target.sample_reference(256, generator, device)
        with torch.no_grad():
            found.append(x[torch.isfinite(target.log_prob(x))])
    fresh, pool = torch.cat(found[1:]) if len(found) > 1 else x0[:0], torch.cat(found)
    if len(pool) == 0:
        raise ValueError(no_support_message(SUPPORT_SEARCH + len(x0)))
    fill = fresh[:need] if len(fresh) >= need else pool[torch.arange(need, device=pool.device) % len(pool)]
    x0 = x0.clone()
    x0[~finite] = fill
    target.validate(x0)
    return x0


def _check(num_warmup, step_size, metric, init_iters, thin, num_leapfrog, max_leapfrog):
    """``ValueError`` for a bad setting, before the first evaluation of the target."""
    check_nonnegative_int(num_warmup, "num_warmup")
    if num_leapfrog is not None:
        check_positive_int(num_leapfrog, "num_leapfrog")
    check_positive_int(max_leapfrog, "max_leapfrog")
    if step_size is not None and not float(step_size) > 0:
        raise ValueError(f"step_size must be positive, got {step_size}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if isinstance(init_iters, bool) or not isinstance(init_iters, int) or init_iters < 0:
        raise ValueError(f"init_iters must be a non-negative integer, got {init_iters!r}")
    check_positive_int(thin, "thin")


def _trajectory(kernel, num_leapfrog, max_leapfrog, num_warmup, h0, num_chains):
    """HMC's leapfrog steps: fixed by ``num_leapfrog``; else a jittered length, adapted by ChEES with
    at least ``CHEES_MIN_CHAINS`` chains (from one step), set from each new metric with fewer (10
    steps until the first metric)."""
    if kernel != "hmc":
        return None
    if num_leapfrog is not None:
        return check_positive_int(num_leapfrog, "num_leapfrog")
    max_leapfrog = check_positive_int(max_leapfrog, "max_leapfrog")
    if num_warmup == 0:
        return min(10, max_leapfrog)
    h = float(h0.median())
    if num_chains >= CHEES_MIN_CHAINS:
        # ChEES climbs from one step: on a Gaussian the jittered criterion has several local maxima
        # (T = 2.25, 5.45, ... sd), and starting short finds the first, the cheapest.
        return ChEESAdaptation(h, max_leapfrog=max_leapfrog)
    return JitteredLength(10 * h, max_leapfrog=max_leapfrog)


def _first_metric(cov: torch.Tensor, metric: str):
    """Warm-up's first metric from the Laplace covariance: dense or its diagonal, by the same rule as
    the windows' estimates (the covariance is exact for a Gaussian, so no sample-noise allowance)."""
    if choose_metric(metric, cov, count=10**9) == "dense":
        return DenseMetric.from_covariance(cov)
    return cov.diagonal().clone()


def run_mcmc(
    target,
    kernel: str,
    *,
    num_samples: int,
    num_chains: int,
    generator: torch.Generator,
    progress: bool,
    device,
    num_warmup: int | None = None,
    step_size: float | None = None,
    target_accept: float | None = None,
    adapt_mass: bool = True,
    metric: str = "auto",
    num_leapfrog: int | None = None,
    max_leapfrog: int = MAX_LEAPFROG,
    max_tree_depth: int = 10,
    thin: int = 1,
    init=None,
    init_iters: int = 200,
    check_modes: bool = True,
) -> SamplerResult:
    """Run ``num_chains`` chains of ``kernel`` in one batch: start, warm-up, then ``num_samples`` draws.

    Options: ``num_warmup`` (default ``num_samples``); ``step_size`` (initial, default by the
    doubling heuristic); ``target_accept``; ``adapt_mass`` (False keeps the identity metric);
    ``metric`` ``"diag" | "dense" | "auto"``; ``num_leapfrog`` (HMC: fixes the leapfrog steps, else
    ChEES adapts the trajectory length, with at most ``max_leapfrog`` steps); ``max_tree_depth``
    (NUTS); ``thin``; ``init`` (starting points, used as given); ``init_iters`` (ascent iterations
    of the start phase, 0 to skip); ``check_modes`` (look for modes no chain visits, module notes).
    See the module docstring for the phases and defaults.
    """
    spec = KERNELS[kernel]
    num_warmup = num_samples if num_warmup is None else num_warmup
    _check(num_warmup, step_size, metric, init_iters, thin, num_leapfrog, max_leapfrog)
    check_modes = check_bool(check_modes, "check_modes")
    num_warmup = int(num_warmup)
    target_accept = (
        spec.target_accept if target_accept is None else check_probability(target_accept, "target_accept")
    )
    step = spec.step
    if kernel == "nuts":
        step = functools.partial(step, max_tree_depth=check_positive_int(max_tree_depth, "max_tree_depth"))
    lpg = target.log_prob_and_grad
    evals0 = target.num_target_evals
    x0 = initial_points(target, num_chains, generator, device, init)
    finite = target.validate(x0, require_support=init is not None)
    if init is None and not bool(finite.all()):
        x0 = search_support(target, x0, finite, generator, device)
    state = init_state(lpg, x0)
    inv_mass = None
    if init is None and num_warmup and init_iters:
        state, laplace = find_start(generator, state, lpg, max_iters=init_iters)
        if laplace is not None and adapt_mass:
            inv_mass = _first_metric(laplace, metric)
    dtype = x0.dtype
    h0 = torch.full((num_chains,), 0.1 if step_size is None else float(step_size), dtype=dtype, device=device)
    if step_size is None and num_warmup:
        h0 = initial_step_sizes(lambda h: spec.accept_prob(generator, state, lpg, h, inv_mass), h0)
    trajectory = _trajectory(kernel, num_leapfrog, max_leapfrog, num_warmup, h0, num_chains)
    if inv_mass is not None and isinstance(trajectory, JitteredLength):
        trajectory.set_from_metric(1.0)
    with progress_bar(num_warmup + num_samples * thin, f"{kernel} warm-up", progress) as bar:
        warm = windowed_warmup(
            generator, state, lpg, step=step, target_accept=target_accept, num_warmup=num_warmup,
            step_size=h0, accept_prob=lambda s, h, m: spec.accept_prob(generator, s, lpg, h, m),
            metric=metric, adapt_mass=adapt_mass, trajectory=trajectory, inv_mass=inv_mass, bar=bar,
        )  # fmt: skip
        bar.set_description(kernel)
        draws, stats = _sample(generator, warm, lpg, step, spec, trajectory, num_samples, thin, bar)
    attrs = _attrs(kernel, warm, trajectory, num_warmup, max_tree_depth)
    if check_modes:
        attrs |= _check_modes(kernel, target, draws, generator, device, target.num_target_evals - evals0)
    return SamplerResult(
        draws.transpose(0, 1), {k: v.transpose(0, 1) for k, v in stats.items()}, attrs=attrs, diagnose=True
    )


def _check_modes(kernel: str, target, draws: torch.Tensor, generator, device, run_evals: int) -> dict:
    """The check for modes that no chain visits, from reference draws
    (:func:`~diffstat.modes.check.num_check_starts`); its attrs."""
    starts = target.sample_reference(num_check_starts(run_evals), generator, device)
    return check_missed_modes(
        kernel.upper(), target, draws, None, starts, generator,
        missed_advice="The chains never visit them: a chain stays in the mode it started in, and R-hat "
        "cannot see a mode that every chain misses. Run more chains from dispersed starts (num_chains, "
        "init=), or use method='smc' or 'diffusion', which weigh the modes against each other",
        misweight_advice="The chains' shares of the modes follow where they started, not the modes' "
        "masses: chains do not move between separated modes. Use method='smc' or 'diffusion' for the "
        "weights of the modes",
    )  # fmt: skip


def _attrs(kernel, warm, trajectory, num_warmup, max_tree_depth) -> dict:
    """The settings warm-up chose, for ``posterior.attrs``."""
    attrs = {
        "num_warmup": num_warmup,
        "metric": warm.metric,
        "step_size": float(warm.step_size),
        "chain_step_sizes": warm.chain_step_sizes.tolist(),  # one conversion, not a float() per chain
    }
    if kernel == "hmc":
        if isinstance(trajectory, int):
            attrs["num_leapfrog"] = trajectory
        else:
            attrs["trajectory_length"] = warm.length
    if kernel == "nuts":
        attrs["max_tree_depth"] = int(max_tree_depth)
    return attrs


def _sample(generator, warm, lpg, step, spec, trajectory, num_samples, thin, bar):
    """The sampling phase: ``num_samples * thin`` steps with the warm-up's settings, every
    ``thin``-th kept in buffers allocated once: ``draws: (num_samples, n, dim)`` and the per-draw
    statistics ``(num_samples, n)`` (the step size, constant here, is written once)."""
    state, h, inv_mass = warm.state, warm.step_size, warm.inv_mass
    n, dim = state.x.shape
    like = {"dtype": state.x.dtype, "device": state.x.device}
    draws = torch.empty(num_samples, n, dim, **like)
    recorded = {"lp": None, "acceptance_rate": "acceptance_rate", "diverging": "diverging", **spec.stats}
    stats = {key: torch.empty(num_samples, n, **like) for key in ("lp", "acceptance_rate", "step_size")}
    stats["diverging"] = torch.empty(num_samples, n, dtype=torch.bool, device=like["device"])
    stats.update({key: torch.empty(num_samples, n, **like) for key in spec.stats})
    stats["step_size"].fill_(h)
    kw = {"num_steps": trajectory} if isinstance(trajectory, int) else {}
    jittered = isinstance(trajectory, JitteredLength)
    fixed = spec.with_fixed(step, h, inv_mass, state.x)
    for i in range(num_samples * thin):
        if jittered:
            kw["num_steps"] = trajectory.num_steps(generator, h.expand(n), warm.length)
        state, info = fixed(generator, state, lpg, **kw)
        if (i + 1) % thin == 0:
            j = i // thin
            draws[j] = state.x
            for key, name in recorded.items():
                stats[key][j] = state.log_prob if name is None else getattr(info, name)
        bar.update()
    return draws, stats


def _register(kernel: str):
    def sampler(target, *, num_samples, num_chains, generator, progress, device, **options):
        check_options(options, _OPTIONS.get(kernel, _COMMON), kernel)
        return run_mcmc(
            target,
            kernel,
            num_samples=num_samples,
            num_chains=4 if num_chains is None else num_chains,
            generator=generator,
            progress=progress,
            device=device,
            **options,
        )

    sampler.__name__ = f"{kernel}_sampler"
    sampler.__doc__ = (
        f"``ds.sample(target, {kernel!r}, ...)``: batched {kernel.upper()} chains (default 4): start "
        "phase, Stan's windowed warm-up, sampling; options "
        f"{', '.join(sorted(_OPTIONS.get(kernel, _COMMON)))} (see :func:`run_mcmc`)."
    )
    register_sampler(kernel, typed_by=run_mcmc)(sampler)


for _kernel in KERNELS:
    _register(_kernel)
