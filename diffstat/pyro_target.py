r"""The posterior of a Pyro model as a :class:`~diffstat.target.Target` in unconstrained space.

A Pyro model with latent sites :math:`z_1, \dots, z_S` (each with its own shape and support) and
observed sites :math:`y` is turned into an unnormalised log-density on :math:`\mathbb{R}^{dim}`.
Each site is mapped to an unconstrained vector by the bijection
:math:`T_s = \mathrm{biject\_to}(\mathrm{support}_s)` (``exp`` for positive sites, stick breaking
for a simplex of ``K`` components, which then has ``K - 1`` free coordinates), and the flattened
unconstrained values are concatenated, :math:`u = (u_1, \dots, u_S)`. The density of ``u`` is

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

import contextlib
from typing import NamedTuple
from collections.abc import Callable

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to

from diffstat.target import Target

__all__ = ["PyroTarget"]

#: Name of the outer plate over particles (a model site of the same name is refused).
_PARTICLES = "_particles"
#: Prior draws at which construction checks a batched evaluation against one-point runs.
_NUM_CHECK_POINTS = 3
#: Points per model run when converting draws for ``posterior`` (bounds memory; 10^6 draws take
#: 245 runs).
_CHUNK = 4096
_EMPTY_SHAPE = torch.Size()
_MODES = ("plate", "vmap")


class _Site(NamedTuple):
    """A latent site: its value's shape (batch + event) and its slice of the unconstrained vector."""

    name: str
    shape: tuple[int, ...]
    unconstrained_shape: tuple[int, ...]
    offset: int
    size: int
    pad: int  # singleton dims between the particle dim and the site's own batch dims (plate mode)


