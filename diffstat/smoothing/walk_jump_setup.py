r"""The set-up of a walk-jump run (:mod:`diffstat.smoothing.walk_jump`): its options validated before
any work, the smoothed score resolved (and a learned one checked), the starting walkers and the walk
on :math:`q_\sigma`."""

from __future__ import annotations

import math

import torch

from diffstat._util import check_positive_int
from diffstat.smoothing.fit import learned_score_report, worded_for
from diffstat.smoothing.learned import LearnedSmoothedScore
from diffstat.smoothing.scores import resolve_smoothed_score
from diffstat.smoothing.walks import Walk, mala_walk, ula_walk, underdamped_walk

__all__ = ["check_options", "resolve_provider", "jump_schedule", "initial_walkers", "make_walk"]


def check_options(
    target, shape, device, sigma, walk, smoothed_log_prob, thin, num_warmup, step_size, friction, init_x
):
    """Validated ``(sigma, walk, thin, num_warmup, init)``, before any work (a learned default would fit
    a score first); ``shape`` is ``(num_chains, num_samples, walkers_per_chain or None)``; ``num_warmup``
    None stays None (its default depends on the walkers per chain)."""
    num_chains, num_samples, walkers = shape
    if walkers is not None:
        walkers = check_positive_int(walkers, "walkers_per_chain")
    sigma = float(sigma)
    if not 0 < sigma < math.inf:
        raise ValueError(f"sigma must be positive and finite, got {sigma}")
    walk = ("mala" if smoothed_log_prob is not None else "underdamped") if walk is None else walk
    if walk not in ("underdamped", "ula", "mala"):
        raise ValueError(f"walk must be 'underdamped', 'ula' or 'mala', got {walk!r}")
    if walk == "mala" and smoothed_log_prob is None:
        raise ValueError("walk='mala' needs smoothed_log_prob=(y, sigma) -> log q_sigma(y) + const")
    thin = check_positive_int(thin, "thin")
    num_warmup = None if num_warmup is None else int(num_warmup)
    if (num_warmup is not None and num_warmup < 0) or step_size <= 0 or friction <= 0:
        raise ValueError("num_warmup must be non-negative, step_size and friction positive")
    d = target.dim
    if init_x is not None:
        init_x = torch.as_tensor(init_x, dtype=target.dtype, device=device)
        init_x = init_x.expand(num_chains, d).clone() if tuple(init_x.shape) == (d,) else init_x
        if tuple(init_x.shape) != (num_chains, d):
            raise ValueError(f"init must have shape ({num_chains}, {d}) or ({d},), got {tuple(init_x.shape)}")
        if not bool(torch.isfinite(init_x).all()):
            raise ValueError("init has NaN or infinite entries: starting walkers must be finite")
    return sigma, walk, thin, num_warmup, init_x


def resolve_provider(target, smoothed_score, estimator, estimator_options, walk, generator):
    """The smoothed score (None for a Metropolis walk without one: it jumps with the gradient of
    ``smoothed_log_prob``), and for a learned one :func:`~diffstat.smoothing.fit.learned_score_report`'s
    ``(attrs, rejected)``."""
    if walk == "mala" and smoothed_score is None:
        return None, {}, False
    options = dict(estimator_options or {})
    if smoothed_score is None and estimator == "laplace":
        # the walk does not settle as SMS's shrinking noise does: never drop to one start
        options.setdefault("cheap_fraction", 0.0)
    evals0 = target.num_target_evals
    with worded_for("walk_jump"):
        provider = resolve_smoothed_score(
            target, smoothed_score, estimator=estimator, generator=generator, **options
        )
    provider.reset()
    if not isinstance(provider, LearnedSmoothedScore):
        return provider, {}, False
    fitted = target.num_target_evals - evals0 if smoothed_score is None else None
    return provider, *learned_score_report(provider, target, fitted)


def initial_walkers(target, provider, init_x, shape, sigma, generator, device) -> torch.Tensor:
    r"""``(num_chains * W, d)`` walkers for ``shape = (num_chains, W)``, chain by chain: ``init`` as given
    (each chain's row repeated for its ``W`` walkers); else a learned score's kept particles (with
    replacement) or reference draws, plus :math:`\sigma` noise: draws of :math:`q_\sigma`."""
    num_chains, walkers = shape
    if init_x is not None:
        return init_x.repeat_interleave(walkers, 0)
    num_chains = num_chains * walkers
    dtype = target.dtype
    if isinstance(provider, LearnedSmoothedScore) and "x" in provider.particles:
        pool = provider.particles["x"]
        idx = torch.randint(0, pool.shape[0], (num_chains,), generator=generator, device=generator.device)
        y = pool[idx.cpu()].to(device=device, dtype=dtype)
    else:
        y = target.sample_reference(num_chains, generator, device)
        target.validate(y[:16])  # a log-density that is -inf (or bad) everywhere is refused before any work
    return y + sigma * torch.randn(y.shape, generator=generator, dtype=dtype, device=y.device)


def make_walk(walk, provider, smoothed_log_prob, sigma, step_size, friction, num_warmup) -> Walk:
    r"""The walk on :math:`q_\sigma`, in units of sigma (module doc); MALA starts at
    :math:`0.25\sigma^2` and adapts over warm-up."""
    if walk == "underdamped":
        return underdamped_walk(lambda z: provider(z, sigma), step_size * sigma, friction / sigma, True)
    if walk == "ula":
        return ula_walk(lambda z: provider(z, sigma), step_size * 0.1 * sigma**2, True)

    def log_prob_and_grad(y):
        with torch.enable_grad():
            yg = y.detach().requires_grad_(True)
            lq = smoothed_log_prob(yg, sigma)
            (g,) = torch.autograd.grad(lq.sum(), yg)
        return lq.detach(), g.detach()

    return mala_walk(log_prob_and_grad, 0.25 * sigma**2, num_warmup)


def jump_schedule(num_samples: int, walkers, num_warmup, learned: bool, init_x) -> tuple:
    """``(walkers_per_chain, jumps per walker, num_warmup)`` with the defaults of
    :func:`~diffstat.smoothing.walk_jump.walk_jump`: one jump per walker with a learned score and no
    ``init`` (else one walker per chain); warm-up ``max(jumps, 100)``."""
    if walkers is None:
        walkers = num_samples if learned and init_x is None else 1
    num_jumps = -(-num_samples // walkers)
    return walkers, num_jumps, max(num_jumps, 100) if num_warmup is None else num_warmup
