"""SMS and walk-jump from the log-density alone with the learned smoothed score (issue 17).

For each target and seed: fit the score (``ds.smoothing.fit_smoothed_score``), run SMS with it (the
first batch: its evaluations per draw include the fit's), then a second SMS batch and a walk-jump
batch from the kept score (only the final MALA correction and the score's check evaluate the
target). Every batch is 4 chains of ``draws / 4`` (the contract: a chain an independent run; for
walk-jump each chain's walkers jump once, the default with a learned score). Printed side by side:
heavy-mode weight (mixtures with two modes), total variation of the mode weights and its
multinomial noise floor (the expected TV of ``draws`` exact draws, ``TV floor``), evaluations per
draw, seconds (wall and CPU: the machine the figures were measured on was shared, so CPU time is the
fairer figure), divergent and non-finite draws; without exact mode weights, against the exact
moments (funnel) or a long NUTS run (ionosphere, 4 x 5,000 draws), the largest error of a
coordinate's mean in units of its reference sd (``mean/sd``), of its sd, relative (``sd rel``), and
of the first coordinate's sd (``sd rel x1``: the funnel's other coordinates have fourth moment
:math:`3e^{18}`, so their sample sds are of no use at this size). The first batch's figures include
the fit's.

    python benchmarks/bench_sms_learned.py --targets two_modes8,two_modes32,two_modes64 --seeds 0,1,2
    python benchmarks/bench_sms_learned.py --targets two_modes64w3 --seeds 0   # weights 3:1, as issue 17
    python benchmarks/bench_sms_learned.py --targets narrow_wide10,nine_modes,funnel10,ionosphere \
        --seeds 0 [--batches "sms 1st,jms 2nd"] [--draws 4000]
    python benchmarks/bench_sms_learned.py --targets funnel10 --seeds 0,1,2 --draws 1000 \
        --batches "sms 1st,walk-jump 2nd" [--fit "{'population_options': {'fallback': None}}"]
    python benchmarks/bench_sms_learned.py --targets funnel10 --seeds 0,1,2 --draws 1000 \
        --batches "walk-jump 2nd" --scores /tmp/scores [--walk-jump "{'sigma': 1.0}"]

``--scores DIR`` keeps each fitted score in ``DIR/<target>_<seed>.pt`` and loads it from there when present
(the fit's evaluations and seconds are then those stored, its seconds not re-measured); ``--walk-jump``
passes options to the walk-jump batch (``sigma=1.0``: the noise before a failed network's score moved the
walk to the kernel's noise, docs/sms.md).

Funnel(10) is also compared with a long NUTS run (``NUTS ...`` columns, :data:`NUTS_FUNNEL10`), and
the population's sd of :math:`x_1` and its source are printed.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import time
import warnings

import torch

import diffstat as ds
from diffstat.smoothing.fit import fit_smoothed_score
from diffstat.smoothing.learned import LearnedSmoothedScore


def make(name: str):
    """``(target, mixture or None)``; every target from its log-density only."""
    from diffstat import targets

    if name.startswith("two_modes"):  # "two_modes64": weights 2:1 (SLIPS); "two_modes64w3": 3:1 (issue 17)
        dim, _, heavy = name[len("two_modes") :].partition("w")
        gm = targets.two_modes(int(dim), weights=(float(heavy or 2), 1.0))
    elif name.startswith("narrow_wide"):
        gm = targets.narrow_wide(int(name[len("narrow_wide") :]))
    elif name == "nine_modes":
        gm = targets.nine_modes()
    elif name.startswith("funnel"):
        return targets.Funnel(int(name[len("funnel") :])).as_target(dtype=torch.float64), None
    elif name == "ionosphere":
        model = targets.ionosphere()
        return model.as_target(dtype=torch.float64), None
    else:
        raise ValueError(name)
    return gm.as_target(dtype=torch.float64), gm


#: A long NUTS run of funnel(10), the issue's comparison (``ds.sample(Funnel(10).as_target(dtype=torch.
#: float64), "nuts", num_chains=4, num_samples=5000, num_warmup=2000, seed=0)``, at a5bda7c:
#: 1.81M evaluations, 1,167 s, 1,845 divergent transitions, R-hat 1.08 on x_1, 1% quantile of x_1 -4.57
#: for -6.98): per-coordinate mean and sd, computed once and stored (docs/sms.md).
NUTS_FUNNEL10 = (
    [-0.1989, -0.0613, 0.0830, 0.0716, -0.0139, -0.1923, 0.0117, 0.1001, -0.0245, 0.0223],
    [2.7199, 5.7802, 6.1562, 6.5099, 5.1767, 5.8597, 5.5930, 5.5703, 5.8901, 5.3262],
)


@functools.cache
def reference_moments(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, sd)`` per coordinate: exact for the funnel, else a long NUTS run (4 x 5,000 draws)."""
    from diffstat import targets

    if name.startswith("funnel"):
        funnel = targets.Funnel(int(name[len("funnel") :]))
        return funnel.mean, funnel.variance.sqrt()
    target, _ = make(name)
    idata = ds.sample(target, "nuts", num_samples=5000, num_chains=4, seed=99, progress=False)
    x = torch.as_tensor(idata.posterior[list(idata.posterior.data_vars)[0]].values).reshape(-1, target.dim)
    return x.mean(0), x.std(0)


def tv_floor(weights: torch.Tensor, n: int) -> float:
    r"""Expected TV between ``weights`` and the frequencies of ``n`` exact draws (normal approximation:
    half the sum of :math:`\sqrt{2 w_k (1 - w_k) / (\pi n)}`)."""
    return 0.5 * float((2 * weights * (1 - weights) / (math.pi * n)).sqrt().sum())


