"""The known failure of tempering, measured: SMC and PT on the 10-d narrow-heavy / wide-light mixture.

Target (REFERENCES.md, ``diffstat.targets.narrow_wide``): 0.75 N(1.5 1, 0.4^2 I) + 0.25 N(-1.5 1, I)
in d = 10, with log Z = 0. Both methods start from a wide Gaussian reference N(0, 4^2 I). Along the
geometric path the narrow mode's share of pi_beta collapses at intermediate beta (a narrow mode
flattens faster than a wide one), so particles and tempered chains end in the wide mode and the
estimated heavy-mode weight and log Z fall short (log Z by up to log 0.25 = -1.39 when the heavy
mode is lost entirely). The per-beta mode shares of the path are printed first (closed form).

For each method and seed the script prints the heavy mode's weight among the draws (nearest
component), the log Z error, the number of target evaluations and the seconds taken.

    python benchmarks/bench_tempering_failure.py [--seeds 3] [--particles 2000] [--pt-chains 16]
        [--pt-samples 2000] [--pt-temperatures 16] [--reference-sd 4] [--quick]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import diffstat as ds

try:
    from diffstat.targets import narrow_wide
except ImportError:  # older trees: build the mixture inline
    from diffstat.targets import GaussianMixture

    def narrow_wide(dim=10, offset=1.5):
        ones = torch.ones(dim, dtype=torch.float64)
        return GaussianMixture(torch.stack([offset * ones, -offset * ones]), [0.75, 0.25], scales=[0.4, 1.0])


def path_shares(gm, ref_sd: float, betas) -> list[float]:
    """Share of the heavy (narrow) mode under pi_beta = ref^(1-beta) target^beta, treating the two
    well-separated components separately: each term is a product of Gaussian powers, integrated in
    closed form, coordinate by coordinate."""
    d = gm.dim
    out = []
    for b in betas:
        logs = []
        for mu, w, s in zip(gm.means, gm.weights, gm.covs[:, 0, 0].sqrt()):
            prec = (1 - b) / ref_sd**2 + b / s**2
            m = (b * mu / s**2) / prec
            log_c = (
                (1 - b) * (-0.5 * math.log(2 * math.pi * ref_sd**2))
                + b * (-0.5 * math.log(2 * math.pi * float(s) ** 2))
                + 0.5 * math.log(2 * math.pi / prec)
            )
            quad = -0.5 * b * float((mu**2).sum()) / float(s) ** 2 + 0.5 * prec * float((m**2).sum())
            logs.append(b * math.log(float(w)) + d * log_c + quad)
        out.append(1.0 / (1.0 + math.exp(logs[1] - logs[0])))
    return out


def run(target, gm, method, seed, reference, **options):
    start = time.perf_counter()
    idata = ds.sample(target, method, seed=seed, progress=False, reference=reference, **options)
    seconds = time.perf_counter() - start
    x = torch.as_tensor(idata.posterior.x.values).reshape(-1, gm.dim)
    heavy = float((gm.assign(x) == 0).double().mean())
    attrs = idata.posterior.attrs
    return (
        heavy,
        attrs["log_normalizer"] - gm.log_normalizer,
        attrs.get("log_normalizer_se", math.nan),
        attrs["num_target_evals"],
        seconds,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--particles", type=int, default=2000)
    parser.add_argument("--pt-chains", type=int, default=16)
    parser.add_argument("--pt-samples", type=int, default=2000)
    parser.add_argument("--pt-temperatures", type=int, default=16)
    parser.add_argument("--reference-sd", type=float, default=4.0)
    parser.add_argument("--quick", action="store_true", help="small budgets (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.particles, args.pt_chains, args.pt_samples = 1, 500, 4, 200
    torch.set_num_threads(1)

    gm = narrow_wide(10)
    target = gm.as_target(dtype=torch.float64)
    d = gm.dim
    reference = torch.distributions.Independent(
        torch.distributions.Normal(
            torch.zeros(d, dtype=torch.float64), args.reference_sd * torch.ones(d, dtype=torch.float64)
        ),
        1,
    )
    betas = [1e-3, 1e-2, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0]
    print(
        f"narrow-wide mixture, d = {d}, true heavy weight 0.75, log Z = {gm.log_normalizer}; "
        f"reference N(0, {args.reference_sd:g}^2 I)"
    )
    print("heavy-mode share of pi_beta along the path:")
    print(
        "  "
        + "  ".join(f"b={b:g}: {s:.3f}" for b, s in zip(betas, path_shares(gm, args.reference_sd, betas)))
    )

    configs = [
        ("smc", "smc (target_ess 0.5)", dict(num_samples=args.particles, num_chains=1)),
        ("smc", "smc (target_ess 0.9)", dict(num_samples=args.particles, num_chains=1, target_ess=0.9)),
        (
            "pt",
            f"pt ({args.pt_temperatures} temperatures)",
            dict(
                num_samples=args.pt_samples, num_chains=args.pt_chains, num_temperatures=args.pt_temperatures
            ),
        ),
    ]
    print(
        f"{'method':<28}{'seed':>5}{'heavy weight':>14}{'log Z err':>11}{'se':>8}"
        f"{'target evals':>14}{'seconds':>9}"
    )
    for method, label, options in configs:
        rows = []
        for seed in range(args.seeds):
            heavy, err, se, evals, seconds = run(target, gm, method, seed, reference, **options)
            rows.append((heavy, err, evals, seconds))
            print(
                f"{label:<28}{seed:>5}{heavy:>14.3f}{err:>11.3f}{se:>8.3f}{evals:>14d}{seconds:>9.1f}",
                flush=True,
            )
        mean = [sum(r[i] for r in rows) / len(rows) for i in range(4)]
        print(
            f"{label + ' (mean)':<28}{'':>5}{mean[0]:>14.3f}{mean[1]:>11.3f}{'':>8}"
            f"{int(mean[2]):>14d}{mean[3]:>9.1f}"
        )


if __name__ == "__main__":
    main()
