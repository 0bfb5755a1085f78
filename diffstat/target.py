"""The target: an unnormalised log-density on R^dim, batched, counted and validated.

Every sampler in diffstat is driven by a :class:`Target`. It wraps a torch callable
``log_prob: (n, dim) -> (n,)``, gives its gradient by autograd, counts every point at which the
log-density (or its gradient) is evaluated, and refuses bad input before any work is done.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from diffstat._validation import unvalidated

__all__ = ["Target", "check_reference", "check_dtype", "no_support_message"]

#: Points used to probe a log-density when a Target is built.
_NUM_PROBE_POINTS = 4


def check_dtype(dtype) -> torch.dtype:
    """The points' floating point type: float32 or float64 (None: torch's default); ``ValueError``
    for integer, bool and half types, on which gradients and accept steps are meaningless or too coarse."""
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype


def check_reference(reference, dim: int) -> None:
    """``ValueError`` unless ``reference`` is None or a distribution whose single draw is a vector
    of length ``dim`` (event shape ``(dim,)``, batch shape ``()``) with support on all of R^dim (a
    bounded reference's log-density has no gradient or refuses points outside its support, and a
    geometric path from it never reaches target mass outside it)."""
    if reference is None:
        return
    if not isinstance(reference, torch.distributions.Distribution):
        raise ValueError(
            f"reference must be a torch.distributions.Distribution, got {type(reference).__name__}"
        )
    batch, event = tuple(reference.batch_shape), tuple(reference.event_shape)
    if event != (dim,) or batch != ():
        hint = ""
        if batch == (dim,) and event == ():
            hint = " (a batch of scalar distributions: wrap it as torch.distributions.Independent(..., 1))"
        raise ValueError(
            f"reference must be a distribution on R^{dim} with event shape ({dim},) and batch shape (), "
            f"got batch shape {batch} and event shape {event}{hint}"
        )
    support = _support(reference)
    if support is not None and not _is_real(support):
        raise ValueError(
            f"reference must have support on all of R^{dim} (a tempering path from it must reach every "
            f"point the target can reach), got {type(reference).__name__} with support {support}; use "
            "e.g. a Normal, StudentT or MultivariateNormal, or sample in unconstrained coordinates"
        )


def no_support_message(n: int) -> str:
    """The ``ValueError`` message for a log-density that is -inf at all ``n`` starting points."""
    return (
        f"log_prob is -inf at all {n} initial points: no chain would start in the support; pass init= "
        "points inside it, or better, sample an unconstrained parameter (for x > 0, u = log x with "
        "log_prob(exp(u)) + u.sum(-1) as the log-density)"
    )


def _support(reference):
    """The reference's support constraint, or None where the distribution does not say."""
    try:
        return reference.support
    except NotImplementedError:
        return None


def _is_real(constraint) -> bool:
    """Whether ``constraint`` is the whole real line in every coordinate (``real``, ``real_vector``,
    ``independent(real, k)``, a mixture's constraint of ``real``)."""
    constraints = torch.distributions.constraints
    while hasattr(constraint, "base_constraint"):  # independent(...), MixtureSameFamily's
        constraint = constraint.base_constraint
    return isinstance(constraint, type(constraints.real))


def resolve_reference(target, reference) -> torch.distributions.Distribution | None:
    """The reference a tempering-type method starts from: ``reference`` if given, else the
    target's own; ``ValueError`` if it is not a distribution on R^dim."""
    if reference is None:
        return target.reference
    check_reference(reference, target.dim)
    return reference


def _functorch_wrapped(t: torch.Tensor) -> bool:
    """Whether ``t`` lives inside a ``torch.func`` transform (False where torch cannot say)."""
    functorch = getattr(torch._C, "_functorch", None)
    return bool(functorch is not None and functorch.is_functorch_wrapped_tensor(t))


