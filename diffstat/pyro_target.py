r"""The posterior of a Pyro model as a :class:`~diffstat.target.Target` in unconstrained space.

A Pyro model with latent sites :math:`z_1, \dots, z_S` (each with its own shape and support) and
observed sites :math:`y` is turned into an unnormalised log-density on :math:`\mathbb{R}^{dim}`.
Each site is mapped to an unconstrained vector by the bijection
:math:`T_s = \mathrm{biject\_to}(\mathrm{support}_s)` (``exp`` for positive sites, stick breaking
for a simplex of ``K`` components, which then has ``K - 1`` free coordinates), and the flattened
unconstrained values are concatenated, ``u = (u_1, \dots, u_S)``. The density of ``u`` is

.. math::

    \log \tilde\pi(u) = \underbrace{\sum_s \log p(z_s \mid z_{<s})
        + \log\bigl|\det J_{T_s}(u_s)\bigr|}_{\text{log\_prior}(u)}
        + \underbrace{\log p(y \mid z)}_{\text{log\_likelihood}(u)},
    \qquad z_s = T_s(u_s),

whose normalising constant is the model evidence :math:`p(y)`. The first part is the prior pushed
to unconstrained space, the target's ``reference``, so that the tempered path
:math:`\text{prior}^{1-\beta}\,\text{posterior}^{\beta} \propto \text{prior} \cdot
\text{likelihood}^{\beta}`.

Batching over particles: the model runs once for ``n`` points, inside an outer
``pyro.plate("_particles", n, dim=-(K + 1))`` where ``K`` is the deepest batch dimension any site
uses, with every latent site set to its batch of values (the trick of Pyro's
``vectorize_particles``). Each site's ``log_prob`` (times its ``scale``, with its ``mask``) is
summed over all but the particle dimension. The model must therefore be written with plates and
broadcasting (no ``.item()``, no Python control flow on latent values, no reduction over all
dimensions of a latent value); construction checks this by comparing a batched evaluation with
one-point evaluations and refuses a model where they differ.
"""

from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple

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
#: Prior draws used to check at construction that the model is vectorised over particles.
_NUM_CHECK_POINTS = 3
#: Points per model run when converting draws to the posterior (bounds memory, not a loop over
#: particles: 10^6 draws take 250 runs).
_CHUNK = 4096


class _Site(NamedTuple):
    """A latent site: its value's shape (batch + event) and its slice of the unconstrained vector."""

    name: str
    shape: tuple[int, ...]
    unconstrained_shape: tuple[int, ...]
    offset: int
    size: int
    pad: int  # singleton dims between the particle dim and the site's own batch dims


class _SetLatents(Messenger):
    """A Pyro messenger setting each latent site to a batch of values, given in unconstrained
    space (``u``) or in constrained space (``z``), and recording the other space and log|J|.

    It sits outside the particle plate, so each site's ``fn`` is already broadcast over particles
    and a support that depends on other latent values is batched too.
    """

    def __init__(self, sites: dict[str, _Site], values: dict[str, torch.Tensor], constrained: bool):
        super().__init__()
        self.sites, self.values, self.constrained = sites, values, constrained
        self.z: dict[str, torch.Tensor] = {}
        self.u: dict[str, torch.Tensor] = {}
        self.log_det: dict[str, torch.Tensor] = {}

    def _pyro_sample(self, msg) -> None:
        site = self.sites.get(msg["name"])
        if site is None or msg["is_observed"]:
            return
        transform = biject_to(msg["fn"].support)
        value = self.values[site.name]
        n = value.shape[0]
        if self.constrained:
            z = value.reshape((n,) + (1,) * site.pad + site.shape)
            u = transform.inv(z)
        else:
            u = value.reshape((n,) + (1,) * site.pad + site.unconstrained_shape)
            z = transform(u)
        self.z[site.name], self.u[site.name] = z, u
        self.log_det[site.name] = transform.log_abs_det_jacobian(u, z)
        msg["value"] = z


