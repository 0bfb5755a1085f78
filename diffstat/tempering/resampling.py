r"""Resampling from log weights, effective sample sizes and weighted moments.

All schemes take unnormalised log weights ``log_w: (n,)`` and an explicit ``torch.Generator``,
and return ancestor indices ``(m,)``: index ``a_i`` is drawn with probability :math:`W_j =
e^{w_j} / \sum_k e^{w_k}` (self-normalised, so adding a constant to every log weight changes
nothing). They differ in how the uniforms are laid down (Douc, Cappe and Moulines 2005):

* **multinomial**: :math:`m` independent uniforms;
* **stratified**: one uniform in each stratum, :math:`u_i = (i + U_i)/m`;
* **systematic**: one shared uniform, :math:`u_i = (i + U)/m`.

Each is unbiased (the expected number of copies of particle :math:`j` is :math:`m W_j`);
stratified and systematic have lower variance.
"""

from __future__ import annotations

import torch

from diffstat._util import check_positive_int

__all__ = [
    "multinomial",
    "stratified",
    "systematic",
    "resample",
    "SCHEMES",
    "ess",
    "conditional_ess",
    "weighted_mean_and_variance",
]


def _check(log_w: torch.Tensor) -> torch.Tensor:
    if log_w.dim() != 1 or log_w.numel() == 0:
        raise ValueError(f"log weights must have shape (n,) with n >= 1, got {tuple(log_w.shape)}")
    if torch.isnan(log_w).any() or torch.isposinf(log_w).any():
        raise ValueError("log weights must not be NaN or +inf")
    if torch.isneginf(log_w).all():
        raise ValueError("all log weights are -inf: no particle has positive weight")
    return log_w


def _inverse_cdf(log_w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Indices ``j`` with ``C_{j-1} <= u_i < C_j``, ``C`` the cumulative normalised weights."""
    cdf = torch.cumsum(torch.softmax(log_w, -1), -1)
    idx = torch.searchsorted(cdf, u.to(cdf.dtype), right=True)
    return idx.clamp_(max=log_w.numel() - 1)  # u above a cdf that sums to 1 - eps


def _uniforms(generator: torch.Generator, shape, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(shape, generator=generator, dtype=like.dtype, device=like.device)


def multinomial(generator: torch.Generator, log_w: torch.Tensor, num: int | None = None) -> torch.Tensor:
    """``num`` (default ``n``) i.i.d. ancestor indices; uniforms sorted for the inverse cdf."""
    log_w = _check(log_w)
    m = log_w.numel() if num is None else check_positive_int(num, "num")
    u, _ = torch.sort(_uniforms(generator, (m,), log_w))
    return _inverse_cdf(log_w, u)


def stratified(generator: torch.Generator, log_w: torch.Tensor, num: int | None = None) -> torch.Tensor:
    """Stratified resampling: ``u_i = (i + U_i) / m``."""
    log_w = _check(log_w)
    m = log_w.numel() if num is None else check_positive_int(num, "num")
    i = torch.arange(m, dtype=log_w.dtype, device=log_w.device)
    return _inverse_cdf(log_w, (i + _uniforms(generator, (m,), log_w)) / m)


def systematic(generator: torch.Generator, log_w: torch.Tensor, num: int | None = None) -> torch.Tensor:
    """Systematic resampling: ``u_i = (i + U) / m`` with a single uniform ``U``."""
    log_w = _check(log_w)
    m = log_w.numel() if num is None else check_positive_int(num, "num")
    i = torch.arange(m, dtype=log_w.dtype, device=log_w.device)
    return _inverse_cdf(log_w, (i + _uniforms(generator, (1,), log_w)) / m)


SCHEMES = {"multinomial": multinomial, "stratified": stratified, "systematic": systematic}


def resample(
    generator: torch.Generator, log_w: torch.Tensor, scheme: str = "systematic", num: int | None = None
) -> torch.Tensor:
    """Ancestor indices by the named ``scheme`` (``"multinomial"``, ``"stratified"``, ``"systematic"``)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown resampling scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    return SCHEMES[scheme](generator, log_w, num)


def ess(log_w: torch.Tensor) -> torch.Tensor:
    r"""Kish effective sample size :math:`(\sum_i w_i)^2 / \sum_i w_i^2`, in :math:`[1, n]`."""
    return torch.exp(2 * torch.logsumexp(log_w, -1) - torch.logsumexp(2 * log_w, -1))


def conditional_ess(log_w: torch.Tensor, log_incr: torch.Tensor) -> torch.Tensor:
    r"""Conditional ESS of Zhou, Johansen and Aston (2016), in :math:`[1, n]`:

    .. math::
        \mathrm{CESS} = n\,\frac{\left(\sum_i W_i\, g_i\right)^2}{\sum_i W_i\, g_i^2},

    with :math:`W` the normalised current weights (from ``log_w``) and :math:`g_i` the incremental
    weights (``log_incr``). With equal current weights it is the ESS of the increments; unlike the
    ESS of the updated weights it measures only the new step's degeneracy.
    """
    log_nw = log_w - torch.logsumexp(log_w, -1, keepdim=True)
    n = log_w.shape[-1]
    num = 2 * torch.logsumexp(log_nw + log_incr, -1)
    den = torch.logsumexp(log_nw + 2 * log_incr, -1)
    return n * torch.exp(num - den)


def weighted_mean_and_variance(
    x: torch.Tensor, log_w: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-normalised weighted mean ``(dim,)`` and variance ``(dim,)`` of particles ``x: (n, dim)``."""
    if log_w is None:
        return x.mean(0), x.var(0, unbiased=False)
    w = torch.softmax(log_w, -1).unsqueeze(-1)
    mean = (w * x).sum(0)
    return mean, (w * (x - mean) ** 2).sum(0)
