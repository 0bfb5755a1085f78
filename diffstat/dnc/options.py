r"""The settings of the diffusion combiner and of its parts, as frozen dataclasses validated once.

``ds.dnc.combine(..., "diffusion", **options)`` takes them as flat keywords
(:meth:`DiffusionOptions.from_kwargs` sorts them into the groups below); a name that no group
declares is refused with a ``ValueError`` that lists the valid ones, before any work. The nested
dictionaries ``calibrate_options`` and ``smc_options`` are checked the same way.

Why each default is what it is (measurements in ``docs/dnc.md``):

- **Fit** (:class:`FitOptions`, :func:`~diffstat.dnc.energy.fit_shard_energy`): width 64 and 6000
  steps with focused training are the settings of the benchmark rows in ``docs/dnc.md``;
  without focused training (``focus_width=None``) the logistic toy's d_MAH rose from 0.075 to
  0.237. The ``"stf"`` loss cost about 3 times the fit time for no clear gain: ``"mixed"``.
- **Annealing** (:class:`AnnealOptions`, :mod:`diffstat.dnc.annealing`): from ``t_start = 1``,
  where the noised shards are nearly Gaussian (the start is the product of their noised Gaussian
  parts), to ``t_min = 1e-3``, the model's "t = 0". More MCMC per level (10 steps, 200 levels)
  did not improve the mode weights, which come from the learned energies: 50 levels of 2 steps.
  No reweighting (``reweight = False``):
  on the bimodal test the SMC weights gave mode weight 0.999 against the exact 0.778 (0.782
  without), since they inherit the learned energies' offsets between modes.
- **Calibration** (:class:`CalibrationOptions`, :mod:`diffstat.dnc.mode_weights`): on by default,
  with the same fits (width 32, 3,000 steps) it narrowed the mixture benchmark's mode weights from
  0.096-0.240 to 0.139-0.183 (exact 1/6); ``shrink < 1`` keeps the reciprocal importance
  ratios :math:`q/p` bounded.
- **SMC** (:class:`SMCOptions`, :mod:`diffstat.dnc.exact_smc`): its module notes say why.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from diffstat._util import check_option_types, check_options, check_positive_int, option_kinds

__all__ = [
    "FitOptions",
    "AnnealOptions",
    "CalibrationOptions",
    "SMCOptions",
    "DiffusionOptions",
    "DIFFUSION_OPTIONS",
    "from_kwargs",
]


def _names(cls) -> frozenset:
    return frozenset(f.name for f in dataclasses.fields(cls))


def from_kwargs(cls, options: dict | None, method: str):
    """``cls(**options)``, refusing unknown names with a ``ValueError`` that lists the valid ones."""
    options = dict(options or {})
    check_options(options, _names(cls), method)
    check_option_types(options, option_kinds(dataclasses.fields(cls)), method)
    return cls(**options)


@dataclass(frozen=True)
class FitOptions:
    """Network and training settings of every shard's energy model (module notes)."""

    hidden: int = 64
    depth: int = 3
    num_steps: int = 6000
    batch_size: int = 512
    lr: float = 2e-3
    small_t_fraction: float = 0.5
    loss: str = "mixed"
    num_reference: int = 1024
    ema_decay: float = 0.999
    focus_width: float | None = 3.0
    focus_fraction: float = 0.5

    def __post_init__(self):
        if self.loss not in ("stf", "mixed"):
            raise ValueError(f"loss must be 'stf' or 'mixed', got {self.loss!r}")

    def training(self) -> dict:
        """The keywords of :func:`~diffstat.dnc.energy.fit_shard_energy` (all but the focus ones)."""
        skip = ("focus_width", "focus_fraction")
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


