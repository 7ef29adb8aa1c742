"""SwiGLU gate: silu(gate) * up."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import LazyCompiled, is_dtensor, on_local_blocks, resolve_elementwise, torch_npu


def swiglu_reference(gate, up):
    return F.silu(gate) * up


def _swiglu_backward(grad, gate, up):
    acc = torch.promote_types(gate.dtype, torch.float32)
    g, u, d = gate.to(acc), up.to(acc), grad.to(acc)
    sig = torch.sigmoid(g)
    return (d * u * sig * (1 + g * (1 - sig))).to(gate.dtype), (d * g * sig).to(up.dtype)


_forward_kernel = LazyCompiled(swiglu_reference)  # one pass over memory instead of three
_backward_kernel = LazyCompiled(_swiglu_backward)


class _FusedSwiGLU(torch.autograd.Function):
    """A compiled kernel each way, keeping gate and up for backward (see ops.norm's
    _FusedRMSNorm for why the saved tensors are declared here)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _forward_kernel(gate, up)

    @staticmethod
    def backward(ctx, grad):
        return _backward_kernel(grad, *ctx.saved_tensors)


def swiglu_fused(gate, up):
    return _FusedSwiGLU.apply(gate, up)


def swiglu_npu(gate, up):
    # npu_swiglu splits its input's dim in halves: silu(first half) * second half.
    return torch_npu().npu_swiglu(torch.cat([gate, up], dim=-1), dim=-1)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """silu(gate) * up, elementwise, in the inputs' dtype (DTensors placed alike: per rank)."""
    if is_dtensor(gate) and impl != "reference":
        out = on_local_blocks(lambda g, u: swiglu(g, u, impl=impl), gate, up, free_dims=tuple(range(gate.dim())))
        if out is not None:
            return out
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
