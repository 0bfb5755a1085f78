"""Walk-jump and SMS on the banana, and SMS's cost on the audit's targets (docs/walk_jump_banana.md).

    python benchmarks/bench_walk_jump_banana.py banana --cases banana2 banana5 --seeds 0 1
    python benchmarks/bench_walk_jump_banana.py sms-cost --cases mix6 nw11 banana2 student_t --seeds 0

``banana``: ``ds.sample(target, method, num_samples=1000, seed=s)`` at the defaults, with and without
the population's repair moves (``estimator_options={"population_options": {"repair_moves": 0}}`` is
the code before them), side by side: the largest |mean error| in sds, the sd of every coordinate,
evaluations, seconds.

``sms-cost``: one score fitted per (case, seed) (``fit_smoothed_score``, the defaults), then SMS's
1,000 x 4 draws from it: "before" with the kernel in one block (the code before the blocks), "after"
at the defaults (the same sigma, the kernel in blocks), and "log_concave" with the smaller sigma of
``log_concave_sigma`` (below) on the score's particles (tried, not adopted); ``--runs`` picks them.
Seconds of each and of the kernel, sigma, M, evaluations, and the errors (mean, sd, mode TV) against
the exact answers of ``benchmarks/audit_cases.py``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import warnings

import numpy as np
import torch

import diffstat as ds
import diffstat.smoothing.learned as learned_mod
from diffstat.smoothing.fit import fit_smoothed_score

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from audit_cases import CASES  # noqa: E402

torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=FutureWarning)


def errors(x: np.ndarray, exact: dict) -> dict:
    """Largest |mean error| in sds, largest relative sd error, the sds, and the mode TV where known."""
    row = {
        "mean_err": float(np.max(np.abs(x.mean(0) - exact["mean"]) / exact["sd"])),
        "sd_err": float(np.max(np.abs(x.std(0) / exact["sd"] - 1))),
        "sds": np.round(x.std(0), 3).tolist(),
    }
    if "weights" in exact:
        k = exact["assign"](torch.as_tensor(x, dtype=torch.float64)).numpy()
        share = np.bincount(k, minlength=len(exact["weights"])) / len(k)
        row["mode_tv"] = float(0.5 * np.abs(share - exact["weights"]).sum())
    return row


def banana(cases, methods, seeds) -> None:
    print("| case | method | seed | repair | mean err (sd) | sd err | sds | evals | s | RuntimeWarnings |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for case in cases:
        for method in methods:
            for seed in seeds:
                for repair in (False, True):
                    target, exact = CASES[case]()
                    opts = (
                        {} if repair else {"estimator_options": {"population_options": {"repair_moves": 0}}}
                    )
                    t0 = time.perf_counter()
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always", RuntimeWarning)
                        idata = ds.sample(target, method, num_samples=1000, seed=seed, progress=False, **opts)
                    sec = time.perf_counter() - t0
                    x = idata.posterior["x"].values.reshape(-1, target.dim)
                    e = errors(x, exact)
                    warned = "; ".join(
                        str(w.message)[:60] for w in caught if issubclass(w.category, RuntimeWarning)
                    )
                    print(
                        f"| {case} | {method} | {seed} | {'yes' if repair else 'no'} | {e['mean_err']:.3f} | "
                        f"{e['sd_err']:.3f} | {e['sds']} | {idata.posterior.attrs['num_target_evals']:,} | "
                        f"{sec:.0f} | {warned or '-'} |",
                        flush=True,
                    )


class _KernelClock:
    """Seconds spent in the learned score's kernel (wraps ``LearnedSmoothedScore._kernel``)."""

    def __init__(self):
        self.seconds, self._orig = 0.0, learned_mod.LearnedSmoothedScore._kernel
        clock = self

        def timed(score, y, sigma):
            t0 = time.perf_counter()
            out = clock._orig(score, y, sigma)
            clock.seconds += time.perf_counter() - t0
            return out

        learned_mod.LearnedSmoothedScore._kernel = timed


