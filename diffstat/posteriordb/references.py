r"""The references of the posteriordb ports' flat and ordered parameters (:mod:`diffstat.posteriordb.models`).

A parameter that is flat in Stan is drawn from a wide proper reference :math:`\rho` with a factor
:math:`-\log\rho` that makes the joint Stan's (see that module). The reference is a normal pushed
through ``biject_to(support)``; its log-density at a constrained value inverts that map, and the
inverse here keeps the argument of each log inside the floats' range, so that the site and its
factor cancel where a far unconstrained point was rounded onto the support's boundary or to
infinity (otherwise both are infinite and the joint NaN).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import OrderedTransform
from torch.distributions import biject_to
from torch.distributions.transforms import ComposeTransform, ExpTransform

__all__ = ["Pushforward", "flat"]


class Pushforward(dist.TransformedDistribution):
    """``biject_to(support)`` of ``base``, reporting ``support`` itself as its support.

    (Pyro's ``TransformedDistribution`` reports the codomain of the last part of the transform:
    ``biject_to(positive)`` is exp then an affine map, whose codomain is the real line, so the
    site would be sampled unconstrained on its own scale.)"""

    def __init__(self, base, support, validate_args=None):
        self._constraint = support
        super().__init__(base, [biject_to(support)], validate_args=validate_args)

    @property
    def support(self):
        return self._constraint

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(Pushforward, _instance)
        new._constraint = self._constraint
        return super().expand(batch_shape, _instance=new)

    def log_prob(self, value):
        """``TransformedDistribution.log_prob`` with each inverse taken in the floats' range
        (:func:`_inverse_in_range`): finite wherever ``value`` is a finite or infinite float, and
        equal to the parent's (to rounding) wherever that is finite. The flat factor subtracts the
        same value, so the pair cancels even where the constrained value was rounded onto the
        support's boundary (an ordered gap below the float spacing) or overflowed, where the parent
        gives NaN."""
        event_dim, out, y = len(self.event_shape), 0.0, value
        for transform in reversed(list(_parts(self.transforms))):
            x = _inverse_in_range(transform, y)
            event_dim += transform.domain.event_dim - transform.codomain.event_dim
            out = out - _sum_rightmost(
                transform.log_abs_det_jacobian(x, y), event_dim - transform.domain.event_dim
            )
            y = x
        return out + _sum_rightmost(self.base_dist.log_prob(y), event_dim - len(self.base_dist.event_shape))


def _sum_rightmost(t: torch.Tensor, dims: int) -> torch.Tensor:
    return t.reshape(t.shape[: t.dim() - dims] + (-1,)).sum(-1) if dims > 0 else t


def _parts(transforms):
    """The transforms of a list, with every ``ComposeTransform`` flattened into its parts."""
    for t in transforms:
        if isinstance(t, ComposeTransform):
            yield from _parts(t.parts)
        else:
            yield t


def _inverse_in_range(transform, y: torch.Tensor) -> torch.Tensor:
    """``transform.inv(y)``, with the argument of each log held in ``[tiny, max]`` of ``y``'s dtype
    for the two transforms that take one (``exp``; ``ordered``, the log of each gap): finite at
    ``y`` = 0, inf or a zero gap, unchanged wherever the plain inverse is finite, and with a zero
    (not NaN) gradient where held."""
    info = torch.finfo(y.dtype)
    if isinstance(transform, ExpTransform):
        return y.clamp(info.tiny, info.max).log()
    if isinstance(transform, OrderedTransform):
        y = y.clamp(-info.max / 2, info.max / 2)  # a gap of two held values stays finite
        return torch.cat([y[..., :1], (y[..., 1:] - y[..., :-1]).clamp_min(info.tiny).log()], -1)
    return transform.inv(y)


def flat(name: str, loc: torch.Tensor, scale: torch.Tensor, support=constraints.real, event_dim: int = 0):
    r"""A parameter with Stan's flat prior on ``support``: drawn from the reference
    :math:`\rho = T_\# \mathcal N(loc, scale^2)`, ``T = biject_to(support)``, with the factor
    :math:`-\log\rho(z)` that makes its prior density constant."""
    base = dist.Normal(loc, scale)
    base = base.to_event(event_dim) if event_dim else base
    ref = base if support is constraints.real else Pushforward(base, support)
    z = pyro.sample(name, ref)
    pyro.factor(f"{name}_flat", -ref.log_prob(z))
    return z
