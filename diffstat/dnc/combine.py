r"""``ds.dnc.combine``: from draws of K sub-posteriors to draws of their product.

The sub-posteriors :math:`p_k(\theta) \propto p(\theta)^{1/K} \prod_{i \in \text{shard } k}
p(y_i \mid \theta)` multiply to the full posterior. A combiner sees only draws from each
:math:`p_k` (and, where MCMC produced them, the scores :math:`\nabla \log p_k` at those draws) and
returns equally weighted draws from an approximation of :math:`\prod_k p_k`.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from scipy.stats import chi2

from diffstat._util import check_device, check_options, check_positive_int, check_seed
from diffstat.dnc.consensus import combine_consensus
from diffstat.dnc.gaussian import CombineResult, combine_gaussian
from diffstat.dnc.options import DIFFUSION_OPTIONS
from diffstat.dnc.semiparametric import combine_semiparametric
from diffstat.dnc.swiss import combine_swiss
from diffstat.dnc.tasks import ShardResult

__all__ = [
    "combine",
    "COMBINERS",
    "as_shard_draws",
    "carried_log_probs",
    "combiner_options",
    "check_combiner",
    "shard_separation",
]


def _combine_diffusion(*args, **kwargs) -> CombineResult:
    from diffstat.dnc.diffusion import combine_diffusion  # imports the diffusion toolkit lazily

    return combine_diffusion(*args, **kwargs)


#: method name -> combiner ``fn(subposteriors, *, num_samples, generator, scores, progress, **options)``
COMBINERS: dict[str, Callable[..., CombineResult]] = {
    "diffusion": _combine_diffusion,
    "consensus": combine_consensus,
    "gaussian": combine_gaussian,
    "semiparametric": combine_semiparametric,
    "swiss": combine_swiss,
}


#: What the front passes to every combiner; the rest of a combiner's keywords are its options.
_FRONT = frozenset({"num_samples", "generator", "scores", "progress"})


def combiner_options(method: str) -> frozenset | None:
    """The options ``combine(..., method, **options)`` accepts: the diffusion combiner's
    (:data:`~diffstat.dnc.options.DIFFUSION_OPTIONS`), or another combiner's keyword-only
    parameters; None for a combiner that takes ``**options`` (it checks its own)."""
    if method == "diffusion":
        return DIFFUSION_OPTIONS
    params = inspect.signature(COMBINERS[method]).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind is p.KEYWORD_ONLY) - _FRONT


def check_combiner(method: str, options: dict) -> None:
    """``ValueError`` for an unknown combiner or an option it does not take, each listing the valid
    names: checked before any work (and by the pipeline before any shard is sampled)."""
    if method not in COMBINERS:
        raise ValueError(f"unknown combiner {method!r}; available: {', '.join(sorted(COMBINERS))}")
    allowed = combiner_options(method)
    if allowed is not None:
        check_options(options, allowed, method)


class _Posterior:
    """The minimal target-like object :func:`diffstat.io.to_inference_data` needs."""

    def __init__(self, name: str):
        self.name = name

    def to_posterior(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        return {self.name: x.detach().cpu().numpy()}


def _draws_of(shard) -> torch.Tensor:
    """One shard's draws ``(n, dim)``: a :class:`ShardResult`'s, or :func:`diffstat.io.draws_from`'s."""
    from diffstat import io

    return shard.draws if isinstance(shard, ShardResult) else io.draws_from(shard)