def log_concave_sigma(
    x: torch.Tensor, generator: torch.Generator, upper: float, num_points: int = 512, margin: float = 0.5
) -> float:
    r"""The smallest noise, on a grid falling from ``upper`` by factors :math:`2^{1/4}`, at which the
    smoothed empirical law of the particles ``x: (n, d)`` is log-concave with a margin along the lines
    between particles: :math:`\operatorname{Var}(e^\top X \mid y) \le` ``margin`` :math:`\sigma^2` at
    every test point :math:`y = x_i + u (x_j - x_i)` (``num_points`` random pairs, :math:`u \sim U(0,
    1)`), :math:`e` the unit vector from :math:`x_i` to :math:`x_j` and the posterior that of :math:`X`
    uniform on the particles given :math:`y = X + \sigma Z`; ``upper`` when that fails at once.

    :math:`\nabla^2 \log q_\sigma(y) = (\operatorname{Cov}(X\mid y) - \sigma^2 I)/\sigma^4`, so
    :math:`q_\sigma` is log-concave where the posterior variance stays below :math:`\sigma^2`; between
    two modes :math:`R` apart it peaks at the balance point, :math:`R^2/4` plus the within-mode
    variance, along the line joining them (a line between two particles of the two modes passes
    there). This is the condition SMS's diameter rule secures with room to spare (:math:`\sigma^2 = R^2
    - \tau^2`, about four times the peak); the margin 1/2 keeps a factor of two, and SMS's
    measurements :math:`M \propto \sigma^2` fall with it. Not SMS's default: on the 6-d two-mode
    mixture its mode weights were further off than with the diameter rule on the same scores
    (docs/walk_jump_banana.md). The scan stops at the first failure, so the empirical law's own
    bumps, which fail at small noise, only stop it early (a larger sigma). Was
    ``diffstat.smoothing.geometry.log_concave_sigma`` (removed from the package: nothing used it)."""
    xs = x.double()
    pairs = torch.randint(0, xs.shape[0], (2, num_points), generator=generator, device=generator.device)
    a, b = xs[pairs[0].to(xs.device)], xs[pairs[1].to(xs.device)]
    u = torch.rand(num_points, 1, generator=generator, dtype=xs.dtype, device=generator.device).to(xs)
    y, e = a + u * (b - a), torch.nn.functional.normalize(b - a, dim=-1)
    d2 = torch.cdist(y, xs).pow(2)
    proj = e @ xs.T  # (points, n): each particle along each test point's line
    best, s = upper, upper
    for _ in range(40):
        w = torch.softmax(-d2 / (2 * s * s), -1)
        var = (w * proj**2).sum(-1) - (w * proj).sum(-1) ** 2
        if float(var.max()) > margin * s * s:
            break
        best, s = s, s / 2**0.25
    return best


def sms_cost(cases, seeds, runs=("before", "after", "log_concave")) -> None:
    clock = _KernelClock()
    print("| case | seed | run | sigma | M | s | kernel s | evals | mean err (sd) | sd err | mode TV |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    block = learned_mod._KERNEL_BLOCK
    for case in cases:
        for seed in seeds:
            target, exact = CASES[case]()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                score = fit_smoothed_score(target, generator=torch.Generator().manual_seed(seed))
            geo = score.geometry
            old_sigma = max(geo["diameter"], geo["scale"])
            lc_sigma = log_concave_sigma(
                score.particles["x"][:1024], torch.Generator().manual_seed(seed), old_sigma
            )
            variants = (
                ("before", {"sigma": old_sigma}, 1 << 62),
                ("after", {}, block),
                ("log_concave", {"sigma": lc_sigma}, block),
            )
            for name, opts, kernel_block in variants:
                if name not in runs:
                    continue
                learned_mod._KERNEL_BLOCK = kernel_block
                clock.seconds, evals0, t0 = 0.0, target.num_target_evals, time.perf_counter()
                idata = ds.sample(
                    target, "sms", num_samples=1000, seed=seed, progress=False, smoothed_score=score, **opts
                )
                sec = time.perf_counter() - t0
                a = idata.posterior.attrs
                e = errors(idata.posterior["x"].values.reshape(-1, target.dim), exact)
                tv = f"{e['mode_tv']:.3f}" if "mode_tv" in e else "-"
                print(
                    f"| {case} | {seed} | {name} | {a['sigma']:.2f} | {a['num_measurements']} | {sec:.0f} | "
                    f"{clock.seconds:.0f} | {target.num_target_evals - evals0:,} | {e['mean_err']:.3f} | "
                    f"{e['sd_err']:.3f} | {tv} |",
                    flush=True,
                )
            learned_mod._KERNEL_BLOCK = block


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["banana", "sms-cost"])
    parser.add_argument("--cases", nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", default=["walk_jump", "sms"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument(
        "--runs", nargs="+", default=["before", "after", "log_concave"], help="sms-cost: which runs"
    )
    args = parser.parse_args()
    if args.what == "banana":
        banana(args.cases or ["banana2"], args.methods, args.seeds)
    else:
        sms_cost(args.cases or ["mix6", "nw11", "banana2", "student_t"], args.seeds, args.runs)


if __name__ == "__main__":
    main()
