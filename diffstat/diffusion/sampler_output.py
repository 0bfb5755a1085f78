"""The output of the diffusion sampler (:mod:`diffstat.diffusion.sampler`), assembled from its rounds:
the per-round records of the ``diffusion`` group (one row per round, with the SMC bridge's per-stage
records in the last row), the bridge's equally weighted draws, and independent runs stacked as chains
with their log Z pooled. Pure bookkeeping: no target evaluations, and random numbers only where the
bridge's draws are subsampled.
"""

from __future__ import annotations

import math

import torch

from diffstat._util import pad_stack
from diffstat.diffusion.rounds import RoundState
from diffstat.sampling import SamplerResult
from diffstat.tempering.runs import combine_runs

__all__ = [
    "BRIDGE_FIELDS",
    "bridge_attrs",
    "bridge_draws",
    "bridge_rows",
    "pooled_log_weights",
    "round_group",
    "stack_runs",
]


def stack_runs(results: list[SamplerResult]) -> SamplerResult:
    """Independent runs as chains: draws and statistics stacked, each group's per-round arrays as
    ``(round, chain, ...)`` padded with NaN (runs differ in rounds and modes), log Z pooled over runs
    (:func:`~diffstat.tempering.runs.combine_runs`); ``mode_weights`` per run, NaN-padded."""
    draws = torch.cat([r.draws for r in results])
    stats = {
        k: torch.cat([torch.as_tensor(r.sample_stats[k]) for r in results]) for k in results[0].sample_stats
    }
    groups = {
        name: {
            key: pad_stack([r.groups[name][key] for r in results], axis=1) for key in results[0].groups[name]
        }
        for name in results[0].groups
    }
    attrs = dict(results[0].attrs)
    log_z, se = combine_runs(
        [r.attrs["log_normalizer"] for r in results], [r.attrs["log_normalizer_se"] for r in results]
    )
    attrs.update(
        log_normalizer=log_z,
        log_normalizer_se=se,
        reliable=min(int(r.attrs["reliable"]) for r in results),
        round_agreement_p=min(float(r.attrs["round_agreement_p"]) for r in results),
        num_modes=max(int(r.attrs["num_modes"]) for r in results),
        num_rounds=max(int(r.attrs["num_rounds"]) for r in results),
        ess=sum(float(r.attrs["ess"]) for r in results),
        num_proposals=sum(int(r.attrs["num_proposals"]) for r in results),
        pareto_k=max(float(r.attrs["pareto_k"]) for r in results),
        num_nan_exploration=sum(int(r.attrs["num_nan_exploration"]) for r in results),
        rounds_stopped_early=max(int(r.attrs["rounds_stopped_early"]) for r in results),
        stein_max_z=max(float(r.attrs["stein_max_z"]) for r in results),
        stein_max_error=max(float(r.attrs["stein_max_error"]) for r in results),
        stein_evals=sum(int(r.attrs["stein_evals"]) for r in results),
        coverage_missed=max(
            [m for r in results if (m := float(r.attrs["coverage_missed"])) == m], default=math.nan
        ),
        coverage_points=sum(int(r.attrs["coverage_points"]) for r in results),
        coverage_evals=sum(int(r.attrs["coverage_evals"]) for r in results),
        bridge_start=",".join(str(r.attrs["bridge_start"]) for r in results),
        mode_weights=pad_stack([r.attrs["mode_weights"] for r in results], axis=0),
        correction="smc" if any(r.attrs["correction"] == "smc" for r in results) else "importance",
    )
    return SamplerResult(draws, stats, groups, attrs)


def bridge_attrs(bridge, reasons: list[str], pool: dict) -> dict:
    """The attrs of a run that the SMC bridge corrected: the bridge's log Z, its error and whether it is
    reliable (no ``reasons``), its last stage's ESS (before the final resampling), the rounds' own
    pooled estimate as ``importance_log_normalizer``, and the bridge's size and diagnostics."""
    return dict(
        log_normalizer=bridge.log_z,
        log_normalizer_se=bridge.log_z_se,
        reliable=int(not reasons),
        ess=float(bridge.stages["ess"][-1:].sum()) * bridge.num_particles,
        importance_log_normalizer=pool["log_z"],
        importance_log_normalizer_se=pool["log_z_se"],
        bridge_particles=bridge.num_particles,
        bridge_stages=len(bridge.stages["beta"]),
        bridge_eves=bridge.num_eves,
        bridge_distinct=bridge.distinct,
        bridge_evals=bridge.num_evals,
        bridge_failures="; ".join(reasons),
    )


