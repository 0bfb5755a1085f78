r"""The default reference of a geometric path when nobody gave one: N(0, I), or a Gaussian fitted to
where the mass is when N(0, I) clearly does not reach it.

Without ``reference=`` and without a reference of the target's own, a geometric path starts from
:math:`\mathcal N(0, I)`. Adaptive tempering from there to a posterior whose mass lies far from the
origin moves :math:`\beta` by about :math:`0.8 / D` per stage on :math:`\mathcal N(m, I)` with
:math:`D = \lVert m\rVert` (conditional-ESS stages; Zhou, Johansen and Aston 2016), so the number of
stages grows linearly in the distance and ``max_stages = 1000`` is exhausted near :math:`D = 800`
(an unstandardised regression's intercept at 1000 is one such posterior). :func:`default_reference`
decides once per target, by a pilot:

1. ``PILOT_DRAWS`` draws of :math:`\mathcal N(0, I)` from a generator of its own (seeded by
   ``PILOT_SEED``: the caller's generator is not consumed, so a run that keeps
   :math:`\mathcal N(0, I)` draws exactly what it drew before) climb the log-density by the start
   phase's Barzilai-Borwein ascent (:mod:`diffstat.mcmc.start`), stragglers moved to the best peak.
2. If some peak lies within ``REACH`` of the origin (Euclidean, the metric of
   :math:`\mathcal N(0, I)`), :math:`\mathcal N(0, I)` is kept: this costs the ascent's
   evaluations only.
3. Otherwise (up to ``LAPLACE_MAX_DIM`` dimensions) Newton steps finish the climb and give the
   Hessians :math:`H_i` there; :math:`\Sigma_L` is the inverse of their mean
   (:func:`~diffstat.mcmc.pathfinder.mean_covariance`, the identity where that fails or above 200
   dimensions). The distance is then measured in the pooled metric of the two Gaussians,
   :math:`d_i^2 = x_i^\top (I + \Sigma_L)^{-1} x_i`, so that a posterior that is far but as wide as
   its distance (a regression coefficient of sd 10 at 26) keeps :math:`\mathcal N(0, I)`: tempering
   reaches it in a few stages.
4. If every :math:`d_i` exceeds ``REACH`` the reference is
   :math:`\mathcal N(\mu, c^2 \Sigma)`, :math:`\mu` the peaks' mean, :math:`\Sigma = \Sigma_L + S`
   with :math:`S` the peaks' sample covariance (several modes: the reference spans them) and
   :math:`c` = ``WIDEN``.

The decision is cached on the target (several samplers, and the stages of one, build paths on it),
and a path says which reference it uses in ``reference_source`` (``"N(0, I)"`` or ``"fitted"``).
The pilot's points are counted as target evaluations; NaN or ``+inf`` values it meets are not
counted as run trouble (``num_nan_evals``), since its ascent refuses them. The pilot's draws first
get the method's own first look (:meth:`~diffstat.target.Target.validate`: a bad log-density is
refused with its ``ValueError`` there); any later exception of the log-density during the pilot
keeps :math:`\mathcal N(0, I)` (the run then meets it and reports it as before). Measurements:
``docs/far_reference.md``.
"""

from __future__ import annotations

import torch

from diffstat.mcmc.base import MCMCState
from diffstat.mcmc.pathfinder import mean_covariance
from diffstat.mcmc.start import LAPLACE_MAX_DIM, NEWTON_ITERS, _ascend, _newton, _restart_stragglers

__all__ = [
    "PILOT_DRAWS",
    "PILOT_SEED",
    "REACH",
    "WIDEN",
    "default_reference",
    "decide",
    "pilot_evals",
    "reference_attrs",
    "stages_advice",
]

#: Reference draws climbed by the pilot: enough that a few land in each of a handful of basins,
#: and at most 16 ascents cost a few hundred evaluations on a Gaussian (a tenth of one SMC stage's).
PILOT_DRAWS = 16
#: The pilot's own seed: a fixed derivation, so the decision is the same in every run of a target
#: and the caller's generator is left as it was.
PILOT_SEED = 0xFA2
#: Iterations of the pilot's ascent: a Gaussian's climb from 1000 sds takes about 15, while chains
#: that reach a peak to rounding error have every later step refused (Armijo) and would dither up to
#: the start phase's 200: 50 bounds that waste at 16 x 51 evaluations. A climb still within reach
#: after 50 keeps N(0, I), as before.
ASCENT_ITERS = 50
#: Distance (in sds of N(0, I), pooled with the posterior's, step 3) beyond which N(0, I) is
#: replaced: SMC from N(0, I) needs about 1.2 stages per unit of distance, so at 20 (28 sds for a
#: unit-variance posterior) it already takes 35 stages and 5 times a near target's evaluations,
#: while the test and audit cases that work today lie within 7.1 (corr50; mixtures' modes at 4 to
#: 5, a 3-d posterior of sd 1e-3 at 3.6).
REACH = 20.0
#: The fitted reference is this many times wider than the Laplace fit: tempering needs a reference
#: wider than the posterior, and twice covers tails the curvature at the peak understates at a
#: cost of a few stages (the log-ratio of the widths enters the path length).
WIDEN = 2.0

_ATTR = "_default_reference"


