"""Mode exploration, screening and balanced restocking (diffstat.diffusion.modes); the barrier test
and climbs it uses are tested in tests/modes."""

import math

import pytest
import torch

from diffstat.diffusion.modes import explore, explore_modes, screen
from diffstat.diffusion.restock import balance_modes
from diffstat.targets import BananaMixture, GaussianMixture, narrow_wide, nine_modes


def _two_gaussians():
    return GaussianMixture(torch.tensor([[-3.0, 0.0], [3.0, 0.0]]), [0.5, 0.5], scales=[0.5, 0.5]).as_target(
        dtype=torch.float64
    )


def test_explore_finds_the_nine_modes(generator):
    mix = nine_modes()
    target = mix.as_target(dtype=torch.float64)
    before = target.num_target_evals
    bank = explore_modes(target, generator, num_chains=1000)
    assert bank.num_modes == 9
    assert sorted(mix.assign(bank.centers).tolist()) == list(range(9))  # one centre per component
    assert torch.allclose(bank.centers, mix.means[mix.assign(bank.centers)], atol=0.05)
    # every banked particle sits in the component of its mode's centre
    assert (mix.assign(bank.x) == mix.assign(bank.centers)[bank.label]).double().mean() > 0.97
    assert bank.num_evals == target.num_target_evals - before > 0


def test_explore_finds_the_hidden_narrow_mode(generator):
    """From far away the wide light mode's pull dominates; the narrow start scales find the heavy one."""
    mix = narrow_wide(10)
    target = mix.as_target(dtype=torch.float64)
    bank = explore_modes(target, generator, num_chains=4000)
    assert bank.num_modes == 2
    assert sorted(mix.assign(bank.centers).tolist()) == [0, 1]


def test_screen_keeps_the_highest_half_and_a_random_rest():
    """Exact selection on a Gaussian: the survivors are the top half by final log-density plus
    distinct others; every survivor is one of the screened chains' end points, and the step sizes
    come back adapted (not the starting ones)."""
    target = GaussianMixture(torch.zeros(1, 3), scales=[1.0]).as_target(dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    x0 = 3.0 * torch.randn(40, 3, generator=gen, dtype=torch.float64)
    h0 = torch.full((40,), 0.1, dtype=torch.float64)
    before = target.num_target_evals
    x, h = screen(torch.Generator().manual_seed(5), target.log_prob_and_grad, x0, h0, 4, keep=10)
    assert x.shape == (10, 3) and h.shape == (10,)
    assert target.num_target_evals - before == 40 * 5  # one initial evaluation and 4 steps per start
    # the same run by hand, batches of 10 as in screen
    gen = torch.Generator().manual_seed(5)
    ends = torch.cat(
        [
            explore(gen, target.log_prob_and_grad, x0[i : i + 10], 4, h0[i : i + 10])[0].x
            for i in range(0, 40, 10)
        ]
    )
    lp = target.log_prob(ends)
    top = set(lp.argsort(descending=True)[:5].tolist())
    rows = [int(((ends - xi).abs().sum(-1) == 0).nonzero()[0]) for xi in x]
    assert set(rows[:5]) == top and len(set(rows)) == 10 and not set(rows[5:]) & top
    assert not torch.equal(h, h0[:10])


def test_screening_finds_a_narrow_heavy_mode_that_plain_exploration_misses():
    """narrow_wide(12, scales=(0.3, 1)) from the reference N(0, 16 I): a few hundredths of a percent
    of the starts reach the heavy mode's basin, so 2,000 plain chains usually miss it (this seed
    does); 72,000 starts screened by 2 steps each (the sampler's defaults), of which 2,000 go on, find
    it. The test fails if screening does not change what is found."""
    mix = narrow_wide(12, scales=(0.3, 1.0))
    wide = torch.distributions.Normal(torch.zeros(12, dtype=torch.float64), 4.0)
    target = mix.as_target(dtype=torch.float64, reference=torch.distributions.Independent(wide, 1))
    plain = explore_modes(target, torch.Generator().manual_seed(0), num_chains=2000)
    assert mix.assign(plain.centers).tolist() == [1]  # the light wide mode only
    before = target.num_target_evals
    bank = explore_modes(target, torch.Generator().manual_seed(0), num_chains=2000, num_screen=72000)
    assert sorted(mix.assign(bank.centers).tolist()) == [0, 1]
    assert bank.num_evals == target.num_target_evals - before > 72000 * 3


def test_one_mode_is_one_mode(generator):
    """Negative cases: a Gaussian and a single curved banana are never split into several modes."""
    gauss = GaussianMixture(torch.zeros(1, 3), scales=[1.0]).as_target(dtype=torch.float64)
    assert explore_modes(gauss, generator, num_chains=500).num_modes == 1
    banana = BananaMixture(
        torch.zeros(1, 4), scales=torch.tensor([[1.5, 0.3, 0.5, 0.5]]), curvature=1.0
    ).as_target(dtype=torch.float64)
    assert explore_modes(banana, generator, num_chains=500).num_modes == 1


def test_balance_restocks_every_mode_evenly(generator):
    mix = GaussianMixture(torch.tensor([[-4.0, 0.0, 0.0], [4.0, 1.0, 0.0]]), [0.9, 0.1], scales=[0.5, 1.0])
    target = mix.as_target(dtype=torch.float64)
    bank = explore_modes(target, generator, num_chains=400)
    assert bank.num_modes == 2
    before = target.num_target_evals
    full = balance_modes(target, bank, generator, chains_per_mode=128, num_steps=40, keep_every=4)
    assert full.counts().tolist() == [640, 640]  # 128 chains x 5 kept states, whatever the weights
    assert full.num_evals - bank.num_evals == target.num_target_evals - before == 2 * 128 * 40
    lp, grad = target.log_prob_and_grad(full.x)
    assert torch.allclose(full.log_prob, lp) and torch.allclose(full.grad, grad)  # gradients kept
    comp = mix.assign(full.centers)
    for k in range(2):
        xk = full.x[full.label == k]
        sd = mix.covs[comp[k]].diagonal().sqrt()
        # 128 independent chains per mode: a z-score of 5 on the mean and 35% on the sd
        assert ((xk.mean(0) - mix.means[comp[k]]).abs() / (sd / math.sqrt(128)) < 5).all()
        assert ((xk.std(0) / sd - 1).abs() < 0.35).all()


def test_bad_input_is_refused(generator):
    target = _two_gaussians()
    with pytest.raises(ValueError, match="start_scales"):
        explore_modes(target, generator, start_scales=(1.0, -2.0))
    with pytest.raises(ValueError, match="num_chains"):
        explore_modes(target, generator, num_chains=0)
    with pytest.raises(ValueError, match="num_screen"):
        explore_modes(target, generator, num_screen=-5)
    with pytest.raises(ValueError, match="screen_steps"):
        explore_modes(target, generator, screen_steps=0)
