r"""The probability-flow velocity :math:`v = f - \tfrac12 g^2 s_\theta` and its exact divergence
:math:`\nabla\cdot v = \operatorname{tr} \partial v / \partial y`, per point: the one implementation
behind the exact-trace log-densities of :func:`diffstat.diffusion.reverse.probability_flow` and
:func:`diffstat.diffusion.proposals.ode_log_density`.

Two exact methods, equal up to float rounding:

* A :class:`~diffstat.diffusion.networks.ScoreMLP` (the sampler's model) under a VP or VE process,
  from ``LAYERWISE_MIN_DIM`` dimensions on:
  forward-mode propagation of the input Jacobian through the MLP, :math:`J_1 = D_1 W_1`,
  :math:`J_{k+1} = [J_k] + D_{k+1} W_{k+1} J_k` (:math:`D_k` the activation's derivative,
  :math:`[J_k]` the skip connection, :math:`W_k` the weights acting on the hidden state, not on the
  time embedding), then :math:`\operatorname{tr}(W_{\mathrm{out}} J_L)`; the score's
  preconditioning adds an affine map of that trace (module notes of
  :mod:`~diffstat.diffusion.networks`), and the linear drift :math:`f = a(t)\,y` of VP and VE adds
  :math:`a(t)\,\mathrm{dim}`. The products with one-hot inputs and outputs that autograd pays in full
  become a column selection and a diagonal: :math:`(L - 1) H^2\,\mathrm{dim}` multiply-adds per
  point for ``L`` hidden layers of width ``H``, against about :math:`\mathrm{dim}\,(L H^2 +
  2 H\,\mathrm{dim})` for ``dim`` backward passes, and large matrix products. Rows are taken
  ``JACOBIAN_ELEMENTS / (H dim)`` at a time, which bounds the memory.
* Any other score function: reverse-mode autograd, one backward pass per block of ``chunk`` unit
  cotangents (batched by ``is_grads_batched`` when ``chunk > 1``), reading row ``j``'s divergence off
  the diagonal; it assumes each output row depends on its own input row only.

The velocity itself is the score function's own forward pass in both methods, so the ODE's path is
the same to the bit as with the per-dimension loop these replace (``docs/diffusion_speed.md``).
"""

from __future__ import annotations

import torch

from diffstat.diffusion.networks import ScoreMLP, _TimeMLP
from diffstat.diffusion.processes import VE, VP

__all__ = ["velocity_and_divergence", "autograd_divergence", "score_mlp_divergence"]

#: Unit cotangents per backward pass of the autograd method: one, since batching them
#: (``is_grads_batched``, or ``torch.func.vmap`` over ``vjp``/``jvp``) was slower on a CPU.
GRAD_CHUNK = 1
#: Elements of the Jacobian block ``(H, rows, dim)`` per chunk of rows of the ScoreMLP method
#: (2 MiB in float32, a CPU's cache): larger blocks made the elementwise products memory-bound.
JACOBIAN_ELEMENTS = 1 << 19
#: Smallest dimension given the ScoreMLP method: below it the loop was as fast or faster.
LAYERWISE_MIN_DIM = 10


