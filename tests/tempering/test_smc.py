"""Adaptive tempered SMC: telescoping weights, the temperature rule, the genealogy variance
estimator, log Z on mixtures and a conjugate model, mode weights, the output contract."""

import math

import numpy as np

import pytest
import torch

import diffstat as ds
from diffstat._util import log_mean_exp, log_normalizer_estimate
from diffstat.targets import GammaPrecision, GaussianMixture, NormalNormal
from diffstat.tempering.auto_reference import pilot_evals
from diffstat.tempering.path import GeometricPath
from diffstat.tempering.resampling import conditional_ess, ess
from diffstat.tempering.smc import adaptive_tempered_smc, genealogy_variance, next_beta

D = torch.distributions
F64 = torch.float64
LOG_Z = 2.3


def gaussian_target(dim=3, mean=1.5, scale=0.5):
    m = torch.full((dim,), mean, dtype=F64)
    return ds.Target(lambda x: D.Normal(m, scale).log_prob(x).sum(-1) + LOG_Z, dim, dtype=F64)


def mixture(dim):
    means = torch.zeros(3, dim)
    means[0, 0], means[1, 0], means[2, 1] = 3.0, -3.0, 3.0
    return GaussianMixture(means, [0.5, 0.3, 0.2], scales=[0.7, 1.0, 0.85], log_normalizer=LOG_Z)


#: The 6-d, 3-component mixture with unequal weights and widths used for the mode weights.
WEIGHTS = (0.5, 0.3, 0.2)


def mixture6(weights=WEIGHTS):
    means = torch.tensor([[2.5, 2.5, 0, 0, 0, 0], [-2.5, -2.5, 0, 0, 0, 0], [0, 0, 2.5, 2.5, 0, 0]])
    return GaussianMixture(means, weights, scales=[0.7, 1.0, 0.85], log_normalizer=LOG_Z)


def pyro_conjugate(kind):
    """A Pyro model with exact evidence, as a PyroTarget (prior reference, tempered likelihood)."""
    g = torch.Generator().manual_seed(0)
    if kind == "normal":
        model = NormalNormal(1.0 + 0.5 * torch.randn(20, 3, generator=g, dtype=F64), prior_sd=2.0, sd=0.5)
    else:  # a positive parameter: sampled as log tau, with the log-Jacobian in the prior
        model = GammaPrecision(0.7 * torch.randn(30, generator=g, dtype=F64))
    return ds.Target.from_pyro(model.model), model.log_marginal_likelihood()


def log_z_agrees(estimates, ses, truth, tol) -> bool:
    """Mean error over seeds within ``tol`` nats, and each error within 3 reported standard errors."""
    err = torch.tensor(estimates, dtype=F64) - truth
    return bool(err.mean().abs() < tol and (err.abs() <= 3 * torch.tensor(ses, dtype=F64)).all())


def weights_agree(draws, gm, weights, tol=0.05) -> bool:
    """Each mode's share of the draws (nearest component of ``gm``) within ``tol`` of ``weights``."""
    share = torch.bincount(gm.assign(draws), minlength=len(weights)).to(F64) / draws.shape[0]
    return bool(((share - torch.tensor(weights, dtype=F64)).abs() < tol).all())


# ---------------------------------------------------------------------------- exact identities
def test_smc_weights_and_evidence_telescope_without_moves_or_resampling(generator):
    target = gaussian_target()
    path = GeometricPath(target)
    x0 = path.sample_reference(400, generator)
    out = adaptive_tempered_smc(generator, path, x0, num_mcmc_steps=0, resample_threshold=0.0)
    exact = target.log_prob(x0) - D.Normal(0.0, 1.0).log_prob(x0).sum(-1)
    assert len(out.stages["beta"]) > 3 and out.num_resampling == 0
    assert torch.allclose(out.log_weights, exact, rtol=0, atol=1e-10)
    assert math.isclose(out.log_normalizer, float(log_mean_exp(exact)), abs_tol=1e-10)
    # Without resampling the Lee-Whiteley variance is the importance-sampling delta method's.
    v, _ = genealogy_variance(out.log_weights, torch.arange(400), 0, "multinomial")
    assert math.isclose(math.sqrt(v), log_normalizer_estimate(exact)[1], rel_tol=1e-9)


