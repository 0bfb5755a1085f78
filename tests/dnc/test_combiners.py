"""Combiners of ``ds.dnc.combine`` against exact products: Gaussian shards (the product is the
Gaussian product, exactly), and bimodal Gaussian-mixture shards (the product of two Gaussian
mixtures is a Gaussian mixture, computed here in closed form)."""

import math

import numpy as np
import pytest
import torch

import diffstat as ds
from diffstat.dnc.gaussian import gaussian_product, sample_moments
from diffstat.dnc.swiss import swiss_maps

DIM = 2


def _gaussian_shards(generator, num_shards=4, n=4000):
    """Exact draws and scores of K Gaussian sub-posteriors N(m_k, S_k) and their exact product."""
    means, covs, draws, scores = [], [], [], []
    for _ in range(num_shards):
        m = torch.randn(DIM, generator=generator, dtype=torch.float64)
        a = torch.randn(DIM, DIM, generator=generator, dtype=torch.float64)
        s = a @ a.T + 0.5 * torch.eye(DIM, dtype=torch.float64)
        x = m + torch.randn(n, DIM, generator=generator, dtype=torch.float64) @ torch.linalg.cholesky(s).T
        means.append(m)
        covs.append(s)
        draws.append(x)
        scores.append(-(x - m) @ torch.linalg.inv(s))
    mu, sigma = gaussian_product(means, covs)
    return draws, scores, mu, sigma


def _draws(idata):
    return torch.as_tensor(idata.posterior["x"].values).reshape(-1, DIM)


def _mean_z(x, mu, sigma):
    """|mean - mu| in units of the Monte Carlo standard error (independent draws), per coordinate."""
    se = torch.sqrt(torch.diagonal(sigma) / x.shape[0])
    return ((x.mean(0) - mu) / se).abs()


@pytest.mark.parametrize("method", ["gaussian", "consensus", "swiss"])
def test_gaussian_shards_exact_product(generator, method):
    draws, scores, mu, sigma = _gaussian_shards(generator)
    idata = ds.dnc.combine(draws, method, scores=scores, num_samples=4000, seed=1, progress=False)
    x = _draws(idata)
    # the plug-in moments carry their own error (4000 draws per shard): allow z < 5
    assert (_mean_z(x, mu, sigma) < 5).all()
    _, cov = sample_moments(x)
    assert torch.allclose(cov, sigma, rtol=0.15, atol=0.02 * float(sigma.diagonal().max()))
    assert idata.posterior["x"].shape == (1, 4000, DIM)
    assert "lp" in idata.sample_stats
    assert idata.posterior.attrs["method"] == f"dnc_{method}"
    assert idata.posterior.attrs["num_shards"] == 4


def test_gaussian_combiner_rejects_wrong_product(generator):
    """Negative case: the same check fails against the product of the wrong shards."""
    draws, scores, mu, sigma = _gaussian_shards(generator)
    idata = ds.dnc.combine(draws[:3], "gaussian", num_samples=4000, seed=1, progress=False)
    assert (_mean_z(_draws(idata), mu, sigma) > 5).any()


def test_swiss_maps_match_moments_exactly(generator):
    """Identity (float64): every moved shard has exactly the target mean and covariance."""
    draws, _, _, _ = _gaussian_shards(generator, n=500)
    mean, cov, maps = swiss_maps(draws)
    for x, (m_k, a_k) in zip(draws, maps):
        moved = mean + (x - m_k) @ a_k.T
        m2, c2 = sample_moments(moved)
        assert torch.allclose(m2, mean, atol=1e-10)
        assert torch.allclose(c2, cov, atol=1e-10)


def test_semiparametric_gaussian_shards(generator):
    draws, scores, mu, sigma = _gaussian_shards(generator, n=2000)
    idata = ds.dnc.combine(draws, "semiparametric", num_samples=2000, seed=2, progress=False, num_sweeps=20)
    x = _draws(idata)
    # the kernel adds a small bias (bandwidth h^2/K): a looser bound than the exact combiners
    assert (_mean_z(x, mu, sigma) < 8).all()
    assert "semiparametric" in idata.groups()


