"""The exact divergence of the probability flow: the per-dimension loop (before) against
:mod:`diffstat.diffusion.divergence` (after), side by side in one process (``docs/diffusion_speed.md``).

    python benchmarks/bench_divergence_speed.py --parts kernel
    python benchmarks/bench_divergence_speed.py --parts sample --cases narrow_wide10 kidiq sonar

``kernel``: one velocity-and-divergence evaluation at the same ``n`` points (the proposals' batch,
4,096) of the sampler's score model (``ScoreMLP(dim, 128, 3)`` under its VP process, float32, output
layer drawn at random so the trace is not the Gaussian's), for the loop, the batched-autograd method
(any score function) and the layer-by-layer method (a ``ScoreMLP``): best of ``--repeats`` seconds,
ratios to the loop and the largest difference from it relative to the largest divergence.

``sample``: whole ``ds.sample(target, "diffusion", num_samples=1000, seed=0)`` runs with the loop
patched in (``before``) and without (``after``): seconds, evaluations, log Z and the largest
difference between the two runs' draws.

``ops``: ``torch.profiler``'s table of one loop evaluation at dim 61.

``frames``: seconds of the ``FRAME_NEWTON_STEPS`` Newton steps and Hessians of one Laplace frame
(:func:`diffstat.diffusion.restock.laplace_frames`, one mode) on sonar, from the origin.

``profile``: one run (``--variant before`` or ``after``) of each case under cProfile, the functions
with the most cumulative seconds:

    python benchmarks/bench_divergence_speed.py --parts profile --cases sonar --variant before
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
from diffstat.diffusion import divergence, proposals, reverse
from diffstat.diffusion.networks import ScoreMLP
from diffstat.diffusion.processes import VP

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from audit_cases import CASES  # noqa: E402

torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=FutureWarning)
F64 = torch.float64


def loop_velocity_and_divergence(score_fn, process, y, t):
    """The code before: ``dim`` backward passes, one per coordinate (the library's autograd method,
    :func:`~diffstat.diffusion.divergence.autograd_divergence`, with one unit cotangent per pass)."""
    tt = t.expand(y.shape[0])
    return divergence.autograd_divergence(lambda z: process.probability_flow_drift(z, tt, score_fn(z, tt)), y)


def func_vjp_divergence(model, process, y, t, chunk=16):
    """``torch.func``: ``vmap`` of ``vjp``'s pullback over blocks of ``chunk`` unit cotangents."""
    from torch.func import vjp, vmap

    tt = t.expand(y.shape[0])
    n, d = y.shape
    v, pull = vjp(lambda z: process.probability_flow_drift(z, tt, model(z, tt)), y)
    div, eye = torch.zeros(n, dtype=y.dtype), torch.eye(d, dtype=y.dtype)
    for start in range(0, d, chunk):
        cols = torch.arange(start, min(start + chunk, d))
        (g,) = vmap(pull)(eye[cols].unsqueeze(1).expand(cols.numel(), n, d))
        div = div + g.gather(2, cols.view(-1, 1, 1).expand(-1, n, 1)).squeeze(-1).sum(0)
    return v.detach(), div.detach()


def func_jvp_divergence(model, process, y, t, chunk=16):
    """``torch.func``: ``vmap`` of ``jvp`` (forward mode) over blocks of ``chunk`` unit tangents."""
    from torch.func import jvp, vmap

    tt = t.expand(y.shape[0])
    n, d = y.shape
    div, eye = torch.zeros(n, dtype=y.dtype), torch.eye(d, dtype=y.dtype)

    def velocity(z):
        return process.probability_flow_drift(z, tt, model(z, tt))

    for start in range(0, d, chunk):
        cols = torch.arange(start, min(start + chunk, d))
        tangents = eye[cols].unsqueeze(1).expand(cols.numel(), n, d)
        _, g = vmap(lambda u: jvp(velocity, (y,), (u,)))(tangents)
        div = div + g.gather(2, cols.view(-1, 1, 1).expand(-1, n, 1)).squeeze(-1).sum(0)
    return div.detach()


def op_profile(dim, n):
    """``torch.profiler``'s table of one loop evaluation (the operators its seconds go to)."""
    from torch.profiler import profile as torch_profile

    process = VP(t_max=0.6)
    model = ScoreMLP(dim, 128, 3, process=process, seed=0)
    y, t = (
        torch.randn(n, dim, dtype=F64, generator=torch.Generator().manual_seed(0)),
        torch.tensor(0.3, dtype=F64),
    )
    loop_velocity_and_divergence(model, process, y, t)
    with torch_profile() as prof:
        loop_velocity_and_divergence(model, process, y, t)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


