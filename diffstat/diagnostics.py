r"""Convergence diagnostics of MCMC output, computed the way Stan reports them, with messages that
say what is wrong and what to do.

From draws ``(chain, draw, dim)`` and per-draw sample statistics (``lp``, ``acceptance_rate``,
``diverging`` and, where the kernel records it, ``energy``) :func:`mcmc_diagnostics` computes

- **rank-normalised split R-hat** (Vehtari, Gelman, Simpson, Carpenter, Buerkner 2021), the
  largest over coordinates: each chain is split in two halves (the middle draw of an odd chain
  dropped), the draws of all halves are pooled and replaced by their normal scores
  :math:`z = \Phi^{-1}((r - 3/8) / (S + 1/4))` (:math:`r` the rank among all :math:`S` draws, ties
  given their average rank), and :math:`\hat R = \sqrt{\widehat{\mathrm{var}}^+ / W}` with
  :math:`\widehat{\mathrm{var}}^+ = \frac{N-1}{N} W + \frac1N B` (within-chain variance
  :math:`W`, between-chain variance :math:`B`, :math:`N` draws per half); the larger of the bulk
  value and that of the folded draws :math:`|x - \mathrm{median}|` is reported. With one chain
  there is no between-chain comparison: the chain is cut into two halves that are split again, so
  R-hat compares its four quarters and only detects drift within the chain, never a second mode
  it did not visit.
- **bulk and tail ESS**, the smallest over coordinates: bulk on the normal scores of the split
  chains, tail the smaller ESS of the indicators :math:`x \le q_{0.05}` and :math:`x \le q_{0.95}`
  (type-7 quantiles of all draws). Each is :math:`MN/\hat\tau` from the autocorrelations
  :math:`\hat\rho_t = 1 - (W - \bar\gamma_t)/\widehat{\mathrm{var}}^+` (:math:`\bar\gamma_t` the
  chains' mean autocovariance at lag :math:`t`), with :math:`\hat\tau = -1 + 2\sum_{k<s} P_k +
  \hat\rho_{2s}` over Geyer's initial positive sequence of pair sums :math:`P_k = \hat\rho_{2k} +
  \hat\rho_{2k+1}` (stopping at the first :math:`P_s \le 0`) made monotone (each :math:`P_k`
  replaced by :math:`\min_{j\le k} P_j`), and :math:`\hat\tau \ge 1/\log_{10}(MN)`.

  :func:`rank_diagnostics` computes these for every coordinate at once and reproduces
  :func:`arviz.rhat` (``method="rank"``) and :func:`arviz.ess` (``"bulk"``, ``"tail"``) to
  rounding, 2.7 to 6 times faster (``docs/mala_overhead.md``): arviz loops over coordinates and
  ranks the same draws three times each, where here one sort per coordinate, of its runs of
  repeated draws (a rejected MCMC step repeats the draw), gives the normal scores of R-hat and bulk
  ESS, the folded draws' order (merged from it in linear time) and the tail quantiles, and one
  batched FFT per statistic gives every chain's autocovariances.
- the **number and fraction of divergent transitions** (the kernel's ``diverging`` flag).
- **stuck chains**: a chain whose mean acceptance probability is below
  :data:`STUCK_ACCEPTANCE`, or (without ``acceptance_rate``) whose draws changed in fewer than
  that fraction of its transitions.
- **E-BFMI** per chain (Betancourt 2016), from the Hamiltonian energy :math:`E_n` at each draw:
  :math:`\sum_{n \ge 1} (E_n - E_{n-1})^2 / \sum_n (E_n - \bar E)^2` (about 2 for independent
  energies, :math:`2(1-\rho)` for an AR(1) energy series with coefficient :math:`\rho`).
- **chains far below the others in log-density**: a chain whose mean ``lp`` lies more than
  :data:`LP_GAP_SD` within-chain standard deviations of ``lp`` below the median of the chains'
  mean ``lp`` (a chain stuck in a far tail or in a minor mode).

Thresholds (each a module constant): R-hat above 1.01 and bulk or tail ESS below 100 per chain,
counted for at most four chains (so 400 from four chains up), are Vehtari et al.'s (2021)
recommendations; any divergence is Stan's rule (a divergent
transition means the integrator missed a region of high curvature, so the draws may be biased);
E-BFMI below 0.3 is Betancourt's (2016) and Stan's rule.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

__all__ = [
    "Diagnostics",
    "mcmc_diagnostics",
    "diagnose",
    "warn_if_unreliable",
    "e_bfmi",
    "RHAT_MAX",
    "ESS_PER_CHAIN",
    "ESS_CHAINS",
    "ess_needed",
    "rank_diagnostics",
    "E_BFMI_MIN",
    "STUCK_ACCEPTANCE",
    "LP_GAP_SD",
]

#: R-hat above this flags chains that disagree (Vehtari et al. 2021, section 4: 1.01, far stricter
#: than the old 1.1, because a 1.1 was shown to pass visibly unconverged chains).
RHAT_MAX = 1.01
#: Bulk and tail ESS must exceed this many per chain, for at most ESS_CHAINS chains (Vehtari et al.
#: 2021: 100 per chain, i.e. 400 for four chains, so that R-hat and the MCSE themselves are
#: estimated reliably).
ESS_PER_CHAIN = 100
#: ESS needed stops growing beyond this many chains: Vehtari et al.'s 400 in total is what makes
#: the MCSE reliable, however many chains produced it; 100 x 1,000 chains would ask 1,000 chains of
#: 300 well-mixed draws for 100,000 effective draws and always warn.
ESS_CHAINS = 4
#: E-BFMI below this means momentum resampling barely moves the energy (Betancourt 2016; Stan's
#: threshold): the sampler cannot cross the energy levels of a heavy-tailed or funnel geometry.
E_BFMI_MIN = 0.3
#: A chain whose mean acceptance is below this moves less than once in 20 transitions: kernels tuned
#: to 0.23-0.8 never average this low unless the step size is far too large for the chain's region.
STUCK_ACCEPTANCE = 0.05
#: A chain whose mean lp is this many within-chain sds of lp below the median chain spends its time
#: where the others almost never go (for a Gaussian target lp has sd sqrt(d/2) and 3 sds is a tail
#: of under 1%), while Monte Carlo noise moves a chain's mean lp by far less than one sd.
LP_GAP_SD = 3.0
#: Fewer draws per chain than this and R-hat / ESS are not computed (arviz's minimum is 4 per chain,
#: and 8 leaves one chain 2 draws in each of the quarters its R-hat compares).
MIN_DRAWS = 8


def ess_needed(num_chains: int) -> int:
    """The bulk and tail ESS below which a run is flagged: ``ESS_PER_CHAIN * min(num_chains, ESS_CHAINS)``."""
    return ESS_PER_CHAIN * min(num_chains, ESS_CHAINS)


@dataclass(frozen=True)
class Diagnostics:
    """Diagnostics of one MCMC run; ``messages`` lists each problem found and what to do about it.

    Figures that could not be computed are NaN (too few draws; no ``energy`` for E-BFMI).
    """

    num_chains: int
    num_draws: int
    rhat_max: float
    ess_bulk_min: float
    ess_tail_min: float
    num_divergent: int
    divergent_fraction: float
    stuck_chains: tuple[int, ...]
    low_lp_chains: tuple[int, ...]
    e_bfmi: tuple[float, ...]
    messages: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.messages

    @property
    def e_bfmi_min(self) -> float:
        """The smallest per-chain E-BFMI (NaN without energies)."""
        return min(self.e_bfmi) if self.e_bfmi else math.nan

    def attrs(self) -> dict[str, float | int]:
        """The figures as flat ``posterior.attrs`` (numbers only, for netCDF)."""
        skip = ("messages", "e_bfmi", "num_chains", "num_draws")
        out = {k: v for k, v in asdict(self).items() if k not in skip}
        out["stuck_chains"] = len(self.stuck_chains)
        out["low_lp_chains"] = len(self.low_lp_chains)
        if self.e_bfmi:
            out["e_bfmi_min"] = self.e_bfmi_min
        return out


def e_bfmi(energy) -> np.ndarray:
    r"""E-BFMI of each chain from energies ``(chain, draw)`` (Betancourt 2016, eq. 3.1 estimate):
    :math:`\sum_{n=1}^{N-1} (E_n - E_{n-1})^2 / \sum_{n=0}^{N-1} (E_n - \bar E)^2`, shape ``(chain,)``.
    """
    energy = np.asarray(energy, dtype=float)
    if energy.ndim != 2 or energy.shape[1] < 2:
        raise ValueError(f"energy must be (chain, draw) with at least 2 draws, got shape {energy.shape}")
    num = np.square(np.diff(energy, axis=1)).sum(axis=1)
    den = np.square(energy - energy.mean(axis=1, keepdims=True)).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return num / den


def _split_chains(x: np.ndarray) -> np.ndarray:
    """``(k, chains, n)`` -> ``(k, 2 chains, n // 2)``: the first and last halves of each chain as
    chains, the middle draw of an odd ``n`` dropped (arviz's ``_split_chains``; the chains come in
    another order, which no statistic here depends on, so an even ``n`` needs no copy)."""
    k, chains, n = x.shape
    if n % 2 == 0:
        return x.reshape(k, 2 * chains, n // 2)
    return np.concatenate([x[:, :, : n // 2], x[:, :, n // 2 + 1 :]], axis=1)


class _Pooled(NamedTuple):
    """One coordinate's draws pooled over chains and sorted, each run of repeats in a chain (an MCMC
    draw repeats at every rejection) one item: ``values`` ascending, ``weight`` the run lengths,
    ``cum`` their cumulative sums (the sorted position after each item) and ``runs`` each item's
    run index in draw order, all ``(m,)``. The ranks are those of the ``S`` draws, but only ``m``
    items are sorted: at MALA's acceptance of 0.57, 57% of the draws."""

    values: np.ndarray
    weight: np.ndarray
    cum: np.ndarray
    runs: np.ndarray

    def at(self, position: int) -> float:
        """The value at 0-based ``position`` of all ``S`` draws sorted."""
        return self.values[np.searchsorted(self.cum, position, side="right")]


