r"""Learned guidance for the particle denoising diffusion sampler (``method="pdds"``, ``num_rounds``).

Algorithm (Phillips, Zhao, Deligiannidis and Doucet 2024, section 4: the guidance refined by a
network trained on the sampler's own particles)
-----------------------------------------------------------------------------------------------
Round 1 is the sampler with its usual guidance :math:`\log\hat g^{(1)}_k`
(:mod:`diffstat.diffusion.noised_smc_path`). Its final weighted particles :math:`x_0^i` (whitened)
and the gradients :math:`\nabla\log\pi_z(x_0^i)` it already paid for train a noise-conditional
energy network :math:`E_\theta(x, u)` (:class:`~diffstat.diffusion.networks.EnergyMLP`), a model of
:math:`-\log\pi_t(x)` at the log relative noise :math:`u = \log(\lambda/\rho)`, with the mixed
TSM/DSM loss (:func:`~diffstat.diffusion.losses.mixed_loss`, De Bortoli et al. 2024): for
:math:`x_t = a x_0 + \sqrt\lambda\,z` the regression target of the score is
:math:`a\,\nabla\log\pi_z(x_0) - \sqrt\lambda\,z` (TSM weight :math:`a^2 = \rho`, DSM weight
:math:`\lambda` on the VP path), whose conditional mean given :math:`x_t` is
:math:`\nabla\log\pi_t(x_t)`. Training points are drawn from the particles in proportion to their
weights, noise levels uniformly in :math:`u` over the schedule's range. No target evaluation is
spent on training (the DSM part needs none, the TSM part reuses the particles' gradients). The
network's guidance is :math:`h_\theta(x, u) = \log g^{\rm bank}_t(x) - E_\theta(x, u) + \lVert
x\rVert^2/2`, with the closed-form noised guidance of the pilot's mode bank where the round-1
guidance has one (:class:`LearnedGuidance`); the untrained network's energy is the reference's, so
:math:`h` starts as the bank's :math:`\log g_t` (or 0).

Round 2 runs the same SMC with

.. math:: \log\hat g^{(2)}_k(x) = \log\hat g^{(1)}_k(x) + m_k\,[h_\theta(x, u_k) - \log\hat
          g^{(1)}_k(x)], \qquad m_k = \frac{\lambda_k}{\lambda_k + \rho_k s^2 e^{-c}},

a correction that is exactly 0 at zero noise (:math:`m_0 = 0`), so :math:`\hat g_0 = g` and the
estimate of :math:`Z` stays unbiased whatever the network; its gradient is taken by autograd through
the network. The mixing weight is a logistic function of the log relative noise in units of the
mode scale :math:`s` (the schedule's unit), shifted by :math:`c` = :data:`MIX_SHIFT`: the network
(trained on the target's own particles) replaces the round-1 guidance wherever the relative noise
exceeds :math:`e^{-c}`, and the round-1 guidance, which converges to :math:`g`, takes over at the
last levels, where a network fitted to a sharp :math:`g_t` is least accurate. (The network cannot
learn a correction to the whole round-1 guidance without new evaluations: that guidance costs one
target evaluation per noised training point. It corrects the part that costs none, the bank's.)
With ``num_rounds > 2`` each round refits the network on the previous round's particles (the
round-1 guidance stays the base). The evidence and draws are the last round's; the evaluations
count every round.

Defaults: a network of width 64 and depth 3 (small enough to evaluate at every particle, level and
move at a few milliseconds per thousand points); 1000 Adam steps of 512 points at learning rate
2e-3 with cosine decay (a compromise between the fit and its time, which on a cheap target
exceeds a round's; fewer or more steps did not change the funnel's error beyond seed noise);
:math:`c = 4`
(the weight variance on a Gaussian with the exact :math:`g_t` as network stops falling there);
the log relative noise scaled by 1/8 in the network's time input, which keeps that input
:math:`O(1)` over the schedule. Measurements: ``docs/noised_smc.md``.
"""

from __future__ import annotations

import math

import torch

from diffstat.diffusion.losses import mixed_loss
from diffstat.diffusion.networks import EnergyMLP
from diffstat.diffusion.noised_smc_bank import bank_log_g
from diffstat.diffusion.noised_smc_path import LOG_NOISE_RANGE, GuidedState, NoisedPath

