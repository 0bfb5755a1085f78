"""Pyro's own NUTS on the sixth round's set-A models (``audit_cases_sixth_a.py``), the reference
answers hard-coded there, independent of the package:

    python benchmarks/audit_sixth_a_reference.py NAME [WARMUP DRAWS]

4 chains (seeds 0 to 3, chains in turn in one process), jit-compiled; prints each site's means and sds
as ``_a`` strings, the largest R-hat, the smallest bulk ESS (arviz) and the divergences."""

from __future__ import annotations

import sys

import numpy as np
import torch

from audit_cases_sixth_a import F64, MODELS, NUTS_OPTIONS


def pyro_reference(name: str, warmup: int = 1000, draws: int = 2000, chains: int = 4) -> None:
    """Pyro's NUTS on the case's model: means, sds (as ``_a`` strings), max R-hat, min bulk ESS."""
    import arviz as az
    import pyro
    from pyro.infer import MCMC, NUTS

    model, data = MODELS[name]()
    model = getattr(model, "reference", model)  # an equivalent parametrisation NUTS samples better
    runs, divergent = [], 0
    for chain in range(chains):
        pyro.set_rng_seed(chain)
        mcmc = MCMC(
            NUTS(model, jit_compile=True, ignore_jit_warnings=True, **NUTS_OPTIONS.get(name, {})),
            draws,
            warmup,
            disable_progbar=True,
        )
        mcmc.run(*data)
        divergent += sum(len(v) for v in mcmc.diagnostics()["divergences"].values())
        samples = mcmc.get_samples()
        sites = getattr(model, "deterministic", [])
        det = pyro.infer.Predictive(model, samples, return_sites=sites)(*data) if sites else {}
        runs.append({k: v.numpy() for k, v in {**samples, **det}.items()})
        print(f"chain {chain} done", file=sys.stderr, flush=True)
    post = {k: np.stack([r[k] for r in runs]) for k in runs[0]}
    idata = az.from_dict(posterior=post)
    rhat = float(az.rhat(idata).to_array().max())
    ess = float(az.ess(idata).to_array().min())
    print(
        f"# {name}: {chains} x {draws} after {warmup}, max R-hat {rhat:.4f}, "
        f"min bulk ESS {ess:.0f}, {divergent} divergent"
    )
    for k, v in post.items():
        x = v.reshape(chains * draws, -1)
        print(f'{k}: _a("' + " ".join(f"{m:.4g}" for m in x.mean(0)) + '"),')
        print(f'{k} sd: _a("' + " ".join(f"{s:.4g}" for s in x.std(0)) + '"),')


if __name__ == "__main__":
    torch.set_default_dtype(F64)
    pyro_reference(sys.argv[1], *(int(a) for a in sys.argv[2:4]))
