r"""The ``"nuts"`` population source (:mod:`~diffstat.smoothing.populations`): particles of the target
from NUTS chains of :mod:`diffstat.mcmc`, with the target's gradients there.

:func:`mcmc_population`: ``num_chains`` NUTS chains (the kernel and Stan's windowed warm-up of step
size and metric, the phases of :func:`~diffstat.mcmc.sampler.run_mcmc`), then every ``thin``-th
state with the gradient NUTS computed there (no further evaluation), until ``num_particles`` are
kept or the budget is spent. The chains start at the target's reference draws (or given points)
without the runner's gradient-ascent start: on funnel(10) that ascent climbs into the neck (chains
at :math:`x_1 \approx -31`, step size 5e-6, 7.0M evaluations for 4,096 draws).

Defaults and why: 64 chains (many short chains, so that the particles are not a few chains'
correlated paths, and each chain's share of warm-up is small); 300 warm-up iterations (Stan's
schedule of a 75-iteration buffer, adaptation windows and a 50-iteration buffer still fits);
``thin`` 2 (consecutive NUTS states are correlated; 18% more iterations at 64 chains and 4,096
particles); target acceptance 0.9, above NUTS's 0.8 (Stan's remedy for divergences: this source
serves targets whose neck or heavy tail the importance sampling missed, where the smaller steps reach
further: on funnel(10), seed 0, sd of :math:`x_1` 2.98 and 1% quantile -5.8 for 3 and -7.0, against
2.49 and -4.3 at 0.8, for 2.3 times the chains' evaluations; docs/sms.md); tree depth 10 (NUTS's);
a budget of :data:`BUDGET_PER_PARTICLE` evaluations per particle.

Equally weighted: a chain stays in the mode it starts in, so an MCMC population does not carry
mode weights across separated modes (its shares follow the starts), which is why ``"modes"`` stays
the default where its importance sampling succeeds. The chains are also that source's fallback
(:func:`~diffstat.smoothing.populations.modes_population`, started at its particles).
"""

from __future__ import annotations

import functools
import math
import warnings

import torch

from diffstat._util import check_nonnegative_int, check_positive_int, check_probability
from diffstat.mcmc.base import init as init_chain
from diffstat.smoothing.populations import FitWarning, Population

__all__ = ["BUDGET_PER_PARTICLE", "mcmc_population"]

#: The NUTS population's default budget, target evaluations per particle: funnel(10) spent 180 to 250
#: (docs/sms.md); at 1,000 a fit of 4,096 particles spends at most 4.1M, 4,096 per draw of a 1,000-draw
#: run, within issue 17's limit of 1e4 per draw with the training.
BUDGET_PER_PARTICLE = 1000


