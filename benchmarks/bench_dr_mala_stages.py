r"""Where delayed-rejection MALA's later stages are accepted on Neal's funnel, by neck depth.

200,000 exact draws of ``diffstat.targets.Funnel(10)`` (x_1 ~ N(0, 9), x_i | x_1 ~ N(0, e^{x_1})),
one DR-MALA step each (``diffstat.mcmc.dr_mala.dr_mala_step``) at first step ``h`` with the draws'
own variances as the diagonal metric (the metric SMC's last stage estimates from its cloud). Per bin
of x_1, the mean acceptance probability of each stage among the particles that reached it, and
plain MALA's acceptance at the last stage's step :math:`h / c^{K-1}` from the same points: what the
smallest step would give if it were proposed alone.

``--gaussian``: the same on 100,000 exact draws of N(0, I_10) at h = 1 (identity metric), three
stages, step factors 1.5, 2 and 4: each stage's mean acceptance probability and the share of the
particles accepted at each stage (how the third stage fades as the factor grows, on a target where
nothing else goes wrong).

    python benchmarks/bench_dr_mala_stages.py [--step 0.1] [--configs 2x4 2x10 3x10 3x100]
    python benchmarks/bench_dr_mala_stages.py --gaussian
"""

from __future__ import annotations

import argparse

import torch

from diffstat.mcmc.base import init
from diffstat.mcmc.dr_mala import dr_mala_step
from diffstat.mcmc.mala import mala_step
from diffstat.targets import Funnel

BINS = (-9.0, -4.0, -2.0, 0.0, 2.0, 4.0, 9.0)


def gaussian() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, 10, generator=g, dtype=torch.float64)

    def log_prob_and_grad(z):
        return -0.5 * (z**2).sum(-1), -z

    print("| factor | stage acceptance (1, 2, 3) | accepted at stage 1, 2, 3 | rejected |")
    print("| --- | --- | --- | --- |")
    for factor in (1.5, 2.0, 4.0):
        _, info = dr_mala_step(
            torch.Generator().manual_seed(1),
            init(log_prob_and_grad, x),
            log_prob_and_grad,
            1.0,
            num_stages=3,
            step_factor=factor,
        )
        acc = ", ".join(f"{v:.3f}" for v in info.stage_acceptance.nanmean(0).tolist())
        share = torch.bincount(info.accepted_stage, minlength=4).double() / x.shape[0]
        print(f"| {factor} | {acc} | {', '.join(f'{v:.3f}' for v in share[1:].tolist())} | {share[0]:.3f} |")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--step", type=float, default=0.1)
    parser.add_argument("--configs", nargs="+", default=["2x4", "2x10", "3x10", "3x100"])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--gaussian", action="store_true", help="three stages on N(0, I_10)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.gaussian:
        gaussian()
        return
    target = Funnel(10).as_target(dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    a = 3 * torch.randn(args.n, generator=g, dtype=torch.float64)
    rest = torch.randn(args.n, 9, generator=g, dtype=torch.float64) * torch.exp(a / 2)[:, None]
    x = torch.cat([a[:, None], rest], 1)
    state, metric = init(target.log_prob_and_grad, x), x.var(0)
    masks = [(a >= lo) & (a < hi) for lo, hi in zip(BINS[:-1], BINS[1:])]
    labels = [f"[{lo:g}, {hi:g})" for lo, hi in zip(BINS[:-1], BINS[1:])]
    print(f"h = {args.step}; metric variances x_1 {metric[0]:.1f}, x_2..x_10 {metric[1:].mean():.1f}")
    print("| K x c | stage (step) | " + " | ".join(labels) + " |")
    print("| --- | --- |" + " --- |" * len(labels))
    for config in args.configs:
        stages, factor = (float(v) for v in config.split("x"))
        stages = int(stages)
        _, info = dr_mala_step(
            torch.Generator().manual_seed(1),
            state,
            target.log_prob_and_grad,
            args.step,
            metric,
            num_stages=stages,
            step_factor=factor,
        )
        for j in range(stages):
            cells = [f"{float(info.stage_acceptance[m, j].nanmean()):.3f}" for m in masks]
            step = args.step / factor**j
            print(f"| {config} | {j + 1} ({step:.2g}) | " + " | ".join(cells) + " |")
        last = args.step / factor ** (stages - 1)
        _, plain = mala_step(torch.Generator().manual_seed(1), state, target.log_prob_and_grad, last, metric)
        cells = [f"{float(plain.acceptance_rate[m].mean()):.3f}" for m in masks]
        print(f"| {config} | MALA alone ({last:.2g}) | " + " | ".join(cells) + " |")
        overall = [f"{float(info.is_accepted[m].double().mean()):.3f}" for m in masks]
        print(
            f"| {config} | DR overall (evals/particle {info.num_evals / args.n:.2f}) | "
            + " | ".join(overall)
            + " |"
        )


if __name__ == "__main__":
    main()
