r"""Training a score model: Adam on mini-batches, an exponential moving average (EMA) of the
weights, a held-out loss with early stopping, a progress bar, and saving / loading.

The EMA (Polyak averaging) :math:`\bar\theta \leftarrow \rho\,\bar\theta + (1-\rho)\theta`, with the
warm-up :math:`\rho_k = \min(\rho, (1+k)/(10+k))` so early averages do not remember the random
initialisation, smooths the noise of the stochastic score-matching gradients; the EMA weights are
the ones returned, evaluated on the held-out split, and saved.

Everything random (the split, the batches, the diffusion times and noises) comes from the
``generator`` passed in, so a run is reproducible on the same machine. The held-out loss uses
one fixed set of times and noises (seeded once from the generator), so successive evaluations
are comparable and early stopping is not driven by fresh Monte Carlo noise.

The loop is :func:`init` (the split, the EMA copy, the optimiser) and :func:`step` (one Adam step
on one mini-batch, then the EMA update) over a :class:`TrainState`; :func:`train_score_model` is the
driver that records the losses, evaluates the held-out loss and stops early. The settings are a
:class:`~diffstat.diffusion.train_config.TrainConfig`; saving and loading are in
:mod:`diffstat.diffusion.model_io` (both re-exported here).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from diffstat._util import progress_bar
from diffstat.diffusion.losses import dsm_loss, mixed_loss, sliced_score_matching_loss, stf_loss, tsm_loss
from diffstat.diffusion.model_io import load_model, save_model
from diffstat.diffusion.processes import uniform_draws
from diffstat.diffusion.train_config import TrainConfig

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainData",
    "TrainState",
    "TrainInfo",
    "init",
    "step",
    "train_score_model",
    "save_model",
    "load_model",
]


@dataclass
class TrainResult:
    """What :func:`train_score_model` returns.

    Attributes
    ----------
    model : the EMA weights in a copy of the model, in eval mode (best EMA weights when early
        stopping was on)
    history : dict of lists ``step``, ``train_loss`` (mean over the steps since the last entry),
        ``val_loss`` (EMA weights on the held-out split; NaN without one)
    num_steps : steps actually taken (fewer than ``config.num_steps`` after early stopping)
    best_val_loss : lowest held-out loss seen (NaN without a held-out split)
    """

    model: torch.nn.Module
    history: dict = field(default_factory=dict)
    num_steps: int = 0
    best_val_loss: float = math.nan


def _sample_times(config: TrainConfig, process, n: int, generator, dtype, device) -> torch.Tensor | None:
    """Times for one batch: None (the loss draws them uniformly) unless ``small_t_fraction > 0``,
    then uniform on ``[t_min, t_max]`` with a share ``small_t_fraction`` log-uniform."""
    if config.small_t_fraction == 0:
        return None
    t = process.sample_time(n, generator, dtype=dtype, device=device)
    u = uniform_draws((n,), generator, dtype, device)
    log_uniform = process.t_min * (process.t_max / process.t_min) ** u
    pick = uniform_draws((n,), generator, dtype, device) < config.small_t_fraction
    return torch.where(pick, log_uniform, t)


def _loss_fn(config: TrainConfig, model, process, reference=None):
    """The loss ``(x, g, gen) -> scalar``; ``reference = (x_ref, g_ref or None)`` for ``"stf"``."""
    kw = {} if config.weighting is None else {"weighting": config.weighting}

    def fn(x, g, gen, t=None):
        if t is None:
            t = _sample_times(config, process, x.shape[0], gen, x.dtype, x.device)
        if config.loss == "dsm":
            return dsm_loss(model, process, x, gen, t=t, **kw)
        if config.loss == "tsm":
            return tsm_loss(model, process, x, g, gen, t=t, **kw)
        if config.loss == "mixed":
            return mixed_loss(model, process, x, g, gen, t=t, **kw)
        if config.loss == "stf":
            ref_x, ref_g = reference
            m = min(config.num_reference, ref_x.shape[0])
            idx = torch.randint(0, ref_x.shape[0], (m,), generator=gen, device=gen.device).to(ref_x.device)
            if ref_g is None:
                return stf_loss(model, process, x, None, gen, ref_x[idx], None, t=t, **kw)
            return stf_loss(model, process, x, g, gen, ref_x[idx], ref_g[idx], t=t, **kw)
        return sliced_score_matching_loss(
            model, x, gen, t=t, process=process, num_projections=config.num_projections, **kw
        )

    return fn


class TrainData(NamedTuple):
    """The training and held-out points of one run.

    x, grad : (m, dim) training points and their scores (zeros where none were given, ``has_grad``
    False); x_val, g_val : (val_repeats * n_val, dim) the held-out points, repeated; val_seed : the
    seed of the held-out times and noises; batch_size : min(config, m); focus : (m,) the focus
    weights of the training points or None, ``num_focus`` of each batch drawn by them at times up
    to ``t_focus``.
    """

    x: torch.Tensor
    grad: torch.Tensor
    has_grad: bool
    x_val: torch.Tensor
    g_val: torch.Tensor
    val_seed: int
    batch_size: int
    focus: torch.Tensor | None
    num_focus: int
    t_focus: float


class TrainState(NamedTuple):
    """The optimiser state: the ``model`` with its raw weights and the ``ema`` copy (both updated in
    place by :func:`step`, as torch optimisers do), the Adam ``optimizer``, the ``data``, the epoch's
    permutation ``order`` with the position ``pos`` in it, and the steps taken."""

    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    data: TrainData
    order: torch.Tensor | None
    pos: int
    step: int


class TrainInfo(NamedTuple):
    """One step's training ``loss`` (a detached 0-d tensor: no host sync in the loop) and ``lr``."""

    loss: torch.Tensor
    lr: float


