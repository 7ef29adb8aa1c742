"""SwiGLU gate: silu(gate) * up."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import check_impl, is_npu, torch_npu


def swiglu_reference(gate, up):
    return F.silu(gate) * up


def swiglu_npu(gate, up):
    # npu_swiglu splits its input's last dim in halves: silu(first) * second.
    return torch_npu().npu_swiglu(torch.cat([gate, up], dim=-1), dim=-1)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    check_impl(impl)
    if impl == "npu" or (impl == "auto" and is_npu(gate)):
        return swiglu_npu(gate, up)
    return swiglu_reference(gate, up)