def velocity_and_divergence(
    score_fn, process, y: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Velocity ``(n, dim)`` of the probability flow at ``y: (n, dim)``, time ``t`` (0-d), and its
    exact divergence ``(n,)``, both detached: by :func:`score_mlp_divergence` when ``score_fn`` is a
    :class:`~diffstat.diffusion.networks.ScoreMLP` of at least ``LAYERWISE_MIN_DIM`` dimensions
    and ``process`` a VP or VE, else by
    :func:`autograd_divergence`."""
    y = y.detach()
    tt = t.expand(y.shape[0])
    if _structured(score_fn, process):
        with torch.no_grad():
            v = process.probability_flow_drift(y, tt, _checked(score_fn(y, tt), y))
            drift_div = process.drift(torch.ones_like(y[:1]), tt[:1]).sum()
            div = drift_div - 0.5 * process.diffusion(t) ** 2 * score_mlp_divergence(score_fn, y, tt)
        return v, div

    def velocity(z):
        return process.probability_flow_drift(z, tt, _checked(score_fn(z, tt), z))

    return autograd_divergence(velocity, y)


def autograd_divergence(fn, y: torch.Tensor, chunk: int = GRAD_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``fn(y)`` ``(n, dim)`` and its exact divergence ``(n,)`` (detached), by reverse-mode autograd
    with ``chunk`` unit cotangents per batched backward pass (module notes); ``fn`` maps rows to
    rows independently."""
    n, d = y.shape
    with torch.enable_grad():
        y = y.detach().requires_grad_(True)
        v = fn(y)
        div = torch.zeros(n, dtype=v.dtype, device=v.device)
        eye = torch.eye(d, dtype=v.dtype, device=v.device)
        for start in range(0, d, chunk):
            cols = torch.arange(start, min(start + chunk, d), device=v.device)
            basis = eye[cols].unsqueeze(1).expand(cols.numel(), n, d)
            batched = cols.numel() > 1
            (g,) = torch.autograd.grad(
                v, y, basis if batched else basis[0], retain_graph=start + chunk < d, is_grads_batched=batched
            )
            g = g.reshape(cols.numel(), n, d)
            div = div + g.gather(2, cols.view(-1, 1, 1).expand(-1, n, 1)).squeeze(-1).sum(0).to(div)
    return v.detach(), div.detach()


def score_mlp_divergence(model: ScoreMLP, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    r"""Exact divergence ``(n,)`` in ``x``'s dtype of the :class:`ScoreMLP` score
    :math:`s_\theta(x, t)` at ``x: (n, dim)``, ``t: (n,)`` (module notes)."""
    xp, t, e, c_in = model._inputs(x, t)
    d = xp.shape[1]
    if model.process is None:  # s = N(x, e)
        h, scale, shift = xp, 1.0, 0.0
    elif model.parameterization == "noise":  # s = -N(c x, e) / sigma_t
        h, scale, shift = c_in * xp, -c_in.squeeze(-1) / model.process.sigma(t), 0.0
    else:  # s = c (N(c x, e) - c x)
        c2 = c_in.squeeze(-1) ** 2
        h, scale, shift = c_in * xp, c2, -c2 * d
    slopes = _slopes(model.net, h, e)
    rows = max(1, JACOBIAN_ELEMENTS // (slopes[0].shape[0] * d))
    weights = [layer.weight for layer in model.net.hidden_layers] + [model.net.out.weight]
    trace = torch.cat(
        [
            _mlp_trace(weights, [g[:, s : s + rows].contiguous() for g in slopes], d, model.net.residual)
            for s in range(0, h.shape[0], rows)
        ]
    )
    return (scale * trace + shift).to(x.dtype)


def _slopes(net: _TimeMLP, h: torch.Tensor, e: torch.Tensor) -> list[torch.Tensor]:
    """The activation's derivative ``(H, n)`` at every hidden layer's pre-activation (the forward
    pass of :class:`~diffstat.diffusion.networks._TimeMLP`)."""
    slopes = []
    for i, layer in enumerate(net.hidden_layers):
        with torch.enable_grad():
            pre = layer(torch.cat([h, e], -1)).detach().requires_grad_(True)
            act = net.act(pre)
            (slope,) = torch.autograd.grad(act.sum(), pre)
        slopes.append(slope.T.contiguous())
        h = h + act.detach() if (net.residual and i > 0) else act.detach()
    return slopes


def _mlp_trace(
    weights: list[torch.Tensor], slopes: list[torch.Tensor], d: int, residual: bool
) -> torch.Tensor:
    r""":math:`\operatorname{tr}\,\partial N/\partial h` ``(k,)`` for a block of ``k`` rows, given the
    layers' weights and the block's slopes ``(H, k)``; the Jacobian is held as ``(H, k, d)`` so each
    layer's product is one matrix product."""
    with torch.no_grad():
        slope = slopes[0].unsqueeze(-1)
        jac = slope * weights[0][:, :d].unsqueeze(1)  # (H, k, d)
        width, k = jac.shape[0], jac.shape[1]
        for w, slope in zip(weights[1:-1], slopes[1:]):
            step = (w[:, :width] @ jac.view(width, k * d)).view(-1, k, d)
            jac = jac.addcmul_(slope.unsqueeze(-1), step) if residual else step.mul_(slope.unsqueeze(-1))
            width = jac.shape[0]
        return (jac * weights[-1][:, :width].T.unsqueeze(1)).sum((0, 2))


def _structured(score_fn, process) -> bool:
    """Whether :func:`score_mlp_divergence` applies: the package's MLP score under a linear drift."""
    return (
        isinstance(score_fn, ScoreMLP)
        and type(score_fn.net) is _TimeMLP
        and isinstance(process, (VP, VE))
        and score_fn.dim >= LAYERWISE_MIN_DIM
    )


def _checked(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if s.shape != y.shape:
        raise ValueError(f"score_fn must return shape {tuple(y.shape)}, got {tuple(s.shape)}")
    return s
