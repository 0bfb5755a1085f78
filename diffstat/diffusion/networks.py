r"""Score networks for dimensions up to a few hundred: a (residual) MLP score model and an
energy-based model whose score is minus the gradient of a scalar energy.

Both feed the noise level to every layer: the time input is embedded as
:math:`e = (c, \sin \omega_k c, \cos \omega_k c)_{k}` with :math:`c = \tfrac14 \log\sigma_t` when a
``process`` is given (the noise level, as in Karras et al. 2022), or :math:`c = t` otherwise, and
``e`` is concatenated to the input of every linear layer.

Output parameterisation (with a ``process``). Write :math:`c_{\rm in} = (\alpha_t^2 s_d^2 +
\sigma_t^2)^{-1/2}`, the inverse standard deviation of :math:`X_t` when the data have scale
:math:`s_d` (``sigma_data``; 1 for whitened data). The network sees :math:`c_{\rm in} x`, an
:math:`O(1)` input at every noise level, and

* ``ScoreMLP`` (``parameterization="preconditioned"``, default):
  :math:`s(x, t) = c_{\rm in}\,[N(c_{\rm in} x, e) - c_{\rm in} x]`. With the last layer
  initialised at zero the model starts as the exact score :math:`-x/(\alpha_t^2 s_d^2 +
  \sigma_t^2)` of noised :math:`\mathcal N(0, s_d^2 I)` data, and the output stays :math:`O(1)` as
  :math:`t \to 0`, where the true score :math:`\nabla\log p_0` is bounded for smooth targets. (The
  alternative ``"noise"``, :math:`s = -N/\sigma_t`, predicts the noise :math:`z`: an error
  :math:`\epsilon` in :math:`N` becomes :math:`\epsilon/\sigma_t` in the score, which is why score
  errors of noise-predicting models grow as :math:`t \to 0`.)
* ``EnergyMLP``: :math:`E(x, t) = \frac{1}{2\sigma_t^2}\lVert x - \psi(x, t)\rVert^2`, the
  Salimans-Ho / Du et al. form, with the skip parameterisation :math:`\psi(x, t) = x - \sigma_t
  g(x, t)`, :math:`g = c_{\rm in} x - N(c_{\rm in} x, e)`, i.e. :math:`E = \tfrac12 \lVert g
  \rVert^2`. Again :math:`N = 0` gives the Gaussian energy :math:`c_{\rm in}^2 \lVert x\rVert^2/2`,
  and :math:`E` stays :math:`O(1)` as :math:`t \to 0` (a bare :math:`\psi` would have to learn the
  identity to accuracy :math:`\sigma_t`). The density of :math:`X_t` is modelled as
  :math:`\propto e^{-E(x, t)}`, so energies of several models add (products of experts) and
  differences of energies give Metropolis-Hastings ratios.

Without a ``process`` the models are plain: :math:`s = N(x, e)` and :math:`E = \tfrac12\lVert x -
N(x, e)\rVert^2`.

Initialisation is reproducible without touching torch's global RNG: weights are drawn from the
``generator`` passed in, or from a CPU generator seeded with ``seed`` (default 0).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffstat.diffusion.processes import VE, VP, as_time

__all__ = ["ScoreMLP", "EnergyMLP"]

_ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "tanh": nn.Tanh, "softplus": nn.Softplus}


class _TimeMLP(nn.Module):
    """MLP ``(h, e) -> out`` with the time embedding ``e`` concatenated to every layer's input.

    ``depth`` hidden layers of width ``hidden``; with ``residual`` every hidden layer after the
    first adds its input (``h <- h + act(W [h, e] + b)``). The output layer starts at zero.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden: int,
        depth: int,
        residual: bool,
        emb_dim: int,
        activation: str,
    ):
        super().__init__()
        self.residual = residual
        self.act = _ACTIVATIONS[activation]()
        widths = [in_dim] + [hidden] * depth
        self.hidden_layers = nn.ModuleList(nn.Linear(w + emb_dim, hidden) for w in widths[:-1])
        self.out = nn.Linear(hidden + emb_dim, out_dim)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.hidden_layers):
            new = self.act(layer(torch.cat([h, e], -1)))
            h = h + new if (self.residual and i > 0) else new
        return self.out(torch.cat([h, e], -1))


def _init_parameters(module: _TimeMLP, generator: torch.Generator) -> None:
    """PyTorch's default Linear init, :math:`U(-1/\\sqrt{\\text{fan in}}, 1/\\sqrt{\\text{fan in}})`
    for weights and biases, drawn from ``generator``; zero output layer."""
    with torch.no_grad():
        for layer in module.hidden_layers:
            bound = 1.0 / math.sqrt(layer.in_features)
            for p in (layer.weight, layer.bias):
                u = torch.rand(p.shape, generator=generator, dtype=p.dtype, device=generator.device)
                p.copy_((2 * u - 1).to(p.device) * bound)
        module.out.weight.zero_()
        module.out.bias.zero_()