def _checked_inputs(model, process, x0, grad0, config: TrainConfig, focus_weights):
    """``x0``, ``grad0`` (None where the loss does not use it) and ``focus_weights`` on the model's
    device and dtype, or a ``ValueError`` naming what is wrong."""
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    param = next(model.parameters())
    x0 = torch.as_tensor(x0).to(device=param.device, dtype=param.dtype)
    if x0.dim() != 2 or x0.shape[0] < 2:
        raise ValueError(f"x0 must have shape (n, dim) with n >= 2, got {tuple(x0.shape)}")
    if getattr(model, "dim", x0.shape[1]) != x0.shape[1]:
        raise ValueError(f"x0 has dimension {x0.shape[1]} but the model expects {model.dim}")
    if not torch.isfinite(x0).all():
        raise ValueError("x0 contains NaN or infinite values")
    if config.loss in ("tsm", "mixed") and grad0 is None:
        raise ValueError(f"loss={config.loss!r} needs grad0 = grad log p_0(x0); use loss='dsm' without it")
    if config.loss in ("tsm", "mixed", "stf") and grad0 is not None:  # "stf" without grad0: its DSM form
        grad0 = torch.as_tensor(grad0).to(device=x0.device, dtype=x0.dtype)
        if grad0.shape != x0.shape or not torch.isfinite(grad0).all():
            raise ValueError(f"grad0 must be finite and of shape {tuple(x0.shape)}, got {tuple(grad0.shape)}")
    else:
        grad0 = None
    if config.small_t_fraction > 0 and not process.t_min > 0:
        raise ValueError(
            "TrainConfig.small_t_fraction > 0 needs a process with t_min > 0 (log-uniform times)"
        )
    if config.focus_fraction > 0:
        if focus_weights is None:
            raise ValueError("TrainConfig.focus_fraction > 0 needs focus_weights (n,)")
        focus_weights = torch.as_tensor(focus_weights).to(device=x0.device, dtype=torch.float64)
        if (
            focus_weights.shape != (x0.shape[0],)
            or not bool((focus_weights >= 0).all())
            or not float(focus_weights.sum()) > 0
        ):
            raise ValueError(
                f"focus_weights must be non-negative of shape ({x0.shape[0]},) with a positive sum"
            )
        if not process.t_min > 0:
            raise ValueError(
                "TrainConfig.focus_fraction > 0 needs a process with t_min > 0 (log-uniform times)"
            )
    return x0, grad0, focus_weights


