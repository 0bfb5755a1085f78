"""The missed-mode check where the draws' metric is wrong for the other modes (audit 6b, finding 2):
starts climbing with the covariance of the mode the draws hold stop on the flanks of modes shaped
otherwise; the Newton moves of the climbs still rising finish them (``docs/mode_check.md``)."""

from __future__ import annotations

import math

import numpy as np
import torch

import diffstat as ds
from diffstat.modes.check import NUM_CHECK_STARTS, NUM_SCREENED, SCREEN_STEPS
from diffstat.modes.climb import BoxedTarget, finish_climbs
from diffstat.modes.coverage import missed_modes

F64 = torch.float64


def _mix3():
    """``mix3_corr`` (benchmarks/bench_mix3_check.py): 0.5 N(m1, S1) + 0.3 N(m2, S2) + 0.2 N(m3, S3) in
    5-d, an AR(0.9), an equicorrelated (0.6) and a (-0.9)-pair covariance, means 6.7 to 7.4 apart."""
    ar = 0.9 ** np.abs(np.subtract.outer(np.arange(5), np.arange(5)))
    equi = np.full((5, 5), 0.6) + 0.4 * np.eye(5)
    neg = np.eye(5)
    neg[0, 4] = neg[4, 0] = -0.9
    neg[1, 2] = neg[2, 1] = 0.5
    sds = np.array([[0.3, 0.5, 1.0, 1.5, 2.0], [2.0, 1.0, 0.5, 0.3, 1.0], [0.6, 1.2, 0.8, 2.0, 0.4]])
    covs = np.stack([np.outer(s, s) * c for s, c in zip(sds, [ar, equi, neg])])
    means = np.array([[0.0] * 5, [4.0, -4.0, 3.0, 0.0, 2.0], [1.0, -1.0, 5.0, -4.0, -2.0]])
    comps = torch.distributions.MultivariateNormal(
        torch.as_tensor(means, dtype=F64), torch.as_tensor(covs, dtype=F64)
    )
    log_w = torch.tensor([0.5, 0.3, 0.2], dtype=F64).log()

    def log_prob(x):
        return torch.logsumexp(comps.log_prob(x[..., None, :]) + log_w, -1)

    return ds.Target(log_prob, 5, dtype=F64), comps


def test_draws_of_one_component_warn_of_the_two_others_shaped_otherwise():
    """Exact draws of component 1 alone, evidence log 0.5, the check's own starts (N(0, I), screened as
    after a run): the missed share is exactly 0.5 (Laplace is exact on Gaussian components this far
    apart) and the missed modes are m2 and m3. Before the Newton moves the climbs of m2's and m3's
    starts, preconditioned by S1, stopped on their flanks and counted as covered: share 0.02 to 0.04
    on AIS's draws of this target (under the limit 0.05)."""
    target, comps = _mix3()
    torch.manual_seed(0)
    draws = comps.sample((1000,))[:, 0]
    gen = torch.Generator().manual_seed(0)
    starts = torch.randn(NUM_SCREENED, 5, generator=gen, dtype=F64)
    res = missed_modes(
        target, draws, math.log(0.5), starts, gen, keep=NUM_CHECK_STARTS, screen_steps=SCREEN_STEPS
    )
    assert abs(res.share - 0.5) < 1e-3 and abs(res.misweight - 0.5) < 1e-3
    order = res.log_masses.argsort(descending=True)
    torch.testing.assert_close(
        res.log_masses[order], torch.tensor([0.3, 0.2], dtype=F64).log(), rtol=0, atol=1e-3
    )
    torch.testing.assert_close(res.centres[order], comps.mean[1:], rtol=0, atol=1e-3)


def test_draws_of_every_component_raise_no_alarm():
    """Exact draws of the whole mixture, evidence 0: nothing is missed, and the Laplace shares of the
    three modes agree with the draws' (misweight within the draws' Monte Carlo error)."""
    target, comps = _mix3()
    torch.manual_seed(1)
    pick = torch.multinomial(torch.tensor([0.5, 0.3, 0.2], dtype=F64), 1000, replacement=True)
    draws = comps.sample((1000,))[torch.arange(1000), pick]
    gen = torch.Generator().manual_seed(0)
    starts = torch.randn(NUM_SCREENED, 5, generator=gen, dtype=F64)
    res = missed_modes(target, draws, 0.0, starts, gen, keep=NUM_CHECK_STARTS, screen_steps=SCREEN_STEPS)
    assert res.share == 0.0 and res.centres.shape[0] == 0 and res.misweight < 0.05


class _FirstDerivativeOnly(torch.autograd.Function):
    """-|x|^2 / 2 whose backward pass raises a RuntimeError when asked for a graph (create_graph, as
    for a Hessian), as an operation without a second derivative in autograd does."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return -0.5 * (x**2).sum(-1)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError("the derivative of this operation is not implemented")
        (x,) = ctx.saved_tensors
        return -grad[:, None] * x


def test_climbs_on_a_log_density_without_second_derivatives_are_left_as_they_were():
    """The Newton moves need Hessians; where autograd raises for them, ``finish_climbs`` returns the
    points unchanged (with their log-densities) instead of stopping the check."""
    target = ds.Target(_FirstDerivativeOnly.apply, 3, dtype=F64)
    x = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]], dtype=F64)
    y, lp = finish_climbs(BoxedTarget(target, torch.cat([x, -x])), x, 1.0, 4)
    assert torch.equal(y, x)
    torch.testing.assert_close(lp, -0.5 * (x**2).sum(-1), rtol=0, atol=0)
