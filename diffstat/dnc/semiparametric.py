r"""Semiparametric density-product estimator (Neiswanger, Wang and Xing 2014, "Asymptotically
exact, embarrassingly parallel MCMC", section 3.3).

Each sub-posterior is estimated by a Gaussian corrected by a kernel density estimate (Hjort and
Glad 1995):

.. math::
    \hat p_k(\theta) = \hat f_k(\theta)\,\frac1{T} \sum_{t=1}^{T}
        \frac{\mathcal N(\theta; \theta^k_t, h^2 I)}{\hat f_k(\theta^k_t)},
    \qquad \hat f_k = \mathcal N(m_k, S_k).

Their product is a mixture over index tuples :math:`\mathbf t = (t_1, \dots, t_K)`:

.. math::
    \prod_k \hat p_k(\theta) \propto \sum_{\mathbf t} W_{\mathbf t}\,
        \mathcal N(\theta; \mu_{\mathbf t}, \Sigma_{\mathbf t}),\quad
    W_{\mathbf t} = \frac{\prod_k \mathcal N(\theta^k_{t_k}; \bar\theta_{\mathbf t}, h^2 I)\;
        \mathcal N(\bar\theta_{\mathbf t}; \mu, \Sigma + \tfrac{h^2}{K} I)}
        {\prod_k \hat f_k(\theta^k_{t_k})},

with :math:`\bar\theta_{\mathbf t}` the mean of the chosen draws, :math:`(\mu, \Sigma)` the
Gaussian product of the :math:`\hat f_k`, :math:`\Sigma_{\mathbf t} = (\tfrac K{h^2} I +
\Sigma^{-1})^{-1}` and :math:`\mu_{\mathbf t} = \Sigma_{\mathbf t}(\tfrac K{h^2}
\bar\theta_{\mathbf t} + \Sigma^{-1}\mu)`. The tuple is sampled by Metropolis-within-Gibbs (propose
a new index for one shard uniformly, accept with :math:`W_{\mathbf t'}/W_{\mathbf t}`), here in
many independent chains at once, each ending with one draw from its Gaussian component.

Everything is computed in coordinates whitened by the Gaussian product (so the isotropic kernel
suits every direction); the bandwidth is annealed from ``bandwidth_start`` to ``bandwidth`` over
the first half of the sweeps, as Neiswanger et al. anneal it with the iteration number.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from diffstat._util import check_positive_int, progress_bar
from diffstat.dnc.gaussian import (
    CombineResult,
    gaussian_log_prob,
    gaussian_product,
    sample_moments,
    sqrtm_psd,
)

__all__ = ["combine_semiparametric", "GibbsState", "GibbsInfo", "gibbs_sweep"]


def _log_weights(u: torch.Tensor, idx: torch.Tensor, h: float, log_f: torch.Tensor):
    r""":math:`\log W_{\mathbf t}` up to a constant, per chain, in whitened coordinates where the
    Gaussian product is N(0, I) (so :math:`\mathcal N(\bar\theta; 0, (1 + h^2/K) I)`).

    u: (K, T, dim) whitened shard draws; idx: (C, K) chosen indices; log_f: (K, T) log f_k at the
    draws; returns (C,) and the chosen means (C, dim).
    """
    k = u.shape[0]
    shard = torch.arange(k, device=u.device)
    chosen = u[shard, idx]  # (C, K, dim)
    mean = chosen.mean(1)
    log_w = -((chosen - mean[:, None]) ** 2).sum((1, 2)) / (2 * h**2)
    log_w = log_w - (mean**2).sum(-1) / (2 * (1.0 + h**2 / k))
    return log_w - log_f[shard, idx].sum(-1), mean


def combine_semiparametric(
    subposteriors: list[torch.Tensor],
    *,
    num_samples: int,
    generator: torch.Generator,
    scores=None,
    progress: bool = False,
    num_sweeps: int = 100,
    bandwidth: float | None = None,
    bandwidth_start: float | None = None,
) -> CombineResult:
    r"""Draws from the semiparametric product estimate, one per independent Gibbs chain.

    Parameters
    ----------
    num_samples : int
        Number of chains (and of draws).
    num_sweeps : int
        Gibbs sweeps per chain (each sweep updates the index of every shard once).
    bandwidth : float, optional
        Final kernel bandwidth ``h`` in whitened units; default Scott's rule on the shards,
        :math:`\bar s\, T^{-1/(d+4)}` with :math:`\bar s` the mean whitened shard sd.
    bandwidth_start : float, optional
        Bandwidth of the first sweep (default :math:`\bar s`, wide enough to mix).

    Returns
    -------
    CombineResult
        ``lp`` is the Gaussian product's log-density; ``groups["semiparametric"]`` holds the
        bandwidth and the acceptance rate per sweep.
    """
    num_sweeps = check_positive_int(num_sweeps, "num_sweeps")
    mean, cov, root, u, log_f, spread = _whitened_shards(subposteriors)
    k, t, dim = u.shape
    h_final = spread * t ** (-1.0 / (dim + 4)) if bandwidth is None else float(bandwidth)
    h_start = spread if bandwidth_start is None else float(bandwidth_start)
    if not (h_final > 0 and h_start > 0):
        raise ValueError(f"bandwidths must be positive, got {h_final}, {h_start}")
    h_start = max(h_start, h_final)
    idx = torch.randint(0, t, (num_samples, k), generator=generator, device=generator.device)
    state, infos = GibbsState(idx.to(u.device)), []
    half = max(num_sweeps // 2, 1)
    with progress_bar(num_sweeps, "semiparametric", progress) as bar:
        for sweep in range(num_sweeps):
            frac = min(sweep / half, 1.0)  # geometric annealing to the final bandwidth
            state, info = gibbs_sweep(generator, state, u, log_f, h_start ** (1 - frac) * h_final**frac)
            infos.append(info)
            bar.update()
    draws = mean + _draw_components(generator, state, u, log_f, h_final) @ root.T
    groups = {
        "semiparametric": {
            "bandwidth": torch.tensor([info.bandwidth for info in infos]),
            "acceptance_rate": torch.stack([info.acceptance_rate for info in infos]),
        }
    }
    attrs = {"bandwidth": h_final, "num_sweeps": num_sweeps}
    return CombineResult(draws, {"lp": gaussian_log_prob(draws, mean, cov)}, groups, attrs=attrs)


class GibbsState(NamedTuple):
    """The index tuple ``idx (C, K)`` of every chain: one draw of each shard."""

    idx: torch.Tensor


class GibbsInfo(NamedTuple):
    r"""One sweep: its bandwidth, the mean acceptance over shards and chains, and ``num_evals``
    (mixture weights :math:`W_{\mathbf t}` evaluated, one per chain and proposal)."""

    bandwidth: float
    acceptance_rate: torch.Tensor
    num_evals: int


def _whitened_shards(subposteriors: list[torch.Tensor]):
    r"""The Gaussian product ``(mean, cov)`` and its root, the last T draws of every shard whitened
    by it ``u (K, T, dim)``, :math:`\log \hat f_k` at them ``(K, T)`` and the mean shard sd."""
    moments = [sample_moments(x) for x in subposteriors]
    mean, cov = gaussian_product([m for m, _ in moments], [c for _, c in moments])
    root_inv = sqrtm_psd(cov, inverse=True)
    t = min(x.shape[0] for x in subposteriors)
    # equal numbers of draws per shard (the last t of each) so the draws stack as (K, T, dim)
    u = torch.stack([(x[-t:] - mean) @ root_inv.T for x in subposteriors])
    u_mean = u.mean(1, keepdim=True)
    u_cov = torch.einsum("kti,ktj->kij", u - u_mean, u - u_mean) / (t - 1)
    chol = torch.linalg.cholesky(u_cov)
    z = torch.linalg.solve_triangular(chol, (u - u_mean).transpose(1, 2), upper=False)  # (K, dim, T)
    log_f = -0.5 * (z**2).sum(1) - torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(-1, keepdim=True)
    spread = float(torch.sqrt(torch.diagonal(u_cov, dim1=1, dim2=2)).mean())
    return mean, cov, torch.linalg.inv(root_inv), u, log_f, spread


def gibbs_sweep(generator, state: GibbsState, u, log_f, h: float) -> tuple[GibbsState, GibbsInfo]:
    r"""One Metropolis-within-Gibbs sweep at bandwidth ``h``: for every shard in turn, every chain
    proposes a uniform new index and accepts it with probability :math:`\min(1, W'/W)`."""
    idx, device = state.idx, u.device
    (num_chains, k), t = idx.shape, u.shape[1]
    log_w, _ = _log_weights(u, idx, h, log_f)
    accepted = torch.zeros((), dtype=u.dtype, device=device)
    for shard in range(k):  # Gibbs over shards; every chain updates at once
        proposal = idx.clone()
        new = torch.randint(0, t, (num_chains,), generator=generator, device=generator.device)
        proposal[:, shard] = new.to(device)
        log_w_new, _ = _log_weights(u, proposal, h, log_f)
        uniform = torch.rand(num_chains, generator=generator, dtype=u.dtype, device=generator.device)
        accept = torch.log(uniform.to(device)) < log_w_new - log_w
        idx = torch.where(accept[:, None], proposal, idx)
        log_w = torch.where(accept, log_w_new, log_w)
        accepted = accepted + accept.to(u.dtype).mean()
    return GibbsState(idx), GibbsInfo(h, accepted / k, num_chains * (k + 1))


def _draw_components(generator, state: GibbsState, u, log_f, h: float) -> torch.Tensor:
    """One draw ``(C, dim)`` per chain from its Gaussian component, in whitened coordinates:
    precision K/h^2 + 1, mean (K/h^2) u_bar / precision."""
    k, _, dim = u.shape
    _, u_bar = _log_weights(u, state.idx, h, log_f)
    prec = k / h**2 + 1.0
    noise = torch.randn(state.idx.shape[0], dim, generator=generator, dtype=u.dtype, device=generator.device)
    return (k / h**2) * u_bar / prec + noise.to(u.device) / math.sqrt(prec)
