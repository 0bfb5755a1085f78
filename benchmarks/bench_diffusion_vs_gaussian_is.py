"""Diffusion sampler against per-mode Gaussian importance sampling on banana-shaped modes.

The diffusion model must earn its cost where modes are not Gaussian (issue 4). Target:
``diffstat.targets.banana_mixture(dim)`` (two twisted-Gaussian modes, weights 2/3 and 1/3, bent in
opposite directions; exact log Z, exact mode weights). Both methods run the same pipeline
(exploration, banking, restocking, one round of per-mode Gaussian importance sampling, then
``--rounds - 1`` rounds each preceded by restocking from the last round's weighted particles:
``--refresh-chains`` chains per mode, 40 MALA steps) with ``--num-proposals`` proposals per
round and ``--final-proposals`` in the last: per-mode Gaussians again for ``"gaussian_is"``, the
defensive diffusion mixture (one score model per mode, trained without further target
evaluations on the gradients already computed) for ``"diffusion"``. So both spend the same
number of target evaluations (printed; it counts exploration, restocking, the gradients used in
training and the proposals). The restocking is what the score models learn from (their fits are
limited by data), and it costs ``"gaussian_is"`` as much as ``"diffusion"``.

The figure of merit is the ESS of the last round: the Kish ESS of the raw weights and of the
Pareto-smoothed weights (PSIS), with the Pareto k of each round. Both methods' weights are
heavy-tailed here (k from 0.3 to 0.9): then one batch's Kish ESS is decided by its largest
weight, and the same proposal gave Kish ESS fractions from 0.04 to 0.76 over four batches of
4,096, so the last round is large (16,384) and the smoothed ESS is printed beside the raw one.
The pooled ESS of all rounds, the heavy-mode weight, the log Z error and each diffusion round's
choice per mode (0 = the score model, -1 = the Gaussian after the held-out check) are printed
too. One command prints the ratios for d = 4, 6 and 10 over seeds 0..9, per seed and as the
ratio of the mean ESS over the seeds (about 90 minutes on one core; split ``--dims``
over cores):

    python benchmarks/bench_diffusion_vs_gaussian_is.py [--dims 4 6 10] [--seeds 0 ... 9]
        [--train-steps 4000] [--rounds 3] [--num-proposals 4096] [--final-proposals 16384]
        [--refresh-chains 4096] [--diffusion-weight 0.9]
"""

from __future__ import annotations

import argparse
import time

import torch

import diffstat as ds
from diffstat.targets import banana_mixture


