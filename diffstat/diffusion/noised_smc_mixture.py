r"""A population-fitted Gaussian mixture for the particle denoising diffusion sampler
(``ds.sample(target, "pdds", population="nuts")``).

Algorithm
---------
1. **Population.** NUTS chains (:func:`diffstat.smoothing.mcmc_population.mcmc_population`: Stan's
   windowed warm-up, target acceptance 0.95) give draws of the target within a budget of target
   evaluations, counted with the run's.
2. **Mixture.** In the pilot's whitened coordinates a Gaussian mixture
   :math:`q = \sum_j w_j\,\mathcal N(m_j, C_j)` is fitted to the draws by EM (Dempster, Laird and
   Rubin 1977), started from slices of the draws' log-density quantiles (:func:`fit_mixture`), and
   pooled with the pilot's bank of Laplace modes where there is one (:func:`with_bank`: the chains
   keep the modes they start in and miss the ones they never enter; the bank's masses are exact
   for Gaussian modes).
3. **Guidance.** The noised mixture is closed-form,
   :math:`q_t = \sum_j w_j\,\mathcal N(a m_j, a^2 C_j + \lambda I)`
   (:func:`~diffstat.diffusion.noised_smc_bank.bank_log_g`), and :math:`\log g^q_t = \log q_t -
   \log\mathcal N(0, I)` is mixed into the sampler's guidance as the learned network is
   (:class:`~diffstat.diffusion.noised_smc_learned.LearnedPath`):
   :math:`\log\hat g_k + m_k(\log g^q_{t_k} - \log\hat g_k)` with :math:`m_k = 0` at zero noise, so
   :math:`\hat g_0 = g` and :math:`\hat Z` stays unbiased whatever the mixture.
4. **Independence moves.** At each level, after the usual moves, ``num_mixture_moves``
   independence Metropolis-Hastings steps (Tierney 1994) propose :math:`y \sim q_{t_k}` for every
   particle and accept with probability :math:`\min\{1, \gamma_k(y) q_{t_k}(x) / (\gamma_k(x)
   q_{t_k}(y))\}`: :math:`\gamma_k` is invariant for any mixture, and where the mixture covers the
   target the particles jump between its regions (a funnel's neck and mouth) in one step, which local
   moves do not do (docs/noised_smc.md).

Rationale of the defaults (measured on funnel(10) only, docs/noised_smc.md): 8 components (with
1,000 to 4,000 correlated NUTS draws in 10-d, 8 full covariances gave smaller errors than 16 or
32); the log-density quantile start (a k-means++ start put 13 of 16 components at
:math:`x_1 > 4`, in the funnel's mouth, where the distances are largest, and lost the neck); 64
chains of 100 warm-up iterations at target acceptance 0.95, every state kept, until 4,096 draws
or a budget of 140 evaluations per draw (573k: with the pilot and 900 particles a run stays under
1M evaluations; 32 chains of 100 or 200 warm-up iterations, 128 of 50, or acceptance 0.9 gave
mixtures whose importance sampling missed more of the mass at that cost); 128 levels with 1
independence and 1 local move each (at 64 levels with 2 and 2 the standard error was 0.07 to
0.14, at 128 with 1 and 1 it is 0.04 to 0.05 for the same cost).
"""

from __future__ import annotations

import math
import warnings

import torch

from diffstat.diffusion.noised_smc_bank import ModeBank, bank_log_g
from diffstat.diffusion.noised_smc_learned import LearnedPath
from diffstat.diffusion.noised_smc_path import NoisedPath

__all__ = [
    "MixtureGuidance",
    "fit_mixture",
    "independence_moves",
    "noised_log_density",
    "population_defaults",
    "population_path",
    "sample_noised",
    "with_bank",
]

#: Mixture components, EM iterations, ridge on each covariance (relative to its mean variance).
NUM_COMPONENTS, EM_ITERS, RIDGE = 8, 200, 1e-6
#: Population defaults: draws, NUTS chains, warm-up iterations, evaluations per draw of the budget.
POPULATION_SIZE, POPULATION_CHAINS, POPULATION_WARMUP, BUDGET_PER_DRAW = 4096, 64, 100, 140
#: Every NUTS state is kept (thin 1): the budget, not the draws wanted, ends the sampling, and for a
#: mixture fit correlated draws are more information than fewer.
POPULATION_THIN = 1
#: NUTS's target acceptance: smaller steps than NUTS's 0.8 reach further into a narrowing neck.
POPULATION_ACCEPT = 0.95
#: With a population: noise levels, and moves per level (independence moves from the noised
#: mixture, local moves).
POPULATION_STEPS, MIXTURE_MOVES, LOCAL_MOVES = 128, 1, 1
#: The population's options of ``ds.sample(target, "pdds", ...)``.
POPULATION_OPTIONS = (
    "population",
    "population_size",
    "population_budget",
    "mixture_components",
    "num_mixture_moves",
)


