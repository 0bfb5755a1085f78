r"""Settings of score-model training (:func:`~diffstat.diffusion.training.train_score_model`), a
frozen dataclass validated in one place.

Why the defaults: 1e-3 is Adam's customary learning rate; the EMA rate 0.999 averages over about
the last 1000 steps, half of the default 2000; the held-out split (10%, each point with 4 noise
draws, evaluated every 100 steps) only steers early stopping, so it is kept small; the mixed TSM/DSM
loss uses the target's gradients where they are known (:mod:`diffstat.diffusion.losses`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["LOSSES", "TrainConfig"]

#: The training losses :class:`TrainConfig` accepts.
LOSSES = ("dsm", "tsm", "mixed", "ssm", "stf")


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
        if self.loss not in LOSSES:
            raise ValueError(f"TrainConfig.loss must be one of {LOSSES}, got {self.loss!r}")
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