def test_smc_on_the_reference_itself_is_exact():
    """Target = reference: every increment is 0, log Z = 0 exactly, and the Chan-Lai variance of the
    systematic scheme is 0 however often it resamples; so are the four runs' pool and its spread."""
    target = ds.Target(lambda x: -0.5 * (x**2).sum(-1) - 0.5 * 2 * math.log(2 * math.pi), 2, dtype=F64)
    idata = ds.sample(
        target,
        "smc",
        num_samples=100,
        seed=0,
        progress=False,
        betas=[0.3, 0.6, 1.0],
        resample_threshold=1.0,
        reference_scales=(1.0,),  # every run from N(0, I), the target itself
    )
    attrs = idata.posterior.attrs
    assert attrs["num_resampling"] == 4 * 3 and attrs["runs_agreement_p"] == 1.0
    assert attrs["log_normalizer"] == 0.0 and attrs["log_normalizer_se"] < 1e-7  # sqrt of rounding


def test_next_temperature_hits_the_conditional_ess_target(generator):
    delta = 3.0 * torch.randn(500, generator=generator, dtype=F64)
    log_w = torch.randn(500, generator=generator, dtype=F64)
    beta = torch.tensor(0.2, dtype=F64)
    b = next_beta(log_w, delta, beta, 0.5)
    assert 0.2 < float(b) < 1.0
    assert math.isclose(float(conditional_ess(log_w, (b - beta) * delta)), 250.0, rel_tol=1e-6)
    # If the whole way to 1 keeps the CESS above target, the step goes to 1.
    assert float(next_beta(log_w, 1e-3 * delta, beta, 0.5)) == 1.0
    # The "ess" rule: the updated weights keep the given fraction of the current ESS.
    b = next_beta(log_w, delta, beta, 0.5, criterion="ess")
    assert math.isclose(float(ess(log_w + (b - beta) * delta)), 0.5 * float(ess(log_w)), rel_tol=1e-6)


# ---------------------------------------------------------------------------- log Z
@pytest.mark.parametrize("dim", [2, 10])
def test_smc_log_normalizer_on_gaussian_mixtures(dim):
    target = mixture(dim).as_target(dtype=F64)
    runs = [
        ds.sample(target, "smc", num_samples=1000, seed=s, progress=False).posterior.attrs for s in range(3)
    ]
    est, ses = [a["log_normalizer"] for a in runs], [a["log_normalizer_se"] for a in runs]
    assert log_z_agrees(est, ses, LOG_Z, tol=0.1)
    # A wrong target, the mixture with log Z larger by 0.3, is rejected by the same rule.
    assert not log_z_agrees(est, ses, LOG_Z + 0.3, tol=0.1)


@pytest.mark.parametrize(
    "kind, resampling", [("normal", "systematic"), ("normal", "multinomial"), ("gamma", "stratified")]
)
def test_smc_evidence_of_conjugate_pyro_models_tempering_the_likelihood(kind, resampling):
    target, evidence = pyro_conjugate(kind)
    runs = [
        ds.sample(
            target, "smc", num_samples=1000, num_chains=1, seed=s, progress=False, resampling=resampling
        ).posterior.attrs
        for s in range(3)
    ]
    est, ses = [a["log_normalizer"] for a in runs], [a["log_normalizer_se"] for a in runs]
    assert runs[0]["path"] == "likelihood"
    assert runs[0]["log_normalizer_se_method"] == (
        "Lee-Whiteley" if resampling == "multinomial" else "Chan-Lai"
    )
    assert log_z_agrees(est, ses, evidence, tol=0.1)
    assert not log_z_agrees(est, ses, evidence + 0.3, tol=0.1)


