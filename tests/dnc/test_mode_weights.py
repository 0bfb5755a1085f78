"""Pieces the diffusion combiner adds on top of the toolkit: the stable-target-field loss
(``diffstat.diffusion.losses.stf_target``, ``TrainConfig(loss="stf")``) and the grouping of
gradient-ascent end points by mode (``diffstat.dnc.mode_weights``)."""

import math

import pytest
import torch

from diffstat.diffusion.losses import stf_target
from diffstat.diffusion.networks import EnergyMLP
from diffstat.diffusion.processes import VP
from diffstat.diffusion.training import TrainConfig, train_score_model
from diffstat.dnc.mode_weights import assign_to_centres, group_end_points


def _noised_empirical_score(y, t, points, process):
    """Exact score of the law of alpha_t X + sigma_t N(0, I), X uniform on ``points`` (float64)."""
    a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
    diff = a[:, None] * points[None] - y[:, None]  # (n, M, d)
    logw = -0.5 * (diff**2).sum(-1) / s**2
    w = torch.softmax(logw, 1)
    return (w[..., None] * diff).sum(1) / s**2


def test_stf_target_is_the_noised_empirical_score(generator):
    """Identity (float64): without gradients the target is the exact score of the noised law of
    the reference points together with the row's own point; the single-sample DSM target -z/sigma
    is far from it (the variance the averaging removes)."""
    process = VP()
    pts = torch.randn(50, 2, generator=generator, dtype=torch.float64)
    n = 400
    idx = torch.randint(0, 50, (n,), generator=generator)
    x0 = pts[idx]
    t = 0.05 + 0.9 * torch.rand(n, generator=generator, dtype=torch.float64)
    z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
    y = a * x0 + s * z
    target = stf_target(process, y, t, x0, pts)
    # the empirical law on {own x0} U pts (the own point is counted twice)
    exact = torch.stack(
        [
            _noised_empirical_score(y[i : i + 1], t[i : i + 1], torch.cat([x0[i : i + 1], pts]), process)[0]
            for i in range(n)
        ]
    )
    torch.testing.assert_close(target, exact, rtol=1e-9, atol=1e-9)
    plain = -z / s
    assert float((plain - exact).norm(dim=-1).mean()) > 0.5


def test_stf_training_runs_and_checks_input(generator):
    """The toolkit trains with loss="stf" (with and without gradients) and refuses bad settings."""
    process = VP()
    x0 = torch.randn(500, 2, generator=generator)
    model = EnergyMLP(2, hidden=16, depth=2, process=process, seed=0)
    cfg = TrainConfig(
        num_steps=60, batch_size=64, loss="stf", num_reference=128, small_t_fraction=0.5, eval_every=20
    )
    res = train_score_model(model, process, x0, -x0, config=cfg, generator=generator)
    assert res.num_steps == 60 and all(math.isfinite(v) for v in res.history["train_loss"])
    res = train_score_model(model, process, x0, None, config=cfg, generator=generator)
    assert math.isfinite(res.best_val_loss)
    with pytest.raises(ValueError, match="small_t_fraction"):
        TrainConfig(small_t_fraction=1.5)
    with pytest.raises(ValueError, match="num_reference"):
        TrainConfig(num_reference=0)


def test_group_end_points_by_barrier():
    """Two wells of a 2-d double-well density: end points spread along the flat direction of one
    well join one group (no barrier), the two wells stay apart (a barrier of about 8 nats)."""

    def log_prob(x):
        return -2.0 * (x[:, 0] ** 2 - 1.0) ** 2 * 4 - 0.001 * x[:, 1] ** 2

    gen = torch.Generator().manual_seed(0)
    left = torch.stack([-torch.ones(40), 3 * torch.randn(40, generator=gen)], 1)
    right = torch.stack([torch.ones(40), 3 * torch.randn(40, generator=gen)], 1)
    ends = torch.cat([left, right])
    labels, centres = group_end_points(ends, log_prob, tol=0.1)
    assert centres.shape[0] == 2
    assert (labels[:40] == labels[0]).all() and (labels[40:] == labels[40]).all() and labels[0] != labels[40]
    # negative check: without the barrier test (margin huge) everything is one group
    labels1, centres1 = group_end_points(ends, log_prob, tol=0.1, margin=1e6)
    assert centres1.shape[0] == 1
    near = centres.repeat(5, 1) + 0.1 * torch.randn(10, 2, generator=gen)
    assert (assign_to_centres(near, centres) == torch.arange(2).repeat(5)).all()
