"""Choosing an implementation per call, and the lazy torch_npu import."""
from __future__ import annotations

import importlib

import torch

IMPLS = ("auto", "reference", "fused", "npu")

NPU_INSTALL_HINT = "pip install 'aquila-fn[npu]'"


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def is_npu(t: torch.Tensor) -> bool:
    return t.device.type == "npu"


def torch_npu():
    """Import torch_npu on demand; the NPU paths are the only users."""
    try:
        return importlib.import_module("torch_npu")
    except ImportError as e:  # give the user the one line that fixes it
        raise ImportError(
            f"an NPU implementation was requested but torch_npu is not installed: "
            f"{NPU_INSTALL_HINT}") from e
