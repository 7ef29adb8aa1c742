"""RMSNorm, Aquila/LLaMA variant: normalise in fp32, multiply the weight in fp32, then cast.
(fp64 inputs stay fp64 throughout.)"""
from __future__ import annotations

import torch

from ._dispatch import LazyCompiled, resolve_elementwise, torch_npu


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(acc)).to(x.dtype)


# One inductor kernel per pass instead of five eager ones (~4x forward, ~4x backward on CPU).
rms_norm_fused = LazyCompiled(rms_norm_reference)


def rms_norm_npu(x, weight, eps):
    # npu_rms_norm wants gamma in x's dtype and returns (y, rstd). When the weight has
    # another dtype (fp32 weight, bf16 activations) run it in fp32 so the weight is
    # multiplied in fp32 exactly as in the reference.
    if weight.dtype == x.dtype:
        return torch_npu().npu_rms_norm(x, weight, epsilon=eps)[0]
    y, _ = torch_npu().npu_rms_norm(x.float(), weight.float(), epsilon=eps)
    return y.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
             impl: str = "auto") -> torch.Tensor:
    """y = x / sqrt(mean(x^2, -1) + eps) * weight; math in fp32, result in x.dtype.

    impl: "reference" (eager torch), "fused" (one compiled kernel), "npu"
    (torch_npu.npu_rms_norm), "auto" (npu on NPU, fused for large tensors, else reference).
    """
    impl = resolve_elementwise(impl, x)
    if impl == "npu":
        return rms_norm_npu(x, weight, eps)
    if impl == "fused":
        return rms_norm_fused(x, weight, eps)
    return rms_norm_reference(x, weight, eps)
