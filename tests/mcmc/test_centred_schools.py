"""NUTS through ds.sample on Eight Schools (issue 13): the centred form, whose funnel's neck NUTS
under-visits at defaults, is warned about; the non-centred form of the same posterior is not. Every
divergence the kernel records reaches the warning and the attributes."""

import warnings

import numpy as np
import torch

import diffstat as ds

Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], dtype=torch.float64)
SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], dtype=torch.float64)


def eight_schools(centred: bool) -> ds.Target:
    """mu ~ N(0, 5), tau ~ HalfCauchy(5), theta_j ~ N(mu, tau), y_j ~ N(theta_j, sigma_j), in
    (mu, log tau, theta) (centred) or (mu, log tau, eta) with theta = mu + tau eta (non-centred),
    with the log-Jacobian of tau = exp(log tau)."""

    def log_prob(x):
        mu, log_tau, z = x[..., 0], x[..., 1], x[..., 2:]
        tau = log_tau.exp()
        lp = -0.5 * (mu / 5) ** 2 - torch.log1p((tau / 5) ** 2) + log_tau
        if centred:
            theta = z
            lp = lp - 8 * log_tau - 0.5 * (((theta - mu[..., None]) / tau[..., None]) ** 2).sum(-1)
        else:
            theta = mu[..., None] + tau[..., None] * z
            lp = lp - 0.5 * (z**2).sum(-1)
        return lp - 0.5 * (((Y - theta) / SIGMA) ** 2).sum(-1)

    return ds.Target(log_prob, 10, dtype=torch.float64)


def run(centred: bool):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = ds.sample(
            eight_schools(centred), "nuts", num_samples=300, seed=1, progress=False, check_modes=False
        )
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    return idata, messages


def test_centred_eight_schools_warns_and_reports_its_divergences():
    """300 draws per chain, seed 1: the centred form warns (R-hat, ESS, divergences: 5 at the time
    of writing), the non-centred form of the same posterior is silent with no divergence, so the
    warning is the geometry's, not the run length's. The check for missed modes (after sampling,
    beside the point here) is off: it took two thirds of the test's time."""
    idata, messages = run(centred=True)
    assert len(messages) == 1, messages
    num_div = int(idata.sample_stats["diverging"].values.sum())
    assert idata.posterior.attrs["num_divergent"] == num_div
    assert ("divergent transitions" in messages[0]) == (num_div > 0)
    assert f"{num_div} divergent transitions" in messages[0] or num_div == 0
    idata_nc, messages_nc = run(centred=False)
    assert messages_nc == [], messages_nc
    assert not idata_nc.sample_stats["diverging"].values.any()
    assert np.isfinite(idata_nc.posterior["x"].values).all()