def bridge_draws(generator, bridge, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` of the bridge's equally weighted draws (without repeats where it has enough)
    with their log-densities."""
    n = bridge.num_particles
    if num_samples <= n:
        idx = torch.randperm(n, generator=generator, device=generator.device)[:num_samples]
    else:
        idx = torch.randint(0, n, (num_samples,), generator=generator, device=generator.device)
    idx = idx.to(bridge.x.device)
    return bridge.x[idx], bridge.lp[idx]


#: The SMC bridge's per-stage records in the ``diffusion`` group, as ``bridge_<field>``.
BRIDGE_FIELDS = (
    "beta",
    "ess",
    "log_z_increment",
    "acceptance_rate",
    "step_size",
    "num_mcmc_steps",
    "decorrelation",
    "num_clusters",
    "resampled",
)


def round_group(rounds: list[dict], pool: dict, state: RoundState, bridge=None) -> dict[str, torch.Tensor]:
    """The per-round records, the ``diffusion`` group of the output (one entry per round), and the SMC
    bridge's per-stage records ``bridge_<field> (round, stage)``: the bridge follows the last round, so
    its stages fill the last row and the others are NaN (no stages where no bridge ran)."""

    def column(key, dtype=None):
        return torch.tensor([s[key] for s in rounds], dtype=dtype)

    ess, sizes = column("ess", torch.float64), column("num_proposals")
    return {
        "round": column("round"),
        "ess": ess,
        "ess_fraction": ess / sizes,
        "num_proposals": sizes,
        "pareto_k": column("pareto_k", torch.float64),
        "ess_psis": column("ess_psis", torch.float64),
        "log_normalizer": column("log_z", torch.float64),
        "log_normalizer_se": column("se", torch.float64),
        "used": pool["used"],
        "num_modes": torch.full((len(rounds),), state.bank.num_modes),
        "num_target_evals": column("num_target_evals"),
        "train_loss": column("train_loss", torch.float64),
        "diffusion_share": column("diffusion_share", torch.float64),
        "proposal_width": column("proposal_width", torch.float64),
        "model_choice": column("choice"),
        "mode_weights": torch.stack([s["mode_weights"].cpu() for s in rounds]),
        "ess_per_mode": torch.stack([s["ess_per_mode"].cpu() for s in rounds]),
        "mode_centers": state.bank.centers.cpu().unsqueeze(0).expand(len(rounds), -1, -1),
    } | {f"bridge_{f}": bridge_rows(bridge, f, len(rounds)) for f in BRIDGE_FIELDS}


def bridge_rows(bridge, field: str, num_rounds: int) -> torch.Tensor:
    """The bridge's per-stage ``field`` in the last of ``num_rounds`` rows ``(R, stages)``, NaN above."""
    stages = 0 if bridge is None else len(bridge.stages["beta"])
    out = torch.full((num_rounds, stages), math.nan, dtype=torch.float64)
    if stages:
        out[-1] = bridge.stages[field].detach().double().cpu()
    return out


def pooled_log_weights(rounds: list[dict], pool: dict, log_ws: list[torch.Tensor]) -> torch.Tensor:
    r"""Log weights ``(sum n_r,)`` of the returned draws: each used round's Pareto-smoothed weights
    scaled by its share :math:`\mu_r`; where no weight is finite anywhere, the stand-in round
    uniformly (never NaN)."""
    mu = pool["log_mu"]
    log_pool = torch.cat(
        [mu[r].to(w) + s["log_w_psis"].to(w) for r, (s, w) in enumerate(zip(rounds, log_ws))]
    )
    if not bool(torch.isfinite(log_pool).any()):
        log_pool = torch.cat(
            [torch.full_like(w, 0.0 if bool(pool["used"][r]) else -math.inf) for r, w in enumerate(log_ws)]
        )
    return log_pool