def mcmc_population(
    target,
    num_particles: int,
    generator: torch.Generator,
    device=None,
    *,
    num_chains: int = 64,
    num_warmup: int = 300,
    thin: int = 2,
    budget: int | None = None,
    target_accept: float = 0.9,
    max_tree_depth: int = 10,
    init: torch.Tensor | None = None,
) -> Population:
    """``num_chains`` NUTS chains of :mod:`diffstat.mcmc` (module doc: start, Stan's windowed warm-up of
    ``num_warmup`` iterations, then every ``thin``-th state until ``num_particles`` are kept), with the
    gradients NUTS computed at the kept states; ``budget`` caps the target evaluations (the sampling
    stops once spent, keeping the particles so far, with a :class:`FitWarning`; default
    :data:`BUDGET_PER_PARTICLE` per particle, for 64 particles a chain at least: warm-up's cost does
    not shrink with the particles). ``init``: starting points (rows drawn at random), else the
    target's reference draws. Raises ``ValueError`` for a bad setting."""
    num_particles = check_positive_int(num_particles, "num_particles")
    num_chains, thin = check_positive_int(num_chains, "num_chains"), check_positive_int(thin, "thin")
    num_warmup = check_nonnegative_int(num_warmup, "num_warmup")
    if budget is None:  # warm-up costs the same for few particles: 64 per chain at least
        budget = BUDGET_PER_PARTICLE * max(num_particles, 64 * num_chains)
    budget = check_positive_int(budget, "budget")
    evals0 = target.num_target_evals
    state, fixed = _nuts_warmup(
        target, num_chains, generator, device, num_warmup, target_accept, max_tree_depth, init
    )
    per_chain = math.ceil(num_particles / num_chains)
    kept: list = []
    divergent = transitions = 0
    for i in range(per_chain * thin):
        if target.num_target_evals - evals0 >= budget:
            break
        state, info = fixed(generator, state, target.log_prob_and_grad)
        divergent, transitions = divergent + int(info.diverging.sum()), transitions + num_chains
        if (i + 1) % thin == 0:
            kept.append(state)
    if not kept:
        raise ValueError(
            f"population='nuts': the budget of {budget} evaluations was spent in warm-up; raise 'budget'"
        )
    x, g, lp = (
        torch.stack([getattr(s, k) for s in kept], 1).flatten(0, 1) for k in ("x", "grad", "log_prob")
    )
    x, g, lp = x[:num_particles].detach(), g[:num_particles].detach(), lp[:num_particles].detach()
    evals = target.num_target_evals - evals0
    if len(kept) < per_chain:
        problem = (
            f"(population='nuts') spent its budget of {budget} evaluations: "
            f"{x.shape[0]} particles of {num_particles}"
        )
        warnings.warn(
            FitWarning(
                "the population that trains the smoothed score", problem, dict(budget=2 * budget), True
            ),
            stacklevel=2,
        )
    return Population(x, g, lp, evals, "nuts", 0, divergent, transitions)


def _nuts_warmup(target, num_chains, generator, device, num_warmup, target_accept, max_tree_depth, init):
    """The start and warm-up phases of :func:`diffstat.mcmc.sampler.run_mcmc` for NUTS, from
    ``init`` or reference draws without the start phase's ascent (module doc); returns the warmed-up
    state and the sampling phase's step (fixed step size and metric)."""
    from diffstat.mcmc.sampler import KERNELS
    from diffstat.mcmc.start import initial_step_sizes
    from diffstat.mcmc.warmup import windowed_warmup

    spec = KERNELS["nuts"]
    accept = check_probability(target_accept, "target_accept")
    step = functools.partial(spec.step, max_tree_depth=check_positive_int(max_tree_depth, "max_tree_depth"))
    if init is None:
        x0 = target.sample_reference(num_chains, generator, device)
    else:
        init = torch.as_tensor(init)
        if init.dim() != 2 or init.shape[1] != target.dim or init.shape[0] == 0:
            raise ValueError(f"init must have shape (n, {target.dim}), got {tuple(init.shape)}")
        init = init[torch.isfinite(init).all(-1)]
        if init.shape[0] == 0:
            raise ValueError("init has no finite row to start a chain from")
        rows = torch.randint(0, init.shape[0], (num_chains,), generator=generator, device=generator.device)
        x0 = init[rows.to(init.device)].to(device=device, dtype=target.dtype)
    lpg = target.log_prob_and_grad
    state = init_chain(lpg, x0)
    h0 = torch.full((num_chains,), 0.1, dtype=x0.dtype, device=x0.device)
    if num_warmup:
        h0 = initial_step_sizes(lambda h: spec.accept_prob(generator, state, lpg, h, None), h0)
    warm = windowed_warmup(
        generator, state, lpg, step=step, target_accept=accept, num_warmup=num_warmup, step_size=h0,
        accept_prob=lambda s, h, m: spec.accept_prob(generator, s, lpg, h, m),
    )  # fmt: skip
    return warm.state, spec.with_fixed(step, warm.step_size, warm.inv_mass, warm.state.x)