@dataclass(frozen=True)
class AnnealOptions:
    """Times and MALA steps of the annealed product sampler (module notes)."""

    t_min: float = 1e-3
    t_start: float = 1.0
    num_levels: int = 50
    mcmc_per_level: int = 2
    num_final_steps: int = 100
    resample_threshold: float = 0.5
    reweight: bool = False

    def __post_init__(self):
        check_positive_int(self.num_levels, "num_levels")
        check_positive_int(self.mcmc_per_level, "mcmc_per_level")
        if not 0 < self.t_min < self.t_start <= 1.0:
            raise ValueError(f"need 0 < t_min < t_start <= 1, got t_min={self.t_min}, t_start={self.t_start}")


@dataclass(frozen=True)
class CalibrationOptions:
    """Settings of :func:`~diffstat.dnc.mode_weights.calibrate_mode_weights` (module notes);
    ``min_points`` None means ``4 (dim + 2)``, enough draws to fit a Gaussian in a basin."""

    num_iters: int = 60
    num_q_draws: int = 1024
    max_shard_draws: int = 10000
    shrink: float = 0.7
    min_points: int | None = None
    inflate: float = 1.5


@dataclass(frozen=True)
class SMCOptions:
    """Settings of :func:`~diffstat.dnc.exact_smc.exact_product_smc` (its module notes say why)."""

    inflation: float = 1.2
    laplace: bool = True
    target_ess: float = 0.5
    resample_threshold: float = 0.5
    num_mcmc_steps: int = 4
    num_final_steps: int = 5
    max_stages: int = 200


