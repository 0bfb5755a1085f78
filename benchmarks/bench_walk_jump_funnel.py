r"""Where walk-jump's error on funnel(10) comes from: the walk, the jump and the correction, each alone
(issue 17; docs/sms.md, "Walk-jump on funnel(10)").

The funnel's smoothed density is a one-dimensional integral over :math:`x_1`,

.. math:: q_\sigma(y) = \int \mathcal N(x_1; 0, 9)\, \mathcal N(y_1; x_1, \sigma^2)
          \prod_{i \ge 2} \mathcal N(y_i; 0, e^{x_1} + \sigma^2)\, dx_1,

computed on a grid (3,001 points on [-30, 30]), so its score and the exact jump
:math:`E[x \mid y] = y + \sigma^2 \nabla\log q_\sigma(y)` are known. Given a learned score (fitted here, or
kept with ``--scores DIR`` as ``bench_sms_learned.py`` keeps them), for each seed:

1. the learned score against the exact one at exact draws of :math:`q_\sigma`, by region of :math:`y_1`
   (neck below -4, mouth above 4): relative squared error and the ratio of their pulls toward the axis;
2. the walk (walk-jump's underdamped walk, 100 steps from the kept particles plus noise, as the sampler
   starts it) on the learned score and on the exact one;
3. jumps at exact :math:`y` (learned and exact score) and at the walked :math:`y`, then 20 MALA steps on
   :math:`p(x\mid y)` (the sampler's correction: one step size shared by all chains) and, tried, one step
   size per chain (dual averaging on each chain's own acceptance over the first half);
4. the noise swept: walk, jump and correction at each ``--sigmas`` (at or above the score's
   ``kernel_sigma`` the score is the kernel estimate of the kept particles).

Each line: the mean, sd and 1/50/99% quantiles of :math:`x_1` (exact 0, 3, -6.98/0/6.98), the largest
|mean error| over the coordinates in sds of the long NUTS run and of the exact law, and the mean of
:math:`|x_i|`, i >= 2, over its exact value, 1,000 points.

    python benchmarks/bench_walk_jump_funnel.py --seeds 0,1,2 --scores /tmp/scores
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_sms_learned import NUTS_FUNNEL10, fitted, make  # noqa: E402

from diffstat import targets  # noqa: E402
from diffstat.mcmc.adaptation import DualAveraging  # noqa: E402
from diffstat.mcmc.base import init as init_chain  # noqa: E402
from diffstat.mcmc.mala import MALA_TARGET_ACCEPT, mala_step  # noqa: E402
from diffstat.smoothing.correction import posterior_mala, posterior_metric  # noqa: E402
from diffstat.smoothing.walk_jump_setup import initial_walkers, make_walk  # noqa: E402

wj = importlib.import_module("diffstat.smoothing.walk_jump")  # the module, not the sampler it exports
FUNNEL = targets.Funnel(10)
N = 1000


def exact_log_q(y: torch.Tensor, sigma: float) -> torch.Tensor:
    """``log q_sigma(y)`` of funnel(10) by quadrature over x_1 (module doc), ``(n,)``."""
    grid = torch.linspace(-30, 30, 3001, dtype=y.dtype)
    v = torch.exp(grid) + sigma**2
    r2 = (y[:, 1:] ** 2).sum(-1, keepdim=True)
    log_f = -(grid**2) / 18 - 0.5 * (y[:, :1] - grid) ** 2 / sigma**2 - 0.5 * r2 / v
    log_f = log_f - 0.5 * (y.shape[1] - 1) * torch.log(v)
    return torch.logsumexp(log_f, -1) + math.log(float(grid[1] - grid[0]))


class ExactScore:
    """The exact smoothed score as a walk's provider (no target evaluation)."""

    uses_target, last_info = False, {}

    def __call__(self, y: torch.Tensor, sigma: float) -> torch.Tensor:
        with torch.enable_grad():
            yg = y.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(exact_log_q(yg, sigma).sum(), yg)
        return g


def line(label: str, x: torch.Tensor) -> str:
    x = x[torch.isfinite(x).all(-1)]
    nm, ns = (torch.tensor(v, dtype=torch.float64) for v in NUTS_FUNNEL10)
    q = torch.quantile(x[:, 0], torch.tensor([0.01, 0.5, 0.99], dtype=x.dtype)).tolist()
    err_nuts = float(((x.mean(0) - nm) / ns).abs().max())
    err_exact = float((x.mean(0) / FUNNEL.variance.sqrt()).abs().max())
    abs_ratio = float(x[:, 1:].abs().mean() / FUNNEL.mean_abs[1])
    return (
        f"{label:40s} x1 mean {float(x[:, 0].mean()):+.2f} sd {float(x[:, 0].std()):.2f} "
        f"q01/50/99 {q[0]:+.2f}/{q[1]:+.2f}/{q[2]:+.2f} | mean err NUTS {err_nuts:.3f} exact {err_exact:.3f}"
        f" | E|x_i| ratio {abs_ratio:.3f}"
    )


