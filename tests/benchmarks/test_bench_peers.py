"""The peers' interface of ``benchmarks/bench_peers.py``: the log-likelihood they see and the prior
transform must make their Z (of likelihood x prior) the Z of the target, and every point they
evaluate must be counted.

Target: :math:`p(x) = e^{c}\\, \\mathcal N(x; m, s^2 I)` in 2-d with :math:`c = 1.3`, so
:math:`\\log Z = 1.3` exactly; reference N(0, 3^2 I). The peer runs need the ``[bench]`` extra and
are skipped without it.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import diffstat as ds

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
bench_peers = pytest.importorskip("bench_peers")

LOG_Z = 1.3
MEAN = torch.tensor([1.0, -0.5], dtype=torch.float64)
SD = 0.7


def gaussian_log_prob(x: torch.Tensor) -> torch.Tensor:
    return LOG_Z + torch.distributions.Normal(MEAN, SD).log_prob(x).sum(-1)


def gaussian_target() -> ds.Target:
    zeros = torch.zeros(2, dtype=torch.float64)
    reference = torch.distributions.Independent(torch.distributions.Normal(zeros, 3.0 + zeros), 1)
    return ds.Target(gaussian_log_prob, 2, reference=reference, dtype=torch.float64)


def test_likelihood_times_prior_integrates_to_z():
    """E_prior[L] = Z exactly: the Monte Carlo mean of L over 200,000 prior draws (made by the prior
    transform from uniforms) is within 4 standard errors of e^1.3; the likelihood without the
    reference subtracted (the wrong convention) is rejected by the same test."""
    target = gaussian_target()
    loglike = bench_peers.CountedLogLikelihood(target)
    transform = bench_peers.UnitCubeToReference(*bench_peers.diagonal_gaussian(target))
    u = np.random.default_rng(0).uniform(size=(200_000, 2))
    x = transform(u)
    assert abs(x.mean(0)).max() < 0.05 and abs(x.std(0) - 3.0).max() < 0.05  # draws of N(0, 3^2 I)
    for log_l, right in ((loglike(x), True), (gaussian_log_prob(torch.as_tensor(x)).numpy(), False)):
        w = np.exp(log_l)
        z, se = w.mean(), w.std() / math.sqrt(len(w))
        assert (abs(z - math.exp(LOG_Z)) < 4 * se) == right, (z, se)


def test_every_point_is_counted():
    target = gaussian_target()
    loglike = bench_peers.CountedLogLikelihood(target)
    batch = loglike(np.zeros((7, 2)))
    single = loglike(np.zeros(2))
    assert batch.shape == (7,) and isinstance(single, float) and single == batch[0]
    assert loglike.num_evals == 8 and target.num_target_evals == 8


def test_a_non_gaussian_reference_is_refused():
    target = ds.Target(gaussian_log_prob, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="Independent"):
        bench_peers.diagonal_gaussian(target)


def test_dynesty_log_z():
    """dynesty through ``run_peer`` with 100 live points (its default 500 takes over 20 s here):
    log Z within 0.57 of 1.3, four times nested sampling's error sqrt(H / n_live) = 0.14 (H =
    KL(posterior || prior) = 2.03 nats here), while the wrong convention (reference not
    subtracted) is 2.3 off; its evaluations are the target's; its draws' mean within 0.2 of m
    (about 3 standard errors of 100 independent draws of sd 0.7)."""
    pytest.importorskip("dynesty")
    target = gaussian_target()
    out = bench_peers.run_peer("dynesty", target, seed=0, options={"nlive": 100})
    assert out["evals"] == target.num_target_evals > 0
    assert abs(out["log_z"] - LOG_Z) < 0.57, out["log_z"]
    assert np.abs(out["draws"].mean(0) - MEAN.numpy()).max() < 0.2
