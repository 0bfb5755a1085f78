r"""The set-up of a walk-jump run (:mod:`diffstat.smoothing.walk_jump`): its options validated before
any work, the smoothed score resolved (and a learned one checked), the walk's noise, the starting
walkers and the walk on :math:`q_\sigma`.

The walk's noise (:func:`walk_sigma`, :func:`kernel_noise`): 1 unless given (the public code's
default). From ``kernel_sigma`` on a learned score is the kernel estimate of its kept particles, the
exact smoothed law of the particles with their mode weights; below it the network serves. When the
network failed its own check (held-out relative Fisher divergence at small noise above 0.1, the fit's
threshold) and ``kernel_sigma`` is above 1, the walk at 1 is checked: its walkers start at draws of
:math:`q_1` (particles plus noise), which a walk on the right score keeps, so a walk that moves the law
of their whitened radii by a Kolmogorov-Smirnov distance above 0.1 (and beyond noise) follows a wrong
score, and the walk is run again at ``kernel_sigma`` (no target evaluation: the walk only uses the
score), with a warning that the draws are then as good as the particles. On funnel(10) the network's
pull toward the axis at :math:`\sigma = 1` was a sixth to a fortieth of the true one, the walk moved
the radii by 0.69 to 0.78 (mean :math:`|x_i|` two to four times the exact) while a walk on the exact
smoothed score kept them; on many_well(32), a failed check too, the walk moved them by 0.05 and the
kernel's larger noise (2.7) made the draws worse, so a drift that small is left to the network and the
correction (docs/sms.md, ``benchmarks/bench_walk_jump_funnel.py``).
"""

from __future__ import annotations

import math
import warnings

import torch

from diffstat._util import check_positive_int
from diffstat.smoothing.fit import MAX_FISHER, learned_score_report, worded_for
from diffstat.smoothing.learned import LearnedSmoothedScore
from diffstat.smoothing.scores import resolve_smoothed_score
from diffstat.smoothing.walks import Walk, mala_walk, ula_walk, underdamped_walk

__all__ = [
    "check_options", "resolve_provider", "walk_sigma", "spread_drift", "kernel_noise", "in_chains",
    "jump_schedule", "initial_walkers", "make_walk",
]  # fmt: skip

#: The walk's noise unless given or raised (:func:`walk_sigma`): the public code's.
DEFAULT_SIGMA = 1.0

#: A walk that moved the law of its walkers' radii by more than this Kolmogorov-Smirnov distance (and
#: beyond noise, :func:`spread_drift`) does not keep their law: it displaced a tenth of them or more,
#: the share at which walk-jump calls a run unreliable (``walk_jump_checks``). A smaller drift is left to
#: the network: on many_well(32), 0.05, the kernel's larger noise made the draws worse (docs/sms.md).
MAX_SPREAD_DRIFT = 0.1


def check_options(
    target, shape, device, sigma, walk, smoothed_log_prob, thin, num_warmup, step_size, friction, init_x
):
    """Validated ``(sigma, walk, thin, num_warmup, init)``, before any work (a learned default would fit
    a score first); ``shape`` is ``(num_chains, num_samples, walkers_per_chain or None)``; ``num_warmup``
    and ``sigma`` None stay None (their defaults depend on the walkers per chain and on the score)."""
    num_chains, num_samples, walkers = shape
    if walkers is not None:
        walkers = check_positive_int(walkers, "walkers_per_chain")
    sigma = None if sigma is None else float(sigma)
    if sigma is not None and not 0 < sigma < math.inf:
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


def walk_sigma(sigma, provider, score_attrs: dict, init_x) -> tuple[float, str]:
    """The walk's noise and its rule (module doc): ``(sigma, "given")``; ``(1.0, "check")`` for a learned
    score whose network failed its check (``score_attrs["score_fisher_divergence"]`` above 0.1 or unknown)
    and whose ``kernel_sigma`` is above :data:`DEFAULT_SIGMA`, walkers started from its particles (no
    ``init``): the walk at 1 is then held to :func:`kernel_noise`; else ``(1.0, "default")``."""
    if sigma is not None:
        return sigma, "given"
    kernel = provider.kernel_sigma if isinstance(provider, LearnedSmoothedScore) else None
    fisher = score_attrs.get("score_fisher_divergence", math.nan)
    if kernel is None or not kernel > DEFAULT_SIGMA or fisher <= MAX_FISHER or init_x is not None:
        return DEFAULT_SIGMA, "default"
    return DEFAULT_SIGMA, "check" if "x" in provider.particles else "default"


