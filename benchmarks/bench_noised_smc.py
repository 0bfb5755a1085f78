"""The particle denoising diffusion sampler (``method="pdds"``) against adaptive tempered SMC.

For each target and seed: log Z error against the exact value (ionosphere: the literature value
-111.56), the reported standard error and |error| / se, a mode metric, target evaluations and
seconds, for ``pdds`` (defaults) and ``smc`` (MALA moves, ``num_mcmc_steps`` raised toward a
similar number of evaluations). Both start from the same reference (a wide Gaussian, the prior for
ionosphere). Mode metrics: total variation of nearest-mode shares (mixtures; narrow_wide also the
heavy mode's share, exact 0.75; gmm40 also the number of modes holding draws), sd of x_1 (funnel,
exact 3), share of the pairs in the right well (many-well, exact ``well_probability``).

Run (one thread; about 10 minutes for everything)::

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_noised_smc.py --seeds 0 1 2
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_noised_smc.py --targets nine_modes --seeds 0
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_noised_smc.py --targets funnel --no-smc \
        --chains 4 --particles 500 --pdds num_mcmc_steps=None kernel="'local_mala'"

``--pdds key=value`` passes options to pdds (values read as Python literals); WARN marks a run that
raised a RuntimeWarning (pdds: its reliability warning). The learned guidance at equal evaluations
(two rounds of 1000 particles against one of 2000; ``--learned NAME=value`` sets a constant of
``diffstat.diffusion.noised_smc_learned``, e.g. ``MIX_SHIFT=2.0``; ``r1`` is round 1's error)::

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_noised_smc.py --no-smc --seeds 0 1 2 \
        --targets funnel ionosphere narrow_wide nine_modes --particles 1000 --pdds num_rounds=2

A NUTS population's mixture (``population="nuts"``, docs/noised_smc.md; 900 particles keep a
funnel(10) run under 1M evaluations with the population)::

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_noised_smc.py --no-smc --seeds 0 1 2 \
        --targets funnel --particles 900 --pdds population="'nuts'"
"""

from __future__ import annotations

import argparse
import ast
import time
import warnings

import torch

import diffstat as ds
from diffstat import targets as T
from diffstat.diffusion import noised_smc_learned as learned

warnings.filterwarnings("ignore", category=FutureWarning)
#: Literature log Z of the ionosphere posterior (standardised features, N(0, 1) priors).
IONOSPHERE_LOG_Z = -111.56


def wide(dim: int, scale: float):
    zeros = torch.zeros(dim, dtype=torch.float64)
    return torch.distributions.Independent(
        torch.distributions.Normal(zeros, scale * torch.ones_like(zeros)), 1
    )


def mixture_metric(gm, heavy: bool = False):
    def metric(x):
        share = torch.bincount(gm.assign(x), minlength=gm.num_components).double() / x.shape[0]
        out = f"TV {0.5 * float((share - gm.weights).abs().sum()):.3f}"
        if heavy:
            out += f" heavy {float(share[0]):.3f}"
        if gm.num_components > 9:
            out += f" modes {int((share > 0).sum())}/{gm.num_components}"
        return out

    return metric


def problems():
    nw, nine, g40 = T.narrow_wide(10), T.nine_modes(), T.gmm40()
    funnel, well, ion = T.Funnel(10), T.ManyWell(32), T.ionosphere()
    q = float(well.well_probability)
    return {
        "narrow_wide": (
            ds.Target(nw.unnormalized_log_prob, 10, reference=wide(10, 4.0), dtype=torch.float64),
            nw.log_normalizer,
            mixture_metric(nw, heavy=True),
        ),
        "nine_modes": (
            ds.Target(nine.unnormalized_log_prob, 2, reference=wide(2, 6.0), dtype=torch.float64),
            nine.log_normalizer,
            mixture_metric(nine),
        ),
        "gmm40": (
            ds.Target(g40.unnormalized_log_prob, 2, reference=wide(2, 25.0), dtype=torch.float64),
            g40.log_normalizer,
            mixture_metric(g40),
        ),
        "funnel": (
            ds.Target(funnel.unnormalized_log_prob, 10, reference=wide(10, 3.0), dtype=torch.float64),
            0.0,
            lambda x: f"sd(x1) {float(x[:, 0].std()):.3f}",
        ),
        "many_well": (
            ds.Target(well.unnormalized_log_prob, 32, reference=wide(32, 2.0), dtype=torch.float64),
            well.log_normalizer,
            lambda x: f"right {float(well.wells(x).double().mean()):.3f} (exact {q:.3f})",
        ),
        "ionosphere": (
            ds.Target(ion.log_prob, ion.dim, reference=ion.prior(), dtype=torch.float64),
            IONOSPHERE_LOG_Z,
            lambda x: f"sd(b0) {float(x[:, 0].std()):.3f}",
        ),
    }


def run(target, log_z, metric, method, seed, options):
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        idata = ds.sample(target, method, seed=seed, progress=False, **options)
    secs = time.perf_counter() - start
    a = idata.posterior.attrs
    x = torch.as_tensor(idata.posterior["x"].values).reshape(-1, target.dim)
    err, se = a["log_normalizer"] - log_z, a["log_normalizer_se"]
    flag = " WARN" if any(issubclass(w.category, RuntimeWarning) for w in caught) else ""
    rounds = zip(a.get("round_log_normalizers", []), a.get("round_log_normalizer_ses", []), strict=True)
    earlier = "".join(f" r{i + 1} {v - log_z:+.3f} se {s:.3f}" for i, (v, s) in enumerate(rounds))
    return (
        f"{method:5s} err {err:+8.3f} se {se:6.3f} |err|/se {abs(err) / max(se, 1e-12):6.1f}  {metric(x):32s}"
        f" evals {a['num_target_evals']:8d} {secs:6.1f}s{flag}{earlier}"
    )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--targets", nargs="*", default=None)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--particles", type=int, default=2000)
    parser.add_argument("--smc-moves", type=int, default=20)
    parser.add_argument("--no-smc", action="store_true")
    parser.add_argument("--chains", type=int, default=1, help="pdds num_chains (independent runs)")
    parser.add_argument(
        "--pdds", nargs="*", default=[], help="pdds options as key=value (values read as Python literals)"
    )
    parser.add_argument("--learned", nargs="*", default=[], help="noised_smc_learned constants, NAME=value")
    args = parser.parse_args()
    for name, value in (kv.split("=", 1) for kv in args.learned):
        setattr(learned, name, ast.literal_eval(value))
    torch.set_num_threads(1)
    table = problems()
    pdds_options = dict(num_samples=args.particles, num_chains=args.chains)
    pdds_options.update({k: ast.literal_eval(v) for k, v in (kv.split("=", 1) for kv in args.pdds)})
    for name in args.targets or list(table):
        target, log_z, metric = table[name]
        for seed in args.seeds:
            print(
                f"{name:11s} seed {seed} " + run(target, log_z, metric, "pdds", seed, pdds_options),
                flush=True,
            )
            if not args.no_smc:
                opts = dict(num_samples=args.particles, num_chains=args.chains, num_mcmc_steps=args.smc_moves)
                print(f"{name:11s} seed {seed} " + run(target, log_z, metric, "smc", seed, opts), flush=True)


if __name__ == "__main__":
    main()
