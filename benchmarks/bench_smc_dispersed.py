"""SMC's runs from references of different widths (``diffstat/tempering/dispersed.py``,
``docs/smc_banana.md`` section 7): per run, its log Z error and the draws' mean sd; for the call,
the pooled log Z error (se), Cochran's p, the wider runs' z (``wider_runs_p``), R-hat across runs,
evaluations, the ratio of the draws' sds between the widths (largest and smallest over coordinates)
and between two runs of one width, the shift of the mean log-density between the widths, and the
RuntimeWarnings (first words).

    python benchmarks/bench_smc_dispersed.py --cases banana5 banana2 --seeds 0 1 2 --scales 1 4
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import warnings

import torch
from scipy import stats

import diffstat as ds

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from audit_cases import CASES  # noqa: E402

torch.set_num_threads(1)


def _width_ratios(x: torch.Tensor, scales) -> tuple[str, str]:
    """The largest ratio over coordinates of the draws' sd, runs from the widest reference over runs
    from the narrowest (pooled by width), and the largest such ratio between two runs of one width
    (either way up): the noise the first is to be read against."""
    if scales is None or len(set(scales)) < 2:
        return "-", "-"
    sd = x.std(1)  # (run, dim)
    lo, hi = min(scales), max(scales)
    nar = [i for i, c in enumerate(scales) if c == lo]
    wid = [i for i, c in enumerate(scales) if c == hi]
    ratio = x[wid].reshape(-1, x.shape[-1]).std(0) / x[nar].reshape(-1, x.shape[-1]).std(0)
    same = [abs(torch.log(sd[g[0]] / sd[g[1]])).max() for g in (nar, wid) if len(g) > 1]
    noise = f"{float(torch.exp(max(same))):.3f}" if same else "-"
    return f"{float(ratio.max()):.3f} (min {float(ratio.min()):.3f})", noise


def _lp_shift(lp: torch.Tensor, scales) -> str:
    """Mean log-density of the runs from the narrowest reference minus that of the runs from the
    widest, in sds of the pooled log-density, and the largest such difference between two runs of
    one width."""
    if scales is None or len(set(scales)) < 2:
        return "-"
    lo, hi = min(scales), max(scales)
    nar = [i for i, c in enumerate(scales) if c == lo]
    wid = [i for i, c in enumerate(scales) if c == hi]
    sd = float(lp.std())
    shift = float(lp[nar].mean() - lp[wid].mean()) / sd
    same = [abs(float(lp[g[0]].mean() - lp[g[1]].mean())) / sd for g in (nar, wid) if len(g) > 1]
    return f"{shift:+.3f} ({max(same):.3f})" if same else f"{shift:+.3f}"


def run(case: str, seed: int, scales: tuple[float, ...], num_samples: int) -> str:
    target, exact = CASES[case]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = ds.sample(
            target, "smc", num_samples=num_samples, seed=seed, reference_scales=scales, progress=False
        )
    attrs = idata.posterior.attrs
    x = torch.as_tensor(idata.posterior["x"].values)
    inc = idata["tempering"]["log_z_increment"].values  # (stage, chain), NaN-padded
    log_zs = [float(v) for v in torch.as_tensor(inc).nan_to_num(0.0).sum(0)]
    per_run = [f"{lz - exact['log_z']:+.3f} / {float(x[r].std(0).mean()):.3f}" for r, lz in enumerate(log_zs)]
    z = f"{stats.norm.isf(attrs['wider_runs_p']):+.2f}" if "wider_runs_p" in attrs else "-"
    ratio, noise = _width_ratios(x, attrs.get("reference_scales"))
    shift = _lp_shift(torch.as_tensor(idata.sample_stats["lp"].values), attrs.get("reference_scales"))
    warned = [str(w.message)[:60] for w in caught if issubclass(w.category, RuntimeWarning)]
    lz_err = attrs["log_normalizer"] - exact["log_z"] if "log_z" in exact else float("nan")
    return (
        f"| {case} | {seed} | {scales} | {', '.join(per_run)} "
        f"| {lz_err:.3f} ({attrs['log_normalizer_se']:.3f}) "
        f"| {attrs['runs_agreement_p']:.1e} | {z} | {attrs['rhat_max']:.3f} | {attrs['num_target_evals']:,} "
        f"| {ratio} | {noise} | {shift} | {' / '.join(warned) or '-'} |"
    )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", default=["banana5", "banana2"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--scales", nargs="+", type=float, default=[1.0, 4.0])
    parser.add_argument("--num-samples", type=int, default=1000)
    args = parser.parse_args()
    print(
        "| case | seed | scales | per run: log Z err / mean sd | log Z err (se) | Cochran p | z wider runs "
        "| R-hat "
        "| evals | wide/narrow sd | same-width sd | lp shift (same-width) | warnings |"
    )
    print("| --- " * 13 + "|")
    for case in args.cases:
        for seed in args.seeds:
            print(run(case, seed, tuple(args.scales), args.num_samples), flush=True)


if __name__ == "__main__":
    main()