@dataclass(frozen=True)
class DiffusionOptions:
    r"""Every option of the diffusion combiner (:func:`~diffstat.dnc.diffusion.combine_diffusion`),
    grouped: ``fit``, ``anneal``, ``calibration``, ``smc``, and the inputs that replace or steer
    parts of it. Built from the flat keywords by :meth:`from_kwargs`, which accepts these:

    Parameters
    ----------
    hidden, depth, num_steps, batch_size, lr, small_t_fraction, loss, num_reference, ema_decay
        Network and training settings per shard (:func:`~diffstat.dnc.energy.fit_shard_energy`).
    focus_width, focus_fraction : float
        Train with a share ``focus_fraction`` of every batch drawn near the Gaussian product
        (within about ``focus_width`` of its standard deviations), at small times only, where the
        product must be accurate; ``focus_width=None`` trains on the shard draws uniformly.
    t_min, t_start : float
        The annealing runs from ``t_start`` down to ``t_min`` (the "t = 0" of the model).
    num_levels, mcmc_per_level : int
        Times on the grid (uniform in :math:`\log\sigma_t`) and MALA steps per time.
    num_final_steps : int
        MALA steps at ``t_min`` (half of them tune the step size, the rest sample).
    resample_threshold : float
        Resample when the ESS falls below this fraction of ``num_samples``.
    reweight : bool
        Weight the annealing's particles as sequential Monte Carlo (:mod:`diffstat.dnc.annealing`).
    log_probs : list of K callables, optional
        The shards' exact log-densities (``x -> lp`` or ``x -> (lp, grad)``, original
        coordinates): the draws are then those of an SMC sampler to their sum, the exact full
        posterior (:func:`~diffstat.dnc.exact_smc.exact_product_smc`, with ``smc_options``, a dict
        of :class:`~diffstat.dnc.options.SMCOptions`).
    draw_log_probs : list of K tensors ``(n_k,)``, optional
        :math:`\log p_k` at each shard's draws (any constant per shard; the pipeline keeps them,
        and ``ds.dnc.combine`` takes them from inputs that carry them unless this is given, None
        included). With ``scores`` and without ``log_probs``: each shard's energy is a polynomial
        of degree ``surrogate_degree`` fitted to the values and scores at its draws
        (:mod:`diffstat.dnc.surrogate`), and the SMC samples the product of those; no network.
    surrogate_degree : int
        The polynomials' degree (3: :mod:`diffstat.dnc.surrogate` says why).
    fit_energies : bool, optional
        With ``log_probs``: start the SMC from a Gaussian fitted to the learned product's draws
        (True) or from the shards' Gaussian product, with no fit (False, the default: the SMC is
        consistent from either start and the fits cost most of the time). Ignored without
        ``log_probs``.
    executor : concurrent.futures.Executor, optional; max_retries : int
        Fit the shard models (networks, or the cubics of ``draw_log_probs``) there, each retried
        up to ``max_retries`` times (:mod:`diffstat.dnc.tasks`); default: in this process.
    fits : list of dicts, optional
        Models already fitted by :func:`~diffstat.dnc.energy.fit_shard_energy` (on the same
        whitening): no training.
    calibrate : bool
        After the first half of the MCMC at ``t_min``, move the product's mass between its modes
        to the shares estimated from the shards' draw counts
        (:func:`~diffstat.dnc.mode_weights.calibrate_mode_weights`, with ``calibrate_options``, a
        dict of :class:`~diffstat.dnc.options.CalibrationOptions`; not with ``log_probs``).
    calibration_log_probs : list of K callables, optional
        The shards' exact log-densities (``x -> lp`` or ``x -> (lp, grad)``, original coordinates,
        any constant), called only to weigh the product's modes: then their masses are
        :math:`\int_{A_j}\prod_k p_k` by importance sampling (a few hundred points per shard and
        mode) instead of the draw counts, and at the end the particles are importance-resampled
        within each mode to the exact product (one more call per particle; ``attrs``:
        ``num_shard_evals`` per shard, ``final_is_ess`` as a fraction of ``num_samples``).
    energy_models : list of K objects with ``energy(z, t) -> (n,)``, optional
        Energies of the noised shards in the whitened coordinates of
        :func:`~diffstat.dnc.energy.whitening` (for example exact ones, to test the sampler apart
        from the fit): no training.
    calibrate_options, smc_options : dict, optional
        Settings of :class:`CalibrationOptions` and :class:`SMCOptions`.
    """

    fit: FitOptions = field(default_factory=FitOptions)
    anneal: AnnealOptions = field(default_factory=AnnealOptions)
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    smc: SMCOptions = field(default_factory=SMCOptions)
    calibrate: bool = True
    calibration_log_probs: list | None = None
    log_probs: list | None = None
    fit_energies: bool | None = None
    draw_log_probs: list | None = None
    surrogate_degree: int = 3
    executor: object = None
    max_retries: int = 2
    fits: list | None = None
    energy_models: list | None = None

    @classmethod
    def from_kwargs(cls, options: dict) -> DiffusionOptions:
        """Sort the flat keywords of ``combine(..., "diffusion", **options)`` into the groups;
        ``ValueError`` listing the valid names for any other."""
        check_options(options, DIFFUSION_OPTIONS, "diffusion")
        kinds = {}
        for group in (FitOptions, AnnealOptions, cls):
            kinds.update(option_kinds(dataclasses.fields(group)))
        check_option_types(options, kinds, "diffusion")
        fit = {k: v for k, v in options.items() if k in _names(FitOptions)}
        anneal = {k: v for k, v in options.items() if k in _names(AnnealOptions)}
        rest = {k: v for k, v in options.items() if k in _TOP}
        calibration = from_kwargs(
            CalibrationOptions, rest.pop("calibrate_options", None), "calibrate_options"
        )
        smc = from_kwargs(SMCOptions, rest.pop("smc_options", None), "smc_options")
        return cls(FitOptions(**fit), AnnealOptions(**anneal), calibration, smc, **rest)


_TOP = (_names(DiffusionOptions) - {"fit", "anneal", "calibration", "smc"}) | {
    "calibrate_options",
    "smc_options",
}
#: The keywords ``combine(..., "diffusion", ...)`` accepts.
DIFFUSION_OPTIONS = _TOP | _names(FitOptions) | _names(AnnealOptions)
