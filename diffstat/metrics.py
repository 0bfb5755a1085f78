"""Distances between samples, mode weights, and the divide-and-conquer metrics.

Every function takes torch tensors (any device) or numpy arrays of shape ``(n, dim)`` (a 1-d
array is read as ``(n, 1)``) and returns a float (or, for :func:`mode_weights`, a numpy array).
Two-sample statistics are computed in float64 on the device of the first argument.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy import integrate, stats

from diffstat._util import check_positive_int

__all__ = [
    "median_bandwidth",
    "mmd",
    "energy_distance",
    "permutation_test",
    "sliced_wasserstein",
    "mode_weights",
    "tv_distance",
    "d_mah",
    "d_iad",
    "d_skew",
]

#: Rows per block of a pairwise computation (a block of 4096 x 4096 float64 is 128 MiB).
_BLOCK = 4096
#: Points of each sample used for the median heuristic (the median of 4e6 distances is stable).
_MEDIAN_POINTS = 1000


def _as_tensor(x, name: str, device=None) -> torch.Tensor:
    if torch.is_tensor(x):
        t = x.detach()
    else:
        t = torch.as_tensor(np.asarray(x))
    t = t.to(device=device if device is not None else t.device, dtype=torch.float64)
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2 or t.shape[0] < 1:
        raise ValueError(f"{name} must have shape (n, dim), got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} has NaN or infinite entries")
    return t


def _two_samples(x, y, min_points: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    x = _as_tensor(x, "x")
    y = _as_tensor(y, "y", device=x.device)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dim, got {x.shape[1]} and {y.shape[1]}")
    if min(x.shape[0], y.shape[0]) < min_points:
        raise ValueError(f"each sample needs at least {min_points} points")
    return x, y


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``(n, m)``, computed directly: the matrix-product shortcut
    :math:`|a|^2 + |b|^2 - 2 a^\top b` loses digits for close points (and gives the distance of a
    point to itself as about 1e-8, which biases the energy distance)."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").pow(2)


def _block_sum(a: torch.Tensor, b: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``sum_{i, j} fn(|a_i - b_j|^2)`` without holding the full matrix."""
    total = a.new_zeros(())
    for i in range(0, a.shape[0], _BLOCK):
        total = total + fn(_sq_dist(a[i : i + _BLOCK], b)).sum()
    return total


def median_bandwidth(x, y) -> float:
    """The median heuristic: the median Euclidean distance between points of the pooled sample
    (at most 1,000 evenly spaced points of each)."""
    x, y = _two_samples(x, y)
    pick = lambda t: t[
        torch.linspace(0, t.shape[0] - 1, min(t.shape[0], _MEDIAN_POINTS), device=t.device).long()
    ]  # noqa: E731
    z = torch.cat([pick(x), pick(y)])
    dist = _sq_dist(z, z).sqrt()
    iu = torch.triu_indices(z.shape[0], z.shape[0], 1, device=z.device)
    h = float(torch.quantile(dist[iu[0], iu[1]], 0.5))  # the midpoint for an even count, as numpy
    if h <= 0:
        raise ValueError("all points coincide: the median heuristic gives a zero bandwidth")
    return h


def _mmd2(x: torch.Tensor, y: torch.Tensor, fn) -> torch.Tensor:
    n, m = x.shape[0], y.shape[0]
    diag = fn(x.new_zeros(1)).sum()  # fn at distance zero, once per point
    kxx = (_block_sum(x, x, fn) - n * diag) / (n * (n - 1))
    kyy = (_block_sum(y, y, fn) - m * diag) / (m * (m - 1))
    kxy = _block_sum(x, y, fn) / (n * m)
    return kxx + kyy - 2 * kxy


