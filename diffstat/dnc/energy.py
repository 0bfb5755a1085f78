r"""Per-shard energy models of the diffusion combiner (:mod:`diffstat.dnc.diffusion`, steps 1 and 2).

**Whiten** (:func:`whitening`): one affine map for every shard, :math:`z = L^{-1}(x - m)` with
:math:`(m, LL^\top)` the mean and covariance of the pooled shard draws; scores follow,
:math:`\nabla_z \log p_k = L^\top \nabla_x \log p_k`. A common map keeps the shards' noised laws
noisings of one variable, so their energies add at every noise level.

**Fit** (:func:`fit_shard_energy`, run in a worker) :math:`E_k(z, t) \approx -\log p_{k,t}(z)`, the
law of :math:`\alpha_t Z_k + \sigma_t \varepsilon` under the VP process, with the toolkit's
:func:`~diffstat.diffusion.training.train_score_model` and the mixed TSM/DSM loss on the stored
scores. The energy (:class:`ShardEnergy`) is the exact energy of the noised Gaussian approximation
:math:`\mathcal N(m_k, S_k)` plus a residual network that is zero at initialisation,

.. math::
    E_k(z, t) = \tfrac12 (z - \alpha_t m_k)^\top (\alpha_t^2 S_k + \sigma_t^2 I)^{-1}
    (z - \alpha_t m_k) + R_k(z, t),

so a Gaussian shard is exact before training and the network only learns the non-Gaussian part.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from diffstat._util import progress_bar
from diffstat.dnc.gaussian import sample_moments
from diffstat.dnc.tasks import map_with_retries

__all__ = [
    "ShardEnergy",
    "ProductEnergy",
    "fit_shard_energy",
    "fit_shard_energies",
    "focus_weights",
    "load_shard_energy",
    "whitening",
]


class ShardEnergy(nn.Module):
    r"""Energy :math:`E(z, t)` of one noised sub-posterior: noised-Gaussian part plus a residual
    network (module notes). ``forward(z, t)`` is the score :math:`-\nabla_z E` (differentiable
    when gradients are enabled, for training); ``energy(z, t)`` is ``(n,)``.

    Parameters
    ----------
    mean : (dim,), cov : (dim, dim)
        The shard's Gaussian approximation in whitened coordinates.
    hidden, depth : int
        Width and depth of the :class:`~diffstat.diffusion.networks.EnergyMLP`.
    process : VP
    seed : int
        Initial weights.
    """

    def __init__(
        self,
        mean: torch.Tensor,
        cov: torch.Tensor,
        *,
        hidden: int = 64,
        depth: int = 3,
        process=None,
        seed: int = 0,
    ):
        super().__init__()
        from diffstat.diffusion.networks import EnergyMLP
        from diffstat.diffusion.processes import VP

        self.process = VP() if process is None else process
        dim = mean.shape[0]
        self.dim = dim
        self.net = EnergyMLP(dim, hidden=hidden, depth=depth, process=self.process, seed=seed)
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("cov", cov.detach().clone())

    def _gaussian_energy(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha = self.process.alpha(t).to(z)
        sigma = self.process.sigma(t).to(z)
        eye = torch.eye(self.dim, dtype=z.dtype, device=z.device)
        cov = self.cov.to(z)
        if t.dim() == 0:
            c = alpha**2 * cov + sigma**2 * eye
            diff = z - alpha * self.mean.to(z)
            return 0.5 * (diff * torch.linalg.solve(c, diff.T).T).sum(-1)
        c = alpha[:, None, None] ** 2 * cov + sigma[:, None, None] ** 2 * eye  # (n, d, d)
        diff = z - alpha[:, None] * self.mean.to(z)
        sol = torch.linalg.solve(c, diff.unsqueeze(-1)).squeeze(-1)
        return 0.5 * (diff * sol).sum(-1)

    def residual(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r""":math:`R(z, t)` = the EnergyMLP's energy minus its initial value :math:`c_{\rm in}^2
        \lVert z\rVert^2/2` (zero before training)."""
        alpha = self.process.alpha(t).to(z)
        sigma = self.process.sigma(t).to(z)
        c_in2 = 1.0 / (alpha**2 * self.net.sigma_data**2 + sigma**2)
        base = 0.5 * c_in2 * (z**2).sum(-1)
        return self.net.energy(z, t) - base

    def energy(self, z: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device)
        return self._gaussian_energy(z, t) + self.residual(z, t)

    def forward(self, z: torch.Tensor, t) -> torch.Tensor:
        keep_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            zg = z if z.requires_grad else z.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.energy(zg, t).sum(), zg, create_graph=keep_graph)
        return -grad if keep_graph else -grad.detach()


class ProductEnergy:
    r"""The summed energy :math:`\sum_k E_k(\mu + R w, t)` in sampling coordinates ``w``, and
    ``log_prob_and_grad`` closures for the MCMC kernels (``-energy`` and its gradient)."""

    def __init__(self, models: list[ShardEnergy], shift: torch.Tensor, root: torch.Tensor):
        self.models, self.shift, self.root = models, shift, root
        self.num_evals = 0

    def energy(self, w: torch.Tensor, t: float) -> torch.Tensor:
        z = self.shift + w @ self.root.T
        tt = torch.tensor(t, dtype=w.dtype, device=w.device)
        self.num_evals += w.shape[0]
        return sum(m.energy(z, tt) for m in self.models)

    def log_prob_and_grad(self, t: float):
        def fn(w: torch.Tensor):
            with torch.enable_grad():
                wg = w.detach().requires_grad_(True)
                e = self.energy(wg, t)
                (g,) = torch.autograd.grad(e.sum(), wg)
            return -e.detach(), -g.detach()

        return fn


def whitening(subposteriors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The common affine map of the combiner: mean ``m (dim,)`` and Cholesky factor ``L`` of the
    pooled draws' covariance, :math:`z = L^{-1}(x - m)`."""
    m, cov = sample_moments(torch.cat(subposteriors))
    return m, torch.linalg.cholesky(cov)


def fit_shard_energy(
    z: torch.Tensor,
    grad_z: torch.Tensor | None,
    *,
    shard: int = 0,
    hidden: int = 64,
    depth: int = 3,
    num_steps: int = 6000,
    batch_size: int = 512,
    lr: float = 2e-3,
    seed: int = 0,
    t_min: float = 1e-3,
    small_t_fraction: float = 0.5,
    loss: str = "mixed",
    num_reference: int = 1024,
    ema_decay: float = 0.999,
    focus_weights: torch.Tensor | None = None,
    focus_fraction: float = 0.5,
    focus_t_max: float | None = None,
    worker_threads: int | None = 1,
) -> dict:
    r"""Fit one shard's :class:`ShardEnergy` with the toolkit's
    :func:`~diffstat.diffusion.training.train_score_model` (runs in a worker).

    Parameters
    ----------
    z, grad_z : (n, dim)
        Whitened draws and the scores there (``None``: the DSM form of the loss).
    loss : ``"mixed"`` (default) or ``"stf"``
        ``"stf"``: the mixed TSM/DSM target averaged over the empirical posterior of
        ``num_reference`` draws (:func:`~diffstat.diffusion.losses.stf_loss`; module notes);
        ``"mixed"``: the plain mixed target (``"dsm"`` without ``grad_z``).
    num_steps, batch_size, lr, ema_decay
        Adam with a cosine-decayed learning rate (to 5% of ``lr``); the EMA weights are kept.
    small_t_fraction : float
        Share of each batch's times drawn log-uniformly on ``[t_min, 1]``.
    focus_weights : (n,), optional; focus_fraction, focus_t_max : float
        A share ``focus_fraction`` of each batch drawn with probability proportional to
        ``focus_weights`` (where the product lives), at times log-uniform on
        ``[t_min, focus_t_max]`` (``TrainConfig.focus_fraction``).

    Returns
    -------
    dict with ``state_dict``, the constructor settings, ``loss`` (training loss history),
    ``fit_time`` (seconds) and ``shard``.
    """
    from diffstat.diffusion.processes import VP
    from diffstat.diffusion.training import train_score_model

    if worker_threads is not None:
        torch.set_num_threads(int(worker_threads))
    if loss not in ("stf", "mixed"):
        raise ValueError(f"loss must be 'stf' or 'mixed', got {loss!r}")
    start = time.perf_counter()
    z = z.detach().float()
    grad_z = None if grad_z is None else grad_z.detach().float()
    mean, cov = sample_moments(z)
    process = VP(t_min=t_min)
    model = ShardEnergy(mean, cov, hidden=hidden, depth=depth, process=process, seed=seed)
    gen = torch.Generator().manual_seed(int(seed))
    config = _train_config(
        num_steps, batch_size, lr, ema_decay, loss, grad_z is not None, num_reference, small_t_fraction,
        focus_fraction if focus_weights is not None else 0.0, focus_t_max,
    )  # fmt: skip
    result = train_score_model(
        model, process, z, grad_z, config=config, generator=gen, focus_weights=focus_weights
    )
    return {
        "state_dict": {k: v.detach().clone() for k, v in result.model.state_dict().items()},
        "settings": dict(hidden=hidden, depth=depth, t_min=t_min, seed=seed),
        "dim": z.shape[1],
        "loss": result.history["train_loss"],
        "fit_time": time.perf_counter() - start,
        "shard": shard,
    }


def _train_config(
    num_steps, batch_size, lr, ema_decay, loss, has_scores, num_reference, small_t_fraction,
    focus_fraction, focus_t_max,
):  # fmt: skip
    """The toolkit's ``TrainConfig`` for one shard: Adam with a cosine decay to 5% of ``lr``, the
    loss ``"dsm"`` (weighted by sigma^2) where no scores were stored, no validation split (every
    draw trains), the loss recorded 20 times."""
    from diffstat.diffusion.training import TrainConfig

    return TrainConfig(
        num_steps=int(num_steps),
        batch_size=int(batch_size),
        lr=lr,
        ema_decay=ema_decay,
        loss=loss if (loss == "stf" or has_scores) else "dsm",
        val_fraction=0.0,
        eval_every=max(1, int(num_steps) // 20),
        lr_schedule="cosine",
        lr_final_ratio=0.05,
        num_reference=int(num_reference),
        small_t_fraction=small_t_fraction,
        focus_fraction=focus_fraction,
        focus_t_max=focus_t_max,
        weighting=None if has_scores else "sigma2",
    )


def focus_weights(zs, mu_p, cov_p, focus_width, focus_fraction, t_min):
    """Per shard, weights ``(n_k,)`` of its draws near the Gaussian product ``N(mu_p, cov_p)``
    (within about ``focus_width`` of its sds), trained at small t while sigma_t is below the
    product's smallest sd; and the matching :func:`fit_shard_energy` options. ``focus_width=None``:
    no focus."""
    from diffstat.diffusion.processes import VP

    if focus_width is None:
        return [None] * len(zs), {}
    sd_min = float(torch.linalg.eigvalsh(cov_p).min().sqrt())
    sigma = torch.tensor(min(sd_min, 0.5), dtype=torch.float64)
    focus = dict(focus_fraction=focus_fraction, focus_t_max=float(VP(t_min=t_min).time_at_sigma(sigma)))
    prec = torch.linalg.inv(focus_width**2 * cov_p)
    return [
        torch.softmax(-0.5 * (((z - mu_p) @ prec) * (z - mu_p)).sum(-1), 0).float().cpu() for z in zs
    ], focus


def fit_shard_energies(
    args: list[tuple], kwargs: list[dict], executor=None, max_retries: int = 2, progress: bool = False
) -> list[dict]:
    """:func:`fit_shard_energy` for every shard: on ``executor`` with retries
    (:func:`~diffstat.dnc.tasks.map_with_retries`), or in this process."""
    if executor is not None:
        return map_with_retries(
            executor,
            fit_shard_energy,
            args,
            kwargs,
            max_retries=max_retries,
            progress=progress,
            desc="fitting shard models",
        )
    fits = []
    with progress_bar(len(args), "fitting shard models", progress) as bar:
        for a, kw in zip(args, kwargs):
            fits.append(fit_shard_energy(*a, **kw, worker_threads=None))
            bar.update()
    return fits


def load_shard_energy(fit: dict) -> ShardEnergy:
    """Rebuild the :class:`ShardEnergy` returned (as a state dict) by :func:`fit_shard_energy`."""
    from diffstat.diffusion.processes import VP

    s = fit["settings"]
    dim = fit["dim"]
    model = ShardEnergy(
        torch.zeros(dim),
        torch.eye(dim),
        hidden=s["hidden"],
        depth=s["depth"],
        process=VP(t_min=s["t_min"]),
        seed=s["seed"],
    )
    model.load_state_dict(fit["state_dict"])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
