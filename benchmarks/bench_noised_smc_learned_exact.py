"""The learned guidance of ``method="pdds"``: is the training data the limit on multimodal targets?

For each seed: the pilot and bank (``setup_path``), round 1 (1000 particles, defaults), then round 2
twice, with a network fitted to round 1's weighted particles (what ``num_rounds=2`` does) and with
one fitted to ``n_exact`` independent exact draws of the target (their gradients from the target,
equal weights). Prints each round's log Z error (s.e.) and the mode metric of 1000 draws
(multinomial resample of round 2's particles). Results: ``docs/noised_smc.md``.

Run (one thread)::

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_noised_smc_learned_exact.py nine_modes 1000
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_noised_smc_learned_exact.py gmm40 1000
"""

from __future__ import annotations

import sys
import warnings

import torch
from bench_noised_smc import problems

from diffstat import targets as T
from diffstat.diffusion.noised_smc import noised_smc
from diffstat.diffusion.noised_smc_learned import LearnedPath, fit_guidance
from diffstat.diffusion.noised_smc_setup import setup_path


def main(name: str, n_exact: int) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    target, log_z, metric = problems()[name]
    gm = {"nine_modes": T.nine_modes, "gmm40": T.gmm40}[name]()
    for seed in (0, 1, 2):
        gen = torch.Generator().manual_seed(seed)
        path, _ = setup_path(target, gen, None, {})
        out1 = noised_smc(gen, path, 1000)
        bank = path.bank if path.guidance == "bank" else None
        res = [f"{name} seed {seed} r1 {out1.log_normalizer - log_z:+.3f} ({out1.log_normalizer_se:.3f})"]
        z = path.whitening.to_white(gm.sample(n_exact, gen).to(torch.float64))
        _, grad_z = path.log_pi_and_grad(z)
        data = {
            "particles": (out1.particles.x, out1.particles.grad_g, out1.log_weights),
            f"exact{n_exact}": (z, grad_z + z, torch.zeros(n_exact, dtype=torch.float64)),
        }
        for label, (x, g, lw) in data.items():
            net, _ = fit_guidance(gen, x, g, lw, path.mode_scale_sq, bank=bank)
            out2 = noised_smc(gen, LearnedPath(path, net), 1000)
            idx = torch.multinomial(torch.softmax(out2.log_weights, 0), 1000, replacement=True, generator=gen)
            draws = path.whitening.from_white(out2.particles.x[idx])
            err, se = out2.log_normalizer - log_z, out2.log_normalizer_se
            res.append(f"{label} {err:+.3f} ({se:.3f}) {metric(draws)}")
        print(" | ".join(res), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