class _PyroPrior(torch.distributions.Distribution):
    r"""The model's prior pushed to unconstrained space: a distribution on R^dim.

    ``sample`` runs the prior once for all draws (Pyro draws from the global RNG, which
    :meth:`Target.sample_reference` seeds from its explicit generator); ``log_prob(u)`` is the
    prior log-density of :math:`T(u)` plus :math:`\log|\det J_T(u)|` (normalised).
    """

    arg_constraints: dict = {}
    support = torch.distributions.constraints.real_vector
    has_rsample = False

    def __init__(self, target: "PyroTarget"):
        self._target = target
        super().__init__(torch.Size(), torch.Size([target.dim]), validate_args=False)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = torch.Size(sample_shape)
        u = self._target.prior_draws(max(int(np.prod(shape)), 1))
        return u[: int(np.prod(shape))].reshape(shape + (self._target.dim,))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        flat = value.reshape(-1, self._target.dim)
        return self._target.log_prior(flat).reshape(value.shape[:-1])


class PyroTarget(Target):
    r"""The posterior of a Pyro model, as a density on the unconstrained space R^dim.

    Parameters
    ----------
    model : callable
        A Pyro model; ``model(*model_args, **model_kwargs)`` runs it. Its latent (non-observed)
        ``sample`` sites must be continuous; observed sites, ``pyro.factor`` and
        ``pyro.deterministic`` are allowed. Plates may not subsample.
    *model_args, **model_kwargs
        Arguments of the model. Floating-point tensors among them are cast to ``dtype``.
    dtype : torch.dtype, optional
        float32 or float64. Defaults to the promoted dtype of the floating-point tensor arguments,
        else ``torch.get_default_dtype()``. The model runs with this as torch's default dtype, so
        constants it creates (``torch.tensor(1.0)``) share it. (``dtype`` is therefore not
        passed on to the model.)

    Notes
    -----
    ``dim`` is the total number of unconstrained coordinates; ``sites`` lists each latent site's
    name, constrained shape and slice of the vector. ``to_posterior`` reports each site by its name
    in constrained space with shape ``(chain, draw, *site_shape)``.

    Device: the model runs on the device of its tensor arguments (CPU if none). For CUDA, pass the
    model's data already on the device; factory calls inside the model (``torch.zeros(3)``) are
    then placed on that device too (the model runs under ``with torch.device(device)``), and the
    sampler must be called with the same ``device=``.

    Counting: ``log_prob``, ``log_prob_and_grad``, ``log_likelihood`` and
    ``log_prior_and_likelihood`` add ``n`` to ``num_target_evals``; ``log_prior`` (the reference
    density), ``prior_draws``, ``constrain`` and ``unconstrain`` do not.

    Raises ``ValueError`` when the model is not callable, fails with the given arguments, has no
    latent site, has a discrete latent site (enumeration is not supported), subsamples, or is not
    vectorised over particles.
    """

    def __init__(self, model: Callable, *model_args, dtype: torch.dtype | None = None, **model_kwargs):
        if not callable(model):
            raise ValueError(f"model must be a callable Pyro model, got {type(model).__name__}")
        floats = [a for a in (*model_args, *model_kwargs.values()) if torch.is_tensor(a) and a.is_floating_point()]
        if dtype is None:
            dtype = torch.get_default_dtype()
            if floats:
                dtype = floats[0].dtype
                for a in floats[1:]:
                    dtype = torch.promote_types(dtype, a.dtype)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        tensors = [a for a in (*model_args, *model_kwargs.values()) if torch.is_tensor(a)]
        self.device = tensors[0].device if tensors else torch.device("cpu")
        if any(t.device != self.device for t in tensors):
            raise ValueError(f"model tensor arguments lie on several devices: {sorted({str(t.device) for t in tensors})}")

        def cast(a):
            return a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a

        self.model = model
        self.model_args = tuple(cast(a) for a in model_args)
        self.model_kwargs = {k: cast(v) for k, v in model_kwargs.items()}
        self.dtype = dtype
        self._find_sites()
        name = getattr(model, "__name__", "model")
        try:
            super().__init__(self._log_density, self.dim, name=name, reference=_PyroPrior(self), dtype=dtype)
            self._check_vectorised()
        except ValueError:
            raise
        except Exception as err:  # shapes that do not broadcast over the plate of particles
            raise ValueError(
                f"the model fails on a batch of particles ({type(err).__name__}: {err}); it must be "
                "vectorised: use plates and broadcasting, and align a scalar latent with a vector one "
                "by indexing from the right (e.g. s[..., None])"
            ) from err
        self.num_target_evals = 0

    # ------------------------------------------------------------------ model structure
    @contextlib.contextmanager
    def _model_context(self, validate: bool):
        """Run the model with torch's default dtype = ``self.dtype``, on ``self.device``.

        Pyro's argument and support validation is off while sampling (values come from
        bijections; an overflow must give -inf or NaN, which the kernels reject, not an error).
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
        except Exception as err:  # any failure of the user's model is a bad argument
            raise ValueError(f"running the model with the given arguments failed: {type(err).__name__}: {err}") from err
        depth, sites, offset = 0, [], 0
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            if name == _PARTICLES:
                raise ValueError(f"the site name {_PARTICLES!r} is reserved for the plate over particles")
            if site_is_subsample(site):
                if site["value"] is not None and site["value"].numel() < site["fn"].size:
                    raise ValueError(f"plate {name!r} subsamples its data; the log-density must be exact: use the full plate")
                continue
            fn, value = site["fn"], site["value"]
            depth = max(depth, len(fn.batch_shape), value.dim() - fn.event_dim)
            depth = max([depth] + [-f.dim for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None])
            if site["is_observed"]:
                continue
            if fn.support.is_discrete or site["infer"].get("enumerate"):
                raise ValueError(
                    f"latent site {name!r} is discrete ({type(fn).__name__}): diffstat samples continuous "
                    "latent sites only; marginalise it out of the model (enumeration is not supported)"
                )
            shape = tuple(value.shape)
            u_shape = tuple(biject_to(fn.support).inverse_shape(torch.Size(shape)))
            size = int(np.prod(u_shape))
            sites.append((name, shape, u_shape, offset, size, len(shape) - fn.event_dim))
            offset += size
        if not sites:
            raise ValueError("the model has no latent sample site: there is nothing to sample")
        self._depth = depth
        self._particle_dim = -(depth + 1)
        self.sites = {s[0]: _Site(*s[:5], pad=depth - s[5]) for s in sites}
        self.dim = offset

    def _run(self, values: dict[str, torch.Tensor] | None, n: int, constrained: bool = False):
        """Trace the model once for ``n`` particles, the latent sites set to ``values`` (or drawn
        from the prior when ``values`` is None); return the trace and the messenger."""
        def vectorised():
            with pyro.plate(_PARTICLES, n, dim=self._particle_dim):
                return self.model(*self.model_args, **self.model_kwargs)

        setter = _SetLatents(self.sites, values or {}, constrained)
        with self._model_context(validate=False):
            trace = poutine.trace(setter(vectorised) if values is not None else vectorised).get_trace()
        return trace, setter

    def _per_particle(self, t: torch.Tensor, n: int, name: str) -> torch.Tensor:
        """Sum ``t`` over all but the particle dimension: shape ``(n,)``."""
        t = torch.as_tensor(t, dtype=self.dtype, device=self.device) if not torch.is_tensor(t) else t
        i = t.dim() + self._particle_dim
        if i < 0:  # no particle dimension: the same value for every particle
            return t.sum().expand(n)
        if any(s != 1 for s in t.shape[:i]):
            raise ValueError(f"site {name!r} has batch shape {tuple(t.shape)} outside the plate over particles")
        t = t.reshape((t.shape[i], -1)).sum(-1)
        if t.shape[0] not in (1, n):
            raise ValueError(f"site {name!r} does not broadcast over {n} particles (shape {tuple(t.shape)})")
        return t.expand(n)

    # ------------------------------------------------------------------ densities
    def _split(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        return {s.name: u[:, s.offset : s.offset + s.size] for s in self.sites.values()}

    def _log_terms(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log_prior, log_likelihood)`` at ``u: (n, dim)``, each ``(n,)``, in one model run."""
        if u.dim() != 2 or u.shape[1] != self.dim:
            raise ValueError(f"points must have shape (n, {self.dim}), got {tuple(u.shape)}")
        n = u.shape[0]
        trace, setter = self._run(self._split(u), n)
        prior = u.new_zeros(n)
        lik = u.new_zeros(n)
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            latent = name in self.sites and name in setter.z
            if not latent and not site["is_observed"]:
                raise ValueError(f"latent site {name!r} was not in the prior trace: dynamic model structure is not supported")
            lp = scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"])
            lp = self._per_particle(lp, n, name)
            if latent:
                prior = prior + lp + self._per_particle(setter.log_det[name], n, name)
            else:
                lik = lik + lp
        return prior, lik

    def _log_density(self, u: torch.Tensor) -> torch.Tensor:
        prior, lik = self._log_terms(u)
        return prior + lik

    def log_prior(self, u: torch.Tensor) -> torch.Tensor:
        r"""Normalised log-density of the prior pushed to unconstrained space, ``(n,)``: the
        latent sites' log-densities plus :math:`\log|\det J_T(u)|` (not counted)."""
        return self._log_terms(u)[0]

    def log_likelihood(self, u: torch.Tensor) -> torch.Tensor:
        r"""Log-likelihood :math:`\log p(y \mid T(u))` of the observed sites, ``(n,)``; counts ``n``."""
        self.num_target_evals += u.shape[0]
        return self._log_terms(u)[1]

    def log_prior_and_likelihood(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both terms from one model run, each ``(n,)`` (differentiable); counts ``n``."""
        self.num_target_evals += u.shape[0]
        return self._log_terms(u)

    # ------------------------------------------------------------------ spaces, draws, output
    def prior_draws(self, n: int) -> torch.Tensor:
        """``n`` prior draws in unconstrained space, ``(n, dim)``, from one model run (global RNG)."""
        with torch.no_grad():
            trace, _ = self._run(None, n)
            parts = []
            for site in self.sites.values():
                node = trace.nodes[site.name]
                u = biject_to(node["fn"].support).inv(node["value"])
                parts.append(u.expand((n,) + (1,) * site.pad + site.unconstrained_shape).reshape(n, site.size))
        return torch.cat(parts, dim=1).to(self.dtype)

    def constrain(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """Latent values ``{name: (n, *site_shape)}`` in constrained space from ``u: (n, dim)``."""
        with torch.no_grad():
            _, setter = self._run(self._split(u), u.shape[0])
        return {s.name: setter.z[s.name].reshape((u.shape[0],) + s.shape) for s in self.sites.values()}

    def unconstrain(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Unconstrained points ``(n, dim)`` from ``{name: (n, *site_shape)}`` in constrained space."""
        missing = set(self.sites) - set(values)
        if missing:
            raise ValueError(f"values for latent sites {sorted(missing)} are missing")
        values = {k: torch.as_tensor(values[k], dtype=self.dtype, device=self.device) for k in self.sites}
        n = next(iter(values.values())).shape[0]
        for s in self.sites.values():
            if tuple(values[s.name].shape) != (n,) + s.shape:
                raise ValueError(f"site {s.name!r} needs shape {(n,) + s.shape}, got {tuple(values[s.name].shape)}")
        with torch.no_grad():
            _, setter = self._run(values, n, constrained=True)
        return torch.cat([setter.u[s.name].reshape(n, s.size) for s in self.sites.values()], dim=1)

    def to_posterior(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """Each latent site by name, constrained, shape ``(chain, draw, *site_shape)``."""
        chains, draws = x.shape[:2]
        flat = x.detach().reshape(-1, self.dim).to(self.dtype)
        chunks = [self.constrain(flat[i : i + _CHUNK]) for i in range(0, flat.shape[0], _CHUNK)]
        return {
            s.name: torch.cat([c[s.name] for c in chunks]).reshape((chains, draws) + s.shape).cpu().numpy()
            for s in self.sites.values()
        }

    def _check_vectorised(self) -> None:
        """Compare one batched evaluation at prior draws with one-point evaluations."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(1)
            u = self.prior_draws(_NUM_CHECK_POINTS)
        with torch.no_grad():
            batched = self._log_density(u)
            single = torch.cat([self._log_density(u[i : i + 1]) for i in range(_NUM_CHECK_POINTS)])
        tol = 1e-4 if self.dtype == torch.float32 else 1e-9
        if not torch.allclose(batched, single, rtol=tol, atol=tol, equal_nan=True):
            raise ValueError(
                "the model is not vectorised over particles: its log-density at a batch of points "
                f"({batched.tolist()}) differs from the same points one at a time ({single.tolist()}); "
                "use plates and broadcasting, and do not reduce a latent value over all its dimensions"
            )

    def __repr__(self) -> str:
        sites = ", ".join(f"{s.name}{list(s.shape)}" for s in self.sites.values())
        return f"PyroTarget({self.name}: {sites}; dim={self.dim}, num_target_evals={self.num_target_evals})"
