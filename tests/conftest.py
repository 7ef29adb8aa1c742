import os
import tempfile
from pathlib import Path

import pytest
import torch

# Decoders default to --compile auto: keep its packages out of the user's cache, and start no
# background builds from tests (a test that wants either sets it up itself).
os.environ["AQUILA_FN_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="aquila_fn_compiled_")
os.environ["AQUILA_FN_COMPILE_BACKGROUND"] = "0"

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
