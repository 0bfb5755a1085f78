"""MCMC's check for modes that no chain visits (``check_modes``, diffstat.modes.check): R-hat sees
chains in different modes, not chains that all sit in the same one."""

import math
import warnings

import pytest
import torch

import diffstat as ds
from diffstat.modes.coverage import missed_modes

F64 = torch.float64
MEANS = torch.tensor([[0.0, 0.0], [16.0, 0.0]], dtype=F64)  # a barrier of 32 nats: no chain crosses


def two_modes(weight: float = 0.5) -> ds.Target:
    """``weight`` N((0, 0), I) + (1 - weight) N((16, 0), I): exact Gaussian modes, so their Laplace
    masses are their weights."""
    comps = torch.distributions.MultivariateNormal(MEANS, torch.eye(2, dtype=F64))
    logw = torch.tensor([weight, 1 - weight], dtype=F64).log()
    return ds.Target(lambda x: torch.logsumexp(comps.log_prob(x[:, None, :]) + logw, -1), 2)


def run(target, init, **options):
    """HMC from ``init`` with the identity metric: a metric adapted to draws pooled over chains in both
    modes is as wide as the gap between them, and its trajectories can then cross it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = ds.sample(
            target, "hmc", num_samples=300, seed=0, progress=False, init=init, adapt_mass=False, **options
        )
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    return idata.posterior.attrs, said


def test_held_modes_stand_for_the_evidence_when_there_is_none():
    """Exact draws of one of two equal Gaussian modes: without an evidence estimate the missed share
    is the missed mode's Laplace mass over both, 0.5 exactly up to the climbs' accuracy."""
    target = two_modes(0.3)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    draws = torch.randn(2000, 2, dtype=F64)  # the mode at 0, weight 0.3
    res = missed_modes(target, draws, None, 2.0 * torch.randn(256, 2, dtype=F64), gen)
    assert res.centres.shape[0] == 1 and abs(res.share - 0.7) < 1e-3
    assert abs(res.misweight - 0.7) < 1e-3  # all the draws in a mode of Laplace share 0.3
    # With the evidence of both modes (log 1) the same missed mass is 0.7 of 1.7.
    res = missed_modes(target, draws, 0.0, 2.0 * torch.randn(256, 2, dtype=F64), gen)
    assert abs(res.share - 0.7 / 1.7) < 1e-3


def test_chains_that_all_sit_in_one_mode_are_flagged():
    """Every chain started in the mode at 0: R-hat is fine, the other half of the mass is missing."""
    target = two_modes()
    attrs, said = run(target, MEANS[0])
    assert abs(attrs["missed_mode_share"] - 0.5) < 0.01
    assert attrs["mode_check_evals"] > 0
    assert any("no draw reaches" in m and "chains never visit them" in m for m in said)


def test_chains_in_both_modes_miss_nothing_and_the_check_can_be_switched_off():
    """Two chains in each mode: nothing is missed (R-hat has its own warning), and the shares of the
    draws match the Laplace masses (misweight 0 up to the draws' noise)."""
    target = two_modes()
    init = MEANS[torch.tensor([0, 0, 1, 1])]
    attrs, said = run(target, init)
    assert attrs["missed_mode_share"] == 0.0 and attrs["mode_misweight"] < 0.05
    assert not any("no draw reaches" in m or "modes wrongly" in m for m in said)
    attrs, said = run(target, MEANS[0], check_modes=False)
    assert "missed_mode_share" not in attrs and not any("no draw reaches" in m for m in said)
    with pytest.raises(ValueError, match="check_modes"):
        run(target, MEANS[0], check_modes="yes")


def test_unequal_chains_per_mode_misweigh_the_modes():
    """Three chains in the light mode (weight 0.2) and one in the heavy one: the draws' shares (0.75 /
    0.25) against the Laplace masses (0.2 / 0.8) differ by 0.55 in total variation."""
    target = two_modes(0.2)
    attrs, said = run(target, MEANS[torch.tensor([0, 0, 0, 1])])
    assert attrs["missed_mode_share"] == 0.0 and math.isclose(attrs["mode_misweight"], 0.55, abs_tol=0.01)
    assert any("modes wrongly" in m for m in said)


def test_nans_met_by_the_check_far_out_are_not_the_runs():
    """A standard normal whose log-density is NaN beyond 7 in any coordinate (an overflow far out): SMC's
    particles never go there, the missed-mode check's climbs from reference draws widened up to 4 times
    do. Their NaNs are counted as exploration and do not raise the run's NaN warning; without the check
    no NaN is met at all (every run from N(0, I): test_smc_dispersed.py has the runs from wider ones)."""

    def log_prob(x):
        lp = -0.5 * (x**2).sum(-1)
        return torch.where(x.abs().amax(-1) > 7.0, torch.full_like(lp, math.nan), lp)

    target = ds.Target(log_prob, 2, dtype=F64)
    for check in (True, False):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            idata = ds.sample(
                target,
                "smc",
                num_samples=200,
                seed=0,
                progress=False,
                check_modes=check,
                reference_scales=(1.0,),
            )
        attrs = idata.posterior.attrs
        said = [str(w.message) for w in caught if "returned NaN" in str(w.message)]
        assert said == []
        assert attrs["num_nan_evals"] == attrs.get("num_nan_exploration", 0)
        assert (attrs["num_nan_evals"] > 0) == check