def init(generator, model, process, x0, grad0, config: TrainConfig, focus_weights=None) -> TrainState:
    """Split checked points ``x0 (n, dim)`` (scores ``grad0`` or None) into training and held-out
    parts by one random permutation, draw the held-out seed, and set up the EMA copy and Adam."""
    has_grad = grad0 is not None
    grad0 = grad0 if has_grad else torch.zeros_like(x0)
    n = x0.shape[0]
    perm = torch.randperm(n, generator=generator, device=generator.device).to(x0.device)
    n_val = int(math.floor(config.val_fraction * n))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    val_seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    batch_size = min(config.batch_size, n - n_val)
    focus, num_focus, t_focus = None, 0, process.t_max
    if config.focus_fraction > 0:
        focus, num_focus = focus_weights[train_idx], int(config.focus_fraction * batch_size)
        if config.focus_t_max is not None:
            t_focus = min(max(float(config.focus_t_max), process.t_min), process.t_max)
    data = TrainData(
        x0[train_idx],
        grad0[train_idx],
        has_grad,
        x0[val_idx].repeat(config.val_repeats, 1),
        grad0[val_idx].repeat(config.val_repeats, 1),
        val_seed,
        batch_size,
        focus,
        num_focus,
        t_focus,
    )
    ema = copy.deepcopy(model)
    for p in ema.parameters():
        p.requires_grad_(False)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return TrainState(model, ema, optimizer, data, None, n - n_val, 0)


def _learning_rate(config: TrainConfig, k: int) -> float:
    """The rate of step ``k`` (1-based): constant, or cosine from ``lr`` to ``lr * lr_final_ratio``."""
    if config.lr_schedule != "cosine":
        return config.lr
    frac = (k - 1) / max(config.num_steps - 1, 1)
    return config.lr * (
        config.lr_final_ratio + (1 - config.lr_final_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    )


def _focused_batch(generator, idx, data: TrainData, config: TrainConfig, process):
    """The batch ``idx`` with its first ``num_focus`` points redrawn by focus weight, and its times:
    the focused points' log-uniform on ``[t_min, t_focus]`` (small times only)."""
    idx = idx.clone()
    idx[: data.num_focus] = torch.multinomial(
        data.focus, data.num_focus, replacement=True, generator=generator
    ).to(idx.device)
    x = data.x
    t = _sample_times(config, process, idx.shape[0], generator, x.dtype, x.device)
    t = process.sample_time(idx.shape[0], generator, dtype=x.dtype, device=x.device) if t is None else t
    u = uniform_draws((data.num_focus,), generator, x.dtype, x.device)
    t[: data.num_focus] = process.t_min * (data.t_focus / process.t_min) ** u
    return idx, t


def step(generator, state: TrainState, process, config: TrainConfig) -> tuple[TrainState, TrainInfo]:
    """One Adam step on the next mini-batch (a fresh permutation at each epoch), then the EMA update
    :math:`\\bar\\theta \\leftarrow \\rho_k\\bar\\theta + (1-\\rho_k)\\theta` with the warm-up
    :math:`\\rho_k = \\min(\\rho, (1+k)/(10+k))`."""
    data, order, pos, k = state.data, state.order, state.pos, state.step + 1
    m, bs = data.x.shape[0], data.batch_size
    if pos + bs > m:  # a new epoch: fresh permutation
        order, pos = torch.randperm(m, generator=generator, device=generator.device).to(data.x.device), 0
    idx, t = order[pos : pos + bs], None
    lr = _learning_rate(config, k)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    if data.focus is not None and data.num_focus > 0:  # a share of the batch drawn by focus weight
        idx, t = _focused_batch(generator, idx, data, config, process)
    loss_fn = _loss_fn(config, state.model, process, (data.x, data.grad if data.has_grad else None))
    loss = loss_fn(data.x[idx], data.grad[idx], generator, t)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), config.grad_clip)
    state.optimizer.step()
    rho = min(config.ema_decay, (1 + k) / (10 + k))
    with torch.no_grad():
        for p_ema, p in zip(state.ema.parameters(), state.model.parameters()):
            p_ema.lerp_(p, 1.0 - rho)
    return state._replace(order=order, pos=pos + bs, step=k), TrainInfo(loss.detach(), lr)


