from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).resolve().parents[1] / "aquila_fn" / "assets"


@pytest.fixture(scope="session")
def assets() -> Path:
    return ASSETS


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core machine: OpenMP threads only add barrier waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