def as_shard_draws(subposteriors, scores=None, *, dtype=torch.float64, device=None):
    """Validate and convert the shards' draws (and scores) to a list of ``(n_k, dim)`` tensors.

    ``subposteriors``: a list of arrays/tensors ``(n_k, dim)`` (or ``(chain, draw, dim)``), of
    InferenceData with one variable, or of :class:`~diffstat.dnc.tasks.ShardResult` (whose scores
    are used when ``scores`` is None). ``scores``: None or one array per shard, same shapes.
    """
    from diffstat import io

    if isinstance(subposteriors, (torch.Tensor, np.ndarray)) and np.ndim(subposteriors) == 3:
        subposteriors = list(subposteriors)
    if not isinstance(subposteriors, (list, tuple)) or len(subposteriors) < 2:
        raise ValueError(
            "subposteriors must be a list of at least 2 arrays of draws (n_k, dim), one per shard"
        )
    if scores is None and all(isinstance(s, ShardResult) for s in subposteriors):
        scores = [s.scores for s in subposteriors]
    draws = [_draws_of(s).to(dtype=dtype, device=device) for s in subposteriors]
    dim = draws[0].shape[1]
    for k, x in enumerate(draws):
        if x.shape[1] != dim:
            raise ValueError(f"shard {k} has draws of dimension {x.shape[1]}, shard 0 has {dim}")
        if x.shape[0] < dim + 2:
            raise ValueError(f"shard {k} has {x.shape[0]} draws; at least dim + 2 = {dim + 2} are needed")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"shard {k} has non-finite draws")
        _check_spread(x, k)
    if scores is None:
        return draws, None
    if not isinstance(scores, (list, tuple)) or len(scores) != len(draws):
        raise ValueError(f"scores must be a list of {len(draws)} arrays, one per shard, or None")
    grads = [io.draws_from(g).to(dtype=dtype, device=device) for g in scores]
    for k, (x, g) in enumerate(zip(draws, grads)):
        if g.shape != x.shape:
            raise ValueError(f"scores of shard {k} have shape {tuple(g.shape)}, its draws {tuple(x.shape)}")
        if not bool(torch.isfinite(g).all()):
            raise ValueError(f"scores of shard {k} are not all finite")
    return draws, grads


def _check_spread(x: torch.Tensor, k: int) -> None:
    """``ValueError`` for shard ``k``'s draws ``x: (n, dim)`` whose sample covariance is singular: a
    coordinate that never moves, or coordinates that move together exactly (a stuck chain, or a
    parameter the shard model does not identify). Every combiner fits moments or a density to the
    draws and would invert that covariance. The rank is that of the centred draws scaled to unit
    sd, at ``torch.linalg.matrix_rank``'s default tolerance (n times machine epsilon relative to
    the largest singular value), so a correlation of 0.9999 passes and an exact 1 does not."""
    sd = x.std(0)
    constant = torch.nonzero(sd == 0).flatten().tolist()
    if constant:
        raise ValueError(
            f"shard {k}: coordinates {constant[:10]} of its draws never change (a stuck chain?); "
            "every combiner needs draws that spread in every coordinate"
        )
    rank = int(torch.linalg.matrix_rank((x - x.mean(0)) / sd))
    if rank < x.shape[1]:
        raise ValueError(
            f"shard {k}: its draws span only {rank} of {x.shape[1]} dimensions (coordinates that are "
            "exact linear combinations of others): their covariance is singular; drop the redundant "
            "coordinates"
        )


def carried_log_probs(subposteriors, draws: list[torch.Tensor]) -> list[torch.Tensor] | None:
    r""":math:`\log p_k` at every shard's draws where every input carries it, else None: a
    :class:`~diffstat.dnc.tasks.ShardResult`'s ``log_probs``, or an InferenceData's
    ``sample_stats.lp`` (``ds.sample``'s target log-density at each draw), flattened over chains as
    its draws are. ``draws``: the shards' draws from :func:`as_shard_draws` (device, dtype, and
    the count each log-density must match). ``ValueError`` for a carried log-density that is not
    finite or does not match the draws."""
    if isinstance(subposteriors, (torch.Tensor, np.ndarray)):
        return None
    out = []
    for k, (shard, x) in enumerate(zip(subposteriors, draws)):
        if isinstance(shard, ShardResult):
            lp = torch.as_tensor(shard.log_probs)
        elif hasattr(shard, "sample_stats") and "lp" in shard.sample_stats:
            lp = torch.as_tensor(np.asarray(shard.sample_stats["lp"].values))
        else:
            return None
        lp = lp.reshape(-1).to(dtype=x.dtype, device=x.device)
        if lp.shape[0] != x.shape[0]:
            raise ValueError(f"shard {k} carries {lp.shape[0]} log-densities for {x.shape[0]} draws")
        if not bool(torch.isfinite(lp).all()):
            raise ValueError(
                f"the log-densities that shard {k} carries are not all finite; pass draw_log_probs=None "
                "to combine without them"
            )
        out.append(lp)
    return out


#: Inputs of the diffusion combiner that choose its route; when none is given, ``combine`` takes
#: ``draw_log_probs`` from the inputs (:func:`carried_log_probs`).
_ROUTE_INPUTS = frozenset({"log_probs", "draw_log_probs", "energy_models", "fits", "calibration_log_probs"})


