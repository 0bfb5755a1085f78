"""One progress bar per ``ds.sample`` call for the diffusion-based methods: the inner phases
(exploration, restocking, score-model training, the runs of pdds) update or relabel that bar, or
stay silent."""

import pytest
import torch

import diffstat as ds
from diffstat.targets import nine_modes

#: Small settings: the test counts bars, it does not judge the draws.
SMALL = {
    "num_explore": 200,
    "explore_steps": 10,
    "chains_per_mode": 16,
    "restock_steps": 10,
    "num_proposals": 256,
    "refresh_chains": 32,
    "refresh_steps": 6,
    "max_rounds": 3,
    "target_ess": 1.0,  # never reached: every round runs
}
DIFFUSION = {"train_steps": 20, "refit_steps": 10, "hidden": 16, "depth": 1, "held_out": 32, "ode_steps": 4}


@pytest.mark.parametrize(
    "method, options",
    [
        ("diffusion", SMALL | DIFFUSION),
        ("gaussian_is", SMALL),
        ("pdds", {"num_steps": 4, "pilot_chains": 64, "pilot_steps": 5}),
    ],
)
def test_one_progress_bar_per_call(shown_bars, method, options):
    target = nine_modes().as_target(dtype=torch.float64)
    ds.sample(target, method, num_samples=64, num_chains=2, seed=0, progress=True, **options)
    assert len(shown_bars) == 1, shown_bars


def test_no_bar_without_progress(shown_bars):
    target = nine_modes().as_target(dtype=torch.float64)
    ds.sample(target, "diffusion", num_samples=32, seed=0, progress=False, **SMALL, **DIFFUSION)
    assert shown_bars == []
