r"""A Pyro model's latent sites and their bijections to unconstrained space.

The structure half of :mod:`diffstat.pyro_target`: what the latent sites of a model are, how each
is mapped to and from :math:`\mathbb{R}^{k}`, and how a site's log-density terms are summed over
a plate of particles. The Target built on it lives in :mod:`diffstat.pyro_target`.

Each latent site :math:`z_s` with support :math:`S_s` is reached from an unconstrained vector by
the bijection :math:`T_s = \mathrm{biject\_to}(S_s)`: ``exp`` for a positive site, stick breaking
for a simplex of ``K`` components (``K - 1`` free coordinates), the tanh stick breaking of
``CorrCholeskyTransform`` for the Cholesky factor of a ``d x d`` correlation matrix
(``d (d - 1) / 2`` free coordinates). :class:`SetLatents` sets every latent site of a model run
to given values, in either space, and records :math:`\log|\det J_{T_s}(u_s)|`.

A draw rounded onto the boundary of its support (an ``LKJCholesky`` draw in float32 whose last
diagonal element is the smallest normal number, a correlation of exactly :math:`\pm 1`) has no
finite unconstrained value: :func:`unconstrain_draw` reports it, so that prior draws are drawn
again rather than handed on as :math:`\pm\infty` (whose image under :math:`T_s` is NaN).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import numpy as np
import pyro
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to

__all__ = [
    "PARTICLES",
    "Site",
    "SetLatents",
    "deterministic_shapes",
    "model_context",
    "off_support",
    "per_particle",
    "trace_sites",
    "unconstrain_draw",
    "sum_over_particles",
]

#: Name of the outer plate over particles (a model site of the same name is refused).
PARTICLES = "_particles"


class Site(NamedTuple):
    """A latent site: its value's shape (batch + event) and its slice of the unconstrained vector.

    ``pad``: singleton dims between the particle dim and the site's own batch dims (plate mode).
    """

    name: str
    shape: tuple[int, ...]
    unconstrained_shape: tuple[int, ...]
    offset: int
    size: int
    pad: int


class SetLatents(Messenger):
    r"""Set each latent site to given values, unconstrained (``u``) or constrained (``z``), and
    record the other space and :math:`\log|\det J_T(u)|`.

    ``batched``: values carry a leading particle dimension, placed at the particle plate's dim.
    The messenger sits outside the particle plate, so ``msg["fn"]`` is already broadcast over
    particles and a support that depends on other latent values (``Uniform(0, a)``) is batched too.
    """

    def __init__(
        self, sites: dict[str, Site], values: dict[str, torch.Tensor], *, constrained: bool, batched: bool
    ):
        super().__init__()
        self.sites, self.values = sites, values
        self.constrained, self.batched = constrained, batched
        self.z: dict[str, torch.Tensor] = {}
        self.u: dict[str, torch.Tensor] = {}
        self.log_det: dict[str, torch.Tensor] = {}
        self.det: dict[str, torch.Tensor] = {}

    def _pyro_post_sample(self, msg) -> None:
        if msg["infer"].get("_deterministic"):
            self.det[msg["name"]] = msg["value"]

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


@contextlib.contextmanager
def model_context(dtype: torch.dtype, device: torch.device, validate: bool):
    """Run a model with torch's default dtype set to ``dtype``, on ``device``.

    Pyro's argument and support validation is off while sampling (``validate=False``): values come
    from bijections, and an overflow must give -inf or NaN, which the kernels reject, not an error.
    """
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        where = torch.device(device) if device.type != "cpu" else contextlib.nullcontext()
        with pyro.validation_enabled(validate), where:
            yield
    finally:
        torch.set_default_dtype(old)


def trace_sites(trace) -> tuple[dict[str, Site], int, int]:
    """From a prior trace: the latent sites, the particle plate's dim and the total unconstrained
    dimension; ``ValueError`` for a reserved name, subsampling, a discrete latent, a latent whose support
    torch cannot map to R^k (positive definite matrices) or no latent."""
    depth, sites, offset = 0, [], 0
    for name, site in trace.nodes.items():
        if site["type"] != "sample":
            continue
        if name == PARTICLES:
            raise ValueError(f"the site name {PARTICLES!r} is reserved for the plate over particles")
        if site_is_subsample(site):
            if site["value"] is not None and site["value"].numel() < site["fn"].size:
                raise ValueError(
                    f"plate {name!r} subsamples its data; the log-density must be exact: no subsample_size"
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
        try:
            bijection = biject_to(fn.support)
        except NotImplementedError as err:  # torch registers no bijection for this support
            raise ValueError(
                f"latent site {name!r} ({type(fn).__name__}) has support {fn.support}, which torch "
                "cannot map to unconstrained coordinates; reparameterise it (a covariance as "
                "LKJCholesky correlations times positive scales, say)"
            ) from err
        u_shape = tuple(bijection.inverse_shape(torch.Size(shape)))
        sites.append((name, shape, u_shape, offset, int(np.prod(u_shape)), len(shape) - fn.event_dim))
        offset += sites[-1][4]
    if not sites:
        raise ValueError("the model has no latent sample site: there is nothing to sample")
    return {s[0]: Site(*s[:5], pad=depth - s[5]) for s in sites}, -(depth + 1), offset


def deterministic_shapes(trace) -> dict[str, tuple[int, ...]]:
    """The shapes of a traced one-point run's ``pyro.deterministic`` sites, by name."""
    return {
        name: tuple(site["value"].shape)
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and site["infer"].get("_deterministic")
    }