def test_diffusion_gaussian_shards(generator):
    """Gaussian shards are exact for the Gaussian part: a short fit and annealing keep it."""
    draws, scores, mu, sigma = _gaussian_shards(generator, n=2000)
    idata = ds.dnc.combine(
        draws,
        "diffusion",
        scores=scores,
        num_samples=2000,
        seed=3,
        progress=False,
        num_steps=100,
        hidden=16,
        depth=2,
        num_levels=20,
        num_final_steps=60,
    )
    x = _draws(idata)
    assert (_mean_z(x, mu, sigma) < 5).all()
    _, cov = sample_moments(x)
    assert torch.allclose(cov, sigma, rtol=0.15, atol=0.02 * float(sigma.diagonal().max()))
    assert "diffusion" in idata.groups()
    assert idata.posterior.attrs["max_fit_time"] > 0


# ----------------------------------------------------------------------------- bimodal shards
SHARD_A = dict(means=[-1.5, 1.5], weights=[0.7, 0.3], sd=[0.5, 0.5])
SHARD_B = dict(means=[-1.5, 1.5], weights=[0.6, 0.4], sd=[0.6, 0.6])


def _mixture_draws(spec, n, generator):
    """Draws and exact scores of a 2-d mixture whose components sit at (mean, 0), sd per component."""
    weights = torch.tensor(spec["weights"], dtype=torch.float64)
    means = torch.tensor([[m, 0.0] for m in spec["means"]], dtype=torch.float64)
    sds = torch.tensor(spec["sd"], dtype=torch.float64)
    comp = torch.multinomial(weights, n, replacement=True, generator=generator)
    x = means[comp] + sds[comp, None] * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    log_c = torch.log(weights) - 2 * torch.log(sds) - 0.5 * ((x[:, None] - means) ** 2).sum(-1) / sds**2
    resp = torch.softmax(log_c, -1)  # (n, 2)
    score = (resp[..., None] * (means - x[:, None]) / sds[None, :, None] ** 2).sum(1)
    return x, score


def exact_product_weight_negative_mode(shard_a=None, shard_b=None):
    r"""Weight of the x_1 < 0 mode of the product of the two mixtures, in closed form:
    N(x; a, s^2 I) N(x; b, t^2 I) = N(a; b, (s^2 + t^2) I) N(x; c, u^2 I), so the product of two
    mixtures is a mixture with weights proportional to w_i v_j N(a_i; b_j, (s_i^2 + t_j^2) I)
    and means c_ij = (a_i t_j^2 + b_j s_i^2) / (s_i^2 + t_j^2); summed over the pairs with
    c_ij < 0."""
    shard_a = SHARD_A if shard_a is None else shard_a
    shard_b = SHARD_B if shard_b is None else shard_b
    terms = {}
    for i, (a, wa, sa) in enumerate(zip(shard_a["means"], shard_a["weights"], shard_a["sd"])):
        for j, (b, wb, sb) in enumerate(zip(shard_b["means"], shard_b["weights"], shard_b["sd"])):
            var = sa**2 + sb**2
            # 2-d isotropic: N((a,0); (b,0), var I) = exp(-(a-b)^2 / (2 var)) / (2 pi var)
            log_term = math.log(wa * wb) - (a - b) ** 2 / (2 * var) - math.log(2 * math.pi * var)
            mean = (a * sb**2 + b * sa**2) / var
            terms[(i, j)] = (log_term, mean)
    logs = torch.tensor([v[0] for v in terms.values()])
    w = torch.softmax(logs, 0)
    return float(sum(wk for wk, (_, mean) in zip(w, terms.values()) if mean < 0))


def _bimodal_shards(generator, n=3000, shard_a=SHARD_A, shard_b=SHARD_B):
    xa, ga = _mixture_draws(shard_a, n, generator)
    xb, gb = _mixture_draws(shard_b, n, generator)
    return [xa, xb], [ga, gb]


