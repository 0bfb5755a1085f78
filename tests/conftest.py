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
