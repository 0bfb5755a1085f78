"""Shared test configuration: one torch thread (CI has 2 cores) and float64 helpers."""

import warnings

import pytest
import torch

torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=FutureWarning, module="arviz")


@pytest.fixture
def generator():
    """A fixed-seed CPU generator."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def shown_bars(monkeypatch):
    """The descriptions of the progress bars ``diffstat._util.progress_bar`` opened and did not disable."""
    import diffstat._util as util

    shown = []
    real = util.tqdm

    def counting(*args, **kwargs):
        if not kwargs.get("disable", False):
            shown.append(kwargs.get("desc"))
        return real(*args, **kwargs)

    monkeypatch.setattr(util, "tqdm", counting)
    return shown
