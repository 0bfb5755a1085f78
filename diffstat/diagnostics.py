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

  :func:`~diffstat.rank_stats.rank_diagnostics` computes these for every coordinate at once and reproduces
  :func:`arviz.rhat` (``method="rank"``) and :func:`arviz.ess` (``"bulk"``, ``"tail"``) to
  rounding, 2.7 to 6 times faster (``docs/mala_overhead.md``): arviz loops over coordinates and
  ranks the same draws three times each, where here one sort per coordinate, of its runs of
  repeated draws (a rejected MCMC step repeats the draw), gives the normal scores of R-hat and bulk
  ESS, the folded draws' order (merged from it in linear time) and the tail quantiles, and one
  batched FFT per statistic gives every chain's autocovariances.
- **many chains** (more than :data:`RANK_CHAINS`): R-hat is the larger of the split R-hat of all
  chains' draws and that of the folded draws :math:`|x - \mathrm{median}|` (Gelman et al. 2013;
  the bulk and folded R-hat above without the normal scores, which with many chains change it by
  at most 2e-4, measured even on Cauchy draws), by two sums each; bulk and tail ESS are the rank
  statistics above of :data:`RANK_CHAINS` chains spread evenly over the run, multiplied by the
  number of chains over :data:`RANK_CHAINS` (ESS adds over independent chains)
  (:func:`~diffstat.rank_stats.many_chain_diagnostics`). At 1,000 chains of 300 draws this took
  1/20 to 1/45 of the time of the rank statistics of all chains, and a few chains away from the
  others (a second mode, a far tail) still raise R-hat.
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

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from diffstat.rank_stats import many_chain_diagnostics, rank_diagnostics

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
    "many_chain_diagnostics",
    "RANK_CHAINS",
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
#: With more chains than this, R-hat is taken over all chains' draws unranked and the rank ESS on
#: this many chains spread over the run, scaled to all chains (:func:`many_chain_diagnostics`): at
#: 1,000 chains the full sort cost more than the sampling (``docs/mala_overhead.md``), while 16
#: chains give the ESS four times the chains Vehtari et al. (2021) designed it for (4).
RANK_CHAINS = 16
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


def _rhat_ess(draws: np.ndarray) -> tuple[float, int, float, int, float, int]:
    """Max R-hat and min bulk / tail ESS over coordinates, each with its coordinate: the rank
    statistics of all chains, or beyond RANK_CHAINS chains :func:`many_chain_diagnostics`."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if draws.shape[0] <= RANK_CHAINS:
            rhat, bulk, tail = rank_diagnostics(draws)
        else:
            rhat, bulk, tail = many_chain_diagnostics(draws, RANK_CHAINS)

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
    with np.errstate(invalid="ignore"):  # chains at lp = -inf: no gap is measured (NaN), none flagged
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

    draws = to_numpy(draws)
    if not np.issubdtype(draws.dtype, np.floating):
        draws = draws.astype(float)
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


def warn_if_unreliable(diag: Diagnostics, label: str = "MCMC", stacklevel: int = 3, advice: str = "") -> None:
    """Emit one ``RuntimeWarning`` listing every problem in ``diag`` (nothing when it is clean), with
    ``advice`` (what to change for the method at hand) as its last line."""
    if diag.messages:
        problems = "\n".join(f"  - {m}" for m in diag.messages)
        message = f"{label}: the result is unreliable:\n{problems}" + (f"\n{advice}" if advice else "")
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
