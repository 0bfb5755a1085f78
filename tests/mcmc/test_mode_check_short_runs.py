"""The check for missed modes after a short MCMC run (issue 13's fourth audit, ``docs/audit.md``).

``narrow_wide(11, scales=(0.35, 1))`` from N(0, I): every chain settles in the light wide mode, and
the heavy narrow one (3/4 of the mass) holds about 0.2% of the check's scaled reference draws'
basins. When a run of 30,000 evaluations screened 1,024 starts, HMC and NUTS at their defaults were
silently wrong (mode weight off by 0.75) on seeds 0, 2 and 3 of HMC and 0, 2 and 4 of NUTS; the
4,096 starts every run now screens find the mode on each.
"""

from __future__ import annotations

import pytest
import torch

import diffstat as ds
from diffstat.targets.two_modes import narrow_wide

F64 = torch.float64


@pytest.mark.parametrize("seed", [0, 2, 3])
def test_hmc_at_defaults_warns_of_the_heavy_mode_of_narrow_wide_11_that_every_chain_missed(seed):
    mix = narrow_wide(11, scales=(0.35, 1.0))
    target = mix.as_target(dtype=F64)
    with pytest.warns(RuntimeWarning, match="no draw reaches"):
        idata = ds.sample(target, "hmc", num_samples=1000, seed=seed, progress=False)
    x = torch.as_tensor(idata.posterior.x.values).reshape(-1, 11)
    assert float((mix.assign(x) == 0).double().mean()) == 0.0  # no chain in the heavy mode
    assert abs(idata.posterior.attrs["missed_mode_share"] - 0.75) < 0.02  # its exact weight
