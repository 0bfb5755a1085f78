"""The learned score's tail (diffstat/smoothing/learned.py, "Tail"): the network's denoiser y + sigma^2 s is
held to the kept particles' outer bounds. A network that extrapolates outward (here one that returns +u
everywhere, as the many_well(32) fit did far out, docs/sms.md) then points inward beyond the particles,
with a pull that grows with the distance; rows whose denoiser lies within the bounds are the network's
output bit for bit, and below the modes' local scale the network is left alone."""

import torch

from diffstat.diffusion.processes import VE
from diffstat.smoothing import LearnedSmoothedScore

DIM = 6
PROCESS = VE(sigma_min=0.01, sigma_max=10.0)


class Outward(torch.nn.Module):
    """A stand-in network whose score points away from the centre: s(u, t) = u."""

    dim = DIM

    def forward(self, u, t):
        return u.clone()


class Shrink(torch.nn.Module):
    """A stand-in network with the score of N(0, I) smoothed, s(u, t) = -u / (1 + sigma_t^2): with scale 1,
    nearly the exact smoothed score of the particles (N(m, I) draws)."""

    dim = DIM

    def forward(self, u, t):
        return -u / (1 + PROCESS.sigma(t)[:, None] ** 2)


def particles(grad: bool = False) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, DIM, generator=gen, dtype=torch.float64) + torch.tensor([1.0] + [0.0] * (DIM - 1))
    return {"x": x, "grad": -10.0 * (x - x.mean(0))} if grad else {"x": x}


def make(model, parts: dict | None, scale: float = 1.5) -> LearnedSmoothedScore:
    center = particles()["x"].mean(0)
    return LearnedSmoothedScore(
        model, PROCESS, center=center, scale=scale, variance=scale**2, particles=parts
    )


def test_far_from_the_particles_the_score_points_inward():
    """At 2 to 50 times the bounds' radius, for noises 0.05 to 2: the radial component is at most
    -(|y - m| - radius)/sigma^2 (the held denoiser lies within the ball). The network alone gives
    +|y - m|/scale^2 there: the test fails without the tail."""
    score = make(Outward(), particles())
    m, _, _, _, radius, tau = score._support_frame()
    assert tau == 0.0  # no kept scores: no local scale, the bounds hold at every noise
    gen = torch.Generator().manual_seed(1)
    direction = torch.randn(200, DIM, generator=gen, dtype=torch.float64)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    dist = radius * torch.logspace(0.3, 1.7, 200, dtype=torch.float64)
    y = m + dist[:, None] * direction
    for sigma in (0.05, 0.3, 1.0, 2.0):
        radial = (score(y, sigma) * direction).sum(-1)
        assert bool((radial <= -(dist - radius) / sigma**2 * (1 - 1e-9)).all()), sigma


def test_within_the_bounds_the_network_is_returned_unchanged():
    """Noisy particles (the network's training inputs): where the network's denoiser lies within the bounds
    (nearly every row), and at every row below the local scale tau = 0.1, exactly the output of the same
    network without particles (no tail)."""
    score, bare = make(Shrink(), particles(grad=True), 1.0), make(Shrink(), None, 1.0)
    m, axes, (lo, hi), (clo, chi), radius, tau = score._support_frame()
    x = score.particles["x"]
    gen = torch.Generator().manual_seed(2)
    for sigma in (0.05, 0.5, 2.0):
        y = x + sigma * torch.randn(x.shape, generator=gen, dtype=torch.float64)
        s0 = bare(y, sigma)
        d = y + sigma**2 * s0 - m
        inside = ((d @ axes >= lo) & (d @ axes <= hi) & (d >= clo) & (d <= chi)).all(-1)
        inside &= d.norm(dim=-1) <= radius
        if sigma < tau:
            inside[:] = True
        assert float(inside.double().mean()) > 0.99, sigma
        assert torch.equal(score(y, sigma)[inside], s0[inside])


def test_below_the_local_scale_and_without_particles_no_tail():
    """With kept scores (local scale tau = 0.1 here) the bounds hold only from sigma = tau on; with no kept
    particles there is no support to measure: the network's output as before."""
    y = torch.full((3, DIM), 100.0, dtype=torch.float64)
    score = make(Outward(), particles(grad=True))
    tau = score._support_frame()[-1]
    assert abs(tau - 0.1) < 0.01
    bare = make(Outward(), None)
    assert torch.equal(score(y, 0.5 * tau), bare(y, 0.5 * tau))
    assert not torch.equal(score(y, 2 * tau), bare(y, 2 * tau))
    assert torch.allclose(bare(y, 1.0), (y - bare.center) / 2.25)  # the network's s(u) = u, in y units
