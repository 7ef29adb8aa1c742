"""RMSNorm, Aquila/LLaMA variant: normalise in fp32, multiply the weight in fp32, then cast."""
from __future__ import annotations

import torch

from ._dispatch import check_impl, is_npu, torch_npu


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def rms_norm_npu(x, weight, eps):
    # npu_rms_norm returns (y, rstd); it computes in fp32 internally for bf16/fp16 input.
    y, _ = torch_npu().npu_rms_norm(x, weight.to(x.dtype), epsilon=eps)
    return y.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
             impl: str = "auto") -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight, math in fp32, result in x.dtype."""
    check_impl(impl)
    if impl == "npu" or (impl == "auto" and is_npu(x)):
        return rms_norm_npu(x, weight, eps)
    return rms_norm_reference(x, weight, eps)
