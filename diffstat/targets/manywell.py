"""The many-well target: a product of 2-d double wells, with 2^(d/2) modes, an exact log
normaliser (by 1-d quadrature) and exact draws (by rejection under a piecewise-constant
envelope)."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import integrate

from diffstat._util import check_positive_int
from diffstat.target import Target

__all__ = ["ManyWell"]

#: Cells of the piecewise-constant rejection envelope of the double-well coordinate; the
#: acceptance rate is about 1 - O(1 / cells) (99.5% at 4096).
_ENVELOPE_CELLS = 4096
#: The envelope covers the interval where the 1-d log-density is within this many nats of its
#: maximum; the mass left outside is below exp(-100) relative to the whole.
_TRUNCATION_NATS = 100.0


class ManyWell:
    r"""Many-well target on :math:`\mathbb R^d` (Midgley et al. 2023, FAB; Vargas et al. 2023, DDS).

    The coordinates are ``d / 2`` independent pairs :math:`(x_{2j}, x_{2j+1})` (0-based), each with

    .. math::
        \log \tilde p(u, v) = -(a u + b u^2 + c u^4) - \tfrac12 v^2,

    which for the benchmark's :math:`a = -0.5, b = -6, c = 1` is
    :math:`-u^4 + 6u^2 + 0.5u - v^2/2`: two wells in :math:`u` near -1.71 and +1.75, the right one
    heavier. The unnormalised density handed to samplers is exactly this product, so
    :math:`\log Z = \tfrac d2 \left[\log \int e^{-(a u + b u^2 + c u^4)}\,du
    + \tfrac12 \log 2\pi\right]`, the 1-d integral computed by adaptive quadrature
    (``scipy.integrate.quad``, relative error about 1e-13): 164.6957 for d = 32.

    Parameters
    ----------
    dim : int
        Even dimension; 32 is the benchmark (:math:`2^{16}` modes).
    a, b, c : float
        Coefficients of the double-well energy; ``c > 0``.

    Notes
    -----
    The modes are labelled by which well each :math:`u` is in; the boundary is the local minimum
    of the 1-d density (-0.0417 for the benchmark). :attr:`well_probability` is the exact mass of
    the right well, so a mode with ``k`` coordinates in the right well has weight
    ``q^k (1 - q)^(d/2 - k)``.
    """

    def __init__(self, dim: int = 32, a: float = -0.5, b: float = -6.0, c: float = 1.0):
        dim = check_positive_int(dim, "dim")
        if dim % 2:
            raise ValueError(f"dim must be even (pairs of coordinates), got {dim}")
        if not c > 0:
            raise ValueError(f"c must be positive for a normalisable density, got {c}")
        self._dim = dim
        self.a, self.b, self.c = float(a), float(b), float(c)
        roots = np.roots([4 * self.c, 0.0, 2 * self.b, self.a])
        crit = np.sort(roots[np.abs(roots.imag) < 1e-9].real)
        if crit.size != 3:
            raise ValueError(f"a={a}, b={b}, c={c} give a single well, not a double well")
        #: Critical points of the 1-d log-density: left mode, boundary (local minimum), right mode.
        self.critical_points = crit
        self.boundary = float(crit[1])
        shift = max(self._log_f_np(crit[0]), self._log_f_np(crit[2]))
        self._log_f_max = shift
        f = lambda u: math.exp(self._log_f_np(u) - shift)  # noqa: E731
        quad = dict(epsabs=0.0, epsrel=1e-13, limit=200)
        left = integrate.quad(f, -np.inf, self.boundary, **quad)[0]
        right = integrate.quad(f, self.boundary, np.inf, **quad)[0]
        m1 = integrate.quad(lambda u: u * f(u), -np.inf, np.inf, **quad)[0] / (left + right)
        m2 = integrate.quad(lambda u: u * u * f(u), -np.inf, np.inf, **quad)[0] / (left + right)
        #: log of the 1-d integral of exp(-(a u + b u^2 + c u^4)).
        self.log_normalizer_1d = math.log(left + right) + shift
        self.well_probability = right / (left + right)
        self._u_mean, self._u_var = m1, m2 - m1**2
        self._envelope = self._build_envelope()

    def _log_f_np(self, u):
        return -(self.a * u + self.b * u**2 + self.c * u**4)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def num_pairs(self) -> int:
        return self._dim // 2

    @property
    def num_modes(self) -> int:
        return 2**self.num_pairs

    @property
    def log_normalizer(self) -> float:
        r""":math:`\log Z` of :meth:`unnormalized_log_prob` (exact up to quadrature error)."""
        return self.num_pairs * (self.log_normalizer_1d + 0.5 * math.log(2 * math.pi))

    def unnormalized_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """The published unnormalised log-density at ``x: (n, dim)``, shape ``(n,)``."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (n, {self.dim}), got {tuple(x.shape)}")
        u, v = x[:, 0::2], x[:, 1::2]
        energy = self.a * u + self.b * u**2 + self.c * u**4
        return -(energy + 0.5 * v**2).sum(-1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised log-density, ``(n,)``."""
        return self.unnormalized_log_prob(x) - self.log_normalizer

    # ------------------------------------------------------------------ exact draws
    def _build_envelope(self):
        r"""Cells of an interval carrying all but :math:`e^{-100}` of the 1-d mass, with the exact
        maximum of the 1-d density on each cell (at an end point or a critical point inside)."""
        lo, hi = self.critical_points[0], self.critical_points[2]
        floor = self._log_f_max - _TRUNCATION_NATS
        while self._log_f_np(lo) > floor:
            lo -= 0.25
        while self._log_f_np(hi) > floor:
            hi += 0.25
        edges = np.linspace(lo, hi, _ENVELOPE_CELLS + 1)
        bound = np.maximum(self._log_f_np(edges[:-1]), self._log_f_np(edges[1:]))
        for point in self.critical_points:
            k = min(max(int(np.searchsorted(edges, point)) - 1, 0), _ENVELOPE_CELLS - 1)
            bound[k] = max(bound[k], self._log_f_np(point))
        return torch.as_tensor(edges), torch.as_tensor(bound)

    def sample_well_coordinate(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        r"""``n`` exact draws (float64, on the generator's device) from the 1-d density
        :math:`\propto e^{-(a u + b u^2 + c u^4)}`: rejection from the piecewise-constant envelope
        (cell chosen by its mass, uniform inside, accepted with probability
        :math:`f(u) / \max_{\text{cell}} f`)."""
        device = generator.device if generator is not None else torch.device("cpu")
        edges, bound = (t.to(device) for t in self._envelope)
        width = edges[1:] - edges[:-1]
        cell_prob = torch.softmax(bound + torch.log(width), 0)
        out, have = [], 0
        while have < n:
            m = int(1.05 * (n - have)) + 16
            cell = torch.multinomial(cell_prob, m, replacement=True, generator=generator)
            u = edges[cell] + width[cell] * torch.rand(
                m, generator=generator, dtype=torch.float64, device=device
            )
            log_accept = -(self.a * u + self.b * u**2 + self.c * u**4) - bound[cell]
            keep = (
                torch.log(torch.rand(m, generator=generator, dtype=torch.float64, device=device)) < log_accept
            )
            out.append(u[keep])
            have += int(keep.sum())
        return torch.cat(out)[:n]

    def sample(
        self, n: int, generator: torch.Generator | None = None, dtype=torch.float64, device=None
    ) -> torch.Tensor:
        """Exact draws ``(n, dim)``: the double-well coordinates by :meth:`sample_well_coordinate`,
        the others standard normal."""
        n = check_positive_int(n, "n")
        gen_device = generator.device if generator is not None else torch.device("cpu")
        x = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=gen_device)
        x[:, 0::2] = self.sample_well_coordinate(n * self.num_pairs, generator).reshape(n, self.num_pairs)
        return x.to(device=device or gen_device, dtype=dtype)

    # ------------------------------------------------------------------ modes and moments
    def wells(self, x: torch.Tensor) -> torch.Tensor:
        """Which well each pair is in, ``(n, dim / 2)`` bool (True: right well)."""
        return x[:, 0::2] > self.boundary

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Mode label of each point, ``(n,)`` long: bit ``j`` set when pair ``j`` is in the right
        well (needs ``dim / 2 <= 62``)."""
        if self.num_pairs > 62:
            raise ValueError("mode labels need dim / 2 <= 62; use wells(x) instead")
        powers = 2 ** torch.arange(self.num_pairs, device=x.device, dtype=torch.long)
        return (self.wells(x).long() * powers).sum(-1)

    def log_mode_weight(self, labels: torch.Tensor) -> torch.Tensor:
        """Exact log-probability of the modes with the given labels ``(m,)`` (see :meth:`assign`)."""
        bits = (labels[:, None] >> torch.arange(self.num_pairs, device=labels.device)) & 1
        k = bits.sum(-1).double()
        q = self.well_probability
        return k * math.log(q) + (self.num_pairs - k) * math.log1p(-q)

    @property
    def mean(self) -> torch.Tensor:
        """Exact mean ``(dim,)`` (double-well coordinates by quadrature, the others 0)."""
        m = torch.zeros(self.dim, dtype=torch.float64)
        m[0::2] = self._u_mean
        return m

    @property
    def variance(self) -> torch.Tensor:
        """Exact marginal variances ``(dim,)`` (by quadrature; 1 for the Gaussian coordinates)."""
        v = torch.ones(self.dim, dtype=torch.float64)
        v[0::2] = self._u_var
        return v

    def as_target(self, name: str = "x", reference=None, dtype=None) -> Target:
        """A :class:`~diffstat.Target` for the published unnormalised density (log Z =
        :attr:`log_normalizer`), with no attached answers (pass exact information explicitly)."""
        return Target(self.unnormalized_log_prob, self.dim, name=name, reference=reference, dtype=dtype)

    def __repr__(self) -> str:
        return (
            f"ManyWell(dim={self.dim}, a={self.a}, b={self.b}, c={self.c}, "
            f"log_normalizer={self.log_normalizer:.4f})"
        )