def _pool(x: np.ndarray) -> tuple[list[_Pooled], list[np.ndarray | None]]:
    """Each row of ``x: (k, chains, n)`` as a :class:`_Pooled`, and each draw's run index ``(S,)``
    per row (None where no draw repeats its predecessor: every run is one draw)."""
    k, size = x.shape[0], x.shape[1] * x.shape[2]
    new = np.ones(x.shape, dtype=bool)
    new[:, :, 1:] = x[:, :, 1:] != x[:, :, :-1]
    new, flat = new.reshape(k, -1), x.reshape(k, -1)
    rows, draw_runs = [], []
    for row in range(k):
        if new[row].all():
            order = np.argsort(flat[row])
            ones = np.ones(size, dtype=np.int64)
            rows.append(_Pooled(flat[row, order], ones, np.arange(1, size + 1), order))
            draw_runs.append(None)
            continue
        start = np.flatnonzero(new[row])
        order = np.argsort(flat[row, start])
        weight = np.diff(start, append=size)[order]
        rows.append(_Pooled(flat[row, start[order]], weight, np.cumsum(weight), order))
        draw_runs.append(np.cumsum(new[row]) - 1)
    return rows, draw_runs


def _normal_scores(rows: list[_Pooled], runs: list, shape: tuple[int, ...]) -> np.ndarray:
    r"""Normal scores of every draw, ``z`` of ``shape`` ``(k, chains, n)``, from the sorted runs
    and each draw's run index (:func:`_pool`).

    A value's average rank among all :math:`S` draws is :math:`r = (\#\{< v\} + \#\{\le v\} + 1)/2`,
    so :math:`2r - 2` is an integer below :math:`2S - 1` and :math:`\Phi^{-1}` is evaluated once per
    possible rank on a table shared by all rows, then spread back to the draws through their runs."""
    size = shape[1] * shape[2]
    table = _score_table(size)
    z = np.empty((len(rows), size))
    for row, p in enumerate(rows):
        change = p.values[1:] != p.values[:-1]
        if runs[row] is None and change.all():  # all draws distinct: rank i + 1 at position i
            z[row, p.runs] = table[::2]
            continue
        less = p.cum - p.weight
        if change.all():
            twice = less + p.cum - 1
        else:  # equal values in several runs share the counts of their first and last item
            first = np.flatnonzero(np.concatenate([[True], change]))
            length = np.diff(first, append=len(p.values))
            twice = np.repeat(less[first] + p.cum[first + length - 1] - 1, length)
        if runs[row] is None:  # one draw per run
            z[row, p.runs] = table[twice]
        else:
            by_run = np.empty(len(p.values))
            by_run[p.runs] = table[twice]
            z[row] = by_run[runs[row]]
    return z.reshape(shape)


