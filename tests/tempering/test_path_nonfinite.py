"""A trajectory that overflows must be rejected, not crash the run: a user's reference distribution
validates its argument (``torch.distributions`` does by default) and raised a ``ValueError`` on the
non-finite point of a diverged HMC trajectory."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import diffstat as ds
from diffstat.tempering.path import GeometricPath


def _reference(dim: int, scale: float = 3.0):
    zeros = torch.zeros(dim, dtype=torch.float64)
    return torch.distributions.Independent(
        torch.distributions.Normal(zeros, torch.full_like(zeros, scale)), 1
    )


def test_non_finite_rows_get_minus_infinity_from_the_reference():
    """Rows with an infinite or NaN entry: reference log-density -inf (no ValueError), the finite
    rows exactly as the distribution gives them."""
    ref = _reference(3)
    path = GeometricPath(ds.Target(lambda x: -0.5 * (x**2).sum(-1), 3, reference=ref, dtype=torch.float64))
    x = torch.tensor([[0.5, -1.0, 2.0], [math.inf, 0.0, 0.0], [math.nan, 0.0, 0.0]], dtype=torch.float64)
    state = path.evaluate(x)
    assert state.base[0] == ref.log_prob(x[:1])[0]
    assert state.base[1:].eq(-math.inf).all()


@pytest.mark.parametrize("method", ["smc", "ais", "pt"])
def test_a_diverging_hmc_move_is_rejected_not_a_crash(method):
    r"""A steep quartic :math:`-100\sum x_i^4` in 2-d with HMC moves at step 1 from a N(0, 9 I)
    reference: the first trajectories overflow (PT raised ``ValueError`` from the reference's
    argument check). Now every method finishes with finite draws whose sd is the exact
    :math:`\sqrt{\Gamma(3/4) / (10\,\Gamma(1/4))}` = 0.184 to within 25% (a wrong scale, e.g. the
    reference's 3, is far outside), and log Z near the exact
    :math:`2 \log(2\Gamma(5/4) / 100^{1/4}) = -1.113`."""
    target = ds.Target(lambda x: -100 * (x**4).sum(-1), 2, reference=_reference(2), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # PT reports the divergences
        idata = ds.sample(
            target, method, num_samples=400, seed=0, progress=False, kernel="hmc", step_size=1.0
        )
    x = idata.posterior["x"].values.reshape(-1, 2)
    exact_sd = math.sqrt(math.gamma(0.75) / (10 * math.gamma(0.25)))
    exact_log_z = 2 * math.log(2 * math.gamma(1.25) / 100**0.25)
    assert np.isfinite(x).all()
    assert np.abs(x.std(0) / exact_sd - 1).max() < 0.25
    assert abs(idata.posterior.attrs["log_normalizer"] - exact_log_z) < 0.2