class Target:
    r"""An unnormalised log-density :math:`\log \tilde\pi(x)` on :math:`\mathbb{R}^d`.

    Parameters
    ----------
    log_prob : callable
        Maps a batch ``x: (n, dim)`` to ``(n,)``, written with torch operations so that autograd
        gives :math:`\nabla_x \log \tilde\pi(x)`. The normalising constant
        :math:`Z = \int \tilde\pi(x)\,dx` need not be known.
    dim : int
        The dimension ``d``.
    name : str
        Name of the variable in the returned ``InferenceData``.
    reference : torch.distributions.Distribution, optional
        A distribution on R^dim that tempering-type methods start from.
    dtype : torch.dtype, optional
        Floating point type of the points; defaults to ``torch.get_default_dtype()``.

    Notes
    -----
    ``num_target_evals`` counts points, not calls: evaluating the log-density and its gradient at
    ``n`` points adds ``n``, whether or not the gradient was asked for. ``num_nan_evals`` counts
    the points among them where the log-density was NaN, ``num_posinf_evals`` those where it was
    ``+inf``.

    Bad input raises ``ValueError`` naming the problem: a ``dim`` that is not a positive integer or
    that ``log_prob`` does not accept (where it accepts another width), an output of the wrong
    shape, NaN or ``+inf`` at the probe points, or a log-density autograd cannot differentiate. An
    exception of the user's own log-density otherwise reaches the user unchanged.

    In a run ``torch.distributions``' argument validation is off (as Pyro's for a Pyro model; Stan
    rejects such points too): a scale that overflowed to ``inf`` far in a tail gives NaN, which the
    kernels reject and the run reports, not a ``ValueError`` mid-run. Probe and starting points are
    checked with validation as the user has it.
    """

    def __init__(
        self,
        log_prob: Callable[[torch.Tensor], torch.Tensor],
        dim: int,
        *,
        name: str = "x",
        reference: torch.distributions.Distribution | None = None,
        dtype: torch.dtype | None = None,
        validate: bool = True,
    ):
        if not callable(log_prob):
            raise ValueError(f"log_prob must be callable, got {type(log_prob).__name__}")
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        check_reference(reference, int(dim))
        dtype = check_dtype(dtype)
        self._log_prob = log_prob
        self.dim = int(dim)
        self.name = name
        self.reference = reference
        self.dtype = dtype
        self.num_target_evals = 0
        self._nan_evals = 0  # a tensor once counted: no host sync per evaluation
        self._posinf_evals = 0
        if validate:
            gen = torch.Generator().manual_seed(0)
            probe = torch.randn(_NUM_PROBE_POINTS, self.dim, generator=gen, dtype=self.dtype)
            if reference is not None:
                with torch.random.fork_rng():
                    torch.manual_seed(0)
                    probe = reference.sample((_NUM_PROBE_POINTS,)).to(self.dtype)
            self.validate(probe, initial=False)
            self._check_not_flat(probe)
            self.num_target_evals = 0

    # ------------------------------------------------------------------ evaluation
    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log-density at ``x: (n, dim)``, shape ``(n,)`` in ``x``'s dtype (a log-density computed
        in the other float type, by parameters of their own, is cast: the samplers combine it with
        the points); counts ``n`` evaluations."""
        self.num_target_evals += x.shape[0]
        return self.count_nan(unvalidated(self._log_prob, x).to(x.dtype), x)

    def log_prob_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-density ``(n,)`` and its gradient ``(n, dim)`` at ``x``, detached, both in ``x``'s
        dtype (:meth:`log_prob`); counts ``n``."""
        self.num_target_evals += x.shape[0]
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            lp = unvalidated(self._log_prob, x)
            (grad,) = torch.autograd.grad(lp.sum(), x)
        return self.count_nan(lp.detach().to(x.dtype), x), grad.detach()

    def count_nan(self, lp: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Add the NaN entries of log-density values ``lp: (n,)`` to :attr:`num_nan_evals` and the
        ``+inf`` ones to :attr:`num_posinf_evals`, only at rows of the points ``x: (n, dim)`` whose
        coordinates are all finite where ``x`` is given: a point with an infinite or NaN coordinate
        is a sampler's divergence (a float32 leapfrog that overflowed), not the log-density's fault.
        Returns ``lp``. Accumulated on ``lp``'s device, so counting adds no host synchronisation.
        Inside a ``torch.func`` transform (``vmap``, ``hessian``) ``lp`` is a functorch tensor that
        must not outlive the transform, so its NaNs are not counted there."""
        if torch.is_tensor(lp) and lp.is_floating_point() and not _functorch_wrapped(lp):
            lp_d = lp.detach()
            nan, posinf = torch.isnan(lp_d), torch.isposinf(lp_d)
            if x is not None and lp_d.dim() == 1 and x.dim() == 2 and x.shape[0] == lp_d.shape[0]:
                finite = torch.isfinite(x.detach()).all(-1)
                nan, posinf = nan & finite, posinf & finite
            self._nan_evals = self._nan_evals + nan.sum()
            self._posinf_evals = self._posinf_evals + posinf.sum()
        return lp

    @property
    def num_nan_evals(self) -> int:
        """Points at which the log-density returned NaN since the Target was built (runtime
        trouble: the front door warns when a run meets any)."""
        return int(self._nan_evals)

    @property
    def num_posinf_evals(self) -> int:
        """Points at which the log-density returned ``+inf`` since the Target was built (the first look
        refuses it at the starting points; met later in a run, the front door warns)."""
        return int(self._posinf_evals)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        r"""The score :math:`\nabla_x \log \tilde\pi(x)`, shape ``(n, dim)``; counts ``n``."""
        return self.log_prob_and_grad(x)[1]

    __call__ = log_prob

    # ------------------------------------------------------------------ validation
    def validate(self, x: torch.Tensor, *, initial: bool = True, require_support: bool = True):
        """Check the log-density at the points ``x: (n, dim)``; raise ``ValueError`` if bad, else
        return where it is finite ``(n,)`` (``require_support=False``: no point need be finite).

        Checks, in order: the points' shape and dtype, that ``log_prob`` accepts them (a
        ``RuntimeError`` or ``IndexError`` of the user's log-density becomes a ``ValueError`` only
        where ``log_prob`` accepts points of another width, a dimension mismatch; otherwise it is
        re-raised unchanged), the output's shape and dtype, NaN or ``+inf`` values, that autograd
        gives a gradient, that the gradient is not NaN where the log-density is finite, and (for
        ``initial`` points a sampler starts from) that at least one point lies in the support (a
        chain started where the log-density is -inf everywhere could never accept a move) and that
        a log-density equal at distinct starting points is not the same constant 1000 times
        farther out (a flat, improper density).
        """
        if not torch.is_tensor(x) or x.dim() != 2 or x.shape[1] != self.dim:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"initial points must have shape (n, {self.dim}), got {shape}")
        if not torch.is_floating_point(x) or x.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"points must be float32 or float64, got {x.dtype}")
        n = x.shape[0]
        self.num_target_evals += n
        xg, lp = self._evaluate_for_validation(x)
        if torch.isnan(lp).any():
            raise ValueError(
                f"log_prob returned NaN at {int(torch.isnan(lp).sum())} of {n} initial points; "
                "return -inf outside the support"
            )
        if torch.isposinf(lp).any():
            raise ValueError(
                f"log_prob returned +inf at {int(torch.isposinf(lp).sum())} of {n} initial points"
            )
        if not lp.requires_grad:
            raise ValueError(
                "log_prob is not differentiable by autograd (its output does not depend on x "
                "through torch operations; avoid numpy, .item() and .detach() inside it)"
            )
        try:
            (grad,) = torch.autograd.grad(lp.sum(), xg, allow_unused=True)
        except RuntimeError as err:
            raise ValueError(f"autograd cannot differentiate log_prob: {err}") from err
        if grad is None:
            raise ValueError("log_prob is not differentiable by autograd: its output does not depend on x")
        finite = torch.isfinite(lp)
        if initial and require_support and not finite.any():
            raise ValueError(no_support_message(n))
        if initial and bool(finite.all()) and bool((lp == lp[0]).all()) and bool((x != x[:1]).any()):
            self._check_not_flat(x.detach())  # one constant at distinct starting points: flat?
        self._check_gradient(x, finite, grad)
        return finite

    def _evaluate_for_validation(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(xg, lp)``: the points as a leaf that requires grad and ``log_prob`` there, ``(n,)``,
        checked to be a float32/float64 tensor of that shape; a dimension mismatch the user's own
        exception reveals is a ``ValueError`` (:meth:`_accepted_width`), any other exception of
        theirs is re-raised unchanged."""
        n = x.shape[0]
        try:
            with torch.enable_grad():
                xg = x.detach().clone().requires_grad_(True)
                lp = self._log_prob(xg)
        except (RuntimeError, IndexError) as err:
            width = self._accepted_width(x)
            if width is not None:
                raise ValueError(
                    f"log_prob fails on points of dim={self.dim} ({type(err).__name__}: {err}) but "
                    f"accepts points of dim={width}: pass dim={width}"
                ) from err
            raise  # the user's own exception, unchanged
        if not torch.is_tensor(lp):
            raise ValueError(f"log_prob must return a torch tensor, got {type(lp).__name__}")
        if tuple(lp.shape) != (n,):
            raise ValueError(
                f"log_prob must map a batch of shape ({n}, {self.dim}) to shape ({n},), "
                f"got {tuple(lp.shape)}; check dim and that the log-density sums over the last "
                "axis only"
            )
        if lp.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"log_prob must return float32 or float64 values, got dtype {lp.dtype}: an integer or "
                "bool output has no gradient, and half precision is too coarse for accept steps"
            )
        return xg, lp

    def _check_gradient(self, x: torch.Tensor, finite: torch.Tensor, grad: torch.Tensor) -> None:
        """``ValueError`` for a NaN or infinite gradient where the log-density is finite
        (``finite: (n,)``), or for coordinates of ``x: (n, dim)`` the log-density ignores."""
        bad_grad = finite & ~torch.isfinite(grad).all(-1)
        if bad_grad.any():
            raise ValueError(
                f"the gradient of log_prob is NaN or infinite at {int(bad_grad.sum())} "
                f"of {int(finite.sum())} "
                "points where log_prob is finite; gradient-based samplers cannot move from there"
            )
        # A dim larger than the log-density uses: some coordinates have an identically zero
        # gradient at distinct points while others do not (a density constant along a coordinate
        # is improper). Skipped when the points coincide or every gradient vanishes.
        if int(finite.sum()) >= 2:
            g, xs = grad[finite], x[finite]
            flat = (g == 0).all(dim=0) & (xs != xs[:1]).any(dim=0)
            if flat.any() and not flat.all() and (g != 0).any():
                cols = torch.nonzero(flat).flatten().tolist()
                raise ValueError(
                    f"log_prob does not depend on coordinates {cols[:10]} of x: does dim={self.dim} "
                    "match the log-density? (an unnormalised density constant along a coordinate "
                    "is improper)"
                )

    def _accepted_width(self, x: torch.Tensor) -> int | None:
        """The first width ``k != dim`` (of 1 to ``2 dim + 8``, at most 64 tried) at which
        ``log_prob`` maps ``(n, k)`` points to ``(n,)``, or None: run only after ``log_prob`` raised
        on the points ``x: (n, dim)``, so that a dimension mismatch is reported as one only where it is
        established, and any other exception of the user's reaches them unchanged."""
        n, gen = x.shape[0], torch.Generator().manual_seed(0)
        widths = [k for k in range(1, 2 * self.dim + 9) if k != self.dim][:64]
        for k in widths:
            try:
                with torch.no_grad():
                    lp = self._log_prob(torch.randn(n, k, generator=gen, dtype=x.dtype).to(x.device))
            except Exception:  # noqa: BLE001 - a width the log-density refuses is not the one
                continue
            if torch.is_tensor(lp) and tuple(lp.shape) == (n,):
                return k
        return None

    def _check_not_flat(self, probe: torch.Tensor) -> None:
        """``ValueError`` for a log-density that is the same finite constant at the probe points and
        at points 1000 times farther out: a density flat over so large a region is improper (no
        sampler converges on it, and step-size adaptation diverges)."""
        try:
            with torch.no_grad():
                lp = self._log_prob(torch.cat([probe, 1000.0 * probe]))
        except Exception:  # noqa: BLE001 - far points may be outside what a model accepts: not flat
            return
        if torch.isfinite(lp).all() and bool((lp == lp[0]).all()):
            raise ValueError(
                "log_prob is the same constant at points up to 1000 times apart: a flat (improper) "
                "density cannot be sampled; add a proper prior"
            )

    # ------------------------------------------------------------------ initial points, output
    def sample_reference(self, n: int, generator: torch.Generator, device=None) -> torch.Tensor:
        """``n`` draws ``(n, dim)`` from the reference, or from N(0, I) without one."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        if self.reference is None:
            return torch.randn(n, self.dim, generator=generator, dtype=self.dtype, device=device)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            x = self.reference.sample((n,))
        return x.to(device=device, dtype=self.dtype)

    def reference_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised log-density of the reference at ``x: (n, dim)`` (N(0, I) without one)."""
        if self.reference is None:
            return -0.5 * (x**2).sum(-1) - 0.5 * self.dim * np.log(2 * np.pi)
        return self.reference.log_prob(x)

    def to_posterior(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """Map draws ``x: (chain, draw, dim)`` to the variables reported in ``posterior``."""
        return {self.name: x.detach().cpu().numpy()}

    def __repr__(self) -> str:
        return f"Target(name={self.name!r}, dim={self.dim}, num_target_evals={self.num_target_evals})"

    @classmethod
    def from_pyro(cls, model, *model_args, **model_kwargs) -> Target:
        """The posterior of a Pyro model given its arguments; see :mod:`diffstat.pyro_target`."""
        from diffstat.pyro_target import PyroTarget

        return PyroTarget(model, *model_args, **model_kwargs)