__all__ = ["LearnedGuidance", "LearnedPath", "fit_guidance", "mixing_weight"]

#: Width and depth of the energy network.
HIDDEN, DEPTH = 64, 3
#: Adam steps, batch size and initial learning rate (cosine decay to zero).
TRAIN_STEPS, BATCH, LEARNING_RATE = 1000, 512, 2e-3
#: c: the round-1 guidance dominates below the log relative noise -c (in units of the mode scale).
MIX_SHIFT = 4.0
#: Noise levels per training batch (the bank's guidance is computed per level).
LEVELS_PER_BATCH = 16
#: Scale of the log relative noise fed to the network's time embedding.
TIME_SCALE = 0.125


class _RelativeNoise:
    r"""The VP path indexed by the log relative noise :math:`u = \log(\lambda/\rho)`, in the form the
    score-matching losses take: :math:`\alpha_u = \sqrt{\rho}`, :math:`\sigma_u = \sqrt{\lambda}`."""

    @staticmethod
    def alpha(u: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(torch.sigmoid(-u))

    @staticmethod
    def sigma(u: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(torch.sigmoid(u))

    def marginal_sample(self, x0: torch.Tensor, u: torch.Tensor, generator):
        z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        return self.alpha(u).unsqueeze(-1) * x0 + self.sigma(u).unsqueeze(-1) * z, z


class LearnedGuidance(torch.nn.Module):
    r""":math:`h_\theta(x, u) = \log g^{\rm bank}_t(x) - E_\theta(x, u\,\tau) + \lVert x\rVert^2/2`
    with :math:`E_\theta` an :class:`~diffstat.diffusion.networks.EnergyMLP` (plain form, :math:`\tau`
    = :data:`TIME_SCALE`): a model of :math:`\log g_t(x)` up to a constant at the log relative
    noise ``u``. The first term, the closed-form noised guidance of the pilot's mode bank
    (:func:`~diffstat.diffusion.noised_smc_bank.bank_log_g`; absent without a ``bank``), costs no
    target evaluation, so the network learns only the correction to it."""

    def __init__(self, dim: int, dtype=torch.float64, device=None, seed: int = 0, bank=None):
        super().__init__()
        self.energy = EnergyMLP(dim, HIDDEN, DEPTH, seed=seed).to(dtype=dtype, device=device)
        self.bank = bank

    def _bank(self, x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The bank's :math:`\log g_t` and gradient at per-row (or one) ``u``, zero without a bank."""
        if self.bank is None:
            return torch.zeros_like(x[:, 0]), torch.zeros_like(x)
        u = u.expand(x.shape[0]) if u.dim() == 0 else u
        log_g, grad = torch.empty_like(x[:, 0]), torch.empty_like(x)
        for value in torch.unique(u):
            rows = u == value
            log_g[rows], grad[rows] = bank_log_g(self.bank, x[rows], torch.sigmoid(-value))
        return log_g, grad

    def score(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r""":math:`\nabla\log\pi_t(x)`, differentiable in the network's parameters (the loss)."""
        return self.energy(x, u * TIME_SCALE) + self._bank(x.detach(), u)[1]

    def log_g_and_grad(self, x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`h_\theta(x, u)` ``(n,)`` and its gradient ``(n, dim)``, detached."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            h = 0.5 * (xg**2).sum(-1) - self.energy.energy(xg, u * TIME_SCALE)
            (grad,) = torch.autograd.grad(h.sum(), xg)
        bank_h, bank_grad = self._bank(x, u)
        return h.detach() + bank_h, grad.detach() + bank_grad


def mixing_weight(rho: torch.Tensor, mode_scale_sq: float) -> torch.Tensor:
    r""":math:`m = \lambda / (\lambda + \rho s^2 e^{-c})`, :math:`c` = :data:`MIX_SHIFT`: 0 at zero
    noise, toward 1 at high noise."""
    lam = 1.0 - rho
    return lam / (lam + rho * mode_scale_sq * math.exp(-MIX_SHIFT))


class LearnedPath(NoisedPath):
    r"""The path of ``base`` with the guidance :math:`\log\hat g_k + m_k(h_\theta - \log\hat g_k)`
    (module docstring); the base's target, whitening, mode scale and guidance are kept."""

    def __init__(self, base: NoisedPath, network: LearnedGuidance):
        self.__dict__.update(base.__dict__)
        self.network = network

    def evaluate(self, x: torch.Tensor, rho: torch.Tensor) -> GuidedState:
        gs = super().evaluate(x, rho)
        m = mixing_weight(rho, self.mode_scale_sq)
        if float(m) == 0.0:
            return gs
        u = torch.log((1.0 - rho) / rho).to(x.dtype)
        h, grad_h = self.network.log_g_and_grad(x, u)
        return gs._replace(log_g=gs.log_g + m * (h - gs.log_g), grad_g=gs.grad_g + m * (grad_h - gs.grad_g))


def training_data(x: torch.Tensor, grad_log_g: torch.Tensor, log_weights: torch.Tensor):
    r"""Final particles at zero noise, :math:`\nabla\log\pi_z = \nabla\log g - x` and normalised
    weights, the particles with a non-finite weight or gradient dropped."""
    grad0 = grad_log_g - x
    ok = torch.isfinite(log_weights) & torch.isfinite(grad0).all(-1) & torch.isfinite(x).all(-1)
    if int(ok.sum()) < 2:
        raise ValueError("fewer than 2 particles with a finite weight to train the guidance on")
    w = torch.softmax(log_weights[ok], 0)
    return x[ok], grad0[ok], w


def fit_guidance(
    generator,
    x: torch.Tensor,
    grad_log_g: torch.Tensor,
    log_weights: torch.Tensor,
    mode_scale_sq: float,
    *,
    steps: int | None = None,
    batch: int | None = None,
    lr: float | None = None,
    bank=None,
) -> tuple[LearnedGuidance, float]:
    r"""Train :class:`LearnedGuidance` on weighted particles at zero noise (whitened ``x (n, dim)``,
    ``grad_log_g`` = :math:`\nabla\log g(x)`, ``log_weights (n,)``) with the mixed TSM/DSM loss,
    points drawn by their weights, :math:`u` uniform on the schedule's range for ``mode_scale_sq``.
    Returns the network (frozen) and the mean loss over the last tenth of the steps. ``steps``,
    ``batch``, ``lr``: default :data:`TRAIN_STEPS`, :data:`BATCH`, :data:`LEARNING_RATE`."""
    steps, batch, lr = steps or TRAIN_STEPS, batch or BATCH, lr or LEARNING_RATE
    x0, grad0, w = training_data(x, grad_log_g, log_weights)
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator, device=generator.device))
    net = LearnedGuidance(x.shape[1], x.dtype, x.device, seed, bank)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    lo, hi = (v + math.log(mode_scale_sq) for v in sorted(LOG_NOISE_RANGE))
    process, tail = _RelativeNoise(), []
    for k in range(steps):
        idx = torch.multinomial(w, batch, replacement=True, generator=generator)
        u = lo + (hi - lo) * torch.rand(LEVELS_PER_BATCH, generator=generator, dtype=x.dtype, device=x.device)
        u = u.repeat_interleave(-(-batch // LEVELS_PER_BATCH))[:batch]
        loss = mixed_loss(net.score, process, x0[idx], grad0[idx], generator, t=u, weighting="none")
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if k >= steps - max(steps // 10, 1):
            tail.append(loss.item())
    net.requires_grad_(False)
    return net, sum(tail) / len(tail)


def refine_path(generator, path: NoisedPath, num_rounds: int, run) -> tuple[NoisedPath, dict]:
    r"""Run ``num_rounds - 1`` rounds (``run(path)`` is one SMC run) and after each fit the network
    on its final particles; returns the last round's path (the base itself when ``num_rounds`` is
    1) and attrs: the earlier rounds' log Z estimates, their standard errors and the final training
    losses."""
    base, log_zs, ses, losses = path, [], [], []
    for _ in range(num_rounds - 1):
        out = run(path)
        gs = out.particles
        bank = base.bank if base.guidance == "bank" else None
        net, loss = fit_guidance(generator, gs.x, gs.grad_g, out.log_weights, base.mode_scale_sq, bank=bank)
        path = LearnedPath(base, net)
        log_zs.append(out.log_normalizer)
        ses.append(out.log_normalizer_se)
        losses.append(loss)
    return path, {
        "num_rounds": num_rounds,
        "round_log_normalizers": log_zs,
        "round_log_normalizer_ses": ses,
        "guidance_fit_losses": losses,
    }
