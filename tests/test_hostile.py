"""The front door under hostile but legitimate use: each test here is a bug found by trying
``ds.sample`` and ``ds.dnc.combine`` with unusual valid input, or invalid input that reached a
method and crashed mid-run inside torch, instead of a ``ValueError`` naming the problem before any
work (the contract of ``/work/shared/API.md``). Inputs the contract already covered are in
``tests/test_fuzz.py``."""

import pytest
import torch

import diffstat as ds
from diffstat.dnc.combine import COMBINERS

METHODS = ds.available_methods()
COMBINER_NAMES = sorted(COMBINERS)
F64 = torch.float64


class Counted:
    """A log-density that counts the points it is called at."""

    def __init__(self, fn):
        self.fn, self.points = fn, 0

    def __call__(self, x):
        self.points += x.shape[0]
        return self.fn(x)


def gaussian(x):
    return -0.5 * (x**2).sum(-1)


def _sample(target, method, **kwargs):
    kwargs = {"num_samples": 8, "seed": 0, "progress": False, **kwargs}
    return ds.sample(target, method, **kwargs)


# ---------------------------------------------------------------------- devices
def _unavailable_devices() -> list:
    """Device names no run can use here: a CUDA index past the last one, MPS where it is absent, a
    device type diffstat does not run on, and a name that is no device at all."""
    devices = [f"cuda:{torch.cuda.device_count()}", "meta", "gpu"]
    if not torch.cuda.is_available():
        devices.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        devices.append("mps")
    return devices


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("device", _unavailable_devices())
def test_unavailable_device_is_refused_before_any_work(method, device):
    """An unavailable device crashed in torch's generator constructor ("Cannot get CUDA generator
    without ATen_cuda library") and an unknown name in ``torch.device``: both are now a
    ValueError naming the argument, before the log-density is evaluated."""
    counted = Counted(gaussian)
    target = ds.Target(counted, 2, dtype=F64)
    before = counted.points
    with pytest.raises(ValueError, match="device"):
        _sample(target, method, device=device)
    assert counted.points == before


@pytest.mark.parametrize("method", COMBINER_NAMES)
@pytest.mark.parametrize("device", _unavailable_devices())
def test_combiner_unavailable_device_is_refused(method, device):
    g = torch.Generator().manual_seed(0)
    shards = [torch.randn(40, 2, generator=g, dtype=F64) for _ in range(3)]
    with pytest.raises(ValueError, match="device"):
        ds.dnc.combine(shards, method, num_samples=8, seed=0, progress=False, device=device)
