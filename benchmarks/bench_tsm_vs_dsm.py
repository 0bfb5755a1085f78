"""Does target score matching earn its place? DSM alone against the mixed TSM/DSM loss.

At equal training steps (same network, data, optimiser, seed), on a 2-d and a 10-d Gaussian
mixture, the score error of the trained model against the exact noised score

    err(band) = sum_t E||s_theta(X_t, t) - grad log p_t(X_t)||^2 / sum_t E||grad log p_t(X_t)||^2,

with X_t ~ p_t and t on a grid in the band, near t = 0 (t in [t_min, 0.05]) and over the whole
interval. DSM uses its usual weighting sigma_t^2 and, as a second variant, the weighting 1 (which
puts more weight near t = 0); the mixed loss uses weight 1. TSM alone (weight alpha_t^2) is
shown for reference.

    python benchmarks/bench_tsm_vs_dsm.py [--steps 3000] [--seeds 3] [--n 10000]
"""

from __future__ import annotations

import argparse
import time

import torch

from diffstat.diffusion import VP, ScoreMLP, TrainConfig, noised_mixture_score, train_score_model
from diffstat.targets.mixture import GaussianMixture

NEAR_ZERO = torch.linspace(1e-3, 0.05, 8).tolist()
ALL_TIMES = NEAR_ZERO + torch.linspace(0.1, 0.9, 9).tolist()
VARIANTS = [("dsm", "sigma2"), ("dsm", "none"), ("mixed", "none"), ("tsm", "alpha2")]


def mixtures() -> dict[str, GaussianMixture]:
    two = GaussianMixture([[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]], [0.5, 0.3, 0.2], scales=[0.4, 0.6, 0.5])
    g = torch.Generator().manual_seed(0)
    means = 2.0 * torch.randn(4, 10, generator=g, dtype=torch.float64)
    ten = GaussianMixture(means, [0.4, 0.3, 0.2, 0.1], scales=[0.5, 0.7, 0.6, 0.9])
    return {"2-d": two, "10-d": ten}


def score_error(model, mixture, process, times, n=4000, seed=7) -> float:
    gen = torch.Generator().manual_seed(seed)
    exact = noised_mixture_score(mixture, process)
    num = den = 0.0
    for tv in times:
        t = torch.full((n,), tv, dtype=torch.float64)
        xt, _ = process.marginal_sample(mixture.sample(n, gen), t, gen)
        with torch.no_grad():
            s = model(xt.float(), t.float()).double()
        e = exact(xt, t)
        num += float(((s - e) ** 2).sum(-1).mean())
        den += float((e**2).sum(-1).mean())
    return num / den


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n", type=int, default=10000, help="training points")
    args = parser.parse_args()
    torch.set_num_threads(1)
    process = VP()
    print(
        f"VP linear, ScoreMLP(d, 128, 3), {args.steps} Adam steps (batch 256, lr 3e-3 cosine), "
        f"n = {args.n}, {args.seeds} seeds"
    )
    print(
        f"{'target':6} {'loss':14} {'err t<=0.05 (mean, per seed)':44} {'err all t (mean)':>16} {'cpu s':>6}"
    )
    for name, mixture in mixtures().items():
        d = mixture.dim
        for loss, weighting in VARIANTS:
            near, overall, cpu = [], [], 0.0
            for seed in range(args.seeds):
                gen = torch.Generator().manual_seed(100 + seed)
                x0 = mixture.sample(args.n, gen, dtype=torch.float32)
                grad0 = mixture.score(x0.double()).float()
                model = ScoreMLP(d, 128, 3, process=process, seed=seed)
                cfg = TrainConfig(
                    num_steps=args.steps,
                    batch_size=256,
                    lr=3e-3,
                    ema_decay=0.995,
                    loss=loss,
                    weighting=weighting,
                    lr_schedule="cosine",
                )
                start = time.process_time()
                result = train_score_model(model, process, x0, grad0, config=cfg, generator=gen)
                cpu += time.process_time() - start
                near.append(score_error(result.model, mixture, process, NEAR_ZERO))
                overall.append(score_error(result.model, mixture, process, ALL_TIMES))
            per_seed = ", ".join(f"{v:.4f}" for v in near)
            label = f"{loss}/{weighting}"
            print(
                f"{name:6} {label:14} {sum(near) / len(near):.4f} ({per_seed}){'':6} "
                f"{sum(overall) / len(overall):16.4f} {cpu / args.seeds:6.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