def _best(fn, repeats):
    out, best = None, float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def kernel(dims, n, repeats):
    print(
        "| dim | loop s | autograd, 16 cotangents a pass s (ratio) "
        "| torch.func vmap(vjp), 16 a pass s (ratio) | torch.func vmap(jvp), 16 a pass s (ratio) "
        "| layer by layer s (ratio) | max rel. diff (autograd 16 / vjp / jvp / layers) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for dim in dims:
        _kernel_row(dim, n, repeats)


def _kernel_row(dim, n, repeats):
    process = VP(t_max=0.6)
    model = ScoreMLP(dim, 128, 3, process=process, seed=0)
    gen = torch.Generator().manual_seed(dim)
    with torch.no_grad():
        w = model.net.out.weight
        w.copy_(0.05 * torch.randn(w.shape, generator=gen))
    y = torch.randn(n, dim, generator=gen, dtype=F64)
    t = torch.tensor(0.3, dtype=F64)

    def velocity(z):  # not a ScoreMLP: the autograd path
        tt = t.expand(z.shape[0])
        return process.probability_flow_drift(z, tt, model(z, tt))

    t_loop, (v0, d0) = _best(lambda: loop_velocity_and_divergence(model, process, y, t), repeats)
    t_gen, (v1, d1) = _best(lambda: divergence.autograd_divergence(velocity, y, 16), repeats)
    t_fun, (_, d3) = _best(lambda: func_vjp_divergence(model, process, y, t), repeats)
    t_fwd, d4 = _best(lambda: func_jvp_divergence(model, process, y, t), repeats)
    t_lay, (v2, d2) = _best(lambda: divergence.velocity_and_divergence(model, process, y, t), repeats)
    assert torch.equal(v0, v1) and torch.equal(v0, v2)
    scale = float(d0.abs().max())
    diffs = " / ".join(f"{float((d - d0).abs().max()) / scale:.1e}" for d in (d1, d3, d4, d2))
    print(
        f"| {dim} | {t_loop:.3f} | {t_gen:.3f} ({t_loop / t_gen:.2f}) "
        f"| {t_fun:.3f} ({t_loop / t_fun:.2f}) | {t_fwd:.3f} ({t_loop / t_fwd:.2f}) "
        f"| {t_lay:.3f} ({t_loop / t_lay:.2f}) | {diffs} |",
        flush=True,
    )


def narrow_wide10():
    from diffstat.targets import narrow_wide

    mixture = narrow_wide(10)
    reference = torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(10, dtype=F64), 4 * torch.ones(10, dtype=F64)), 1
    )
    target = ds.Target(mixture.unnormalized_log_prob, 10, reference=reference, dtype=F64)
    return target, lambda x: f"heavy {(mixture.assign(torch.as_tensor(x)) == 0).double().mean().item():.3f}"


def posteriordb_case(name):
    from diffstat import posteriordb as pdb

    return lambda: (pdb.load(name, dtype=F64).target, lambda x: "")


SAMPLE_CASES = {
    "narrow_wide10": narrow_wide10,
    "sonar": lambda: (CASES["sonar"]()[0], lambda x: ""),
    "kidiq": posteriordb_case("kidiq-kidscore_momhs"),
    "nes1980": posteriordb_case("nes1980-nes"),
}


def _run(case, loop):
    target, extra = SAMPLE_CASES[case]()
    saved = proposals.velocity_and_divergence, reverse.velocity_and_divergence
    if loop:
        proposals.velocity_and_divergence = reverse.velocity_and_divergence = loop_velocity_and_divergence
    try:
        t0 = time.perf_counter()
        idata = ds.sample(target, "diffusion", num_samples=1000, seed=0, progress=False)
        sec = time.perf_counter() - t0
    finally:
        proposals.velocity_and_divergence, reverse.velocity_and_divergence = saved
    post = idata.posterior
    x = np.concatenate(
        [post[v].values.reshape(post[v].shape[0] * post[v].shape[1], -1) for v in post.data_vars], 1
    )
    attrs = post.attrs
    return sec, x, attrs["num_target_evals"], attrs["log_normalizer"], extra(x)


def sample(cases):
    print(
        "| case | before: s / evals / log Z | after: s / evals / log Z | time ratio "
        "| max abs draw diff | notes |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for case in cases:
        s0, x0, e0, z0, n0 = _run(case, loop=True)
        s1, x1, e1, z1, n1 = _run(case, loop=False)
        diff = float(np.abs(x0 - x1).max()) if x0.shape == x1.shape else float("nan")
        print(
            f"| {case} | {s0:.1f} / {e0:,} / {z0:.4f} | {s1:.1f} / {e1:,} / {z1:.4f} | {s0 / s1:.2f} "
            f"| {diff:.1e} | {n0} {n1} |",
            flush=True,
        )


def frames():
    from diffstat.diffusion.restock import FRAME_NEWTON_STEPS
    from diffstat.modes.laplace import newton_ascent

    target = CASES["sonar"]()[0]
    x, evals = torch.zeros(1, target.dim, dtype=F64), target.num_target_evals
    t0 = time.perf_counter()
    with torch.no_grad():
        newton_ascent(target, x, 1.0, FRAME_NEWTON_STEPS)
    sec = time.perf_counter() - t0
    print(f"one Laplace frame on sonar: {sec:.2f} s, {target.num_target_evals - evals} evaluations")


def profile(cases, variant):
    import cProfile
    import pstats

    for case in cases:
        prof = cProfile.Profile()
        prof.enable()
        sec, _, evals, log_z, _ = _run(case, loop=variant == "before")
        prof.disable()
        print(f"{case} {variant}: {sec:.1f} s, {evals:,} evaluations, log Z {log_z:.4f}")
        pstats.Stats(prof).sort_stats("cumulative").print_stats(r"diffstat|autograd", 30)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--parts", nargs="+", default=["kernel"], choices=["kernel", "ops", "sample", "frames", "profile"]
    )
    ap.add_argument("--dims", nargs="+", type=int, default=[1, 10, 61, 120])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--cases", nargs="+", default=["narrow_wide10", "kidiq", "sonar"], choices=list(SAMPLE_CASES)
    )
    ap.add_argument("--variant", default="after", choices=["before", "after"])
    args = ap.parse_args()
    if "kernel" in args.parts:
        kernel(args.dims, args.n, args.repeats)
    if "ops" in args.parts:
        op_profile(61, args.n)
    if "sample" in args.parts:
        sample(args.cases)
    if "frames" in args.parts:
        frames()
    if "profile" in args.parts:
        profile(args.cases, args.variant)


if __name__ == "__main__":
    main()
