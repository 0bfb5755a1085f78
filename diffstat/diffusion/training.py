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
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field

import torch

from diffstat._util import progress_bar
from diffstat.diffusion.losses import dsm_loss, mixed_loss, sliced_score_matching_loss, stf_loss, tsm_loss
from diffstat.diffusion.networks import EnergyMLP, ScoreMLP
from diffstat.diffusion.processes import _rand, process_from_dict

__all__ = ["TrainConfig", "TrainResult", "train_score_model", "save_model", "load_model"]

_LOSSES = ("dsm", "tsm", "mixed", "ssm", "stf")
_MODEL_CLASSES = {"ScoreMLP": ScoreMLP, "EnergyMLP": EnergyMLP}
_FILE_FORMAT = "diffstat.diffusion.model"
_FILE_VERSION = 1


@dataclass(frozen=True)
class TrainConfig:
    """Training settings.

    Attributes
    ----------
    num_steps : int
        Adam steps (mini-batches).
    batch_size : int
    lr : float
        Adam learning rate (constant, or cosine-decayed to ``lr * lr_final_ratio`` with
        ``lr_schedule="cosine"``).
    ema_decay : float
        EMA rate :math:`\\rho` of the returned weights (0 disables averaging).
    loss : ``"dsm"``, ``"tsm"``, ``"mixed"``, ``"ssm"`` (sliced score matching, no target) or
        ``"stf"`` (the mixed target averaged over the empirical posterior of ``num_reference``
        training points drawn afresh each step, :func:`~diffstat.diffusion.losses.stf_loss`;
        the DSM form when no ``grad0`` is given)
    val_fraction : float
        Share of the points held out for the validation loss (0: no validation).
    patience : int or None
        Early stopping: stop after this many evaluations of the held-out loss without
        improvement, and return the best EMA weights. None trains for ``num_steps``.
    eval_every : int
        Steps between evaluations of the held-out loss (and history entries).
    weighting : str or None
        :math:`\\lambda(t)` for the loss (``"sigma2"``, ``"g2"``, ``"alpha2"``, ``"none"``); None
        uses the loss's default.
    weight_decay : float
    grad_clip : float or None
        Clip the gradient norm at this value.
    val_repeats : int
        Noise draws per held-out point in the validation loss.
    num_projections : int
        Probes per point for ``loss="ssm"``.
    num_reference : int
        Reference points per step for ``loss="stf"``.
    small_t_fraction : float
        Share of each batch's times drawn log-uniformly on ``[t_min, t_max]`` instead of
        uniformly (more weight near :math:`t = 0`; needs ``process.t_min > 0``). 0 keeps the
        losses' own uniform times.
    focus_fraction, focus_t_max : float
        With ``focus_weights`` given to :func:`train_score_model`: this share of each batch is
        drawn with probability proportional to ``focus_weights`` instead of uniformly, at times
        log-uniform on ``[t_min, focus_t_max]`` (default ``t_max``). As :math:`t \to 0` the TSM
        target is the exact score at each point, so reweighting the points moves accuracy to
        where it is needed without biasing the limit; at larger times only the uniformly drawn
        points train (reweighting there would change the noised law).
    """

    num_steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    ema_decay: float = 0.999
    loss: str = "mixed"
    val_fraction: float = 0.1
    patience: int | None = None
    eval_every: int = 100
    weighting: str | None = None
    weight_decay: float = 0.0
    grad_clip: float | None = None
    lr_schedule: str = "constant"
    lr_final_ratio: float = 0.1
    val_repeats: int = 4
    num_projections: int = 1
    num_reference: int = 1024
    small_t_fraction: float = 0.0
    focus_fraction: float = 0.0
    focus_t_max: float | None = None

    def __post_init__(self):
        for name in (
            "num_steps",
            "batch_size",
            "eval_every",
            "val_repeats",
            "num_projections",
            "num_reference",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {v!r}")
        if self.loss not in _LOSSES:
            raise ValueError(f"TrainConfig.loss must be one of {_LOSSES}, got {self.loss!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr must be positive, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"TrainConfig.ema_decay must lie in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"TrainConfig.val_fraction must lie in [0, 1), got {self.val_fraction}")
        if self.patience is not None and (
            isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1
        ):
            raise ValueError(
                f"TrainConfig.patience must be None or a positive integer, got {self.patience!r}"
            )
        if self.patience is not None and self.val_fraction == 0:
            raise ValueError("early stopping (patience) needs a held-out split (val_fraction > 0)")
        if self.weighting is not None and self.weighting not in ("sigma2", "g2", "alpha2", "none"):
            raise ValueError(
                "TrainConfig.weighting must be None, 'sigma2', 'g2', 'alpha2' or 'none', "
                f"got {self.weighting!r}"
            )
        if not 0.0 <= self.small_t_fraction <= 1.0:
            raise ValueError(f"TrainConfig.small_t_fraction must lie in [0, 1], got {self.small_t_fraction}")
        if not 0.0 <= self.focus_fraction < 1.0:
            raise ValueError(f"TrainConfig.focus_fraction must lie in [0, 1), got {self.focus_fraction}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(
                f"TrainConfig.lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}"
            )


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
    u = _rand((n,), generator, dtype, device)
    log_uniform = process.t_min * (process.t_max / process.t_min) ** u
    pick = _rand((n,), generator, dtype, device) < config.small_t_fraction
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


def train_score_model(
    model: torch.nn.Module,
    process,
    x0,
    grad0=None,
    *,
    config: TrainConfig = TrainConfig(),
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
    has_grad = grad0 is not None
    if grad0 is None:
        grad0 = torch.zeros_like(x0)

    n = x0.shape[0]
    perm = torch.randperm(n, generator=generator, device=generator.device).to(x0.device)
    n_val = int(math.floor(config.val_fraction * n))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    x_train, g_train = x0[train_idx], grad0[train_idx]
    x_val = x0[val_idx].repeat(config.val_repeats, 1)
    g_val = grad0[val_idx].repeat(config.val_repeats, 1)
    val_seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    batch_size = min(config.batch_size, x_train.shape[0])
    focus = None
    if config.focus_fraction > 0:
        focus = focus_weights[train_idx]
        num_focus = int(config.focus_fraction * batch_size)
        t_focus = (
            process.t_max
            if config.focus_t_max is None
            else min(max(float(config.focus_t_max), process.t_min), process.t_max)
        )

    ema = copy.deepcopy(model)
    for p in ema.parameters():
        p.requires_grad_(False)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    reference = (x_train, g_train if has_grad else None)  # the pool of "stf" reference points
    train_loss_fn = _loss_fn(config, model, process, reference)
    val_loss_fn = _loss_fn(config, ema, process, reference)

    def validate() -> float:
        if n_val == 0:
            return math.nan
        gen = torch.Generator(device=generator.device).manual_seed(val_seed)
        if config.loss == "ssm":
            return float(val_loss_fn(x_val, g_val, gen).detach())
        with torch.no_grad():
            return float(val_loss_fn(x_val, g_val, gen))

    history = {"step": [], "train_loss": [], "val_loss": []}
    best_val, best_state, bad_evals = math.inf, None, 0
    window_sum = torch.zeros((), dtype=x0.dtype, device=x0.device)
    window_len, order, pos, step = 0, None, n, 0
    bar = progress_bar(config.num_steps, "training score model", progress)
    try:
        for step in range(1, config.num_steps + 1):
            if pos + batch_size > x_train.shape[0]:  # a new epoch: fresh permutation
                order = torch.randperm(x_train.shape[0], generator=generator, device=generator.device).to(
                    x0.device
                )
                pos = 0
            idx = order[pos : pos + batch_size]
            pos += batch_size
            if config.lr_schedule == "cosine":
                frac = (step - 1) / max(config.num_steps - 1, 1)
                scale = config.lr_final_ratio + (1 - config.lr_final_ratio) * 0.5 * (
                    1 + math.cos(math.pi * frac)
                )
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * scale
            if focus is None or num_focus == 0:
                loss = train_loss_fn(x_train[idx], g_train[idx], generator)
            else:  # a share of the batch drawn by focus weight, at small times only
                idx = idx.clone()
                idx[:num_focus] = torch.multinomial(
                    focus, num_focus, replacement=True, generator=generator
                ).to(idx.device)
                t = _sample_times(config, process, idx.shape[0], generator, x0.dtype, x0.device)
                t = (
                    process.sample_time(idx.shape[0], generator, dtype=x0.dtype, device=x0.device)
                    if t is None
                    else t
                )
                u = _rand((num_focus,), generator, x0.dtype, x0.device)
                t[:num_focus] = process.t_min * (t_focus / process.t_min) ** u
                loss = train_loss_fn(x_train[idx], g_train[idx], generator, t)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            rho = min(config.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), model.parameters()):
                    p_ema.lerp_(p, 1.0 - rho)
            window_sum += loss.detach()
            window_len += 1
            bar.update(1)
            if step % config.eval_every == 0 or step == config.num_steps:
                train_loss = float(window_sum) / window_len
                window_sum.zero_()
                window_len = 0
                val = validate()
                history["step"].append(step)
                history["train_loss"].append(train_loss)
                history["val_loss"].append(val)
                bar.set_postfix(loss=f"{train_loss:.4g}", val=f"{val:.4g}")
                if val < best_val:
                    best_val, bad_evals = val, 0
                    if config.patience is not None:
                        best_state = copy.deepcopy(ema.state_dict())
                elif config.patience is not None:
                    bad_evals += 1
                    if bad_evals >= config.patience:
                        break
    finally:
        bar.close()
    if best_state is not None:
        ema.load_state_dict(best_state)
    for p in ema.parameters():  # trainable again, so a result can be warm-started
        p.requires_grad_(True)
    ema.eval()
    return TrainResult(
        model=ema,
        history=history,
        num_steps=step,
        best_val_loss=best_val if math.isfinite(best_val) else math.nan,
    )


def save_model(path, model: torch.nn.Module, process, config: TrainConfig | None = None) -> None:
    """Save a :class:`ScoreMLP` or :class:`EnergyMLP` with its process and training settings.

    The file holds only tensors and plain Python values, so :func:`load_model` reads it with
    ``torch.load(weights_only=True)`` (no code is unpickled).
    """
    name = type(model).__name__
    if name not in _MODEL_CLASSES or not hasattr(model, "init_kwargs"):
        raise ValueError(f"save_model saves ScoreMLP or EnergyMLP models, got {name}")
    param = next(model.parameters())
    payload = {
        "format": _FILE_FORMAT,
        "version": _FILE_VERSION,
        "model_class": name,
        "model_kwargs": dict(model.init_kwargs),
        "model_uses_process": model.process is not None,
        "process": None if process is None else process.to_dict(),
        "config": None if config is None else dataclasses.asdict(config),
        "dtype": str(param.dtype).replace("torch.", ""),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if model.process is not None and process is not None and model.process.to_dict() != process.to_dict():
        raise ValueError(f"the model was built with {model.process!r} but process is {process!r}")
    torch.save(payload, path)


def load_model(path):
    """Load what :func:`save_model` wrote: returns ``(model, process, config)``, the model in eval mode.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is corrupt, is not a diffstat model file, or its weights do not fit the
        recorded architecture.
    """
    if isinstance(path, (str, os.PathLike)) and not os.path.exists(path):
        raise FileNotFoundError(f"no model file at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise ValueError(
            f"{path} is not a readable diffstat model file (corrupt or not saved by save_model): {exc}"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != _FILE_FORMAT:
        raise ValueError(f"{path} is not a diffstat model file (no '{_FILE_FORMAT}' header)")
    if payload.get("version") != _FILE_VERSION:
        raise ValueError(
            f"{path} has format version {payload.get('version')!r}; this diffstat reads {_FILE_VERSION}"
        )
    try:
        cls = _MODEL_CLASSES[payload["model_class"]]
        process = None if payload["process"] is None else process_from_dict(payload["process"])
        kwargs = dict(payload["model_kwargs"])
        if cls is EnergyMLP:
            kwargs.pop("parameterization", None)
        model = cls(**kwargs, process=process if payload["model_uses_process"] else None)
        model = model.to(getattr(torch, payload["dtype"]))
        model.load_state_dict(payload["state_dict"], strict=True)
        config = None if payload["config"] is None else TrainConfig(**payload["config"])
    except (KeyError, TypeError, RuntimeError, AttributeError, ValueError) as exc:
        raise ValueError(
            f"{path} does not describe a consistent model "
            f"(mismatched architecture, weights or settings): {exc}"
        ) from exc
    model.eval()
    return model, process, config