@functools.lru_cache(maxsize=4)
def _score_table(size: int) -> np.ndarray:
    r""":math:`\Phi^{-1}((r - 3/8) / (S + 1/4))` for every average rank :math:`r = 1, 1.5, \ldots, S`
    of ``S = size`` values (Blom's offset 3/8, as arviz; written as arviz writes it, to the bit)."""
    from scipy.special import ndtri

    rank = (np.arange(2 * size - 1) + 2) / 2
    table = ndtri((rank - 3 / 8) / (size - 2 * (3 / 8) + 1))
    table.flags.writeable = False
    return table


def _folded(p: _Pooled) -> _Pooled:
    r"""The sorted runs of :math:`|x - \mathrm{median}|` from those of ``x``, without sorting again:
    the runs below the median, reversed, and the others are two ascending sequences, which a stable
    sort (timsort) merges in linear time."""
    size = int(p.cum[-1])
    mid = size // 2
    median = p.at(mid) if size % 2 else (p.at(mid - 1) + p.at(mid)) / 2
    below = int(np.searchsorted(p.values, median, side="left"))
    index = np.arange(len(p.values))
    two_runs = np.concatenate([index[:below][::-1], index[below:]])
    folded = np.abs(p.values[two_runs] - median)
    merged = np.argsort(folded, kind="stable")
    source = two_runs[merged]
    if len(p.values) == size:  # one draw per run: the weights stay ones
        return _Pooled(folded[merged], p.weight, p.cum, p.runs[source])
    weight = p.weight[source]
    return _Pooled(folded[merged], weight, np.cumsum(weight), p.runs[source])


