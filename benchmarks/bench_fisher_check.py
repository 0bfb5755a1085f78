"""The learned smoothed score's held-out Fisher check before and after it was made scale-free (issue 17's
false alarm on the audit's ridge2; docs/sms.md, "The Fisher check").

For each target and seed: fit the score (``fit_smoothed_score``, the defaults unless a case says
otherwise) and print, on its held-out particles at the check's noise sigma_0 (the smallest trained one):

- ``plain``: sum |s - grad log p|^2 / sum |grad log p|^2 (the statistic before);
- ``whitened``: the same in the Fisher information's metric, against grad log p unsmoothed;
- ``new``: ``LearnedSmoothedScore.check`` (the metric and the smoothed reference of
  ``diffstat.smoothing.fisher_check``), the value ``fit_smoothed_score`` now warns on above 0.1;
- for a Gaussian target (``ridge2``) also ``exact plain``: the plain ratio of the exact smoothed score
  at sigma_0, and ``net vs exact``: the new statistic's numerator with the exact smoothed score in place
  of the reference (the network's own error), over the same denominator.

Cases: the audit's ``ridge2``, ``two_modes8``, ``narrow_wide10``, ``nine_modes`` (the targets of
``bench_sms_learned.py``), ``nine_modes_4k`` (4,000 training steps, the warning's advice),
``two_step`` (two_modes(2), 256 particles, 2 training steps) and ``cheap_funnel3`` (Funnel(3), 256
particles, 50 steps, a small population); ``--other`` also checks the ridge2 score against the mirrored
ridge (correlation -0.995) and the ridge with its narrow sd doubled.

    python benchmarks/bench_fisher_check.py --cases ridge2 two_modes8 narrow_wide10 nine_modes --seeds 0 1 2
    python benchmarks/bench_fisher_check.py --cases ridge2 nine_modes_4k two_step cheap_funnel3 \
        --seeds 0 --other
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import warnings

import torch

from diffstat import targets
from diffstat.smoothing.fit import fit_smoothed_score

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from audit_cases import correlated_2d  # noqa: E402

torch.set_num_threads(1)
F64 = torch.float64
RIDGE_COV = torch.tensor([[1.0, 99.5], [99.5, 1e4]], dtype=F64)
CHEAP_POP = dict(chains_per_mode=64, num_proposals=1024)

CASES = {
    "ridge2": (lambda: correlated_2d()[0], {}),
    "two_modes8": (lambda: targets.two_modes(8).as_target(dtype=F64), {}),
    "narrow_wide10": (lambda: targets.narrow_wide(10).as_target(dtype=F64), {}),
    "nine_modes": (lambda: targets.nine_modes().as_target(dtype=F64), {}),
    "nine_modes_4k": (lambda: targets.nine_modes().as_target(dtype=F64), dict(train_steps=4000)),
    "two_step": (lambda: targets.two_modes(2).as_target(dtype=F64), dict(num_particles=256, train_steps=2)),
    "cheap_funnel3": (
        lambda: targets.Funnel(3).as_target(dtype=F64),
        dict(num_particles=256, train_steps=50, population_options=CHEAP_POP),
    ),
}


def statistics(score, case: str) -> dict:
    """The columns of the module doc on the score's held-out particles."""
    x, g = score.particles["held_x"].double(), score.particles["held_grad"].double()
    t = torch.tensor(float(score.process.t_min), dtype=F64)
    s0 = score.scale * float(score.process.sigma(t) / score.process.alpha(t))
    s = score(x, s0).double()
    finv = torch.linalg.inv(score.fisher_information())

    def quad(a):
        return float(((a @ finv) * a).sum())

    row = {
        "sigma_0": s0,
        "plain": float(((s - g) ** 2).sum() / (g**2).sum()),
        "whitened": quad(s - g) / quad(g),
        "new": score.check()["fisher_divergence"],
    }
    if case == "ridge2":
        exact = -torch.linalg.solve(RIDGE_COV + s0**2 * torch.eye(2, dtype=F64), x.T).T
        row["exact plain"] = float(((exact - g) ** 2).sum() / (g**2).sum())
        row["net vs exact"] = quad(s - exact) / quad(g)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="+", default=["ridge2"], choices=sorted(CASES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--other", action="store_true")
    args = parser.parse_args()
    cols = ["sigma_0", "plain", "whitened", "new", "exact plain", "net vs exact"]
    print("| case | seed | " + " | ".join(cols) + " | fit warned | fit s |")
    print("| --- " * (len(cols) + 4) + "|")
    for case in args.cases:
        make, options = CASES[case]
        for seed in args.seeds:
            target, t0 = make(), time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                score = fit_smoothed_score(target, seed=seed, **options)
            warned = any("Fisher divergence" in str(w.message) for w in caught)
            row = statistics(score, case)
            cells = [f"{row[c]:.3g}" if c in row else "-" for c in cols]
            print(
                f"| {case} | {seed} | "
                + " | ".join(cells)
                + f" | {warned} | {time.perf_counter() - t0:.0f} |"
            )
            if args.other and case == "ridge2":
                for label, other in (
                    ("mirrored", (-0.995, (1.0, 100.0))),
                    ("narrow x2", (0.995, (2.0, 100.0))),
                ):
                    check = score.check(correlated_2d(*other)[0])
                    print(f"|   checked against the {label} ridge | | new {check['fisher_divergence']:.3g}, "
                          f"log-density mismatch {check['log_prob_mismatch']:.3g} |")  # fmt: skip


if __name__ == "__main__":
    main()