def per_particle(value: torch.Tensor, n: int, shape: tuple[int, ...]) -> torch.Tensor | None:
    """A value recorded in a run over ``n`` particles as ``(n, *shape)``: its trailing dims are
    ``shape`` and its leading ones hold the particle dim (or none, for a value that does not depend
    on the latents) among singletons; None where it is not of that form."""
    k = value.dim() - len(shape)
    lead = int(np.prod(value.shape[:k])) if k >= 0 else 0
    if k < 0 or tuple(value.shape[k:]) != shape or lead not in (1, n):
        return None
    return value.reshape((lead,) + shape).expand((n,) + shape)


def unconstrain_draw(trace, sites: dict[str, Site], lead: tuple[int, ...]) -> torch.Tensor:
    """The unconstrained values ``(*lead, dim)`` of a traced prior draw (``lead``: ``(n,)`` for a
    run in the particle plate, ``(1,)`` for a plain run); a row at the boundary of a support in
    floating point has non-finite entries (module docstring)."""
    parts = []
    for site in sites.values():
        node = trace.nodes[site.name]
        u = biject_to(node["fn"].support).inv(node["value"])
        parts.append(u.reshape(lead + (-1,)).expand(lead + (site.size,)))
    return torch.cat(parts, dim=-1)


def sum_over_particles(t, n: int | None, particle_dim: int, name: str, like: torch.Tensor) -> torch.Tensor:
    """Sum a site's term ``t`` over all but the particle dimension, ``(n,)``; over everything if
    ``n`` is None (a plain one-point run). ``like`` gives the dtype and device of a Python number."""
    t = t if torch.is_tensor(t) else torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if n is None:
        return t.sum()
    i = t.dim() + particle_dim
    if i < 0:  # no particle dimension: the same value for every particle
        return t.sum().expand(n)
    if any(s != 1 for s in t.shape[:i]):
        raise ValueError(f"site {name!r} has batch shape {tuple(t.shape)} outside the plate over particles")
    t = t.reshape((t.shape[i], -1)).sum(-1)
    if t.shape[0] not in (1, n):
        raise ValueError(f"site {name!r} does not broadcast over {n} particles (shape {tuple(t.shape)})")
    return t.expand(n)


def off_support(site) -> torch.Tensor:
    """1 where a latent site's value, not NaN, has no finite unconstrained value, else 0
    (batch-shaped): the value lies on the boundary of its bijection's image.

    A finite ``u`` can map onto that boundary in floating point: ``exp`` underflows to 0 or
    overflows to inf (a scale far out in a funnel or its tail), an ordered vector's increment
    ``exp(u_k)`` is below the spacing of the float at its predecessor (equal cutpoints). The
    distributions compute NaN there (``0 / 0`` in ``Normal(mu, 0)``, ``inf - inf`` through the
    inverse of ``OrderedTransform``), which the samplers reject but the run reports as the user's
    NaN. :class:`~diffstat.pyro_target.PyroTarget` makes a NaN log-density at such a point
    ``-inf``: the model cannot be evaluated there, far out in ``u`` (a prior draw there is drawn
    again, :func:`unconstrain_draw`), and its mass is nil. A finite log-density there is kept (a
    distribution that inverts in the floats' range, as posteriordb's ``Pushforward``, gives one);
    a NaN value stays NaN and is reported.
    """
    value, fn = site["value"], site["fn"]
    with torch.no_grad():
        u = biject_to(fn.support).inv(value)
    batch = value.dim() - len(fn.event_shape)

    def per_value(t):
        return t.flatten(batch).any(-1) if t.dim() > batch else t

    bad = per_value(~torch.isfinite(u)) & ~per_value(torch.isnan(value))
    return bad.to(value.dtype if value.is_floating_point() else torch.get_default_dtype())
