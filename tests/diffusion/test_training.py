"""Training: DSM, TSM and mixed minimisers equal the exact noised score of a Gaussian mixture (and
not that of a different mixture), the energy model learns log-density differences, EMA, early
stopping, reproducibility, and save / load."""

import math

import pytest
import torch

from diffstat.diffusion import (
    VP,
    EnergyMLP,
    ScoreMLP,
    TrainConfig,
    load_model,
    noised_mixture_score,
    save_model,
    train_score_model,
)
from diffstat.targets.mixture import GaussianMixture

MIX = GaussianMixture([[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]], [0.5, 0.3, 0.2], scales=[0.4, 0.6, 0.5])
# same component shapes, moved means and swapped weights: a wrong target
OTHER = GaussianMixture([[-1.5, 0.5], [1.5, 0.0], [0.0, -1.0]], [0.3, 0.5, 0.2], scales=[0.4, 0.6, 0.5])
PROCESS = VP()
EARLY = [0.001, 0.01, 0.03, 0.1, 0.2]  # where TSM is accurate
LATE = [0.1, 0.2, 0.4, 0.6, 0.8]  # where DSM is accurate (its target's variance ~ 1/sigma_t^2)


def _data(n=4000, seed=0):
    x0 = MIX.sample(n, torch.Generator().manual_seed(seed), dtype=torch.float32)
    return x0, MIX.score(x0.double()).float()


def relative_score_error(model, mixture, times, n=2000, seed=5):
    r"""sum_t E||s_theta(X_t, t) - s_mixture(X_t, t)||^2 / sum_t E||s_MIX(X_t, t)||^2, X_t ~ MIX noised."""
    gen = torch.Generator().manual_seed(seed)
    exact, truth = noised_mixture_score(mixture, PROCESS), noised_mixture_score(MIX, PROCESS)
    num = den = 0.0
    for tv in times:
        t = torch.full((n,), tv, dtype=torch.float64)
        xt, _ = PROCESS.marginal_sample(MIX.sample(n, gen), t, gen)
        with torch.no_grad():
            s = model(xt.float(), t.float()).double()
        num += float(((s - exact(xt, t)) ** 2).sum(-1).mean())
        den += float((truth(xt, t) ** 2).sum(-1).mean())
    return num / den


def _train(loss, model=None, steps=1500, seed=2, **kw):
    x0, grad0 = _data()
    model = model or ScoreMLP(2, 128, 3, process=PROCESS, seed=1)
    settings = dict(num_steps=steps, batch_size=256, lr=3e-3, ema_decay=0.99, loss=loss, lr_schedule="cosine")
    cfg = TrainConfig(**{**settings, **kw})
    return train_score_model(
        model,
        PROCESS,
        x0,
        grad0 if loss != "dsm" else None,
        config=cfg,
        generator=torch.Generator().manual_seed(seed),
    )


@pytest.mark.parametrize(
    "loss,times,tol", [("dsm", LATE, 0.03), ("tsm", EARLY, 0.03), ("mixed", EARLY + LATE[1:], 0.03)]
)
def test_minimiser_is_the_exact_noised_score(loss, times, tol):
    result = _train(loss)
    err = relative_score_error(result.model, MIX, times)
    err_other = relative_score_error(result.model, OTHER, times)
    assert err < tol, (loss, err)
    assert err_other > 5 * tol, (loss, err_other)  # the check rejects a wrong target
    assert result.num_steps == 1500 and len(result.history["val_loss"]) == 15
    assert not result.model.training


