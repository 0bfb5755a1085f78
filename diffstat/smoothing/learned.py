r"""A learned smoothed score: a noise-conditional network of :mod:`diffstat.diffusion` fitted by
denoising or target score matching (the toolkit's :func:`~diffstat.diffusion.training.train_score_model`)."""

from __future__ import annotations

import torch

from diffstat.smoothing.scores import SmoothedScore

__all__ = ["LearnedSmoothedScore"]


class LearnedSmoothedScore(SmoothedScore):
    r"""A noise-conditional score network of :mod:`diffstat.diffusion` as a smoothed score.

    For a process with :math:`X_t = \alpha_t X_0 + \sigma_t Z`, :math:`X_t/\alpha_t = X_0 +
    (\sigma_t/\alpha_t) Z`, so with :math:`t` solving :math:`\sigma_t / \alpha_t = \sigma`,

    .. math:: \nabla \log q_\sigma(y) = \alpha_t\, s_\theta(\alpha_t y, t).

    (For VE, :math:`\alpha_t = 1` and :math:`t` solves :math:`\sigma_t = \sigma`.) Noise levels
    outside the process's range are clamped to it. Build one from draws with :meth:`fit`.
    """

    def __init__(self, model, process):
        super().__init__()
        self.model = model
        self.process = process

    def _time(self, sigma: float, like: torch.Tensor) -> torch.Tensor:
        lo = torch.tensor(float(self.process.t_min), dtype=like.dtype, device=like.device)
        hi = torch.tensor(float(self.process.t_max), dtype=like.dtype, device=like.device)
        for _ in range(60):  # bisection on the monotone ratio sigma_t / alpha_t
            mid = 0.5 * (lo + hi)
            ratio = self.process.sigma(mid) / self.process.alpha(mid)
            lo, hi = (mid, hi) if float(ratio) < sigma else (lo, mid)
        return 0.5 * (lo + hi)

    def __call__(self, y: torch.Tensor, sigma: float) -> torch.Tensor:
        t = self._time(float(sigma), y)
        alpha = self.process.alpha(t).to(y)
        param = next(self.model.parameters(), None)
        mdtype = param.dtype if param is not None else y.dtype
        with torch.no_grad():
            out = self.model((alpha * y).to(mdtype), t.to(mdtype).expand(y.shape[0]))
        self.last_info = {"spread": torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)}
        return alpha * out.to(y.dtype)

    @classmethod
    def fit(cls, x0: torch.Tensor, grad0: torch.Tensor | None = None, *, generator: torch.Generator,
            sigma_min: float = 0.01, sigma_max: float = 10.0, config=None, hidden: int = 128, depth: int = 3,
            progress: bool = False) -> "LearnedSmoothedScore":
        r"""Fit a :class:`~diffstat.diffusion.networks.ScoreMLP` on a VE process to draws ``x0: (n,
        dim)`` by DSM, or by the mixed TSM/DSM loss when the target scores ``grad0`` are given."""
        from diffstat.diffusion.networks import ScoreMLP
        from diffstat.diffusion.processes import VE
        from diffstat.diffusion.training import TrainConfig, train_score_model

        process = VE(sigma_min=sigma_min, sigma_max=sigma_max)
        model = ScoreMLP(x0.shape[1], hidden=hidden, depth=depth, process=process).to(x0.dtype)
        if config is None:
            config = TrainConfig(loss="dsm" if grad0 is None else "mixed")
        result = train_score_model(model, process, x0, grad0, config=config, generator=generator, progress=progress)
        return cls(result.model, process)