def mmd(x, y, *, bandwidth: float | None = None, squared: bool = False) -> float:
    r"""Maximum mean discrepancy with the Gaussian kernel
    :math:`k(a, b) = \exp(-|a - b|^2 / 2h^2)`, ``h`` by the median heuristic unless given.

    The unbiased estimator (Gretton et al. 2012, eq. 3):

    .. math::
        \widehat{\mathrm{MMD}}^2_u = \frac{\sum_{i \ne j} k(x_i, x_j)}{n(n-1)}
        + \frac{\sum_{i \ne j} k(y_i, y_j)}{m(m-1)} - \frac{2}{nm} \sum_{i, j} k(x_i, y_j),

    which can be slightly negative when the laws agree. Returns it with ``squared=True``, else
    :math:`\sqrt{\max(\widehat{\mathrm{MMD}}^2_u, 0)}`.
    """
    x, y = _two_samples(x, y, min_points=2)
    h = median_bandwidth(x, y) if bandwidth is None else float(bandwidth)
    if not h > 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth}")
    m2 = float(_mmd2(x, y, lambda d2: torch.exp(-d2 / (2 * h * h))))
    return m2 if squared else max(m2, 0.0) ** 0.5


def energy_distance(x, y) -> float:
    r"""Energy distance (Szekely and Rizzo 2013), unbiased:
    :math:`2 E|X - Y| - E|X - X'| - E|Y - Y'|`, with the within-sample means over pairs
    :math:`i \ne j`. Zero in expectation exactly when the laws agree (it is the MMD with the
    kernel :math:`-|a - b|`), positive otherwise; returned without a square root."""
    x, y = _two_samples(x, y, min_points=2)
    return float(_mmd2(x, y, lambda d2: -torch.sqrt(d2.clamp_min(0))))


def permutation_test(
    x,
    y,
    statistic: str = "mmd",
    *,
    num_permutations: int = 200,
    generator: torch.Generator | None = None,
    bandwidth: float | None = None,
) -> float:
    r"""p-value of the two-sample permutation test that ``x`` and ``y`` have the same law, with
    the unbiased ``"mmd"`` (squared, Gaussian kernel) or ``"energy"`` statistic.

    The pooled Gram matrix is computed once (memory :math:`(n + m)^2`); each permutation
    relabels the pooled points. The p-value :math:`(1 + \#\{T_\pi \ge T\}) / (1 + P)` is exact
    under the null (Phipson and Smyth 2010); ``generator`` defaults to seed 0.
    """
    num_permutations = check_positive_int(num_permutations, "num_permutations")
    x, y = _two_samples(x, y, min_points=2)
    n, m = x.shape[0], y.shape[0]
    z = torch.cat([x, y])
    d2 = _sq_dist(z, z)
    if statistic == "mmd":
        h = median_bandwidth(x, y) if bandwidth is None else float(bandwidth)
        gram = torch.exp(-d2 / (2 * h * h))
    elif statistic == "energy":
        gram = -torch.sqrt(d2.clamp_min(0))
    else:
        raise ValueError(f"statistic must be 'mmd' or 'energy', got {statistic!r}")
    gram.fill_diagonal_(0.0)  # the unbiased statistic leaves out i == j
    if generator is None:
        generator = torch.Generator(device=z.device).manual_seed(0)
    labels = torch.zeros(num_permutations + 1, n + m, dtype=torch.float64, device=z.device)
    labels[0, :n] = 1.0
    keys = torch.rand(num_permutations, n + m, generator=generator, device=generator.device).to(z.device)
    labels[1:].scatter_(1, keys.argsort(1)[:, :n], 1.0)
    a, b = labels, 1.0 - labels
    ga = a @ gram
    s_xx, s_xy = (ga * a).sum(1), (ga * b).sum(1)
    s_yy = ((b @ gram) * b).sum(1)
    t = s_xx / (n * (n - 1)) + s_yy / (m * (m - 1)) - 2 * s_xy / (n * m)
    return float((1 + (t[1:] >= t[0]).sum()) / (1 + num_permutations))


def _wasserstein_pp_sorted(xs: torch.Tensor, ys: torch.Tensor, p: float) -> torch.Tensor:
    r""":math:`W_p^p` between the empirical laws of the columns of sorted ``xs: (n, L)`` and
    ``ys: (m, L)``: :math:`\int_0^1 |F^{-1}(u) - G^{-1}(u)|^p du`, exact for any ``n, m`` (the
    quantile functions are steps at ``i / n`` and ``j / m``; in units of ``1 / (n m)``)."""
    n, m = xs.shape[0], ys.shape[0]
    if n == m:
        return (xs - ys).abs().pow(p).mean(0)
    steps = torch.cat(
        [torch.arange(1, n + 1, device=xs.device) * m, torch.arange(1, m + 1, device=xs.device) * n]
    )
    t = torch.unique(steps)  # sorted break points of both step functions, last one n * m
    width = torch.diff(t, prepend=t.new_zeros(1)).to(torch.float64) / (n * m)
    ix = (t + m - 1) // m - 1  # ceil(u n) - 1 at the right end u = t / (n m) of each piece
    iy = (t + n - 1) // n - 1
    return (width[:, None] * (xs[ix] - ys[iy]).abs().pow(p)).sum(0)


