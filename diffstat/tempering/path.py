r"""The geometric path between a reference and the target, and MCMC moves along it.

For an inverse temperature :math:`\beta \in [0, 1]` the tempered density is

.. math::
    \log \pi_\beta(x) = \log \rho(x) + \beta\, \delta(x), \qquad
    \delta(x) = \log \tilde\pi(x) - \log \rho(x),

so :math:`\pi_0 = \rho` (the normalised reference) and :math:`\pi_1 = \tilde\pi` (the unnormalised
target, :math:`Z = \int \tilde\pi`). Moving from :math:`\beta` to :math:`\beta'` multiplies a
particle's weight by :math:`\exp\{(\beta' - \beta)\,\delta(x)\}` (the incremental log weight), and
the increments telescope: :math:`\sum_k (\beta_k - \beta_{k-1})\,\delta(x) = \delta(x)` over a
schedule from 0 to 1.

Two kinds of reference:

* **geometric** (any target): :math:`\rho` is the ``reference=`` option, else the target's own
  reference, else :math:`\mathcal N(0, I)`; :math:`\pi_\beta \propto \rho^{1-\beta}\tilde\pi^\beta`.
  A path made by :func:`make_path` replaces that last :math:`\mathcal N(0, I)` by a Gaussian fitted
  to the posterior's peaks where a pilot finds them clearly out of its reach
  (:mod:`diffstat.tempering.auto_reference`); ``reference_source`` says which.
* **likelihood** (a target with ``log_prior`` and ``log_likelihood`` methods, such as a Pyro
  model, and no ``reference=`` override): :math:`\rho` is the prior and :math:`\delta` the
  log-likelihood, so :math:`\pi_\beta \propto \text{prior} \times \text{likelihood}^\beta`. Both
  come from one model run with ``target.log_prior_and_likelihood`` where the target has it
  (:class:`~diffstat.pyro_target.PyroTarget`), else as ``target.log_prob - target.log_prior``: one
  counted target evaluation per point either way.

Every point is evaluated once through the target (``log_prob_and_grad`` or
``log_prior_and_likelihood``, counted in ``num_target_evals``); a reference evaluated apart from
the target is free (it is not the target). A
:class:`PathState` caches both parts, so changing :math:`\beta` never re-evaluates the target.
"""

from __future__ import annotations

import functools
from typing import NamedTuple
from collections.abc import Callable

import torch

from diffstat.mcmc.base import MCMCInfo, MCMCState, rows_finite
from diffstat.mcmc.dr_mala import DR_MALA_TARGET_ACCEPT, dr_mala_step
from diffstat.mcmc.hmc import HMC_TARGET_ACCEPT, hmc_step
from diffstat.mcmc.mala import MALA_TARGET_ACCEPT, mala_step
from diffstat.mcmc.rwm import RWM_TARGET_ACCEPT, rwm_step
from diffstat.target import resolve_reference

__all__ = [
    "GeometricPath",
    "make_path",
    "PathState",
    "tempered_state",
    "incremental_log_weights",
    "move",
    "get_kernel",
    "default_step_size",
]


class PathState(NamedTuple):
    """Particles ``x: (n, dim)`` with the reference log-density ``base (n,)`` and its gradient
    ``base_grad (n, dim)``, and ``delta = log target - base (n,)`` with its gradient ``(n, dim)``."""

    x: torch.Tensor
    base: torch.Tensor
    base_grad: torch.Tensor
    delta: torch.Tensor
    delta_grad: torch.Tensor

    @property
    def target_log_prob(self) -> torch.Tensor:
        """The target's (unnormalised) log-density ``(n,)`` at the particles."""
        return self.base + self.delta

    def index(self, idx: torch.Tensor) -> PathState:
        """Particles selected (or resampled) by ``idx: (m,)`` long."""
        return PathState(*(t[idx] for t in self))

    def where(self, mask: torch.Tensor, other: PathState) -> PathState:
        """Per particle, ``other`` where ``mask (n,)`` is True, else ``self``."""
        return PathState(*(_where(mask, a, b) for a, b in zip(other, self)))


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.reshape(-1, *([1] * (a.dim() - 1))), a, b)


