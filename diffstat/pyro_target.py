r"""The posterior of a Pyro model as a :class:`~diffstat.target.Target` in unconstrained space.

A Pyro model with latent sites :math:`z_1, \dots, z_S` (each with its own shape and support) and
observed sites :math:`y` is turned into an unnormalised log-density on :math:`\mathbb{R}^{dim}`.
Each site is mapped to an unconstrained vector by the bijection
:math:`T_s = \mathrm{biject\_to}(\mathrm{support}_s)` (:mod:`diffstat.pyro_sites`: the sites,
their bijections and the sums over particles), and the flattened unconstrained values are
concatenated, :math:`u = (u_1, \dots, u_S)`. The density of ``u`` is

.. math::

    \log \tilde\pi(u) = \underbrace{\sum_s \log p(z_s \mid z_{<s})
        + \log\bigl|\det J_{T_s}(u_s)\bigr|}_{\text{log\_prior}(u)}
        + \underbrace{\log p(y \mid z)}_{\text{log\_likelihood}(u)},
    \qquad z_s = T_s(u_s),

whose normalising constant is the model evidence :math:`p(y)`. The first part is the normalised
prior pushed to unconstrained space, the target's ``reference``, so that the tempered path
:math:`\text{prior}^{1-\beta}\,\text{posterior}^{\beta} \propto \text{prior} \cdot
\text{likelihood}^{\beta}`.

Batching over particles, without a Python loop, in one of two ways:

``"plate"``
    The model runs once for ``n`` points inside an outer ``pyro.plate("_particles", n,
    dim=-(K + 1))``, ``K`` the deepest batch dimension of any site, with every latent site set to
    its batch of values (the trick of Pyro's ``vectorize_particles``); each site's ``log_prob``
    (times its ``scale``, with its ``mask``) is summed over all but the particle dimension. This
    needs a model written with plates and right-aligned broadcasting.
``"vmap"``
    The one-point log-density is mapped over the batch with ``torch.func.vmap``. This accepts
    models the plate trick breaks (a vector latent with ``to_event`` used as the location of a
    plated site next to a scalar latent, say). Prior draws then loop over points (only the
    reference draws that start a run; every log-density evaluation stays batched).

By default the plate is tried first and ``vmap`` is the fallback. Either way construction compares
a batched evaluation with one-point runs of the plain model at prior draws, and refuses a model
where they differ (``.item()``, Python control flow on latent values, a reduction over all the
dimensions of a latent value).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample

from diffstat import pyro_checks as checks
from diffstat.pyro_checks import MODES, check_arguments, rows_or_nan
from diffstat.pyro_sites import (
    PARTICLES,
    off_support,
    SetLatents,
    model_context,
    sum_over_particles,
    trace_sites,
    deterministic_shapes,
    per_particle,
    unconstrain_draw,
)
from diffstat.target import Target

__all__ = ["PyroTarget"]

#: Points per model run when converting draws for ``posterior`` (bounds memory; 10^6 draws take
#: 245 runs).
_CHUNK = 4096
#: Times prior draws without a finite unconstrained value are drawn again before the model is
#: refused: a float32 draw lands on a support's boundary with probability of order 1e-4 (an
#: LKJCholesky(3, 0.5) draw), so ten rounds fail only for a prior that puts mass there.
_MAX_REDRAWS = 10
_EMPTY_SHAPE = torch.Size()


class _PyroPrior(torch.distributions.Distribution):
    r"""The model's prior pushed to unconstrained space: a normalised distribution on R^dim.

    ``sample`` runs the prior (Pyro draws from the global RNG, which
    :meth:`Target.sample_reference` seeds from its explicit generator); ``log_prob(u)`` is the
    prior log-density of :math:`T(u)` plus :math:`\log|\det J_T(u)|`.
    """

    arg_constraints: dict = {}
    support = torch.distributions.constraints.real_vector
    has_rsample = False

    def __init__(self, target: PyroTarget):
        self._target = target
        super().__init__(torch.Size(), torch.Size([target.dim]), validate_args=False)

    def sample(self, sample_shape=_EMPTY_SHAPE) -> torch.Tensor:
        shape = torch.Size(sample_shape)
        return self._target.prior_draws(int(np.prod(shape))).reshape(shape + (self._target.dim,))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self._target.log_prior(value.reshape(-1, self._target.dim)).reshape(value.shape[:-1])


class PyroTarget(Target):
    r"""The posterior of a Pyro model, as a density on the unconstrained space R^dim.

    Parameters
    ----------
    model : callable
        A Pyro model; ``model(*model_args, **model_kwargs)`` runs it. Its latent (non-observed)
        ``sample`` sites must be continuous; observed sites, ``pyro.factor`` and
        ``pyro.deterministic`` are allowed; plates may not subsample.
    *model_args, **model_kwargs
        Arguments of the model. Floating-point tensors among them are cast to ``dtype``.
    dtype : torch.dtype, optional
        float32 or float64. Defaults to the promoted dtype of the floating-point tensor arguments,
        else ``torch.get_default_dtype()``. The model runs with it as torch's default dtype, so
        constants it creates (``torch.tensor(1.0)``) share it. Pass the data as arguments: data
        held in a closure keep their own dtype and are not seen when choosing the default.
    vectorize : {"plate", "vmap"}, optional
        How the model is batched over particles (module docstring); by default the plate, with
        ``vmap`` as the fallback.

    Notes
    -----
    ``dtype`` and ``vectorize`` are keywords of the target, not passed on to the model.

    ``dim`` is the total number of unconstrained coordinates; ``sites`` maps each latent site's
    name to its constrained shape and its slice of the vector. ``to_posterior`` reports each site
    by its name, constrained, with shape ``(chain, draw, *site_shape)``.

    Device: the model runs on the device of its tensor arguments (CPU if none). For CUDA, pass
    the model's data already on the device and call the sampler with the same ``device=``;
    factory calls inside the model (``torch.zeros(3)``) are placed there too (the model runs
    under ``with torch.device(device)``).

    Counting: ``log_prob``, ``log_prob_and_grad``, ``log_likelihood`` and
    ``log_prior_and_likelihood`` add ``n`` to ``num_target_evals``; ``log_prior`` (the reference
    density), ``prior_draws``, ``constrain`` and ``unconstrain`` do not.

    Raises ``ValueError`` when the model is not callable, fails with the given arguments, has no
    latent site, has a discrete latent site (enumeration is not supported), subsamples, or cannot
    be evaluated on a batch of particles.
    """

    def __init__(
        self,
        model: Callable,
        *model_args,
        dtype: torch.dtype | None = None,
        vectorize: str | None = None,
        **model_kwargs,
    ):
        arguments = (*model_args, *model_kwargs.values())
        dtype, self.device = check_arguments(model, arguments, dtype, vectorize)

        def cast(a):
            return a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a

        self.model = model
        self.model_args = tuple(cast(a) for a in model_args)
        self.model_kwargs = {k: cast(v) for k, v in model_kwargs.items()}
        self.dtype = dtype
        self.nan_points: torch.Tensor | None = None  # the last few points where the log-density was NaN
        self._find_sites()
        errors = []
        for mode in MODES if vectorize is None else (vectorize,):
            self.vectorize = mode
            try:
                name = getattr(model, "__name__", "model")
                super().__init__(
                    self._log_density, self.dim, name=name, reference=_PyroPrior(self), dtype=dtype
                )
                checks.check_batched(self)
                break
            except Exception as err:  # noqa: BLE001  (any failure of the user's model is reported)
                errors.append(f"{mode}: {type(err).__name__}: {err}")
        else:
            raise ValueError(
                "the model cannot be evaluated on a batch of particles (" + "; ".join(errors) + "). "
                "Write it with plates and broadcasting, without .item() or Python control flow on "
                "latent values"
            )
        self.num_target_evals = 0

    # ------------------------------------------------------------------ model structure
    def _model_context(self, validate: bool):
        """Run the model with torch's default dtype ``self.dtype``, on ``self.device``."""
        return model_context(self.dtype, self.device, validate)

    def _find_sites(self) -> None:
        """Trace the prior at a seeded draw, its log-density computed with validation on
        (:func:`~diffstat.pyro_checks.prior_trace`): the latent sites, their shapes and supports, the
        particle dim, the deterministic sites."""
        trace = checks.prior_trace(self)
        self.sites, self._particle_dim, self.dim = trace_sites(trace)
        self.deterministic = deterministic_shapes(trace)

    def _split(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each site's slice of ``u: (..., dim)``."""
        return {s.name: u[..., s.offset : s.offset + s.size] for s in self.sites.values()}

    def _run(self, values: dict[str, torch.Tensor] | None, *, n: int | None, constrained: bool = False):
        """Trace the model with the latent sites set to ``values`` (prior draws if None): over
        ``n`` particles in the particle plate, or once without it when ``n`` is None."""
        model, args, kwargs = self.model, self.model_args, self.model_kwargs
        if n is not None:

            def model(*args, **kwargs):
                with pyro.plate(PARTICLES, n, dim=self._particle_dim):
                    return self.model(*args, **kwargs)

        setter = SetLatents(self.sites, values or {}, constrained=constrained, batched=n is not None)
        with self._model_context(validate=False):
            trace = poutine.trace(setter(model) if values is not None else model).get_trace(*args, **kwargs)
        return trace, setter

    def _reduce(self, t, n: int | None, name: str) -> torch.Tensor:
        """Sum ``t`` over all but the particle dimension, ``(n,)``; over everything if n is None."""
        like = torch.empty((), dtype=self.dtype, device=self.device)
        return sum_over_particles(t, n, self._particle_dim, name, like)

    def _terms(self, u: torch.Tensor, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log_prior, log_likelihood)`` from one model run at ``u: (n, dim)`` (or ``(dim,)``
        with ``n`` None, a plain one-point run)."""
        trace, setter = self._run(self._split(u), n=n)
        prior = lik = outside = 0.0
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            latent = name in setter.z
            if not latent and not site["is_observed"]:
                raise ValueError(
                    f"latent site {name!r} was not in the prior trace: dynamic structure is not supported"
                )
            lp = self._reduce(
                scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"]), n, name
            )
            if latent:
                prior = prior + lp + self._reduce(setter.log_det[name], n, name)
                outside = outside + self._reduce(off_support(site), n, name)
            else:
                lik = lik + lp
        zero = u.new_zeros(() if n is None else (n,))  # also broadcasts a term without particles
        off = ((outside + zero) > 0) & torch.isnan(prior + lik + zero)  # off_support: NaN -> -inf
        return tuple(torch.where(off, -torch.inf, (t + zero).to(self.dtype)) for t in (prior, lik))

    # ------------------------------------------------------------------ densities
    def _log_terms(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log_prior, log_likelihood)`` at ``u: (n, dim)``, each ``(n,)``, batched."""
        if u.dim() != 2 or u.shape[1] != self.dim:
            raise ValueError(f"points must have shape (n, {self.dim}), got {tuple(u.shape)}")
        if self.vectorize == "plate":  # rows_or_nan: a LinAlgError at one point is NaN there
            terms = rows_or_nan(lambda v: self._terms(v, v.shape[0]), u)
        else:
            terms = rows_or_nan(torch.func.vmap(lambda v: self._terms(v, None)), u)
        if not (u.requires_grad and torch.is_grad_enabled()):
            return terms
        # A term without u (no observed site: likelihood 0) gets a zero gradient, for autograd per term.
        return tuple(t if t.requires_grad else t + (0.0 * u).sum(-1) for t in terms)

    def _log_density(self, u: torch.Tensor) -> torch.Tensor:
        prior, lik = self._log_terms(u)
        return prior + lik

    def count_nan(self, lp: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`Target.count_nan`, keeping the last points where ``lp`` was NaN (``nan_points``), where
        the count rose, on the CPU only (elsewhere that look would cost a host synchronisation)."""
        before = self._nan_evals
        lp = super().count_nan(lp, x)
        if x is not None and lp.dim() == 1 and x.dim() == 2 and lp.device.type == "cpu":
            if int(self._nan_evals) > int(before):
                self.nan_points = checks.keep_nan_points(self.nan_points, lp, x)
        return lp

    def log_prior(self, u: torch.Tensor) -> torch.Tensor:
        r"""Normalised log-density of the prior pushed to unconstrained space at ``u: (n, dim)``,
        ``(n,)``: the latent sites' log-densities plus :math:`\log|\det J_T(u)|` (not counted)."""
        return self._log_terms(u)[0]

    def log_likelihood(self, u: torch.Tensor) -> torch.Tensor:
        r"""Log-likelihood :math:`\log p(y \mid T(u))` of the observed sites, ``(n,)``; counts ``n``."""
        self.num_target_evals += u.shape[0]
        return self.count_nan(self._log_terms(u)[1], u)

    def log_prior_and_likelihood(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both terms from one model run, each ``(n,)`` and differentiable; counts ``n``."""
        self.num_target_evals += u.shape[0]
        prior, lik = self._log_terms(u)
        self.count_nan(prior.detach() + lik.detach(), u)
        return prior, lik

    # ------------------------------------------------------------------ spaces, draws, output
    def prior_draws(self, n: int) -> torch.Tensor:
        """``n`` prior draws in unconstrained space, ``(n, dim)`` (Pyro samples from the global RNG).

        A draw without a finite unconstrained value (rounded onto the boundary of a support, see
        :mod:`diffstat.pyro_sites`) is drawn again, up to ``_MAX_REDRAWS`` times; its image would
        be NaN, which would end a run that starts from it or, for tempering, draws it mid-run.
        ``ValueError`` if draws stay non-finite (a prior with mass on a boundary, or NaN draws).
        """
        u = self._prior_draws(n)
        for _ in range(_MAX_REDRAWS):
            bad = ~torch.isfinite(u).all(-1)
            if not bool(bad.any()):
                return u
            u[bad] = self._prior_draws(int(bad.sum()))
        bad = ~torch.isfinite(u).all(0)
        names = [s.name for s in self.sites.values() if bool(bad[s.offset : s.offset + s.size].any())]
        raise ValueError(
            f"prior draws of latent sites {names} have no finite unconstrained value in {self.dtype} "
            f"after {_MAX_REDRAWS} redraws: the prior puts mass on the boundary of their support "
            "(or draws NaN); use dtype=torch.float64 or a prior inside the support"
        )

    def _prior_draws(self, n: int) -> torch.Tensor:
        """``n`` prior draws ``(n, dim)`` in unconstrained space, possibly non-finite."""
        with torch.no_grad():
            if self.vectorize == "plate":
                u = unconstrain_draw(self._run(None, n=n)[0], self.sites, (n,))
            else:  # vmap cannot draw fresh randomness per point from unbatched parameters
                runs = (self._run(None, n=None)[0] for _ in range(n))
                u = torch.cat([unconstrain_draw(trace, self.sites, (1,)) for trace in runs])
        return u.to(self.dtype).reshape(n, self.dim)

    def _map_sites(self, values, n: int, constrained: bool, outs: tuple[str, ...]) -> tuple[dict, ...]:
        """Run the model once with latents set to ``values``; return the setter's ``outs`` records."""
        with torch.no_grad():
            if self.vectorize == "plate":
                setter = self._run(values, n=n, constrained=constrained)[1]
                return tuple(getattr(setter, out) for out in outs)

            def one(v):
                setter = self._run(v, n=None, constrained=constrained)[1]
                return tuple(getattr(setter, out) for out in outs)

            return torch.func.vmap(one)(values)

    def constrain(self, u: torch.Tensor, *, deterministic: bool = False) -> dict[str, torch.Tensor]:
        """Latent values ``{name: (n, *site_shape)}`` in constrained space from ``u: (n, dim)``; with
        ``deterministic``, the model's ``pyro.deterministic`` sites too, from the same model run (a site
        whose value does not keep one row per point is left out)."""
        n = u.shape[0]
        outs = ("z", "det") if deterministic and self.deterministic else ("z",)
        found = self._map_sites(self._split(u.to(self.dtype)), n, False, outs)
        values = {s.name: found[0][s.name].reshape((n,) + s.shape) for s in self.sites.values()}
        det = found[1] if len(found) > 1 else {}
        per_row = {k: per_particle(det[k], n, shape) for k, shape in self.deterministic.items() if k in det}
        return values | {k: v for k, v in per_row.items() if v is not None}

    def deterministic_values(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's ``pyro.deterministic`` sites ``{name: (n, *site_shape)}`` at ``u: (n, dim)``."""
        values = self.constrain(u, deterministic=True)
        return {k: v for k, v in values.items() if k not in self.sites}

    def unconstrain(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Unconstrained points ``(n, dim)`` from ``{name: (n, *site_shape)}`` in constrained space
        (for example to start chains at given values)."""
        missing = set(self.sites) - set(values)
        if missing:
            raise ValueError(f"values for latent sites {sorted(missing)} are missing")
        values = {k: torch.as_tensor(values[k], dtype=self.dtype, device=self.device) for k in self.sites}
        n = values[next(iter(self.sites))].shape[0]
        for s in self.sites.values():
            if tuple(values[s.name].shape) != (n,) + s.shape:
                raise ValueError(
                    f"site {s.name!r} needs shape {(n,) + s.shape}, got {tuple(values[s.name].shape)}"
                )
        (u,) = self._map_sites(values, n, True, ("u",))
        return torch.cat([u[s.name].reshape(n, s.size) for s in self.sites.values()], dim=1)

    def to_posterior(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """Each latent site by name, constrained, shape ``(chain, draw, *site_shape)``, then each
        ``pyro.deterministic`` site (``theta = mu + tau * eta``, say) alike."""
        chains, draws = x.shape[:2]
        flat = x.detach().reshape(-1, self.dim)
        chunks = [
            self.constrain(flat[i : i + _CHUNK], deterministic=True) for i in range(0, len(flat), _CHUNK)
        ]
        return {
            name: torch.cat([c[name] for c in chunks])
            .reshape((chains, draws) + chunks[0][name].shape[1:])
            .cpu()
            .numpy()
            for name in chunks[0]
        }

    def __repr__(self) -> str:
        sites = ", ".join(f"{s.name}{list(s.shape)}" for s in self.sites.values())
        return f"PyroTarget({self.name}: {sites}; dim={self.dim}, num_target_evals={self.num_target_evals})"
