"""Exact answers for the audit's third round (``audit_cases_pyro.py``), without the package:
closed-form Gaussian posteriors and evidences, mixtures of them, and the trapezoid rule on a grid
in the frame of a Laplace approximation."""

from __future__ import annotations

import math

import numpy as np
import torch

F64 = torch.float64


def _t(x):
    return torch.as_tensor(x, dtype=F64)


def gaussian_given(prior_prec, design, y, noise_var):
    """theta ~ N(0, prior_prec^-1), y ~ N(design theta, noise_var I), batched over prior_prec
    (..., p, p) and noise_var (...): posterior means, variances (diagonal) and log evidence."""
    n = y.shape[0]
    prec = prior_prec + design.T @ design / noise_var[..., None, None]
    chol = np.linalg.cholesky(prec)
    b = (design.T @ y) / noise_var[..., None]
    mean = np.linalg.solve(prec, b[..., None])[..., 0]
    eye = np.broadcast_to(np.eye(prec.shape[-1]), prec.shape)
    var = np.diagonal(np.linalg.solve(prec, eye), axis1=-2, axis2=-1)
    logdet_prior = np.linalg.slogdet(prior_prec)[1]
    logdet_post = 2 * np.log(np.diagonal(chol, axis1=-2, axis2=-1)).sum(-1)
    log_ev = (
        -0.5 * n * np.log(2 * np.pi * noise_var)
        - 0.5 * (y @ y) / noise_var
        + 0.5 * (b * mean).sum(-1)
        + 0.5 * logdet_prior
        - 0.5 * logdet_post
    )
    return mean, var, log_ev


def mixture_moments(log_w, means, variances):
    """Mean and sd of a mixture with log weights ``log_w`` (m,) of (m, k) component moments."""
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    m = w @ means
    return m, np.sqrt(np.maximum(w @ (variances + means**2) - m**2, 0.0))


def log_mass(log_w, cell: float) -> float:
    """log of the trapezoid sum of exp(log_w) on a grid with cells of volume ``cell``."""
    top = float(np.max(log_w))
    return top + math.log(float(np.exp(log_w - top).sum()) * cell)


def grid_moments(log_density, start, funcs, num=33, width=12.0):
    """Means and sds of ``funcs`` (name -> map of (m, d) points to (m, k) values) under the density
    ``exp(log_density)`` on R^d, by the trapezoid rule on a grid of ``num`` points an axis over
    +-``width`` sds of its Laplace approximation (mode by L-BFGS, Hessian by autograd); refused where
    the grid's edge holds over 1e-7 of the mass. Returns the moments and log of the density's
    integral."""
    u = _t(start).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([u], max_iter=1000, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -log_density(u[None])[0]
        loss.backward()
        return loss

    opt.step(closure)
    mode = u.detach()
    hess = torch.autograd.functional.hessian(lambda v: -log_density(v[None])[0], mode)
    chol = torch.linalg.cholesky(torch.linalg.inv(hess))
    axis = torch.linspace(-width, width, num, dtype=F64)
    z = torch.cartesian_prod(*[axis] * len(start)).reshape(-1, len(start))
    points = mode + z @ chol.T
    with torch.no_grad():
        lp = torch.cat([log_density(p) for p in points.split(65536)])
    w = torch.exp(lp - lp.max())
    edge = float(w[(z.abs() == width).any(-1)].sum() / w.sum())
    if edge > 1e-7:
        raise RuntimeError(f"grid too narrow: {edge:.1e} of the mass on its edge")
    cell = (2 * width / (num - 1)) ** len(start) * float(torch.diagonal(chol).prod())
    log_z = log_mass(lp.numpy(), cell)
    w = (w / w.sum()).numpy()
    out = {}
    for name, f in funcs.items():
        v = f(points).numpy().reshape(len(w), -1)
        m = w @ v
        out[name] = (m, np.sqrt(np.maximum(w @ v**2 - m**2, 0.0)))
    return out, log_z


def normal_lp(x, sd):
    """log N(x; 0, sd^2)."""
    return -0.5 * (x / sd) ** 2 - math.log(sd) - 0.5 * math.log(2 * math.pi)