def _carried_route(method: str, subposteriors, draws, grads, options: dict) -> dict:
    """``{"draw_log_probs": ...}`` for the diffusion combiner given scores (``grads``) and no input that
    chooses its route (``_ROUTE_INPUTS`` in ``options``), when the inputs carry log-densities at their
    draws; else ``{}``."""
    if method != "diffusion" or grads is None or _ROUTE_INPUTS & options.keys():
        return {}
    carried = carried_log_probs(subposteriors, draws)
    return {} if carried is None else {"draw_log_probs": carried}


def _check_arguments(method: str, options: dict, num_samples, seed, device) -> tuple:
    """``combine``'s checks before it reads the draws: the combiner and its options
    (:func:`check_combiner`), then ``(num_samples, seed, device)`` validated."""
    check_combiner(method, options)
    return check_positive_int(num_samples, "num_samples"), check_seed(seed), check_device(device)


def combine(
    subposteriors,
    method: str,
    *,
    scores=None,
    num_samples: int,
    seed: int,
    progress: bool = True,
    name: str = "x",
    device=None,
    **options,
):
    r"""Combine draws from K sub-posteriors into draws from their product.

    Parameters
    ----------
    subposteriors : list of K arrays ``(n_k, dim)``, InferenceData or ShardResult
        Draws of :math:`p_k \propto p(\theta)^{1/K} p(y_{(k)} \mid \theta)`. InferenceData of
        ``ds.sample`` and the :class:`~diffstat.dnc.tasks.ShardResult` of
        :func:`~diffstat.dnc.pipeline.sample_shards` also carry :math:`\log p_k` at the draws
        (``sample_stats.lp``, ``log_probs``), which ``"diffusion"`` then uses (below).
    method : {"diffusion", "consensus", "gaussian", "semiparametric", "swiss"}
        ``"diffusion"`` takes the most accurate route its inputs allow (:mod:`diffstat.dnc.diffusion`;
        ``docs/dnc.md`` says when each is exact, approximately right or biased): given the shards'
        log-densities (``log_probs=``), an SMC sampler to their exact sum, the full posterior,
        consistent whatever the shards (:mod:`diffstat.dnc.exact_smc`); else, given scores and the
        log-densities at the draws (``draw_log_probs=``, by default taken from inputs that carry
        them), the same SMC on damped cubic shard energies fitted there
        (:mod:`diffstat.dnc.surrogate`), right while the product lies within a few shard sds of
        the shards' draws and the shards are unimodal; else (or with ``draw_log_probs=None``) an
        energy-based diffusion model per shard fitted to the draws and scores, the product sampled
        by annealed MCMC on the sum of energies (Trojan et al.), biased where the product lies in
        the shards' far tails. The log-densities a Pyro target's ``sample_stats.lp`` carries are
        those of its unconstrained coordinates: for a constrained site pass
        ``draw_log_probs=None`` (or unconstrained draws as arrays, with their ``draw_log_probs``).
        ``"consensus"``: consensus Monte Carlo (:mod:`~diffstat.dnc.consensus`);
        ``"gaussian"``: product of Gaussian approximations (:mod:`~diffstat.dnc.gaussian`);
        ``"semiparametric"``: Neiswanger et al. (:mod:`~diffstat.dnc.semiparametric`);
        ``"swiss"``: Vyner et al. (:mod:`~diffstat.dnc.swiss`).
    scores : list of K arrays ``(n_k, dim)``, optional
        :math:`\nabla \log p_k` at each draw (target score matching for ``"diffusion"``, and
        needed by its cubic shard energies); default: a ShardResult's ``scores``.
    num_samples : int
        Number of combined draws.
    seed : int
        Seeds a ``torch.Generator``; the same seed gives the same draws on the same machine.
    progress, name, device : bool, str, str or torch.device
        Show progress bars; the name of the ``posterior`` variable; where the computation runs.
    **options
        Options of the combiner (see each module); an unknown one is a ``ValueError`` listing the
        valid ones (:func:`combiner_options`).

    Returns
    -------
    arviz.InferenceData
        ``posterior[name]`` of shape ``(1, num_samples, dim)``; ``sample_stats.lp`` the combiner's
        estimate of the product log-density (up to a constant; the exact sum of shard
        log-densities when ``"diffusion"`` is given ``log_probs``); ``posterior.attrs`` with
        ``method``, ``num_shards``, ``sampling_time``, ``seed``, ``diffstat_version``.
    """
    num_samples, seed, device = _check_arguments(method, options, num_samples, seed, device)
    draws, grads = as_shard_draws(subposteriors, scores, device=device)
    options.update(_carried_route(method, subposteriors, draws, grads, options))
    separation = shard_separation(draws)
    generator = torch.Generator(device=device).manual_seed(int(seed))
    start = time.perf_counter()
    result = COMBINERS[method](
        draws, num_samples=num_samples, generator=generator, scores=grads, progress=progress, **options
    )
    attrs = {
        "method": f"dnc_{method}",
        "num_shards": len(draws),
        "sampling_time": float(time.perf_counter() - start),
        "seed": int(seed),
        "num_target_evals": 0,
        "max_shard_separation": separation[0],
    }
    _warn_if_apart(separation, draws[0].shape[1], len(draws))
    return _to_inference_data(result, name, attrs)


