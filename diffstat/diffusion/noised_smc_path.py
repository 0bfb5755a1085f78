r"""The noised path of the particle denoising diffusion sampler: whitening, noise schedule and guidance.

Coordinates
-----------
A pilot gives a mean :math:`m` and a covariance :math:`\Sigma = LL^\top`; the sampler works in
whitened coordinates :math:`z = L^{-1}(x - m)`, where the target is
:math:`\pi_z(z) = \tilde\pi(m + Lz)\,\lvert\det L\rvert` (same normalising constant :math:`Z`) and
the reference is :math:`\mathcal N(0, I)`. The potential is :math:`g = \pi_z / \mathcal N(0, I)`.

Noising path (Phillips, Zhao, Deligiannidis and Doucet 2024, section 3)
-----------------------------------------------------------------------
The OU/VP process started at the reference is stationary: :math:`X_t = a_t X_0 + \sqrt{\lambda_t}
\varepsilon` with :math:`a_t^2 + \lambda_t = 1`, and :math:`X_0 \mid X_t = x \sim \mathcal N(a_t x,
\lambda_t I)`. Started at :math:`\pi_z` instead, its marginals are :math:`\pi_t(x) = \mathcal N(x; 0,
I)\, g_t(x) / Z` with :math:`g_t(x) = \mathbb E[g(X_0) \mid X_t = x]` under the reference. The
sampler targets :math:`\gamma_k(x) = \mathcal N(x; 0, I)\,\hat g_k(x)` on a grid of noise levels
:math:`\lambda_K \approx 1 > \dots > \lambda_0 = 0`, with any guidance :math:`\hat g_k` that is exact
at :math:`\lambda_0 = 0` (:math:`\hat g_0 = g`); the SMC weights correct the rest.

Guidance
--------
PDDS's simple guidance evaluates :math:`g` at the posterior mean, :math:`\hat g_k(x) = g(a_k x)`.
Here it is raised to a power:

.. math:: \log \hat g_k(x) = \beta_k \log g(a_k x), \qquad
          \beta_k = \frac{s^2}{a_k^2 s^2 + \lambda_k},

with :math:`s^2 \le 1` a mode scale. For a target :math:`\mathcal N(\mu, s^2 I)` in whitened
coordinates this is the exact :math:`g_t` for every :math:`\mu` (both sides are Gaussian in
:math:`x` with precision :math:`1/(a^2 s^2 + \lambda)` and mean :math:`a\mu/(a^2 s^2 + \lambda)`
times the variance), and :math:`s = 1` is PDDS's simple guidance. For narrow modes (:math:`s \ll 1`)
the power flattens :math:`g` at high noise, where :math:`g(a x)` alone would put the intermediate
modes at :math:`\mu/a` with weights that vanish like :math:`e^{-\lambda\lvert\mu\rvert^2/(2 s^2)}`.
The default :math:`s^2` is estimated from the pilot by the score identity
:math:`\mathbb E\lvert\nabla\log\pi_z\rvert^2 = d/s^2` of an isotropic Gaussian (median over the
pilot points, robust to the funnel's neck), clipped to :math:`[10^{-4}, 1]`.

Schedule
--------
The grid is uniform in the log of the relative noise :math:`\lambda_k / (a_k^2 s^2)` from
:math:`e^{6}` (the modes are then invisible under the noise) to :math:`e^{-10}`, then
:math:`\lambda_0 = 0`: uniform in log signal-to-noise as in variational diffusion models (Kingma et
al. 2021), measured in units of the mode scale so that narrow modes get their share of the steps.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from diffstat.diffusion.gaussians import Whitening
from diffstat.diffusion.noised_smc_bank import bank_log_g
from diffstat.mcmc.base import MCMCState, as_per_chain, metropolis_accept
from diffstat.mcmc.mala import MALA_TARGET_ACCEPT, mala_proposal_log_density, mala_step
from diffstat.mcmc.metric import scale_noise, velocity

__all__ = [
    "GuidedState",
    "NoisedPath",
    "local_mala_step",
    "noise_schedule",
    "pilot_whitening",
]

#: Log relative noise lambda / (a^2 s^2) at the noisiest and the least noisy stage before lambda = 0.
LOG_NOISE_RANGE = (6.0, -10.0)
#: Bounds on the estimated squared mode scale (whitened units).
MODE_SCALE_SQ_BOUNDS = (1e-4, 1.0)
#: Pilot starts: reference draws shrunk toward its mean by these factors in turn (narrow starts find
#: narrow modes that a wide mode's pull hides from far away, as in :mod:`diffstat.diffusion.modes`).
PILOT_START_SCALES = (0.25, 0.5, 1.0)
#: Smallest curvature -d^2 log pi_z accepted by the Laplace guidance (a convex stretch between modes
#: would otherwise give no maximum); 0.01 is a scale of 10 whitened units, beyond the reference.
MIN_CURVATURE = 1e-2
#: Guidance kinds: PDDS's simple g(a x); its power g(a x)^beta; the Laplace approximation of g_t;
#: the pilot's mode bank times the simple guidance of the residual.
GUIDANCES = ("simple", "power", "laplace", "bank")


class GuidedState(NamedTuple):
    """Particles ``x (n, dim)`` (whitened) at a stage, with ``log_g = log g_k(x) (n,)``, its gradient
    ``grad_g (n, dim)`` and the target log-density at the guidance point ``target_lp (n,)``."""

    x: torch.Tensor
    log_g: torch.Tensor
    grad_g: torch.Tensor
    target_lp: torch.Tensor

    def index(self, idx: torch.Tensor) -> GuidedState:
        return GuidedState(*(t[idx] for t in self))

    def where(self, mask: torch.Tensor, other: GuidedState) -> GuidedState:
        m = mask.unsqueeze(-1)
        return GuidedState(
            torch.where(m, other.x, self.x),
            torch.where(mask, other.log_g, self.log_g),
            torch.where(m, other.grad_g, self.grad_g),
            torch.where(mask, other.target_lp, self.target_lp),
        )


class NoisedPath:
    r"""The targets :math:`\gamma_k(x) = \mathcal N(x; 0, I)\,\hat g_k(x)` in whitened coordinates.

    Parameters
    ----------
    target : Target
        Counts every evaluation (one per point for a log-density and its gradient).
    whitening : Whitening
    mode_scale_sq : float
        :math:`s^2` of the guidance power (module docstring); 1 gives PDDS's simple guidance.
    """

    def __init__(
        self, target, whitening: Whitening, mode_scale_sq: float = 1.0, guidance: str = "power", bank=None
    ):
        if guidance not in GUIDANCES:
            raise ValueError(f"unknown guidance {guidance!r}; choose one of {', '.join(GUIDANCES)}")
        if guidance == "bank" and bank is None:
            raise ValueError("guidance='bank' needs a mode bank")
        self.guidance = guidance
        self.bank = bank
        self.target = target
        self.whitening = whitening
        self.dim = target.dim
        self.mode_scale_sq = float(mode_scale_sq)
        self._half_log_2pi = 0.5 * self.dim * math.log(2 * math.pi)

    def beta(self, rho: torch.Tensor) -> torch.Tensor:
        """Guidance power at :math:`a^2 = \\rho`: :math:`s^2 / (\\rho s^2 + 1 - \\rho)`."""
        s2 = self.mode_scale_sq
        return s2 / (rho * s2 + 1.0 - rho)

    def log_g(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:math:`\\log g(y)` ``(n,)``, its gradient ``(n, dim)`` and :math:`\\log\\tilde\\pi(m + Ly)`."""
        w = self.whitening
        lp, grad_x = self.target.log_prob_and_grad(w.from_white(y))
        log_g = lp + w.log_det + 0.5 * (y**2).sum(-1) + self._half_log_2pi
        return log_g, grad_x @ w.chol + y, lp

    def evaluate(self, x: torch.Tensor, rho: torch.Tensor) -> GuidedState:
        r"""The guidance :math:`\log\hat g_k(x)` and the drift :math:`\nabla\log\hat g_k(x)` at the
        signal fraction ``rho`` (:math:`a^2`); exactly :math:`\log g(x)` at ``rho = 1``."""
        if self.guidance == "laplace" and float(rho) < 1.0:
            return self._laplace(x, rho)
        if self.guidance == "bank" and float(rho) < 1.0:
            return self._bank(x, rho)
        a = torch.sqrt(rho)
        beta = self.beta(rho) if self.guidance == "power" else torch.ones_like(rho)
        lg, grad, lp = self.log_g(a * x)
        return GuidedState(x, beta * lg, (beta * a) * grad, lp)

    def _bank(self, x: torch.Tensor, rho: torch.Tensor) -> GuidedState:
        """Bank guidance times the power guidance of the residual (:mod:`.noised_smc_bank`)."""
        a = torch.sqrt(rho)
        y = a * x
        lg, grad, lp = self.log_g(y)
        bank_t, grad_t = bank_log_g(self.bank, x, rho)
        bank_0, grad_0 = bank_log_g(self.bank, y, torch.ones_like(rho))
        beta = self.beta(rho)
        return GuidedState(x, bank_t + beta * (lg - bank_0), grad_t + (beta * a) * (grad - grad_0), lp)

    def target_lp(self, gs: GuidedState) -> torch.Tensor:
        """The target log-density :math:`\\log\\tilde\\pi(m + Lx)` ``(n,)`` of a state at zero noise,
        from its :math:`\\log\\hat g_0 = \\log g` (no evaluation)."""
        return gs.log_g - self.whitening.log_det - 0.5 * (gs.x**2).sum(-1) - self._half_log_2pi

    def log_pi_and_grad(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:math:`\\log\\pi_z(z)` ``(n,)`` and its gradient ``(n, dim)`` in whitened coordinates."""
        w = self.whitening
        lp, grad_x = self.target.log_prob_and_grad(w.from_white(z))
        return lp + w.log_det, grad_x @ w.chol

    def _laplace(self, x: torch.Tensor, rho: torch.Tensor) -> GuidedState:
        r"""Laplace guidance: :math:`F(u) = \log g(u) - \lVert u - y\rVert^2 / (2\lambda)`, ``y = a x``,
        maximised by one Newton step whose isotropic curvature :math:`\kappa` is measured by a secant
        along a trial step (the pilot's scale), so that :math:`\log\hat g = F(y) + \lVert\nabla F(y)
        \rVert^2 / (2\kappa) - \tfrac d2 \log(\lambda\kappa)` is exact for isotropic Gaussian
        modes; drift :math:`a (u^* - y)/\lambda` (the envelope theorem). Two evaluations per point."""
        a, lam = torch.sqrt(rho), 1.0 - rho
        y = a * x
        _, grad0, lp = self.log_g(y)
        eta = 1.0 / (1.0 / self.mode_scale_sq - 1.0 + 1.0 / lam)  # Newton step at the pilot's scale
        step = eta * grad0
        lg1, grad1, _ = self.log_g(y + step)
        sq = (step**2).sum(-1).clamp_min(torch.finfo(x.dtype).tiny)
        curv_pi = -((grad1 - grad0) * step).sum(-1) / sq + 1.0  # -d^2 log pi_z along the step
        curv_pi = torch.nan_to_num(curv_pi, nan=1.0).clamp(MIN_CURVATURE, 1.0 / MODE_SCALE_SQ_BOUNDS[0])
        kappa = curv_pi - 1.0 + 1.0 / lam
        newton = grad0 / kappa.unsqueeze(-1)
        lg2, _, _ = self.log_g(y + newton)
        value = torch.maximum(
            lg1 - 0.5 * sq / lam, lg2 - 0.5 * (newton**2).sum(-1) / lam
        )  # F at two real points
        log_gt = torch.nan_to_num(value, nan=-math.inf) - 0.5 * self.dim * torch.log(lam * kappa)
        drift = (a / lam) * newton
        return GuidedState(x, log_gt, drift, lp)

    @staticmethod
    def log_reference(x: torch.Tensor) -> torch.Tensor:
        """:math:`\\log\\mathcal N(x; 0, I)` up to the constant (it cancels in every ratio)."""
        return -0.5 * (x**2).sum(-1)

    def mala(self, generator, gs: GuidedState, rho, step_size, inv_mass) -> tuple[GuidedState, torch.Tensor]:
        """One MALA step (per-particle accept) leaving :math:`\\gamma_k` invariant; returns the new
        state and each particle's acceptance probability ``(n,)``."""
        cache = {}

        def log_prob_and_grad(x):
            new = self.evaluate(x, rho)
            cache["state"] = new
            return self.log_reference(x) + new.log_g, new.grad_g - x

        current = MCMCState(gs.x, self.log_reference(gs.x) + gs.log_g, gs.grad_g - gs.x)
        _, info = mala_step(generator, current, log_prob_and_grad, step_size, inv_mass)
        return gs.where(info.is_accepted, cache["state"]), info.acceptance_rate


def noise_schedule(num_steps: int, mode_scale_sq: float, dtype=torch.float64, device=None) -> torch.Tensor:
    r"""Signal fractions :math:`\rho_k = a_k^2`, ``(num_steps + 1,)``, from :math:`\rho_0 = 1`
    (no noise) increasing in noise with ``k`` (module docstring): :math:`\lambda/(\rho s^2)` is
    log-uniform over :data:`LOG_NOISE_RANGE` for ``k = 1..num_steps``."""
    hi, lo = LOG_NOISE_RANGE
    log_r = torch.linspace(lo, hi, num_steps, dtype=torch.float64)
    r = torch.exp(log_r) * mode_scale_sq  # lambda / rho = r  =>  rho = 1 / (1 + r)
    rho = torch.cat([torch.ones(1, dtype=torch.float64), 1.0 / (1.0 + r)])
    return rho.to(dtype=dtype, device=device)


def pilot_whitening(
    target,
    reference,
    generator,
    *,
    num_chains: int = 256,
    num_steps: int = 100,
    whiten: str = "pilot",
    device=None,
) -> tuple[Whitening, float, int, tuple]:
    r"""The pilot: ``num_chains`` MALA chains of ``num_steps`` steps started at reference draws
    shrunk toward the reference mean by :data:`PILOT_START_SCALES` in turn, preconditioned by the
    reference variance, with per-chain step sizes :math:`h \leftarrow h\,e^{a - 0.574}`.

    Returns the whitening, the squared mode scale :math:`s^2` in whitened units from the score
    identity at the chains' end points (module docstring), and the target evaluations spent. The
    whitening is the end points' mean and covariance (``whiten="pilot"``: the spread across the
    modes the chains reached) or the reference's own moments (``"reference"``: a reference chosen
    to cover every mode keeps covering them, where short chains may all fall into one basin).
    """
    if whiten not in ("pilot", "reference"):
        raise ValueError(f"whitening must be 'pilot', 'reference' or (mean, cov), got {whiten!r}")
    dtype = target.dtype
    before = target.num_target_evals
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=generator)))
        x = reference.sample((num_chains,)).to(dtype=dtype, device=device)
    var = _moment(reference, "variance", dtype, device)
    centre = _moment(reference, "mean", dtype, device)
    if whiten == "reference" and (centre is None or var is None):
        raise ValueError(
            f"whitening='reference' needs a reference with a finite mean and variance; "
            f"{type(reference).__name__} gives none: use whitening='pilot'"
        )
    centre = 0.0 if centre is None else centre
    scale = torch.tensor(PILOT_START_SCALES, dtype=dtype, device=device)[torch.arange(num_chains) % 3]
    x = centre + scale.unsqueeze(-1) * (x - centre)
    target.validate(x[:16])
    state = MCMCState(x, *target.log_prob_and_grad(x))
    h = 0.1 * scale**2  # per chain, times the reference variance as the metric
    for _ in range(num_steps):
        state, info = mala_step(generator, state, target.log_prob_and_grad, h, var)
        h = h * torch.exp(info.acceptance_rate - MALA_TARGET_ACCEPT)
    ok = torch.isfinite(state.log_prob)
    x, grad, lp = state.x[ok], state.grad[ok], state.log_prob[ok]
    eye = torch.eye(target.dim, dtype=dtype, device=device)
    if whiten == "pilot":
        mean, cov = x.mean(0), torch.cov(x.T).reshape(target.dim, target.dim)
        cov = cov + 1e-6 * cov.diagonal().mean() * eye
    else:  # "reference"
        mean, cov = centre, torch.diag_embed(var)
        if hasattr(reference, "covariance_matrix"):
            cov = reference.covariance_matrix.to(dtype=dtype, device=device)
    white = Whitening.from_moments(mean, cov)
    grad_z = grad @ white.chol
    s2 = target.dim / float(torch.median((grad_z**2).sum(-1)))
    s2 = min(max(s2, MODE_SCALE_SQ_BOUNDS[0]), MODE_SCALE_SQ_BOUNDS[1])
    return white, s2, target.num_target_evals - before, (x, lp, grad)


def _moment(reference, name: str, dtype, device) -> torch.Tensor | None:
    """The reference's ``mean`` or ``variance`` ``(dim,)``, or None where the distribution does not
    give one (``NotImplementedError``: a Pyro model's prior, a transformed distribution) or it is
    not finite (a Cauchy's): the pilot then centres its starts at 0 and runs unpreconditioned."""
    try:
        value = getattr(reference, name)
    except (NotImplementedError, AttributeError):
        return None
    value = torch.as_tensor(value).to(dtype=dtype, device=device)
    return value if bool(torch.isfinite(value).all()) else None


def local_mala_step(generator, state: MCMCState, log_prob_and_grad, step_size, inv_mass=None):
    r"""MALA with a position-dependent step :math:`h(x) = h\,\min\{1, d / \lVert\nabla\log\gamma(x)
    \rVert^2_{M^{-1}}\}`: the score identity :math:`\mathbb E\lVert\nabla\log\gamma\rVert^2_{M^{-1}}
    = d` of a Gaussian whose covariance is :math:`M^{-1}` makes the factor about 1 where the metric
    fits and shrinks the step where the target is locally narrower than the metric (a funnel's neck,
    where one shared step size never accepts). The proposal :math:`y \sim \mathcal N(x + h(x)
    M^{-1}\nabla\log\gamma(x), 2h(x) M^{-1})` is corrected by Metropolis-Hastings with the reverse
    density at :math:`h(y)` (Girolami and Calderhead 2011 with a scalar position-dependent metric),
    so :math:`\gamma` is invariant. Same signature as :func:`~diffstat.mcmc.mala.mala_step`."""
    x, g = state.x, state.grad
    d = x.shape[-1]

    def local(grad):
        sq = (grad * velocity(inv_mass, grad)).sum(-1)
        return step_size * torch.clamp(d / sq.clamp_min(torch.finfo(x.dtype).tiny), max=1.0)

    h_x = as_per_chain(local(g), x)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    y = x + h_x * velocity(inv_mass, g) + torch.sqrt(2 * h_x) * scale_noise(inv_mass, noise)
    lp_y, g_y = log_prob_and_grad(y)
    h_y = as_per_chain(torch.nan_to_num(local(g_y), nan=1.0), x)
    log_fwd = mala_proposal_log_density(y, x, g, h_x, inv_mass) - 0.5 * d * torch.log(h_x.squeeze(-1))
    log_bwd = mala_proposal_log_density(x, y, g_y, h_y, inv_mass) - 0.5 * d * torch.log(h_y.squeeze(-1))
    log_ratio = lp_y - state.log_prob + log_bwd - log_fwd
    return metropolis_accept(generator, state, MCMCState(y, lp_y, g_y), log_ratio, x.shape[0])