def run(method: str, dim: int, seed: int, args) -> dict:
    mix = banana_mixture(dim, log_normalizer=1.3)
    target = mix.as_target(dtype=torch.float64)
    options = dict(
        max_rounds=args.rounds,
        gaussian_rounds=1,
        target_ess=1.0,
        num_proposals=args.num_proposals,
        final_proposals=args.final_proposals,
        refresh_chains=args.refresh_chains,
        refresh_steps=40,
    )
    if method == "diffusion":
        options.update(
            train_steps=args.train_steps,
            refit_steps=args.train_steps // 2,
            diffusion_weight=args.diffusion_weight,
        )
    start = time.perf_counter()
    idata = ds.sample(target, method, num_samples=10_000, seed=seed, progress=False, **options)
    elapsed = time.perf_counter() - start
    attrs, group = idata.posterior.attrs, idata["diffusion"]
    x = torch.as_tensor(idata.posterior[target.name].values).reshape(-1, dim)
    heavy = float((mix.assign(x) == 0).double().mean())
    ess, frac = group["ess"].values, group["ess_fraction"].values
    return {
        "method": method,
        "dim": dim,
        "seed": seed,
        "evals": int(attrs["num_target_evals"]),
        "modes": int(attrs["num_modes"]),
        "ess_last": float(ess[-1]),
        "ess_frac_last": float(frac[-1]),
        "pareto_k": " ".join(f"{v:.2f}" for v in group["pareto_k"].values),
        "psis_last": float(group["ess_psis"].values[-1]),
        "psis_frac_last": float(group["ess_psis"].values[-1] / group["num_proposals"].values[-1]),
        "ess_pooled": float(ess.sum()),
        "ess_rounds": " ".join(f"{v:.3f}" for v in frac),
        "heavy": heavy,
        "logz_err": float(attrs["log_normalizer"] - 1.3),
        "logz_se": float(attrs["log_normalizer_se"]),
        "time": elapsed,
        "choice": " ".join("/".join(str(int(c)) for c in row) for row in group["model_choice"].values)
        if "model_choice" in group
        else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[4, 6, 10])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--train-steps", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-proposals", type=int, default=4096)
    parser.add_argument("--final-proposals", type=int, default=16384)
    parser.add_argument("--refresh-chains", type=int, default=4096)
    parser.add_argument("--diffusion-weight", type=float, default=0.9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    summary = []
    print(
        f"{'method':12s} {'d':>3s} {'seed':>4s} {'evals':>8s} {'K':>2s} {'ESS last':>9s} {'frac':>6s} "
        f"{'PSIS':>6s} {'ESS pool':>9s} {'w_heavy':>8s} {'logZ err':>9s} {'se':>6s} {'time':>7s}"
    )
    for dim in args.dims:
        ratios, means = (
            {"ess_last": [], "psis_last": []},
            {(m, key): 0.0 for m in ("gaussian_is", "diffusion") for key in ("ess_last", "psis_last")},
        )
        for seed in args.seeds:
            rows = {m: run(m, dim, seed, args) for m in ("gaussian_is", "diffusion")}
            for r in rows.values():
                print(
                    f"{r['method']:12s} {r['dim']:3d} {r['seed']:4d} {r['evals']:8d} {r['modes']:2d} "
                    f"{r['ess_last']:9.1f} {r['ess_frac_last']:6.3f} {r['psis_frac_last']:6.3f} "
                    f"{r['ess_pooled']:9.1f} {r['heavy']:8.4f} {r['logz_err']:+9.4f} {r['logz_se']:6.4f} "
                    f"{r['time']:7.1f}  ESS fraction by round: {r['ess_rounds']}; "
                    f"Pareto k by round: {r['pareto_k']}"
                    + (f"; model per mode by round: {r['choice']}" if r["method"] == "diffusion" else ""),
                    flush=True,
                )
            for key in ratios:
                ratios[key].append(rows["diffusion"][key] / rows["gaussian_is"][key])
                for m in ("gaussian_is", "diffusion"):
                    means[m, key] += rows[m][key] / len(args.seeds)
        summary.append(
            (dim, ratios, {key: means["diffusion", key] / means["gaussian_is", key] for key in ratios})
        )
        print(
            f"d={dim}: ESS ratio diffusion / gaussian_is (last round, equal evaluations): Kish "
            + ", ".join(f"{v:.2f}" for v in ratios["ess_last"])
            + "; Pareto-smoothed "
            + ", ".join(f"{v:.2f}" for v in ratios["psis_last"]),
            flush=True,
        )

    print(
        "summary: ESS ratio diffusion / gaussian_is in the last round at equal evaluations, "
        "per seed and as the ratio of the mean ESS over the seeds"
    )
    for dim, ratios, of_means in summary:
        for key, name in (("ess_last", "Kish"), ("psis_last", "Pareto-smoothed")):
            v = ratios[key]
            print(
                f"  d={dim:2d} {name:15s}: "
                + ", ".join(f"{x:.2f}" for x in v)
                + f"  (min {min(v):.2f}; {sum(x >= 3 for x in v)} of {len(v)} at least 3; "
                f"ratio of mean ESS {of_means[key]:.2f})"
            )


if __name__ == "__main__":
    main()
