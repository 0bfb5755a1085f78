"""SMC's runs from references of different widths (``diffstat/tempering/dispersed.py``): the runs
use N(0, I) and N(0, 16 I) by turns where no reference is given; on a banana, whose runs from N(0, I)
come out too narrow, the runs from the wider reference find more mass and the call warns; on a
Gaussian the runs agree and it stays quiet, with log Z right."""

import math
import warnings

import numpy as np
import pytest
import torch

import diffstat as ds
from diffstat.tempering.dispersed import DISPERSED_SCALES, ScaledNormalPath, run_paths
from diffstat.tempering.runs import CHI2_ALPHA, wider_runs_p

D = torch.distributions
F64 = torch.float64


def banana(dim=2, b=0.5, s=1.5):
    """x1 ~ N(0, s^2), x_k | x1 ~ N(b x1^2, 1): normalised (log Z = 0)."""

    def log_prob(x):
        lp1 = D.Normal(0.0, s).log_prob(x[:, 0])
        return lp1 + D.Normal(b * x[:, :1] ** 2, 1.0).log_prob(x[:, 1:]).sum(-1)

    return ds.Target(log_prob, dim, dtype=F64)


def gaussian(dim=3, scale=1.5, log_z=0.7):
    return ds.Target(lambda x: D.Normal(0.5, scale).log_prob(x).sum(-1) + log_z, dim, dtype=F64)