def validate(state: TrainState, process, config: TrainConfig, device) -> float:
    """The EMA weights' loss on the held-out points, with the same times and noises every time
    (a generator on ``device`` seeded by ``val_seed``); NaN without a held-out split."""
    data = state.data
    if data.x_val.shape[0] == 0:
        return math.nan
    gen = torch.Generator(device=device).manual_seed(data.val_seed)
    fn = _loss_fn(config, state.ema, process, (data.x, data.grad if data.has_grad else None))
    if config.loss == "ssm":  # needs autograd through the model for its divergence
        return float(fn(data.x_val, data.g_val, gen).detach())
    with torch.no_grad():
        return float(fn(data.x_val, data.g_val, gen))


def train_score_model(
    model: torch.nn.Module,
    process,
    x0,
    grad0=None,
    *,
    config: TrainConfig = TrainConfig(),  # noqa: B008 (frozen, so immutable)
    generator: torch.Generator,
    progress: bool = False,
    focus_weights=None,
) -> TrainResult:
    r"""Fit a score model to draws ``x0`` of :math:`p_0` (with :math:`\nabla\log p_0` at them).

    Parameters
    ----------
    model : ScoreMLP, EnergyMLP or any module ``(x, t) -> (n, dim)``; trained in place (its
        final raw weights), while the result carries the EMA weights.
    process : VP or VE
    x0 : (n, dim) training points
    grad0 : (n, dim) :math:`\nabla\log p_0(x_0)`; required by ``"tsm"`` and ``"mixed"``.
    config : TrainConfig
    generator : torch.Generator, the source of all randomness
    progress : show a tqdm bar with the current losses
    focus_weights : (n,) non-negative, optional
        Sampling weights of the focused share of each batch (``config.focus_fraction``).

    Returns
    -------
    TrainResult
    """
    x0, grad0, focus_weights = _checked_inputs(model, process, x0, grad0, config, focus_weights)
    state = init(generator, model, process, x0, grad0, config, focus_weights)
    history = {"step": [], "train_loss": [], "val_loss": []}
    best_val, best_state, bad_evals = math.inf, None, 0
    window_sum, window_len = torch.zeros((), dtype=x0.dtype, device=x0.device), 0
    with progress_bar(config.num_steps, "training score model", progress) as bar:
        while state.step < config.num_steps:
            state, info = step(generator, state, process, config)
            window_sum, window_len = window_sum + info.loss, window_len + 1
            bar.update(1)
            if state.step % config.eval_every and state.step < config.num_steps:
                continue
            train_loss = float(window_sum) / window_len
            val = validate(state, process, config, generator.device)
            window_sum, window_len = torch.zeros_like(window_sum), 0
            for key, value in zip(history, (state.step, train_loss, val)):
                history[key].append(value)
            bar.set_postfix(loss=f"{train_loss:.4g}", val=f"{val:.4g}")
            if val < best_val:
                best_val, bad_evals = val, 0
                best_state = copy.deepcopy(state.ema.state_dict()) if config.patience is not None else None
            elif config.patience is not None:
                bad_evals += 1
                if bad_evals >= config.patience:
                    break
    ema = state.ema
    if best_state is not None:
        ema.load_state_dict(best_state)
    for p in ema.parameters():  # trainable again, so a result can be warm-started
        p.requires_grad_(True)
    ema.eval()
    best = best_val if math.isfinite(best_val) else math.nan
    return TrainResult(model=ema, history=history, num_steps=state.step, best_val_loss=best)
