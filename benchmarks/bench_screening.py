"""How often the diffusion sampler's exploration finds a narrow heavy mode hidden behind a wide
light one: ``explore_modes`` (``diffstat/diffusion/modes.py``) alone, over many seeds, for several
screening configurations at about equal evaluations.

Targets: ``narrow_wide(d, scales=(s, 1))`` (heavy mode N(1.5 1, s^2 I), weight 0.75; light N(-1.5 1, I)),
reference N(0, r^2 I). A configuration ``starts:steps`` screens ``starts`` starts by ``steps`` MALA
steps each and goes on with 2,000 of them (the sampler's ``num_explore``), half the highest in
log-density and half at random. Prints, per geometry and configuration, on how many seeds the bank
holds the heavy mode, and the bank's evaluations (the last seed's; they vary by under 1%).

    python benchmarks/bench_screening.py [--seeds 20] [--geometries 12:0.25:4 14:0.3:4 12:0.3:4 12:0.3:1]
        [--configs 32000:6 72000:2 108000:1 56000:3]
"""

from __future__ import annotations

import argparse

import torch
from torch.distributions import Independent, Normal

from diffstat.diffusion.modes import explore_modes
from diffstat.targets import narrow_wide


def found(dim: int, sd: float, ref: float, starts: int, steps: int, seeds: int) -> tuple[int, int]:
    """Seeds (of ``seeds``) whose bank holds the heavy mode, and the last bank's evaluations."""
    mix = narrow_wide(dim, scales=(sd, 1.0))
    hits, evals = 0, 0
    for seed in range(seeds):
        reference = Independent(Normal(torch.zeros(dim, dtype=torch.float64), ref), 1)
        target = mix.as_target(dtype=torch.float64, reference=reference)
        bank = explore_modes(
            target,
            torch.Generator().manual_seed(seed),
            num_chains=2000,
            num_screen=starts,
            screen_steps=steps,
        )
        hits += bool((mix.assign(bank.centers) == 0).any())
        evals = bank.num_evals
    return hits, evals


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--geometries", nargs="+", default=["12:0.25:4", "14:0.3:4", "12:0.3:4", "12:0.3:1"])
    parser.add_argument("--configs", nargs="+", default=["32000:6", "72000:2", "108000:1", "56000:3"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| d | heavy sd | reference sd | starts | screening steps | seeds found | evaluations |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for geometry in args.geometries:
        dim, sd, ref = geometry.split(":")
        for config in args.configs:
            starts, steps = (int(v) for v in config.split(":"))
            hits, evals = found(int(dim), float(sd), float(ref), starts, steps, args.seeds)
            print(
                f"| {dim} | {sd} | {ref} | {starts:,} | {steps} | {hits} of {args.seeds} | {evals:,} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
