r"""Rank-normalised split R-hat and bulk / tail ESS of MCMC draws ``(chain, draw, dim)``, for every
coordinate at once (Vehtari, Gelman, Simpson, Carpenter and Buerkner 2021): the statistics that
:mod:`diffstat.diagnostics` reports, their mathematics stated there.

:func:`rank_diagnostics` reproduces :func:`arviz.rhat` (``method="rank"``) and :func:`arviz.ess`
(``"bulk"``, ``"tail"``) to rounding, 2.7 to 6 times faster (``docs/mala_overhead.md``): one sort
per coordinate (a chain's repeated draws sorted as one item) gives the bulk normal scores, the
folded order and the tail quantiles, and one batched FFT the autocovariances of every chain and
coordinate.

With many chains that sort costs more than the sampling on a cheap target (1.0 to 1.9 s for
1,000 x 300 x 10 draws): :func:`many_chain_diagnostics` then takes R-hat from all chains without
ranks (:func:`split_rhat` of the draws and the folded draws, two sums each) and the ESS from the
rank statistics of a fixed number of chains (:func:`rank_ess`), scaled to all of them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["rank_diagnostics", "rank_ess", "many_chain_diagnostics", "split_rhat", "rank_chain_subset"]


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


def _rank_rhat(shape: tuple[int, ...], rows: list[_Pooled], runs: list) -> tuple[np.ndarray, np.ndarray]:
    """Rank-normalised split R-hat of split draws of ``shape`` ``(k, chains, n)`` from their sorted
    runs (the larger of the bulk and the folded value, NaN ranked first as Python's ``max`` does)
    and the bulk normal scores."""
    z = _normal_scores(rows, runs, shape)
    folded = _normal_scores([_folded(p) for p in rows], runs, shape)
    by_chain = (z.transpose(1, 2, 0), folded.transpose(1, 2, 0))  # (chains, n, k) views
    bulk, folded = (_rhat_of_chains([y], y[:, :1]) for y in by_chain)
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
    return _rank_statistics(draws, with_rhat=True)


def rank_ess(draws) -> tuple[np.ndarray, np.ndarray]:
    """Bulk and tail ESS of every coordinate of ``draws: (chain, draw, dim)``: those of
    :func:`rank_diagnostics`, without computing R-hat."""
    return _rank_statistics(draws, with_rhat=False)[1:]


def _rank_statistics(draws, with_rhat: bool) -> tuple:
    """:func:`rank_diagnostics`; R-hat is None unless ``with_rhat``."""
    draws = np.asarray(draws, dtype=float)
    chains, n, _ = draws.shape
    x = np.ascontiguousarray(np.moveaxis(draws, 2, 0))  # (dim, chain, draw)
    invalid = np.isnan(x).any(axis=(1, 2))
    x[invalid] = 0.0
    split = _split_chains(x)
    rows, runs = _pool(split)
    rhat = None
    if chains > 1 and with_rhat:
        rhat, z = _rank_rhat(split.shape, rows, runs)
    else:
        if with_rhat:  # halves as two chains, split again into quarters; bulk ESS still on the halves
            halves = _split_chains(x[:, :, : 2 * (n // 2)].reshape(x.shape[0], 2, n // 2))
            rhat = _rank_rhat(halves.shape, *_pool(halves))[0]
        z = _normal_scores(rows, runs, split.shape)
    bulk = _ess(z)
    if n % 2 == 0:  # the split chains hold every draw
        tail = _tail_ess(x, lambda j: np.array([p.at(j) for p in rows]))
    else:
        ordered = np.sort(x.reshape(x.shape[0], -1), axis=1)
        tail = _tail_ess(x, lambda j: ordered[:, j])
    return tuple(None if v is None else np.where(invalid, np.nan, v) for v in (rhat, bulk, tail))


def split_rhat(draws, shift: bool = True, fold_at=None) -> np.ndarray:
    r"""Split R-hat of the draws themselves (Gelman et al. 2013, BDA3 section 11.4), every
    coordinate of ``draws: (chain, draw, dim)`` at once: each chain halved (the middle draw of an
    odd chain dropped) and the :math:`2C` halves passed to :func:`_rhat_of_chains` as they lie,
    without a copy of all draws. ``shift``: subtract each chain's first draw from both its halves
    before summing, so that a mean far from zero cancels no digits (draws centred already, such
    as folded ones, need no shift). ``fold_at`` ``(dim,)``: the R-hat of the folded draws
    :math:`|x - \text{fold\_at}|` instead (no shift), folded block by block. Returns ``(dim,)``,
    NaN for a constant or NaN coordinate."""
    draws = np.asarray(draws)
    n = draws.shape[1] // 2
    origin = draws[:, :1] if shift and fold_at is None else None
    return _rhat_of_chains([draws[:, :n], draws[:, draws.shape[1] - n :]], origin, fold_at)


#: R-hat's sums run over blocks of about this many numbers (2 MiB in float64), a block of chains or of
#: draws, whichever axis is the outer one in memory: a block's float64 copy stays in the cache, where
#: numpy's float64 sums over all chains at once went to memory and back for each of their passes
#: (1.3 to 2 times faster on 1,000 chains of 300 draws of 10 or 34 coordinates, ``docs/mala_overhead.md``).
RHAT_BLOCK_ELEMENTS = 2**18


def _as_tensor(x: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``x``'s memory (only read here), or of a copy where torch cannot share it
    (negative strides) or would warn (a read-only array)."""
    if not x.flags.writeable or any(stride < 0 for stride in x.strides):
        x = np.array(x)
    return torch.from_numpy(x)


def _chain_sums(y: torch.Tensor, origin: torch.Tensor | None, fold_at: torch.Tensor | None):
    """Sums over the draws of each chain of ``y: (C, n, dim)``, of ``y - origin`` (``(C, 1, dim)``,
    or ``y`` itself) or of ``|y - fold_at|``, and of their squares: ``(C, dim)`` each, float64, a
    block of chains or of draws at a time (:data:`RHAT_BLOCK_ELEMENTS`; a float32 ``y`` is copied
    to float64 a block at a time). Draws stored draw by draw (``ds.sample``'s ``(draw, chain, dim)``
    transposed) are cut into blocks of draws, so that every block is a few contiguous slabs."""
    chains, n, dim = y.shape
    by_draws = y.stride(1) > y.stride(0)
    axis, length = (1, n) if by_draws else (0, chains)
    step = max(1, RHAT_BLOCK_ELEMENTS // max(1, y.numel() // max(1, length)))
    total = torch.zeros(chains, dim, dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, length, step):
        size = min(step, length - start)
        block = y.narrow(axis, start, size)
        if fold_at is not None:
            block = (block - fold_at).abs_()
        elif origin is not None:
            block = block - (origin if by_draws else origin.narrow(0, start, size))
        block = block.to(torch.float64)
        if by_draws:
            total += block.sum(1)
            squares += (block * block).sum(1)
        else:
            total[start : start + size] = block.sum(1)
            squares[start : start + size] = (block * block).sum(1)
    return total, squares


def _rhat_of_chains(parts: list[np.ndarray], origin: np.ndarray | None, fold_at=None) -> np.ndarray:
    r"""R-hat over the chains of every array of ``parts``, each ``(C_i, n, dim)`` (chains already
    split): :math:`\hat R = \sqrt{(B/W + n - 1)/n}`, :math:`B` ``n`` times the variance of the
    chains' means, :math:`W` their mean within-chain variance (both with ``ddof=1``). Each chain's
    mean and variance come from two sums in float64, of its draws and of their squares, after
    subtracting ``origin`` ``(C, 1, dim)`` (a draw of each chain, so that a mean far from zero
    cancels no digits; None: nothing), or of the folded draws :math:`|x - \text{fold\_at}|`
    (:func:`_chain_sums`), and float32 draws are copied to float64 only a block of chains at a time:
    the one R-hat of the rank statistics (on normal scores, equal to arviz's to 1e-12) and of
    :func:`split_rhat` (on the draws of many chains)."""
    n = parts[0].shape[1]
    shift = None if origin is None else _as_tensor(np.asarray(origin))
    fold = None if fold_at is None else torch.from_numpy(np.array(fold_at, dtype=parts[0].dtype))
    means, variances = [], []
    for part in parts:
        total, squares = _chain_sums(_as_tensor(part), shift, fold)
        means.append(total / n if shift is None else total / n + shift[:, 0].to(torch.float64))
        variances.append((squares - total * total / n) / (n - 1))
    between = n * torch.cat(means).var(0)
    within = torch.cat(variances).mean(0)
    return torch.sqrt((between / within + n - 1) / n).numpy()


def rank_chain_subset(chains: int, size: int) -> np.ndarray:
    """``size`` chain indices evenly spread over ``0 .. chains - 1`` (all of them when ``chains <=
    size``): the chains are exchangeable, so any fixed choice is as good as a random one."""
    if chains <= size:
        return np.arange(chains)
    return np.unique(np.linspace(0, chains - 1, size).round().astype(np.int64))


def many_chain_diagnostics(draws, rank_chains: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""R-hat, bulk and tail ESS of every coordinate of ``draws: (chain, draw, dim)`` without the rank
    statistics' sort of every draw: R-hat from all chains, ESS from ``rank_chains`` of them.

    - **R-hat** is the larger of the split R-hat of all chains' draws and that of the folded draws
      :math:`|x - m|` (:func:`split_rhat`; :math:`m` the median of the chains below), Vehtari et
      al.'s (2021) bulk and folded R-hat on the draws instead of their normal scores. The rank
      transform only steadies the between- and within-chain variances of a heavy-tailed draw; with
      many chains they are already steady (measured on 1,000 x 300 iid Student-t draws with 1 to 3
      degrees of freedom: 1.0001 to 1.0004 against the rank R-hat's 1.0001 to 1.0003; on the
      benchmark's MALA draws within 1e-4 of it), while the rank R-hat of a subset of chains would
      add its own noise to the maximum over coordinates (16 chains: 1.011 to 1.016 where all 1,000
      give 1.009 to 1.010 on the 10-d Gaussian, ``docs/mala_overhead.md``). All chains also see a
      few chains away from the rest (a minor mode, a far tail): one chain of 1,000 sitting 10 sds
      out adds about :math:`n \cdot 10^2 / 1000` to :math:`B/W`, an R-hat of 1.05 at
      :math:`n = 150` (its normal scores would saturate near :math:`z = 3.3`: the rank R-hat of all
      chains is 1.006, measured on iid normal draws, under the 1.01 threshold).
    - **Bulk and tail ESS** are the rank statistics (:func:`rank_ess`) of ``rank_chains``
      chains spread evenly over the run (:func:`rank_chain_subset`), multiplied by
      ``chains / rank_chains``: ESS adds over independent chains, and R-hat checks that the chains
      are alike. Their noise is that of the subset (relative sd 0.11 at 16 chains of 100 AR(1)
      draws, ``tests/test_diagnostics.py``), so the minimum over coordinates is biased low (a
      conservative bias for the ESS threshold).

    Parameters
    ----------
    draws : array, (chain, draw, dim)
        Any float dtype; float32 draws are summed in float64 but not copied to it.
    rank_chains : int
        Chains the ESS is computed on.

    Returns
    -------
    rhat, ess_bulk, ess_tail : arrays, (dim,)
        NaN for a coordinate with a NaN draw.
    """
    draws = np.asarray(draws)
    chains, _, dim = draws.shape
    subset = rank_chain_subset(chains, rank_chains)
    ranked = draws[subset]
    bulk, tail = rank_ess(ranked)
    median = np.median(ranked.reshape(-1, dim), axis=0).astype(draws.dtype)
    rhat = np.maximum(split_rhat(draws), split_rhat(draws, fold_at=median))
    scale = chains / len(subset)
    bulk, tail = bulk * scale, tail * scale
    if np.isnan(draws).any():  # as rank_diagnostics: every figure of a coordinate with a NaN draw
        invalid = np.isnan(draws).any(axis=(0, 1))
        rhat, bulk, tail = (np.where(invalid, np.nan, v) for v in (rhat, bulk, tail))
    return rhat, bulk, tail
