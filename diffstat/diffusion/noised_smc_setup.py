r"""The pilot and the noised path of the particle denoising diffusion sampler
(:mod:`diffstat.diffusion.noised_smc`): where the pilot starts, the whitening it estimates (or the
one given), the mode scale of the power guidance and, for the default ``guidance="bank"``, the bank
of Laplace modes built from the pilot's end points (:mod:`diffstat.diffusion.noised_smc_bank`).

The pilot's defaults (2048 chains of 25 MALA steps) and the guidance's are explained in the
docstring of :mod:`diffstat.diffusion.noised_smc`.
"""

from __future__ import annotations

import math

import torch

from diffstat._util import check_nonnegative_int, check_positive_int
from diffstat.diffusion.noised_smc_bank import build_mode_bank
from diffstat.diffusion.gaussians import Whitening
from diffstat.diffusion.noised_smc_mixture import POPULATION_OPTIONS
from diffstat.diffusion.noised_smc_path import NoisedPath, pilot_whitening
from diffstat.tempering.resampling import SCHEMES

__all__ = ["OPTIONS", "check_settings", "default_reference", "setup_path"]


def default_reference(target, reference):
    """``reference`` if given, else the target's, else :math:`\\mathcal N(0, I)`."""
    if reference is not None:
        return reference
    if target.reference is not None:
        return target.reference
    zeros = torch.zeros(target.dim, dtype=target.dtype)
    return torch.distributions.Independent(torch.distributions.Normal(zeros, torch.ones_like(zeros)), 1)


def setup_path(target, generator, device, options) -> tuple[NoisedPath, dict]:
    """The pilot (or the given whitening) and the noised path; attrs describing them."""
    mode_scale = options.pop("mode_scale", None)
    guidance = options.pop("guidance", "bank")
    whitening = options.pop("whitening", None)
    pilot_chains = options.pop("pilot_chains", 2048)
    pilot_steps = options.pop("pilot_steps", 25)
    reference = default_reference(target, options.pop("reference", None))
    pilot_evals, s2, points = 0, 1.0, None
    if whitening is None or isinstance(whitening, str):
        white, s2, pilot_evals, points = pilot_whitening(
            target,
            reference,
            generator,
            num_chains=pilot_chains,
            num_steps=pilot_steps,
            whiten=whitening or "pilot",
            device=device,
        )
    else:
        mean, cov = (torch.as_tensor(t, dtype=target.dtype, device=device) for t in whitening)
        white = Whitening.from_moments(mean, cov)
    if mode_scale is not None:
        if not float(mode_scale) > 0:
            raise ValueError(f"mode_scale must be positive, got {mode_scale}")
        s2 = min(float(mode_scale) ** 2, 1.0)
    path = NoisedPath(target, white, s2, "power" if guidance == "bank" else guidance)
    num_modes, attrs_bank = 0, {}
    if guidance == "bank":
        if points is None:
            raise ValueError("guidance='bank' needs the pilot (whitening='pilot' or 'reference')")
        x, lp, grad = points
        z = white.to_white(x)
        before = target.num_target_evals
        bank, unseen = build_mode_bank(path.log_pi_and_grad, z, lp + white.log_det, grad @ white.chol)
        pilot_evals += target.num_target_evals - before
        num_modes = bank.means.shape[0]
        if num_modes:
            path = NoisedPath(target, white, s2, "bank", bank)
        else:
            guidance = "power"  # no mode settled, or too many unseen: the power guidance alone
        attrs_bank = {"bank_unseen_mass": unseen}
    attrs = {
        "mode_scale": math.sqrt(s2),
        "pilot_evals": int(pilot_evals),
        "guidance": guidance,
        "num_bank_modes": num_modes,
        **attrs_bank,
    }
    return path, attrs


OPTIONS = {
    "reference",
    "num_steps",
    "num_mcmc_steps",
    "max_mcmc_steps",
    "kernel",
    "within_modes",
    "resample_threshold",
    "resampling",
    "step_size",
    "mode_scale",
    "whitening",
    "pilot_chains",
    "pilot_steps",
    "guidance",
    "num_rounds",
    *POPULATION_OPTIONS,
}


def check_settings(options: dict) -> None:
    """``ValueError`` for a bad count or scale among PDDS's options, before the pilot's first
    evaluation (each is otherwise met where it is used: after the pilot, or never, a negative
    ``pilot_steps`` running no pilot moves)."""
    if options.get("resampling", "systematic") not in SCHEMES:
        raise ValueError(
            f"unknown resampling scheme {options['resampling']!r}; choose one of {', '.join(SCHEMES)}"
        )
    for name in ("num_steps", "max_mcmc_steps", "num_rounds", "population_size", "mixture_components"):
        if name in options:
            check_positive_int(options[name], name)
    if options.get("pilot_chains") is not None:
        if check_positive_int(options["pilot_chains"], "pilot_chains") < 2:
            raise ValueError("pilot_chains must be at least 2 (the whitening is their covariance), got 1")
    for name in ("num_mcmc_steps", "pilot_steps", "num_mixture_moves", "population_budget"):
        if options.get(name) is not None:
            check_nonnegative_int(options[name], name)
    if options.get("population") not in (None, "nuts"):
        raise ValueError(f"population must be None or 'nuts', got {options['population']!r}")
    if options.get("population") is not None and options.get("num_rounds", 1) > 1:
        raise ValueError("population='nuts' and num_rounds > 1 cannot be combined")
    for name in ("mode_scale", "step_size"):
        value = options.get(name)
        if value is not None and not 0 < float(value) < math.inf:
            raise ValueError(f"{name} must be positive and finite, got {value}")
