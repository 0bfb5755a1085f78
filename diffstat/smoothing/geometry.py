r"""The target's geometry, and the noise levels of SMS that it sets.

A geometry is a dict: ``center`` ``(d,)``, ``scale`` (root mean variance per coordinate),
``diameter`` (largest distance between modes), ``tau`` (largest within-mode standard deviation),
``sigma`` (the diameter rule) and ``source``. Three sources: an exact mixture passed explicitly, a
mode exploration from the log-density (:func:`default_noise`), or the particles of a learned score
(:func:`particle_geometry`).

SMS's defaults (:func:`noise_levels`): :math:`\sigma = \sqrt{\max(R^2 - \tau^2, \tau^2)}` (:math:`R`
the diameter, :math:`\tau` the largest within-mode standard deviation), the diameter rule of the
paper's public code (every conditional log-concave); :math:`M` from the W2 bound :math:`W_2^2 \le
\sigma^2 d / M \le` ``w2_tol``, default ``w2_tol`` :math:`= d\,(s/2)^2` with :math:`s` = ``scale``
(the bound's noise per coordinate at most half the target's spread; the final MALA removes the
rest).
"""

from __future__ import annotations

import math

import torch

from diffstat.smoothing.laplace import explore_modes

__all__ = ["default_noise", "particle_geometry", "noise_levels"]


def default_noise(
    target,
    generator: torch.Generator,
    device=None,
    *,
    num_explore: int = 256,
    need_sigma: bool = True,
    mixture=None,
) -> dict:
    r"""The target's geometry for the defaults: ``sigma`` (diameter rule), ``scale`` (root mean
    variance per coordinate), ``center`` ``(d,)``, ``diameter``, ``tau`` and ``source``
    (``"exact"`` from ``mixture``, an object with ``means``, ``covs``, ``mean`` and ``cov`` such as
    a :class:`~diffstat.targets.GaussianMixture` passed explicitly, or ``"explored"``: damped Newton from
    ``num_explore``
    reference draws, the modes' Laplace mixture giving the moments). The explored modes are returned
    under ``"modes"`` to seed a mode bank. If no mode is found and ``need_sigma`` is False (the
    caller gave ``sigma`` and ``num_measurements``), the reference draws' mean and spread stand in
    for the centre and scale (``source="reference"``)."""
    out: dict = {}
    if mixture is not None:
        means, covs = mixture.means, mixture.covs
        center, cov = mixture.mean, mixture.cov
        out["source"] = "exact"
    else:
        x0 = target.sample_reference(num_explore, generator, device)
        target.validate(x0[:16])  # a log-density that is -inf (or bad) everywhere is refused before any work
        modes = explore_modes(target, x0)
        if modes.modes.shape[0] == 0:
            if need_sigma:
                raise ValueError(
                    "SMS could not find a mode of the target from its reference; pass sigma= and "
                    "num_measurements="
                )
            return dict(
                source="reference",
                scale=math.sqrt(float(x0.var(0).mean())),
                center=x0.mean(0).to(device=device, dtype=target.dtype),
                diameter=math.nan,
                tau=math.nan,
            )
        means, covs = modes.modes, torch.linalg.inv(modes.precisions)
        center, cov = modes.mixture_moments()
        out["source"] = "explored"
        out["modes"] = modes
    diameter = float(torch.cdist(means, means).max()) if means.shape[0] > 1 else 0.0
    tau2 = float(torch.linalg.eigvalsh(covs).max())
    out.update(
        sigma=math.sqrt(max(diameter**2 - tau2, tau2)),
        scale=math.sqrt(float(torch.diagonal(cov).mean())),
        center=center.to(device=device, dtype=target.dtype),
        diameter=diameter,
        tau=math.sqrt(tau2),
    )
    return out


def particle_geometry(x: torch.Tensor, generator: torch.Generator, max_pairs_points: int = 1024) -> dict:
    r"""Defaults for SMS from particles ``x: (n, d)``: ``center``, ``scale`` (root mean variance per
    coordinate), ``diameter`` (99% quantile of pairwise distances, which includes the within-mode
    spread and so errs large) and ``sigma`` = ``diameter`` (the diameter rule, log-concave side; a
    smaller sigma by log-concavity along particle lines was tried and not adopted,
    docs/walk_jump_banana.md)."""
    n = x.shape[0]
    idx = torch.randperm(n, generator=generator, device=generator.device)[:max_pairs_points].to(x.device)
    xs = x[idx].double()
    d2 = torch.cdist(xs, xs).pow(2)
    iu = torch.triu_indices(xs.shape[0], xs.shape[0], 1)
    diameter = float(d2[iu[0], iu[1]].quantile(0.99).sqrt()) if xs.shape[0] > 1 else 0.0
    scale = math.sqrt(float(x.double().var(0).mean()))
    return dict(
        source="particles",
        center=x.double().mean(0),
        scale=scale,
        diameter=diameter,
        tau=math.nan,
        sigma=max(diameter, scale),
    )


def noise_levels(geometry: dict, dim: int, sigma, num_measurements, w2_tol, learned: bool):
    """``(sigma, M, w2_tol)``: the given values, else the defaults of the module docstring. With a
    learned score (measurements cost no target evaluation) the W2 tolerance also ends at a noise of at
    most twice the within-mode scale ``tau``, where p(x | ybar) is one mode and the final MALA need
    not choose between modes (modes closer than the overall scale, e.g. nine modes 5 apart, overall
    scale 4.2), at most 4x M."""
    sigma = float(geometry["sigma"] if sigma is None else sigma)
    if not 0 < sigma < math.inf:
        raise ValueError(f"sigma must be positive and finite, got {sigma}")
    if w2_tol is None:
        w2_tol = dim * (0.5 * geometry["scale"]) ** 2
        if learned and math.isfinite(geometry.get("tau", math.nan)):
            w2_tol = max(dim * min(0.5 * geometry["scale"], 2 * geometry["tau"]) ** 2, w2_tol / 4)
    if num_measurements is None:
        num_measurements = max(1, math.ceil(sigma**2 * dim / w2_tol))
    return sigma, num_measurements, float(w2_tol)