def test_smc_counts_one_evaluation_per_point_on_a_pyro_model():
    target, _ = pyro_conjugate("normal")
    idata = ds.sample(target, "smc", num_samples=200, num_chains=1, seed=0, progress=False, num_mcmc_steps=2)
    attrs = idata.posterior.attrs
    # the run's evaluations, then the check for missed modes (counted too)
    assert attrs["num_target_evals"] == 16 + 200 * (1 + 2 * attrs["num_stages"]) + attrs["mode_check_evals"]
    assert list(idata.posterior.data_vars) == ["mu"] and idata.posterior.mu.shape == (1, 200, 3)


# ---------------------------------------------------------------------------- mode weights
def test_smc_recovers_the_mode_weights_of_a_6d_mixture():
    gm = mixture6()
    idata = ds.sample(
        gm.as_target(dtype=F64), "smc", num_samples=2000, num_chains=1, seed=0, progress=False, target_ess=0.9
    )
    draws = torch.as_tensor(idata.posterior.x.values[0])
    assert weights_agree(draws, gm, WEIGHTS)
    # A wrong target (the same modes weighted 0.35 / 0.35 / 0.3) is rejected by the same check.
    wrong = mixture6((0.35, 0.35, 0.3))
    idata = ds.sample(
        wrong.as_target(dtype=F64),
        "smc",
        num_samples=2000,
        num_chains=1,
        seed=0,
        progress=False,
        target_ess=0.9,
    )
    assert not weights_agree(torch.as_tensor(idata.posterior.x.values[0]), gm, WEIGHTS)


# ---------------------------------------------------------------------------- contract
def test_smc_output_contract_and_evaluation_count():
    target = gaussian_target()
    n = 300
    idata = ds.sample(target, "smc", num_samples=n, num_chains=1, seed=0, progress=False, num_mcmc_steps=3)
    x = torch.as_tensor(idata.posterior.x.values)
    assert x.shape == (1, n, 3)
    lp = torch.as_tensor(idata.sample_stats.lp.values[0])
    assert torch.allclose(lp, target.log_prob(x[0]), rtol=0, atol=1e-12)
    for key in ("log_weight", "acceptance_rate"):
        assert idata.sample_stats[key].shape == (1, n)
    group = idata.tempering
    betas = group.beta.values[:, 0]
    assert betas[-1] == 1.0 and (betas[1:] > betas[:-1]).all()
    assert {"ess", "log_z_increment", "acceptance_rate", "step_size", "resampled"} <= set(group.data_vars)
    attrs = idata.posterior.attrs
    k = attrs["num_stages"]
    assert k == len(betas) and attrs["method"] == "smc"
    assert math.isclose(attrs["log_normalizer"], float(group.log_z_increment.sum()), abs_tol=1e-9)
    pilot = pilot_evals(target)  # the default reference's pilot (auto_reference)
    assert attrs["num_target_evals"] == 16 + n * (1 + 3 * k) + attrs["mode_check_evals"] + pilot
    assert attrs["missed_mode_share"] == 0.0
    # Independent runs as chains (4 by default): their per-stage diagnostics side by side, and the
    # pooled log Z the log of the mean of the runs' Z estimates.
    idata = ds.sample(target, "smc", num_samples=50, seed=0, progress=False)
    assert idata.posterior.x.shape == (4, 50, 3) and idata.tempering.beta.shape[1] == 4
    per_run = torch.as_tensor(np.nansum(idata.tempering.log_z_increment.values, 0))
    pooled = float(torch.logsumexp(per_run, 0) - math.log(4))
    assert math.isclose(idata.posterior.attrs["log_normalizer"], pooled, rel_tol=0, abs_tol=1e-12)


def test_smc_refuses_bad_options():
    target = gaussian_target()
    bad_options = (
        dict(target_ess=1.5),
        dict(resampling="residual"),
        dict(criterion="kl"),
        dict(resample_threshold=2.0),
        dict(num_mcmc_step=3),
        dict(betas=[0.5, 0.4, 1.0]),
        dict(reference=D.Normal(0.0, 1.0)),
    )
    for bad in bad_options:
        with pytest.raises(ValueError):
            ds.sample(target, "smc", num_samples=10, seed=0, progress=False, **bad)