class ExactNoisedShard:
    """The exact energy of a noised Gaussian-mixture shard in the combiner's whitened
    coordinates z = L^{-1}(x - m): -log of the law of alpha_t Z + sigma_t N(0, I)."""

    def __init__(self, spec, m, chol):
        from diffstat.diffusion.processes import VP
        from diffstat.targets import GaussianMixture

        chol_inv = torch.linalg.inv(chol)
        means = (torch.tensor([[a, 0.0] for a in spec["means"]], dtype=torch.float64) - m) @ chol_inv.T
        covs = torch.stack([s**2 * chol_inv @ chol_inv.T for s in spec["sd"]])
        self.mixture = GaussianMixture(means, spec["weights"], covs=covs)
        self.process = VP()

    def energy(self, z, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        noised = self.mixture.noised(float(self.process.alpha(t)), float(self.process.sigma(t)))
        return -noised.log_prob(z.double()).to(z.dtype)


def _mode_weight(x):
    return float((x[:, 0] < 0).double().mean())


def test_bimodal_mode_weights_annealing_vs_consensus(generator):
    """The annealed MCMC of the diffusion combiner, given the shards' exact noised energies,
    keeps the product's mode weights within 0.05 of the closed form; consensus Monte Carlo, which
    averages one draw per shard, puts mass between the modes and fails."""
    from diffstat.dnc.energy import whitening

    draws, scores = _bimodal_shards(generator)
    exact = exact_product_weight_negative_mode()
    m, chol = whitening(draws)
    energies = [ExactNoisedShard(spec, m, chol) for spec in (SHARD_A, SHARD_B)]
    idata = ds.dnc.combine(
        draws,
        "diffusion",
        scores=scores,
        num_samples=3000,
        seed=4,
        progress=False,
        energy_models=energies,
        num_levels=40,
        num_final_steps=40,
        calibrate=False,
    )
    x = _draws(idata)
    se = math.sqrt(exact * (1 - exact) / x.shape[0])
    assert abs(_mode_weight(x) - exact) < 0.05, (_mode_weight(x), exact)
    # within each mode the draws have the product's sd (sd_A sd_B / sqrt(sd_A^2 + sd_B^2))
    sd = 0.5 * 0.6 / math.sqrt(0.5**2 + 0.6**2)
    neg = x[x[:, 0] < 0]
    assert abs(float(neg[:, 1].std()) / sd - 1) < 0.1

    cons = _draws(ds.dnc.combine(draws, "consensus", num_samples=3000, seed=4, progress=False))
    assert abs(float((cons[:, 0] < -0.75).double().mean()) - exact) > 0.05 + 5 * se
    assert float(((cons[:, 0] > -0.75) & (cons[:, 0] < 0.75)).double().mean()) > 0.2
    assert float(((x[:, 0] > -0.75) & (x[:, 0] < 0.75)).double().mean()) < 0.05


def test_bimodal_annealing_rejects_wrong_energies(generator):
    """Negative case: with one shard's mode weights swapped (0.3/0.7), the same check fails. With
    the calibration on, the shards' draw counts (which have the right weights) repair the wrong
    energies: the offsets between modes are what it estimates."""
    from diffstat.dnc.energy import whitening

    draws, scores = _bimodal_shards(generator)
    m, chol = whitening(draws)
    wrong = dict(SHARD_A, weights=[0.3, 0.7])
    energies = [ExactNoisedShard(wrong, m, chol), ExactNoisedShard(SHARD_B, m, chol)]
    options = dict(
        num_samples=3000, seed=4, progress=False, energy_models=energies, num_levels=40, num_final_steps=40
    )
    idata = ds.dnc.combine(draws, "diffusion", calibrate=False, **options)
    assert abs(_mode_weight(_draws(idata)) - exact_product_weight_negative_mode()) > 0.2
    idata = ds.dnc.combine(draws, "diffusion", **options)
    assert abs(_mode_weight(_draws(idata)) - exact_product_weight_negative_mode()) < 0.05
    assert idata.posterior.attrs["num_calibrated_modes"] == 2


LEARNED = dict(num_samples=3000, hidden=32, depth=2, num_steps=800, num_levels=30, num_final_steps=60)


def test_bimodal_mode_weights_learned_energies(generator):
    """Learned shard energies (fixed seed, short fit): the calibrated product keeps the exact
    mode weight within 0.05 (measured: 0.62-0.82 without calibration); consensus fails."""
    draws, scores = _bimodal_shards(generator)
    exact = exact_product_weight_negative_mode()
    idata = ds.dnc.combine(draws, "diffusion", scores=scores, seed=5, progress=False, **LEARNED)
    x = _draws(idata)
    assert idata.posterior.attrs["num_modes"] == 2 and idata.posterior.attrs["num_calibrated_modes"] == 2
    assert abs(_mode_weight(x) - exact) < 0.05, (_mode_weight(x), exact)
    cons = _draws(ds.dnc.combine(draws, "consensus", num_samples=3000, seed=5, progress=False))
    assert (
        abs(_mode_weight(cons) - exact) > 0.05
        or float(((cons[:, 0] > -0.75) & (cons[:, 0] < 0.75)).double().mean()) > 0.2
    )
    # with the shards' exact log-densities weighing the modes (counted evaluations)
    from diffstat.targets import GaussianMixture

    log_probs = [
        GaussianMixture(
            torch.tensor([[a, 0.0] for a in spec["means"]], dtype=torch.float64),
            spec["weights"],
            scales=spec["sd"],
        ).log_prob
        for spec in (SHARD_A, SHARD_B)
    ]
    idata = ds.dnc.combine(
        draws, "diffusion", scores=scores, seed=5, progress=False, calibration_log_probs=log_probs, **LEARNED
    )
    assert abs(_mode_weight(_draws(idata)) - exact) < 0.05, (_mode_weight(_draws(idata)), exact)
    assert idata.posterior.attrs["num_shard_evals"] > 0 and idata.posterior.attrs["final_is_ess"] > 0.5


def test_bimodal_learned_energies_reject_wrong_weights(generator):
    """Negative case: shard A's draws with its mode weights swapped (0.3/0.7) give a product whose
    weight is far from the original exact value and near the swapped product's exact value."""
    wrong = dict(SHARD_A, weights=[0.3, 0.7])
    draws, scores = _bimodal_shards(generator, shard_a=wrong)
    x = _draws(ds.dnc.combine(draws, "diffusion", scores=scores, seed=5, progress=False, **LEARNED))
    exact_wrong = exact_product_weight_negative_mode(wrong, SHARD_B)
    assert abs(_mode_weight(x) - exact_product_weight_negative_mode()) > 0.2
    assert abs(_mode_weight(x) - exact_wrong) < 0.05, (_mode_weight(x), exact_wrong)


# ----------------------------------------------------------------------------- input checks
def test_bad_input_is_refused(generator):
    draws, scores, _, _ = _gaussian_shards(generator, n=100)
    with pytest.raises(ValueError, match="unknown combiner"):
        ds.dnc.combine(draws, "nope", num_samples=10, seed=0)
    with pytest.raises(ValueError, match="at least 2"):
        ds.dnc.combine(draws[:1], "gaussian", num_samples=10, seed=0)
    with pytest.raises(ValueError, match="dimension"):
        ds.dnc.combine([draws[0], draws[1][:, :1]], "gaussian", num_samples=10, seed=0)
    with pytest.raises(ValueError, match="scores of shard 1"):
        ds.dnc.combine(
            draws, "gaussian", scores=[scores[0], scores[1][:5]] + scores[2:], num_samples=10, seed=0
        )
    with pytest.raises(ValueError, match="non-finite"):
        bad = draws[0].clone()
        bad[0, 0] = float("nan")
        ds.dnc.combine([bad] + draws[1:], "gaussian", num_samples=10, seed=0)
    with pytest.raises(ValueError, match="num_samples"):
        ds.dnc.combine(draws, "gaussian", num_samples=0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        ds.dnc.combine(draws, "gaussian", num_samples=10, seed=-1)


@pytest.mark.parametrize("method", sorted(ds.dnc.COMBINERS))
def test_unknown_option_is_refused_with_the_valid_ones(generator, method):
    """Every combiner: a mistyped option is a ValueError naming it and every valid option."""
    from diffstat.dnc.combine import combiner_options

    draws, scores, _, _ = _gaussian_shards(generator, n=100)
    with pytest.raises(ValueError, match=f"unknown option.*'{method}': bogus_option; known: ") as info:
        ds.dnc.combine(draws, method, scores=scores, num_samples=10, seed=0, progress=False, bogus_option=1)
    assert all(name in str(info.value) for name in combiner_options(method))


@pytest.mark.parametrize(
    "nested, typo, valid",
    [("smc_options", "laplce", "laplace"), ("calibrate_options", "num_iter", "num_iters")],
)
def test_diffusion_refuses_unknown_nested_options(generator, nested, typo, valid):
    draws, scores, _, _ = _gaussian_shards(generator, n=100)
    with pytest.raises(ValueError, match=f"unknown option.*{typo};.*{valid}"):
        ds.dnc.combine(draws, "diffusion", num_samples=10, seed=0, progress=False, **{nested: {typo: 1}})


def test_inference_data_input_and_reproducibility(generator):
    draws, _, _, _ = _gaussian_shards(generator, n=300)
    import arviz as az

    idatas = [az.from_dict(posterior={"x": x.reshape(3, 100, DIM).numpy()}) for x in draws]
    a = ds.dnc.combine(idatas, "consensus", num_samples=200, seed=7, progress=False)
    b = ds.dnc.combine([d.numpy() for d in draws], "consensus", num_samples=200, seed=7, progress=False)
    np.testing.assert_array_equal(a.posterior["x"].values, b.posterior["x"].values)


# ----------------------------------------------------------------------------- shard energy model
def test_shard_energy_starts_as_the_noised_gaussian():
    """Identity: before training the energy is exactly the noised Gaussian's, whose score is
    -(alpha^2 S + sigma^2 I)^{-1} (z - alpha m)."""
    from diffstat.dnc.energy import ShardEnergy

    mean = torch.tensor([0.3, -0.2])
    cov = torch.tensor([[0.5, 0.1], [0.1, 0.3]])
    model = ShardEnergy(mean, cov, hidden=8, depth=2)
    z = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    for t in (1e-3, 0.3, 1.0):
        tt = torch.tensor(t)
        a, s = model.process.alpha(tt), model.process.sigma(tt)
        c = a**2 * cov + s**2 * torch.eye(2)
        expected = -torch.linalg.solve(c, (z - a * mean).T).T
        torch.testing.assert_close(model(z, tt), expected, rtol=1e-4, atol=1e-5)
        assert float(model.residual(z, tt).detach().abs().max()) < 1e-5


def test_fit_without_scores_uses_dsm_and_learns():
    """Without scores the fit falls back to denoising score matching; on fixed noise the trained
    model's DSM loss is below the untrained (Gaussian) model's."""
    from diffstat.diffusion.losses import dsm_loss
    from diffstat.dnc.energy import ShardEnergy, fit_shard_energy, load_shard_energy
    from diffstat.dnc.gaussian import sample_moments

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1000, 2, generator=gen) ** 3 / 3  # non-Gaussian
    fit = fit_shard_energy(z, None, num_steps=300, hidden=16, depth=2, batch_size=256, worker_threads=None)
    assert fit["fit_time"] > 0 and len(fit["loss"]) > 0
    trained = load_shard_energy(fit)
    untrained = ShardEnergy(*sample_moments(z), hidden=16, depth=2, process=trained.process)
    x = z.repeat(20, 1)

    def loss(model):
        return float(dsm_loss(model, trained.process, x, torch.Generator().manual_seed(1)).detach())

    assert loss(trained) < 0.98 * loss(untrained), (loss(trained), loss(untrained))