class _SetLatents(Messenger):
    """Set each latent site to given values, unconstrained (``u``) or constrained (``z``), and
    record the other space and :math:`\\log|\\det J_T(u)|`.

    ``batched``: values carry a leading particle dimension, placed at the particle plate's dim.
    The messenger sits outside the particle plate, so ``msg["fn"]`` is already broadcast over
    particles and a support that depends on other latent values (``Uniform(0, a)``) is batched too.
    """

    def __init__(
        self, sites: dict[str, _Site], values: dict[str, torch.Tensor], *, constrained: bool, batched: bool
    ):
        super().__init__()
        self.sites, self.values = sites, values
        self.constrained, self.batched = constrained, batched
        self.z: dict[str, torch.Tensor] = {}
        self.u: dict[str, torch.Tensor] = {}
        self.log_det: dict[str, torch.Tensor] = {}

    def _pyro_sample(self, msg) -> None:
        site = self.sites.get(msg["name"])
        if site is None or msg["is_observed"]:
            return
        transform = biject_to(msg["fn"].support)
        value = self.values[site.name]
        lead = (value.shape[0],) + (1,) * site.pad if self.batched else ()
        if self.constrained:
            z = value.reshape(lead + site.shape)
            u = transform.inv(z)
        else:
            u = value.reshape(lead + site.unconstrained_shape)
            z = transform(u)
        self.z[site.name], self.u[site.name] = z, u
        self.log_det[site.name] = transform.log_abs_det_jacobian(u, z)
        msg["value"] = z


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
        if not callable(model):
            raise ValueError(f"model must be a callable Pyro model, got {type(model).__name__}")
        if vectorize is not None and vectorize not in _MODES:
            raise ValueError(f"vectorize must be one of {_MODES} or None, got {vectorize!r}")
        arguments = (*model_args, *model_kwargs.values())
        if dtype is None:
            dtype = torch.get_default_dtype()
            floats = [a.dtype for a in arguments if torch.is_tensor(a) and a.is_floating_point()]
            for i, a in enumerate(floats):
                dtype = a if i == 0 else torch.promote_types(dtype, a)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        devices = {a.device for a in arguments if torch.is_tensor(a)}
        if len(devices) > 1:
            raise ValueError(
                f"the model's tensor arguments lie on several devices: {sorted(map(str, devices))}"
            )
        self.device = devices.pop() if devices else torch.device("cpu")

        def cast(a):
            return a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a

        self.model = model
        self.model_args = tuple(cast(a) for a in model_args)
        self.model_kwargs = {k: cast(v) for k, v in model_kwargs.items()}
        self.dtype = dtype
        self._find_sites()
        errors = []
        for mode in _MODES if vectorize is None else (vectorize,):
            self.vectorize = mode
            try:
                name = getattr(model, "__name__", "model")
                super().__init__(
                    self._log_density, self.dim, name=name, reference=_PyroPrior(self), dtype=dtype
                )
                self._check_batched()
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
    @contextlib.contextmanager
    def _model_context(self, validate: bool):
        """Run the model with torch's default dtype set to ``self.dtype``, on ``self.device``.

        Pyro's argument and support validation is off while sampling: values come from
        bijections, and an overflow must give -inf or NaN, which the kernels reject, not an error.
        """
        old = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            device = torch.device(self.device) if self.device.type != "cpu" else contextlib.nullcontext()
            with pyro.validation_enabled(validate), device:
                yield
        finally:
            torch.set_default_dtype(old)

    def _find_sites(self) -> None:
        """Trace the prior once: latent sites, their shapes and supports, the particle dim."""
        try:
            with self._model_context(validate=True), torch.no_grad():
                trace = poutine.trace(self.model).get_trace(*self.model_args, **self.model_kwargs)
        except Exception as err:  # noqa: BLE001  (any failure of the user's model is a bad argument)
            raise ValueError(
                f"running the model with the given arguments failed: {type(err).__name__}: {err}"
            ) from err
        depth, sites, offset = 0, [], 0
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            if name == _PARTICLES:
                raise ValueError(f"the site name {_PARTICLES!r} is reserved for the plate over particles")
            if site_is_subsample(site):
                if site["value"] is not None and site["value"].numel() < site["fn"].size:
                    raise ValueError(
                        f"plate {name!r} subsamples its data; "
                        "the log-density must be exact: no subsample_size"
                    )
                continue
            fn, value = site["fn"], site["value"]
            plate_dims = [-f.dim for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None]
            depth = max([depth, len(fn.batch_shape), value.dim() - fn.event_dim] + plate_dims)
            if site["is_observed"]:
                continue
            if fn.support.is_discrete or site["infer"].get("enumerate"):
                raise ValueError(
                    f"latent site {name!r} is discrete ({type(fn).__name__}): diffstat samples continuous "
                    "latent sites only; marginalise it out of the model (enumeration is not supported)"
                )
            shape = tuple(value.shape)
            u_shape = tuple(biject_to(fn.support).inverse_shape(torch.Size(shape)))
            sites.append((name, shape, u_shape, offset, int(np.prod(u_shape)), len(shape) - fn.event_dim))
            offset += sites[-1][4]
        if not sites:
            raise ValueError("the model has no latent sample site: there is nothing to sample")
        self._particle_dim = -(depth + 1)
        self.sites = {s[0]: _Site(*s[:5], pad=depth - s[5]) for s in sites}
        self.dim = offset

    def _split(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each site's slice of ``u: (..., dim)``."""
        return {s.name: u[..., s.offset : s.offset + s.size] for s in self.sites.values()}

    def _run(self, values: dict[str, torch.Tensor] | None, *, n: int | None, constrained: bool = False):
        """Trace the model with the latent sites set to ``values`` (prior draws if None): over
        ``n`` particles in the particle plate, or once without it when ``n`` is None."""
        model, args, kwargs = self.model, self.model_args, self.model_kwargs
        if n is not None:

            def model(*args, **kwargs):
                with pyro.plate(_PARTICLES, n, dim=self._particle_dim):
                    return self.model(*args, **kwargs)

        setter = _SetLatents(self.sites, values or {}, constrained=constrained, batched=n is not None)
        with self._model_context(validate=False):
            trace = poutine.trace(setter(model) if values is not None else model).get_trace(*args, **kwargs)
        return trace, setter

    def _reduce(self, t, n: int | None, name: str) -> torch.Tensor:
        """Sum ``t`` over all but the particle dimension, ``(n,)``; over everything if n is None."""
        t = t if torch.is_tensor(t) else torch.as_tensor(t, dtype=self.dtype, device=self.device)
        if n is None:
            return t.sum()
        i = t.dim() + self._particle_dim
        if i < 0:  # no particle dimension: the same value for every particle
            return t.sum().expand(n)
        if any(s != 1 for s in t.shape[:i]):
            raise ValueError(
                f"site {name!r} has batch shape {tuple(t.shape)} outside the plate over particles"
            )
        t = t.reshape((t.shape[i], -1)).sum(-1)
        if t.shape[0] not in (1, n):
            raise ValueError(f"site {name!r} does not broadcast over {n} particles (shape {tuple(t.shape)})")
        return t.expand(n)

    def _terms(self, u: torch.Tensor, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log_prior, log_likelihood)`` from one model run at ``u: (n, dim)`` (or ``(dim,)``
        with ``n`` None, a plain one-point run)."""
        trace, setter = self._run(self._split(u), n=n)
        prior = lik = 0.0
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
            else:
                lik = lik + lp
        zero = u.new_zeros(() if n is None else (n,))  # also broadcasts a term without particles
        return (prior + zero).to(self.dtype), (lik + zero).to(self.dtype)

    # ------------------------------------------------------------------ densities
    def _log_terms(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log_prior, log_likelihood)`` at ``u: (n, dim)``, each ``(n,)``, batched."""
        if u.dim() != 2 or u.shape[1] != self.dim:
            raise ValueError(f"points must have shape (n, {self.dim}), got {tuple(u.shape)}")
        if self.vectorize == "plate":
            return self._terms(u, u.shape[0])
        return torch.func.vmap(lambda v: self._terms(v, None))(u)

    def _log_density(self, u: torch.Tensor) -> torch.Tensor:
        prior, lik = self._log_terms(u)
        return prior + lik

    def log_prior(self, u: torch.Tensor) -> torch.Tensor:
        r"""Normalised log-density of the prior pushed to unconstrained space at ``u: (n, dim)``,
        ``(n,)``: the latent sites' log-densities plus :math:`\log|\det J_T(u)|` (not counted)."""
        return self._log_terms(u)[0]

    def log_likelihood(self, u: torch.Tensor) -> torch.Tensor:
        r"""Log-likelihood :math:`\log p(y \mid T(u))` of the observed sites, ``(n,)``; counts ``n``."""
        self.num_target_evals += u.shape[0]
        return self._log_terms(u)[1]

    def log_prior_and_likelihood(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both terms from one model run, each ``(n,)`` and differentiable; counts ``n``."""
        self.num_target_evals += u.shape[0]
        return self._log_terms(u)

    # ------------------------------------------------------------------ spaces, draws, output
    def prior_draws(self, n: int) -> torch.Tensor:
        """``n`` prior draws in unconstrained space, ``(n, dim)`` (Pyro samples from the global RNG)."""
        with torch.no_grad():
            if self.vectorize == "plate":
                trace, _ = self._run(None, n=n)
                nodes, lead = [trace.nodes], (n,)
            else:  # vmap cannot draw fresh randomness per point from unbatched parameters
                nodes, lead = [self._run(None, n=None)[0].nodes for _ in range(n)], (1,)
            parts = []
            for site in self.sites.values():
                us = []
                for node in (t[site.name] for t in nodes):
                    u = biject_to(node["fn"].support).inv(node["value"])
                    us.append(u.reshape(lead + (-1,)).expand(lead + (site.size,)))
                parts.append(torch.cat(us))
        return torch.cat(parts, dim=1).to(self.dtype).reshape(n, self.dim)

    def _map_sites(self, values, n: int, constrained: bool, out: str) -> dict[str, torch.Tensor]:
        """Run the model with latents set to ``values``; return the setter's ``out`` space."""
        with torch.no_grad():
            if self.vectorize == "plate":
                return getattr(self._run(values, n=n, constrained=constrained)[1], out)

            def one(v):
                return getattr(self._run(v, n=None, constrained=constrained)[1], out)

            return torch.func.vmap(one)(values)

    def constrain(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """Latent values ``{name: (n, *site_shape)}`` in constrained space from ``u: (n, dim)``."""
        n = u.shape[0]
        z = self._map_sites(self._split(u.to(self.dtype)), n, False, "z")
        return {s.name: z[s.name].reshape((n,) + s.shape) for s in self.sites.values()}

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
        u = self._map_sites(values, n, True, "u")
        return torch.cat([u[s.name].reshape(n, s.size) for s in self.sites.values()], dim=1)

    def to_posterior(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """Each latent site by name, constrained, shape ``(chain, draw, *site_shape)``."""
        chains, draws = x.shape[:2]
        flat = x.detach().reshape(-1, self.dim)
        chunks = [self.constrain(flat[i : i + _CHUNK]) for i in range(0, flat.shape[0], _CHUNK)]
        return {
            s.name: torch.cat([c[s.name] for c in chunks]).reshape((chains, draws) + s.shape).cpu().numpy()
            for s in self.sites.values()
        }

    def _check_batched(self) -> None:
        """Compare a batched evaluation at prior draws with one-point runs of the plain model."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(1)
            u = self.prior_draws(_NUM_CHECK_POINTS)
        with torch.no_grad():
            batched = self._log_density(u)
            single = torch.stack([sum(self._terms(v, None)) for v in u])
        tol = 1e-4 if self.dtype == torch.float32 else 1e-9
        if not torch.allclose(batched, single, rtol=tol, atol=tol, equal_nan=True):
            raise ValueError(
                f"the model is not vectorised over particles: its log-density at a batch of points "
                f"{batched.tolist()} differs from the same points one at a time {single.tolist()}"
            )

    def __repr__(self) -> str:
        sites = ", ".join(f"{s.name}{list(s.shape)}" for s in self.sites.values())
        return f"PyroTarget({self.name}: {sites}; dim={self.dim}, num_target_evals={self.num_target_evals})"
