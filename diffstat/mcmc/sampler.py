"""MCMC samplers behind ``ds.sample``: ``"mala"``, ``"hmc"`` and ``"rwm"``, with warm-up
adaptation of the step size (dual averaging) and of a diagonal mass matrix."""

from __future__ import annotations

import functools

import torch

from diffstat._util import check_options, check_positive_int, check_probability, progress_bar
from diffstat.mcmc.adaptation import DualAveraging, WelfordVariance, warmup_windows
from diffstat.mcmc.base import init as init_state
from diffstat.mcmc.hmc import hmc_step
from diffstat.mcmc.mala import MALA_TARGET_ACCEPT, mala_step
from diffstat.mcmc.rwm import rwm_step
from diffstat.sampling import SamplerResult, register_sampler

__all__ = ["TARGET_ACCEPT", "run_mcmc", "initial_points", "find_reasonable_step_size"]

_OPTIONS = {"num_warmup", "step_size", "target_accept", "adapt_mass", "num_leapfrog", "thin", "init"}
_KERNELS = {"mala": mala_step, "hmc": hmc_step, "rwm": rwm_step}
#: Target acceptance rates: optimal scaling results for MALA (0.574, Roberts and Rosenthal 1998)
#: and random walk (0.234), and Stan's default for HMC (0.8).
TARGET_ACCEPT = {"mala": MALA_TARGET_ACCEPT, "hmc": 0.8, "rwm": 0.234}


def initial_points(target, num_chains: int, generator, device, init_x=None) -> torch.Tensor:
    """Starting points ``(num_chains, dim)``: ``init_x`` if given, else reference draws."""
    if init_x is None:
        return target.sample_reference(num_chains, generator, device)
    x = torch.as_tensor(init_x, dtype=target.dtype, device=device)
    if x.dim() == 1:
        x = x.expand(num_chains, -1).clone()
    if tuple(x.shape) != (num_chains, target.dim):
        raise ValueError(f"init must have shape ({num_chains}, {target.dim}) or ({target.dim},), got {tuple(x.shape)}")
    return x


def find_reasonable_step_size(step, generator, state, log_prob_and_grad, inv_mass, h0=0.1, target=0.5):
    """Double or halve ``h0`` until the mean acceptance crosses ``target`` (Hoffman and Gelman's
    heuristic, averaged over chains); at most 40 trial steps, which do not move the chains."""
    h = h0
    _, info = step(generator, state, log_prob_and_grad, h, inv_mass)
    direction = 1.0 if float(info.acceptance_rate.mean()) > target else -1.0
    for _ in range(40):
        h_new = h * 2.0**direction
        _, info = step(generator, state, log_prob_and_grad, h_new, inv_mass)
        acc = float(info.acceptance_rate.mean())
        if (direction > 0 and acc < target) or (direction < 0 and acc > target):
            return h_new if direction < 0 else h
        h = h_new
    return h


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
    num_leapfrog: int = 10,
    thin: int = 1,
    init=None,
) -> SamplerResult:
    """Run ``num_chains`` chains of ``kernel`` in one batch: warm-up then ``num_samples`` draws.

    Warm-up adapts one step size shared by all chains by dual averaging on the mean acceptance
    probability, and a diagonal inverse mass matrix (the pooled variance of the chains' warm-up
    draws, see :func:`~diffstat.mcmc.adaptation.warmup_windows`).
    """
    num_warmup = num_samples if num_warmup is None else int(num_warmup)
    if num_warmup < 0:
        raise ValueError(f"num_warmup must be non-negative, got {num_warmup}")
    thin = check_positive_int(thin, "thin")
    num_leapfrog = check_positive_int(num_leapfrog, "num_leapfrog")
    target_accept = TARGET_ACCEPT[kernel] if target_accept is None else check_probability(target_accept, "target_accept")
    step = _KERNELS[kernel]
    if kernel == "hmc":
        step = functools.partial(hmc_step, num_steps=num_leapfrog)
    log_prob_and_grad = target.log_prob_and_grad

    x0 = initial_points(target, num_chains, generator, device, init)
    target.validate(x0)
    state = init_state(log_prob_and_grad, x0)
    inv_mass = None
    if step_size is None:
        h = find_reasonable_step_size(step, generator, state, log_prob_and_grad, inv_mass) if num_warmup else 0.1
    else:
        h = float(step_size)
        if not h > 0:
            raise ValueError(f"step_size must be positive, got {step_size}")
    dtype = x0.dtype
    adapt = DualAveraging(torch.tensor(h, dtype=dtype, device=device), target_accept)
    windows = warmup_windows(num_warmup) if adapt_mass else []
    welford = WelfordVariance(target.dim, device=device)
    window_start = int(0.15 * num_warmup)

    n_keep = num_samples
    draws = torch.empty(n_keep, num_chains, target.dim, dtype=dtype, device=device)
    stats = {
        key: torch.empty(n_keep, num_chains, dtype=dt, device=device)
        for key, dt in [("lp", dtype), ("acceptance_rate", dtype), ("diverging", torch.bool), ("step_size", dtype)]
    }
    h_t = adapt.step_size
    with progress_bar(num_warmup + num_samples * thin, f"{kernel} warm-up", progress) as bar:
        for i in range(num_warmup):
            state, info = step(generator, state, log_prob_and_grad, h_t, inv_mass)
            h_t = adapt.update(info.acceptance_rate.mean())
            if adapt_mass and i >= window_start:
                welford.update(state.x)
            if i + 1 in windows:
                inv_mass = welford.variance().to(dtype)
                welford = WelfordVariance(target.dim, device=device)
                adapt.restart(adapt.final_step_size)
                h_t = adapt.step_size
            bar.update()
        h_final = adapt.final_step_size if num_warmup else adapt.step_size
        bar.set_description(kernel)
        for i in range(num_samples * thin):
            state, info = step(generator, state, log_prob_and_grad, h_final, inv_mass)
            if (i + 1) % thin == 0:
                j = i // thin
                draws[j] = state.x
                stats["lp"][j] = state.log_prob
                stats["acceptance_rate"][j] = info.acceptance_rate
                stats["diverging"][j] = info.diverging
                stats["step_size"][j] = h_final
            bar.update()
    sample_stats = {k: v.transpose(0, 1) for k, v in stats.items()}
    attrs = {"num_warmup": num_warmup}
    if kernel == "hmc":
        attrs["num_leapfrog"] = num_leapfrog
    return SamplerResult(draws.transpose(0, 1), sample_stats, attrs=attrs, diagnose=True)


def _register(kernel: str):
    def sampler(target, *, num_samples, num_chains, generator, progress, device, **options):
        options.pop("reference", None)  # MCMC starts from the reference but needs no tempering path
        check_options(options, _OPTIONS, kernel)
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
        f"``ds.sample(target, {kernel!r}, ...)``: batched {kernel.upper()} chains (default 4) with "
        "warm-up adaptation; options of :func:`run_mcmc` (num_warmup, step_size, target_accept, "
        "adapt_mass, num_leapfrog, thin, init)."
    )
    register_sampler(kernel)(sampler)


for _kernel in _KERNELS:
    _register(_kernel)
