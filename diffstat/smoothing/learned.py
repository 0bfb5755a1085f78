r"""A learned smoothed score: a noise-conditional network of :mod:`diffstat.diffusion` that gives
:math:`\nabla\log q_\sigma` for every :math:`\sigma`, kept, saved and passed back as
``smoothed_score=`` so that later runs draw fresh samples without new target evaluations (apart from
the final correction). Fitted from the log-density by :func:`~diffstat.smoothing.fit.fit_smoothed_score`.

Coordinates: the network sees :math:`u = (y - m)/c` (``center`` :math:`m`, scalar ``scale``
:math:`c`: isotropic, so the noise stays isotropic, :math:`\sigma_u = \sigma / c`) and

.. math:: \nabla_y \log q_\sigma(y) = \tfrac1c\, s_\theta(u, t), \qquad \sigma_t = \sigma / c

on a VE process (for a VP process :math:`X_t/\alpha_t = X_0 + (\sigma_t/\alpha_t) Z`, so ``t`` solves
:math:`\sigma_t/\alpha_t = \sigma/c` and the score is :math:`\alpha_t s_\theta(\alpha_t u, t)/c`).
From the noise ``kernel_sigma`` on (set by the fit where the kernel weights have enough effective
samples) the score is that of the kept particles' smoothed empirical law
(:meth:`LearnedSmoothedScore._kernel`), which carries the modes' masses exactly as the particles do;
the network serves the smaller noises.
Above the trained range the score is that of the population's moment Gaussian smoothed,
:math:`-(y - m)/(v + \sigma^2)` (:math:`v` the mean variance per coordinate: at such noise the modes
are one blob); below it, the smallest trained level is used.

Tail: a network extrapolates where it saw no training input, and on many_well(32) its score beyond the
particles was far too weak and then pointed outward, so walk-jump's walkers drifted off (docs/sms.md).
The denoiser :math:`\hat x(y) = y + \sigma^2\nabla\log q_\sigma(y) = \mathbb E[X \mid Y = y]` (Tweedie)
is a posterior mean of :math:`X \sim p`, so it lies in the convex hull of :math:`p`'s support; the
network's denoiser is held to outer bounds of the kept particles' hull (their range on each principal
axis of their covariance and on each coordinate, then their largest distance from :math:`m`), and the
score is :math:`(\hat x_{\rm held} - y)/\sigma^2` (:meth:`LearnedSmoothedScore._with_tail`). Beyond the
particles' radius :math:`R` it points inward with a radial pull of at least :math:`(\lVert y -
m\rVert - R)/\sigma^2`, the true smoothed score's growth for a target with tails lighter than
:math:`\mathcal N(0, \sigma^2)` (no target evaluation: the score stays training-free to evaluate);
where the network's denoiser lies within the bounds (nearly every point inside the data) the output is
the network's, bit for bit. Only from the modes' local scale :math:`\tau = (d/\overline{\lVert\nabla
\log p\rVert^2})^{1/2}` of the kept particles' scores on: below it :math:`\hat x \approx y`, and a fresh
draw of :math:`p` a little beyond the particles' range (a held-out one, at the check's noise) would get
an error of its excess over :math:`\sigma^2`.

Self-checks (:meth:`LearnedSmoothedScore.check`), on the held-out particles kept with the score:
the relative Fisher divergence at the smallest trained noise against the target's true score smoothed
to that noise, in the frame whitened by the Fisher information of the kept particles
(:mod:`~diffstat.smoothing.fisher_check`: how far the learned score is from the target's as
:math:`\sigma \to 0`, whatever the target's scales), and the spread of :math:`\log p(x_i) - \log
p_{\rm fit}(x_i)` (zero up to a constant when the target is the one the score was fitted to; a
score fitted to another target, even one with the same local shapes and other mode weights, is
rejected). Files hold only tensors and plain values: :meth:`load` reads them with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import os

import torch

from diffstat.smoothing.base import SmoothedScore
from diffstat.smoothing.fisher_check import relative_fisher

__all__ = ["LearnedSmoothedScore"]

_FILE_FORMAT = "diffstat.smoothing.learned"
_FILE_VERSION = 1

#: Kernel weights per block of rows on CPU (float32: 2 MB, within a core's cache share, so that the
#: three passes over the weights hit the cache; docs/walk_jump_banana.md).
_KERNEL_BLOCK = 1 << 19


class LearnedSmoothedScore(SmoothedScore):
    r"""A noise-conditional score network as a smoothed score (module notes).

    Parameters
    ----------
    model : ScoreMLP (or any module ``(u, t) -> (n, d)``)
    process : VE or VP
    center : (d,), optional; scale : float
        The affine map to the network's coordinates (default identity).
    variance : float, optional
        Mean variance per coordinate of the data (the Gaussian used above the trained range).
    particles : dict, optional
        ``x`` (training particles kept to start walkers) and ``held_x``, ``held_grad``, ``held_lp``
        (held-out particles with the target's score and log-density, for :meth:`check`).
    info : dict, optional
        Plain values describing the fit (evaluations, population source, checks).
    geometry : dict, optional
        Defaults for SMS (``sigma``, ``scale``, ``diameter``, ``tau``), from the particles.
    """

    def __init__(
        self,
        model,
        process,
        *,
        center=None,
        scale: float = 1.0,
        variance: float | None = None,
        particles: dict | None = None,
        info: dict | None = None,
        geometry: dict | None = None,
    ):
        super().__init__()
        self.model, self.process = model, process
        self.center = None if center is None else torch.as_tensor(center, dtype=torch.float64)
        self.scale = float(scale)
        self.variance = None if variance is None else float(variance)
        self.particles = {k: torch.as_tensor(v).detach().cpu() for k, v in (particles or {}).items()}
        self.info = dict(info or {})
        self.geometry = None if geometry is None else dict(geometry)
        #: noise from which on the kernel estimate of the kept particles replaces the network (None: never)
        self.kernel_sigma = self.info.get("kernel_sigma")

    @property
    def dim(self) -> int:
        return int(getattr(self.model, "dim", self.center.shape[0] if self.center is not None else -1))

    def _time(self, sigma: float, like: torch.Tensor) -> torch.Tensor:
        r"""The time whose noise ratio :math:`\sigma_t/\alpha_t` is ``sigma`` (clamped to the process's
        range), by 60 bisection halvings on the monotone ratio, cached per noise level (SMS asks for
        the same few levels thousands of times)."""
        cache = self.__dict__.setdefault("_t_cache", {})
        if sigma not in cache:
            lo = torch.tensor(float(self.process.t_min), dtype=torch.float64)
            hi = torch.tensor(float(self.process.t_max), dtype=torch.float64)
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                ratio = self.process.sigma(mid) / self.process.alpha(mid)
                lo, hi = (mid, hi) if float(ratio) < sigma else (lo, mid)
            if len(cache) > 4096:
                cache.clear()
            cache[sigma] = 0.5 * (lo + hi)
        return cache[sigma].to(device=like.device)

    def _max_sigma(self) -> float:
        if "_sigma_max" not in self.__dict__:
            t = torch.tensor(float(self.process.t_max), dtype=torch.float64)
            self._sigma_max = self.scale * float(self.process.sigma(t) / self.process.alpha(t))
        return self._sigma_max

    def __call__(self, y: torch.Tensor, sigma: float) -> torch.Tensor:
        sigma = float(sigma)
        if y.dim() != 2 or (self.dim > 0 and y.shape[1] != self.dim):
            raise ValueError(
                f"the learned score is for dimension {self.dim}, got points of shape {tuple(y.shape)}"
            )
        center = (
            torch.zeros(y.shape[1], dtype=y.dtype, device=y.device)
            if self.center is None
            else self.center.to(y)
        )
        self.last_info = {"spread": torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)}
        if self.variance is not None and sigma > self._max_sigma():
            return -(y - center) / (self.variance + sigma**2)
        if self.kernel_sigma is not None and sigma >= self.kernel_sigma and "x" in self.particles:
            return self._kernel(y, sigma)
        t = self._time(sigma / self.scale, y)
        alpha = self.process.alpha(t).to(y)
        param = next(self.model.parameters(), None)
        mdtype = param.dtype if param is not None else y.dtype
        u = (y - center) / self.scale
        with torch.no_grad():
            out = self.model((alpha * u).to(mdtype), t.to(mdtype).expand(y.shape[0]))
        return self._with_tail(y, sigma, alpha * out.to(y.dtype) / self.scale)

    def _support_frame(self) -> tuple | None:
        r"""The kept particles' outer bounds (module notes, "Tail"), float64, cached: ``(m, axes, box,
        coord_box, radius, tau)``: ``axes (d, d)`` the eigenvectors of their covariance about ``m``,
        ``box = (lo, hi)`` their range ``(d,)`` on each of these axes and ``coord_box`` on each
        coordinate (both relative to ``m``), ``radius`` their largest distance from ``m``, ``tau`` the
        modes' local scale :math:`\sqrt{d / \overline{\lVert\nabla\log p\rVert^2}}` from their scores
        (0 without). None without kept particles."""
        if "x" not in self.particles:
            return None
        if "_support" not in self.__dict__:
            x = self.particles["x"].double()
            m = torch.zeros(x.shape[1], dtype=x.dtype) if self.center is None else self.center.to(x)
            axes = torch.linalg.eigh(torch.cov((x - m).T).reshape(x.shape[1], x.shape[1]))[1]
            p = (x - m) @ axes
            g = self.particles.get("grad")
            tau = 0.0 if g is None else math.sqrt(x.shape[1] / float((g.double() ** 2).sum(-1).mean()))
            box, coord_box = (p.amin(0), p.amax(0)), ((x - m).amin(0), (x - m).amax(0))
            self._support = (m, axes, box, coord_box, float((x - m).norm(dim=-1).max()), tau)
        return self._support

    def _with_tail(self, y: torch.Tensor, sigma: float, out: torch.Tensor) -> torch.Tensor:
        r"""The network's score ``out: (n, d)`` at ``y: (n, d)`` with its denoiser :math:`\hat x = y +
        \sigma^2 s` held to the kept particles' outer bounds (module notes, "Tail"): clamped to their
        range on each principal axis, then on each coordinate, then moved toward :math:`m` onto the ball
        of their largest radius; the score is :math:`(\hat x_{\rm held} - y)/\sigma^2`. Rows whose
        denoiser lies within the bounds are ``out`` unchanged, bit for bit; so is every row below the
        local scale ``tau``."""
        frame = self._support_frame()
        if frame is None or sigma < frame[-1]:
            return out
        m, axes = frame[0].to(y), frame[1].to(y)
        (lo, hi), (clo, chi), radius = [b.to(y) for b in frame[2]], [b.to(y) for b in frame[3]], frame[4]
        d = y + sigma**2 * out - m
        p = d @ axes
        held = d + (torch.minimum(torch.maximum(p, lo), hi) - p) @ axes.T
        held = torch.minimum(torch.maximum(held, clo), chi)
        held = held * (radius / held.norm(dim=-1, keepdim=True)).clamp(max=1.0)
        moved = (held != d).any(-1, keepdim=True)
        return torch.where(moved, (m + held - y) / sigma**2, out)

    def _kernel(self, y: torch.Tensor, sigma: float) -> torch.Tensor:
        r"""The exact smoothed score of the kept particles' empirical law,
        :math:`\nabla\log \frac1n\sum_i \mathcal N(y; x_i, \sigma^2 I) = (\sum_i v_i x_i - y)/\sigma^2`,
        :math:`v_i \propto e^{-\lVert y - x_i\rVert^2/(2\sigma^2)}`: a gradient field whose modes carry
        exactly the particles' masses. The TSM-mixed average :math:`\sum_i v_i[(1 - w)\nabla\log
        p(x_i) + w(x_i - y)/\sigma^2]` has the same mean under :math:`p` but is a frozen noisy field, not
        a gradient, and moved the mode weights (nine modes, walk-jump at :math:`\sigma = 1`: TV 0.089
        against 0.031 here, 4,000 draws; docs/sms.md).

        The products with the particles, :math:`O(n \cdot` particles :math:`\cdot d)` and the whole
        cost, run in float32 (twice as fast on CPU; the logits' rounding error, about :math:`10^{-7}
        \lVert x\rVert^2/\sigma^2`, is far below one at the noise where the kernel serves), the
        difference :math:`\bar x - y` in ``y``'s dtype. On CPU the rows go in blocks of about
        :data:`_KERNEL_BLOCK` weights, so that the weights stay in cache between the three passes
        over them (logits, softmax, average): the same values, bit for bit, and several times faster
        (docs/walk_jump_banana.md); one block on an accelerator."""
        x, half_sq = self._kernel_particles(y.device)
        yf, n = y.to(torch.float32), y.shape[0]
        rows = n if y.device.type != "cpu" else max(1, _KERNEL_BLOCK // x.shape[0])
        out = torch.empty_like(y)
        for i in range(0, n, rows):
            v = torch.softmax((yf[i : i + rows] @ x.T - half_sq) / sigma**2, -1)
            out[i : i + rows] = ((v @ x).to(y) - y[i : i + rows]) / sigma**2
        return out

    def _kernel_particles(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept particles and half their squared norms, float32 on ``device``, cached."""
        cache = self.__dict__.get("_kernel_cache")
        if cache is None or cache[0].device != torch.device(device):
            x = self.particles["x"].to(device=device, dtype=torch.float32)
            cache = (x, 0.5 * (x.double() ** 2).sum(-1).to(torch.float32))
            self._kernel_cache = cache
        return cache

    def fisher_information(self) -> torch.Tensor | None:
        r"""The mean outer product of the target's score over the kept training particles, ``(d, d)``
        float64 (cached): :math:`F = \mathbb E_p[\nabla\log p\,\nabla\log p^\top] = \mathbb
        E_p[-\nabla^2\log p]`, for a Gaussian mode its precision and for separated modes the modes'
        precisions averaged by mass: a within-mode shape, where the particles' covariance would also
        hold the spread between modes. The final correction's preconditioner
        (:func:`~diffstat.smoothing.correction.posterior_metric`). None without kept scores."""
        if "grad" not in self.particles:
            return None
        if "_fisher" not in self.__dict__:
            g = self.particles["grad"].double()
            self._fisher = g.T @ g / g.shape[0]
        return self._fisher

    # ------------------------------------------------------------------ checks
    def check(self, target=None, num_points: int | None = None) -> dict:
        r"""Held-out checks against ``target`` (module notes): ``fisher_divergence`` (relative, at the
        smallest trained noise, in the Fisher information's metric:
        :func:`~diffstat.smoothing.fisher_check.relative_fisher`), ``log_prob_mismatch`` (standard
        deviation of :math:`\log p - \log p_{\rm fit}` over the held-out particles, relative to that
        of :math:`\log p_{\rm fit}`) and ``num_points``. Costs one target evaluation per held-out
        particle used; with ``target=None`` the stored scores are used (no evaluation, mismatch 0)."""
        if "held_x" not in self.particles:
            return {"fisher_divergence": math.nan, "log_prob_mismatch": math.nan, "num_points": 0}
        x = self.particles["held_x"][: num_points or None]
        if target is None:
            lp, g = self.particles["held_lp"][: x.shape[0]], self.particles["held_grad"][: x.shape[0]]
        else:
            if target.dim != self.dim:
                raise ValueError(
                    f"the learned score is for dimension {self.dim}, the target has {target.dim}"
                )
            x = x.to(dtype=target.dtype)
            lp, g = target.log_prob_and_grad(x)
            lp, g = lp.detach().cpu(), g.detach().cpu()
        t = torch.tensor(float(self.process.t_min), dtype=torch.float64)
        s_min = self.scale * float(self.process.sigma(t) / self.process.alpha(t))
        fisher = relative_fisher(self(x, s_min), g, self.fisher_information(), s_min)
        delta = lp.double() - self.particles["held_lp"][: x.shape[0]].double()
        spread = float(self.particles["held_lp"][: x.shape[0]].double().std()) if x.shape[0] > 1 else 1.0
        mismatch = float(delta.std() / max(spread, 1.0)) if x.shape[0] > 1 else 0.0
        if not math.isfinite(mismatch):
            mismatch = math.inf
        return {"fisher_divergence": fisher, "log_prob_mismatch": mismatch, "num_points": int(x.shape[0])}

    # ------------------------------------------------------------------ save / load
    def save(self, path) -> None:
        """Write the score to ``path`` (tensors and plain values only; see :meth:`load`)."""
        from diffstat.diffusion.networks import ScoreMLP

        if not isinstance(self.model, ScoreMLP):
            raise ValueError(f"only ScoreMLP-based scores can be saved, got {type(self.model).__name__}")
        param = next(self.model.parameters())
        payload = {
            "format": _FILE_FORMAT,
            "version": _FILE_VERSION,
            "model_kwargs": dict(self.model.init_kwargs),
            "process": self.process.to_dict(),
            "dtype": str(param.dtype).replace("torch.", ""),
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "center": None if self.center is None else self.center.cpu(),
            "scale": self.scale,
            "variance": self.variance,
            "particles": dict(self.particles),
            "info": {k: v for k, v in self.info.items() if isinstance(v, (int, float, str, bool))},
            "geometry": None
            if self.geometry is None
            else {
                k: float(v) if isinstance(v, (int, float)) else v
                for k, v in self.geometry.items()
                if k != "center"
            },
        }
        torch.save(payload, path)

    @classmethod
    def load(cls, path) -> LearnedSmoothedScore:
        """Read what :meth:`save` wrote (``weights_only=True``: no code is unpickled)."""
        from diffstat.diffusion.networks import ScoreMLP
        from diffstat.diffusion.processes import process_from_dict

        if isinstance(path, (str, os.PathLike)) and not os.path.exists(path):
            raise FileNotFoundError(f"no smoothed-score file at {path}")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for truncated or foreign files
            raise ValueError(f"{path} is not a readable smoothed-score file: {exc}") from exc
        if (
            not isinstance(payload, dict)
            or payload.get("format") != _FILE_FORMAT
            or payload.get("version") != _FILE_VERSION
        ):
            raise ValueError(
                f"{path} is not a diffstat smoothed-score file (format {_FILE_FORMAT} v{_FILE_VERSION})"
            )
        try:
            process = process_from_dict(payload["process"])
            model = ScoreMLP(**payload["model_kwargs"], process=process).to(getattr(torch, payload["dtype"]))
            model.load_state_dict(payload["state_dict"], strict=True)
        except (KeyError, TypeError, RuntimeError, AttributeError, ValueError) as exc:
            raise ValueError(f"{path} does not describe a consistent score network: {exc}") from exc
        model.eval()
        geometry = payload["geometry"]
        if geometry is not None and payload["center"] is not None:
            geometry["center"] = payload["center"]
        return cls(
            model,
            process,
            center=payload["center"],
            scale=payload["scale"],
            variance=payload["variance"],
            particles=payload["particles"],
            info=payload["info"],
            geometry=geometry,
        )

    @classmethod
    def fit(
        cls,
        x0: torch.Tensor,
        grad0: torch.Tensor | None = None,
        *,
        generator: torch.Generator,
        sigma_min: float = 0.01,
        sigma_max: float = 10.0,
        config=None,
        hidden: int = 128,
        depth: int = 3,
        progress: bool = False,
    ) -> LearnedSmoothedScore:
        r"""Fit a :class:`~diffstat.diffusion.networks.ScoreMLP` on a VE process to given draws ``x0: (n,
        dim)`` by DSM, or by the mixed TSM/DSM loss when the target scores ``grad0`` are given (no
        whitening, no held-out checks; :func:`~diffstat.smoothing.fit.fit_smoothed_score` does both
        from the log-density)."""
        from diffstat.diffusion.networks import ScoreMLP
        from diffstat.diffusion.processes import VE
        from diffstat.diffusion.training import TrainConfig, train_score_model

        process = VE(sigma_min=sigma_min, sigma_max=sigma_max)
        model = ScoreMLP(x0.shape[1], hidden=hidden, depth=depth, process=process).to(x0.dtype)
        if config is None:
            config = TrainConfig(loss="dsm" if grad0 is None else "mixed")
        result = train_score_model(
            model, process, x0, grad0, config=config, generator=generator, progress=progress
        )
        return cls(result.model, process)
