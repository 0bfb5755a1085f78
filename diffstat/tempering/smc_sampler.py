"""The front door of adaptive tempered SMC: ``ds.sample(target, "smc", ...)`` runs
:func:`~diffstat.tempering.smc.adaptive_tempered_smc` ``num_chains`` times and pools the runs
(:mod:`diffstat.tempering.runs`)."""

from __future__ import annotations

import warnings
from dataclasses import fields

import torch

from diffstat._util import check_options, progress_bar
from diffstat.sampling import SamplerResult, register_sampler
from diffstat.tempering.auto_reference import reference_attrs
from diffstat.tempering.core import initial_particles
from diffstat.tempering.dispersed import check_scales, disagreement_note, run_paths
from diffstat.tempering.mode_check import after_checks, pop_check_modes
from diffstat.tempering.resampling import resample
from diffstat.tempering.runs import (
    CHI2_ALPHA,
    max_runs_rhat,
    pooled_log_z,
    runs_agreement,
    runs_rhat,
    stack_stages,
    wider_runs_p,
)
from diffstat.tempering.smc import MIN_EVES, SMCConfig, adaptive_tempered_smc

__all__ = ["smc_sampler"]

_OPTIONS = {"reference", "reference_scales", "check_modes"} | {f.name for f in fields(SMCConfig)}


