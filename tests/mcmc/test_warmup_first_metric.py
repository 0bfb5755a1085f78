"""Warm-up's check of a first metric handed in by the start phase (``diffstat.mcmc.warmup``): on a
Gaussian target, a first metric 10^4 times too narrow in 9 of 10 directions makes NUTS's trees
saturate and is replaced by the identity where the identity fits the target; it comes back where the
identity fits worse; the exact covariance is never questioned."""

import torch

from diffstat.mcmc.base import init as init_state
from diffstat.mcmc.metric import DenseMetric
from diffstat.mcmc.sampler import KERNELS
from diffstat.mcmc.start import initial_step_sizes
from diffstat.mcmc.warmup import windowed_warmup

F64 = torch.float64


def warm_up(target_var, metric_var, num_warmup=60, seed=0):
    """60 iterations: the first metric window ends at 54, so without the check the first metric
    would be the one in use for 54 iterations."""
    gen = torch.Generator().manual_seed(seed)
    spec = KERNELS["nuts"]
    var = torch.tensor(target_var, dtype=F64)

    def log_prob_and_grad(x):
        return -0.5 * (x**2 / var).sum(-1), -x / var

    state = init_state(log_prob_and_grad, torch.randn(4, len(var), generator=gen, dtype=F64) * var.sqrt())
    metric = DenseMetric.from_covariance(torch.diag(torch.tensor(metric_var, dtype=F64)))

    def accept_prob(s, h, m):
        return spec.accept_prob(gen, s, log_prob_and_grad, h, m)

    h0 = initial_step_sizes(lambda h: accept_prob(state, h, metric), torch.full((4,), 0.1, dtype=F64))
    return windowed_warmup(
        gen, state, log_prob_and_grad, step=spec.step, accept_prob=accept_prob, target_accept=0.8,
        num_warmup=num_warmup, step_size=h0, inv_mass=metric,
    )  # fmt: skip


def test_a_far_too_narrow_first_metric_is_replaced_by_the_identity():
    for seed in (0, 1):
        result = warm_up([1.0] * 10, [1.0] + [1e-4] * 9, seed=seed)
        assert result.first_metric_dropped, seed


def test_the_first_metric_comes_back_where_the_identity_is_worse():
    # Target sds 1e-4 in 9 directions: the identity needs 10^4 steps a U-turn, the metric ~10^2.
    result = warm_up([1.0] + [1e-8] * 9, [1.0] + [1e-12] * 9)
    assert not result.first_metric_dropped


def test_the_exact_covariance_is_kept():
    result = warm_up([1.0] * 10, [1.0] * 10)
    assert not result.first_metric_dropped
    assert result.metric == "dense"