def per_chain_mala(generator, target, x, ybar, s2, num_steps, metric):
    """MALA on p(x | ybar) with one step size per chain, dual averaging on each chain's acceptance over
    the first half (the variant tried, not adopted)."""

    def log_prob_and_grad(z):
        lp, g = target.log_prob_and_grad(z)
        return lp - ((z - ybar) ** 2).sum(-1) / (2 * s2), g - (z - ybar) / s2

    chain = init_chain(log_prob_and_grad, x)
    h = torch.full((x.shape[0],), 0.5 * x.shape[1] ** (-1 / 3), dtype=x.dtype)
    adaptation = DualAveraging(h.clone(), MALA_TARGET_ACCEPT)
    for i in range(num_steps):
        chain, info = mala_step(generator, chain, log_prob_and_grad, h, metric)
        if i < num_steps // 2:
            h = adaptation.update(info.acceptance_rate)
            h = adaptation.final_step_size if i == num_steps // 2 - 1 else h
    return chain.x


def walk(generator, target, score, provider, sigma: float, num_steps: int = 100) -> torch.Tensor:
    """Walk-jump's walkers after ``num_steps`` underdamped steps on ``provider``, started as the sampler
    starts them (the kept particles plus sigma noise)."""
    y = initial_walkers(target, score, None, (4, N // 4), sigma, generator, None)
    kernel = make_walk("underdamped", provider, None, sigma, 0.5, 1.0, num_steps)
    state = wj.init(generator, kernel, y)
    for _ in range(num_steps):
        state, _ = wj.step(generator, state, kernel, provider, num_steps, target)
    return kernel.position(state.walk)


def score_errors(score, y: torch.Tensor, sigma: float) -> None:
    """Step 1 of the module doc."""
    learned, exact = score(y, sigma), ExactScore()(y, sigma)
    for label, rows in (("neck", y[:, 0] < -4), ("middle", y[:, 0].abs() <= 4), ("mouth", y[:, 0] > 4)):
        err = ((learned[rows] - exact[rows]) ** 2).sum(-1).mean() / (exact[rows] ** 2).sum(-1).mean()
        pull = (learned[rows, 1:] * y[rows, 1:]).sum(-1) / (exact[rows, 1:] * y[rows, 1:]).sum(-1)
        print(
            f"  score at sigma {sigma:g}, {label} ({int(rows.sum())} points): relative squared error "
            f"{float(err):.3g}, pull toward the axis learned/exact (median) {float(pull.median()):.3f}",
            flush=True,
        )


def correct(generator, target, score, x, y, sigma: float, per_chain: bool = False) -> torch.Tensor:
    metric = posterior_metric(score.fisher_information(), sigma**2, y)
    if per_chain:
        return per_chain_mala(generator, target, x, y, sigma**2, 20, metric)
    return posterior_mala(generator, target, x, y, sigma**2, 20, inv_mass=metric)[0]


def run(seed: int, scores: str | None, sigmas: list[float]) -> None:
    target, _ = make("funnel10")
    score = fitted(target, "funnel10", seed, {}, scores)
    print(f"funnel10 seed {seed}: kernel_sigma {score.kernel_sigma:.3g}, held-out Fisher divergence "
          f"{score.info['fisher_divergence']:.3g}", flush=True)  # fmt: skip
    g = torch.Generator().manual_seed(1000 + seed)
    x = FUNNEL.sample(N, g)
    y = x + torch.randn(x.shape, generator=g, dtype=x.dtype)
    print(line("exact draws", x), "\n" + line("exact draws of q_1", y), flush=True)
    score_errors(score, y, 1.0)
    yw = walk(g, target, score, score, 1.0)
    print(line("walk 100, learned score", yw), flush=True)
    print(line("walk 100, exact score", walk(g, target, score, ExactScore(), 1.0)), flush=True)
    for label, yy, jump in (
        ("exact y, exact jump", y, y + ExactScore()(y, 1.0)),
        ("exact y, learned jump", y, y + score(y, 1.0)),
        ("walked y, learned jump", yw, yw + score(yw, 1.0)),
    ):
        print(line(label, jump), flush=True)
        print(line("  + 20 MALA, shared step", correct(g, target, score, jump, yy, 1.0)), flush=True)
        if "learned" in label:
            print(
                line("  + 20 MALA, step per chain", correct(g, target, score, jump, yy, 1.0, True)),
                flush=True,
            )
    for sigma in sigmas:
        ys = walk(g, target, score, score, sigma)
        xs = correct(g, target, score, ys + sigma**2 * score(ys, sigma), ys, sigma)
        print(line(f"sigma {sigma:g}: walk 100, jump, 20 MALA", xs), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--scores", default=None, help="a folder to keep and reuse the fitted scores in")
    parser.add_argument("--sigmas", default="0.5,1,1.6,2,3")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for seed in (int(s) for s in args.seeds.split(",")):
        run(seed, args.scores, [float(s) for s in args.sigmas.split(",")])


if __name__ == "__main__":
    main()
