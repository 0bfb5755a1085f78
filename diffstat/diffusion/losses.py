r"""Score-matching losses for a time-conditioned score model ``model(x, t) -> (n, dim)``.

Every loss is a Monte Carlo estimate of

.. math:: \mathcal L(\theta) = \mathbb E_{t}\, \lambda(t)\, \mathbb E\,
          \tfrac{1}{2d} \lVert s_\theta(X_t, t) - Y \rVert^2

(divided by the dimension ``d`` so that learning rates carry over between dimensions), with
:math:`t` uniform on ``[t_min, t_max]`` (drawn inside unless ``t`` is given), :math:`X_t =
\alpha_t X_0 + \sigma_t Z`, and a regression target :math:`Y` whose conditional mean given
:math:`X_t` is the score :math:`\nabla\log p_t(X_t)`, so that every minimiser is the score:

* DSM (Vincent 2011): :math:`Y = -Z/\sigma_t`; variance :math:`d/\sigma_t^2`, large as
  :math:`t \to 0`.
* TSM (De Bortoli et al. 2024): :math:`Y = \nabla\log p_0(X_0)/\alpha_t`, since
  :math:`\nabla\log p_t(y) = \mathbb E[\nabla\log p_0(X_0) \mid X_t = y]/\alpha_t`; low variance
  as :math:`t \to 0`, grows like :math:`1/\alpha_t` as :math:`t` grows.
* mixed: :math:`Y = (1 - w_t)\,\nabla\log p_0(X_0)/\alpha_t + w_t(-Z/\sigma_t)` with
  :math:`w_t = \sigma_t^2/(\alpha_t^2 + \sigma_t^2)`: TSM near 0, DSM near ``t_max``, bounded
  everywhere (:math:`(1-w)/\alpha = \alpha/(\alpha^2+\sigma^2)`, :math:`w/\sigma =
  \sigma/(\alpha^2+\sigma^2)`).

Without a target (neither :math:`Z` nor :math:`\nabla\log p_0`) the implicit form (Hyvarinen
2005) :math:`\mathbb E[\tfrac12\lVert s\rVert^2 + \operatorname{div} s]`, which differs from the
explicit loss by a constant, is estimated with the exact divergence (:func:`implicit_score_matching_loss`,
``d`` backward passes) or with random projections :math:`v^\top (\nabla s) v`, :math:`\mathbb E
vv^\top = I` (Hutchinson; sliced score matching, Song et al. 2019:
:func:`sliced_score_matching_loss`).

Weightings :math:`\lambda(t)` (``weighting=``): ``"sigma2"`` (:math:`\sigma_t^2`, the usual DSM
choice, which makes the DSM target :math:`O(1)`), ``"g2"`` (:math:`g(t)^2`, the likelihood
weighting of Song et al. 2021), ``"alpha2"`` (:math:`\alpha_t^2`, which makes the TSM target
:math:`O(1)`), ``"none"`` (1), or a callable ``t -> (n,)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffstat.diffusion.processes import as_time, normal_draws

__all__ = [
    "dsm_loss",
    "tsm_loss",
    "mixed_loss",
    "stf_loss",
    "stf_target",
    "sliced_score_matching_loss",
    "implicit_score_matching_loss",
    "loss_weight",
]

Weighting = str | Callable[[torch.Tensor], torch.Tensor]


def loss_weight(process, t: torch.Tensor, weighting: Weighting) -> torch.Tensor:
    r"""The weight :math:`\lambda(t)`, shape of ``t``."""
    if callable(weighting):
        return torch.as_tensor(weighting(t), dtype=t.dtype, device=t.device).expand(t.shape)
    if weighting == "sigma2":
        return process.sigma(t) ** 2
    if weighting == "g2":
        return process.diffusion(t) ** 2
    if weighting == "alpha2":
        return process.alpha(t) ** 2
    if weighting == "none":
        return torch.ones_like(t)
    raise ValueError(f"weighting must be 'sigma2', 'g2', 'alpha2', 'none' or a callable, got {weighting!r}")


def _times(process, x: torch.Tensor, generator, t) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"x0 must have shape (n, dim), got {tuple(x.shape)}")
    if t is None:
        if process is None:
            return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        return process.sample_time(x.shape[0], generator, dtype=x.dtype, device=x.device)
    t = as_time(t, x)
    t = t.expand(x.shape[0]) if t.dim() == 0 else t
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be 0-d or of shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t


def _regression(model, xt, t, target, lam) -> torch.Tensor:
    resid = model(xt, t) - target
    return (lam * 0.5 * (resid**2).sum(-1)).mean() / xt.shape[1]


def _check_grad0(x0: torch.Tensor, grad0) -> torch.Tensor:
    if grad0 is None:
        raise ValueError("this loss needs grad0 = grad log p_0(x0) (use dsm or ssm without it)")
    grad0 = torch.as_tensor(grad0).to(device=x0.device, dtype=x0.dtype)
    if grad0.shape != x0.shape:
        raise ValueError(f"grad0 must have the shape of x0 {tuple(x0.shape)}, got {tuple(grad0.shape)}")
    return grad0


def dsm_loss(
    model,
    process,
    x0: torch.Tensor,
    generator: torch.Generator | None,
    t=None,
    weighting: Weighting = "sigma2",
) -> torch.Tensor:
    r"""Denoising score matching: regress :math:`s_\theta(x_t, t)` on :math:`-z/\sigma_t`.

    Parameters
    ----------
    model : callable ``(x (n, dim), t (n,)) -> (n, dim)``
    process : VP or VE
    x0 : (n, dim) data
    generator : torch.Generator (times and noise)
    t : (n,), 0-d or None (uniform on ``[t_min, t_max]``)
    weighting : see the module notes (default :math:`\sigma_t^2`)

    Returns
    -------
    Scalar loss.
    """
    t = _times(process, x0, generator, t)
    xt, z = process.marginal_sample(x0, t, generator)
    target = -z / process.sigma(t).unsqueeze(-1)
    return _regression(model, xt, t, target, loss_weight(process, t, weighting))


def tsm_loss(
    model,
    process,
    x0: torch.Tensor,
    grad0: torch.Tensor,
    generator: torch.Generator | None,
    t=None,
    weighting: Weighting = "alpha2",
) -> torch.Tensor:
    r"""Target score matching: regress :math:`s_\theta(x_t, t)` on :math:`\nabla\log p_0(x_0)/\alpha_t`.

    ``grad0: (n, dim)`` is :math:`\nabla\log p_0` at ``x0``. The default weighting
    :math:`\alpha_t^2` keeps the target's contribution :math:`O(1)` where :math:`\alpha_t \to 0`.
    """
    grad0 = _check_grad0(x0, grad0)
    t = _times(process, x0, generator, t)
    xt, _ = process.marginal_sample(x0, t, generator)
    target = grad0 / process.alpha(t).unsqueeze(-1)
    return _regression(model, xt, t, target, loss_weight(process, t, weighting))


def mixed_loss(
    model,
    process,
    x0: torch.Tensor,
    grad0: torch.Tensor,
    generator: torch.Generator | None,
    t=None,
    weighting: Weighting = "none",
) -> torch.Tensor:
    r"""TSM/DSM mix: regress on :math:`(1-w_t)\nabla\log p_0(x_0)/\alpha_t - w_t z/\sigma_t`,
    :math:`w_t = \sigma_t^2/(\alpha_t^2+\sigma_t^2)` (bounded target; default weight 1)."""
    grad0 = _check_grad0(x0, grad0)
    t = _times(process, x0, generator, t)
    xt, z = process.marginal_sample(x0, t, generator)
    alpha, sigma = process.alpha(t).unsqueeze(-1), process.sigma(t).unsqueeze(-1)
    w = sigma**2 / (alpha**2 + sigma**2)
    target = (1 - w) * grad0 / alpha - w * z / sigma
    return _regression(model, xt, t, target, loss_weight(process, t, weighting))


def stf_target(
    process,
    xt: torch.Tensor,
    t: torch.Tensor,
    x0: torch.Tensor,
    reference: torch.Tensor,
    grad0: torch.Tensor | None = None,
    reference_grad: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The mixed target averaged over the empirical posterior of a reference set (the stable
    target field of Xu et al. 2023, here with the TSM/DSM mix).

    With the reference draws :math:`\{x_0\} \cup \{x^{(1)}, \dots, x^{(M)}\}` (each row's own
    :math:`x_0` first) and :math:`v_i \propto \mathcal N(x_t; \alpha_t x^{(i)}, \sigma_t^2 I)`,

    .. math::
        Y = \sum_i v_i \Big[(1 - w_t)\,\frac{\nabla\log p_0(x^{(i)})}{\alpha_t}
            + w_t\,\frac{\alpha_t x^{(i)} - x_t}{\sigma_t^2}\Big],
        \qquad w_t = \frac{\sigma_t^2}{\alpha_t^2 + \sigma_t^2}

    (:math:`w_t = 1` without gradients): the conditional mean of the mixed target given
    :math:`x_t` under the empirical law of the reference, i.e. the exact score of the noised
    empirical law. Where :math:`\sigma_t/\alpha_t` is large against the spacing of the draws
    this is the noised law's score with little variance (the plain target's variance is
    :math:`O(d/\sigma_t^2)`), and the relative masses of separated modes, which the scores at
    the draws do not carry, enter through the weights :math:`v_i`; as :math:`t \to 0` the
    weights collapse on :math:`x_0` and :math:`Y` becomes the plain target. The bias is that of
    a kernel estimate with bandwidth :math:`\sigma_t/\alpha_t` from :math:`M + 1` points.

    Shapes: ``xt, x0, grad0 (n, dim)``, ``t (n,)``, ``reference, reference_grad (M, dim)``;
    returns ``(n, dim)`` (no gradient flows through it).
    """
    with torch.no_grad():
        alpha, sigma = process.alpha(t).unsqueeze(-1), process.sigma(t).unsqueeze(-1)
        # log v_i up to a per-row constant: (alpha x_t.x_i - alpha^2 |x_i|^2 / 2) / sigma^2
        logit_ref = (alpha * (xt @ reference.T) - 0.5 * alpha**2 * (reference**2).sum(-1)) / sigma**2
        logit_own = (
            alpha * (xt * x0).sum(-1, keepdim=True) - 0.5 * alpha**2 * (x0**2).sum(-1, keepdim=True)
        ) / sigma**2
        v = torch.softmax(torch.cat([logit_own, logit_ref], 1), 1)  # (n, 1 + M)
        v_own, v_ref = v[:, :1], v[:, 1:]
        mean_x = v_own * x0 + v_ref @ reference  # E[x_0 | x_t] under the empirical law
        dsm = (alpha * mean_x - xt) / sigma**2
        if grad0 is None or reference_grad is None:
            return dsm
        w = sigma**2 / (alpha**2 + sigma**2)
        tsm = (v_own * grad0 + v_ref @ reference_grad) / alpha
        return (1 - w) * tsm + w * dsm


