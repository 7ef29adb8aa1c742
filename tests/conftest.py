import os
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
