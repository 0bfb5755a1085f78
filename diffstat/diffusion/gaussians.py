r"""Gaussian building blocks of the importance proposals: the per-mode Gaussian mixture with its
stratified sampler, a single Gaussian component, the moment-matched fit to a bank of modes, the
whitening map of the score models, and the held-out cross-entropy that compares proposals.

The Gaussians are moment-matched (rather than Laplace at the peak) so that a mode's proposal has
the spread the restocked chains saw, and inflated by ``inflate`` = 1.2 so that its tails are heavier
than the mode's, which bounds the importance weights of a Gaussian mode. A mixture draws its
components in stratified counts (largest remainders), which removes the multinomial noise of the
component counts from the estimates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffstat.diffusion.modes import ModeBank

__all__ = [
    "GaussianMixtureProposal",
    "GaussianComponent",
    "fit_mode_gaussians",
    "proposal_width",
    "Whitening",
    "held_out_cross_entropy",
    "stratified_counts",
    "MeanFieldMixture",
]

#: Components per coordinate of :class:`MeanFieldMixture`: two, one per side of a double well; a
#: unimodal coordinate fits two near-equal Gaussians, at no loss.
MEAN_FIELD_COMPONENTS = 2
#: EM iterations of :meth:`MeanFieldMixture.fit` (1-d fits, all coordinates at once).
MEAN_FIELD_EM_STEPS = 100
#: Least weight of a component of :class:`MeanFieldMixture`: a component that the particles leave
#: (nearly) empty but the support points fill, such as a well that the SMC particles' genealogy lost,
#: keeps this share of its coordinate's proposals (many-well(32) at ``run_all.py --fast``'s options,
#: seed 0: one coordinate's left well lost, log Z off by -0.19 without a warning), at a cost of at
#: most 1/0.95 in the weights of the others.
MEAN_FIELD_MIN_WEIGHT = 0.05

#: Largest intermediate tensor (elements) of a mixture's log-density: 2^24, 128 MB in float64.
_MAX_ELEMENTS = 2**24


def stratified_counts(weights: torch.Tensor, n: int) -> torch.Tensor:
    """Integer counts ``(K,)`` summing to ``n`` proportional to ``weights`` (largest remainders)."""
    raw = weights / weights.sum() * n
    counts = torch.floor(raw).long()
    rest = n - int(counts.sum())
    if rest > 0:
        counts[torch.topk(raw - counts, rest).indices] += 1
    return counts


class GaussianMixtureProposal:
    r""":math:`q(x) = \sum_k \pi_k \mathcal N(x; \mu_k, L_k L_k^\top)`: means ``(K, dim)``,
    Cholesky factors ``(K, dim, dim)``, weights ``(K,)``. Draws are stratified over components
    (``round(pi_k n)`` from component ``k``), which with the mixture density in the weights keeps
    importance sampling unbiased."""

    def __init__(self, means: torch.Tensor, chols: torch.Tensor, weights: torch.Tensor):
        self.means, self.chols = means, chols
        self.weights = weights / weights.sum()
        self._log_det = 2 * torch.log(torch.diagonal(chols, dim1=-2, dim2=-1)).sum(-1)

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def with_weights(self, weights: torch.Tensor) -> GaussianMixtureProposal:
        return GaussianMixtureProposal(self.means, self.chols, weights.to(self.means))

    def component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\log \pi_k + \log \mathcal N(x; \mu_k, \Sigma_k)`, ``(n, K)``."""
        k, d = self.means.shape
        # one triangular solve per component with the points as right-hand sides, (K, d, n): the
        # Cholesky factors are not broadcast over points (memory K d n, not n K d^2); points in
        # chunks of at most _MAX_ELEMENTS / (K d) (a bank of 1,460 modes in 32-d scored 16,384
        # proposals at once in two 6 GB tensors)
        chunk = max(1, _MAX_ELEMENTS // (k * d))
        out = []
        for xc in x.split(chunk):
            diff = (xc[None] - self.means[:, None, :]).transpose(1, 2)
            z = torch.linalg.solve_triangular(self.chols, diff, upper=False)
            out.append((z**2).sum(1).T)
        quad = torch.cat(out) if len(out) > 1 else out[0]
        return torch.log(self.weights) - 0.5 * (quad + self._log_det + d * math.log(2 * math.pi))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(self.component_log_prob(x), -1)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` draws ``(n, dim)``, stratified over components."""
        comp = torch.repeat_interleave(
            torch.arange(self.num_components, device=self.means.device),
            stratified_counts(self.weights, n).to(self.means.device),
        )
        z = torch.randn(
            n, self.means.shape[1], 1, generator=generator, dtype=self.means.dtype, device=generator.device
        ).to(self.means.device)
        return self.means[comp] + (self.chols[comp] @ z).squeeze(-1)


class MeanFieldMixture:
    r"""A product over coordinates of 1-d Gaussian mixtures,
    :math:`q(x) = \prod_j \sum_c w_{jc} \mathcal N(x_j; \mu_{jc}, s_{jc}^2)`: the defensive proposal
    of a bank that holds many modes as one pooled mode (:func:`~diffstat.diffusion.modes.unseen_mode_mass`
    above ``MAX_UNSEEN``). A mixture of per-mode Gaussians covers only the modes it lists; a product
    of per-coordinate mixtures covers every combination of the coordinates' components, :math:`C^d`
    of them, with the weights of each coordinate learned from all particles at once. It ignores the
    dependence between coordinates, so it is only the defensive part of the proposal: the score
    model carries the dependence. The interface is :class:`GaussianMixtureProposal`'s with one
    component (``means (1, dim)`` and diagonal ``chols (1, dim, dim)``: its mean and standard
    deviations, for :func:`proposal_width`)."""

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, log_w: torch.Tensor):
        self.loc, self.scale, self.log_w = loc, scale, log_w  # (dim, C) each
        w = log_w.exp()
        mean = (w * loc).sum(-1)
        var = (w * (scale**2 + loc**2)).sum(-1) - mean**2
        self.means, self.chols = mean[None], torch.diag(var.clamp_min(1e-300).sqrt())[None]
        self.weights = torch.ones(1, dtype=loc.dtype, device=loc.device)

    @classmethod
    def fit(
        cls, x: torch.Tensor, *, support: torch.Tensor | None = None, inflate: float = 1.0
    ) -> MeanFieldMixture:
        r"""EM for a ``MEAN_FIELD_COMPONENTS``-component 1-d mixture per coordinate of the particles
        ``x: (n, dim)`` and the ``support`` points ``(m, dim)`` together, all coordinates at once
        (``MEAN_FIELD_EM_STEPS`` steps from the coordinate's 25% and 75% quantiles, equal weights
        and a quarter of its variance; variances floored at 1e-6 of it); then the weights are the
        particles' own responsibilities, floored at ``MEAN_FIELD_MIN_WEIGHT``, and every
        component's sd is widened by ``inflate``. The support points place the components where
        the modes lie (every explored end point), the particles weigh them (draws of the target,
        or of the last proposal resampled by weight). Deterministic."""
        pts = x if support is None else torch.cat([x, support.to(x)])
        n, c = pts.shape[0], MEAN_FIELD_COMPONENTS
        q = torch.linspace(0.25, 0.75, c, dtype=x.dtype, device=x.device)
        loc = torch.quantile(pts, q, dim=0).T.contiguous()  # (dim, C)
        total = pts.var(0).clamp_min(1e-300)[:, None]
        var = (total / 4).expand_as(loc).clone()
        log_w = torch.full_like(loc, -math.log(c))

        def responsibilities(y):  # (m, dim, C)
            return torch.softmax(log_w - 0.5 * ((y[..., None] - loc) ** 2 / var + torch.log(var)), -1)

        for _ in range(MEAN_FIELD_EM_STEPS):
            r = responsibilities(pts)
            mass = r.sum(0).clamp_min(1e-12)
            log_w = torch.log(mass / n)
            loc = (r * pts[..., None]).sum(0) / mass
            var = ((r * (pts[..., None] - loc) ** 2).sum(0) / mass).clamp_min(1e-6 * total)
        w = responsibilities(x).mean(0).clamp_min(MEAN_FIELD_MIN_WEIGHT)
        return cls(loc, inflate * var.sqrt(), torch.log(w / w.sum(-1, keepdim=True)))

    @property
    def num_components(self) -> int:
        return 1

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``(n,)`` at ``x: (n, dim)``."""
        z = (x[..., None] - self.loc) / self.scale
        terms = self.log_w - 0.5 * z**2 - torch.log(self.scale) - 0.5 * math.log(2 * math.pi)
        return torch.logsumexp(terms, -1).sum(-1)

    def component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, 1)``: the one component is the whole product."""
        return self.log_prob(x)[:, None]

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` draws ``(n, dim)``: each coordinate's component drawn independently."""
        d, dt, dev = self.loc.shape[0], self.loc.dtype, self.loc.device
        u = torch.rand(n, d, 1, generator=generator, dtype=dt, device=generator.device).to(dev)
        comp = (u > self.log_w.exp().cumsum(-1)).sum(-1).clamp_max(self.loc.shape[1] - 1)  # (n, dim)
        z = torch.randn(n, d, generator=generator, dtype=dt, device=generator.device).to(dev)
        rows = torch.arange(d, device=dev)
        return self.loc[rows, comp] + self.scale[rows, comp] * z

    def with_weights(self, weights: torch.Tensor) -> MeanFieldMixture:
        return self


class GaussianComponent:
    r"""One Gaussian :math:`\mathcal N(\mu, L L^\top)` with the interface of
    :class:`DiffusionProposal` (``sample`` returns draws and their log-density): the stand-in for a
    mode whose score model failed the held-out check of the sampler."""

    def __init__(self, mean: torch.Tensor, chol: torch.Tensor):
        self._mix = GaussianMixtureProposal(
            mean[None], chol[None], torch.ones(1, dtype=mean.dtype, device=mean.device)
        )

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._mix.sample(n, generator)
        return x, self._mix.log_prob(x)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self._mix.log_prob(x)


def held_out_cross_entropy(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    r""":math:`\frac1m \sum_i [\log p(x_i) - \log q(x_i)]` at draws :math:`x_i \sim p` (``(m,)``
    each; :math:`p` unnormalised): up to the constant :math:`\log Z` it estimates
    :math:`\mathrm{KL}(p\,\|\,q)`, the held-out negative log-likelihood of the proposal. Lower is
    better; only differences between proposals evaluated at the same points are meaningful.

    (The :math:`\chi^2` form :math:`\log\frac1m\sum_i p(x_i)/q(x_i)`, whose inverse is the ideal
    ESS fraction, was tried first: on the banana mixture one far-tail point, duplicated by the
    weighted resampling, decided it, and it preferred the Gaussian to a model whose measured ESS
    was three times the Gaussian's.)"""
    r = torch.nan_to_num(log_p.double() - log_q.double(), nan=math.inf, neginf=-1e300)
    return float(r.mean())


def proposal_width(gaussians: GaussianMixtureProposal, bank: ModeBank) -> torch.Tensor:
    r"""Per mode ``(K,)``: :math:`\operatorname{tr}(\Sigma_k \hat I_k)/d`, the proposal covariance
    :math:`\Sigma_k = L_k L_k^\top` against the Fisher information
    :math:`\hat I_k = \overline{\nabla\log p\,\nabla\log p^\top}` of the mode's banked particles.

    For any smooth density the covariance is at least the inverse Fisher information (the
    Cramer-Rao bound for a location family), so a proposal fitted to draws of the mode has a width
    of at least ``inflate**2`` (1.44). Far below 1, the proposal is narrower than the mode itself
    can be: fitted to chains stuck where a step size collapsed, it covers a sliver, and its
    importance weights, all alike, cannot show it (measured: a regression posterior of
    correlation -0.99999 proposed from such a bank, width 2e-295, Kish ESS 2,300 of 4,096, draws
    with sd 1e-14 of the truth). Modes with no banked particles get ``inf``."""
    k, d = gaussians.num_components, bank.x.shape[1]
    width = torch.full((k,), math.inf, dtype=bank.grad.dtype, device=bank.grad.device)
    for i in range(k):  # a loop over modes (few); (n_k, d) at a time, never (n, d, d)
        g = bank.grad[bank.label == i]
        if g.shape[0]:
            width[i] = (g @ gaussians.chols[i]).pow(2).sum(-1).mean() / d  # |L_k^T g|^2 / d
    return width


def ridged_covariance(x: torch.Tensor, ridge: float) -> torch.Tensor:
    r"""Sample covariance ``(d, d)`` of ``x: (n, d)`` plus ``ridge`` times its own diagonal,
    :math:`\hat\Sigma + \epsilon\,\mathrm{diag}(\hat\Sigma)`: the correlation matrix plus
    :math:`\epsilon I` in standardised coordinates, so the ridge is invariant to each coordinate's
    units. A ridge on the mean variance instead swamps a coordinate whose scale is far below the
    others' (posteriordb's earnings-earn_height: variances 9e7 and 4e-4 after the log transform of
    sigma, and 1e-6 of their mean made the proposal 270 times too wide along log sigma)."""
    centred = x - x.mean(0)
    cov = centred.T @ centred / max(x.shape[0] - 1, 1)
    return cov + torch.diag(ridge * cov.diagonal().clamp_min(1e-300))


def fit_mode_gaussians(
    bank: ModeBank, *, inflate: float = 1.2, ridge: float = 1e-6, weights: torch.Tensor | None = None
) -> GaussianMixtureProposal:
    r"""Moment-matched Gaussian per banked mode, :math:`\mathcal N(\bar x_k, c^2 \hat\Sigma_k)`.

    Moment matching (rather than Laplace at the peak) captures a mode's spread as the restocked
    chains saw it, at no extra target evaluations; the inflation ``c`` (``inflate``) keeps the
    proposal's tails heavier than the mode's, which bounds the importance weights of a Gaussian
    mode. ``ridge`` times each coordinate's own variance is added to the diagonal
    (:func:`ridged_covariance`). Mode weights default to uniform.
    """
    if not inflate > 0:
        raise ValueError(f"inflate must be positive, got {inflate}")
    k, d = bank.num_modes, bank.x.shape[1]
    means, chols = [], []
    for i in range(k):  # a loop over modes (few), not over particles
        xi = bank.x[bank.label == i]
        mu = xi.mean(0)
        if xi.shape[0] > d:
            cov = ridged_covariance(xi, ridge)
        else:
            var = xi.var(0) if xi.shape[0] > 1 else torch.ones(d, dtype=xi.dtype, device=xi.device)
            cov = torch.diag(var)
        means.append(mu)
        chols.append(inflate * torch.linalg.cholesky(cov))
    w = torch.full((k,), 1.0 / k, dtype=bank.x.dtype, device=bank.x.device) if weights is None else weights
    return GaussianMixtureProposal(torch.stack(means), torch.stack(chols), w)


@dataclass(frozen=True)
class Whitening:
    r"""The affine map :math:`x = m + L y` from whitened coordinates; ``shift (dim,)``, ``chol
    (dim, dim)`` lower-triangular. Gradients map as :math:`\nabla_y = L^\top \nabla_x`."""

    shift: torch.Tensor
    chol: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor, kind: str = "diag", ridge: float = 1e-6) -> Whitening:
        r"""Standardise particles ``x: (n, dim)``: ``kind="diag"`` by their mean and per-coordinate
        standard deviations (the default), ``"full"`` by the Cholesky factor of their covariance.

        Full whitening hurts multimodal training sets: the between-mode spread dominates the
        covariance, so along the line of the modes each mode is squeezed to a sliver (measured on
        the 10-d narrow-wide mixture trained on exact balanced draws: score error near
        :math:`t = 0` of 74% with full whitening against 28% per coordinate, same steps).
        """
        if kind not in ("diag", "full"):
            raise ValueError(f"kind must be 'diag' or 'full', got {kind!r}")
        m = x.mean(0)
        if kind == "diag":
            return cls(m, torch.diag(x.std(0).clamp_min(1e-12)))
        return cls(m, torch.linalg.cholesky(ridged_covariance(x, ridge)))

    @classmethod
    def from_moments(cls, mean: torch.Tensor, cov: torch.Tensor) -> Whitening:
        """The whitening of a given mean ``(dim,)`` and covariance ``(dim, dim)``, factorised with a
        relative jitter where it is not numerically positive definite
        (:meth:`~diffstat.mcmc.metric.DenseMetric.from_covariance`)."""
        from diffstat.mcmc.metric import DenseMetric

        return cls(mean, DenseMetric.from_covariance(cov, jitter=1e-8).chol)

    @property
    def log_det(self) -> torch.Tensor:
        r""":math:`\log|\det L|`, the log-Jacobian of :meth:`from_white`."""
        return torch.log(torch.diagonal(self.chol)).sum()

    def to_white(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve_triangular(self.chol, (x - self.shift).T, upper=False).T

    def from_white(self, y: torch.Tensor) -> torch.Tensor:
        return self.shift + y @ self.chol.T

    def grad_to_white(self, grad_x: torch.Tensor) -> torch.Tensor:
        return grad_x @ self.chol
