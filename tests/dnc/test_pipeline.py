"""Sharding, sub-posteriors and the pipeline: a local process pool and a real Dask cluster, with
shards that fail and are retried, and a conjugate Gaussian model whose posterior is exact."""

import concurrent.futures as cf
import os
import sys
import warnings

import numpy as np
import pytest
import torch

import diffstat as ds
from diffstat.dnc.models import GaussianPrior, logistic_log_likelihood
from diffstat.dnc.pipeline import ShardFailure, sample_one_shard, shard_seeds
from diffstat.dnc.shards import SubPosterior, split_indices, subposteriors
from diffstat.target import Target

DIM = 2
PRIOR_VAR = 0.01  # strong prior: a wrong prior power is visible in the product


def normal_log_likelihood(theta, data):
    """y_i ~ N(theta, I) in 2-d; ``data = (y (m, 2),)``."""
    (y,) = data
    return -0.5 * ((y.to(theta)[None] - theta[:, None]) ** 2).sum((1, 2))


class FailOnce:
    """A log-likelihood that raises the first time it runs in any process (marker file), then
    behaves: a transient worker failure."""

    def __init__(self, marker: str):
        self.marker = marker

    def __call__(self, theta, data):
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            raise RuntimeError("injected transient failure")
        return normal_log_likelihood(theta, data)


def always_fail(theta, data):
    raise RuntimeError("injected permanent failure")


def users_own_failure(theta, data):
    raise RuntimeError("the user's own message")


class _NoSubmit(cf.Executor):
    """An executor that fails the test if anything is submitted to it."""

    def submit(self, *args, **kwargs):
        raise AssertionError("a task was submitted")


def _data(n=200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.tensor([1.0, -0.5], dtype=torch.float64)
        + torch.randn(n, DIM, generator=gen, dtype=torch.float64),
    )


def _exact_posterior(y):
    prec = 1.0 / PRIOR_VAR + y.shape[0]
    return y.sum(0) / prec, torch.eye(DIM, dtype=torch.float64) / prec


def _targets(num_shards=4, likelihoods=None, seed=0):
    data = _data()
    targets = subposteriors(
        GaussianPrior(PRIOR_VAR), normal_log_likelihood, data, DIM, num_shards, seed=seed, method="random"
    )
    if likelihoods:
        for k, lik in likelihoods.items():
            targets[k] = Target(
                SubPosterior(GaussianPrior(PRIOR_VAR), lik, targets[k]._log_prob.data, num_shards),
                DIM,
                dtype=torch.float64,
                validate=False,
            )
    return targets, data[0]


SAMPLER = dict(num_samples=300, num_chains=4, num_warmup=200)


# ----------------------------------------------------------------------------- sharding
def test_split_indices_partition_and_seed():
    parts = split_indices(103, 5, seed=3)
    allrows = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(allrows, np.arange(103))
    assert sorted(len(p) for p in parts) == [20, 20, 21, 21, 21]
    again = split_indices(103, 5, seed=3)
    assert all((a == b).all() for a, b in zip(parts, again))
    other = split_indices(103, 5, seed=4)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other))


def test_stratified_split_spreads_rare_labels():
    labels = np.zeros(1000, dtype=int)
    labels[::10] = 1  # 100 positives
    parts = split_indices(1000, 10, seed=0, method="stratified", strata=labels)
    assert [int(labels[p].sum()) for p in parts] == [10] * 10
    random_parts = split_indices(1000, 10, seed=0, method="random")
    assert len({int(labels[p].sum()) for p in random_parts}) > 1  # random sharding does not balance
    with pytest.raises(ValueError, match="strata"):
        split_indices(1000, 10, seed=0, method="stratified")
    with pytest.raises(ValueError, match="method"):
        split_indices(10, 2, seed=0, method="bogus")
    with pytest.raises(ValueError, match="non-empty"):
        split_indices(3, 5, seed=0)


