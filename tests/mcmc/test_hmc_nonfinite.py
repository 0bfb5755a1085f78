"""HMC's leapfrog goes on where the target raises at a non-finite point (issue 13's fourth audit,
``docs/audit.md``): HMC at defaults on the audit's hierarchical logistic regression (a Pyro model
evaluated under ``vmap``) ended with a ``RuntimeError`` on seeds 0, 3 and 5, where a diverging
trajectory overflowed and the model, run at NaN, raised. Such a trajectory is rejected and flagged
divergent, as one whose log-density is NaN there."""

from __future__ import annotations

import torch

from diffstat.mcmc.base import MCMCState
from diffstat.mcmc.chees import jittered_hmc_step

F64 = torch.float64


def quartic_that_raises_off_the_reals(x: torch.Tensor):
    """log p = -sum x^4 (a leapfrog step of 1 from x = 2 overflows within a few steps), raising at a
    non-finite point as a model run under vmap does."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError("evaluated at a non-finite point")
    return -(x**4).sum(-1), -4 * x**3


def test_a_trajectory_that_overflows_where_the_target_raises_is_rejected_and_the_run_goes_on():
    x = torch.tensor([[2.0, -2.0], [0.1, 0.2], [2.0, 1.0]], dtype=F64)
    lp, g = quartic_that_raises_off_the_reals(x)
    state = MCMCState(x, lp, g)
    for num_steps in (8, torch.tensor([8, 3, 8])):  # all chains alike, and each its own count
        gen = torch.Generator().manual_seed(0)
        step = torch.tensor([1.0, 0.05, 1.0], dtype=F64)
        new, info = jittered_hmc_step(
            gen, state, quartic_that_raises_off_the_reals, step, num_steps=num_steps
        )
        assert info.diverging.tolist() == [True, False, True]
        assert not info.is_accepted[0] and not info.is_accepted[2]
        assert torch.equal(new.x[[0, 2]], x[[0, 2]]) and torch.isfinite(new.log_prob).all()
        assert info.num_evals < int(
            torch.as_tensor(num_steps).expand(3).sum()
        )  # the overflowed rows not counted
