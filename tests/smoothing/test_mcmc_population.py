"""The NUTS population source (``population="nuts"``) and the ``"modes"`` source's fallback to it where
its importance weights are not trusted (issue 17, funnel(10); docs/sms.md)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import diffstat as ds
from diffstat.smoothing.mcmc_population import mcmc_population
from diffstat.smoothing.populations import FitWarning, get_population, modes_population
from diffstat.targets import Funnel

F64 = torch.float64
MEAN = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
SD = torch.tensor([1.0, 2.0, 0.5], dtype=F64)


def gaussian() -> ds.Target:
    """N(MEAN, diag(SD^2)) from its log-density."""
    return ds.Target(lambda x: -0.5 * (((x - MEAN) / SD) ** 2).sum(-1), 3, dtype=F64)


def test_nuts_population_has_the_target_moments_and_its_gradients():
    """1,024 particles of 32 chains: every particle's gradient and log-density are the target's there
    (exactly: NUTS's own), the evaluations are the target's count, and the means and sds are within 5
    standard errors for an effective size of half the particles (mean 0.22 sd, sd 16%): a target with
    its mean shifted by half an sd, or its sds 1.2 times as large, fails."""
    target = gaussian()
    evals0 = target.num_target_evals
    pop = get_population("nuts")(
        target, 1024, torch.Generator().manual_seed(0), num_chains=32, num_warmup=150
    )
    assert pop.source == "nuts" and pop.x.shape == (1024, 3)
    assert pop.num_target_evals == target.num_target_evals - evals0 > 0
    lp, g = target.log_prob_and_grad(pop.x)
    assert torch.allclose(pop.grad, g, rtol=0, atol=1e-12) and torch.allclose(pop.log_prob, lp, atol=1e-12)
    assert pop.num_transitions == 32 * 64 and pop.num_divergent == 0
    n_eff = 512
    mean_err = ((pop.x.mean(0) - MEAN) / SD).abs().max()
    sd_err = (pop.x.std(0) / SD - 1).abs().max()
    assert mean_err < 5 / math.sqrt(n_eff), mean_err
    assert sd_err < 5 / math.sqrt(2 * n_eff), sd_err


def test_budget_stops_the_chains_and_says_so():
    """A budget far below the run's need: the sampling stops once it is spent, the particles so far are
    kept (whole iterations of all chains), and a FitWarning offers twice the budget."""
    target = gaussian()
    evals0 = target.num_target_evals
    with pytest.warns(FitWarning, match=r"spent its budget of 5000 evaluations.*'budget': 10000"):
        pop = mcmc_population(
            target, 4096, torch.Generator().manual_seed(1), num_chains=8, num_warmup=50, budget=5000
        )
    assert 0 < pop.x.shape[0] < 4096 and pop.x.shape[0] % 8 == 0
    assert pop.num_target_evals == target.num_target_evals - evals0 >= 5000


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(num_chains=0), "num_chains"),
        (dict(num_particles=0), "num_particles"),
        (dict(thin=0), "thin"),
        (dict(num_warmup=-1), "num_warmup"),
        (dict(budget=0), "budget"),
        (dict(target_accept=1.5), "target_accept"),
        (dict(max_tree_depth=0), "max_tree_depth"),
        (dict(init=torch.zeros(5, 2, dtype=F64)), r"init must have shape \(n, 3\)"),
        (dict(init=torch.full((5, 3), math.nan, dtype=F64)), "no finite row"),
    ],
)
def test_bad_options_are_refused_before_any_evaluation(options, match):
    target = gaussian()
    with pytest.raises(ValueError, match=match):
        mcmc_population(target, options.pop("num_particles", 64), torch.Generator().manual_seed(0), **options)
    assert target.num_target_evals == 0


def test_bad_fallback_and_source_names():
    target = gaussian()
    with pytest.raises(ValueError, match="fallback must be 'nuts' or None"):
        modes_population(target, 64, torch.Generator().manual_seed(0), fallback="smc")
    assert target.num_target_evals == 0
    with pytest.raises(ValueError, match=r"\['modes', 'nuts', 'smc'\]"):
        get_population("mcmc")


def test_modes_falls_back_to_nuts_on_the_funnel():
    """Funnel(10), 512 particles, seed 0: the per-mode importance weights are not trusted (Pareto k above
    0.7), so NUTS chains started at the particles replace them; the FitWarning says so, the source is
    named, and the particles reach down the neck: sd of x_1 2.96 and 1% quantile -7.3 (exact 3 and
    -6.98) against 2.02 and -3.7 without the fallback (``fallback=None``, the population before it;
    seeds 1 and 2: 2.67 and 3.00 against 2.07 and 2.08). Trees of depth 8 at most keep it cheap."""

    def population(fallback):
        target = Funnel(10).as_target(dtype=F64)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pop = modes_population(
                target, 512, torch.Generator().manual_seed(0), fallback=fallback,
                fallback_options=dict(max_tree_depth=8),
            )  # fmt: skip
        assert pop.num_target_evals == target.num_target_evals
        return pop, [w.message for w in caught if isinstance(w.message, FitWarning)]

    pop, warned = population("nuts")
    old, old_warned = population(None)
    assert pop.source == "nuts (fallback from modes)" and old.source == "modes"
    assert len(warned) == 1 and "replaced by those of NUTS chains started from them" in str(warned[0])
    assert len(old_warned) == 1 and "replaced" not in str(old_warned[0])
    sd, old_sd = float(pop.x[:, 0].std()), float(old.x[:, 0].std())
    assert abs(sd - 3.0) < 0.3 and old_sd < 2.3, (sd, old_sd)
    assert float(pop.x[:, 0].quantile(0.01)) < -5.5 < float(old.x[:, 0].quantile(0.01))
    lp, g = Funnel(10).as_target(dtype=F64).log_prob_and_grad(pop.x)
    assert torch.allclose(pop.grad, g, rtol=1e-12, atol=1e-12)