@register_sampler("smc", typed_by=SMCConfig)
def smc_sampler(target, *, num_samples, num_chains, generator, progress, device, **options) -> SamplerResult:
    r"""``ds.sample(target, "smc", num_samples=n, ...)``: adaptive tempered SMC with ``n`` particles
    per run, ``num_chains`` (default 4) independent runs, each returned as a chain.

    Options (see :func:`adaptive_tempered_smc`): ``reference``, ``target_ess`` (0.5), ``criterion``
    (``"cess"``), ``resample_threshold`` (0.5), ``resampling`` (``"systematic"``), ``kernel``
    (``"mala"``), ``num_mcmc_steps`` (None: adapted per stage), ``max_mcmc_steps`` (100),
    ``decorrelation_tol`` (0.1), ``metric`` (``"auto"``, ``"dense"``, ``"diag"``), ``within_modes``
    (True), ``num_leapfrog`` (5), ``step_size``, ``target_accept``, ``adapt_scale`` (True),
    ``step_jitter`` (0), ``max_pareto_k`` (None), ``betas``, ``max_stages``; ``reference_scales``
    (None: runs from N(0, I) and N(0, 16 I) by turns where N(0, I) is the reference;
    :mod:`~diffstat.tempering.dispersed`; ``(1,)`` for N(0, I) in every run); ``check_modes`` (True):
    after the runs, look for modes that every run missed
    (:func:`~diffstat.modes.coverage.missed_modes`: gradient ascent from scaled reference draws,
    Laplace masses of the peaks no draw reaches); ``missed_mode_share`` in attrs, and a
    ``RuntimeWarning`` above 0.05.

    Why four runs: a mode's share of the draws is the ratio of per-mode evidence estimates, with
    about the noise of :math:`\log\hat Z` (0.1 at 1,000 particles on a 6-d three-mode mixture, mode
    weights 0.05 off in total variation on 5 seeds in 12 with one run); four runs halve it, and a
    ``RuntimeWarning`` says when their log Z estimates or draws (R-hat across runs, ``rhat_max`` in
    attrs) disagree, or when runs from the wider reference find more mass (``wider_runs_p`` and
    ``reference_scales`` in attrs; :mod:`diffstat.tempering.runs`). The pooled :math:`\hat Z` is the
    runs' mean, its standard error the larger of the genealogy's and the runs' spread. Each run's
    draws are its particles resampled with the run's scheme; ``log_weight`` in ``sample_stats`` is
    their log weight.
    """
    check_options(options, _OPTIONS, "smc")
    check_modes = pop_check_modes(options)
    evals0 = target.num_target_evals
    num_chains = 4 if num_chains is None else num_chains
    scales = check_scales(options.pop("reference_scales", None))
    reference = options.pop("reference", None)
    SMCConfig.from_options(dict(options))  # a bad value is refused before the first evaluation
    path, paths, per_run = run_paths(target, reference, scales, num_chains, device)
    scheme = options.get("resampling", "systematic")
    with (
        progress_bar(1000 * num_chains, "smc", progress) as bar,
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")  # each run's warnings, said once below
        draws, lps, log_ws, accs, runs, refused_nan = _run_all(
            path, paths, per_run, num_samples, generator, device, bar, scheme, options
        )
    for message, category in dict.fromkeys((str(w.message), w.category) for w in caught):
        warnings.warn(message, category, stacklevel=2)
    log_zs, ses = [r.log_normalizer for r in runs], [r.log_normalizer_se for r in runs]
    log_z, se, se_method = pooled_log_z(log_zs, ses)
    agreement, rhat = runs_agreement(log_zs, ses), runs_rhat(torch.stack(draws))
    num_eves = min(r.num_eves for r in runs)
    wider_p = wider_runs_p(log_zs, ses, per_run)
    note = disagreement_note(per_run, log_zs, torch.stack(draws), wider_p)
    _warn_if_unreliable(num_eves, num_samples, log_zs, ses, agreement, rhat, log_z, se, note)
    pooled = torch.cat(draws)
    checks = after_checks("SMC", check_modes, target, path, pooled, log_z, generator, device, evals0)
    sample_stats = {
        "lp": torch.stack(lps),
        "acceptance_rate": torch.stack(accs),
        "log_weight": torch.stack(log_ws),
    }
    genealogy = "Lee-Whiteley" if scheme == "multinomial" else "Chan-Lai"
    attrs = {
        "log_normalizer": log_z,
        "log_normalizer_se": se,
        "log_normalizer_se_method": genealogy if se_method == "genealogy" else "runs",
        "runs_agreement_p": agreement,
        "rhat_max": rhat,
        "num_stages": max(len(r.stages["beta"]) for r in runs),
        "num_resampling": sum(r.num_resampling for r in runs),
        "num_eves": num_eves,
        "path": path.kind,
        **reference_attrs(path),
    }
    if per_run is not None:
        attrs["reference_scales"], attrs["wider_runs_p"] = per_run, wider_p
    attrs.update(checks)
    if refused_nan:
        attrs["num_nan_exploration"] = attrs.get("num_nan_exploration", 0) + refused_nan
    return SamplerResult(
        torch.stack(draws), sample_stats, {"tempering": stack_stages([r.stages for r in runs])}, attrs
    )


def _run_all(
    narrow, paths, per_run, num_samples, generator, device, bar, scheme, options
) -> tuple[list, ...]:
    """One SMC run along each of ``paths``: each run's draws (its particles resampled with
    ``scheme``), their target log-density, log weights and acceptance, and the runs' outputs. A run
    from a wider reference than ``narrow`` that is refused (``ValueError``: the target is NaN or
    +inf at its reference draws, or -inf at all of them: a support or an overflow that N(0, I)
    does not reach) is made from ``narrow`` instead, as are the later runs of that width, and
    ``per_run`` (the runs' reference sds) says so; the NaNs the refused runs met are returned last
    (exploration, as the missed-mode check's far starts: not the runs' NaN warning)."""
    draws, lps, log_ws, accs, runs = [], [], [], [], []
    refused, nan_before, refused_nan = set(), narrow.target.num_nan_evals, 0
    for r, run_path in enumerate(paths):
        try:
            out = _one_run(
                narrow if run_path in refused else run_path, num_samples, generator, device, bar, options
            )
        except ValueError:
            if run_path is narrow:
                raise
            refused.add(run_path)
            refused_nan += narrow.target.num_nan_evals - nan_before
            out = _one_run(narrow, num_samples, generator, device, bar, options)
        if run_path in refused:
            per_run[r] = min(per_run)
        ps, log_w = out.particles, out.log_weights
        if not bool((log_w == log_w[0]).all()):
            idx = resample(generator, log_w, scheme)
            ps, log_w, acc = ps.index(idx), log_w[idx], out.acceptance[idx]
        else:
            acc = out.acceptance
        draws.append(ps.x)
        lps.append(ps.target_log_prob)
        log_ws.append(log_w)
        accs.append(acc)
        runs.append(out)
        nan_before = narrow.target.num_nan_evals
    return draws, lps, log_ws, accs, runs, refused_nan


def _one_run(run_path, num_samples, generator, device, bar, options):
    x0 = initial_particles(run_path, num_samples, generator, device)
    return adaptive_tempered_smc(generator, run_path, x0, bar=bar, **options)


def _warn_if_unreliable(
    num_eves, num_samples, log_zs, ses, agreement, rhat, log_z, se, note=("", "")
) -> None:
    """The run-level ``RuntimeWarning``s of :func:`smc_sampler`: too few surviving Eves; runs whose
    log Z estimates or draws disagree (``note``: the runs from a wider reference found more mass, and
    what a disagreement means for runs from references of different widths, as
    :func:`~diffstat.tempering.dispersed.disagreement_note` says)."""
    if num_eves < MIN_EVES:
        warnings.warn(
            f"SMC: only {num_eves} distinct initial particles survive (of {num_samples}); log Z = "
            f"{log_z:.3f} and its standard error {se:.3f} are unreliable (the genealogy estimate of "
            f"the variance needs at least {MIN_EVES} Eves), and so are the draws, descendants of so "
            "few particles. Raise num_samples (the particles) or num_mcmc_steps",
            RuntimeWarning,
            stacklevel=3,
        )
    reasons = []
    if agreement < CHI2_ALPHA:
        est = ", ".join(f"{lz:.3f} +- {s:.3f}" for lz, s in zip(log_zs, ses))
        reasons.append(
            f"their log Z estimates ({est}) disagree beyond their standard errors (Cochran's Q, "
            f"p = {agreement:.1e} < {CHI2_ALPHA})"
        )
    if rhat > max_runs_rhat(num_samples):
        reasons.append(
            f"their draws disagree (R-hat across runs {rhat:.3f} > {max_runs_rhat(num_samples):.3f})"
        )
    reason, note = note
    reasons += [reason] if reason else []
    if reasons:
        warnings.warn(
            f"SMC: the {len(log_zs)} runs found different parts of the target: "
            + "; ".join(reasons)
            + ". A mode some runs missed, or moves that do not mix: the draws' mode weights and log Z are "
            "unreliable. Give a reference= that covers the posterior (wider than it; the default is the "
            "target's reference, else N(0, I)), raise num_samples (the particles) or target_ess, or use "
            "method='diffusion' or 'pt'" + (f". {note.strip()}" if note else ""),
            RuntimeWarning,
            stacklevel=3,
        )