def sliced_wasserstein(
    x, y, *, num_projections: int = 128, p: float = 2.0, generator: torch.Generator | None = None
) -> float:
    r"""Sliced Wasserstein distance :math:`\bigl(\frac1L \sum_{l} W_p^p(\theta_l^\top X,
    \theta_l^\top Y)\bigr)^{1/p}` over ``L`` directions :math:`\theta_l` uniform on the sphere.

    The directions come from ``generator`` (seed 0 by default, so the value is reproducible);
    each 1-d :math:`W_p` between the projected empirical laws is exact (sorting; samples of
    different sizes are matched through their quantile functions).
    """
    num_projections = check_positive_int(num_projections, "num_projections")
    if not p >= 1:
        raise ValueError(f"p must be >= 1, got {p}")
    x, y = _two_samples(x, y)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    theta = torch.randn(
        num_projections, x.shape[1], generator=generator, dtype=torch.float64, device=generator.device
    )
    theta = (theta / theta.norm(dim=1, keepdim=True)).to(x.device)
    xs = (x @ theta.T).sort(0).values
    ys = (y @ theta.T).sort(0).values
    return float(_wasserstein_pp_sorted(xs, ys, p).mean() ** (1.0 / p))


def mode_weights(
    x, centres=None, *, classifier: Callable | None = None, num_modes: int | None = None
) -> np.ndarray:
    """Fraction of the points ``x: (n, dim)`` in each mode, ``(K,)``.

    A point belongs to its nearest centre (Euclidean) among ``centres: (K, dim)``, or to the
    label ``classifier(x)`` returns (integers in ``0..K-1``; e.g. ``GaussianMixture.assign``,
    which accounts for unequal widths); ``K`` is ``len(centres)`` or ``num_modes`` (default: the
    largest label plus one).
    """
    if (centres is None) == (classifier is None):
        raise ValueError("give exactly one of centres and classifier")
    if classifier is not None:
        labels = classifier(x if torch.is_tensor(x) else _as_tensor(x, "x"))
        labels = labels.detach().cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
        labels = labels.astype(np.int64).ravel()
        if labels.size and labels.min() < 0:
            raise ValueError("classifier returned negative labels")
        k = int(labels.max()) + 1 if num_modes is None else check_positive_int(num_modes, "num_modes")
        if labels.size and labels.max() >= k:
            raise ValueError(f"classifier returned label {labels.max()} >= num_modes={k}")
    else:
        xt = _as_tensor(x, "x")
        c = _as_tensor(centres, "centres", device=xt.device)
        if c.shape[1] != xt.shape[1]:
            raise ValueError(f"centres must have shape (K, {xt.shape[1]}), got {tuple(c.shape)}")
        k = c.shape[0]
        labels = torch.cdist(xt, c).argmin(1).cpu().numpy()
    return np.bincount(labels, minlength=k) / max(len(labels), 1)


def tv_distance(p, q) -> float:
    r"""Total-variation distance :math:`\frac12 \sum_k |p_k - q_k|` between two weight vectors
    (each normalised to sum 1 first; negative entries are refused)."""
    p = np.asarray(p.detach().cpu() if torch.is_tensor(p) else p, dtype=np.float64).ravel()
    q = np.asarray(q.detach().cpu() if torch.is_tensor(q) else q, dtype=np.float64).ravel()
    if p.shape != q.shape:
        raise ValueError(f"weight vectors must have the same length, got {p.size} and {q.size}")
    if (p < 0).any() or (q < 0).any() or p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    return float(0.5 * np.abs(p / p.sum() - q / q.sum()).sum())


