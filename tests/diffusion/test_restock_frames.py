"""``restock.laplace_frames`` where a mode's Hessian is singular: a Laplace density (Hessian 0 off its
kinks) ended the diffusion sampler at defaults (``docs/audit.md``, "diffusion, ais, pt" at seed 3,
``laplace4``: ``cholesky_inverse`` raised on the failed factor's zero pivot)."""

import math

import torch

import diffstat as ds
from diffstat.diffusion.modes import ModeBank
from diffstat.diffusion.restock import laplace_frames

F64 = torch.float64


def _bank(target, centers):
    lp, g = target.log_prob_and_grad(centers)
    k = centers.shape[0]
    return ModeBank(centers.clone(), lp, g, torch.arange(k), centers.clone(), lp.clone())


def test_a_mode_with_a_singular_hessian_keeps_its_centre_and_the_identity():
    dim = 4
    laplace_and_gauss = ds.Target(
        lambda x: -x[..., :2].abs().sum(-1) - 0.5 * (x[..., 2:] ** 2).sum(-1) - math.log(8 * math.pi), dim
    )
    centers = torch.tensor([[1.3, -0.7, 0.2, 0.1], [-2.0, 0.5, -0.3, 0.4]], dtype=F64)
    centres, chols = laplace_frames(laplace_and_gauss, _bank(laplace_and_gauss, centers))
    # the Laplace coordinates have no curvature: no Laplace frame, the mode keeps its centre and the identity
    assert torch.equal(centres, centers)
    assert torch.equal(chols, torch.eye(dim, dtype=F64).expand(2, dim, dim))


def test_a_mode_with_a_curved_peak_still_gets_its_frame():
    dim = 3
    scales = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    gauss = ds.Target(lambda x: -0.5 * ((x / scales) ** 2).sum(-1), dim)
    centers = torch.tensor([[0.3, -0.2, 1.0]], dtype=F64)
    centres, chols = laplace_frames(gauss, _bank(gauss, centers))
    assert torch.allclose(centres, torch.zeros(1, dim, dtype=F64), atol=1e-10)
    assert torch.allclose(chols[0], torch.diag(scales), atol=1e-10)