def _scaled(beta, delta: torch.Tensor) -> torch.Tensor:
    """``beta * delta`` with ``0 * (-inf) = 0`` (a point outside the target's support is still a
    point of the reference at beta = 0)."""
    out = beta * delta
    return torch.where(torch.isnan(out) & (torch.as_tensor(beta) == 0), torch.zeros_like(out), out)


def _as_column(beta, like: torch.Tensor):
    """A scalar beta stays a scalar; a ``(n,)`` tensor becomes ``(n, 1)`` for gradients."""
    if torch.is_tensor(beta) and beta.dim() == 1:
        return beta, beta.unsqueeze(-1)
    return beta, beta


def tempered_state(ps: PathState, beta) -> MCMCState:
    r"""The MCMC state of :math:`\pi_\beta` at the particles, without evaluating the target.

    ``beta`` is a float, a 0-d tensor, or ``(n,)`` (one inverse temperature per particle, as in
    parallel tempering).
    """
    b, b_col = _as_column(beta, ps.x)
    lp = ps.base + _scaled(b, ps.delta)
    grad = ps.base_grad + _scaled(b_col, ps.delta_grad)
    return MCMCState(ps.x, lp, grad)


def incremental_log_weights(ps: PathState, beta_from, beta_to) -> torch.Tensor:
    r"""Log of :math:`\pi_{\beta'}(x) / \pi_\beta(x) = (\beta' - \beta)\,\delta(x)`, shape ``(n,)``."""
    return _scaled(beta_to - beta_from, ps.delta)