def fit_mixture(z: torch.Tensor, lp: torch.Tensor, num_components: int = NUM_COMPONENTS) -> ModeBank:
    r"""EM fit of a full-covariance Gaussian mixture to draws ``z (n, d)`` with log-densities ``lp
    (n,)``, started from ``num_components`` equal slices of the draws ranked by ``lp`` (module
    docstring); :data:`EM_ITERS` iterations, each covariance plus :data:`RIDGE` times its mean
    variance. Returned as a :class:`~diffstat.diffusion.noised_smc_bank.ModeBank` (covariance
    eigenvectors and eigenvalues, log weights as ``log_mass``)."""
    n, d = z.shape
    if not 1 <= num_components <= n // 2:
        raise ValueError(
            f"mixture_components must be between 1 and half the draws ({n // 2}), got {num_components}"
        )
    ranks = torch.argsort(torch.argsort(lp))
    resp = torch.nn.functional.one_hot(ranks * num_components // n, num_components).to(z.dtype)
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    tiny = torch.finfo(z.dtype).tiny
    for _ in range(EM_ITERS):
        nk = resp.sum(0) + tiny
        mu = (resp.T @ z) / nk[:, None]
        diff = z[None] - mu[:, None]  # (K, n, d)
        cov = torch.einsum("nk,kni,knj->kij", resp, diff, diff) / nk[:, None, None]
        ridge = RIDGE * cov.diagonal(dim1=1, dim2=2).mean(-1) + tiny
        cov = cov + ridge[:, None, None] * eye
        chol = torch.linalg.cholesky(cov)
        sol = torch.linalg.solve_triangular(chol, diff.transpose(1, 2), upper=False)  # (K, d, n)
        log_det = torch.log(chol.diagonal(dim1=1, dim2=2)).sum(-1)
        resp = torch.softmax(-0.5 * (sol**2).sum(1).T - log_det + torch.log(nk / n), 1)
    evals, evecs = torch.linalg.eigh(cov)
    return ModeBank(mu, evecs, evals, torch.log(nk / n))


def noised_log_density(mixture: ModeBank, x: torch.Tensor, rho) -> torch.Tensor:
    r""":math:`\log q_t(x)` ``(n,)`` of the mixture noised to :math:`a^2` = ``rho``."""
    log_g, _ = bank_log_g(mixture, x, rho)
    return log_g - 0.5 * (x**2).sum(-1) - 0.5 * x.shape[-1] * math.log(2 * math.pi)


def sample_noised(generator, mixture: ModeBank, rho, n: int) -> torch.Tensor:
    r"""``n`` draws ``(n, d)`` of :math:`q_t`: a component by its weight, then :math:`a m_j +
    \sqrt{a^2 C_j + \lambda I}\,\varepsilon` in the component's eigenbasis."""
    means = mixture.means
    comp = torch.multinomial(torch.softmax(mixture.log_mass, 0), n, replacement=True, generator=generator)
    eps = torch.randn(n, means.shape[1], generator=generator, dtype=means.dtype, device=means.device)
    a = torch.sqrt(rho)
    sd = torch.sqrt(rho * mixture.evals[comp] + (1.0 - rho))
    return a * means[comp] + torch.einsum("nij,nj->ni", mixture.evecs[comp], sd * eps)


def independence_moves(generator, particles, stage_path, mixture: ModeBank, rho, num_moves: int):
    r"""``num_moves`` independence Metropolis-Hastings steps on the level's target (``stage_path``,
    whose ``evaluate`` gives :class:`~diffstat.tempering.path.PathState`) from :math:`q_t` at
    ``rho``; returns the particles, the mean acceptance rate (NaN for no move) and each particle's
    largest acceptance probability over the moves ``(n,)`` (0 for no move; the stuck count of
    :mod:`~diffstat.diffusion.noised_smc_check`). One target evaluation per particle and move."""
    lq = noised_log_density(mixture, particles.x, rho)
    rates, best = [], torch.zeros_like(lq)
    for _ in range(num_moves):
        y = sample_noised(generator, mixture, rho, particles.x.shape[0])
        new = stage_path.evaluate(y)
        lq_y = noised_log_density(mixture, y, rho)
        log_ratio = torch.nan_to_num(
            new.target_log_prob - particles.target_log_prob + lq - lq_y, nan=-math.inf
        )
        u = torch.rand(log_ratio.shape, generator=generator, dtype=log_ratio.dtype, device=log_ratio.device)
        ok = torch.log(u) < log_ratio
        best = torch.maximum(best, torch.exp(log_ratio.clamp_max(0.0)))
        particles = type(particles)(
            *(torch.where(ok.view(-1, *([1] * (old.dim() - 1))), nw, old) for old, nw in zip(particles, new))
        )
        lq = torch.where(ok, lq_y, lq)
        rates.append(ok.to(lq.dtype).mean())
    return particles, float(torch.stack(rates).mean()) if rates else math.nan, best


def with_bank(mixture: ModeBank, log_scale: float, bank: ModeBank | None) -> ModeBank:
    r"""The population's ``mixture`` pooled with the pilot's ``bank`` of Laplace modes: the bank's
    modes with their Laplace masses, and the mixture's components whose mean lies outside every bank
    mode (squared Mahalanobis distance over :math:`d + 3\sqrt{2d}`, the 0.999 point of a mode's
    own draws, roughly), their log weights raised by ``log_scale`` (the mixture's estimate of its
    region's :math:`\log Z`). NUTS chains keep the mode they start in, so their mixture's mode
    weights follow the starts, where the bank's Laplace masses are exact for Gaussian modes; a mode
    the chains never visit (a narrow heavy one) stays in the bank."""
    mixture = mixture._replace(log_mass=mixture.log_mass + log_scale)
    if bank is None or bank.means.shape[0] == 0:
        return mixture
    d = mixture.means.shape[1]
    proj = torch.einsum("kjd,jde->kje", mixture.means[:, None] - bank.means[None], bank.evecs)
    covered = ((proj**2 / bank.evals).sum(-1) < d + 3 * math.sqrt(2 * d)).any(1)
    keep = ~covered
    return ModeBank(*(torch.cat([b, m[keep]]) for b, m in zip(bank, mixture)))


def population_defaults(options: dict) -> None:
    """With ``population`` in ``options``, the defaults of ``num_steps`` (:data:`POPULATION_STEPS`)
    and ``num_mcmc_steps`` (:data:`LOCAL_MOVES`) where not given."""
    if options.get("population") is not None:
        options.setdefault("num_steps", POPULATION_STEPS)
        options.setdefault("num_mcmc_steps", LOCAL_MOVES)


class MixtureGuidance:
    r""":math:`\log g^q_t` and its gradient at the log relative noise :math:`u = \log(\lambda/\rho)`,
    in the form :class:`~diffstat.diffusion.noised_smc_learned.LearnedPath` takes a network."""

    def __init__(self, mixture: ModeBank):
        self.mixture = mixture

    def log_g_and_grad(self, x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return bank_log_g(self.mixture, x, torch.sigmoid(-u))


def population_path(target, generator, device, path: NoisedPath, options: dict):
    r"""Pop the population's options (:data:`POPULATION_OPTIONS`) from ``options``; without
    ``population`` return ``path``, no mixture, 0 moves and no attrs. With ``population="nuts"``:
    draw the population, fit the mixture in ``path``'s whitened coordinates and return the path
    with the mixture's guidance mixed in, the mixture, the number of independence moves per level
    and attrs (the population's evaluations, size and divergent transitions). The mixture is pooled
    with the pilot's bank where ``path`` has one (:func:`with_bank`)."""
    from diffstat.smoothing.mcmc_population import mcmc_population
    from diffstat.smoothing.populations import FitWarning

    kind = options.pop("population", None)
    size = options.pop("population_size", POPULATION_SIZE)
    budget = options.pop("population_budget", None)
    components = options.pop("mixture_components", NUM_COMPONENTS)
    moves = options.pop("num_mixture_moves", None)
    if kind is None:
        return path, None, 0, {}
    if kind != "nuts":
        raise ValueError(f"population must be None or 'nuts', got {kind!r}")
    if budget is None:  # warm-up costs the same for few draws: 64 a chain at least, as mcmc_population's
        budget = BUDGET_PER_DRAW * max(size, 64 * POPULATION_CHAINS)
    before = target.num_target_evals
    with warnings.catch_warnings():  # a population cut short by its budget is expected here
        warnings.simplefilter("ignore", FitWarning)
        pop = mcmc_population(
            target, size, generator, device, num_chains=POPULATION_CHAINS, num_warmup=POPULATION_WARMUP,
            thin=POPULATION_THIN, budget=budget, target_accept=POPULATION_ACCEPT,
        )  # fmt: skip
    z = path.whitening.to_white(pop.x.to(dtype=target.dtype))
    one = torch.ones((), dtype=z.dtype, device=z.device)
    lp = pop.log_prob.to(dtype=target.dtype) + path.whitening.log_det
    mixture = fit_mixture(z, lp, components)
    bank = path.bank if path.guidance == "bank" else None
    mixture = with_bank(mixture, float(torch.median(lp - noised_log_density(mixture, z, one))), bank)
    attrs = {
        "population_evals": int(target.num_target_evals - before),
        "population_size": int(pop.x.shape[0]),
        "population_divergent": int(pop.num_divergent),
    }
    return (
        LearnedPath(path, MixtureGuidance(mixture)),
        mixture,
        MIXTURE_MOVES if moves is None else moves,
        attrs,
    )