def default_reference(target, device=None) -> torch.distributions.Distribution | None:
    """The reference of a geometric path on ``target`` when none was given: None for N(0, I) (kept,
    the target's ``sample_reference`` draws it), else the fitted ``MultivariateNormal`` on ``device``
    in the target's dtype. Decided by :func:`decide` once per target (cached on it)."""
    info = getattr(target, _ATTR, None)
    if info is None:
        info = decide(target, device)
        try:
            setattr(target, _ATTR, info)
        except AttributeError:  # a target that refuses new attributes decides again next time
            pass
    if info["reference"] != "fitted":
        return None
    device = torch.device("cpu") if device is None else torch.device(device)
    loc = info["loc"].to(device=device, dtype=target.dtype)
    tril = info["scale_tril"].to(device=device, dtype=target.dtype)
    return torch.distributions.MultivariateNormal(loc, scale_tril=tril, validate_args=False)


def decide(target, device=None) -> dict:
    """Run the pilot (module notes) and return its decision: ``reference`` (``"N(0, I)"`` or
    ``"fitted"``), ``distance`` (the nearest peak's, ``nan`` where the pilot found none),
    ``pilot_evals``, and for a fit ``loc`` and ``scale_tril`` (float64, on the CPU)."""
    before = target.num_target_evals
    nan0, posinf0 = target._nan_evals, target._posinf_evals
    device = torch.device("cpu") if device is None else torch.device(device)
    gen = torch.Generator(device=device).manual_seed(PILOT_SEED)
    x = torch.randn(PILOT_DRAWS, target.dim, generator=gen, dtype=target.dtype, device=device)
    # the pilot's draws are the method's first look: a bad log-density is refused here, as it would be there
    target.validate(x, require_support=False)
    try:
        info = _pilot(target, x)
    except Exception:  # noqa: BLE001 - the log-density failed in the pilot: keep N(0, I), the run reports it
        info = {"reference": "N(0, I)", "distance": float("nan")}
    finally:
        target._nan_evals, target._posinf_evals = nan0, posinf0
    info["pilot_evals"] = target.num_target_evals - before
    return info


def _pilot(target, x: torch.Tensor) -> dict:
    """Steps 1 to 4 of the module notes, from the pilot's draws ``x: (PILOT_DRAWS, dim)``."""
    lp, g = target.log_prob_and_grad(x)
    keep = {"reference": "N(0, I)", "distance": float("nan")}
    if not bool(torch.isfinite(lp).any()):
        return keep
    x, lp, g, a_min = _ascend(target.log_prob_and_grad, MCMCState(x, lp, g), ASCENT_ITERS)
    x, lp, g, _ = _restart_stragglers(x, lp, g, a_min)
    ok = torch.isfinite(lp) & torch.isfinite(x).all(-1)
    distance = float(x[ok].double().norm(dim=-1).min())
    if distance <= REACH:
        return keep | {"distance": distance}
    cov = None
    if target.dim <= LAPLACE_MAX_DIM:
        x, lp, g, hess = _newton(target.log_prob_and_grad, x, lp, g, NEWTON_ITERS)
        ok = torch.isfinite(lp) & torch.isfinite(x).all(-1)
        pd = torch.linalg.cholesky_ex(hess.double())[1] == 0
        if bool((pd & ok).any()):
            cov = mean_covariance(hess.double()[pd & ok])
    peaks = x[ok].double()
    eye = torch.eye(target.dim, dtype=torch.float64, device=peaks.device)
    laplace = eye if cov is None else cov
    pooled = torch.linalg.solve(eye + laplace, peaks.T).T
    distance = float((peaks * pooled).sum(-1).clamp_min(0).sqrt().min())
    if distance <= REACH:
        return keep | {"distance": distance}
    spread = torch.cov(peaks.T).reshape(target.dim, target.dim) if peaks.shape[0] > 1 else 0 * eye
    sigma = laplace + torch.nan_to_num(spread)
    chol, info = torch.linalg.cholesky_ex(sigma)
    if int(info):
        chol = torch.linalg.cholesky(sigma + 1e-12 * sigma.diagonal().mean() * eye)
    return {
        "reference": "fitted",
        "distance": distance,
        "loc": peaks.mean(0).cpu(),
        "scale_tril": (WIDEN * chol).cpu(),
    }


def pilot_evals(target) -> int:
    """The target evaluations the default reference's pilot made on ``target`` (0 where none ran)."""
    info = getattr(target, _ATTR, None) or {}
    return int(info.get("pilot_evals", 0))


def reference_attrs(path) -> dict:
    """The attrs a tempering sampler records about its reference: ``reference_source`` (the path's:
    ``"given"``, ``"target"``, ``"prior"``, ``"N(0, I)"`` or ``"fitted"``)
    and ``reference_pilot_evals`` (the target evaluations of the pilot that chose between the last
    two, counted once per target, 0 where none ran)."""
    path.resolve()
    return {"reference_source": path.reference_source, "reference_pilot_evals": pilot_evals(path.target)}


def stages_advice(path) -> str:
    """What to do when tempering along ``path`` runs out of stages: from the default reference
    (N(0, I), or the Gaussian fitted in its place) more stages rarely help, since their number grows
    with the distance from the reference to the posterior; from a reference the user chose, more
    stages or a lower target ESS may."""
    source = getattr(path, "reference_source", None)
    if source in ("N(0, I)", "fitted", "auto"):
        start = "N(0, I)" if source != "fitted" else "a Gaussian fitted to the peaks a pilot found"
        return (
            f"the path starts from the default reference ({start}), which may be far from the "
            "posterior's mass: pass reference= a distribution near the posterior (e.g. a Gaussian "
            "at its mode, wider than it) or standardise the parameters"
        )
    return "raise max_stages or lower target_ess"