def stf_loss(
    model,
    process,
    x0: torch.Tensor,
    grad0: torch.Tensor | None,
    generator: torch.Generator | None,
    reference: torch.Tensor,
    reference_grad: torch.Tensor | None = None,
    t=None,
    weighting: Weighting = "none",
) -> torch.Tensor:
    r"""Regress :math:`s_\theta(x_t, t)` on :func:`stf_target` (the mixed target averaged over
    the empirical posterior of ``reference``; pure DSM form when ``grad0`` or
    ``reference_grad`` is None). Default weight 1, as :func:`mixed_loss`."""
    if grad0 is not None:
        grad0 = _check_grad0(x0, grad0)
    reference = torch.as_tensor(reference).to(device=x0.device, dtype=x0.dtype)
    if reference.dim() != 2 or reference.shape[1] != x0.shape[1]:
        raise ValueError(f"reference must have shape (M, {x0.shape[1]}), got {tuple(reference.shape)}")
    if reference_grad is not None:
        reference_grad = torch.as_tensor(reference_grad).to(device=x0.device, dtype=x0.dtype)
        if reference_grad.shape != reference.shape:
            raise ValueError(f"reference_grad must have the shape of reference {tuple(reference.shape)}")
    t = _times(process, x0, generator, t)
    xt, _ = process.marginal_sample(x0, t, generator)
    target = stf_target(process, xt, t, x0, reference, grad0, reference_grad)
    return _regression(model, xt, t, target, loss_weight(process, t, weighting))


