"""SwiGLU gate: silu(gate) * up."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import LazyCompiled, resolve_elementwise, torch_npu


def swiglu_reference(gate, up):
    return F.silu(gate) * up


swiglu_fused = LazyCompiled(swiglu_reference)  # one pass over memory instead of three


def swiglu_npu(gate, up):
    # npu_swiglu splits its input's dim in halves: silu(first half) * second half.
    return torch_npu().npu_swiglu(torch.cat([gate, up], dim=-1), dim=-1)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """silu(gate) * up, elementwise, in the inputs' dtype."""
    impl = resolve_elementwise(impl, gate)
    if impl == "npu":
        return swiglu_npu(gate, up)
    if impl == "fused":
        return swiglu_fused(gate, up)
    return swiglu_reference(gate, up)


def swiglu_packed(gate_up: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """swiglu over a merged projection's output [..., 2F] = cat(gate, up): -> [..., F].

    On NPU this feeds npu_swiglu directly, saving the concatenation swiglu() needs.
    """
    impl = resolve_elementwise(impl, gate_up)
    if impl == "npu":
        return torch_npu().npu_swiglu(gate_up.contiguous(), dim=-1)
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu(gate, up, impl=impl)