def test_energy_model_learns_the_noised_log_density():
    result = _train("mixed", model=EnergyMLP(2, 64, 3, process=PROCESS, seed=1))
    err = relative_score_error(result.model, MIX, EARLY + LATE[1:])
    assert err < 0.03, err
    # exp(-E) is the noised density up to a constant: compare centred log-densities on draws of p_t.
    gen = torch.Generator().manual_seed(9)
    for tv in (0.01, 0.3):
        t = torch.full((1000,), tv, dtype=torch.float64)
        xt, _ = PROCESS.marginal_sample(MIX.sample(1000, gen), t, gen)
        with torch.no_grad():
            lq = -result.model.energy(xt.float(), t.float()).double()
        for mixture, expect_close in ((MIX, True), (OTHER, False)):
            lp = mixture.noised(float(PROCESS.alpha(t[0])), float(PROCESS.sigma(t[0]))).log_prob(xt)
            gap = (lq - lq.mean()) - (lp - lp.mean())
            rms = float(gap.pow(2).mean().sqrt())
            assert (rms < 0.15) if expect_close else (rms > 0.3), (tv, rms)


def test_training_is_reproducible_and_ema_is_applied():
    a = _train("mixed", steps=60, eval_every=20)
    b = _train("mixed", steps=60, eval_every=20)
    c = _train("mixed", steps=60, eval_every=20, seed=3)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    assert a.history == b.history
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.model.parameters(), c.model.parameters()))
    # ema_decay = 0: the result holds the raw final weights; otherwise an average that differs
    raw = ScoreMLP(2, 64, 2, process=PROCESS, seed=1)
    r0 = _train("dsm", model=raw, steps=30, ema_decay=0.0)
    for pr, p0 in zip(raw.parameters(), r0.model.parameters()):
        assert torch.equal(pr, p0)
    raw = ScoreMLP(2, 64, 2, process=PROCESS, seed=1)
    r1 = _train("dsm", model=raw, steps=30)
    assert not all(torch.equal(pr, p1) for pr, p1 in zip(raw.parameters(), r1.model.parameters()))


def test_early_stopping_returns_the_best_ema_weights():
    # A learning rate far too large makes the held-out loss stop improving quickly.
    x0, grad0 = _data(1000)
    cfg = TrainConfig(
        num_steps=3000,
        batch_size=64,
        lr=0.05,
        ema_decay=0.0,
        loss="mixed",
        eval_every=10,
        patience=3,
        val_fraction=0.2,
    )
    result = train_score_model(
        ScoreMLP(2, 32, 2, process=PROCESS),
        PROCESS,
        x0,
        grad0,
        config=cfg,
        generator=torch.Generator().manual_seed(0),
    )
    vals = result.history["val_loss"]
    assert result.num_steps < 3000 and result.num_steps == result.history["step"][-1]
    best = min(vals)
    assert result.best_val_loss == best and vals.index(best) == len(vals) - 4  # 3 evaluations without gain
    # the returned weights are the best ones: recompute their held-out loss from scratch
    cfg_eval = TrainConfig(
        num_steps=1, batch_size=64, lr=1e-12, ema_decay=0.0, loss="mixed", eval_every=1, val_fraction=0.2
    )
    again = train_score_model(
        result.model, PROCESS, x0, grad0, config=cfg_eval, generator=torch.Generator().manual_seed(0)
    )
    assert again.history["val_loss"][0] == pytest.approx(best, rel=1e-3)


def test_bad_input():
    x0, grad0 = _data(100)
    gen = torch.Generator().manual_seed(0)
    model = ScoreMLP(2, 8, 1, process=PROCESS)
    with pytest.raises(ValueError, match="grad0"):
        train_score_model(model, PROCESS, x0, config=TrainConfig(loss="tsm"), generator=gen)
    with pytest.raises(ValueError, match="dimension"):
        train_score_model(ScoreMLP(3, 8, 1), PROCESS, x0, grad0, generator=gen)
    with pytest.raises(ValueError, match="NaN"):
        train_score_model(model, PROCESS, x0.clone().fill_(math.nan), grad0, generator=gen)
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="kl")
    with pytest.raises(ValueError, match="patience"):
        TrainConfig(patience=0)
    with pytest.raises(ValueError, match="held-out"):
        TrainConfig(patience=2, val_fraction=0.0)