def _noised_inputs(model, x, generator, t, process):
    t = _times(process, x, generator, t)
    xt = process.marginal_sample(x, t, generator)[0] if process is not None else x
    return xt.detach().requires_grad_(True), t


def sliced_score_matching_loss(
    model,
    x: torch.Tensor,
    generator: torch.Generator | None,
    t=None,
    process=None,
    *,
    projection: str = "rademacher",
    num_projections: int = 1,
    variance_reduced: bool = True,
    weighting: Weighting = "sigma2",
) -> torch.Tensor:
    r"""Sliced score matching: :math:`\mathbb E[\tfrac12\lVert s\rVert^2 + v^\top \nabla_x s\, v]`.

    With a ``process``, ``x`` are data :math:`x_0`, noised to :math:`x_t` at times ``t`` (drawn if
    None) and the loss is weighted by :math:`\lambda(t)`; without one, ``x`` are samples of the
    density whose score is learned and the model is called at ``t`` (default 0).

    Parameters
    ----------
    projection : ``"rademacher"`` or ``"gaussian"``
        Law of the probes :math:`v` (both have :math:`\mathbb E vv^\top = I`; Rademacher has the
        lower variance).
    num_projections : int
        Probes per point.
    variance_reduced : bool
        Use :math:`\tfrac12\lVert s\rVert^2` (SSM-VR) instead of :math:`\tfrac12(v^\top s)^2`.
    """
    if projection not in ("rademacher", "gaussian"):
        raise ValueError(f"projection must be 'rademacher' or 'gaussian', got {projection!r}")
    xt, t = _noised_inputs(model, x, generator, t, process)
    n, d = xt.shape
    with torch.enable_grad():
        xr = xt.repeat(num_projections, 1).detach().requires_grad_(True)
        tr = t.repeat(num_projections)
        v = normal_draws(xr.shape, generator, xr.dtype, xr.device)
        if projection == "rademacher":
            v = torch.sign(v)
        s = model(xr, tr)
        (grad_vs,) = torch.autograd.grad((s * v).sum(), xr, create_graph=True)
        vjv = (grad_vs * v).sum(-1)
        quad = 0.5 * (s**2).sum(-1) if variance_reduced else 0.5 * (s * v).sum(-1) ** 2
        per_point = ((quad + vjv) / d).reshape(num_projections, n).mean(0)
    lam = loss_weight(process, t, weighting) if process is not None else 1.0
    return (lam * per_point).mean()


def implicit_score_matching_loss(
    model,
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    t=None,
    process=None,
    weighting: Weighting = "sigma2",
) -> torch.Tensor:
    r"""Implicit score matching (Hyvarinen 2005) with the exact divergence:
    :math:`\mathbb E[\tfrac12\lVert s\rVert^2 + \sum_i \partial_i s_i]`, one backward pass per
    dimension (for low ``d``). ``x``, ``t`` and ``process`` as in :func:`sliced_score_matching_loss`."""
    xt, t = _noised_inputs(model, x, generator, t, process)
    d = xt.shape[1]
    with torch.enable_grad():
        s = model(xt, t)
        div = torch.zeros(xt.shape[0], dtype=s.dtype, device=s.device)
        for i in range(d):
            (gi,) = torch.autograd.grad(s[:, i].sum(), xt, create_graph=True)
            div = div + gi[:, i]
        per_point = (0.5 * (s**2).sum(-1) + div) / d
    lam = loss_weight(process, t, weighting) if process is not None else 1.0
    return (lam * per_point).mean()
