"""MCMC never hands the target a point with a non-finite coordinate (diffstat.mcmc.sampler)."""

import math
import warnings

import torch

import diffstat as ds
from diffstat.mcmc.sampler import finite_points_only


def banana_f32(seen: list):
    """x1 ~ N(0, 1.5^2), x_k | x1 ~ N(0.5 x1^2, 1), k = 2..5, in float32: finite at every finite
    point; ``seen`` collects whether each call's points were all finite."""

    def log_prob(x):
        seen.append(bool(torch.isfinite(x).all()))
        rest = x[:, 1:] - 0.5 * x[:, :1] ** 2
        return -0.5 * (x[:, 0] / 1.5) ** 2 - 0.5 * (rest**2).sum(-1)

    return ds.Target(log_prob, 5, dtype=torch.float32)


def test_overflowed_rows_get_minus_inf_and_the_target_sees_finite_points_only():
    seen = []
    target = banana_f32(seen)
    lpg = finite_points_only(target.log_prob_and_grad, torch.zeros(5))
    x = torch.tensor([[0.5, 0.1, 0.2, 0.3, 0.4], [math.inf, 1.0, 1.0, 1.0, 1.0], [0.0, math.nan, 0, 0, 0]])
    lp, grad = lpg(x)
    ref_lp, ref_grad = target.log_prob_and_grad(x[:1])
    assert lp[0] == ref_lp[0] and torch.equal(grad[0], ref_grad[0])
    assert lp[1:].tolist() == [-math.inf, -math.inf] and not grad[1:].any()
    assert all(seen) and target.num_nan_evals == 0


def test_hmc_in_float32_does_not_blame_the_log_density_for_its_own_overflow():
    """HMC at its defaults on the float32 banana (seed 0): its diverging trajectories overflowed and
    67 of 80,799 evaluations were NaN, all at points with an infinite coordinate; the front door then
    warned that "the log-density returned NaN" and to return -inf outside the support."""
    seen = []
    target = banana_f32(seen)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = ds.sample(target, "hmc", num_samples=1000, seed=0, progress=False)
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert all(seen) and target.num_nan_evals == 0
    assert not any("returned NaN" in m for m in said), said
    assert idata.posterior.attrs["num_nan_evals"] == 0
