r"""The inner MCMC of tempering samplers: a metric from the particles, and moves repeated until the
particles have decorrelated from where the stage started.

**Metric** (:func:`particle_metric`). The moves at inverse temperature :math:`\beta` are
preconditioned by :math:`M^{-1} = \hat\Sigma`, an estimate of the covariance of :math:`\pi_\beta`
from the weighted particles (Chopin 2002; Buchholz, Chopin and Jacob 2021): the kernel then sees
unit scales and, with a dense :math:`\hat\Sigma`, no correlations, so a correlated posterior needs
no more moves than an isotropic one.

* ``"dense"``: the weighted covariance shrunk toward its diagonal,
  :math:`(1-\lambda)S + \lambda\,\mathrm{diag}(S)` with :math:`\lambda = \min(1, d/n_{\text{eff}})`
  (:math:`n_{\text{eff}}` the Kish ESS of the weights): the sample covariance's eigenvalues spread
  by :math:`O(\sqrt{d/n})`, and this keeps it well conditioned at any :math:`n`.
* ``"diag"``: the weighted variances (floored at :math:`10^{-8}` of the largest).
* ``"auto"`` (default): dense when :math:`d \le n_{\text{eff}}/10` (ten effective particles per
  dimension for the :math:`d(d+1)/2` entries), else diagonal.

A multimodal cloud has a covariance dominated by the distances between its modes, which is the wrong
scale for moves inside each mode. The covariance is therefore estimated **within clusters** of the
particles (``within_modes``, the default): the particles are split by a weighted 2-means
(coordinates scaled to unit variance, best of 3 k-means++ starts, Lloyd iterations) as long as the
split separates them, recursively up to :data:`MAX_CLUSTERS`; the pooled within-cluster covariance
is the metric. A split is kept only when
the within-cluster variance along the line of the two centres is under 0.2 of the total there
(two equal Gaussians 4 sd apart), and when each side holds at least 5% of the weight: a unimodal
cloud, Gaussian, skewed, uniform or heavy-tailed with finite variance (ratios 0.36, 0.25, 0.5 or
more), is not split (none of log-normal, t with 3 df or uniform clouds of 900 points was, in 20
seeds; an infinite-variance cloud can be). The metric is a function of the whole cloud, shared by
every particle, so each move leaves :math:`\pi_\beta` invariant given it (the usual adaptive-SMC
approximation).

**Number of moves** (:func:`decorrelating_moves`). After move :math:`k` the mean whitened squared
distance of the particles from their positions at the start of the stage,

.. math:: D_k = \frac{1}{n d}\sum_i \lVert x_i^{(k)} - x_i^{(0)}\rVert^2_{\hat\Sigma^{-1}},

grows linearly while the particles diffuse and saturates once they have forgotten their start: for
an autoregressive chain of autocorrelation :math:`\rho` per move,
:math:`D_k \propto 1 - \rho^k`, so :math:`D_k / D_{\lfloor k/2\rfloor} = 1 + \rho^{k/2}`. The moves
stop at the first :math:`k \ge` ``min_steps`` with :math:`D_k \le (1 + \epsilon) D_{\lfloor k/2
\rfloor}`, :math:`\epsilon` = ``decorrelation_tol`` (0.1: the correlation with the start is then
:math:`\rho^k < \epsilon^2 = 0.01`), or at ``max_steps``. The rule is scale-free: it does not need
:math:`\hat\Sigma` to be right, only to put the coordinates on comparable scales. pocomc
(Karamanis et al. 2022) adapts its number of moves in the same spirit, from how far the proposals
go; Buchholz et al. (2021) tune HMC within SMC from the expected squared jumping distance.
The mean over particles, not a median, on purpose: where modes separate, the few particles still
changing modes are what the mode weights depend on, and a median ignores them. ``min_steps`` = 2
is the least the ratio
needs; ``max_steps`` = 100 bounds a stage at 100 moves per particle.

The step size is shared by the particles and adapted after every move toward the kernel's target
acceptance (:func:`~diffstat.tempering.path.adaptive_moves`'s Robbins-Monro rule).

**Randomised step sizes** (``step_jitter`` :math:`a > 0`; 0, the default, is off and draws nothing).
Each particle's step size at each move is :math:`h_i = h\, e^{a u_i}`, :math:`u_i \sim U(-1, 1)`
drawn independently of the particles' positions, so the move is a mixture over :math:`h_i` of
:math:`\pi_\beta`-invariant kernels and leaves :math:`\pi_\beta` invariant (the random step sizes of
Buchholz, Chopin and Jacob 2021 for HMC within SMC); the centre :math:`h` is adapted as above on the
mean acceptance. It is for targets whose local scale varies across the cloud, such as Neal's funnel,
where one :math:`h` cannot suit both the neck and the mouth: :math:`a = 3` spans a factor
:math:`e^{6} \approx 400` in :math:`h`. Off by default because, measured (``docs/smc_funnel.md``),
it fills the funnel's neck only together with many more moves per stage and still leaves log Z
0.2 to 0.4 low there, while on well-scaled targets it costs 1.2 to 3.8 times the evaluations for
the same accuracy (the decorrelation rule needs more of the less efficient moves).

Measurements behind these defaults: ``docs/smc_moves.md`` (``benchmarks/bench_smc_moves.py``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from diffstat.mcmc.metric import DenseMetric, Metric, inverse_quadratic
from diffstat.modes.clusters import MAX_CLUSTERS, cluster_particles, weighted_covariance
from diffstat.mcmc.base import MCMCState
from diffstat.tempering.path import GeometricPath, PathState, move, tempered_state
from diffstat.tempering.resampling import ess

__all__ = [
    "MAX_CLUSTERS",
    "METRICS",
    "MoveResult",
    "cluster_particles",
    "decorrelating_moves",
    "particle_metric",
    "weighted_covariance",
    "whitened_move",
]

METRICS = ("auto", "dense", "diag")
#: Effective particles per dimension below which ``metric="auto"`` falls back to the diagonal.
_DENSE_RATIO = 10.0


def particle_metric(
    x: torch.Tensor,
    log_w: torch.Tensor | None = None,
    metric: str = "auto",
    labels: torch.Tensor | None = None,
    shrink_until: float | None = None,
    dense_ratio: float = _DENSE_RATIO,
    keep_conditioning: bool = False,
) -> Metric:
    r"""The preconditioner of the moves from particles ``x: (n, d)`` with log weights ``(n,)``
    (module docstring): a :class:`DenseMetric` or a diagonal ``(d,)``, from the covariance pooled
    within the clusters ``labels (n,)`` (one cluster when None). ``shrink_until``: the dense
    covariance is shrunk only while :math:`n_{\text{eff}} <` ``shrink_until`` :math:`d` (None: always;
    AIS's pilot passes 10, as a shrinkage of 1% turns a correlation of 0.9999 into 0.99);
    ``dense_ratio``: ``"auto"`` is dense from ``dense_ratio`` effective particles per dimension;
    ``keep_conditioning`` (SMC's): from ``dense_ratio`` effective particles per dimension the
    shrinkage :math:`\lambda` is at most the least eigenvalue :math:`\mu` of the weighted
    *correlation* matrix, so that it widens the metric along no direction by more than a factor
    about :math:`1 + \lambda/\mu \le 2` in variance (:mod:`diffstat.tempering.smc`, "Metric on a
    collinear posterior")."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    n, d = x.shape
    if log_w is None:
        log_w = torch.zeros(n, dtype=x.dtype, device=x.device)
    w = torch.softmax(log_w, -1)
    n_eff = float(ess(log_w))
    if labels is None:
        cov = weighted_covariance(x, w)
    else:
        masses = torch.zeros(int(labels.max()) + 1, dtype=w.dtype, device=w.device).index_add_(0, labels, w)
        cov = sum(
            m * weighted_covariance(x, torch.where(labels == c, w, 0.0) / m)
            for c, m in enumerate(masses)
            if m > 0
        )
    var = cov.diagonal()
    if not float(var.max()) > 0:
        return torch.ones_like(var)
    var = var.clamp_min(1e-8 * var.max())
    if metric == "diag" or (metric == "auto" and d > n_eff / dense_ratio):
        return var
    lam = min(1.0, d / n_eff) if shrink_until is None or n_eff < shrink_until * d else 0.0
    if keep_conditioning and lam > 0 and n_eff >= dense_ratio * d:
        scale = var.rsqrt()
        lam = min(lam, float(torch.linalg.eigvalsh(scale[:, None] * cov * scale[None, :]).min().clamp_min(0)))
    shrunk = (1 - lam) * cov + lam * torch.diag(var)
    shrunk = shrunk + torch.diag(var - shrunk.diagonal())  # the floored diagonal
    return DenseMetric.from_covariance(shrunk)


class MoveResult(NamedTuple):
    """Moved particles; the adapted 0-d ``log_step_size``; each particle's mean acceptance ``(n,)``;
    the number of moves made; the final decorrelation :math:`D_k` (module docstring)."""

    particles: PathState
    log_step_size: torch.Tensor
    acceptance: torch.Tensor
    num_steps: int
    distance: float


def decorrelating_moves(
    kernel,
    generator: torch.Generator,
    ps: PathState,
    path: GeometricPath,
    beta,
    log_step_size: torch.Tensor,
    *,
    inv_mass: Metric = None,
    target_accept: float = 0.574,
    num_steps: int | None = None,
    min_steps: int = 2,
    max_steps: int = 100,
    decorrelation_tol: float = 0.1,
    adapt_rate: float = 1.0,
    step_jitter: float = 0.0,
) -> MoveResult:
    r"""Moves at ``beta`` until :math:`D_k \le (1+\epsilon) D_{\lfloor k/2\rfloor}` (module
    docstring), between ``min_steps`` and ``max_steps``; exactly ``num_steps`` moves when given.
    After each move :math:`\log h \mathrel{+}= \kappa(\bar a - a^\star)` (``adapt_rate``,
    ``target_accept``). ``step_jitter`` :math:`a`: each particle moves at :math:`h e^{a u}`,
    :math:`u \sim U(-1, 1)` fresh per particle and move (module docstring); 0 draws nothing."""
    x0 = ps.x
    n, d = x0.shape
    acc_sum = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
    cap = max_steps if num_steps is None else int(num_steps)
    history = [0.0]
    k = 0
    while k < cap:
        if step_jitter:
            u = torch.rand(n, generator=generator, dtype=x0.dtype, device=x0.device).mul_(2).sub_(1)
            step_size = torch.exp(log_step_size + step_jitter * u)
        else:
            step_size = torch.exp(log_step_size)
        ps, info = move(kernel, generator, ps, path, beta, step_size, inv_mass)
        k += 1
        acc_sum = acc_sum + info.acceptance_rate
        if adapt_rate:
            log_step_size = log_step_size + adapt_rate * (info.acceptance_rate.mean() - target_accept)
        history.append(float(inverse_quadratic(inv_mass, ps.x - x0).mean()) / d)
        if (
            num_steps is None
            and k >= min_steps
            and 0 < history[k] <= (1 + decorrelation_tol) * history[k // 2]
        ):
            break
    acc = acc_sum / k if k else torch.full_like(acc_sum, math.nan)
    return MoveResult(ps, log_step_size, acc, k, history[k])


def whitened_move(kernel, generator, ps: PathState, path, beta, step_size, chol: torch.Tensor):
    r"""One move of ``kernel`` with a dense metric :math:`L_t L_t^\top` per temperature, all
    temperatures in one batch.

    The ``n = C R'`` replicas ``ps`` hold ``R'`` temperatures in the same order in each of ``C``
    runs (row ``c R' + t``), ``chol: (R', dim, dim)`` their lower Cholesky factors. Each replica moves
    in the coordinates :math:`u` of :math:`x' = x + L_t u` around its current point with the identity
    metric: the density's gradient is :math:`L_t^\top \nabla_x`, a proposal :math:`u` is the point
    :math:`x + L_t u`, and both are one batched product over temperatures. MALA, HMC and RWM are affine
    invariant, so this is the move of :func:`~diffstat.tempering.path.move` with the metric
    :math:`L_t L_t^\top`, up to floating-point reassociation, drawing the same random numbers as the
    diagonal moves of the same rows. ``beta``, ``step_size``: ``(n,)``. Returns the moved replicas (a
    rejected one keeps its state exactly) and the kernel's info.
    """
    shape = (-1, chol.shape[0], ps.x.shape[1])  # (C, R', dim)

    def grad_u(g):  # L_t^T g per row
        return torch.einsum("ted,cte->ctd", chol, g.reshape(shape)).reshape(g.shape)

    last = []  # the PathState of the last points evaluated

    def log_prob_and_grad(u):
        x = ps.x + torch.einsum("ted,ctd->cte", chol, u.reshape(shape)).reshape(u.shape)  # x + L_t u
        last[:] = [path.evaluate(x)]
        st = tempered_state(last[0], beta)
        return st.log_prob, grad_u(st.grad)

    def evaluate_rows(u, rows):  # a later delayed-rejection stage, at the rows (m,) still rejected
        factors = chol[rows % chol.shape[0]]  # (m, dim, dim)
        sub = path.evaluate(ps.x[rows] + torch.einsum("med,md->me", factors, u))
        last[:] = [PathState(*(a.index_copy(0, rows, b) for a, b in zip(last[0], sub)))]
        st = tempered_state(sub, beta[rows] if torch.is_tensor(beta) and beta.dim() == 1 else beta)
        return st.log_prob, torch.einsum("med,me->md", factors, st.grad)

    log_prob_and_grad.evaluate_rows = evaluate_rows
    start = tempered_state(ps, beta)
    origin = MCMCState(torch.zeros_like(ps.x), start.log_prob, grad_u(start.grad))
    _, info = kernel(generator, origin, log_prob_and_grad, step_size, None)
    # the kernel's last evaluation is its proposal (true of MALA, HMC, RWM)
    return ps.where(info.is_accepted, last[0]), info