def d_mah(x, reference, *, cov=None) -> float:
    r"""Mahalanobis distance of means (Trojan et al. 2024):
    :math:`\sqrt{(\bar x - \mu)^\top \Sigma^{-1} (\bar x - \mu)}`.

    ``reference`` is draws ``(m, dim)`` of the exact posterior (then :math:`\mu` is their mean and,
    unless ``cov`` is given, :math:`\Sigma` their covariance) or the exact mean ``(dim,)``, in
    which case ``cov: (dim, dim)``, the exact covariance, is required.
    """
    x = _as_tensor(x, "x")
    ref = reference.detach() if torch.is_tensor(reference) else torch.as_tensor(np.asarray(reference))
    ref = ref.to(device=x.device, dtype=torch.float64)
    if ref.dim() == 1:
        if cov is None:
            raise ValueError("reference is a mean vector: give the exact covariance as cov")
        mu = ref
    else:
        ref = _as_tensor(ref, "reference")
        mu = ref.mean(0)
        if cov is None:
            if ref.shape[0] < 2:
                raise ValueError("need at least 2 reference draws to estimate the covariance")
            cov = torch.cov(ref.T).reshape(ref.shape[1], ref.shape[1])
    cov = (cov.detach() if torch.is_tensor(cov) else torch.as_tensor(np.asarray(cov))).to(
        device=x.device, dtype=torch.float64
    )
    d = x.shape[1]
    if mu.shape != (d,) or cov.shape != (d, d):
        raise ValueError(
            f"reference mean must be ({d},) and cov ({d}, {d}), got {tuple(mu.shape)} and {tuple(cov.shape)}"
        )
    delta = x.mean(0) - mu
    return float(torch.sqrt(delta @ torch.linalg.solve(cov, delta)))


def _np(x, name: str) -> np.ndarray:
    return _as_tensor(x, name).cpu().numpy()


def d_iad(x, reference, *, grid_size: int = 128, num_sd: float = 5.0) -> float:
    r"""Integrated absolute difference of the marginal densities (Trojan et al. 2024):
    :math:`\frac{1}{2d} \sum_{j=1}^d \int |\hat p_j(t) - \hat q_j(t)|\, dt`, in [0, 1].

    :math:`\hat p_j, \hat q_j` are Gaussian KDEs (``scipy.stats.gaussian_kde``, Scott's rule) of
    coordinate ``j`` of ``x`` and ``reference``; the integral is the trapezoid rule on
    ``grid_size`` points spanning :math:`\pm` ``num_sd`` standard deviations around the mean of
    both samples (the union of the two ranges, as in the authors' code). Each term is the total
    variation distance between the two smoothed marginals.
    """
    x, ref = _np(x, "x"), _np(reference, "reference")
    if x.shape[1] != ref.shape[1]:
        raise ValueError(f"x and reference must have the same dim, got {x.shape[1]} and {ref.shape[1]}")
    if min(x.shape[0], ref.shape[0]) < 2:
        raise ValueError("d_iad needs at least 2 points in each sample")
    total = 0.0
    for j in range(x.shape[1]):  # one KDE per coordinate; dim is small in these benchmarks
        a, b = x[:, j], ref[:, j]
        lo = min(a.mean() - num_sd * a.std(), b.mean() - num_sd * b.std())
        hi = max(a.mean() + num_sd * a.std(), b.mean() + num_sd * b.std())
        grid = np.linspace(lo, hi, grid_size)
        diff = np.abs(stats.gaussian_kde(a)(grid) - stats.gaussian_kde(b)(grid))
        total += integrate.trapezoid(diff, grid)
    return float(total / (2 * x.shape[1]))


def d_skew(x, reference) -> float:
    r"""Mean absolute difference of marginal skewness (Trojan et al. 2024):
    :math:`\frac1d \sum_j |\gamma_j(x) - \gamma_j(\text{reference})|`, with
    :math:`\gamma = m_3 / m_2^{3/2}` from the biased sample moments."""
    x, ref = _two_samples(x, reference, min_points=2)

    def skew(t):
        c = t - t.mean(0)
        return (c**3).mean(0) / (c**2).mean(0) ** 1.5

    return float((skew(x) - skew(ref)).abs().mean())