#: Overall chance that Gaussian sub-posteriors of one posterior are called apart (Bonferroni over the
#: pairs): a false alarm once in a million combinations, so the warning means disagreement.
_APART_LEVEL = 1e-6


def shard_separation(draws: list[torch.Tensor]) -> tuple[float, int, int]:
    r"""The largest distance between two shards' means in the sd of their difference: over pairs
    :math:`k < l`, :math:`D_{kl} = \sqrt{(\mu_k - \mu_l)^\top (\Sigma_k + \Sigma_l)^{-1} (\mu_k - \mu_l)}`
    with each shard's sample mean and covariance, from ``draws``, K tensors ``(n_k, dim)``. Returns
    ``(D, k, l)`` for the farthest pair. Sub-posteriors of one posterior (each about
    :math:`\mathcal N(\theta, \Sigma_k)` around estimates that scatter by :math:`\Sigma_k`) give
    :math:`D_{kl}^2 \sim \chi^2_d`."""
    means = [x.mean(0) for x in draws]
    covs = [torch.atleast_2d(torch.cov(x.T)) for x in draws]
    best = (0.0, 0, 1)
    for k in range(len(draws)):
        for j in range(k + 1, len(draws)):
            diff = means[k] - means[j]
            d2 = float(diff @ torch.linalg.solve(covs[k] + covs[j], diff))
            if d2 > best[0] ** 2:
                best = (d2**0.5, k, j)
    return best


def _warn_if_apart(separation: tuple[float, int, int], dim: int, num_shards: int) -> None:
    r"""``RuntimeWarning`` when the farthest pair of shards (:func:`shard_separation`) lies beyond the
    :math:`\chi^2_d` quantile at ``_APART_LEVEL`` over the pairs: the shards disagree, their draws
    barely overlap (in one dimension beyond 4.9 sds of the difference, about 7 sds of one shard), and
    the product lies in the tails of some shards, where their draws say nothing about them."""
    distance, k, j = separation
    limit = float(chi2.isf(_APART_LEVEL / (num_shards * (num_shards - 1) / 2), dim)) ** 0.5
    if distance > limit:
        warnings.warn(
            f"ds.dnc.combine: shards {k} and {j} are {distance:.1f} sds apart (the distance of their means "
            f"in the sd of their difference, from their own draws; sub-posteriors of one posterior are "
            f"within {limit:.1f}): their draws hardly overlap, so the product lies in the far tails of "
            "some shards, where their draws say nothing about them, and the combined draws are not to "
            "be trusted. Check the shards (a chain stuck in a minor mode, a shard of other data or "
            "of another model).",
            RuntimeWarning,
            stacklevel=3,
        )


def _to_inference_data(result: CombineResult, name: str, attrs: dict):
    """``arviz.InferenceData`` of one chain: the draws, ``sample_stats``, the combiner's groups,
    and ``attrs`` updated by the combiner's own."""
    from diffstat import io
    from diffstat.sampling import SamplerResult

    stats = {
        k: (v.unsqueeze(0) if torch.is_tensor(v) else np.asarray(v)[None])
        for k, v in result.sample_stats.items()
    }
    attrs.update(result.attrs)
    sampler_result = SamplerResult(result.draws.unsqueeze(0), stats, result.groups, {})
    return io.to_inference_data(_Posterior(name), sampler_result, attrs)