def test_subposteriors_multiply_to_the_full_posterior():
    """Identity (float64): sum_k log p_k = log prior + log likelihood of all the data."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 2, generator=gen, dtype=torch.float64)
    y = torch.bernoulli(torch.full((300,), 0.3, dtype=torch.float64), generator=gen)
    design = torch.stack([torch.ones(300, dtype=torch.float64), x[:, 0]], 1)
    prior = GaussianPrior(5.0)
    targets = subposteriors(prior, logistic_log_likelihood, (design, y), 2, 7, seed=1)
    theta = torch.randn(11, 2, generator=gen, dtype=torch.float64)
    full = prior(theta) + logistic_log_likelihood(theta, (design, y))
    total = sum(t.log_prob(theta) for t in targets)
    torch.testing.assert_close(total, full, rtol=0, atol=1e-9)
    # negative: without the 1/K power on the prior the identity fails
    wrong = sum(prior(theta) + logistic_log_likelihood(theta, t._log_prob.data) for t in targets)
    assert (wrong - full).abs().min() > 1.0


def test_pyro_subposteriors_multiply_to_the_full_posterior():
    import pyro
    import pyro.distributions as dist

    def model(y):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(2, dtype=y.dtype), 3.0).to_event(1))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(mu, 1.0).to_event(1), obs=y)

    y = _data(40)[0]
    full = ds.Target.from_pyro(model, y=y)
    shards = ds.dnc.pyro_subposteriors(model, 4, data={"y": y}, seed=0)
    assert sorted(np.concatenate([s.rows for s in shards]).tolist()) == list(range(40))
    u = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(sum(s.log_prob(u) for s in shards), full.log_prob(u), rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------- local pool
def test_local_pool_retries_a_failing_shard(tmp_path):
    targets, _ = _targets(likelihoods={1: FailOnce(str(tmp_path / "marker"))})
    with cf.ProcessPoolExecutor(max_workers=2) as ex, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = ds.dnc.sample_shards(
            targets, "mala", seed=5, executor=ex, max_retries=1, progress=False, **SAMPLER
        )
    assert [r.attempts for r in results] == [1, 2, 1, 1]
    assert "injected transient failure" in results[1].errors[0]
    assert any("shard 1 failed (attempt 1)" in str(w.message) for w in caught)
    # the retried shard ran with its own seed: the same draws as a clean run in this process
    clean, _ = _targets()
    opts = {k: v for k, v in SAMPLER.items() if k not in ("num_samples", "num_chains")}
    ref = sample_one_shard(clean[1], "mala", 1, 300, 4, shard_seeds(5, 4)[1], opts, None)
    torch.testing.assert_close(results[1].draws, ref.draws)
    # the stored scores are the gradients at the draws
    torch.testing.assert_close(results[2].scores, clean[2].log_prob_and_grad(results[2].draws)[1])


def test_permanent_failure_keeps_finished_shards(tmp_path):
    targets, _ = _targets(likelihoods={2: always_fail})
    with cf.ProcessPoolExecutor(max_workers=2) as ex, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ShardFailure, match="shard 2") as info:
            ds.dnc.sample_shards(
                targets, "mala", seed=5, executor=ex, max_retries=1, progress=False, **SAMPLER
            )
        err = info.value
        assert sorted(err.completed) == [0, 1, 3]
        assert len(err.failures[2]) == 2
        # resume: only shard 2 runs (the others would fail if they were run again)
        clean, _ = _targets()
        resumed_targets = [
            Target(always_fail_density, DIM, validate=False) if k != 2 else clean[2] for k in range(4)
        ]
        results = ds.dnc.sample_shards(
            resumed_targets, "mala", seed=5, executor=ex, completed=err.completed, progress=False, **SAMPLER
        )
    assert [r.shard for r in results] == [0, 1, 2, 3]
    assert results[0] is err.completed[0]


def always_fail_density(theta):
    raise RuntimeError("must not run")


def test_checkpoints_are_written_and_never_recomputed(tmp_path):
    """A second call with the same checkpoint directory and seed runs no shard (its targets would
    raise), and returns the same draws; a different seed is not mistaken for them."""
    targets, _ = _targets()
    first = ds.dnc.sample_shards(
        targets, "mala", seed=5, executor=None, progress=False, checkpoint_dir=tmp_path, **SAMPLER
    )
    assert len(list(tmp_path.glob("shard_*_seed_*.pt"))) == 4 and not list(tmp_path.glob("*.tmp"))
    failing = [Target(always_fail_density, DIM, validate=False) for _ in range(4)]
    again = ds.dnc.sample_shards(
        failing, "mala", seed=5, progress=False, checkpoint_dir=tmp_path, max_retries=0, **SAMPLER
    )
    assert all(torch.equal(a.draws, b.draws) for a, b in zip(first, again))
    with pytest.raises(ShardFailure), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.dnc.sample_shards(
            failing, "mala", seed=6, progress=False, checkpoint_dir=tmp_path, max_retries=0, **SAMPLER
        )


def test_user_exception_reaches_the_user_unchanged():
    """A shard log-density's own exception is not re-worded as a dimension mismatch: in the worker
    it propagates as raised, and the ShardFailure names its type and message and is chained to it."""
    targets, _ = _targets(likelihoods={1: users_own_failure})
    with pytest.raises(RuntimeError, match="the user's own message") as info:
        sample_one_shard(targets[1], "mala", 1, 10, 4, 0, {"num_warmup": 10}, None)
    assert type(info.value) is RuntimeError
    with cf.ThreadPoolExecutor(max_workers=2) as ex, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ShardFailure) as info:
            ds.dnc.sample_shards(
                targets, "mala", num_samples=20, num_warmup=20, seed=0, executor=ex, max_retries=0,
                progress=False, worker_threads=None,
            )  # fmt: skip
    message = str(info.value)
    assert "shard 1: RuntimeError: the user's own message" in message and "does dim" not in message
    assert type(info.value.__cause__) is RuntimeError
    assert str(info.value.__cause__) == "the user's own message"


def test_unknown_sampler_combiner_or_option_is_refused_before_submission():
    """Checked up front, each ``ValueError`` listing the valid names: nothing reaches the executor."""
    targets, _ = _targets()
    kwargs = dict(num_samples=10, seed=0, executor=_NoSubmit(), progress=False)
    with pytest.raises(ValueError, match="unknown shard sampler 'nope'; available: .*mala"):
        ds.dnc.sample_shards(targets, "nope", **kwargs)
    with pytest.raises(ValueError, match="unknown shard sampler 'nope'; available: .*mala"):
        ds.dnc.run_pipeline(targets, "gaussian", sampler="nope", **kwargs)
    with pytest.raises(ValueError, match="unknown combiner 'nope'; available: .*gaussian"):
        ds.dnc.run_pipeline(targets, "nope", **kwargs)
    with pytest.raises(ValueError, match="unknown option.*num_sweep;.*num_sweeps"):
        ds.dnc.run_pipeline(targets, "semiparametric", combine_options={"num_sweep": 3}, **kwargs)
    with pytest.raises(ValueError, match="unknown option.*num_level;.*num_levels"):
        ds.dnc.run_pipeline(targets, "diffusion", combine_options={"num_level": 3}, **kwargs)
    with pytest.raises(ValueError, match="log_probs must be one of"):
        ds.dnc.run_pipeline(targets, "diffusion", log_probs="exactly", **kwargs)


def test_pipeline_diffusion_routes():
    """At the defaults the pipeline hands ``"diffusion"`` the shards' log-densities (the SMC to
    their exact sum); ``log_probs="draws"`` gives it the values at the draws (cubic energies).
    Both recover the conjugate posterior; the route is recorded in ``posterior.attrs``."""
    targets, y = _targets()
    mean, cov = _exact_posterior(y)
    kwargs = dict(num_samples=1000, seed=2, shard_samples=250, num_chains=4, progress=False)
    kwargs.update(sampler_options=dict(num_warmup=200))
    with cf.ThreadPoolExecutor(2) as pool:
        for route, expected in (("exact", "exact"), ("draws", "cubic")):
            options = {} if route == "exact" else dict(log_probs=route)
            idata, _ = ds.dnc.run_pipeline(targets, "diffusion", executor=pool, **kwargs, **options)
            assert idata.posterior.attrs["route"] == expected
            x = torch.as_tensor(idata.posterior["x"].values).reshape(-1, DIM)
            assert (_z(x, mean, cov) < 0.35).all(), route


# ----------------------------------------------------------------------------- Dask cluster
@pytest.fixture(scope="module")
def dask_executor():
    distributed = pytest.importorskip("dask.distributed")
    import cloudpickle

    cloudpickle.register_pickle_by_value(
        sys.modules[__name__]
    )  # this test module is not importable on workers
    cluster = distributed.LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
    )
    client = distributed.Client(cluster)
    try:
        yield client.get_executor()
    finally:
        client.close()
        cluster.close()


def _z(x, mean, cov):
    return ((x.mean(0) - mean) / torch.sqrt(torch.diagonal(cov))).abs()


def test_dask_pipeline_exact_gaussian_posterior(dask_executor, tmp_path):
    """Shards on two Dask worker processes (one failing once and retried), combined by the
    Gaussian product: the conjugate posterior is exact, so mean and sd must match."""
    targets, y = _targets(likelihoods={3: FailOnce(str(tmp_path / "dask_marker"))})
    mean, cov = _exact_posterior(y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata, results = ds.dnc.run_pipeline(
            targets,
            "gaussian",
            num_samples=4000,
            seed=11,
            executor=dask_executor,
            shard_samples=300,
            num_chains=4,
            max_retries=2,
            progress=False,
            sampler_options=dict(num_warmup=200),
        )
    assert results[3].attempts == 2
    assert idata.posterior.attrs["max_shard_attempts"] == 2
    assert len({r.worker for r in results}) == 2  # both worker processes did work
    x = torch.as_tensor(idata.posterior["x"].values).reshape(-1, DIM)
    # each shard's mean from 1200 correlated MALA draws is off by about 0.05 shard sd = 0.1
    # posterior sd (shard sd = 2 posterior sd here), about 0.1 after combining 4: allow 0.35
    assert (_z(x, mean, cov) < 0.35).all()
    sd_ratio = torch.sqrt(torch.diagonal(torch.cov(x.T)) / torch.diagonal(cov))
    assert ((sd_ratio - 1).abs() < 0.15).all()

    # negative: a prior that is not raised to 1/K (K priors in the product) is rejected
    wrong = [
        Target(
            SubPosterior(GaussianPrior(PRIOR_VAR), normal_log_likelihood, t._log_prob.data, 1),
            DIM,
            dtype=torch.float64,
        )
        for t in _targets()[0]
    ]
    bad, _ = ds.dnc.run_pipeline(
        wrong,
        "gaussian",
        num_samples=4000,
        seed=11,
        executor=dask_executor,
        shard_samples=300,
        num_chains=4,
        progress=False,
        sampler_options=dict(num_warmup=200),
    )
    xb = torch.as_tensor(bad.posterior["x"].values).reshape(-1, DIM)
    sd_ratio_bad = torch.sqrt(torch.diagonal(torch.cov(xb.T)) / torch.diagonal(cov))
    assert ((sd_ratio_bad - 1).abs() > 0.15).any()  # the product's sd is 1/sqrt(2) of the truth


def test_dask_diffusion_fits_on_workers(dask_executor):
    """The diffusion combiner's per-shard fits run on the Dask workers; with the exact shard
    log-densities (the pipeline's default) and ``fit_energies=True`` the SMC to the exact
    posterior starts from the learned product."""
    targets, y = _targets()
    mean, cov = _exact_posterior(y)
    idata, _ = ds.dnc.run_pipeline(
        targets,
        "diffusion",
        num_samples=1000,
        seed=2,
        executor=dask_executor,
        shard_samples=250,
        num_chains=4,
        progress=False,
        sampler_options=dict(num_warmup=200),
        combine_options=dict(
            num_steps=30, hidden=16, depth=2, num_levels=5, num_final_steps=60, fit_energies=True
        ),
    )
    attrs = idata.posterior.attrs
    assert attrs["exact_final_target"] == 1 and attrs["max_fit_time"] > 0
    x = torch.as_tensor(idata.posterior["x"].values).reshape(-1, DIM)
    assert (_z(x, mean, cov) < 0.35).all()
    sd_ratio = torch.sqrt(torch.diagonal(torch.cov(x.T)) / torch.diagonal(cov))
    assert ((sd_ratio - 1).abs() < 0.2).all()
