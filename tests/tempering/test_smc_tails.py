"""SMC on a target with heavier tails than its reference: the Pareto-k limit on the tempering steps
(``max_pareto_k``, :func:`~diffstat.tempering.smc.tail_limited_beta`), ``docs/smc_banana.md``."""

import math

import pytest
import torch

import diffstat as ds
from diffstat._util import pareto_k
from diffstat.tempering.smc import tail_limited_beta

F64 = torch.float64
NU, DIM = 5.0, 4


def student_t_log_prob(x):
    """The normalised multivariate t (NU degrees of freedom, identity scale): log Z = 0."""
    const = math.lgamma((NU + DIM) / 2) - math.lgamma(NU / 2) - 0.5 * DIM * math.log(NU * math.pi)
    return const - 0.5 * (NU + DIM) * torch.log1p((x**2).sum(-1) / NU)


def test_tail_limited_beta_shortens_a_step_to_heavy_tailed_weights():
    # N(0, I) draws reweighted toward the t: log t - log N grows like |x|^2 / 2, a Pareto tail
    x = torch.randn(1000, DIM, generator=torch.Generator().manual_seed(0), dtype=F64)
    delta = student_t_log_prob(x) - torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1)
    log_w, beta, one = torch.zeros(1000, dtype=F64), torch.zeros((), dtype=F64), torch.ones((), dtype=F64)
    assert pareto_k(delta) > 0.5  # the one-step weights of the default (the whole way at once)
    short = tail_limited_beta(log_w, delta, beta, one, 0.5)
    assert 0 < float(short) < 1 and pareto_k(short * delta) <= 0.5
    assert tail_limited_beta(log_w, delta, beta, one, 0.99) is one  # under the limit: unchanged


def test_max_pareto_k_brings_the_student_t_evidence_closer():
    # at defaults log Z is -0.056 (s.e. 0.013) at this seed: the step straight to beta = 1 has
    # infinite-variance weights; limited to k <= 0.5, -0.018 (s.e. 0.007) over more stages
    target = ds.Target(student_t_log_prob, DIM, dtype=F64)
    idata = ds.sample(target, "smc", num_samples=1000, seed=0, progress=False, max_pareto_k=0.5)
    attrs = idata.posterior.attrs
    assert abs(attrs["log_normalizer"]) < 0.04 and attrs["num_stages"] >= 3


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.5, float("nan")])
def test_max_pareto_k_refuses_values_outside_the_unit_interval(bad):
    target = ds.Target(student_t_log_prob, DIM, dtype=F64)
    with pytest.raises(ValueError, match="max_pareto_k"):
        ds.sample(target, "smc", num_samples=50, seed=0, progress=False, max_pareto_k=bad)