class _NoiseConditioned(nn.Module):
    """Shared parts: argument checks, time embedding, preconditioning, dtype handling."""

    def __init__(
        self,
        dim,
        hidden,
        depth,
        residual,
        process,
        activation,
        num_frequencies,
        sigma_data,
        seed,
        generator,
        out_dim,
    ):
        super().__init__()
        for name, v in (("dim", dim), ("hidden", hidden), ("depth", depth)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        if process is not None and not isinstance(process, (VP, VE)):
            raise ValueError(f"process must be a VP or VE process or None, got {process!r}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.dim, self.process, self.sigma_data = dim, process, float(sigma_data)
        self.register_buffer(
            "frequencies",
            2.0 ** torch.arange(num_frequencies, dtype=torch.get_default_dtype()),
            persistent=False,
        )
        emb_dim = 1 + 2 * num_frequencies
        with torch.random.fork_rng(devices=[]):  # nn.Linear's own init draws from the global RNG:
            self.net = _TimeMLP(dim, out_dim, hidden, depth, residual, emb_dim, activation)  # undone here
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        _init_parameters(self.net, generator)
        self.init_kwargs = dict(
            dim=dim,
            hidden=hidden,
            depth=depth,
            residual=residual,
            activation=activation,
            num_frequencies=num_frequencies,
            sigma_data=self.sigma_data,
        )

    def _inputs(self, x: torch.Tensor, t):
        """Checked ``x`` in the parameters' dtype, per-row ``t``, embedding ``e`` and ``c_in``."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (n, {self.dim}), got {tuple(x.shape)}")
        dtype = self.net.out.weight.dtype
        xp = x.to(dtype)
        t = as_time(t, xp)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be 0-d or of shape ({x.shape[0]},), got {tuple(t.shape)}")
        if self.process is None:
            c, c_in = t, None
        else:
            alpha, sigma = self.process.alpha(t), self.process.sigma(t)
            c = 0.25 * torch.log(sigma.clamp_min(1e-8))  # finite at t = 0 (sigma_0 = 0 for VP)
            c_in = torch.rsqrt(alpha**2 * self.sigma_data**2 + sigma**2).unsqueeze(-1)
        wc = c.unsqueeze(-1) * self.frequencies.to(xp)
        e = torch.cat([c.unsqueeze(-1), torch.sin(wc), torch.cos(wc)], -1)
        return xp, t, e, c_in


class ScoreMLP(_NoiseConditioned):
    r"""Score model :math:`s_\theta(x, t) \approx \nabla_x \log p_t(x)` (see the module notes for
    the parameterisation).

    Parameters
    ----------
    dim : int
    hidden, depth : int
        Width and number of hidden layers.
    residual : bool
        Skip connections around the hidden layers after the first.
    process : VP or VE, optional
        Feed :math:`\tfrac14\log\sigma_t` instead of ``t`` and precondition the input and output.
    parameterization : ``"preconditioned"`` or ``"noise"``
    activation : ``"silu"`` (default), ``"gelu"``, ``"tanh"``, ``"softplus"``
    num_frequencies : int
        Sine/cosine features of the time input (frequencies :math:`2^k`).
    sigma_data : float
        Scale of the data used by the preconditioning.
    seed, generator
        Source of the initial weights (``generator`` wins; default ``seed=0``).

    Call ``model(x, t)`` with ``x: (n, dim)``, ``t: (n,)`` or 0-d; returns ``(n, dim)`` in
    ``x``'s dtype.
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 128,
        depth: int = 3,
        residual: bool = True,
        *,
        process=None,
        parameterization: str = "preconditioned",
        activation: str = "silu",
        num_frequencies: int = 4,
        sigma_data: float = 1.0,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ):
        if parameterization not in ("preconditioned", "noise"):
            raise ValueError(
                f"parameterization must be 'preconditioned' or 'noise', got {parameterization!r}"
            )
        if parameterization == "noise" and process is None:
            raise ValueError("parameterization='noise' needs a process (it divides by sigma_t)")
        super().__init__(
            dim,
            hidden,
            depth,
            residual,
            process,
            activation,
            num_frequencies,
            sigma_data,
            seed,
            generator,
            out_dim=dim,
        )
        self.parameterization = parameterization
        self.init_kwargs["parameterization"] = parameterization

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        xp, t, e, c_in = self._inputs(x, t)
        if self.process is None:
            out = self.net(xp, e)
        elif self.parameterization == "noise":
            out = -self.net(c_in * xp, e) / self.process.sigma(t).unsqueeze(-1)
        else:
            h = c_in * xp
            out = c_in * (self.net(h, e) - h)
        return out.to(x.dtype)


class EnergyMLP(_NoiseConditioned):
    r"""Energy-based model: :math:`p_t(x) \propto \exp(-E_\theta(x, t))`, score
    :math:`-\nabla_x E_\theta` (module notes give the form of :math:`E`). Same parameters as
    :class:`ScoreMLP`.

    ``model.energy(x, t)`` is ``(n,)``; ``model(x, t)`` is the score ``(n, dim)``, computed by
    autograd and differentiable (``create_graph``) whenever gradients are enabled, so it can be
    trained with any score-matching loss and used inside the probability-flow trace. Under
    ``torch.no_grad()`` it returns a detached score.
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 128,
        depth: int = 3,
        residual: bool = True,
        *,
        process=None,
        activation: str = "silu",
        num_frequencies: int = 4,
        sigma_data: float = 1.0,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__(
            dim,
            hidden,
            depth,
            residual,
            process,
            activation,
            num_frequencies,
            sigma_data,
            seed,
            generator,
            out_dim=dim,
        )

    def energy(self, x: torch.Tensor, t) -> torch.Tensor:
        r""":math:`E_\theta(x, t)`, shape ``(n,)`` in ``x``'s dtype."""
        xp, t, e, c_in = self._inputs(x, t)
        if self.process is None:
            g = xp - self.net(xp, e)
        else:
            h = c_in * xp
            g = h - self.net(h, e)
        return (0.5 * (g**2).sum(-1)).to(x.dtype)

    def log_prob_unnormalized(self, x: torch.Tensor, t) -> torch.Tensor:
        """``-energy(x, t)``."""
        return -self.energy(x, t)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        keep_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            xg = x if x.requires_grad else x.detach().requires_grad_(True)
            energy = self.energy(xg, t)
            (grad,) = torch.autograd.grad(energy.sum(), xg, create_graph=keep_graph)
        return -grad if keep_graph else -grad.detach()