def spread_drift(start: torch.Tensor, walkers: torch.Tensor) -> tuple[float, float]:
    r"""How far the walkers' spread moved from their start: the two-sample Kolmogorov-Smirnov distance
    :math:`D` between the radii :math:`\lVert (y - \bar y_0)/s_0\rVert` of the ``start`` walkers ``(n, d)``
    and of the walked ones (any shape ending in ``d``), :math:`\bar y_0, s_0` the start's mean and sd per
    coordinate, and its noise level :math:`1.95\sqrt{(n+m)/(nm)}`, exceeded with probability 1e-3 by
    independent samples of one law (the walked walkers are the start's own, positively correlated with
    it, which only lowers :math:`D`). Returns ``(D, noise level)``."""
    walkers = walkers.reshape(-1, start.shape[-1])
    center, scale = start.mean(0), start.std(0).clamp_min(torch.finfo(start.dtype).tiny)
    a, b = (((z - center) / scale).norm(dim=-1).double().cpu() for z in (start, walkers))
    a, b = a[torch.isfinite(a)].sort().values, b[torch.isfinite(b)].sort().values
    if a.numel() < 2 or b.numel() < 2:
        return math.inf, 0.0
    both = torch.cat([a, b])
    fa = torch.searchsorted(a, both, right=True).double() / a.numel()
    fb = torch.searchsorted(b, both, right=True).double() / b.numel()
    n, m = a.numel(), b.numel()
    return float((fa - fb).abs().max()), 1.95 * math.sqrt((n + m) / (n * m))


def kernel_noise(
    provider, score_attrs: dict, start: torch.Tensor, walkers: torch.Tensor
) -> tuple[float, str]:
    """After a walk at 1 under the rule ``"check"`` (:func:`walk_sigma`): ``(kernel_sigma, "kernel")``, with
    a ``RuntimeWarning``, when the walkers' spread moved beyond :data:`MAX_SPREAD_DRIFT` and beyond noise
    (:func:`spread_drift` from their ``start``, draws of :math:`q_1` when the particles are the target's);
    else ``(1.0, "checked")``. The distance goes into ``score_attrs`` as ``walk_spread_drift``."""
    drift, noise = spread_drift(start, walkers)
    score_attrs["walk_spread_drift"] = drift
    if not drift > max(MAX_SPREAD_DRIFT, noise):
        return DEFAULT_SIGMA, "checked"
    kernel = float(provider.kernel_sigma)
    warnings.warn(
        f"walk-jump: the learned score's network is far from the target's score at small noise (held-out "
        f"relative Fisher divergence {score_attrs['score_fisher_divergence']:.3g} > {MAX_FISHER}) and its "
        f"walk at sigma = {DEFAULT_SIGMA:g} moved the walkers' spread away from their start (Kolmogorov-"
        f"Smirnov distance {drift:.3g} > {MAX_SPREAD_DRIFT:g}), so the walk ran again at sigma = "
        f"{kernel:.3g}, where the score is the kernel estimate of its kept particles: the draws are as good "
        "as those particles (the population), no better. Pass sigma= to choose it, or refit the score with "
        "more work.",
        RuntimeWarning,
        stacklevel=4,
    )
    return kernel, "kernel"


def in_chains(run, num_chains: int, walkers: int, num_samples: int):
    """The per-walker jumps ``(num_chains * W, J, ...)`` of ``run`` (its ``draws``, ``walkers``,
    ``acceptance``, ``suspect``) as chains ``(num_chains, min(J W, num_samples), ...)``: draw ``j`` of a
    chain is jump ``j // W`` of its walker ``j % W``."""

    def arrange(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(num_chains, walkers, *t.shape[1:]).transpose(1, 2)
        return t.reshape(num_chains, -1, *t.shape[3:])[:, :num_samples]

    fields = ("draws", "walkers", "acceptance", "suspect")
    return run._replace(**{k: arrange(getattr(run, k)) for k in fields})


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