def test_progress_bar_runs(capsys):
    x0, grad0 = _data(200)
    cfg = TrainConfig(num_steps=5, batch_size=32, eval_every=2, loss="ssm")
    result = train_score_model(
        ScoreMLP(2, 8, 1, process=PROCESS),
        PROCESS,
        x0,
        config=cfg,
        generator=torch.Generator().manual_seed(0),
        progress=True,
    )
    assert result.history["step"] == [2, 4, 5] and all(math.isfinite(v) for v in result.history["val_loss"])


@pytest.mark.parametrize("cls,dtype", [(ScoreMLP, torch.float32), (EnergyMLP, torch.float64)])
def test_save_load_round_trip(tmp_path, cls, dtype):
    process = VP(schedule="cosine", t_min=2e-3)
    model = cls(2, 16, 2, process=process, sigma_data=1.7, seed=4).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    config = TrainConfig(num_steps=10, loss="dsm", patience=4)
    path = tmp_path / "model.pt"
    save_model(path, model, process, config)
    loaded, proc, cfg = load_model(path)
    assert type(loaded) is cls and cfg == config and proc.to_dict() == process.to_dict()
    x = torch.randn(5, 2, dtype=dtype, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded(x, 0.3), model(x, 0.3), rtol=0, atol=0)
    # a model without a process and without a config
    plain = ScoreMLP(3, 8, 1)
    save_model(tmp_path / "plain.pt", plain, None)
    loaded, proc, cfg = load_model(tmp_path / "plain.pt")
    assert proc is None and cfg is None and loaded.process is None


def test_load_rejects_corrupt_and_mismatched_files(tmp_path):
    model = ScoreMLP(2, 16, 2, process=PROCESS)
    good = tmp_path / "good.pt"
    save_model(good, model, PROCESS, TrainConfig())
    raw = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"not a model at all" * 10)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    payload = torch.load(good, weights_only=True)
    payload["model_kwargs"]["hidden"] = 32  # the weights no longer fit the architecture
    torch.save(payload, tmp_path / "mismatch.pt")
    payload = torch.load(good, weights_only=True)
    payload["config"]["not_an_option"] = 1
    torch.save(payload, tmp_path / "badconfig.pt")
    for name, match in (
        ("truncated", "corrupt"),
        ("garbage", "corrupt"),
        ("foreign", "not a diffstat model"),
        ("mismatch", "consistent"),
        ("badconfig", "consistent"),
    ):
        with pytest.raises(ValueError, match=match):
            load_model(tmp_path / f"{name}.pt")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="built with"):
        save_model(tmp_path / "x.pt", model, VP(beta_max=10.0))


def test_init_step_loop_is_the_training_driver():
    """The driver adds only bookkeeping: stepping ``init``/``step`` by hand with the same generator
    gives the same EMA weights, step by step (the held-out loss uses a generator of its own)."""
    from diffstat.diffusion.training import init, step

    x, g = _data(n=200)
    config = TrainConfig(num_steps=25, batch_size=32, eval_every=10, lr_schedule="cosine")
    model = ScoreMLP(2, 16, 1, process=PROCESS, seed=0).to(x.dtype)
    twin = ScoreMLP(2, 16, 1, process=PROCESS, seed=0).to(x.dtype)
    result = train_score_model(
        model, PROCESS, x, g, config=config, generator=torch.Generator().manual_seed(3)
    )
    generator = torch.Generator().manual_seed(3)
    state = init(generator, twin, PROCESS, x, g, config)
    for _ in range(config.num_steps):
        state, info = step(generator, state, PROCESS, config)
        assert info.loss.dim() == 0 and not info.loss.requires_grad
    assert state.step == result.num_steps == config.num_steps
    for a, b in zip(result.model.parameters(), state.ema.parameters()):
        assert torch.equal(a, b)
    # and a different generator gives different weights (the comparison can fail)
    generator = torch.Generator().manual_seed(4)
    other = init(generator, ScoreMLP(2, 16, 1, process=PROCESS, seed=0).to(x.dtype), PROCESS, x, g, config)
    for _ in range(config.num_steps):
        other, _ = step(generator, other, PROCESS, config)
    assert not all(torch.equal(a, b) for a, b in zip(result.model.parameters(), other.ema.parameters()))