def summary(name, gm, idata, evals: int, seconds: float, cpu: float) -> dict:
    x = torch.as_tensor(idata.posterior[list(idata.posterior.data_vars)[0]].values)
    x = x.reshape(-1, x.shape[-1])
    n = x.shape[0]
    out = {
        "evals/draw": evals / n,
        "wall_s": seconds,
        "cpu_s": cpu,
        "div": int(idata.sample_stats["diverging"].values.sum()),
        "nan": int((~torch.isfinite(x).all(-1)).sum()),
    }
    if gm is not None:
        w = torch.bincount(gm.assign(x[torch.isfinite(x).all(-1)]), minlength=gm.num_components).double() / n
        out["heavy"] = float(w[int(gm.weights.argmax())])
        out["TV"] = 0.5 * float((w - gm.weights).abs().sum())
        out["TV floor"] = tv_floor(gm.weights, n)
    else:
        mean, sd = reference_moments(name)
        ok = x[torch.isfinite(x).all(-1)].double()
        out["mean/sd"] = float(((ok.mean(0) - mean) / sd).abs().max())
        out["sd rel"] = float((ok.std(0) / sd - 1).abs().max())
        out["sd rel x1"] = float((ok[:, 0].std() / sd[0] - 1).abs())  # the funnel's Gaussian coordinate
        if name == "funnel10":  # also against the long NUTS run, the reference
            mean, sd = (torch.tensor(v, dtype=torch.float64) for v in NUTS_FUNNEL10)
            out["NUTS mean/sd"] = float(((ok.mean(0) - mean) / sd).abs().max())
            out["NUTS sd rel"] = float((ok.std(0) / sd - 1).abs().max())
            out["NUTS sd rel x1"] = float((ok[:, 0].std() / sd[0] - 1).abs())
            out["sd x1"] = float(ok[:, 0].std())
    out["draws"] = n
    return out


#: The batches: label, method, options beyond 4 chains of ``draws / 4``.
BATCHES = {
    "sms 1st": ("sms", {}),
    "sms 2nd": ("sms", {}),
    "jms 2nd": ("sms", dict(variant="jms", jms_steps=200)),
    "walk-jump 2nd": ("walk_jump", {}),
}


def fitted(target, name: str, seed: int, fit_options: dict, scores: str | None):
    """The fitted score, from ``scores/<name>_<seed>.pt`` when there (and kept there when fitted)."""
    path = os.path.join(scores, f"{name}_{seed}.pt") if scores else None
    if path and os.path.exists(path):
        return LearnedSmoothedScore.load(path)
    score = fit_smoothed_score(target, seed=seed, **fit_options)
    if path:
        score.save(path)
    return score


def run(name: str, seed: int, num_draws: int, fit_options: dict, batches: list[str], args=None) -> None:
    target, gm = make(name)
    t0, c0 = time.perf_counter(), time.process_time()
    scores, wj_options = (args.scores, eval(args.walk_jump)) if args is not None else (None, {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score = fitted(target, name, seed, fit_options, scores)
        fit_s, fit_cpu = time.perf_counter() - t0, time.process_time() - c0
        fit_evals = score.info["num_target_evals"]
        rows = {}
        for label in batches:
            method, extra = BATCHES[label]
            options = dict(num_chains=4, num_samples=num_draws // 4, **extra)
            if method == "walk_jump":
                options.update(wj_options)
            target.num_target_evals = 0
            t1, c1 = time.perf_counter(), time.process_time()
            idata = ds.sample(
                target,
                method,
                seed=seed + (7 if "2nd" in label else 0),
                progress=False,
                smoothed_score=score,
                **options,
            )
            secs, cpu = time.perf_counter() - t1, time.process_time() - c1
            evals = idata.posterior.attrs["num_target_evals"]
            if label == "sms 1st":
                evals, secs, cpu = evals + fit_evals, secs + fit_s, cpu + fit_cpu
            rows[label] = summary(name, gm, idata, evals, secs, cpu)
            cells = " ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[label].items()
            )
            if method == "walk_jump":
                attrs = idata.posterior.attrs
                cells += f" sigma {attrs['sigma']:.3g} ({attrs['sigma_rule']})"
                cells += f" drift {attrs.get('walk_spread_drift', math.nan):.3f}"
            print(f"  {name} seed {seed} {label:14s} {cells}", flush=True)
    exact = f" (exact {float(gm.weights.max()):.3f})" if gm is not None else ""
    print(
        f"{name} seed {seed}: fit {fit_evals} evals, {fit_s:.0f} s wall, {fit_cpu:.0f} s cpu, "
        f"held-out Fisher divergence {score.info['fisher_divergence']:.3g}{exact}, population "
        f"{score.info['population']!r}, its sd of x_1 {float(score.particles['x'][:, 0].std()):.3f}",
        flush=True,
    )
    for w in {str(w.message)[:160] for w in caught if issubclass(w.category, RuntimeWarning)}:
        print("  warning:", w, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", default="two_modes8,narrow_wide10,nine_modes")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--batches",
        default="sms 1st,sms 2nd,walk-jump 2nd",
        help=f"comma-separated, of {list(BATCHES)} (the joint variant is slow: M * d coordinates)",
    )
    parser.add_argument("--fit", default="{}", help="fit_smoothed_score options, a Python dict literal")
    parser.add_argument("--scores", default=None, help="a folder to keep and reuse the fitted scores in")
    parser.add_argument("--walk-jump", default="{}", help="options of the walk-jump batch, a dict literal")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.targets.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            run(name, seed, args.draws, eval(args.fit), args.batches.split(","), args)


if __name__ == "__main__":
    main()