def _split_rhat(z: np.ndarray) -> np.ndarray:
    r"""Split R-hat of each row of ``z: (k, chains, n)`` (already split):
    :math:`\sqrt{(B/W + n - 1)/n}`, :math:`B = n\,\mathrm{var}(\bar z_c)`, :math:`W` the mean
    within-chain variance."""
    n = z.shape[2]
    between = n * z.mean(axis=2).var(axis=1, ddof=1)
    within = z.var(axis=2, ddof=1).mean(axis=1)
    return np.sqrt((between / within + n - 1) / n)


def _rank_rhat(shape: tuple[int, ...], rows: list[_Pooled], runs: list) -> tuple[np.ndarray, np.ndarray]:
    """Rank-normalised split R-hat of split draws of ``shape`` ``(k, chains, n)`` from their sorted
    runs (the larger of the bulk and the folded value, NaN ranked first as Python's ``max`` does)
    and the bulk normal scores."""
    z = _normal_scores(rows, runs, shape)
    bulk = _split_rhat(z)
    folded = _split_rhat(_normal_scores([_folded(p) for p in rows], runs, shape))
    return np.where(folded > bulk, folded, bulk), z


def _ess(y: np.ndarray) -> np.ndarray:
    r"""ESS of each row of ``y: (k, chains, n)`` (split chains), Vehtari et al. (2021) eq. 10-11:
    the autocovariances of every chain by one zero-padded FFT, averaged over chains, give
    :math:`\hat\rho_t = 1 - (W - \bar\gamma_t) / \widehat{\mathrm{var}}^+`; Geyer's initial positive
    sequence stops at the first pair sum :math:`P_k = \hat\rho_{2k} + \hat\rho_{2k+1} \le 0`, the
    initial monotone sequence replaces the pair sums before it by their running minimum, and
    :math:`\hat\tau = -1 + 2 \sum_{k<s} \min_{j \le k} P_j + \hat\rho_{2s}` (the last even
    autocorrelation, where positive), at least :math:`1/\log_{10}(\text{chains}\, n)`. Every
    branch of arviz's loop is reproduced, so the figures agree to rounding."""
    from scipy import fft

    k, chains, n = y.shape
    size = chains * n
    flat = y.reshape(k, -1)
    constant = flat.max(axis=1) - flat.min(axis=1) < np.finfo(float).resolution
    means = y.mean(axis=2, keepdims=True)
    padded = np.zeros((k, chains, fft.next_fast_len(2 * n, real=True)))  # zero-padded: no circular wrap
    np.subtract(y, means, out=padded[:, :, :n])
    spectrum = fft.rfft(padded, axis=2)
    power = (spectrum.real**2 + spectrum.imag**2).mean(axis=1)  # averaged over chains: irfft is linear
    acov = fft.irfft(power, n=padded.shape[2], axis=1)[:, :n] / n
    mean_var = acov[:, :1] * n / (n - 1.0)
    var_plus = mean_var * (n - 1.0) / n + means[..., 0].var(axis=1, ddof=1)[:, None]
    rho = 1.0 - (mean_var - acov) / var_plus
    rho[:, 0] = 1.0
    pairs = max((n - 3) // 2, 0)  # arviz's loop reads lags up to 2 pairs + 1 < n - 1
    total = rho[:, 0 : 2 * pairs + 2 : 2] + rho[:, 1 : 2 * pairs + 2 : 2]  # P_0 .. P_pairs
    stop = total <= 0
    s = np.where(stop.any(axis=1), stop.argmax(axis=1), pairs)[:, None]
    monotone = np.cumsum(np.minimum.accumulate(total, axis=1), axis=1)
    before = np.where(s > 0, np.take_along_axis(monotone, np.maximum(s - 1, 0), axis=1), 0.0)
    even = np.take_along_axis(rho, 2 * s, axis=1)
    last = np.where((np.take_along_axis(total, s, axis=1) >= 0) | (even > 0), even, 0.0)
    tau = (-1.0 + 2.0 * before + last)[:, 0]
    floor = 1 / np.log10(size)
    tau = np.where(floor > tau, floor, tau)
    ess = np.where(constant, float(size), size / tau)
    return np.where(np.isnan(rho[:, 1]) & ~constant, np.nan, ess)


def _tail_ess(x: np.ndarray, at) -> np.ndarray:
    """Tail ESS of each row of ``x: (k, chains, n)``, ``at(j)`` giving every row's ``j``-th smallest
    draw ``(k,)``: the smaller ESS of the indicators of the 5% and 95% quantiles (type 7, computed as
    arviz's ``mquantiles`` does, so that a tie at the quantile is classified the same way)."""
    size = x.shape[1] * x.shape[2]
    out = []
    for p in (0.05, 0.95):
        aleph = size * p + (1.0 - p)  # mquantiles with alphap = betap = 1
        j = int(np.floor(np.clip(aleph, 1, size - 1)))
        gamma = float(np.clip(aleph - j, 0, 1))
        q = (1.0 - gamma) * at(j - 1) + gamma * at(j)
        out.append(_ess(_split_chains((x <= q[:, None, None]).astype(float))))
    low, high = out
    return np.where(high < low, high, low)


def rank_diagnostics(draws) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank-normalised split R-hat, bulk ESS and tail ESS of every coordinate, all at once.

    Vehtari, Gelman, Simpson, Carpenter and Buerkner (2021), as ``arviz.rhat(method="rank")`` and
    ``arviz.ess(method="bulk" | "tail")`` compute them coordinate by coordinate (the figures agree to
    rounding), but batched: one sort per coordinate (of its runs of repeated draws) serves the normal
    scores of R-hat and bulk ESS, the folded draws' sort is merged from it, the tail quantiles are
    read off it, and one FFT per statistic covers every chain and coordinate. With one chain, R-hat
    compares its quarters (the chain is halved, and each half split again) and ESS its halves.

    Parameters
    ----------
    draws : array, (chain, draw, dim)
        At least 4 draws per chain (8 with one chain), as arviz requires.

    Returns
    -------
    rhat, ess_bulk, ess_tail : arrays, (dim,)
        NaN for a coordinate with a NaN draw.
    """
    draws = np.asarray(draws, dtype=float)
    chains, n, _ = draws.shape
    x = np.ascontiguousarray(np.moveaxis(draws, 2, 0))  # (dim, chain, draw)
    invalid = np.isnan(x).any(axis=(1, 2))
    x[invalid] = 0.0
    split = _split_chains(x)
    rows, runs = _pool(split)
    if chains > 1:
        rhat, z = _rank_rhat(split.shape, rows, runs)
    else:  # halves as two chains, split again into quarters; bulk ESS still on the halves
        halves = _split_chains(x[:, :, : 2 * (n // 2)].reshape(x.shape[0], 2, n // 2))
        rhat = _rank_rhat(halves.shape, *_pool(halves))[0]
        z = _normal_scores(rows, runs, split.shape)
    bulk = _ess(z)
    if n % 2 == 0:  # the split chains hold every draw
        tail = _tail_ess(x, lambda j: np.array([p.at(j) for p in rows]))
    else:
        ordered = np.sort(x.reshape(x.shape[0], -1), axis=1)
        tail = _tail_ess(x, lambda j: ordered[:, j])
    return tuple(np.where(invalid, np.nan, v) for v in (rhat, bulk, tail))


def _rhat_ess(draws: np.ndarray) -> tuple[float, int, float, int, float, int]:
    """Max rank R-hat and min bulk / tail ESS over coordinates, each with its coordinate."""
    with np.errstate(divide="ignore", invalid="ignore"):
        rhat, bulk, tail = rank_diagnostics(draws)

    def pick(values, worst):
        if np.all(np.isnan(values)):
            return math.nan, 0
        j = int(worst(values))
        return float(values[j]), j

    return (*pick(rhat, np.nanargmax), *pick(bulk, np.nanargmin), *pick(tail, np.nanargmin))


def _lp_gap(lp: np.ndarray) -> tuple[tuple[int, ...], float]:
    """Chains whose mean lp is more than LP_GAP_SD within-chain sds below the median chain's."""
    if lp.shape[0] < 2:
        return (), 0.0
    means = lp.mean(axis=1)
    sd = float(np.median(lp.std(axis=1)))
    gap = np.median(means) - means
    low = tuple(int(c) for c in np.flatnonzero(gap > LP_GAP_SD * sd))
    return low, float(gap.max() / sd) if sd > 0 else math.inf


def _stuck(draws: np.ndarray, acceptance) -> tuple[tuple[int, ...], np.ndarray]:
    """Chains that (almost) never move, and each chain's mean acceptance (or moving fraction)."""
    if acceptance is not None:
        rate = np.asarray(acceptance, dtype=float).reshape(draws.shape[0], -1).mean(axis=1)
    elif draws.shape[1] > 1:
        rate = np.any(np.diff(draws, axis=1) != 0, axis=2).mean(axis=1)
    else:
        return (), np.ones(draws.shape[0])
    return tuple(int(c) for c in np.flatnonzero(rate < STUCK_ACCEPTANCE)), rate


def _chains(idx) -> str:
    return ", ".join(str(i) for i in idx)


def mcmc_diagnostics(draws, sample_stats: dict | None = None) -> Diagnostics:
    """Diagnose MCMC output: R-hat, bulk/tail ESS, divergences, stuck chains, E-BFMI, low-lp chains.

    Parameters
    ----------
    draws : array or tensor, (chain, draw, dim)
        The draws, in any coordinates: the bulk figures are rank-based, so a per-coordinate monotone
        transform (constrained against unconstrained) leaves them unchanged (the folded R-hat and
        the tail ESS change a little).
    sample_stats : dict, optional
        Per-draw statistics ``(chain, draw)``: ``lp``, ``acceptance_rate``, ``diverging``,
        ``energy``; each is used where present.

    Returns
    -------
    Diagnostics
        The figures and one message per problem (see the module docstring for every rule).
    """
    from diffstat.io import to_numpy

    draws = to_numpy(draws).astype(float, copy=False)
    if draws.ndim != 3 or draws.shape[0] < 1 or draws.shape[1] < 1:
        raise ValueError(f"draws must be (chain, draw, dim) with at least one draw, got shape {draws.shape}")
    stats = {k: to_numpy(v) for k, v in (sample_stats or {}).items()}
    chains, n, _ = draws.shape
    for key, value in stats.items():
        if key in ("lp", "acceptance_rate", "diverging", "energy") and value.shape[:2] != (chains, n):
            raise ValueError(f"sample_stats[{key!r}] has shape {value.shape}, expected ({chains}, {n})")
    rhat_ess = _rhat_ess(draws) if n >= MIN_DRAWS else (math.nan, 0) * 3
    stuck, rate = _stuck(draws, stats.get("acceptance_rate"))
    low_lp, lp_gap = _lp_gap(stats["lp"].astype(float)) if "lp" in stats else ((), 0.0)
    diverging = stats.get("diverging")
    num_div = int(np.count_nonzero(diverging)) if diverging is not None else 0
    frac = num_div / diverging.size if num_div else 0.0
    bfmi = tuple(float(b) for b in e_bfmi(stats["energy"])) if "energy" in stats and n >= 2 else ()
    rhat, bulk, tail = rhat_ess[0], rhat_ess[2], rhat_ess[4]
    partial = Diagnostics(chains, n, rhat, bulk, tail, num_div, frac, stuck, low_lp, bfmi, ())
    messages = _messages(partial, rate, lp_gap, rhat_ess[1::2])
    return Diagnostics(chains, n, rhat, bulk, tail, num_div, frac, stuck, low_lp, bfmi, tuple(messages))


def _messages(d: Diagnostics, rate: np.ndarray, lp_gap: float, coords) -> list[str]:
    """One message per problem in ``d``: what is wrong and what to do."""
    out = []
    if d.num_draws < MIN_DRAWS:
        out.append(
            f"only {d.num_draws} draws per chain: too few to compute R-hat and ESS; draw at least "
            f"{ESS_PER_CHAIN} per chain (num_samples)."
        )
    if d.stuck_chains:
        out.append(
            f"{len(d.stuck_chains)} of {d.num_chains} chains stuck (chain {_chains(d.stuck_chains)}: mean "
            f"acceptance {', '.join(f'{rate[c]:.3f}' for c in d.stuck_chains)}): they sit where the step "
            "size is far too large for the local scale (a far tail) and hardly move; start the chains "
            "near the mode (init=), lengthen the warm-up (num_warmup), or discard those chains."
        )
    if d.low_lp_chains:
        out.append(
            f"chain {_chains(d.low_lp_chains)} sits far below the others in log-density (mean lp up to "
            f"{lp_gap:.1f} within-chain sds below the median chain): it is stuck in a far tail or a minor "
            "mode; start near the mode, lengthen the warm-up, or for a multimodal target use "
            "method 'smc', 'pt' or 'diffusion'."
        )
    if d.num_draws >= MIN_DRAWS and math.isnan(d.rhat_max):
        out.append("R-hat could not be computed (every coordinate constant within chains): nothing moved.")
    if d.rhat_max > RHAT_MAX:
        out.append(
            f"R-hat {d.rhat_max:.3f} > {RHAT_MAX} (coordinate {coords[0]}): the chains disagree. Run a "
            "longer warm-up and more draws; if the chains sit in different modes (a multimodal target) "
            "MCMC cannot weigh the modes: use method 'smc', 'pt' or 'diffusion'."
            + (" (One chain: split R-hat only sees drift within it.)" if d.num_chains == 1 else "")
        )
    need = ess_needed(d.num_chains)
    if min(d.ess_bulk_min, d.ess_tail_min) < need:
        bulk = d.ess_bulk_min <= d.ess_tail_min
        which, ess, j = ("bulk", d.ess_bulk_min, coords[1]) if bulk else ("tail", d.ess_tail_min, coords[2])
        out.append(
            f"{which} ESS {ess:.0f} (coordinate {j}) is below {need} for {d.num_chains} chains "
            f"({ESS_PER_CHAIN} per chain, {ESS_PER_CHAIN * ESS_CHAINS} in all from {ESS_CHAINS} chains up): "
            "means and quantiles are unreliable; draw more samples (num_samples), or reparameterise a "
            "strongly correlated or badly scaled target (or use 'hmc')."
        )
    if d.num_divergent:
        out.append(
            f"{d.num_divergent} divergent transitions ({d.divergent_fraction:.1%} of all): the integrator "
            "blew up where the curvature is high, so that region is under-sampled and the draws may be "
            "biased; raise target_accept (e.g. 0.95, a smaller step size) or reparameterise (e.g. a "
            "non-centred hierarchical model)."
        )
    low_bfmi = [c for c, b in enumerate(d.e_bfmi) if b < E_BFMI_MIN]
    if low_bfmi:
        out.append(
            f"E-BFMI {d.e_bfmi_min:.2f} < {E_BFMI_MIN} (chain {_chains(low_bfmi)}): momentum resampling "
            "barely changes the energy, so heavy tails or a funnel are explored slowly; reparameterise "
            "or lengthen the warm-up to adapt the metric."
        )
    return out


def warn_if_unreliable(diag: Diagnostics, label: str = "MCMC", stacklevel: int = 3) -> None:
    """Emit one ``RuntimeWarning`` listing every problem in ``diag`` (nothing when it is clean)."""
    if diag.messages:
        problems = "\n".join(f"  - {m}" for m in diag.messages)
        message = f"{label}: the result is unreliable:\n{problems}"
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


def diagnose(idata, *, warn: bool = True) -> Diagnostics:
    """Diagnostics of any MCMC ``InferenceData``: every posterior variable, flattened per draw.

    ``sample_stats`` (``lp``, ``acceptance_rate``, ``diverging``, ``energy``) are used where present.
    With ``warn=True`` one ``RuntimeWarning`` lists every problem found.

    >>> diag = ds.diagnose(idata)  # doctest: +SKIP
    >>> diag.rhat_max, diag.ess_bulk_min, diag.messages  # doctest: +SKIP
    """
    if not hasattr(idata, "posterior"):
        raise ValueError(f"diagnose needs InferenceData with a posterior group, got {type(idata).__name__}")
    post = idata.posterior
    chains, n = post.sizes["chain"], post.sizes["draw"]
    parts = [post[v].transpose("chain", "draw", ...).values.reshape(chains, n, -1) for v in post.data_vars]
    if not parts:
        raise ValueError("the posterior group has no variables")
    stats = {}
    if hasattr(idata, "sample_stats"):
        for key in ("lp", "acceptance_rate", "diverging", "energy"):
            if key in idata.sample_stats:
                stats[key] = idata.sample_stats[key].transpose("chain", "draw", ...).values
    diag = mcmc_diagnostics(np.concatenate(parts, axis=-1), stats)
    if warn:
        label = f"method {post.attrs['method']!r}" if "method" in post.attrs else "MCMC"
        warn_if_unreliable(diag, label)
    return diag
