"""The chain contract for the importance samplers: ``num_chains`` chains are independent runs
(API.md), not one importance resample cut into pieces."""

import numpy as np
import torch

import diffstat as ds
from diffstat.targets import GaussianMixture

OPTIONS = dict(
    num_explore=200, explore_steps=10, chains_per_mode=32, restock_steps=10, num_proposals=512,
    max_rounds=2, refresh_chains=32, refresh_steps=5,
)  # fmt: skip


def test_chains_are_independent_runs():
    target = GaussianMixture(torch.tensor([[2.0, 0], [-2, 0]]), [0.7, 0.3], scales=[0.5, 0.5]).as_target(
        dtype=torch.float64
    )
    one = ds.sample(target, "gaussian_is", num_samples=200, num_chains=1, seed=0, progress=False, **OPTIONS)
    two = ds.sample(target, "gaussian_is", num_samples=200, num_chains=2, seed=0, progress=False, **OPTIONS)
    assert two.posterior["x"].shape == (2, 200, 2)
    # two runs evaluate the target about twice as often as one (a resample of one run would not)
    assert two.posterior.attrs["num_target_evals"] > 1.8 * one.posterior.attrs["num_target_evals"]
    ess = two.diffusion["ess"].values  # (round, chain)
    assert ess.shape[1] == 2 and np.isfinite(ess[0]).all() and ess[0, 0] != ess[0, 1]
    # each chain has the mixture's weights: heavy mode share 0.7, within 4 binomial sd of 200 draws
    share = (two.posterior["x"].values[..., 0] > 0).mean(axis=1)
    assert np.abs(share - 0.7).max() < 4 * np.sqrt(0.21 / 200), share