def sample(target, seed, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = ds.sample(target, "smc", num_samples=1000, seed=seed, progress=False, **options)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    return idata.posterior.attrs, messages


def test_banana_runs_from_the_wider_reference_find_more_mass_and_warn():
    """A 2-d banana, seed 1: the runs from N(0, I) lose mass in the curved arm (log Z low); those
    from N(0, 16 I) find more, the one-sided test between the widths rejects, and the warning says
    so. With every run from N(0, I) (the former default) the same seed warns of nothing."""
    attrs, messages = sample(banana(), 1)
    assert attrs["reference_scales"] == [1.0, 4.0, 1.0, 4.0]
    assert attrs["wider_runs_p"] < CHI2_ALPHA
    disagree = [m for m in messages if "runs found different parts" in m]
    assert len(disagree) == 1
    assert "from N(0, 4^2 I) found more mass than those from N(0, I)" in disagree[0]
    assert "raise num_mcmc_steps, or give a reference= wider than the posterior" in disagree[0]
    attrs_one, messages_one = sample(banana(), 1, reference_scales=(1.0,))
    assert attrs_one["runs_agreement_p"] > CHI2_ALPHA
    assert attrs_one["reference_scales"] == [1.0] * 4 and attrs_one["wider_runs_p"] == 1.0
    assert not any("runs found different parts" in m for m in messages_one)


@pytest.mark.parametrize("seed", [0, 1])
def test_gaussian_runs_agree_and_log_z_is_right(seed):
    """A 3-d Gaussian N(0.5, 1.5^2 I), log Z = 0.7: runs from either width are sound, so no
    disagreement is reported and the pooled log Z (the mean of the runs' Z) is within 4 of its
    standard errors of the truth."""
    attrs, messages = sample(gaussian(), seed)
    assert attrs["reference_scales"] == [1.0, 4.0, 1.0, 4.0]
    assert attrs["wider_runs_p"] > CHI2_ALPHA and attrs["runs_agreement_p"] > CHI2_ALPHA
    assert not any("runs found different parts" in m for m in messages)
    assert abs(attrs["log_normalizer"] - 0.7) < 4 * attrs["log_normalizer_se"]


def test_the_runs_use_the_two_references():
    """run_paths: runs 1, 3 on the default N(0, I) path, runs 2, 4 on N(0, 16 I), whose draws and
    log-density are those of N(0, 16 I)."""
    target = gaussian()
    narrow, paths, per_run = run_paths(target, None, None, 4, None)
    assert per_run == [1.0, 4.0, 1.0, 4.0] and DISPERSED_SCALES == (1.0, 4.0)
    assert paths[0] is paths[2] is narrow and narrow.reference is None
    wide = paths[1]
    assert paths[3] is wide and isinstance(wide, ScaledNormalPath)
    x = wide.sample_reference(20000, torch.Generator().manual_seed(0))
    assert x.dtype == F64 and abs(float(x.std()) - 4.0) < 4 * 4.0 / math.sqrt(2 * 60000)
    exact = D.Normal(0.0, 4.0).log_prob(x[:5]).sum(-1)
    torch.testing.assert_close(wide.reference_log_prob(x[:5]), exact)


def test_a_given_reference_is_kept_in_every_run():
    """A reference= (or the target's own) is used by every run: no reference_scales in attrs, and
    asking to scale it is refused."""
    target = gaussian()
    ref = D.Independent(D.Normal(torch.zeros(3, dtype=F64), 2.0 * torch.ones(3, dtype=F64)), 1)
    _, paths, per_run = run_paths(target, ref, None, 4, None)
    assert per_run is None and all(p.reference is ref for p in paths)
    attrs, _ = sample(target, 0, reference=ref, max_stages=3)
    assert "reference_scales" not in attrs
    with pytest.raises(ValueError, match="reference_scales widens the default"):
        ds.sample(target, "smc", num_samples=100, seed=0, reference=ref, reference_scales=(1.0, 3.0))
    for bad in [(), (1.0, -2.0), (1.0, math.inf), "wide"]:
        with pytest.raises(ValueError, match="reference_scales must be"):
            ds.sample(target, "smc", num_samples=100, seed=0, reference_scales=bad)


def test_wider_runs_p():
    """The one-sided test between widths: p = 1/2 for equal means, the normal tail of the
    difference over its standard error otherwise, 1 where the runs share a width or an error is 0."""
    scales = [1.0, 4.0, 1.0, 4.0]
    assert wider_runs_p([0.0, 0.0, 0.0, 0.0], [0.1] * 4, scales) == pytest.approx(0.5)
    # difference 0.3, standard error sqrt(2 * 0.01 / 4 + 2 * 0.01 / 4) = 0.1: z = 3
    p = wider_runs_p([-0.2, 0.1, -0.2, 0.1], [0.1] * 4, scales)
    assert p == pytest.approx(0.5 * math.erfc(3 / math.sqrt(2)))
    assert wider_runs_p([0.1, -0.2, 0.1, -0.2], [0.1] * 4, scales) > 0.99
    assert wider_runs_p([-0.2, 0.1, -0.2, 0.1], [0.1] * 4, [1.0] * 4) == 1.0
    assert wider_runs_p([-0.2, 0.1, -0.2, 0.1], [0.1, 0.0, 0.1, 0.1], scales) == 1.0
    assert np.isfinite(wider_runs_p([-0.2, 0.1, -0.2], [0.1] * 3, [1.0, 4.0, 1.0]))


def nan_beyond_seven(x):
    """N(0, I), NaN beyond 7 in any coordinate (an overflow far out, where N(0, 16 I) draws go)."""
    lp = -0.5 * (x**2).sum(-1)
    return torch.where(x.abs().amax(-1) > 7.0, torch.full_like(lp, math.nan), lp)


def beta_box(x):
    """Beta(2, 3) coordinates on (0, 1)^2, -inf outside: the 16 first draws of N(0, 16 I) may all miss."""
    inside = ((x > 0) & (x < 1)).all(-1)
    xs = torch.where(inside[:, None], x, torch.full_like(x, 0.5))
    lp = (torch.log(xs) + 2 * torch.log1p(-xs)).sum(-1)
    return torch.where(inside, lp, torch.full_like(lp, -torch.inf))


@pytest.mark.parametrize("fn", [nan_beyond_seven, beta_box])
def test_a_wider_reference_the_target_refuses_falls_back_to_n01(fn):
    """Where the target is NaN at the wider reference's draws, or -inf at all of them, those runs
    are made from N(0, I) (``reference_scales`` says 1), any NaN the refused runs met counts as
    exploration (no NaN warning; seed 1, where the runs from N(0, I) meet none themselves)."""
    target = ds.Target(fn, 2, dtype=F64)
    attrs, messages = sample(target, 1, check_modes=False)
    assert attrs["reference_scales"] == [1.0, 1.0, 1.0, 1.0] and attrs["wider_runs_p"] == 1.0
    assert not any("returned NaN" in m for m in messages)
    assert attrs["num_nan_evals"] == attrs.get("num_nan_exploration", 0)
    with pytest.raises(ValueError, match="NaN|-inf"):  # from N(0, 4^2 I) only, the start is refused
        ds.sample(target, "smc", num_samples=1000, seed=1, progress=False, reference_scales=(4.0,))