class GeometricPath:
    r"""The path :math:`\pi_\beta \propto \rho^{1-\beta}\,\tilde\pi^\beta` from a reference
    :math:`\rho` to a :class:`~diffstat.Target` (see the module docstring).

    Parameters
    ----------
    target : Target
    reference : torch.distributions.Distribution, optional
        Overrides the target's reference (already checked by ``resolve_reference``). Without it a
        target with ``log_prior``/``log_likelihood`` is tempered in its likelihood only.
    auto_reference : bool
        Where the reference would be N(0, I) (geometric, none given, none of the target's), let
        :func:`~diffstat.tempering.auto_reference.default_reference` decide at the first use (when
        the device is known) whether a fitted Gaussian replaces it.

    Attributes
    ----------
    reference_source : str
        ``"given"`` (``reference=``), ``"target"`` (the target's own), ``"prior"`` (likelihood
        tempering), ``"N(0, I)"`` or ``"fitted"``; ``"auto"`` until the first use decides.
    """

    def __init__(
        self, target, reference: torch.distributions.Distribution | None = None, auto_reference=False
    ):
        self.target = target
        self.reference = reference
        has_terms = callable(getattr(target, "log_prior", None)) and callable(
            getattr(target, "log_likelihood", None)
        )
        self.likelihood_tempering = reference is None and has_terms
        self.dim = target.dim
        own = getattr(target, "reference", None)
        if reference is not None:
            self.reference_source = "given"
        elif self.likelihood_tempering:
            self.reference_source = "prior"
        elif own is not None:
            self.reference_source = "target"
        else:
            self.reference_source = "auto" if auto_reference else "N(0, I)"

    def resolve(self, device=None) -> None:
        """At the first use of an ``"auto"`` reference, decide it (cached on the target)."""
        if self.reference_source != "auto":
            return
        from diffstat.tempering.auto_reference import default_reference

        self.reference = default_reference(self.target, device)
        self.reference_source = "N(0, I)" if self.reference is None else "fitted"

    @property
    def kind(self) -> str:
        """``"likelihood"`` (prior times likelihood to the beta) or ``"geometric"``."""
        return "likelihood" if self.likelihood_tempering else "geometric"

    # ------------------------------------------------------------------ the reference (free)
    def sample_reference(self, n: int, generator: torch.Generator, device=None) -> torch.Tensor:
        """``n`` exact draws ``(n, dim)`` from the reference (the prior for likelihood tempering)."""
        self.resolve(device if device is not None else generator.device)
        if self.reference is None:
            return self.target.sample_reference(n, generator, device)
        device = torch.device(device) if device is not None else generator.device
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            x = self.reference.sample((n,))
        return x.to(device=device, dtype=self.target.dtype)

    def reference_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        r"""Normalised reference log-density ``(n,)``: not a target evaluation, not counted. A row
        that is not finite (a trajectory that overflowed) gets :math:`-\infty`, so that the move
        is rejected, instead of the ``ValueError`` of a distribution's argument check."""
        self.resolve(x.device)
        bad = ~rows_finite(x)
        if bool(bad.any()):
            safe = torch.where(bad.unsqueeze(-1), torch.zeros_like(x), x)
            return self.reference_log_prob(safe).masked_fill(bad, -torch.inf)
        if self.likelihood_tempering:
            before = self.target.num_target_evals
            lp = self.target.log_prior(x)
            self.target.num_target_evals = before  # the prior is the reference: free
            return lp
        if self.reference is not None:
            return self.reference.log_prob(x).to(x.dtype)
        return self.target.reference_log_prob(x).to(x.dtype)

    def _reference_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.resolve(x.device)
        if not self.likelihood_tempering:
            if self.reference is None and self.target.reference is None:
                return self.target.reference_log_prob(x).to(x.dtype), -x  # N(0, I)
            grad = _gaussian_score(self.reference if self.reference is not None else self.target.reference, x)
            if grad is not None:
                return self.reference_log_prob(x), grad
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            lp = self.reference_log_prob(xg)
            (grad,) = torch.autograd.grad(lp.sum(), xg, allow_unused=True)
        return lp.detach(), torch.zeros_like(x) if grad is None else grad.detach()

    # ------------------------------------------------------------------ evaluation (counted)
    def evaluate(self, x: torch.Tensor) -> PathState:
        """Evaluate the target (counts ``n``) and the reference (free) at ``x: (n, dim)``."""
        if self.likelihood_tempering and callable(getattr(self.target, "log_prior_and_likelihood", None)):
            return self._evaluate_terms(x)
        base, base_grad = self._reference_and_grad(x)
        lp, grad = self.target.log_prob_and_grad(x)
        delta = lp - base
        # Outside the target's support (lp = -inf) delta is -inf whatever the reference says.
        delta = torch.where(lp == -torch.inf, lp, delta)
        return PathState(x, base, base_grad, delta, grad - base_grad)

    def _evaluate_terms(self, x: torch.Tensor) -> PathState:
        """Prior and likelihood from one run of the model (``log_prior_and_likelihood``, which
        counts ``n``), with one backward pass for each gradient."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            prior, lik = self.target.log_prior_and_likelihood(xg)
            (g_prior,) = torch.autograd.grad(prior.sum(), xg, retain_graph=True, allow_unused=True)
            (g_lik,) = torch.autograd.grad(lik.sum(), xg, allow_unused=True)
        zeros = torch.zeros_like(x)
        return PathState(
            x,
            prior.detach(),
            zeros if g_prior is None else g_prior.detach(),
            lik.detach(),
            zeros if g_lik is None else g_lik.detach(),
        )

    def log_prob_and_grad(self, beta) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        r"""The tempered :math:`x \mapsto (\log\pi_\beta(x), \nabla\log\pi_\beta(x))` for the MCMC
        kernels (each call counts its points as target evaluations)."""

        def log_prob_and_grad(x: torch.Tensor):
            st = tempered_state(self.evaluate(x), beta)
            return st.log_prob, st.grad

        return log_prob_and_grad


def _gaussian_score(dist: torch.distributions.Distribution, x: torch.Tensor) -> torch.Tensor | None:
    """Closed-form score of a Gaussian reference (``Independent(Normal)`` or
    ``MultivariateNormal``), or None for any other distribution (autograd is used then)."""
    D = torch.distributions
    if (
        isinstance(dist, D.Independent)
        and isinstance(dist.base_dist, D.Normal)
        and dist.reinterpreted_batch_ndims == 1
    ):
        base = dist.base_dist
        return ((base.loc - x) / base.scale**2).to(x.dtype)
    if isinstance(dist, D.MultivariateNormal):
        diff = (dist.loc - x).to(dist.scale_tril.dtype).unsqueeze(-1)
        return torch.cholesky_solve(diff, dist.scale_tril).squeeze(-1).to(x.dtype)
    return None


def make_path(target, reference=None) -> GeometricPath:
    """The path a sampler uses: ``reference`` is the ``reference=`` option (checked by
    :func:`~diffstat.target.resolve_reference`); None means the target's own reference, or
    likelihood tempering for a target with ``log_prior`` and ``log_likelihood``, or else N(0, I)
    unless a pilot finds the posterior clearly out of its reach
    (:mod:`diffstat.tempering.auto_reference`)."""
    checked = None if reference is None else resolve_reference(target, reference)
    return GeometricPath(target, checked, auto_reference=True)


class _Recorder:
    """The tempered density at a fixed beta, remembering the :class:`PathState` of the last points
    it evaluated (a kernel's proposal), so an accepted move needs no second target evaluation."""

    def __init__(self, path: GeometricPath, beta):
        self.path, self.beta, self.last = path, beta, None

    def __call__(self, x: torch.Tensor):
        self.last = self.path.evaluate(x)
        st = tempered_state(self.last, self.beta)
        return st.log_prob, st.grad

    def evaluate_rows(self, x: torch.Tensor, rows: torch.Tensor):
        """A later stage of a delayed-rejection kernel: the points ``x: (m, dim)`` proposed for the
        rows ``rows (m,)`` of the last full batch, merged into ``last`` at those rows."""
        sub = self.path.evaluate(x)
        self.last = PathState(*(t.index_copy(0, rows, s) for t, s in zip(self.last, sub)))
        beta = self.beta[rows] if torch.is_tensor(self.beta) and self.beta.dim() == 1 else self.beta
        st = tempered_state(sub, beta)
        return st.log_prob, st.grad


def move(
    kernel: Callable[..., tuple[MCMCState, MCMCInfo]],
    generator: torch.Generator,
    ps: PathState,
    path: GeometricPath,
    beta,
    step_size,
    inv_mass: torch.Tensor | None = None,
    **kernel_options,
) -> tuple[PathState, MCMCInfo]:
    r"""One MCMC step of ``kernel`` (``mala_step``, ``hmc_step``, ...) leaving :math:`\pi_\beta`
    invariant, applied to the particles of ``ps``.

    Parameters
    ----------
    kernel : callable
        ``kernel(generator, state, log_prob_and_grad, step_size, inv_mass, **kernel_options)``;
        its last evaluation of the density must be the proposal (true of MALA, HMC, RWM), or a
        later stage's evaluation of the rows still rejected through ``evaluate_rows`` (DR-MALA).
    beta : float or (n,) tensor
        Inverse temperature(s).
    step_size : float or (n,) tensor
    inv_mass : (dim,) or (n, dim) tensor, optional
        Diagonal preconditioner.

    Returns
    -------
    (PathState, MCMCInfo)
        The moved particles with both parts of the density, and the kernel's info.
    """
    density = _Recorder(path, beta)
    state, info = kernel(generator, tempered_state(ps, beta), density, step_size, inv_mass, **kernel_options)
    new = ps.where(info.is_accepted, density.last)
    return PathState(state.x, *new[1:]), info


def get_kernel(name: str, num_leapfrog: int = 5) -> tuple[Callable, float]:
    """The kernel ``"mala"``, ``"dr_mala"`` (delayed rejection, its default stages), ``"hmc"``
    (``num_leapfrog`` steps) or ``"rwm"`` and its target acceptance rate (DR-MALA's is its first
    stage's)."""
    kernels = {
        "mala": (mala_step, MALA_TARGET_ACCEPT),
        "dr_mala": (dr_mala_step, DR_MALA_TARGET_ACCEPT),
        "hmc": (functools.partial(hmc_step, num_steps=int(num_leapfrog)), HMC_TARGET_ACCEPT),
        "rwm": (rwm_step, RWM_TARGET_ACCEPT),
    }
    if name not in kernels:
        raise ValueError(f"unknown kernel {name!r}; choose one of {', '.join(kernels)}")
    return kernels[name]


def default_step_size(name: str, dim: int) -> float:
    r"""A first step size in units of the (preconditioned) scale: for a standard Gaussian in
    dimension :math:`d` the optimal MALA proposal variance :math:`2h` is about
    :math:`1.65^2 d^{-1/3}` (Roberts and Rosenthal 1998), so :math:`h = 1.36\, d^{-1/3}`; RWM's is
    :math:`2.38^2/d` (Gelman, Roberts and Gilks 1996); for HMC a leapfrog step of
    :math:`d^{-1/4}`. Adaptation corrects all three within a few moves. DR-MALA's first stage
    starts at MALA's."""
    if name in ("mala", "dr_mala"):
        return 1.36 * dim ** (-1.0 / 3.0)
    if name == "rwm":
        return 2.38**2 / dim
    return dim ** (-0.25)
