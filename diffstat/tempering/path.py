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
* **likelihood** (a target with ``log_prior`` and ``log_likelihood`` methods, such as a Pyro
  model, and no ``reference=`` override): :math:`\rho` is the prior and :math:`\delta` the
  log-likelihood, so :math:`\pi_\beta \propto \text{prior} \times \text{likelihood}^\beta`. It is
  computed as ``target.log_prob - target.log_prior``, so one counted target evaluation gives both.

Every point is evaluated once through ``target.log_prob_and_grad`` (counted in
``num_target_evals``); the reference (or prior) is evaluated separately and is free. A
:class:`PathState` caches both parts, so changing :math:`\beta` never re-evaluates the target.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from diffstat.mcmc.base import MCMCInfo, MCMCState

__all__ = ["GeometricPath", "PathState", "tempered_state", "incremental_log_weights", "move"]


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

    def index(self, idx: torch.Tensor) -> "PathState":
        """Particles selected (or resampled) by ``idx: (m,)`` long."""
        return PathState(*(t[idx] for t in self))

    def where(self, mask: torch.Tensor, other: "PathState") -> "PathState":
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
    """

    def __init__(self, target, reference: torch.distributions.Distribution | None = None):
        self.target = target
        self.reference = reference
        self.likelihood_tempering = (
            reference is None and callable(getattr(target, "log_prior", None)) and callable(getattr(target, "log_likelihood", None))
        )
        self.dim = target.dim

    @property
    def kind(self) -> str:
        """``"likelihood"`` (prior times likelihood to the beta) or ``"geometric"``."""
        return "likelihood" if self.likelihood_tempering else "geometric"

    # ------------------------------------------------------------------ the reference (free)
    def sample_reference(self, n: int, generator: torch.Generator, device=None) -> torch.Tensor:
        """``n`` exact draws ``(n, dim)`` from the reference (the prior for likelihood tempering)."""
        if self.reference is None:
            return self.target.sample_reference(n, generator, device)
        device = torch.device(device) if device is not None else generator.device
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            x = self.reference.sample((n,))
        return x.to(device=device, dtype=self.target.dtype)

    def reference_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised reference log-density ``(n,)``: not a target evaluation, not counted."""
        if self.likelihood_tempering:
            before = self.target.num_target_evals
            lp = self.target.log_prior(x)
            self.target.num_target_evals = before  # the prior is the reference: free
            return lp
        if self.reference is not None:
            return self.reference.log_prob(x).to(x.dtype)
        return self.target.reference_log_prob(x).to(x.dtype)

    def _reference_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.likelihood_tempering and self.reference is None and self.target.reference is None:
            return self.target.reference_log_prob(x).to(x.dtype), -x  # N(0, I)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            lp = self.reference_log_prob(xg)
            (grad,) = torch.autograd.grad(lp.sum(), xg, allow_unused=True)
        return lp.detach(), torch.zeros_like(x) if grad is None else grad.detach()

    # ------------------------------------------------------------------ evaluation (counted)
    def evaluate(self, x: torch.Tensor) -> PathState:
        """Evaluate the target (counts ``n``) and the reference (free) at ``x: (n, dim)``."""
        base, base_grad = self._reference_and_grad(x)
        lp, grad = self.target.log_prob_and_grad(x)
        delta = lp - base
        # Outside the target's support (lp = -inf) delta is -inf whatever the reference says.
        delta = torch.where(lp == -torch.inf, lp, delta)
        return PathState(x, base, base_grad, delta, grad - base_grad)

    def log_prob_and_grad(self, beta) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        r"""The tempered :math:`x \mapsto (\log\pi_\beta(x), \nabla\log\pi_\beta(x))` for the MCMC
        kernels (each call counts its points as target evaluations)."""

        def log_prob_and_grad(x: torch.Tensor):
            st = tempered_state(self.evaluate(x), beta)
            return st.log_prob, st.grad

        return log_prob_and_grad


class _Recorder:
    """The tempered density at a fixed beta, remembering the :class:`PathState` of the last points
    it evaluated (a kernel's proposal), so an accepted move needs no second target evaluation."""

    def __init__(self, path: GeometricPath, beta):
        self.path, self.beta, self.last = path, beta, None

    def __call__(self, x: torch.Tensor):
        self.last = self.path.evaluate(x)
        st = tempered_state(self.last, self.beta)
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
        its last evaluation of the density must be the proposal (true of MALA, HMC, RWM).
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
