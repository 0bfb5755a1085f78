r"""Fit a smoothed score from the log-density alone: ``ds.smoothing.fit_smoothed_score(target, ...)``.

Algorithm:

1. **Population**: ``num_particles`` equally weighted particles of :math:`p` with the target's
   score at each, from a pluggable source (:mod:`diffstat.smoothing.populations`; default
   ``"modes"``, per-mode Gaussian importance sampling, which keeps mode weights where tempering
   loses them, and NUTS chains in its place where its importance weights are not trusted).
2. **Hold out** ``held_out`` of them (with their scores and log-densities) for the checks.
3. **Whiten** isotropically, :math:`u = (x - m)/c`, :math:`c^2` the mean variance per coordinate,
   :math:`\nabla_u \log p = c\,\nabla_x\log p` (isotropic so that the smoothing noise stays
   isotropic in the network's coordinates).
4. **Train** a noise-conditional :class:`~diffstat.diffusion.networks.ScoreMLP` on a VE process
   :math:`Y = X + \sigma Z` (:math:`\sigma` log-uniform on ``[sigma_min, sigma_max]``) with the
   mixed TSM/DSM loss (:func:`~diffstat.diffusion.losses.mixed_loss`): regress on
   :math:`(1-w)\nabla\log p(x) - w (y - x)/\sigma^2`, :math:`w = \sigma^2/(1+\sigma^2)`; both terms
   have conditional mean :math:`\nabla\log q_\sigma(y)` (TSM: :math:`\mathbb E[\nabla\log p(X)\mid
   y]`; DSM), TSM has low variance as :math:`\sigma \to 0` and DSM at large :math:`\sigma`. The
   gradients are those the population sampler already computed.
5. **Kernel above a noise threshold**: from the smallest noise at which the kernel weights of noisy
   held-out points over the kept particles have a median ESS of 64 (:func:`kernel_threshold`), the
   score is the exact smoothed score of the kept particles' empirical law (a gradient field whose
   modes carry the particles' masses), not the network: in 32-d the network's denoiser was 17 to 25%
   off there and shifted the mode weights (docs/sms.md).
6. **Check** on the held-out particles (:meth:`~diffstat.smoothing.learned.LearnedSmoothedScore.check`):
   relative Fisher divergence at the smallest noise against the true score smoothed to that noise,
   in the frame whitened by the particles' Fisher information
   (:func:`~diffstat.smoothing.fisher_check.relative_fisher`: scale-free, so a 1:100 ridge is judged
   like a round target); a ``RuntimeWarning`` above ``max_fisher``.

Defaults: ``sigma_min`` = 0.01 (in units of :math:`c`; also the check's noise: a direction narrower
than it, as on a 1:100 ridge, is smoothed in the check's reference, not judged against the unsmoothed
score); ``sigma_max`` twice the largest distance between particles (99% quantile over
pairs), beyond which the modes are one blob and the smoothed moment Gaussian takes over; a network
of width 128 and depth 3 trained for 2,000 Adam steps on batches of 512 (cosine learning rate from
2e-3), a few seconds of CPU at d = 64 and negligible next to the population's evaluations.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from typing import NamedTuple

import torch

from diffstat._util import check_positive_int
from diffstat.smoothing.geometry import particle_geometry
from diffstat.smoothing.learned import LearnedSmoothedScore
from diffstat.smoothing.populations import FitWarning, get_population

__all__ = ["fit_smoothed_score", "particle_geometry", "worded_for"]

#: A held-out relative Fisher divergence above this is warned about (the learned score is off by
#: more than a third of the true score's size at small noise, per dimension in the whitened frame).
MAX_FISHER = 0.1


#: The kernel estimate of the kept particles replaces the network from the smallest noise at which the
#: kernel weights of held-out noisy points have a median effective sample size of at least this.
_KERNEL_ESS = 64


def kernel_threshold(
    x: torch.Tensor,
    held: torch.Tensor,
    generator: torch.Generator,
    scale: float,
    sigma_max: float,
    min_ess: float = _KERNEL_ESS,
) -> float | None:
    r"""The smallest noise (geometric grid from ``0.01 scale`` to ``sigma_max``) at which the kernel
    weights :math:`v_i \propto e^{-\lVert y - x_i\rVert^2/(2\sigma^2)}` of ``y = held + sigma z`` over the
    particles ``x`` have a median Kish ESS of ``min_ess`` or more; None if none."""
    grid = torch.logspace(math.log10(0.01 * scale), math.log10(sigma_max), 40, dtype=torch.float64)
    h = held[:256].double()
    xs = x.double()
    for s in grid.tolist():
        y = h + s * torch.randn(h.shape, generator=generator, dtype=h.dtype, device=generator.device).to(h)
        logit = (y @ xs.T - 0.5 * (xs**2).sum(-1)) / s**2
        v = torch.softmax(logit, -1)
        if float((1.0 / (v**2).sum(-1)).median()) >= min_ess:
            return s
    return None


def _train(
    model,
    process,
    u,
    gu,
    generator,
    num_steps: int,
    batch_size: int,
    lr: float,
    num_reference: int,
    loss: str,
):
    r"""Adam (cosine learning rate, EMA of the weights at rate 0.999 after a warm-up) on the stable-target
    (``loss="stf"``) or plain mixed TSM/DSM loss, weighted by :math:`\lambda = 1 + \sigma^2`: the
    preconditioned network's output error then counts alike at every noise level (with weight 1 the
    large-noise errors, which decide the mode weights, are discounted by :math:`1/\sigma^2`; measured
    on the 8-d two-mode target: denoiser error 50% of the exact correction at the diameter noise)."""
    import copy

    from diffstat.diffusion.losses import mixed_loss, stf_loss

    def weighting(t):
        return 1.0 + process.sigma(t) ** 2

    ema = copy.deepcopy(model)
    for p in ema.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    n = u.shape[0]
    batch_size = min(batch_size, n)
    for step in range(1, num_steps + 1):
        for group in optimizer.param_groups:  # cosine decay to a tenth
            group["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - 1) / max(num_steps - 1, 1))))
        idx = torch.randint(0, n, (batch_size,), generator=generator, device=generator.device).to(u.device)
        if loss == "stf":
            ref = torch.randint(
                0, n, (min(num_reference, n),), generator=generator, device=generator.device
            ).to(u.device)
            value = stf_loss(model, process, u[idx], gu[idx], generator, u[ref], gu[ref], weighting=weighting)
        else:
            value = mixed_loss(model, process, u[idx], gu[idx], generator, weighting=weighting)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        rho = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1.0 - rho)
    ema.eval()
    return ema


def fit_smoothed_score(
    target,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    device=None,
    population="modes",
    num_particles: int = 4096,
    population_options: dict | None = None,
    held_out: float = 0.1,
    hidden: int = 128,
    depth: int = 3,
    train_steps: int = 2000,
    batch_size: int = 512,
    lr: float = 2e-3,
    sigma_min: float = 0.01,
    sigma_max: float | None = None,
    max_fisher: float = MAX_FISHER,
    keep_particles: int = 4096,
    progress: bool = False,
    dtype=torch.float32,
    loss: str = "stf",
    kernel: bool = True,
    num_reference: int = 1024,
) -> LearnedSmoothedScore:
    r"""A :class:`~diffstat.smoothing.learned.LearnedSmoothedScore` for ``target`` (module doc).

    Parameters
    ----------
    population : ``"modes"``, ``"nuts"``, ``"smc"`` or a callable
        ``(target, n, generator, device, **options) -> Population``; ``"modes"`` falls back to NUTS
        chains where its importance weights are not trusted (:mod:`~diffstat.smoothing.populations`).
    num_particles : int
    population_options : dict, optional
        Keyword options of the population source.
    held_out : float
        Share of the particles kept out of training for the checks.
    hidden, depth, train_steps, batch_size, lr :
        Network and training settings.
    sigma_min, sigma_max : float
        Trained noise range in units of the particles' scale (``sigma_max`` default: module doc).
    kernel : bool
        Above the noise where the kept particles' kernel weights have an ESS of 64
        (:func:`kernel_threshold`), use the particles' kernel estimate instead of the network (measured
        at d = 32: the network's denoiser was 17 to 25% off the exact one at noise 1 to 12, and walk-jump
        and SMS gave heavy weight 0.40 and 0.48 for 0.667).
    max_fisher : float
        Warn when the held-out relative Fisher divergence exceeds this.
    keep_particles : int
        Training particles kept with the score (walk-jump starts its walkers from them).
    dtype : the network's dtype (float32: twice as fast on CPU; its error is far below the fit's).

    The fitted score's ``info`` holds ``num_target_evals`` (spent here), ``population``,
    ``num_particles``, ``train_steps``, ``sigma_min``, ``sigma_max`` (in the target's units),
    ``kernel_sigma`` (where the kernel takes over), ``fisher_divergence`` and ``fit_seconds``.
    """
    t0 = time.perf_counter()
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    num_particles = check_positive_int(num_particles, "num_particles")
    if loss not in ("stf", "mixed"):
        raise ValueError(f"loss must be 'stf' or 'mixed', got {loss!r}")
    if not 0.0 < held_out < 0.5:
        raise ValueError(f"held_out must lie in (0, 0.5), got {held_out}")
    evals0 = target.num_target_evals
    split = _population(target, population, num_particles, population_options, held_out, generator, device)
    geometry = _geometry(target.dim, split, generator)
    training = (train_steps, batch_size, lr, num_reference, loss)
    net, process = _network(
        split, geometry, (hidden, depth), training, (sigma_min, sigma_max), dtype, generator
    )
    c = geometry["scale"]
    info = {"num_target_evals": int(target.num_target_evals - evals0), "population": split.source}
    info.update(num_particles=int(split.x.shape[0]), train_steps=int(train_steps))
    info.update(num_nan_exploration=split.num_nan_exploration)
    info.update(sigma_min=float(sigma_min) * c, sigma_max=process.sigma_max * c)
    score = _assemble(net, process, split, geometry, info, keep_particles, kernel, generator)
    _check_fit(score, max_fisher, split, t0)
    return score


class _Split(NamedTuple):
    """Steps 1 and 2: the finite particles ``x (n, d)``, ``grad (n, d)``, ``log_prob (n,)``, the
    indices of the training and held-out ones, the population source's name and the NaN
    log-densities its mode search met."""

    x: torch.Tensor
    grad: torch.Tensor
    log_prob: torch.Tensor
    train: torch.Tensor
    held: torch.Tensor
    source: str
    num_nan_exploration: int = 0


def _population(target, population, num_particles, options, held_out, generator, device) -> _Split:
    """Draw the population (step 1), keep its finite particles (16 at least) and hold out a share
    ``held_out`` of them, 8 at least (step 2)."""
    pop = get_population(population)(target, num_particles, generator, device, **(options or {}))
    ok = torch.isfinite(pop.x).all(-1) & torch.isfinite(pop.grad).all(-1) & torch.isfinite(pop.log_prob)
    x, g, lp = pop.x[ok], pop.grad[ok], pop.log_prob[ok]
    if x.shape[0] < 16:
        raise ValueError(
            f"the population source {pop.source!r} returned {x.shape[0]} finite particles; need 16 or more"
        )
    perm = torch.randperm(x.shape[0], generator=generator, device=generator.device).to(x.device)
    n_held = max(int(held_out * x.shape[0]), 8)
    nan_explore = int(getattr(pop, "num_nan_exploration", 0))
    return _Split(x, g, lp, perm[n_held:], perm[:n_held], pop.source, nan_explore)


def _geometry(dim: int, split: _Split, generator) -> dict:
    r"""The training particles' geometry (:func:`~diffstat.smoothing.geometry.particle_geometry`), with
    the local (within-mode) scale from the Fisher information of the held-out ones:
    :math:`d / \mathbb E\lVert\nabla\log p\rVert^2 = \tau^2` for Gaussian modes."""
    geometry = particle_geometry(split.x[split.train], generator)
    fisher = float((split.grad[split.held] ** 2).sum(-1).mean().clamp_min(1e-300))
    geometry["tau"] = math.sqrt(dim / fisher)
    return geometry


def _network(split: _Split, geometry: dict, shape, training, noise_range, dtype, generator):
    """Steps 3 and 4: whiten the training particles and their scores, and train a
    :class:`~diffstat.diffusion.networks.ScoreMLP` of ``shape = (hidden, depth)`` on a VE process
    over ``noise_range = (sigma_min, sigma_max)`` in whitened units (``sigma_max`` at least 4).
    Returns ``(network, process)``."""
    from diffstat.diffusion.networks import ScoreMLP
    from diffstat.diffusion.processes import VE

    x, g = split.x[split.train], split.grad[split.train]
    center, c = geometry["center"].to(x), geometry["scale"]
    sigma_min, sigma_max = noise_range
    s_max = 2.0 * geometry["diameter"] / c if sigma_max is None else float(sigma_max)
    process = VE(sigma_min=float(sigma_min), sigma_max=max(s_max, 4.0))
    u, gu = ((x - center) / c).to(dtype), (g * c).to(dtype)
    hidden, depth = shape
    model = ScoreMLP(x.shape[1], hidden=hidden, depth=depth, process=process, generator=generator).to(dtype)
    return _train(model, process, u, gu, generator, *training), process


def _assemble(net, process, split: _Split, geometry, info, keep_particles, kernel, generator):
    """The score with its kept particles (``keep_particles`` training ones and the held-out ones) and,
    with ``kernel``, the noise above which their kernel estimate replaces the network (step 5)."""
    x, g, keep, held = split.x, split.grad, split.train[:keep_particles], split.held
    c = geometry["scale"]
    particles = {"x": x[keep], "grad": g[keep], "held_x": x[held], "held_grad": g[held]}
    particles["held_lp"] = split.log_prob[held]
    if kernel:
        k = kernel_threshold(x[keep], x[held], generator, c, process.sigma_max * c)
        if k is not None:
            info["kernel_sigma"] = k
    return LearnedSmoothedScore(
        net, process, center=geometry["center"], scale=c, variance=c**2, particles=particles, info=info,
        geometry=geometry,
    )  # fmt: skip


def _check_fit(score: LearnedSmoothedScore, max_fisher: float, split: _Split, t0: float) -> None:
    """Step 6: the held-out relative Fisher divergence (the held-out particles' scores are the
    population's: no new evaluation) into ``score.info``, with the fit's time; a warning above
    ``max_fisher``."""
    check = score.check()
    score.info["fisher_divergence"] = check["fisher_divergence"]
    score.info["fit_seconds"] = time.perf_counter() - t0
    if not check["fisher_divergence"] <= max_fisher:
        n, steps = int(split.x.shape[0]), int(score.info["train_steps"])
        problem = (
            f"is far from the target's at small noise: held-out relative Fisher divergence "
            f"{check['fisher_divergence']:.3g} > {max_fisher} (population {split.source!r}, {n} particles, "
            f"{steps} training steps)"
        )
        more = dict(num_particles=2 * n, train_steps=2 * steps)
        fallback = "or try another population source (the option 'population')"
        warnings.warn(FitWarning("the learned smoothed score", problem, more, False, fallback), stacklevel=3)


@contextlib.contextmanager
def worded_for(caller: str):
    """Inside, the :class:`~diffstat.smoothing.populations.FitWarning` s of a fit are re-issued worded for
    ``caller`` (``"sms"`` or ``"walk_jump"``, which pass the fit's options in ``estimator_options``);
    other warnings pass unchanged, in order, at their own locations."""
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:  # a fit that raises still shows what it warned about first
        for w in caught:
            message = w.message.for_caller(caller) if isinstance(w.message, FitWarning) else w.message
            warnings.warn_explicit(message, w.category, w.filename, w.lineno, source=w.source)


#: A kept score whose held-out log-density differences to the target spread by more than this (relative
#: to the spread of the log-densities) was fitted to another target.
_MAX_MISMATCH = 1e-3


def learned_score_report(
    provider: LearnedSmoothedScore, target, training_evals: int | None, num_points: int = 256
) -> tuple[dict, bool]:
    """Attributes and the verdict of a sampler run with a learned score: fitted in this run
    (``training_evals`` given; its fit's own check) or kept from an earlier fit (checked now against
    ``target`` on ``num_points`` held-out particles, at one evaluation each). Returns ``(attrs,
    rejected)``; a rejected score (fitted to another target) or a large Fisher divergence is warned about."""
    evals0 = target.num_target_evals
    if training_evals is None:
        check = provider.check(target, num_points)
    else:
        check = {
            "fisher_divergence": provider.info.get("fisher_divergence", math.nan),
            "log_prob_mismatch": 0.0,
        }
    attrs = {
        "score_fitted_here": training_evals is not None,
        "score_training_evals": int(training_evals or 0),
        "score_check_evals": int(target.num_target_evals - evals0),
        "score_fisher_divergence": float(check["fisher_divergence"]),
        "score_log_prob_mismatch": float(check["log_prob_mismatch"]),
        "score_population": str(provider.info.get("population", "")),
        # NaNs the population's mode search met in this run, left out of the front door's NaN warning
        "num_nan_exploration": int(provider.info.get("num_nan_exploration", 0)) if training_evals else 0,
    }
    rejected = (
        check["log_prob_mismatch"] > _MAX_MISMATCH
    )  # NaN: a score without held-out particles, unchecked
    if rejected:
        warnings.warn(
            f"the smoothed score passed was fitted to another target: log p minus the fitted "
            f"log-density varies over its held-out particles (relative spread "
            f"{check['log_prob_mismatch']:.3g} > {_MAX_MISMATCH}); every draw is marked in sample_stats "
            "'diverging'. Refit with ds.smoothing.fit_smoothed_score(target).",
            RuntimeWarning,
            stacklevel=4,
        )
    elif training_evals is None and not check["fisher_divergence"] <= MAX_FISHER:
        warnings.warn(
            f"the learned smoothed score is far from the target's at small noise (held-out relative Fisher "
            f"divergence {check['fisher_divergence']:.3g} > {MAX_FISHER})",
            RuntimeWarning,
            stacklevel=4,
        )
    return attrs, rejected
