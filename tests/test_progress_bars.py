"""One progress bar per ``ds.sample`` call, for every method, also with several chains (independent
runs): inner phases and later runs update or relabel that bar, or stay silent; none without
``progress``."""

import pytest
import torch

import diffstat as ds
from diffstat.targets import GaussianMixture

MIXTURE = GaussianMixture([[-1.5, 0.0], [1.5, 0.5]], [0.6, 0.4], scales=[0.6, 0.8], log_normalizer=0.7)
#: Small settings (exact smoothed scores for SMS and walk-jump): the test counts bars, it does not
#: judge the draws.
SMALL = {
    "mala": dict(num_warmup=20),
    "hmc": dict(num_warmup=20, num_leapfrog=3),
    "nuts": dict(num_warmup=20),
    "rwm": dict(num_warmup=20),
    "ais": dict(num_temperatures=10),
    "smc": dict(num_mcmc_steps=2),
    "pt": dict(num_warmup=20),
    "pdds": dict(num_steps=4, pilot_chains=64, pilot_steps=5),
    "walk_jump": dict(smoothed_score=MIXTURE.smoothed_score),
    "sms": dict(smoothed_score=MIXTURE.smoothed_score),
    "diffusion": dict(
        num_explore=100,
        train_steps=20,
        refit_steps=10,
        max_rounds=1,
        num_proposals=256,
        chains_per_mode=16,
        refresh_chains=16,
        ode_steps=4,
        hidden=16,
        depth=1,
        held_out=32,
    ),
    "gaussian_is": dict(
        num_explore=100, max_rounds=1, num_proposals=256, chains_per_mode=16, refresh_chains=16
    ),
}


@pytest.mark.parametrize("method", ds.available_methods())
@pytest.mark.parametrize("progress", [True, False])
def test_one_progress_bar_per_call(shown_bars, method, progress):
    target = MIXTURE.as_target(dtype=torch.float64)
    ds.sample(target, method, num_samples=32, num_chains=2, seed=0, progress=progress, **SMALL[method])
    assert len(shown_bars) == (1 if progress else 0), shown_bars
